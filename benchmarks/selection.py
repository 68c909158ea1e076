"""Cost of an epoch's selection (``Pruner.plan``) and of the per-step update, next to plain top-k.

    python benchmarks/selection.py                     # CPU: N = 1e5, 1e6, 1e7 (about 2 min)
    python benchmarks/selection.py --device cuda       # one GPU: N = 1e5 .. 1e8, and observe()
    python benchmarks/selection.py --sizes 1e5 1e6     # fewer sizes
    python benchmarks/selection.py --threads 1         # one torch thread (steadier on a shared CPU)

Everything is measured side by side in one run, on the same data, and reported as ratios, with the
machine and the versions printed first. Each configuration is checked for correctness before it is
timed.

CPU: ``Pruner.plan()`` of each policy (a fresh epoch each call: score, exact-k select with the
keyed tie-break, shuffle, loss-weight table) next to ``numpy.argpartition`` and
``torch.topk(sorted=False)`` choosing k = N/2 of the same scores. The bank holds random statistics,
as after an epoch of training. Times are the best of ``--repeats`` calls.

GPU (``--device cuda``): at k = N/2, the kernels' selection (``KernelOps.top_k_scores``: score word,
radix select, ordered compaction) and a whole ``Pruner.plan()`` with the kernel backend, next to
``torch.topk(sorted=False)``, ``torch.sort`` and ``cupy.argpartition``; then the cost per step of
``observe()`` for batches of 256 to 65536 with the kernels and with the torch backend. GPU times are
CUDA-event medians over ``--repeats`` runs after a warm-up, taken with the launches queued behind a
GPU sleep (the GPU's own time) where the code does not sync; ``plan() wall`` is the host's
wall-clock time of the call (it includes its one host sync). Targets on an H100: plan() within
50 us at 1e6 and 1.5 ms at 1e8; observe() one launch, <= 5 us.
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
from gpuprune.bench.report import cpu_name              # noqa: E402
import gpuprune as gp                                     # noqa: E402
from gpuprune.select import top_k_by_score                # noqa: E402

POLICIES = ("uniform", "epsilon_greedy", "ucb", "infobatch", "static")
BATCHES = (256, 1024, 4096, 16384, 65536)


# ---------------------------------------------------------------- environment
def describe(device: torch.device) -> str:
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
        ops = gp.kernels.get_ops(device)
        lines.append(f"kernels: {ops.runtime!r}")
    return "\n".join(lines)


def fill_bank(bank: gp.ScoreBank, g: torch.Generator) -> None:
    """Random statistics, as after an epoch: every sample seen, distinct losses."""
    n, dev = bank.num_samples, bank.device
    bank.mean.copy_(torch.rand(n, generator=g, device=dev) * 3)
    bank.var.copy_(torch.rand(n, generator=g, device=dev))
    bank.count.fill_(1)
    bank.last_epoch.fill_(0)


def make_pruner(n: int, policy: str, device: torch.device, backend: str, g: torch.Generator
                ) -> gp.Pruner:
    kw = dict(keep=0.5, policy=policy, seed=0, num_epochs=10**6, device=device, backend=backend)
    if policy == "static":
        kw["static_scores"] = torch.rand(n, generator=g, device=device)
    pruner = gp.Pruner(n, **kw)
    fill_bank(pruner.bank, g)
    return pruner


def check_plan(pruner: gp.Pruner, plan: gp.Plan) -> None:
    """Correctness before timing: unique ids in range; exact k where the policy promises it; for
    UCB, every planned score is >= every unplanned one (the top-k property)."""
    n, ids = pruner.num_samples, plan.indices
    assert ids.unique().numel() == ids.numel(), "duplicate ids in the plan"
    assert int(ids.min()) >= 0 and int(ids.max()) < n, "ids out of range"
    if pruner.policy.exact_k:
        assert ids.numel() == pruner.k, f"{ids.numel()} ids planned, k = {pruner.k}"
    if pruner.policy.name == "ucb":
        b = pruner.bank
        score = b.mean + pruner.policy.c * b.var.clamp(min=0).sqrt()
        chosen = torch.zeros(n, dtype=torch.bool, device=ids.device)
        chosen[ids] = True
        assert float(score[chosen].min()) >= float(score[~chosen].max()), "not the top k"


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ---------------------------------------------------------------- CPU
def run_cpu(sizes: list[int], repeats: int) -> None:
    device = torch.device("cpu")
    print(describe(device))
    print(f"\nCPU, k = N/2, best of {repeats}; ratios are plan() time / baseline time\n")
    head = f"{'N':>10} {'what':<22} {'ms':>9} {'/argpartition':>14} {'/topk':>8}"
    print(head)
    print("-" * len(head))
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        scores = torch.rand(n, generator=g)
        a = scores.numpy()
        k = n // 2
        # correctness of the baselines: the same set (distinct random floats; checked)
        part = np.argpartition(a, n - k)[n - k:]
        top = torch.topk(scores, k, sorted=False).indices.numpy()
        if np.unique(a).size == n:
            assert np.array_equal(np.sort(part), np.sort(top)), "argpartition != topk"
        t_part = best_of(lambda: np.argpartition(a, n - k), repeats)
        t_topk = best_of(lambda: torch.topk(scores, k, sorted=False), repeats)
        t_key = best_of(lambda: top_k_by_score(scores, k, 0), repeats)
        print(f"{n:>10.0e} {'np.argpartition':<22} {t_part * 1e3:>9.2f} {1.0:>14.2f} "
              f"{t_part / t_topk:>8.2f}")
        print(f"{n:>10.0e} {'torch.topk':<22} {t_topk * 1e3:>9.2f} {t_topk / t_part:>14.2f} "
              f"{1.0:>8.2f}")
        print(f"{n:>10.0e} {'top_k_by_score (key)':<22} {t_key * 1e3:>9.2f} "
              f"{t_key / t_part:>14.2f} {t_key / t_topk:>8.2f}")
        for policy in POLICIES:
            pruner = make_pruner(n, policy, device, "torch", g)
            check_plan(pruner, pruner.plan(0))
            epochs = iter(range(1, 10**6))
            t_plan = best_of(lambda: pruner.plan(next(epochs)), repeats)
            print(f"{n:>10.0e} {'plan() ' + policy:<22} {t_plan * 1e3:>9.2f} "
                  f"{t_plan / t_part:>14.2f} {t_plan / t_topk:>8.2f}")
        print()
    print("static: the subset is chosen once (epoch 0); later plans only reshuffle it.")


# ---------------------------------------------------------------- GPU
def gpu_time(fn, repeats: int, warmup: int = 3, queue_ahead: bool = False) -> float:
    """Median time of fn() in seconds between CUDA events on the current stream.

    With ``queue_ahead`` the GPU first sleeps ~25 ms, so the host has queued all of fn's launches
    before the first runs: the time is then the GPU's alone, without the host's launch overhead (fn
    must not sync). Without it, the time is that of the stream's timeline, host gaps included.
    """
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


def run_gpu(sizes: list[int], repeats: int) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    print(describe(device))
    ops = gp.kernels.get_ops(device)
    try:
        import cupy
    except Exception:  # noqa: BLE001
        cupy = None
    print(f"\nGPU selection, k = N/2, CUDA-event median of {repeats} (us); ratios = baseline / kernels\n")
    print("kernels: GPU time of the launches queued back to back; kernels+host: the same with the "
          "host's launch overhead; plan(): ucb, kernel backend, event timeline; plan wall: host time\n")
    head = (f"{'N':>8} {'kernels':>9} {'k+host':>9} {'plan()':>9} {'plan wall':>10} {'topk':>9} "
            f"{'sort':>9} {'cupy.argp':>10} {'topk/k':>7} {'sort/k':>7} {'argp/k':>7}")
    print(head)
    print("-" * len(head))
    for n in sizes:
        g = torch.Generator(device=device).manual_seed(n)
        scores = torch.rand(n, generator=g, device=device)
        k = n // 2
        got = ops.top_k_scores(scores, k, 7)
        want = top_k_by_score(scores, k, 7)
        assert torch.equal(torch.sort(got).values, torch.sort(want).values), f"kernel != torch at N={n}"
        t_ker = gpu_time(lambda: ops.top_k_scores(scores, k, 7), repeats, queue_ahead=True)
        t_ker_host = gpu_time(lambda: ops.top_k_scores(scores, k, 7), repeats)
        t_topk = gpu_time(lambda: torch.topk(scores, k, sorted=False), repeats)
        t_sort = gpu_time(lambda: torch.sort(scores), repeats)
        t_argp = float("nan")
        if cupy is not None:
            c = cupy.from_dlpack(scores)
            with ops.runtime.session():                  # CuPy on torch's current stream
                t_argp = gpu_time(lambda: cupy.argpartition(c, n - k), repeats)
        pruner = make_pruner(n, "ucb", device, "cuda", torch.Generator(device=device).manual_seed(1))
        check_plan(pruner, pruner.plan(0))
        epochs = iter(range(1, 10**6))
        t_plan = gpu_time(lambda: pruner.plan(next(epochs)), repeats)
        torch.cuda.synchronize()
        t_wall = best_of(lambda: pruner.plan(next(epochs)), repeats)
        us = 1e6
        print(f"{n:>8.0e} {t_ker * us:>9.1f} {t_ker_host * us:>9.1f} {t_plan * us:>9.1f} "
              f"{t_wall * us:>10.1f} {t_topk * us:>9.1f} {t_sort * us:>9.1f} {t_argp * us:>10.1f} "
              f"{t_topk / t_ker:>7.2f} {t_sort / t_ker:>7.2f} {t_argp / t_ker:>7.2f}")
        del pruner, scores
        torch.cuda.empty_cache()

    n = 1_000_000
    print(f"\nobserve() per step, N = {n:.0e}, random ids and losses: GPU time per step (us, 100 "
          f"steps queued back to back, median of {repeats}) and host time per call")
    head = f"{'batch':>7} {'kernels':>9} {'torch':>9} {'torch/k':>8} {'host k':>8} {'host t':>8}"
    print(head)
    print("-" * len(head))
    g = torch.Generator(device=device).manual_seed(0)
    for b in BATCHES:
        banks = {be: gp.ScoreBank(n, device=device, backend=be) for be in ("cuda", "torch")}
        idx = torch.randint(0, n, (100, b), generator=g, device=device)
        x = torch.rand(100, b, generator=g, device=device)
        first = torch.randperm(n, generator=g, device=device)[:b]    # correctness first: ids unique,
        for bank in banks.values():                                  # so torch's atomics are exact
            bank.observe(first, x[0])
        for name in ("mean", "var", "count", "last_epoch"):
            assert torch.equal(getattr(banks["cuda"], name), getattr(banks["torch"], name)), name
        res = {}
        for be, bank in banks.items():
            def steps(bank=bank):
                for s in range(100):
                    bank.observe(idx[s], x[s])
            res[be] = gpu_time(steps, repeats, queue_ahead=True) / 100
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            steps()
            res[be + " host"] = (time.perf_counter() - t0) / 100
            torch.cuda.synchronize()
        us = 1e6
        print(f"{b:>7} {res['cuda'] * us:>9.2f} {res['torch'] * us:>9.2f} {res['torch'] / res['cuda']:>8.2f} "
              f"{res['cuda host'] * us:>8.1f} {res['torch host'] * us:>8.1f}")


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
        sizes = [int(s) for s in (args.sizes or (1e5, 1e6, 1e7, 1e8))]
        run_gpu(sizes, args.repeats or 20)
    else:
        sizes = [int(s) for s in (args.sizes or (1e5, 1e6, 1e7))]
        run_cpu(sizes, args.repeats or 3)


if __name__ == "__main__":
    main()
