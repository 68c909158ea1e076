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
    from .bench.config import LOADERS, METHODS, REFRESH, BenchConfig
    from .data import DATASETS
    from .models import MODELS

    d = BenchConfig()
    parser = argparse.ArgumentParser(prog="gpuprune", description="gpuprune: dynamic data pruning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    b = sub.add_parser(
        "bench", help="time-to-accuracy of every pruning method vs full-data training",
        description="Train the same model on the same data with full data, a proportionally "
                    "shortened full-data schedule, and every pruning method; report test accuracy, "
                    "charged wall time (train + select + refresh + score), speed-up and time to a "
                    "target accuracy. Writes results.csv, summary.csv, overlap.csv, results.json "
                    "and PNG plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = b.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="auto",
                   help="auto: the folder given by --data-dir (Fashion-MNIST IDX files or class "
                        "folders), else Fashion-MNIST from /usr/share/datasets/fashion-mnist, else "
                        "scikit-learn digits (announced as a fallback)")
    g.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the Fashion-MNIST IDX files, or of class-named image folders")
    g.add_argument("--image-size", type=_int_at_least(1), default=None,
                   help="resize side for image folders (default: the first image's size)")
    g.add_argument("--train-subset", type=_int_at_least(1), default=None,
                   help="use a random subset of this many training images")
    g.add_argument("--test-subset", type=_int_at_least(1), default=None,
                   help="use a random subset of this many test images")
    g = b.add_argument_group("training")
    g.add_argument("--model", choices=sorted(MODELS), default=d.model)
    g.add_argument("--epochs", type=_int_at_least(1), default=d.epochs)
    g.add_argument("--batch-size", type=_int_at_least(1), default=d.batch_size)
    g.add_argument("--lr", type=_float_in(0, None, low_open=True), default=d.lr,
                   help="peak learning rate (SGD, Nesterov momentum)")
    g.add_argument("--momentum", type=_float_in(0, 1, high_open=True), default=d.momentum)
    g.add_argument("--weight-decay", type=_float_in(0, None), default=d.weight_decay)
    g.add_argument("--warmup-frac", type=_float_in(0, 1, high_open=True), default=d.warmup_frac,
                   help="share of training (per optimizer step) with a rising learning rate; it "
                        "then falls linearly to 0")
    g.add_argument("--label-smoothing", type=_float_in(0, 1, high_open=True),
                   default=d.label_smoothing)
    g.add_argument("--augment", action="store_true", help="random shifted crops and flips")
    g = b.add_argument_group("methods")
    g.add_argument("--methods", nargs="+", choices=list(METHODS) + ["all"], default=["all"],
                   metavar="METHOD",
                   help=f"any of {', '.join(METHODS)}, or all; full always runs (the reference)")
    g.add_argument("--prune-ratios", nargs="+", type=_float_in(0, 1, True, True),
                   default=list(d.prune_ratios), metavar="P",
                   help="prune ratios in (0, 1); a pruned epoch keeps round((1-P) N) samples")
    g.add_argument("--seeds", nargs="+", type=_int_at_least(0), default=list(d.seeds),
                   metavar="SEED")
    g.add_argument("--epsilon", type=_float_in(0, 1), default=d.epsilon,
                   help="epsilon_greedy: explored share of the budget")
    g.add_argument("--ucb-c", type=_float_in(0, None), default=d.ucb_c,
                   help="ucb: weight of the uncertainty term")
    g.add_argument("--ucb-drift", type=_float_in(0, None), default=d.ucb_drift,
                   help="ucb: growth per unobserved epoch of a sample's variance, in units of the "
                        "mean variance (0: no growth; UCB then settles on one subset)")
    g.add_argument("--uncertainty", choices=["std", "var"], default=d.uncertainty)
    g.add_argument("--decay", type=_float_in(0, 1, high_open=True), default=d.decay,
                   help="EMA weight kept from the old loss statistics per observation (default: "
                        "each policy's own: 0.9, and 0 for infobatch: the latest loss)")
    g.add_argument("--delta", type=_float_in(0, 1), default=d.delta,
                   help="infobatch: full data from this fraction of the epochs on")
    g.add_argument("--warmup-epochs", type=_int_at_least(0), default=d.warmup_epochs,
                   help="full-data epochs before pruning starts")
    g.add_argument("--selection-interval", type=_int_at_least(1), default=d.selection_interval)
    g.add_argument("--refresh", choices=list(REFRESH), default=d.refresh,
                   help="re-score pass before each selection of epsilon_greedy, ucb and infobatch: "
                        "a forward pass in inference mode over the unselected (or all) samples "
                        "records fresh losses; its time is charged")
    g.add_argument("--el2n-seeds", type=_int_at_least(1), default=d.el2n_seeds,
                   help="el2n: models trained for scoring (K)")
    g.add_argument("--el2n-epochs", type=_int_at_least(1), default=d.el2n_epochs,
                   help="el2n: epochs each scoring model trains")
    g.add_argument("--target-acc", type=_float_in(0, 100, low_open=True), default=None,
                   help="accuracy (%%) for time-to-target; default: full-data accuracy minus "
                        "--target-drop")
    g.add_argument("--target-drop", type=_float_in(0, 100), default=d.target_drop,
                   help="points below full-data accuracy that count as reaching it")
    g = b.add_argument_group("execution and output")
    g.add_argument("--device", choices=["cpu", "cuda"], default=d.device)
    g.add_argument("--loader", choices=list(LOADERS), default=d.loader,
                   help="tensor: gather batches from in-memory tensors by the plan's indices; "
                        "torch: DataLoader with gpuprune.PrunedSampler; dali: "
                        "gpuprune.dali.PrunedDALIIterator")
    g.add_argument("--workers", type=_int_at_least(0), default=d.workers,
                   help="DataLoader worker processes (--loader torch)")
    g.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="torch CPU threads; default 1 with --device cpu (stable timings: torch's "
                        "multi-threaded CPU kernels slow down many times over when other "
                        "processes share the cores), torch's choice with --device cuda")
    g.add_argument("--out", type=Path, default=Path("results"), help="output folder")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
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


