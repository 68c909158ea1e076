"""Command line: ``gpuprune bench`` and ``gpuprune doctor`` (also ``python -m gpuprune ...``).

``gpuprune bench`` with no arguments trains an MLP on Fashion-MNIST on the CPU with full data and
with every pruning method at prune ratio 0.5 (one seed, 10 epochs; a few minutes on 2 cores),
prints a table and writes CSV, JSON and PNG files to ``results/``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ._checks import float_bound, int_bound

if TYPE_CHECKING:
    from .bench.config import BenchConfig

__all__ = ["main", "build_parser"]


# ------------------------------------------------------------------------------ argument types
# argparse types over the library's own range rules (gpuprune._checks), worded for the command
# line: "argument --epochs: must be >= 1, got 0"
def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        bound = int_bound(value, minimum)
        if bound:
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    parse.__name__ = f"int>={minimum}"
    return parse


def _float_in(low: float | None, high: float | None, low_open: bool = False,
              high_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bound = float_bound(value, low, high, low_open, high_open)
        if bound:
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpuprune", description="gpuprune: dynamic data pruning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    b = sub.add_parser(
        "bench", help="time-to-accuracy of every pruning method vs full-data training",
        description="Train the same model on the same data with full data, full data on "
                    "shortened schedules, and every pruning method; report test accuracy, paired "
                    "differences against full data for the same epochs, the same optimizer steps "
                    "and the same charged time, the charged time (train + select + refresh + "
                    "score), speed-up and time to a target accuracy. Writes results.csv, "
                    "summary.csv, overlap.csv, ladder.csv, results.json and PNG plots. Exit "
                    "status 2 for bad arguments, 3 when the projected time is over "
                    "--time-limit-s.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_bench_arguments(b)
    b.set_defaults(handler=_bench, subparser=b)   # errors are reported as "gpuprune bench: ..."
    from .doctor import add_arguments as _doctor_arguments
    dr = sub.add_parser(
        "doctor", help="versions, the backend backend='auto' picks and why, and a self-test",
        description="Print versions, the device, which backend backend='auto' runs and why, then "
                    "run a few-second self-test of the observe update, top-k, shuffle and every "
                    "policy's plans against references, bit for bit (and the DALI iterator when "
                    "DALI is installed). Exit status 0 when everything agrees, else 1 with a "
                    "one-line reason.")
    _doctor_arguments(dr)
    dr.set_defaults(handler=_doctor, subparser=dr)
    return parser


def _add_bench_arguments(b: argparse.ArgumentParser) -> None:
    """``gpuprune bench``'s options; every one has a help text, so ``--help`` shows its default."""
    from .bench.config import (AMP, CLOCKS, LOADERS, LR_SCHEDULES, METHODS, PRESETS, REFRESH,
                               BenchConfig)
    from .data import DATASETS
    from .models import MODELS

    d = BenchConfig()
    g = b.add_argument_group("presets")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named setting of the options below (explicit options still win): "
                        + "; ".join(f"{k}: {v['_about']}" for k, v in sorted(PRESETS.items())))
    g.add_argument("--dry-run", action="store_true",
                   help="a seconds-long run of the same code path on the CPU (2 epochs, 64 "
                        "training and 32 test images, batch <= 16, the first seed, width 8 for "
                        "cnn/resnet18, no time limit), after printing the projected work of the "
                        "real run")
    g = b.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="auto",
                   help="auto: the folder given by --data-dir (Fashion-MNIST IDX files or class "
                        "folders), else Fashion-MNIST from /usr/share/datasets/fashion-mnist, else "
                        "scikit-learn digits (announced as a fallback)")
    g.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the Fashion-MNIST IDX files, or of class-named image folders "
                        "(default None: see --dataset)")
    g.add_argument("--image-size", type=_int_at_least(1), default=None,
                   help="resize side for image folders (default None: the first image's size)")
    g.add_argument("--train-subset", type=_int_at_least(1), default=None,
                   help="use a random subset of this many training images (default None: all)")
    g.add_argument("--test-subset", type=_int_at_least(1), default=None,
                   help="use a random subset of this many test images (default None: all)")
    g.add_argument("--cifar-shaped", action="store_true",
                   help="zero-pad the images to 32x32 and repeat grey to 3 channels (Fashion-MNIST "
                        "becomes CIFAR-shaped, 3x32x32)")
    g = b.add_argument_group("training")
    g.add_argument("--model", choices=sorted(MODELS), default=d.model,
                   help="mlp: 784-512-256-10 style MLP; cnn: 3 conv-BN-ReLU blocks; resnet18: "
                        "CIFAR ResNet-18")
    g.add_argument("--width", type=_int_at_least(1), default=d.width,
                   help="base width of cnn (its default 32) or resnet18 (its default 64); "
                        "None keeps the model's own")
    g.add_argument("--epochs", type=_int_at_least(1), default=d.epochs,
                   help="epochs of every run (full data and pruned)")
    g.add_argument("--batch-size", type=_int_at_least(1), default=d.batch_size,
                   help="training batch size")
    g.add_argument("--lr", type=_float_in(0, None, low_open=True), default=d.lr,
                   help="peak learning rate (SGD, Nesterov momentum)")
    g.add_argument("--lr-schedule", choices=list(LR_SCHEDULES), default=d.lr_schedule,
                   help="per optimizer step: linear (10%% of --lr rising to --lr over "
                        "--warmup-frac of training, then linear to 0) or onecycle (torch's "
                        "OneCycleLR shape: cosine from lr/25 to lr over --warmup-frac, then "
                        "cosine to lr/25e4)")
    g.add_argument("--momentum", type=_float_in(0, 1, high_open=True), default=d.momentum,
                   help="SGD momentum (Nesterov when > 0)")
    g.add_argument("--weight-decay", type=_float_in(0, None), default=d.weight_decay,
                   help="L2 weight decay")
    g.add_argument("--warmup-frac", type=_float_in(0, 1, high_open=True), default=d.warmup_frac,
                   help="share of training (per optimizer step) with a rising learning rate")
    g.add_argument("--label-smoothing", type=_float_in(0, 1, high_open=True),
                   default=d.label_smoothing, help="cross-entropy label smoothing")
    g.add_argument("--augment", action="store_true",
                   help="random shifted crops (--augment-pad) and horizontal flips")
    g.add_argument("--augment-pad", type=_int_at_least(0), default=d.augment_pad,
                   help="zero padding of the random crops, pixels")
    g = b.add_argument_group("methods")
    g.add_argument("--methods", nargs="+", choices=list(METHODS) + ["all"], default=["all"],
                   metavar="METHOD",
                   help=f"any of {', '.join(METHODS)}, or all (every method but InfoBatch's "
                        f"ablations and the +sched variants, which join it with "
                        f"--keep-schedule); full always runs (the reference)")
    g.add_argument("--keep-schedule", nargs=3, default=None, metavar=("SHAPE", "START", "END"),
                   help="the keep schedule the +sched methods run with instead of keeping 1-P: "
                        "linear or cosine from START to END (fractions kept, in (0, 1]) over the "
                        "pruned epochs, e.g. --keep-schedule linear 0.7 0.3")
    g.add_argument("--prune-ratios", nargs="+", type=_float_in(0, 1, True, True),
                   default=list(d.prune_ratios), metavar="P",
                   help="prune ratios in (0, 1); a pruned epoch keeps round((1-P) N) samples")
    g.add_argument("--seeds", nargs="+", type=_int_at_least(0), default=list(d.seeds),
                   metavar="SEED", help="one run of every method per seed")
    g.add_argument("--epsilon", type=_float_in(0, 1), default=d.epsilon,
                   help="epsilon_greedy: explored share of the budget")
    g.add_argument("--ucb-c", type=_float_in(0, None), default=d.ucb_c,
                   help="ucb: weight of the uncertainty term")
    g.add_argument("--ucb-drift", type=_float_in(0, None), default=d.ucb_drift,
                   help="ucb: growth per unobserved epoch of a sample's variance, in units of the "
                        "mean variance (0: no growth; UCB then settles on one subset)")
    g.add_argument("--uncertainty", choices=["std", "var"], default=d.uncertainty,
                   help="ucb: the uncertainty term, c * std or c * var")
    g.add_argument("--decay", type=_float_in(0, 1, high_open=True), default=d.decay,
                   help="EMA weight kept from the old loss statistics per observation (None: "
                        "each policy's own: 0.9, and 0 for infobatch: the latest loss)")
    g.add_argument("--delta", type=_float_in(0, 1), default=d.delta,
                   help="infobatch: full data from this fraction of the epochs on")
    g.add_argument("--warmup-epochs", type=_int_at_least(0), default=d.warmup_epochs,
                   help="full-data epochs before pruning starts")
    g.add_argument("--selection-interval", type=_int_at_least(1), default=d.selection_interval,
                   help="epochs between two selections (the subset is reused in between)")
    g.add_argument("--refresh", choices=list(REFRESH), default=d.refresh,
                   help="what the +refresh methods re-score before each selection: a forward "
                        "pass in inference mode over the unselected (or all) samples records "
                        "fresh losses; its time is charged")
    g.add_argument("--el2n-seeds", type=_int_at_least(1), default=d.el2n_seeds,
                   help="el2n: models trained for scoring (K)")
    g.add_argument("--el2n-epochs", type=_int_at_least(1), default=d.el2n_epochs,
                   help="el2n: epochs each scoring model trains")
    g.add_argument("--target-acc", type=_float_in(0, 100, low_open=True), default=d.target_acc,
                   help="accuracy (%%) for time-to-target (None: full-data accuracy minus "
                        "--target-drop, per seed)")
    g.add_argument("--target-drop", type=_float_in(0, 100), default=d.target_drop,
                   help="points below full-data accuracy that count as reaching it")
    g = b.add_argument_group("measurement")
    g.add_argument("--no-equal-time", dest="equal_time", action="store_false",
                   help="skip the equal-time ladder (full-data runs bracketing each method's "
                        "charged time) and the 'same time' column; default: run it")
    g.add_argument("--ladder", nargs="+", type=_float_in(0, 1, low_open=True), default=list(d.ladder),
                   metavar="F",
                   help="fractions of the full run's optimizer steps the ladder may train full "
                        "data for (only those bracketing a method's time run; 1 is the full run)")
    g.add_argument("--clock", choices=list(CLOCKS), default=d.clock,
                   help="the clock charged time is read on (then divided by the reference step "
                        "unless --probe-steps 0): auto = process CPU time on the CPU, wall time "
                        "(device synchronised) on a GPU")
    g.add_argument("--probe-steps", type=_int_at_least(0), default=d.probe_steps,
                   help="steps of the reference training step timed before and after every run; "
                        "speed-ups and the equal-time comparison then count charged time in "
                        "reference steps, which a changing load on the machine moves much less "
                        "than seconds (0: raw seconds)")
    g.add_argument("--exploitation", action="store_true",
                   help="measure each epoch's plan against every sample's current loss (an "
                        "uncharged forward pass over all N before every epoch)")
    g.add_argument("--eval-every", type=_int_at_least(1), default=d.eval_every,
                   help="evaluate on the test set every this many epochs (and after the last)")
    g.add_argument("--time-limit-s", type=_float_in(0, None, low_open=True), default=None,
                   help="after the warm-up, stop with exit status 3 if the sweep is projected to "
                        "take longer than this (None: no limit)")
    g.add_argument("--assume-rates", nargs=2, type=_float_in(0, None, low_open=True), default=None,
                   metavar=("TRAIN", "FORWARD"),
                   help="samples per second trained and forward-only, for the projection instead "
                        "of the warm-up's measurement (None: measured)")
    g = b.add_argument_group("execution and output")
    g.add_argument("--device", choices=["cpu", "cuda"], default=d.device,
                   help="where to train")
    g.add_argument("--amp", choices=list(AMP), default=d.amp,
                   help="bf16: the forward pass under torch.autocast to bfloat16 (losses float32)")
    g.add_argument("--channels-last", action="store_true",
                   help="models and batches in channels-last memory format (GPU convolutions)")
    g.add_argument("--pruner-backend", choices=["auto", "cuda", "torch"], default=d.pruner_backend,
                   help="the Pruner's backend (see gpuprune doctor)")
    g.add_argument("--loader", choices=list(LOADERS), default=d.loader,
                   help="tensor: gather batches from in-memory tensors by the plan's indices; "
                        "torch: DataLoader with gpuprune.PrunedSampler; dali: "
                        "gpuprune.dali.PrunedDALIIterator")
    g.add_argument("--workers", type=_int_at_least(0), default=d.workers,
                   help="DataLoader worker processes (--loader torch)")
    g.add_argument("--eval-batch-size", type=_int_at_least(1), default=d.eval_batch_size,
                   help="batch size of test evaluation and of forward-only passes")
    g.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="torch CPU threads (None: 1 with --device cpu, for stable timings: torch's "
                        "multi-threaded CPU kernels slow down many times over when other "
                        "processes share the cores; torch's choice with --device cuda)")
    g.add_argument("--out", type=Path, default=Path("results"), help="output folder")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parse_bench(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; with ``bench --preset NAME``, the preset's values become the defaults
    (so explicit options still win)."""
    args, _ = parser.parse_known_args(argv)
    if getattr(args, "command", None) != "bench" or args.preset is None:
        return parser.parse_args(argv)
    from .bench.config import PRESETS
    preset = {k: v for k, v in PRESETS[args.preset].items() if not k.startswith("_")}
    args.subparser.set_defaults(**preset)
    return parser.parse_args(argv)


def _config_from_args(args, parser) -> BenchConfig:
    from .bench.config import ALL_METHODS, METHODS, SCHEDULED, BenchConfig
    from .schedule import check_keep

    methods = tuple(args.methods)
    if "all" in args.methods:
        methods = METHODS if args.keep_schedule else ALL_METHODS
    keep_schedule = None
    if args.keep_schedule:
        shape, start, end = args.keep_schedule
        try:                                   # the library's own check, as a usage error
            keep_schedule = check_keep((shape, float(start), float(end)))
        except ValueError as e:
            parser.error(f"argument --keep-schedule SHAPE START END: {e}")
    elif any(m in SCHEDULED for m in methods):
        parser.error(f"argument --methods: {', '.join(m for m in methods if m in SCHEDULED)} "
                     f"need --keep-schedule SHAPE START END")
    if args.el2n_epochs > args.epochs and "el2n" in methods:
        parser.error(f"argument --el2n-epochs: must be <= --epochs ({args.epochs}), "
                     f"got {args.el2n_epochs}")
    if args.warmup_epochs >= args.epochs:
        parser.error(f"argument --warmup-epochs: must be < --epochs ({args.epochs}), "
                     f"got {args.warmup_epochs}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"argument --seeds: repeated seed in {args.seeds}")
    if len(set(args.prune_ratios)) != len(args.prune_ratios):
        parser.error(f"argument --prune-ratios: repeated ratio in {args.prune_ratios}")
    if args.width is not None and args.model == "mlp":
        parser.error(f"argument --width: applies to cnn and resnet18, not --model mlp "
                     f"(got {args.width})")
    return BenchConfig(
        model=args.model, width=args.width, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule, warmup_frac=args.warmup_frac,
        label_smoothing=args.label_smoothing, augment=args.augment, augment_pad=args.augment_pad,
        prune_ratios=tuple(args.prune_ratios), seeds=tuple(args.seeds), methods=methods,
        keep_schedule=keep_schedule,
        epsilon=args.epsilon, ucb_c=args.ucb_c, ucb_drift=args.ucb_drift,
        uncertainty=args.uncertainty, decay=args.decay, refresh=args.refresh,
        delta=args.delta, warmup_epochs=args.warmup_epochs,
        selection_interval=args.selection_interval, el2n_seeds=args.el2n_seeds,
        el2n_epochs=min(args.el2n_epochs, args.epochs), target_acc=args.target_acc,
        target_drop=args.target_drop, equal_time=args.equal_time, ladder=tuple(args.ladder),
        clock=args.clock, probe_steps=args.probe_steps, exploitation=args.exploitation,
        eval_every=args.eval_every,
        device=args.device, amp=args.amp, channels_last=args.channels_last,
        pruner_backend=args.pruner_backend, loader=args.loader, workers=args.workers,
        eval_batch_size=args.eval_batch_size)


def _doctor(args, parser, argv: list[str]) -> int:
    from .doctor import run_from_args
    return run_from_args(args)


def _bench(args, parser, argv: list[str]) -> int:
    import torch

    from .bench import BudgetExceeded, format_table, machine_info, run_bench, write_results
    from .bench.budget import planned_work
    from .bench.config import dry_run_config
    from .bench.timeline import Timeline, process_age
    from .data import load_dataset

    timeline = Timeline()
    # the interpreter's start and the imports, when this process is the command (not a caller's)
    age = process_age() if args.standalone else None
    before = 0.0 if age is None else max(0.0, age - timeline.total())
    cfg = _config_from_args(args, parser)
    if args.device == "cuda" and not args.dry_run and not torch.cuda.is_available():
        parser.error("argument --device: cuda was requested but CUDA is not available "
                     "(torch reports no GPU); use --device cpu (or --dry-run)")
    if args.loader == "dali":
        from .bench.dali_batches import dali_unavailable_reason
        reason = dali_unavailable_reason()
        if reason is not None:
            parser.error(f"argument --loader: {reason}; use --loader tensor or torch")
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"argument --data-dir: not a folder: {args.data_dir}")
    if args.dataset == "folder" and args.data_dir is None:
        parser.error("argument --data-dir: --dataset folder needs --data-dir "
                     "(a folder of class-named image folders)")
    with timeline.phase("data: load"):
        try:
            data = load_dataset(args.dataset, args.data_dir, image_size=args.image_size)
        except (FileNotFoundError, ValueError) as e:
            parser.error(f"argument --data-dir: {e}")
        data = data.subset(args.train_subset, args.test_subset)
        if args.cifar_shaped:
            try:
                data = data.cifar_shaped()
            except ValueError as e:
                parser.error(f"argument --cifar-shaped: {e}")
    rates = None
    if args.assume_rates is not None:
        rates = {"train_rate": args.assume_rates[0], "forward_rate": args.assume_rates[1],
                 "source": f"assumed rates {args.assume_rates[0]:g} / {args.assume_rates[1]:g}"}
    time_limit = args.time_limit_s
    if args.dry_run:
        real = planned_work(cfg, len(data.x_train), len(data.x_test))
        print(f"gpuprune bench: dry run; the real run: {_describe_work(real, rates)}",
              file=sys.stderr)
        from .bench.config import DRY_RUN
        cfg = dry_run_config(cfg)
        data = data.subset(DRY_RUN["train_subset"], DRY_RUN["test_subset"])
        rates, time_limit = None, None
    for note in data.notes:
        print(f"gpuprune bench: NOTE: {note}", file=sys.stderr)
    threads = args.threads if args.threads is not None else (1 if cfg.device == "cpu" else None)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        print(f"gpuprune bench: {data.describe()}", file=sys.stderr)
        try:
            res = run_bench(cfg, data, progress=not args.no_progress, timeline=timeline,
                            time_limit_s=time_limit, rates=rates,
                            log=lambda line: print(f"gpuprune bench: {line}", file=sys.stderr,
                                                   flush=True))
        except BudgetExceeded as e:
            parser.exit(3, f"gpuprune bench: error: {e}; shrink it (--train-subset, --epochs, "
                           f"--methods, --seeds) or raise --time-limit-s\n")
        for warning in res.warnings:
            print(f"gpuprune bench: WARNING: {warning}", file=sys.stderr)
        command = "gpuprune " + shlex.join(argv)
        paths = {}
        if not args.no_plots:
            from .bench.plots import write_plots
            with timeline.phase("plots"):
                paths.update(write_plots(res, args.out))
        with timeline.phase("results: write"):
            paths = {**write_results(res, args.out, machine_info(cfg.device), command=command,
                                     timeline=timeline.summary(before)), **paths}
    finally:
        torch.set_num_threads(previous_threads)    # main() may run inside a larger process
    print(format_table(res, timeline=timeline.summary(before)))
    print()
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _describe_work(work, rates: dict | None) -> str:
    """One sentence: the work of a sweep, and its length at ``rates`` when given."""
    from .bench.budget import project
    train = sum(w.train for w in work)
    forward = sum(w.forward for w in work)
    text = (f"{train:,.0f} samples trained and {forward:,.0f} forward-only"
            f"{'' if all(w.exact for w in work) else ' (InfoBatch and the ladder estimated)'}")
    if rates:
        p = project(work, rates["train_rate"], rates["forward_rate"])
        text += (f", {p['full_run_equivalents']:.1f} full-run equivalents: {p['seconds']:.0f} s "
                 f"at {rates['source']} samples/s")
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gpuprune`` console script; returns the exit status."""
    standalone = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = _parse_bench(parser, argv)
    args.standalone = standalone
    return args.handler(args, args.subparser, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
