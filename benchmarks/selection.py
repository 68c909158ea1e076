"""The cost of an epoch's plan() and of the per-step observe(): counted, estimated, measured.

    python benchmarks/selection.py                     # CPU: cost table, CPU targets, timings
    python benchmarks/selection.py --device cuda       # one GPU: + kernel timings, N = 1e5 .. 1e8
    python benchmarks/selection.py --smoke             # seconds: every section at tiny sizes (CI)
    python benchmarks/selection.py --threads 1 --json out.json

Sections (machine and versions printed first):

1. **Cost model** (counted on any machine, :mod:`gpuprune.kernels.cost`): for ``plan()`` per policy
   and ``observe()`` per batch size, on the kernels (the concurrency harness on a CPU, the GPU with
   ``--device cuda``) and on the torch backend's device path: device operations (torch operations
   + kernel launches), host reads (synchronisations on a GPU), bytes per sample, and an H100
   *estimate* beside each (``LAUNCH_US`` per operation, ``BARRIER_US`` per grid barrier, bytes at
   ``HBM_BYTES_PER_S``: not a measurement). "before" is main at 09725a3, counted with the same
   counter by ``benchmarks/cost_before.py``. Then the launch sequence of each plan().
2. **CPU targets** (``--device cpu``, one run, interleaved, best of ``--repeats``): ``observe()`` of
   256 distinct ids at N = 1e6 against a hand-written EMA update of the same tensors (target
   <= 2x), and UCB ``plan()`` at N = 1e6 against ``score -> numpy.argpartition -> permutation``
   (target <= 1.5x).
3. **Selection** at k = N/2 over random scores: ``backend.top_k``, a whole ``Pruner.plan`` of UCB,
   ``torch.topk(sorted=False)``, ``torch.sort``, argpartition (cupy's on a GPU); every contender
   checked before it is timed.
4. **observe()** per batch size, distinct ids and ids with duplicates.

GPU times are CUDA-event medians after a warm-up, launches queued behind a GPU sleep where nothing
syncs; CPU times are the best of ``--repeats`` wall-clock runs. GPU targets (H100/H200): plan() <=
50 us at N = 1e6 and <= 1.5 ms at 1e8, >= 2x faster than torch.topk(sorted=False); observe() <= 5
us for batches up to 4096.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import gpuprune as gp                                     # noqa: E402
from gpuprune.backend import KernelBackend, TorchBackend, get_backend   # noqa: E402
from gpuprune.bench.report import cpu_name                # noqa: E402
from gpuprune.kernels import cost as cost_model           # noqa: E402
from gpuprune.keys import UCBScore, composite_key         # noqa: E402
from gpuprune.stats import LossStats                      # noqa: E402

# a timing harness plans epochs it never trains: the coverage guard has nothing to report
warnings.filterwarnings("ignore", category=gp.CoverageWarning)

BATCHES = (256, 1024, 4096, 16384, 65536)
POLICIES = ("uniform", "epsilon_greedy", "ucb", "infobatch", "static", "full")
COST_BATCHES = (256, 4096, 65536)

#: plan() and observe() on main at 09725a3, counted by ``python benchmarks/cost_before.py
#: <checkout of main> 20000`` (N = 20000, keep 0.5; bytes: torch operations by tensor sizes, the
#: kernels of 0.2 by their launch sequence, typical case). Per row: device operations, kernel
#: launches, host reads, bytes per sample (plan) or per batch element (observe, kernel bytes added
#: with the same model as after: the kernels' global traffic per element did not change).
BEFORE = {
    "plan": {
        "uniform/kernels": (20, 5, 1, 62.5), "uniform/torch": (66, 0, 1, 730.5),
        "epsilon_greedy/kernels": (37, 15, 1, 101.9), "epsilon_greedy/torch": (120, 0, 1, 1487.9),
        "ucb/kernels": (62, 8, 1, 336.0), "ucb/torch": (115, 0, 1, 1120.0),
        "infobatch/kernels": (60, 8, 2, 252.9), "infobatch/torch": (113, 0, 2, 1147.0),
        "static/kernels": (16, 1, 1, 60.5), "static/torch": (39, 0, 1, 268.5),
        "full/kernels": (9, 1, 1, 64.0), "full/torch": (32, 0, 1, 480.0),
    },
    "observe": {
        "256/kernels": (3, 1, 0, 4.0 + 204), "256/torch": (132, 0, 0, 2074.2),
        "4096/kernels": (3, 1, 0, 4.0 + 204), "4096/torch": (156, 0, 0, 2530.0),
        "65536/kernels": (5, 1, 0, 40.0 + 236), "65536/torch": (180, 0, 0, 2986.0),
    },
}


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


def interleaved_best(fns: dict, repeats: int) -> dict:
    """Best wall-clock seconds of each function, run in turn (a, b, a, b, ...), so that a busy
    machine slows both alike."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


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


