"""Cost of an epoch's selection and of the per-step statistics update, next to plain top-k and sort.

    python benchmarks/selection.py                     # CPU, torch backend: N = 1e5, 1e6, 1e7
    python benchmarks/selection.py --device cuda       # one GPU: kernels, N = 1e5 .. 1e8
    python benchmarks/selection.py --sizes 1e5 1e6     # fewer sizes
    python benchmarks/selection.py --threads 1         # one torch thread (steadier on a shared CPU)

Everything is measured side by side in one run, on the same data, and reported as ratios, with the
machine and the versions printed first. Each contender is checked for correctness before it is
timed (the same k-set as the reference for exact top-k; a sorted order for sorts).

At k = N/2 over random scores, each size compares:

* ``backend.top_k``: the exact-k selection of :mod:`gpuprune.backend` (unique 64-bit keys with the
  keyed tie-break): the CUDA kernels with ``--device cuda``, the torch backend on the CPU;
* ``plan()``: a whole ``Pruner.plan`` of UCB (score, select, shuffle, bookkeeping) on that backend;
* ``torch.topk(score, k, sorted=False)``, ``torch.sort`` and, on a GPU, ``cupy.argpartition``
  (which sorts everything for large k), on the raw float scores (no tie-break: a lower bound);

then ``observe()`` per batch size (``Backend.observe_``), distinct ids and ids with duplicates.
Kernel launches per call are printed for the kernels (``KernelOps.launches``); torch's own
launches (a ``torch.sort`` of large batches, allocations) are not counted there.

GPU times are CUDA-event medians of ``--repeats`` runs after a warm-up, with the launches queued
behind a GPU sleep (the GPU's own time, no host overhead) where nothing syncs; ``plan wall`` is the
host's wall-clock time of ``plan()``. CPU times are the best of ``--repeats`` wall-clock runs.
Targets (issue 12, H100/H200): plan() <= 50 us at 1e6 and <= 1.5 ms at 1e8, >= 2x faster than
torch.topk(sorted=False); observe() one launch and <= 5 us for batches up to 4096.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpuprune as gp                                     # noqa: E402
from gpuprune.backend import KernelBackend, get_backend   # noqa: E402
from gpuprune.bench.report import cpu_name                # noqa: E402
from gpuprune.keys import composite_key                   # noqa: E402
from gpuprune.stats import LossStats                      # noqa: E402

BATCHES = (256, 1024, 4096, 16384, 65536)


# ---------------------------------------------------------------- environment
def describe(device: torch.device, backend) -> str:
    load = " | load average %.1f %.1f %.1f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    lines = [f"machine: {platform.node()} | {cpu_name()} | {os.cpu_count()} logical CPUs | "
             f"torch threads {torch.get_num_threads()}{load}",
             f"python {platform.python_version()} | torch {torch.__version__} | CUDA (torch) "
             f"{torch.version.cuda} | numpy {np.__version__} | gpuprune {gp.__version__}"]
    try:
        import cupy
        lines.append(f"cupy {cupy.__version__}")
    except Exception as e:  # noqa: BLE001 - report, do not fail
        lines.append(f"cupy: not importable ({type(e).__name__})")
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        lines.append(f"GPU: {p.name} | {p.multi_processor_count} SMs | {p.total_memory / 2**30:.0f} GiB"
                     f" | capability {p.major}.{p.minor}")
        try:
            import cupy
            lines.append(f"driver {cupy.cuda.runtime.driverGetVersion()} | CUDA runtime (cupy) "
                         f"{cupy.cuda.runtime.runtimeGetVersion()}")
        except Exception:  # noqa: BLE001
            pass
    lines.append(f"backend: {backend!r}" + (f" | kernels: {backend.ops.runtime!r}"
                                            if isinstance(backend, KernelBackend) else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------- timing
def best_of(fn, repeats: int) -> float:
    fn()                                                   # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gpu_time(fn, repeats: int, warmup: int = 3, queue_ahead: bool = True) -> float:
    """Median seconds of fn() between CUDA events on the current stream. With ``queue_ahead`` the
    GPU first sleeps, so the host has queued all of fn's launches before the first runs: the time
    is the GPU's alone (fn must not sync)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if queue_ahead:
            torch.cuda._sleep(50_000_000)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return statistics.median(out)


