"""Cost of feeding DALI through gpuprune: pruned iterator vs plain DALI, pruned vs full epochs.

    python benchmarks/pipeline.py                      # CPU pipelines (device_id=None), ~3 min
    python benchmarks/pipeline.py --device-id 0        # GPU pipelines (augmentation on the GPU)
    python benchmarks/pipeline.py --files 0 --reps 6   # arrays only, fewer repeats
    python benchmarks/pipeline.py --sections 5         # the epoch boundary's cost (~1 min)
    python benchmarks/pipeline.py --smoke              # every section on tiny data, seconds (CI)

Data: Fashion-MNIST training images made CIFAR-shaped (32x32x3 uint8), plus ``--files`` of them
written as PNG files. Graph: random flip + normalise to float CHW (``crop_mirror_normalize``), the
same in every pipeline. Batch 256.

Pruned runs use **uniform/static** plans (cheap to make) and **UCB** plans (a selection over the
loss statistics); either way each epoch is one DALI epoch, so the pipeline refills at every epoch
boundary.

1. **Arrays** (samples/s; keep=0.5 of ``--samples``): ``ArraySource`` + ``PrunedDALIIterator``
   with uniform plans and with UCB plans vs a plain batch-mode
   ``external_source`` callable + ``DALIGenericIterator`` over the uniform plans (the minimal
   hand-written version, ``reset()`` between epochs). Target >= 0.97.
2. **Files** (samples/s over a random half of the files: policy "static", so a reader over a
   fixed list is a fair baseline): ``FileSource`` + ``PrunedDALIIterator`` (static;
   ``parallel=True`` with 2 workers; and UCB: a new half each epoch) vs
   ``fn.readers.file(files=<the planned files>)`` +
   ``DALIGenericIterator(reader_name=...)`` (it reads ahead across epochs), with its default
   (memory-mapped files) and with ``dont_use_mmap=True`` (plain reads, FileSource's default), vs
   a reader rebuilt every epoch with that epoch's planned list (build included), and vs a plain
   ``external_source`` of the paths (a list of arrays, as DALI's docs show) ->
   ``fn.io.file.read(dont_use_mmap=True)``. PNG decoded on the CPU (or "mixed").
   Target: pruned >= 0.95 x reader, >= 0.97 x plain source.
3. **Epoch time vs keep** (arrays): wall time of an epoch of the pruned iterator at keep = 0.3,
   0.5, 0.7 (uniform) against a full-data epoch of the same iterator (policy "full"), each timed
   from ``pruner.plan`` to the end of the loop (selection, publishing, turnover included).
   Target: time(keep) <= 1.02 x keep x time(full).
4. **Turnover** (arrays, N = ``--samples``, keep=0.5): the wait for the first batch after
   ``set_epoch`` (the plan made beforehand) vs a steady batch's wait, in a training loop whose
   step takes ``--step-ms`` (a sleep: the host waits for the device, the CPU is free), for uniform
   plans, UCB plans and plain DALI's first batch after ``reset()``; and the
   same first-batch figures from section 1's tight loop (no step: the pipeline is the
   bottleneck, so every batch, the first included, waits about one pipeline batch).
   Target: first batch within 2 ms.
5. **The epoch boundary's cost** (arrays, N = ``--samples``, keep=0.5, uniform plans): a training
   loop whose step takes ``--train-step-ms`` (default 5 ms: a sleep, the host waiting for the
   device, then ``pruner.observe`` of a loss read from the batch), epochs timed from ``set_epoch``
   (which plans) to the loop's end. Reported: the epoch time, the first-batch wait after
   ``set_epoch`` (plan and pipeline refill), a steady batch's wait, and the boundary's share of a
   pruned epoch, (first - steady) / epoch: the most that reading the next epoch's first batches
   ahead, across the boundary, could save. Read-ahead was removed in 0.3 because, measured side by
   side in this section (commit fbc5d1d), it saved less than the 1 % it had to save.

``--smoke`` runs every section on tiny data in a few seconds (CI); its figures mean nothing.

Fairness: every configuration runs in blocks of consecutive epochs (as in training), each block
after a pause that lets any background work of the previous block finish (``fn.readers.file``
keeps reading after an epoch's last batch) and one untimed epoch; blocks of the
configurations are interleaved over rounds. Ratios are given four ways: paired (the ratio within
each round, whose epochs ran close together in time, then the median over rounds: slow drifts of
the machine's load cancel out), of the median wall-time rates, of the best epochs, and of the
process's CPU time per sample (user + system, all threads). The machine, its load average and
the versions are printed first. Each configuration is checked before it is timed: every planned
sample arrives once, with its own label.
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpuprune.bench.report import cpu_name              # noqa: E402
import gpuprune as gp                                                      # noqa: E402

try:
    import nvidia.dali as dali
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
except ImportError:                                                        # pragma: no cover
    sys.exit("benchmarks/pipeline.py needs NVIDIA DALI (pip install nvidia-dali-cuda120)")
from gpuprune.dali import ArraySource, FileSource, build_iterator         # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = [0.2860 * 255] * 3, [0.3530 * 255] * 3
KEEPS = (0.3, 0.5, 0.7)


# ---------------------------------------------------------------- environment and data
def describe(args) -> str:
    load = "load average %.1f %.1f %.1f" % os.getloadavg()
    gpu = ""
    if args.device_id is not None:
        gpu = f" | GPU {torch.cuda.get_device_name(args.device_id)}"
    return (f"machine: {platform.node()} | {cpu_name()} | {os.cpu_count()} logical CPUs | {load}{gpu}\n"
            f"python {platform.python_version()} | DALI {dali.__version__} | torch {torch.__version__} "
            f"| numpy {np.__version__} | gpuprune {gp.__version__}\n"
            f"pipelines: batch {args.batch_size}, DALI num_threads {args.threads}, torch threads "
            f"{torch.get_num_threads()}, device_id {args.device_id}, {args.rounds} rounds x "
            f"{max(1, args.reps // args.rounds)} timed epochs per configuration")


def load_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n training images, CIFAR-shaped: (n, 32, 32, 3) uint8 (2-px border, grey to RGB)."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        sys.exit(f"Fashion-MNIST not found in {FMNIST} (apt-get install dataset-fashion-mnist)")
    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(FMNIST / "train-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)[:n].astype(np.int64)
    x = np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=-1)
    return np.ascontiguousarray(x), y


def write_pngs(x: np.ndarray, root: Path) -> list[str]:
    from PIL import Image
    paths = []
    for i, img in enumerate(x):
        p = root / f"{i:06d}.png"
        Image.fromarray(img).save(p)
        paths.append(str(p))
    return paths


def augment(images, labels):
    """The user's graph: random horizontal flip and normalisation to float CHW (on the GPU when the
    pipeline has one)."""
    if Pipeline.current().device_id is not None and images.device == "cpu":
        images = images.gpu()
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=MEAN,
                                      std=STD, mirror=fn.random.coin_flip())
    return images, labels


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------- configurations
class Config:
    """One way of feeding epochs: ``prepare()`` (untimed) readies the next epoch, ``run()`` iterates
    it and returns the number of samples; ``first`` records each epoch's first-batch latency."""

    name = "config"

    def __init__(self) -> None:
        self.epoch = 0
        self.first: list[float] = []          # start of the epoch -> first batch, seconds

    def loop(self, it, key: str, t0: float) -> int:
        count = 0
        for (b,) in it:
            if not count:
                self.first.append(time.perf_counter() - t0)
            count += len(b[key])
        return count

    def run(self) -> int:
        raise NotImplementedError

    def labels_of_epoch(self) -> np.ndarray:
        """Run one epoch and return its labels (for the correctness check)."""
        raise NotImplementedError


