"""Cost of feeding DALI through gpuprune: pruned iterator vs plain DALI, pruned vs full epochs.

    python benchmarks/pipeline.py                      # CPU pipelines (device_id=None), ~1 min
    python benchmarks/pipeline.py --device-id 0        # GPU pipelines (augmentation on the GPU)
    python benchmarks/pipeline.py --files 0 --reps 3   # arrays only, fewer repeats

Data: Fashion-MNIST training images made CIFAR-shaped (32x32x3 uint8, as in docs/dali.md), plus
``--files`` of them written as PNG files. Graph: random flip + normalise to float CHW
(``crop_mirror_normalize``), the same in every pipeline.

1. **Throughput** (samples/s) over the same planned samples (a uniform keep=0.5 plan):
   * arrays: ``ArraySource`` + ``PrunedDALIIterator`` vs a plain batch-mode ``external_source``
     callable + ``DALIGenericIterator`` (the minimal hand-written version, dali.md §1);
   * files: ``FileSource`` + ``PrunedDALIIterator`` vs (``files/reader``) ``fn.readers.file(files=
     <the planned files>)`` + ``DALIGenericIterator(reader_name=...)``, and vs (``files/ES``) a
     plain external source of the same paths -> ``fn.io.file.read``, the way dali.md recommends
     for per-epoch subsets (a reader cannot change its files per epoch). PNG decoded on the CPU
     (or "mixed"). The plan is a fixed random half (policy "static"), so the reader is fair.
   Target: pruned / plain >= 0.95.
2. **Epoch time vs keep**: wall time of an epoch of the pruned iterator at keep = 0.3, 0.5, 0.7
   (uniform policy) against a full-data epoch of the same iterator (policy "full"). Each epoch is
   timed from ``set_epoch`` to the end of the loop, so it includes planning, publishing and the
   epoch turnover. Target: time(keep) <= 1.05 * keep * time(full).

Configurations are interleaved (A B, B A, A B, ...) over ``--reps`` epochs after one warm-up
epoch each, so that load from other processes hits them alike. Ratios are given three ways: of the
median wall time, of the best (least disturbed) epoch, and of the process's CPU time per epoch
(user + system, all threads), which load from other processes barely moves; the machine, its load
average and the versions are printed first. Each configuration is checked before it is timed: every
planned sample arrives exactly once with its own label.
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
            f"{torch.get_num_threads()}, device_id {args.device_id}, {args.reps} timed epochs per "
            f"configuration (median)")


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


# ---------------------------------------------------------------- plain DALI baselines
class PlainBatches:
    """The minimal hand-written batch-mode source over a fixed index list (no gpuprune)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, bs: int) -> None:
        self.x, self.y, self.bs, self.sel = x, y, bs, np.empty(0, np.int64)

    def __call__(self, info):
        lo = info.iteration * self.bs
        if lo >= len(self.sel):
            raise StopIteration
        idx = self.sel[lo:lo + self.bs]
        return self.x[idx], self.y[idx]


class PlainArrays:
    """external_source(PlainBatches) + DALIGenericIterator, one epoch per call.

    ``plans(epoch)`` gives each epoch's index list (set untimed, before the epoch's reset()).
    """

    def __init__(self, x, y, plans, args) -> None:
        self.src = PlainBatches(x, y, args.batch_size)
        self.plans, self.next_epoch = plans, 0
        pipe = Pipeline(batch_size=args.batch_size, num_threads=args.threads,
                        device_id=args.device_id, seed=0)
        with pipe:
            images, labels = fn.external_source(self.src, num_outputs=2, batch=True,
                                                batch_info=True, dtype=[types.UINT8, types.INT64],
                                                ndim=[3, 0], layout=["HWC", None])
            pipe.set_outputs(*augment(images, labels))
        self.it = DALIGenericIterator(pipe, ["data", "label"], size=-1, prepare_first_batch=False)
        self.started = False

    def prepare(self) -> None:
        self.src.sel = self.plans(self.next_epoch)
        self.next_epoch += 1

    def epoch(self) -> int:
        if self.started:
            self.it.reset()
        self.started = True
        return sum(len(b["label"]) for (b,) in self.it)