# ---------------------------------------------------------------- 1. the cost model
def _kernel_ops(device: torch.device):
    """The kernels to count: the GPU's on a GPU, else the concurrency harness (None without g++)."""
    if device.type == "cuda":
        b = get_backend("cuda", device, 10**6)
        return b.ops
    import kernel_harness as kh
    if kh.find_compiler() is None:
        return None
    return kh.harness_ops(slots=4, keys_per_block=4096)


def _arrow(before, after, fmt="{:g}") -> str:
    return f"{fmt.format(before)} -> {fmt.format(after)}"


def cost_table(device: torch.device, n: int) -> dict:
    from kernel_harness.cost import count_observe, count_plan, observe_row, plan_row
    ops = _kernel_ops(device)
    dev = str(device)
    out: dict = {"plan": {}, "observe": {}, "n": n,
                 "constants": {"launch_us": cost_model.LAUNCH_US, "barrier_us": cost_model.BARRIER_US,
                               "hbm_bytes_per_s": cost_model.HBM_BYTES_PER_S,
                               "sector_bytes": cost_model.SECTOR_BYTES}}
    print(f"\n1. cost model (counted at N = {n}; H100 times are ESTIMATES: {cost_model.LAUNCH_US:g} us "
          f"per device op, {cost_model.BARRIER_US:g} us per grid barrier, "
          f"{cost_model.HBM_BYTES_PER_S / 1e12:.1f} TB/s; before = main 09725a3)\n")
    head = (f"{'plan()':<24} {'device ops':>11} {'host reads':>11} {'bytes/sample':>15} "
            f"{'H100 est. us @1e6':>20} {'@1e8':>16}")
    print(head)
    print("-" * len(head))
    for which in ("kernels", "torch"):
        if which == "kernels" and ops is None:
            print("  (kernels: no g++ for the harness; not counted)")
            continue
        for policy in POLICIES:
            row = plan_row(count_plan(policy, which, ops, n=n, device=dev), n)
            out["plan"][f"{policy}/{which}"] = row
            b_ops, b_launch, b_reads, b_bytes = BEFORE["plan"][f"{policy}/{which}"]
            b_us = [cost_model.h100_estimate(b_ops, b_bytes * m, 0) for m in (1e6, 1e8)]
            print(f"{policy + ' / ' + which:<24} {_arrow(b_ops, row['device_ops']):>11} "
                  f"{_arrow(b_reads, row['host_reads']):>11} "
                  f"{_arrow(b_bytes, row['bytes_per_sample'], '{:.0f}'):>15} "
                  f"{_arrow(b_us[0], row['h100_us_1e6'], '{:.0f}'):>20} "
                  f"{_arrow(b_us[1] / 1e3, row['h100_us_1e8'] / 1e3, '{:.2f}ms'):>16}")
    print("(kernels before: launches of gp_radix_pass x6, gp_compact, gp_hash_index + the policy's torch "
          "score, argsort shuffle, index_add, overlap; after: one gp_plan)")
    head = (f"\n{'observe()':<24} {'device ops':>11} {'host reads':>11} {'bytes/elem':>15} "
            f"{'H100 est. us':>20}")
    print(head)
    print("-" * (len(head) - 1))
    for which in ("kernels", "torch"):
        if which == "kernels" and ops is None:
            continue
        for batch in COST_BATCHES:
            row = observe_row(count_observe(batch, which, ops, device=dev), batch)
            out["observe"][f"{batch}/{which}"] = row
            b_ops, _, b_reads, b_bytes = BEFORE["observe"][f"{batch}/{which}"]
            b_us = cost_model.h100_estimate(b_ops, b_bytes * batch)
            print(f"{f'{batch} / {which}':<24} {_arrow(b_ops, row['device_ops']):>11} "
                  f"{_arrow(b_reads, row['host_reads']):>11} "
                  f"{_arrow(b_bytes, row['bytes_per_element'], '{:.0f}'):>15} "
                  f"{_arrow(b_us, row['h100_us'], '{:.1f}'):>20}")
    print(f"(budgets, kept by tests/test_kernel_cost.py: plan() with the kernels <= "
          f"{cost_model.BUDGET_PLAN}, observe() <= {cost_model.BUDGET_OBSERVE} for batches <= 4096)")
    print("\nlaunch sequence of plan() with the kernels:")
    for policy in POLICIES:
        row = out["plan"].get(f"{policy}/kernels")
        if row:
            print(f"  {policy:<15} {' -> '.join(row['sequence'])}")
    return out