class PlainBatches:
    """The minimal hand-written batch-mode source over an index list (no gpuprune)."""

    def __init__(self, arrays, bs: int) -> None:
        self.arrays, self.bs, self.sel = arrays, bs, np.empty(0, np.int64)

    def __call__(self, info):
        lo = info.iteration * self.bs
        if lo >= len(self.sel):
            raise StopIteration
        idx = self.sel[lo:lo + self.bs]
        return tuple(a[idx] for a in self.arrays)


class PlainArrays(Config):
    """external_source(PlainBatches) + DALIGenericIterator; ``plans(e)`` gives epoch e's ids
    (set before the epoch's reset(), untimed: the plan is the twin Pruner's)."""

    name = "plain ES"

    def __init__(self, x, y, plans, args) -> None:
        super().__init__()
        self.src = PlainBatches((x, y), args.batch_size)
        self.plans = plans
        pipe = Pipeline(batch_size=args.batch_size, num_threads=args.threads,
                        device_id=args.device_id, seed=0)
        with pipe:
            images, labels = fn.external_source(self.src, num_outputs=2, batch=True,
                                                batch_info=True, dtype=[types.UINT8, types.INT64],
                                                ndim=[3, 0], layout=["HWC", None])
            pipe.set_outputs(*augment(images, labels))
        self.it = DALIGenericIterator(pipe, ["data", "label"], size=-1, prepare_first_batch=False)

    def prepare(self) -> None:
        self.src.sel = self.plans(self.epoch)

    def run(self) -> int:
        t0 = time.perf_counter()
        if self.epoch:
            self.it.reset()
        self.epoch += 1
        return self.loop(self.it, "label", t0)

    def labels_of_epoch(self) -> np.ndarray:
        self.prepare()
        if self.epoch:
            self.it.reset()
        self.epoch += 1
        return np.concatenate([b["label"].cpu().numpy().reshape(-1) for (b,) in self.it])