def _config_from_args(args, parser) -> BenchConfig:
    from .bench.config import METHODS, BenchConfig

    methods = METHODS if "all" in args.methods else tuple(args.methods)
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
    return BenchConfig(
        model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, warmup_frac=args.warmup_frac,
        label_smoothing=args.label_smoothing, augment=args.augment,
        prune_ratios=tuple(args.prune_ratios), seeds=tuple(args.seeds), methods=methods,
        epsilon=args.epsilon, ucb_c=args.ucb_c, ucb_drift=args.ucb_drift,
        uncertainty=args.uncertainty, decay=args.decay, refresh=args.refresh,
        delta=args.delta, warmup_epochs=args.warmup_epochs,
        selection_interval=args.selection_interval, el2n_seeds=args.el2n_seeds,
        el2n_epochs=min(args.el2n_epochs, args.epochs), target_acc=args.target_acc,
        target_drop=args.target_drop, device=args.device, loader=args.loader,
        workers=args.workers)


def _doctor(args, parser, argv: list[str]) -> int:
    from .doctor import run_from_args
    return run_from_args(args)


def _bench(args, parser, argv: list[str]) -> int:
    import torch

    from .bench import format_table, machine_info, run_bench, write_results
    from .data import load_dataset

    cfg = _config_from_args(args, parser)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda was requested but CUDA is not available "
                     "(torch reports no GPU); use --device cpu")
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
    try:
        data = load_dataset(args.dataset, args.data_dir, image_size=args.image_size)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"argument --data-dir: {e}")
    data = data.subset(args.train_subset, args.test_subset)
    for note in data.notes:
        print(f"gpuprune bench: NOTE: {note}", file=sys.stderr)
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else None)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        print(f"gpuprune bench: {data.describe()}", file=sys.stderr)
        res = run_bench(cfg, data, progress=not args.no_progress)
        for warning in res.warnings:
            print(f"gpuprune bench: WARNING: lock-in: {warning}", file=sys.stderr)
        command = "gpuprune " + shlex.join(argv)
        paths = write_results(res, args.out, machine_info(cfg.device), command=command)
        if not args.no_plots:
            from .bench.plots import write_plots
            paths.update(write_plots(res, args.out))
    finally:
        torch.set_num_threads(previous_threads)    # main() may run inside a larger process
    print(format_table(res))
    print()
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gpuprune`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args, args.subparser, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