class PlainPaths:
    """external_source of paths (no gpuprune) -> fn.io.file.read -> decoder, fixed file list."""

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
        self.src = self.Source(files, labels, args.batch_size)
        pipe = Pipeline(batch_size=args.batch_size, num_threads=args.threads,
                        device_id=args.device_id, seed=0)
        with pipe:
            paths, lab = fn.external_source(self.src, num_outputs=2, batch=True, batch_info=True,
                                            dtype=[types.UINT8, types.INT64], ndim=[1, 0])
            dev = "mixed" if args.device_id is not None else "cpu"
            images = fn.decoders.image(fn.io.file.read(paths), device=dev, output_type=types.RGB)
            pipe.set_outputs(*augment(images, lab))
        self.it = DALIGenericIterator(pipe, ["data", "label"], size=-1, prepare_first_batch=False)
        self.started = False

    def prepare(self) -> None:
        pass

    def epoch(self) -> int:
        if self.started:
            self.it.reset()
        self.started = True
        return sum(len(b["label"]) for (b,) in self.it)


class PlainReader:
    """fn.readers.file over a fixed list of files + DALIGenericIterator(reader_name=...)."""

    def __init__(self, files, labels, args) -> None:
        pipe = Pipeline(batch_size=args.batch_size, num_threads=args.threads,
                        device_id=args.device_id, seed=0)
        with pipe:
            raw, lab = fn.readers.file(files=list(files), labels=[int(v) for v in labels],
                                       random_shuffle=False, name="Reader")
            dev = "mixed" if args.device_id is not None else "cpu"
            images = fn.decoders.image(raw, device=dev, output_type=types.RGB)
            pipe.set_outputs(*augment(images, fn.cast(lab, dtype=types.INT64)))
        self.it = DALIGenericIterator(pipe, ["data", "label"], reader_name="Reader",
                                      last_batch_policy=LastBatchPolicy.PARTIAL,
                                      prepare_first_batch=False)
        self.started = False

    def prepare(self) -> None:
        pass

    def epoch(self) -> int:
        if self.started:
            self.it.reset()
        self.started = True
        return sum(len(b["label"]) for (b,) in self.it)


class Pruned:
    """A PrunedDALIIterator, one epoch per call.

    ``prepare()`` selects the next epoch's plan (``pruner.plan``) outside the timed part when
    ``plan_untimed``; ``epoch()`` runs ``set_epoch`` (publish, reset, prefetch) and the loop.
    """

    def __init__(self, pruner, source, args, plan_untimed: bool = True) -> None:
        self.pruner, self.plan_untimed = pruner, plan_untimed
        self.it = build_iterator(pruner, source, augment, batch_size=args.batch_size,
                                 num_threads=args.threads, device_id=args.device_id, seed=0)
        self.next_epoch = 0
        self.plan_times: list[float] = []
        self.first_batch: list[float] = []     # set_epoch -> first batch (the turnover)

    def prepare(self) -> None:
        if self.plan_untimed:
            self.pruner.plan(self.next_epoch)

    def epoch(self) -> int:
        t = time.perf_counter()
        self.pruner.plan(self.next_epoch)            # free if prepare() did it
        t1 = time.perf_counter()
        self.plan_times.append(t1 - t)
        self.it.set_epoch(self.next_epoch)
        self.next_epoch += 1
        count = 0
        for (b,) in self.it:
            if not count:
                self.first_batch.append(time.perf_counter() - t1)
            count += len(b["index"])
        return count