class Pruned(Config):
    """A PrunedDALIIterator; ``prepare()`` plans the next epoch (untimed) unless
    ``plan_timed``; ``run()`` calls ``set_epoch`` (publish, reset, prefetch) and loops."""

    name = "pruned"

    def __init__(self, pruner, source, args, plan_timed: bool = False, **kwargs) -> None:
        super().__init__()
        self.pruner, self.plan_timed = pruner, plan_timed
        self.it = build_iterator(pruner, source, augment, batch_size=args.batch_size,
                                 num_threads=args.threads, device_id=args.device_id, seed=0,
                                 **kwargs)
        self.plan_times: list[float] = []

    def prepare(self) -> None:
        if not self.plan_timed:
            self.pruner.plan(self.epoch)

    def run(self) -> int:
        t = time.perf_counter()
        self.pruner.plan(self.epoch)                 # free if prepare() did it
        t0 = time.perf_counter()
        self.plan_times.append(t0 - t)
        self.it.set_epoch(self.epoch)
        self.epoch += 1
        return self.loop(self.it, "index", t0)

    def labels_of_epoch(self) -> np.ndarray:
        self.it.set_epoch(self.epoch)
        self.epoch += 1
        return np.concatenate([b["label"].cpu().numpy().reshape(-1) for (b,) in self.it])


class Trained(Pruned):
    """A training loop over a PrunedDALIIterator: ``set_epoch`` (which plans: timed), then per batch
    a step of ``step_s`` seconds (a sleep: the host waits for the device while DALI works on the
    CPU) and ``pruner.observe`` of a loss read from the batch's data."""

    name = "trained"

    def __init__(self, pruner, source, args, step_s: float, **kwargs) -> None:
        super().__init__(pruner, source, args, plan_timed=True, **kwargs)
        self.step_s = step_s
        self.steady: list[float] = []         # waits for every batch but the first, seconds

    def run(self) -> int:
        t0 = time.perf_counter()
        self.it.set_epoch(self.epoch)
        self.epoch += 1
        count, last = 0, t0
        for (b,) in self.it:
            t = time.perf_counter()
            if not count:
                self.first.append(t - t0)
            else:
                self.steady.append(t - last)
            time.sleep(self.step_s)
            loss = b["data"].float().mean(dim=tuple(range(1, b["data"].dim())))
            self.pruner.observe(b["index"], loss)
            count += len(b["index"])
            last = time.perf_counter()
        return count


def reader_pipeline(files, labels, args, mmap: bool = True) -> Pipeline:
    pipe = Pipeline(batch_size=args.batch_size, num_threads=args.threads,
                    device_id=args.device_id, seed=0)
    with pipe:
        raw, lab = fn.readers.file(files=list(files), labels=[int(v) for v in labels],
                                   random_shuffle=False, name="Reader", dont_use_mmap=not mmap)
        dev = "mixed" if args.device_id is not None else "cpu"
        images = fn.decoders.image(raw, device=dev, output_type=types.RGB)
        pipe.set_outputs(*augment(images, lab))
    return pipe