# ---------------------------------------------------------------- 2. the CPU targets
def _ucb_pruner(n: int, backend, g: torch.Generator) -> gp.Pruner:
    device = backend.device
    pruner = gp.Pruner(n, keep=0.5, policy=gp.UCB(c=1.0), seed=0, num_epochs=10**6, device=device,
                       backend="torch", process_group=None)
    pruner.backend = backend
    s = pruner.stats                             # as after epochs: all seen, distinct losses
    s.mean.copy_(torch.rand(n, generator=g, device=device) * 3)
    s.var.copy_(torch.rand(n, generator=g, device=device))
    s.last_epoch.copy_(torch.randint(0, 3, (n,), generator=g, device=device).int())
    return pruner


def cpu_targets(n: int, repeats: int) -> dict:
    """observe() of 256 distinct ids and UCB plan() at N = n, against hand-written baselines."""
    judged = n >= 1_000_000
    print(f"\n2. CPU targets at N = {n:.0e}, one run, interleaved, best of {repeats} "
          f"(torch threads {torch.get_num_threads()})"
          + ("" if judged else ": smoke size, the targets are for N = 1e6") + "\n")

    def verdict(ratio: float, bound: float) -> str:
        return f"target <= {bound:g}x: " + (("met" if ratio <= bound else "NOT MET") if judged
                                            else "not judged at this size")
    g = torch.Generator().manual_seed(0)
    pruner = _ucb_pruner(n, TorchBackend(torch.device("cpu")), g)
    st = pruner.stats
    batches = [(torch.randperm(n, generator=g)[:256], torch.rand(256, generator=g))
               for _ in range(50)]

    def ema():                                   # the hand-written update of the same tensors
        for ids, x in batches:
            m = st.mean[ids]
            d = x - m
            st.mean[ids] = m + 0.1 * d
            st.var[ids] = 0.9 * (st.var[ids] + 0.1 * d * d)

    def observe():
        for ids, x in batches:
            pruner.observe(ids, x)

    def observe_backend():
        for ids, x in batches:
            pruner.backend.observe_(st.tensors(), ids, x, 0.9, 0)

    t = interleaved_best({"ema": ema, "observe": observe, "observe_": observe_backend}, repeats)
    per = {k: v / len(batches) * 1e6 for k, v in t.items()}
    r_obs, r_obs_b = per["observe"] / per["ema"], per["observe_"] / per["ema"]
    print(f"observe(256 distinct ids): Pruner.observe {per['observe']:.1f} us, Backend.observe_ "
          f"{per['observe_']:.1f} us, hand-written EMA {per['ema']:.1f} us -> "
          f"{r_obs:.2f}x / {r_obs_b:.2f}x ({verdict(r_obs, 2)})")
    rng = np.random.default_rng(0)
    k = n // 2
    epoch = [10]

    def baseline():
        score = (st.mean + st.var.sqrt()).numpy()
        ids = np.argpartition(score, n - k)[n - k:]
        return ids[rng.permutation(k)]

    def plan():
        epoch[0] += 1
        return pruner.plan(epoch[0])

    t = interleaved_best({"baseline": baseline, "plan": plan}, repeats)
    r_plan = t["plan"] / t["baseline"]
    print(f"UCB plan() {t['plan'] * 1e3:.1f} ms, score -> numpy.argpartition -> permutation "
          f"{t['baseline'] * 1e3:.1f} ms -> {r_plan:.2f}x ({verdict(r_plan, 1.5)})")
    return {"n": n, "observe_us": per["observe"], "observe_backend_us": per["observe_"],
            "ema_us": per["ema"], "observe_ratio": r_obs, "observe_backend_ratio": r_obs_b,
            "plan_ms": t["plan"] * 1e3, "baseline_ms": t["baseline"] * 1e3, "plan_ratio": r_plan}


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