# ---------------------------------------------------------------- correctness, timing
def check_pruned(p: Pruned, y: np.ndarray) -> None:
    """One epoch: every planned sample once, in plan order, with its own label."""
    p.it.set_epoch(p.next_epoch)
    got, labels = [], []
    for (b,) in p.it:
        got.append(b["index"].cpu().numpy())
        labels.append(b["label"].cpu().numpy())
    got = np.concatenate(got)
    want = p.pruner.plan(p.next_epoch).indices.cpu().numpy()
    assert np.array_equal(got, want), "pruned iterator: wrong samples"
    assert np.array_equal(np.concatenate(labels), y[got]), "pruned iterator: wrong labels"
    p.next_epoch += 1


def check_plain(plain, sel: np.ndarray, y: np.ndarray) -> None:
    plain.prepare()
    if plain.started:
        plain.it.reset()
    plain.started = True
    labels = np.concatenate([b["label"].cpu().numpy().reshape(-1) for (b,) in plain.it])
    assert np.array_equal(labels, y[sel]), "plain pipeline: wrong labels"


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(run) -> tuple[float, int, float]:
    """(wall s, samples, CPU s) of one epoch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    c, t = cpu_seconds(), time.perf_counter()
    n = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, n, cpu_seconds() - c


def interleaved(configs: dict, reps: int) -> dict[str, list[tuple[float, int]]]:
    """One warm-up epoch of each configuration, then ``reps`` rounds A B C, C B A, A B C, ...

    ``configs`` maps a name to an object with ``prepare()`` (untimed) and ``epoch()`` (timed).
    Alternating the order keeps a slot's position in the round from favouring one configuration.
    """
    for c in configs.values():
        c.prepare()
        c.epoch()
    out = {name: [] for name in configs}
    names = list(configs)
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            configs[name].prepare()
            out[name].append(timed(configs[name].epoch))
    return out


def median_time(samples) -> float:
    return statistics.median(t for t, _, _ in samples)


def best_time(samples) -> float:
    return min(t for t, _, _ in samples)


def cpu_time(samples) -> float:
    return statistics.median(c for _, _, c in samples)


def median_rate(samples) -> float:
    return statistics.median(n / t for t, n, _ in samples)


def best_rate(samples) -> float:
    return max(n / t for t, n, _ in samples)


def cpu_rate(samples) -> float:
    return statistics.median(n / c for _, n, c in samples)


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=60000, help="in-memory samples (max 60000)")
    ap.add_argument("--files", type=int, default=8000, help="PNG files for the file section (0: skip)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="DALI CPU threads")
    ap.add_argument("--device-id", type=int, default=None, help="GPU for the pipelines (default: CPU)")
    ap.add_argument("--reps", type=int, default=20, help="timed epochs per configuration")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch CPU threads (selection runs in torch; DALI has its own threads)")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    print(describe(args), flush=True)
    x, y = load_images(args.samples)
    n = len(x)
    rows = []

    # 1a. throughput, arrays: the same uniform keep=0.5 plans through both; selection untimed
    pruner = gp.Pruner(n, keep=0.5, policy="uniform", seed=0)
    twin = gp.Pruner(n, keep=0.5, policy="uniform", seed=0)     # same seed: the same plans
    pruned = Pruned(pruner, ArraySource(x, y, layouts=("HWC", None)), args)
    plain = PlainArrays(x, y, lambda e: twin.plan(e).indices.numpy(), args)
    check_pruned(pruned, y)
    check_plain(plain, twin.plan(0).indices.numpy(), y)
    count = len(twin.plan(0))
    res = interleaved({"pruned": pruned, "plain": plain}, args.reps)
    rows.append(("arrays", count, res["plain"], res["pruned"]))

    # 1b. throughput, files: FileSource vs fn.readers.file over the same planned files
    if args.files:
        nf = min(args.files, n)
        with tempfile.TemporaryDirectory(prefix="gpuprune-bench-") as tmp:
            t = time.perf_counter()
            paths = write_pngs(x[:nf], Path(tmp))
            print(f"wrote {nf} PNG files in {time.perf_counter() - t:.1f}s", flush=True)
            # a reader cannot change its files per epoch (dali.md §2.14): a fixed random half
            fpruner = gp.Pruner(nf, keep=0.5, policy="static", seed=0)
            fpruned = Pruned(fpruner, FileSource(paths, y[:nf], output_type=types.RGB), args)
            check_pruned(fpruned, y[:nf])
            fsel = fpruner.plan(0).indices.numpy()
            reader = PlainReader([paths[i] for i in fsel], y[fsel], args)
            check_plain(reader, fsel, y)
            es_paths = PlainPaths([paths[i] for i in fsel], y[fsel], args)
            check_plain(es_paths, fsel, y)
            res_f = interleaved({"pruned": fpruned, "reader": reader, "es": es_paths}, args.reps)
            rows.append(("files/reader", len(fsel), res_f["reader"], res_f["pruned"]))
            rows.append(("files/ES", len(fsel), res_f["es"], res_f["pruned"]))

    print("\nThroughput over the same planned samples, selection not timed; samples/s of the "
          "median epoch, ratio pruned/plain of the median, best and CPU-time rates (target >= 0.95)")
    print(f"{'vs':<12} {'samples/epoch':>13} {'plain DALI':>11} {'pruned':>11} {'ratio':>7} "
          f"{'best':>7} {'CPU':>7}")
    for name, count, plain, prn in rows:
        m0, m1 = median_rate(plain), median_rate(prn)
        print(f"{name:<12} {count:>13} {m0:>11,.0f} {m1:>11,.0f} {m1 / m0:>7.3f} "
              f"{best_rate(prn) / best_rate(plain):>7.3f} {cpu_rate(prn) / cpu_rate(plain):>7.3f}")

    # 2. epoch time vs keep, one iterator per keep, interleaved; selection timed
    configs, counts = {}, {}
    for keep in (1.0, *KEEPS):
        policy = "full" if keep == 1.0 else "uniform"
        p = gp.Pruner(n, keep=keep, policy=policy, seed=0)
        it = Pruned(p, ArraySource(x, y, layouts=("HWC", None)), args, plan_untimed=False)
        check_pruned(it, y)
        configs[keep], counts[keep] = it, len(p.plan(0))
    res = interleaved(configs, args.reps)
    full = res[1.0]
    print("\nEpoch time vs keep, selection included; ratio = time(keep) / (keep * time(full)) of "
          "the median wall time, the best wall time and the CPU time (target <= 1.05)")
    print(f"{'keep':>5} {'samples':>8} {'epoch s':>9} {'plan s':>8} {'keep*full':>10} {'ratio':>7} "
          f"{'best':>7} {'CPU':>7}")
    for keep in (1.0, *KEEPS):
        r = res[keep]
        plan_s = statistics.median(configs[keep].plan_times[-args.reps:])
        print(f"{keep:>5} {counts[keep]:>8} {median_time(r):>9.3f} {plan_s:>8.4f} "
              f"{keep * median_time(full):>10.3f} {median_time(r) / (keep * median_time(full)):>7.3f} "
              f"{best_time(r) / (keep * best_time(full)):>7.3f} "
              f"{cpu_time(r) / (keep * cpu_time(full)):>7.3f}")
    half = configs[0.5]
    print(f"\nturnover at keep=0.5: first batch {1e3 * statistics.median(half.first_batch):.1f} ms "
          f"after set_epoch (plan {1e3 * statistics.median(half.plan_times):.1f} ms included); "
          f"epoch time / batches {1e3 * median_time(res[0.5]) / -(-counts[0.5] // args.batch_size):.2f}"
          f" ms")
    print("\nload average at the end: %.1f %.1f %.1f" % os.getloadavg())


if __name__ == "__main__":
    main()