class Reader(Config):
    """fn.readers.file over a fixed file list + DALIGenericIterator(reader_name=...), auto_reset:
    it reads ahead across epoch boundaries."""

    name = "fn.readers.file"

    def __init__(self, files, labels, args, mmap: bool = True) -> None:
        super().__init__()
        self.it = DALIGenericIterator(reader_pipeline(files, labels, args, mmap), ["data", "label"],
                                      reader_name="Reader", auto_reset=True,
                                      last_batch_policy=LastBatchPolicy.PARTIAL)

    def prepare(self) -> None:
        pass

    def run(self) -> int:
        return self.loop(self.it, "label", time.perf_counter())

    def labels_of_epoch(self) -> np.ndarray:
        return np.concatenate([b["label"].cpu().numpy().reshape(-1) for (b,) in self.it])


class RebuiltReader(Config):
    """A reader pipeline built anew each epoch with that epoch's planned files (build timed)."""

    name = "reader rebuilt/epoch"

    def __init__(self, pruner, files, labels, args) -> None:
        super().__init__()
        self.pruner, self.files, self.labels, self.args = pruner, files, labels, args

    def prepare(self) -> None:
        self.pruner.plan(self.epoch)

    def _iterator(self):
        ids = self.pruner.plan(self.epoch).indices.cpu().numpy()
        self.epoch += 1
        pipe = reader_pipeline([self.files[i] for i in ids], self.labels[ids], self.args)
        return DALIGenericIterator(pipe, ["data", "label"], reader_name="Reader",
                                   last_batch_policy=LastBatchPolicy.PARTIAL)

    def run(self) -> int:
        t0 = time.perf_counter()
        return self.loop(self._iterator(), "label", t0)

    def labels_of_epoch(self) -> np.ndarray:
        return np.concatenate([b["label"].cpu().numpy().reshape(-1) for (b,) in self._iterator()])


class PlainPaths(Config):
    """external_source of paths (no gpuprune; a list of per-sample arrays, as DALI's docs show) ->
    fn.io.file.read (plain reads, as FileSource's default) -> decoder, fixed file list."""

    name = "plain ES paths"

    class Source:
        def __init__(self, files, labels, bs) -> None:
            self.paths = [np.frombuffer(f.encode(), np.uint8) for f in files]
            self.labels, self.bs = np.asarray(labels), bs

        def __call__(self, info):
            lo = info.iteration * self.bs
            if lo >= len(self.paths):
                raise StopIteration
            return self.paths[lo:lo + self.bs], self.labels[lo:lo + self.bs]

    def __init__(self, files, labels, args) -> None:
        super().__init__()
        self.src = self.Source(files, labels, args.batch_size)
        pipe = Pipeline(batch_size=args.batch_size, num_threads=args.threads,
                        device_id=args.device_id, seed=0)
        with pipe:
            paths, lab = fn.external_source(self.src, num_outputs=2, batch=True, batch_info=True,
                                            dtype=[types.UINT8, types.INT64], ndim=[1, 0])
            dev = "mixed" if args.device_id is not None else "cpu"
            images = fn.decoders.image(fn.io.file.read(paths, dont_use_mmap=True), device=dev,
                                       output_type=types.RGB)
            pipe.set_outputs(*augment(images, lab))
        self.it = DALIGenericIterator(pipe, ["data", "label"], size=-1, prepare_first_batch=False)

    def prepare(self) -> None:
        pass

    def run(self) -> int:
        t0 = time.perf_counter()
        if self.epoch:
            self.it.reset()
        self.epoch += 1
        return self.loop(self.it, "label", t0)

    def labels_of_epoch(self) -> np.ndarray:
        if self.epoch:
            self.it.reset()
        self.epoch += 1
        return np.concatenate([b["label"].cpu().numpy().reshape(-1) for (b,) in self.it])


# ---------------------------------------------------------------- timing
def timed(cfg: Config) -> tuple[float, int, float]:
    """(wall s, samples, CPU s) of one epoch."""
    sync()
    c, t = cpu_seconds(), time.perf_counter()
    n = cfg.run()
    sync()
    return time.perf_counter() - t, n, cpu_seconds() - c