def wall_time(fn, repeats: int, device: torch.device) -> float:
    """Median host wall-clock seconds of fn() (synchronised before and after on a GPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


# ---------------------------------------------------------------- correctness first
def reference_set(score: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    key = composite_key(score, seed, score.numel(), score.device)
    return torch.sort(torch.topk(key, k, sorted=False).indices).values


def check_top_k(backend, score: torch.Tensor, k: int) -> None:
    got = torch.sort(backend.top_k(score, score.numel(), k, 7).long()).values
    assert torch.equal(got, reference_set(score, k, 7)), "backend.top_k: not the reference set"


def check_values_top_k(score: torch.Tensor, ids: torch.Tensor, k: int) -> None:
    """Any top-k of the raw scores: k distinct ids, every chosen score >= every other one."""
    ids = ids.long()
    assert ids.numel() == k and ids.unique().numel() == k
    chosen = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    chosen[ids] = True
    assert float(score[chosen].min()) >= float(score[~chosen].max()), "not a top k"


def make_pruner(n: int, backend, g: torch.Generator) -> gp.Pruner:
    device = backend.device
    pruner = gp.Pruner(n, keep=0.5, policy=gp.UCB(c=1.0), seed=0, num_epochs=10**6, device=device,
                       backend="torch")
    pruner.backend = backend
    s = pruner.stats                                   # as after an epoch: all seen, distinct losses
    s.mean.copy_(torch.rand(n, generator=g, device=device) * 3)
    s.var.copy_(torch.rand(n, generator=g, device=device))
    s.last_epoch.fill_(0)
    return pruner


def check_plan(pruner: gp.Pruner, plan) -> None:
    ids, n = plan.indices.long(), pruner.num_samples
    assert ids.numel() == pruner.k and ids.unique().numel() == ids.numel()
    s = pruner.stats
    score = s.mean + s.var.clamp(min=0).sqrt()
    check_values_top_k(score, ids, pruner.k)
    assert int(ids.min()) >= 0 and int(ids.max()) < n


# ---------------------------------------------------------------- runs
def run(device: torch.device, sizes: list[int], repeats: int) -> None:
    backend = get_backend("cuda" if device.type == "cuda" else "torch", device, max(sizes))
    kernels = isinstance(backend, KernelBackend)
    print(describe(device, backend))
    try:
        import cupy
    except Exception:  # noqa: BLE001
        cupy = None
    use_cupy = device.type == "cuda" and cupy is not None
    unit, scale = ("us", 1e6) if device.type == "cuda" else ("ms", 1e3)
    timer = ((lambda fn: gpu_time(fn, repeats)) if device.type == "cuda"
             else (lambda fn: best_of(fn, repeats)))
    what = ("GPU time, CUDA-event median, launches queued ahead" if device.type == "cuda"
            else f"best of {repeats}, wall clock")
    print(f"\nselection at k = N/2 ({unit}; {what}); ratios = contender / backend.top_k\n")
    head = (f"{'N':>8} {'top_k':>9} {'launch':>6} {'plan()':>9} {'plan wall':>10} {'topk':>9} "
            f"{'sort':>9} {'argpart':>9} {'topk/':>6} {'sort/':>6} {'argp/':>6}")
    print(head)
    print("-" * len(head))
    for n in sizes:
        g = torch.Generator(device=device).manual_seed(n)
        score = torch.rand(n, generator=g, device=device)
        k = n // 2
        check_top_k(backend, score, k)
        check_values_top_k(score, torch.topk(score, k, sorted=False).indices, k)
        srt = torch.sort(score)
        assert bool((srt.values[1:] >= srt.values[:-1]).all())
        launches = ""
        if kernels:
            before = backend.ops.launches
            backend.top_k(score, n, k, 7)
            launches = str(backend.ops.launches - before)
        t_sel = timer(lambda: backend.top_k(score, n, k, 7))
        t_topk = timer(lambda: torch.topk(score, k, sorted=False))
        t_sort = timer(lambda: torch.sort(score))
        t_argp = float("nan")
        if use_cupy:
            cs = cupy.from_dlpack(score)
            ids = torch.from_dlpack(cupy.argpartition(cs, n - k)[n - k:])
            check_values_top_k(score, ids, k)
            with cupy.cuda.Stream.from_external(torch.cuda.current_stream(device)) \
                    if hasattr(cupy.cuda.Stream, "from_external") else cupy.cuda.Stream.null:
                t_argp = timer(lambda: cupy.argpartition(cs, n - k))
        elif device.type == "cpu":
            a = score.numpy()
            ids = torch.from_numpy(np.argpartition(a, n - k)[n - k:])
            check_values_top_k(score, ids, k)
            t_argp = timer(lambda: np.argpartition(a, n - k))
        pruner = make_pruner(n, backend, torch.Generator(device=device).manual_seed(1))
        epoch = [0]

        def plan():
            epoch[0] += 1
            return pruner.plan(epoch[0])

        check_plan(pruner, plan())
        t_plan = timer(plan) if device.type == "cpu" else gpu_time(plan, repeats, queue_ahead=False)
        t_plan_wall = wall_time(plan, repeats, device)
        print(f"{n:>8.0e} {t_sel * scale:>9.1f} {launches:>6} {t_plan * scale:>9.1f} "
              f"{t_plan_wall * scale:>10.1f} {t_topk * scale:>9.1f} {t_sort * scale:>9.1f} "
              f"{t_argp * scale:>9.1f} {t_topk / t_sel:>6.2f} {t_sort / t_sel:>6.2f} "
              f"{t_argp / t_sel:>6.2f}")
    print("argpart: cupy.argpartition on a GPU, numpy.argpartition on the CPU (raw scores, no "
          "tie-break)\nplan(): UCB, score + select + shuffle; plan wall: host time of the call, "
          "its one host sync included")

    n = max(sizes)
    print(f"\nobserve() per batch at N = {n:.0e} ({unit}; {what})\n")
    head = f"{'batch':>7} {'ids':<10} {'time':>9} {'launch':>6} {'per 1k ids':>11}"
    print(head)
    print("-" * len(head))
    g = torch.Generator(device=device).manual_seed(3)
    stats = LossStats(n, device)
    for b in BATCHES:
        for kind in ("distinct", "duplicate"):
            ids = (torch.randperm(n, generator=g, device=device)[:b] if kind == "distinct"
                   else torch.randint(0, max(b // 4, 1), (b,), generator=g, device=device))
            ids = ids.int()
            x = torch.rand(b, generator=g, device=device)
            ref = LossStats(n, device)
            gp.backend.TorchBackend(device).observe_(ref.tensors(), ids, x, 0.9, 0)
            check = LossStats(n, device)
            backend.observe_(check.tensors(), ids, x, 0.9, 0)
            assert torch.equal(ref.mean, check.mean) and torch.equal(ref.var, check.var) or \
                (device.type == "cuda" and kind == "duplicate"), "observe: not the reference"
            launches = ""
            if kernels:
                before = backend.ops.launches
                backend.observe_(stats.tensors(), ids, x, 0.9, 1)
                launches = str(backend.ops.launches - before)
            t = timer(lambda: backend.observe_(stats.tensors(), ids, x, 0.9, 1))
            print(f"{b:>7} {kind:<10} {t * scale:>9.2f} {launches:>6} {t * scale * 1000 / b:>11.3f}")
    if device.type == "cuda":
        print("(with duplicates, torch's CUDA path sums 3+ copies with atomics: compared loosely)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", nargs="+", type=float, default=None,
                    help="N values (default: 1e5 1e6 1e7 on CPU, 1e5 1e6 1e7 1e8 on a GPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 3 CPU, 20 GPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 is steadier on a busy machine)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device")
        device = torch.device("cuda", torch.cuda.current_device())
        run(device, [int(s) for s in (args.sizes or (1e5, 1e6, 1e7, 1e8))], args.repeats or 20)
    else:
        run(torch.device("cpu"), [int(s) for s in (args.sizes or (1e5, 1e6, 1e7))], args.repeats or 3)


if __name__ == "__main__":
    main()