def check_plan(pruner: gp.Pruner, plan) -> None:
    """The plan holds a top k of UCB's score as the policy defines it, drift included (main's check
    left the drift out, so the default UCB failed it)."""
    s, policy = pruner.stats, pruner.policy
    score = UCBScore(policy.c, policy.uncertainty, policy.drift, plan.epoch).torch(
        s.mean, s.var, s.last_epoch, numpy=False)
    check_values_top_k(score, plan.indices, pruner.k)


# ---------------------------------------------------------------- 3 and 4. timings
def timings(device: torch.device, sizes: list[int], repeats: int) -> dict:
    backend = get_backend("cuda" if device.type == "cuda" else "torch", device, max(sizes))
    kernels = isinstance(backend, KernelBackend)
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
    print(f"\n3. selection at k = N/2 ({unit}; {what}; backend {backend.name}); ratios = "
          f"contender / backend.top_k\n")
    head = (f"{'N':>8} {'top_k':>9} {'plan()':>9} {'plan wall':>10} {'topk':>9} "
            f"{'sort':>9} {'argpart':>9} {'topk/':>6} {'sort/':>6} {'argp/':>6}")
    print(head)
    print("-" * len(head))
    rows = []
    for n in sizes:
        g = torch.Generator(device=device).manual_seed(n)
        score = torch.rand(n, generator=g, device=device)
        k = n // 2
        check_top_k(backend, score, k)
        check_values_top_k(score, torch.topk(score, k, sorted=False).indices, k)
        srt = torch.sort(score)
        assert bool((srt.values[1:] >= srt.values[:-1]).all())
        t_sel = timer(lambda: backend.top_k(score, n, k, 7))
        t_topk = timer(lambda: torch.topk(score, k, sorted=False))
        t_sort = timer(lambda: torch.sort(score))
        t_argp = float("nan")
        if use_cupy:
            cs = cupy.from_dlpack(score)
            ids = torch.from_dlpack(cupy.argpartition(cs, n - k)[n - k:])
            check_values_top_k(score, ids, k)
            t_argp = timer(lambda: cupy.argpartition(cs, n - k))
        elif device.type == "cpu":
            a = score.numpy()
            ids = torch.from_numpy(np.argpartition(a, n - k)[n - k:])
            check_values_top_k(score, ids, k)
            t_argp = timer(lambda: np.argpartition(a, n - k))
        pruner = _ucb_pruner(n, backend, torch.Generator(device=device).manual_seed(1))
        epoch = [0]

        def plan():
            epoch[0] += 1
            return pruner.plan(epoch[0])

        check_plan(pruner, plan())
        t_plan = timer(plan) if device.type == "cpu" else gpu_time(plan, repeats, queue_ahead=False)
        t_plan_wall = wall_time(plan, repeats, device)
        rows.append({"n": n, "kernels_us": t_sel * 1e6, "plan_us": t_plan * 1e6,
                     "plan_wall_us": t_plan_wall * 1e6, "topk_us": t_topk * 1e6,
                     "sort_us": t_sort * 1e6, "argpartition_us": t_argp * 1e6})
        print(f"{n:>8.0e} {t_sel * scale:>9.1f} {t_plan * scale:>9.1f} "
              f"{t_plan_wall * scale:>10.1f} {t_topk * scale:>9.1f} {t_sort * scale:>9.1f} "
              f"{t_argp * scale:>9.1f} {t_topk / t_sel:>6.2f} {t_sort / t_sel:>6.2f} "
              f"{t_argp / t_sel:>6.2f}")
    print("argpart: cupy.argpartition on a GPU, numpy.argpartition on the CPU (raw scores, no "
          "tie-break)\nplan(): UCB, score + select + shuffle + bookkeeping; plan wall: host time of "
          "the call, its host read included")

    n = max(sizes)
    print(f"\n4. observe() per batch at N = {n:.0e} ({unit}; {what})\n")
    head = f"{'batch':>7} {'ids':<10} {'time':>9} {'per 1k ids':>11}"
    print(head)
    print("-" * len(head))
    g = torch.Generator(device=device).manual_seed(3)
    stats = LossStats(n, device)
    obs = []
    for b in [b for b in BATCHES if b <= n]:
        for kind in ("distinct", "duplicate"):
            ids = (torch.randperm(n, generator=g, device=device)[:b] if kind == "distinct"
                   else torch.randint(0, max(b // 4, 1), (b,), generator=g, device=device))
            ids = ids.int()
            x = torch.rand(b, generator=g, device=device)
            ref = LossStats(n, device)
            TorchBackend(device).observe_(ref.tensors(), ids, x, 0.9, 0, exact=True)
            check = LossStats(n, device)
            backend.observe_(check.tensors(), ids, x, 0.9, 0, exact=True)
            assert torch.equal(ref.mean, check.mean) and torch.equal(ref.var, check.var), \
                "observe: not the reference"
            t = timer(lambda: backend.observe_(stats.tensors(), ids, x, 0.9, 1))
            obs.append({"batch": b, "ids": kind, "kernels_us": t * 1e6})
            print(f"{b:>7} {kind:<10} {t * scale:>9.2f} {t * scale * 1000 / b:>11.3f}")
    return {"selection": rows, "observe": [o for o in obs if o["ids"] == "distinct"],
            "observe_all": obs, "backend": backend.name, "kernels": kernels}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", nargs="+", type=float, default=None,
                    help="N values (default: 1e5 1e6 1e7 on CPU, 1e5 1e6 1e7 1e8 on a GPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 5 CPU, 20 GPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice; 1 is steadier on a busy machine)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes and one repeat: every section runs in seconds (CI)")
    ap.add_argument("--sections", default="1234", help="which sections to run (default 1234)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure to this JSON file")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    cuda = device.type == "cuda"
    if args.smoke:
        sizes, repeats, cost_n, target_n = [4096], 1, 4096, 20_000
    else:
        sizes = [int(s) for s in (args.sizes or ((1e5, 1e6, 1e7, 1e8) if cuda else (1e5, 1e6, 1e7)))]
        repeats, cost_n, target_n = args.repeats or (20 if cuda else 5), 20_000, 1_000_000
    print(describe(device))
    res: dict = {"device": str(device), "smoke": args.smoke}
    if "1" in args.sections:
        res["cost"] = cost_table(device, cost_n)
    if "2" in args.sections and not cuda:
        res["cpu_targets"] = cpu_targets(target_n, max(repeats, 3 if args.smoke else 7))
    if "3" in args.sections or "4" in args.sections:
        res.update(timings(device, sizes, repeats))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