PAUSE = 0.5     # seconds between blocks (0 with --smoke)


def in_blocks(configs: dict, rounds: int, per_block: int, pause: float | None = None
              ) -> dict[str, list]:
    """``rounds`` rounds over the configurations (order alternating); in each, a block of one
    untimed and ``per_block`` timed consecutive epochs, after ``pause`` seconds in which any
    background prefetch of the previous block finishes."""
    pause = PAUSE if pause is None else pause
    out = {name: [] for name in configs}
    names = list(configs)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            time.sleep(pause)
            cfg = configs[name]
            cfg.prepare()
            cfg.run()
            for _ in range(per_block):
                cfg.prepare()
                out[name].append(timed(cfg))
    return out


def rate(samples) -> float:
    return statistics.median(n / t for t, n, _ in samples)


def best_rate(samples) -> float:
    return max(n / t for t, n, _ in samples)


def cpu_rate(samples) -> float:
    return statistics.median(n / c for _, n, c in samples if c > 0)


def paired(base, other, per_round: int = 1) -> float:
    """Median over rounds of (rate of ``other`` / rate of ``base``) within the same round: epochs
    measured close together in time, so slow drifts of the machine's load cancel out."""
    def round_rates(samples):
        return [statistics.median(n / t for t, n, _ in samples[i:i + per_round])
                for i in range(0, len(samples), per_round)]
    return statistics.median(o / b for b, o in zip(round_rates(base), round_rates(other)))


def ratio_row(name, count, base, other, per_round: int = 1, width=46) -> str:
    return (f"{name:<{width}} {count:>8} {rate(base):>10,.0f} {rate(other):>10,.0f} "
            f"{paired(base, other, per_round):>7.3f} {rate(other) / rate(base):>7.3f} "
            f"{best_rate(other) / best_rate(base):>7.3f} {cpu_rate(other) / cpu_rate(base):>7.3f}")


def check(cfg: Config, want_labels: np.ndarray, what: str) -> None:
    got = cfg.labels_of_epoch()
    if not np.array_equal(got, want_labels):
        sys.exit(f"{what}: wrong samples or labels ({len(got)} labels, {len(want_labels)} expected)")


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=60000, help="in-memory samples (max 60000)")
    ap.add_argument("--files", type=int, default=8000, help="PNG files for section 2 (0: skip)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="DALI CPU threads")
    ap.add_argument("--device-id", type=int, default=None, help="GPU for the pipelines (default: CPU)")
    ap.add_argument("--reps", type=int, default=12, help="timed epochs per configuration")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of blocks (reps/rounds epochs "
                    "each)")
    ap.add_argument("--step-ms", type=float, default=10.0,
                    help="simulated training step per batch in section 4 (sleep), ms")
    ap.add_argument("--turnover-epochs", type=int, default=6, help="timed epochs in section 4")
    ap.add_argument("--train-step-ms", type=float, default=5.0,
                    help="training step per batch in section 5 (sleep + observe), ms")
    ap.add_argument("--sections", default="12345", help="sections to run, e.g. 2 or 14")
    ap.add_argument("--smoke", action="store_true",
                    help="every section on tiny data in seconds (for CI: the figures mean nothing)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch CPU threads (selection runs in torch; DALI has its own threads)")
    args = ap.parse_args()
    if args.smoke:
        global PAUSE
        PAUSE = 0.0
        args.samples, args.files, args.batch_size = min(args.samples, 1024), min(args.files, 96), 64
        args.reps, args.rounds, args.turnover_epochs = 1, 1, 1
        args.step_ms, args.train_step_ms = 1.0, 1.0
    torch.set_num_threads(args.torch_threads)
    print(describe(args), flush=True)
    x, y = load_images(args.samples)
    header = (f"{'compared / baseline':<46} {'samples':>8} {'baseline':>10} {'compared':>10} "
              f"{'paired':>7} {'median':>7} {'best':>7} {'CPU':>7}")

    # 1. arrays: the same uniform keep=0.5 plans through pruned and plain; UCB plans refilled
    per_block = max(1, args.reps // args.rounds)
    tight: dict[str, float] = {}
    steady = float("nan")
    if "1" in args.sections:
        tight, steady = arrays(x, y, args, header, per_block)
    if args.files and "2" in args.sections:
        files(x, y, args, header, per_block)
    if "3" in args.sections:
        epoch_time(x, y, args, per_block)
    if "4" in args.sections:
        turnover_table(x, y, args, tight, steady)
    if "5" in args.sections:
        boundary_cost(x, y, args)
    print("\nload average at the end: %.1f %.1f %.1f" % os.getloadavg())


def arrays(x, y, args, header, per_block) -> tuple[dict[str, float], float]:
    n = len(x)
    pruner = gp.Pruner(n, keep=0.5, policy="uniform", seed=0)
    twin = gp.Pruner(n, keep=0.5, policy="uniform", seed=0)     # same seed: the same plans
    ucb = gp.Pruner(n, keep=0.5, policy="ucb", seed=0)
    configs = {"pruned": Pruned(pruner, ArraySource(x, y, layouts=("HWC", None)), args),
               "pruned ucb": Pruned(ucb, ArraySource(x, y, layouts=("HWC", None)), args),
               "plain": PlainArrays(x, y, lambda e: twin.plan(e).indices.numpy().astype(np.int64),
                                    args)}
    count = len(twin.plan(0))
    check(configs["pruned"], y[pruner.plan(0).indices.numpy()], "pruned arrays")
    check(configs["pruned ucb"], y[ucb.plan(0).indices.numpy()], "pruned ucb arrays")
    check(configs["plain"], y[twin.plan(0).indices.numpy()], "plain arrays")
    res = in_blocks(configs, args.rounds, per_block)
    print(f"\n1. arrays: samples/s, {args.rounds} blocks of {per_block} epochs each (selection not "
          "timed); ratio: paired (median over rounds of the ratio within a round), of the median "
          "rates, of the best epochs and of the CPU time per sample (target >= 0.97)")
    print(header)
    print(ratio_row("pruned uniform / plain ES", count, res["plain"], res["pruned"], per_block))
    print(ratio_row("pruned ucb / plain ES", count, res["plain"], res["pruned ucb"], per_block))
    print(ratio_row("pruned uniform / pruned ucb", count, res["pruned ucb"], res["pruned"],
                    per_block))
    tight = {name: statistics.median(cfg.first[1:]) for name, cfg in configs.items()}
    steady = statistics.median(t / -(-k // args.batch_size) for t, k, _ in res["pruned"])
    return tight, steady


def files(x, y, args, header, per_block) -> None:
    """2. files: a fixed random half of the files through every configuration."""
    n = len(x)
    nf = min(args.files, n)
    with tempfile.TemporaryDirectory(prefix="gpuprune-bench-") as tmp:
        t = time.perf_counter()
        paths = write_pngs(x[:nf], Path(tmp))
        print(f"\nwrote {nf} PNG files in {time.perf_counter() - t:.1f}s", flush=True)
        fpruner = gp.Pruner(nf, keep=0.5, policy="static", seed=0)
        fsel = fpruner.plan(0).indices.numpy().astype(np.int64)
        sel_files, sel_labels = [paths[i] for i in fsel], y[fsel]
        configs = {
            "reader": Reader(sel_files, sel_labels, args),
            "reader no mmap": Reader(sel_files, sel_labels, args, mmap=False),
            "pruned": Pruned(fpruner, FileSource(paths, y[:nf], reader_labels=False), args),
            "pruned ucb": Pruned(gp.Pruner(nf, keep=0.5, policy="ucb", seed=0),
                                 FileSource(paths, y[:nf], reader_labels=False), args),
            "pruned parallel": Pruned(gp.Pruner(nf, keep=0.5, policy="static", seed=0),
                                      FileSource(paths, y[:nf], reader_labels=False,
                                                 parallel=True), args, py_num_workers=2),
            "rebuilt": RebuiltReader(gp.Pruner(nf, keep=0.5, policy="static", seed=0), paths,
                                     y[:nf], args),
            "plain ES paths": PlainPaths(sel_files, sel_labels, args),
        }
        for name, cfg in configs.items():          # the checks also serve as warm-up
            if name.startswith("reader"):
                continue
            want = y[cfg.pruner.plan(cfg.epoch).indices.numpy()] if hasattr(cfg, "pruner") \
                else sel_labels
            check(cfg, want, name)
        for name in ("reader", "reader no mmap"):
            reader_labels = configs[name].labels_of_epoch()
            if sorted(reader_labels.tolist()) != sorted(sel_labels.tolist()):
                sys.exit(f"{name}: wrong samples")
        res_f = in_blocks(configs, args.rounds, per_block)
        print(f"\n2. files ({len(fsel)} PNG per epoch, {-(-len(fsel) // args.batch_size)} "
              f"batches): samples/s, {args.rounds} blocks of {per_block} epochs each; ratios "
              "as in 1., paired by round (target: pruned >= 0.95 x reader, >= 0.97 x plain ES)")
        print(header)
        for base in ("reader", "reader no mmap", "plain ES paths"):
            for name in ("pruned", "pruned ucb", "pruned parallel", "rebuilt"):
                if name in ("rebuilt", "pruned parallel") and base != "reader":
                    continue
                label = {"pruned": "pruned static"}.get(name, name)
                print(ratio_row(f"{label} / {base}", len(fsel), res_f[base], res_f[name],
                                per_block))
        print(ratio_row("plain ES paths / reader", len(fsel), res_f["reader"],
                        res_f["plain ES paths"], per_block))
        print(ratio_row("reader no mmap / reader", len(fsel), res_f["reader"],
                        res_f["reader no mmap"], per_block))


def epoch_time(x, y, args, per_block) -> None:
    """3. epoch time vs keep, one iterator per keep, in blocks; selection timed."""
    n = len(x)
    configs, counts = {}, {}
    for keep in (1.0, *KEEPS):
        p = gp.Pruner(n, keep=keep, policy="full" if keep == 1.0 else "uniform", seed=0)
        configs[keep] = Pruned(p, ArraySource(x, y, layouts=("HWC", None)), args, plan_timed=True)
        counts[keep] = len(p.plan(0))
        check(configs[keep], y[p.plan(0).indices.numpy()], f"keep {keep}")
        configs[keep].plan_times.clear()
    res = in_blocks(configs, args.rounds, per_block)
    full = res[1.0]

    def med(s, i=0):
        return statistics.median(v[i] for v in s)
    print("\n3. epoch time vs keep (arrays, uniform plans), selection included; ratio "
          "= time(keep) / (keep x time(full)): paired (median over epochs), of the median wall "
          "times, of the best wall times and of the CPU times (target <= 1.02)")
    print(f"{'keep':>5} {'samples':>8} {'epoch s':>9} {'plan ms':>8} {'keep*full':>10} "
          f"{'paired':>7} {'median':>7} {'best':>7} {'CPU':>7}")
    for keep in (1.0, *KEEPS):
        r = res[keep]
        plan_ms = 1e3 * statistics.median(configs[keep].plan_times)
        pair = statistics.median(t / (keep * f) for (t, _, _), (f, _, _) in zip(r, full))
        print(f"{keep:>5} {counts[keep]:>8} {med(r):>9.3f} {plan_ms:>8.2f} "
              f"{keep * med(full):>10.3f} {pair:>7.3f} {med(r) / (keep * med(full)):>7.3f} "
              f"{min(v[0] for v in r) / (keep * min(v[0] for v in full)):>7.3f} "
              f"{med(r, 2) / (keep * med(full, 2)):>7.3f}")
    print("   (plan ms: pruner.plan() at the epoch's start)")


def turnover_table(x, y, args, tight, steady) -> None:
    """4. turnover: the table."""
    n = len(x)
    turn = turnover(x, y, args)
    print(f"\n4. turnover at N={n}, keep=0.5: wait for the first batch after set_epoch (the plan "
          f"made before) / reset(), and for a steady batch; medians in ms (target: first batch "
          f"<= 2 ms)")
    print(f"{'':<36} {'first':>8} {'steady':>8}")
    for name, (first, steady_wait) in turn.items():
        print(f"{name:<36} {1e3 * first:>8.2f} {1e3 * steady_wait:>8.2f}")
    if tight:
        print(f"{'tight loop (section 1), uniform':<36} {1e3 * tight['pruned']:>8.2f} "
              f"{1e3 * steady:>8.2f}")
        print(f"{'tight loop (section 1), ucb':<36} {1e3 * tight['pruned ucb']:>8.2f}")
        print(f"{'tight loop (section 1), plain reset()':<36} {1e3 * tight['plain']:>8.2f}")


def turnover(x, y, args) -> dict[str, tuple[float, float]]:
    """First-batch and steady-batch waits in a loop whose training step takes ``--step-ms``
    (``time.sleep``: the host waits for the device). Each configuration runs one untimed epoch,
    then ``--turnover-epochs`` epochs; the plan of each epoch is made before it (untimed)."""
    n, step = len(x), args.step_ms / 1e3
    out = {}

    def waits(it, t0, observe=None):
        first, steady = None, []
        t = t0
        for (b,) in it:
            now = time.perf_counter()
            if first is None:
                first = now - t
            else:
                steady.append(now - t)
            if observe is not None:
                observe(b)
            time.sleep(step)
            t = time.perf_counter()
        return first, steady

    twin = gp.Pruner(n, keep=0.5, policy="uniform", seed=1)
    plain = PlainArrays(x, y, lambda e: twin.plan(e).indices.numpy().astype(np.int64), args)
    cases = {}
    for policy in ("uniform", "ucb"):
        p = gp.Pruner(n, keep=0.5, policy=policy, seed=1)
        it = build_iterator(p, ArraySource(x, y, layouts=("HWC", None)), augment,
                            batch_size=args.batch_size, num_threads=args.threads,
                            device_id=args.device_id, seed=0)
        label = "uniform" if policy == "uniform" else "ucb"
        cases[f"step {args.step_ms:g} ms, {label}"] = (p, it)
    for name, (p, it) in cases.items():
        time.sleep(0.5)
        firsts, steadies = [], []
        for epoch in range(args.turnover_epochs + 1):
            p.plan(epoch)
            t0 = time.perf_counter()
            it.set_epoch(epoch)
            first, steady = waits(it, t0, lambda b, p=p: p.observe(
                b["index"], (b["index"] % 7).float()))
            if epoch:
                firsts.append(first)
                steadies += steady
        out[name] = (statistics.median(firsts), statistics.median(steadies))
    time.sleep(0.5)
    firsts, steadies = [], []
    for epoch in range(args.turnover_epochs + 1):
        plain.prepare()
        t0 = time.perf_counter()
        if plain.epoch:
            plain.it.reset()
        plain.epoch += 1
        first, steady = waits(plain.it, t0)
        if epoch:
            firsts.append(first)
            steadies += steady
    out[f"step {args.step_ms:g} ms, plain DALI reset()"] = (statistics.median(firsts),
                                                           statistics.median(steadies))
    return out


def boundary_cost(x, y, args) -> None:
    """5. a training loop over pruned epochs: what the epoch boundary costs."""
    n, per_block = len(x), max(1, args.reps // args.rounds)
    p = gp.Pruner(n, keep=0.5, policy="uniform", seed=0)
    cfg = Trained(p, ArraySource(x, y, layouts=("HWC", None)), args, args.train_step_ms / 1e3)
    check(cfg, y[p.plan(0).indices.numpy()], "section 5")
    res = in_blocks({"trained": cfg}, args.rounds, per_block)["trained"]
    epoch = statistics.median(t for t, _, _ in res)
    first = statistics.median(cfg.first[-len(res):])
    steady = statistics.median(cfg.steady)
    print(f"\n5. the epoch boundary: arrays, N={n}, keep=0.5 (uniform plans), "
          f"{-(-p.k // args.batch_size)} batches per epoch, training step {args.train_step_ms:g} ms "
          f"(sleep) + observe; {len(res)} epochs timed from set_epoch to the loop's end")
    print(f"epoch {epoch:.4f} s, first batch {1e3 * first:.2f} ms (plan + pipeline refill), steady "
          f"batch {1e3 * steady:.3f} ms: the boundary is {100 * (first - steady) / epoch:.2f} % of "
          f"a pruned epoch (what reading ahead across it could save; 1 % was the bar)")

if __name__ == "__main__":
    main()
