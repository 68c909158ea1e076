"""Stress the selection, the fused plan and the observe update: thousands of random cases, kernels vs
torch.

    python scripts/gpu_check_stress.py --device cuda --seconds 20 --json stress.json   # GPU
    python scripts/gpu_check_stress.py --dry                                           # CPU, ~5 s

On a GPU the CUDA kernels (``KernelBackend``) are compared with the torch backend:

* **selections**: N drawn log-uniformly from 1 to 1e5, and in 3% of the cases from 1e5 to
  ``--max-n`` (1e7); k from 0 to N with the edges (0, 1, N - 1, N) often; scores of many kinds
  (none, random, 3-value ties, constant, all NaN, all -inf, +-0 only, denormals only,
  NaN/+-inf/+-0/denormal/FLT_MAX mixed in). The selected *sets* and their sizes must be identical
  to the torch backend's on the same GPU;
* **plans**: ``Backend.plan`` (one gp_plan launch: score, selection, shuffle, counts, overlap) for
  every kind of rule (hash only, epsilon-greedy's mean with its exploration, UCB std with drift and
  var, InfoBatch's below-mean rank, given scores), given ids and full plans, after no plan, a
  pruned one or a full one, on random statistics with ties and extreme values; N up to
  ``--max-n``, so grids of hundreds of blocks meet at hundreds of grid barriers. The plan, the
  selected counts, the overlap's bits, the rescaled bits and the kernels' own count must all
  equal the torch backend's. This is the run that would catch a missing ``__threadfence`` (see
  docs/kernels.md): a block reading another block's histogram or count before it landed picks a
  wrong bucket or offset, and the plan or its count differs;
* **observe**: batches of 1 to 20,000 ids (both sides of the kernels' one-block batch limit,
  ``GP_OBS_SMALL_MAX``) with up to 16 copies of an id and the decays 0, 0.5, 0.9, 0.99, then a
  second series (``observe_heavy``) with random decays and up to 64 copies, reported apart. The
  statistics must be bit-identical to the torch backend on the CPU and, with ``exact=True``, on
  the GPU;
* **no illegal address**: every CUDA error (illegal address, launch failure) ends the run and is
  reported with the case that raised it; the device is synchronised after every large case.

``--mutant threadfence`` runs the plan series with kernels built (NVRTC) from the source with every
``__threadfence()`` removed, and reports what it found (a mutant that shows nothing in one run is
not proof of safety: the ordering it breaks is timing-dependent). ``--dry`` runs the same machinery
on the CPU: the torch backend's CPU paths against the torch reference (its device path), N up to
2e4, a few seconds, so CI exercises this code. The exit status is 0 when every comparison agreed,
1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpuprune.doctor.environment import _short                          # noqa: E402
from gpuprune.doctor.reference import BackendImplementation, Implementation      # noqa: E402
from gpuprune.doctor.selftest import _compare_ids, _compare_states, _losses    # noqa: E402

__all__ = ["SCORE_KINDS", "PLAN_KINDS", "stress_scores", "draw_case", "draw_plan_case",
           "compare_plans", "run_plans", "run_stress", "main"]

#: every kind of score vector a selection case can have
SCORE_KINDS = ("none", "random", "ties", "constant", "nan", "neginf", "zeros", "denormal", "special")
_DENORMALS = np.array([1e-45, 2e-45, 1e-40, -1e-45, 5e-39], dtype=np.float32)
_SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-40,
                     float(np.finfo(np.float32).max), -float(np.finfo(np.float32).max)], np.float32)


def stress_scores(kind: str, n: int, rng: np.random.Generator) -> np.ndarray | None:
    """A float32 score vector of one of :data:`SCORE_KINDS` (None for ``"none"``: hash order)."""
    if kind == "none":
        return None
    if kind == "random":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "ties":
        return rng.choice(np.array([0.5, 2.0, -1.0], np.float32), n)
    if kind == "constant":
        return np.full(n, 1.25, np.float32)
    if kind == "nan":
        return np.full(n, np.nan, np.float32)
    if kind == "neginf":
        return np.full(n, -np.inf, np.float32)
    if kind == "zeros":
        return rng.choice(np.array([0.0, -0.0], np.float32), n)
    if kind == "denormal":
        return rng.choice(_DENORMALS, n)
    s = rng.standard_normal(n).astype(np.float32)
    pick = rng.random(n) < rng.random()
    s[pick] = rng.choice(_SPECIAL, int(pick.sum()))
    return s


def draw_case(rng: np.random.Generator, max_n: int, big: float = 0.03) -> tuple[int, int, str, int]:
    """(N, k, score kind, seed): N log-uniform in [1, 1e5], or with probability ``big`` in
    [1e5, max_n] (a large case costs as much as a hundred small ones); k with its edges often."""
    lo, hi = 0.0, math.log(min(max_n, 100_000) + 1)
    if max_n > 100_000 and rng.random() < big:
        lo, hi = math.log(100_000), math.log(max_n + 1)
    n = int(min(max_n, max(1, round(math.exp(rng.uniform(lo, hi))))))
    edge = rng.random()
    if edge < 0.25:
        k = int(rng.choice([0, 1 % (n + 1), max(n - 1, 0), n]))
    else:
        k = int(rng.integers(0, n + 1))
    return n, k, str(rng.choice(SCORE_KINDS)), int(rng.integers(0, 2**63))


#: what a plan case plans
PLAN_KINDS = ("hash", "mean_explore", "ucb_std", "ucb_var", "below_mean", "given", "ids", "full")


def _random_stats(rng: np.random.Generator, n: int) -> dict:
    """Statistics as after some epochs: finite means with ties and extremes, non-negative variances
    (some 0, some FLT_MAX), unseen samples, selection counts."""
    f32max = float(np.finfo(np.float32).max)
    mean = (rng.standard_normal(n) * np.exp(2 * rng.standard_normal(n))).astype(np.float32)
    pick = rng.random(n)
    mean[pick < 0.3] = rng.integers(0, 3, int((pick < 0.3).sum())).astype(np.float32)
    mean[(pick >= 0.3) & (pick < 0.33)] = rng.choice(np.array(
        [0.0, -0.0, 1e-45, 3e38, -f32max], np.float32), int(((pick >= 0.3) & (pick < 0.33)).sum()))
    var = np.abs(rng.standard_normal(n) * np.exp(4 * rng.standard_normal(n))).astype(np.float32)
    var[rng.random(n) < 0.2] = 0.0
    var[rng.random(n) < 0.01] = f32max
    return {"mean": torch.from_numpy(mean), "var": torch.from_numpy(np.minimum(var, f32max)),
            "last_epoch": torch.from_numpy(rng.integers(-1, 5, n).astype(np.int32)),
            "selected": torch.from_numpy(rng.integers(0, 6, n).astype(np.int32))}


def draw_plan_case(rng: np.random.Generator, max_n: int) -> tuple[int, str, dict, dict]:
    """(N, kind, statistics, plan arguments) of a random plan case."""
    from gpuprune.keys import BelowMeanScore, GivenScore, MeanScore, Pick, UCBScore
    n, k, _, seed = draw_case(rng, max_n, big=0.1)
    n = max(n, 2)
    k = min(max(k, 1), n)
    kind = str(rng.choice(PLAN_KINDS))
    stats = _random_stats(rng, n)
    what: dict = {"shuffle_seed": int(rng.integers(0, 2**63))}
    epoch = int(rng.integers(0, 6))
    if kind == "full":
        what["full"] = True
    elif kind == "ids":
        what["ids"] = torch.from_numpy(rng.permutation(n)[:k].astype(np.int32))
    else:
        score = {"hash": None, "mean_explore": MeanScore(),
                 "ucb_std": UCBScore(float(rng.choice([0.5, 1.0, 2.0])), "std",
                                     float(rng.choice([0.0, 1.0])), epoch),
                 "ucb_var": UCBScore(1.0, "var", 0.5, epoch), "below_mean": BelowMeanScore(),
                 "given": GivenScore(torch.from_numpy(stress_scores(
                     str(rng.choice(SCORE_KINDS[1:])), n, rng)))}[kind]
        explore = int(rng.integers(0, k + 1)) if kind == "mean_explore" else 0
        share = float(rng.choice([0.1, 0.3, 1.0])) if kind == "below_mean" else None
        what["pick"] = Pick(score, k, seed, explore=explore, explore_seed=seed ^ 0x5A5A,
                            below_share=share)
    prev = rng.random()
    if prev < 0.4:
        ids = torch.from_numpy(rng.permutation(n)[:int(rng.integers(1, n + 1))].astype(np.int32))
        what["previous"] = (ids, ids.numel())
    elif prev < 0.6:
        what["previous"] = (None, n)
    return n, kind, stats, what


def compare_plans(a: dict, b: dict) -> str | None:
    """The first part of two plans (from BackendImplementation.plan) that differs, or None."""
    for part in ("indices", "selected", "overlap", "rescaled", "total"):
        x, y = a[part], b[part]
        if (x is None) != (y is None):
            return f"{part}: {x is None} vs {y is None}"
        if x is None:
            continue
        if not np.array_equal(np.asarray(x), np.asarray(y)):
            return f"{part} differ" + (f" ({x} vs {y})" if np.ndim(x) == 0 else
                                      f" ({np.size(x)} vs {np.size(y)} entries)")
    return None


def run_plans(candidate: Implementation, references: Sequence[Implementation], *, seconds: float,
              max_n: int, seed: int = 0, min_cases: int = 0, sync=None, log=print) -> dict:
    """Random plan cases for ``seconds``: the candidate's plans against each reference's (the
    references that plan: a backend, not the numpy oracle of the tests)."""
    references = [r for r in references if callable(getattr(r, "plan", None))]
    rng = np.random.default_rng([seed, 12])
    res: dict = {"plans": 0, "plan_mismatches": 0, "largest_n": 0, "by_kind": {}, "first": []}
    t0 = time.perf_counter()
    while ((time.perf_counter() - t0 < seconds or res["plans"] < min_cases)
           and time.perf_counter() - t0 < 2 * seconds):
        n, kind, stats, what = draw_plan_case(rng, max_n)
        got = candidate.plan(stats, **what)
        res["plans"] += 1
        res["largest_n"] = max(res["largest_n"], n)
        res["by_kind"][kind] = res["by_kind"].get(kind, 0) + 1
        if got["total"] != len(got["indices"]):
            res["plan_mismatches"] += 1
            if len(res["first"]) < 8:
                res["first"].append(f"plan: {candidate}: N={n} {kind}: counted {got['total']} "
                                    f"planned ids, wrote {len(got['indices'])}")
        for ref in references:
            diff = compare_plans(got, ref.plan(stats, **what))
            if diff:
                res["plan_mismatches"] += 1
                line = f"plan: {candidate} vs {ref}: N={n} {kind}: {diff}"
                if len(res["first"]) < 8:
                    res["first"].append(line)
                log(f"MISMATCH {line}")
        if sync is not None and n >= 100_000:
            sync()
    res["plan_seconds"] = time.perf_counter() - t0
    return res


def _heavy_ids(rng: np.random.Generator, n: int, b: int, max_copies: int) -> torch.Tensor:
    distinct = rng.permutation(n)[:max(1, min(n, -(-b // max_copies) + int(rng.integers(0, b + 1))))]
    b = min(b, distinct.size * max_copies)
    pool = np.repeat(distinct, max_copies)
    return torch.from_numpy(rng.choice(pool, b, replace=False).astype(np.int64))


def _is_cuda_error(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(w in text for w in ("illegal", "cuda error", "cudaerror", "launch failure",
                                   "misaligned", "unspecified launch"))


def run_stress(candidate: Implementation, references: Sequence[Implementation],
               observe_references: Sequence[Implementation], *, seconds: float, max_n: int,
               seed: int = 0, min_selections: int = 0, sync=None, log=print,
               plan_seconds: float | None = None) -> dict:
    """Run the stress; return its figures (JSON-ready).

    Args:
        candidate: the implementation under test (the kernels).
        references: what its selections must equal (the torch backend).
        observe_references: what its statistics must equal (torch on the CPU, and on the GPU).
        seconds: time for the selections (observe series run after, on a fixed count).
        plan_seconds: time for the plans (default: ``seconds``).
        max_n: largest N of a selection.
        seed: seed of the cases (numpy ``default_rng``).
        min_selections: run at least this many selections even past ``seconds``.
        sync: called after every large case (``torch.cuda.synchronize`` on a GPU), so an illegal
            address is caught at the case that caused it.
        log: where progress lines go.
    """
    rng = np.random.default_rng([seed, 11])
    plan_seconds = seconds if plan_seconds is None else plan_seconds
    res: dict = {"plans": 0, "plan_mismatches": 0, "candidate": str(candidate), "references": [str(r) for r in references],
                 "observe_references": [str(r) for r in observe_references], "max_n": max_n,
                 "selections": 0, "selection_mismatches": 0, "largest_n": 0, "by_kind": {},
                 "observe_batches": 0, "observe_mismatches": 0, "observe_heavy_batches": 0,
                 "observe_heavy_mismatches": 0, "cuda_error": None, "errors": [], "first": []}

    def note(kind: str, text: str) -> None:
        if len(res["first"]) < 8:
            res["first"].append(f"{kind}: {text}")
        log(f"MISMATCH {kind}: {text}")

    try:                       # the kernels' largest one-block observe batch (both sides tested)
        from gpuprune.kernels._spec import CONSTANTS
        small = int(CONSTANTS.get("GP_OBS_SMALL_MAX", 2048))
    except ImportError:
        small = 2048
    t0 = time.perf_counter()
    case = None
    try:
        # ---------------------------------------------------------------- selections
        while ((time.perf_counter() - t0 < seconds or res["selections"] < min_selections)
               and time.perf_counter() - t0 < 2 * seconds):
            n, k, kind, s = case = draw_case(rng, max_n)
            score = stress_scores(kind, n, rng)
            t = None if score is None else torch.from_numpy(score)
            got = candidate.top_k(t, n, k, s)
            res["selections"] += 1
            res["largest_n"] = max(res["largest_n"], n)
            res["by_kind"][kind] = res["by_kind"].get(kind, 0) + 1
            if got.size != k or np.unique(got).size != k or (k and (got[0] < 0 or got[-1] >= n)):
                res["selection_mismatches"] += 1
                note("selection", f"N={n} k={k} {kind} seed={s}: {got.size} ids returned, "
                                  f"{np.unique(got).size} distinct, expected {k} in [0, {n})")
            for ref in references:
                diff = _compare_ids("sets differ", got, ref.top_k(t, n, k, s))
                if diff:
                    res["selection_mismatches"] += 1
                    note("selection", f"{candidate} vs {ref}: N={n} k={k} {kind} seed={s}: {diff}")
            if sync is not None and n >= 100_000:
                sync()
        res["selection_seconds"] = time.perf_counter() - t0
        # ---------------------------------------------------------------- plans
        case = ("plans",)
        plans = run_plans(candidate, references, seconds=plan_seconds, max_n=max_n, seed=seed,
                          min_cases=min_selections // 10, sync=sync, log=log)
        res.update(plans=plans["plans"], plan_mismatches=plans["plan_mismatches"],
                   plan_largest_n=plans["largest_n"], plans_by_kind=plans["by_kind"],
                   plan_seconds=plans["plan_seconds"])
        for line in plans["first"]:
            if len(res["first"]) < 8:
                res["first"].append(line)
        # ---------------------------------------------------------------- observe
        t1 = time.perf_counter()
        for heavy in (False, True):
            key = "observe_heavy" if heavy else "observe"
            for series in range(6):
                n = int(rng.choice([1, 7, 1000, 60_000, 1_000_000 if max_n >= 1_000_000 else 20_000]))
                decay = float(rng.random()) if heavy else float(rng.choice([0.0, 0.5, 0.9, 0.99]))
                states = [(impl, impl.new_state(n)) for impl in (candidate, *observe_references)]
                diverged = False
                for j in range(8):
                    if diverged:                        # states differ now: next series afresh
                        break
                    b = int(rng.choice([1, 5, 128, 1000, small, small + 1, 20_000]))
                    b = b if max_n >= 1_000_000 else min(b, 3000)
                    ids = _heavy_ids(rng, n, b, 64 if heavy else 16)
                    losses = _losses(rng, ids.numel(), torch.float32)
                    case = (key, n, b, decay)
                    for impl, st in states:
                        impl.observe(st, ids, losses, decay, j // 3)
                    res[f"{key}_batches"] += 1
                    mine = candidate.arrays(states[0][1])
                    for impl, st in states[1:]:
                        diff = _compare_states(mine, impl.arrays(st))
                        if diff:
                            res[f"{key}_mismatches"] += 1
                            copies = int(np.bincount(ids.numpy()).max())
                            note(key, f"{candidate} vs {impl}: N={n} decay={decay!r} batch {j} "
                                      f"(B={ids.numel()}, up to {copies} copies of an id): {diff}")
                            diverged = True
                if sync is not None:
                    sync()
        res["observe_seconds"] = time.perf_counter() - t1
    except Exception as e:  # noqa: BLE001 - a crash is the finding: report it with its case
        if _is_cuda_error(e):
            res["cuda_error"] = f"{_short(e, 500)} (case {case})"
        else:
            res["errors"].append(f"{_short(e, 500)} (case {case})")
        log(f"ERROR at case {case}: {_short(e, 500)}")
    res["seconds"] = time.perf_counter() - t0
    res["ok"] = (res["selection_mismatches"] == 0 and res["observe_mismatches"] == 0
                 and res["plan_mismatches"] == 0 and res["plans"] > 0
                 and res["observe_heavy_mismatches"] == 0 and res["cuda_error"] is None
                 and not res["errors"] and res["selections"] > 0)
    return res


def _implementations(device: str, dry: bool):
    from gpuprune.backend import TorchBackend, get_backend
    if dry or device == "cpu":
        ref = BackendImplementation(TorchBackend(torch.device("cpu"), cpu_fast_paths=False),
                                    name="torch reference (cpu)")
        return BackendImplementation(TorchBackend(torch.device("cpu"))), [ref], [ref], None
    dev = torch.device(device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    kern = BackendImplementation(get_backend("cuda", dev, 1000))
    torch_gpu = BackendImplementation(TorchBackend(dev))
    torch_cpu = BackendImplementation(TorchBackend(torch.device("cpu")))
    return kern, [torch_gpu], [torch_cpu, torch_gpu], lambda: torch.cuda.synchronize(dev)


def mutant_without_fences(device: torch.device) -> BackendImplementation:
    """The kernels built by NVRTC from the source with every ``__threadfence()`` removed."""
    import tempfile

    import cupy

    from gpuprune import kernels
    from gpuprune.backend import KernelBackend
    from gpuprune.kernels._loader import CupyRuntime
    src = kernels.find_source().read_text()
    mutated = src.replace("__threadfence();", "/* fence removed */;")
    assert mutated != src
    path = Path(tempfile.mkdtemp()) / kernels.SOURCE_NAME
    path.write_text(mutated)
    index = device.index if device.index is not None else torch.cuda.current_device()
    functions, kind, p = kernels.load_module(cupy, index, [("source", path)])
    sm = torch.cuda.get_device_properties(index).multi_processor_count
    ops = kernels.KernelOps(CupyRuntime(cupy, functions, index, kind, p, sm),
                            torch.device("cuda", index), sm)
    return BackendImplementation(KernelBackend(ops), name="kernels without __threadfence")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu")
    ap.add_argument("--seconds", type=float, default=None,
                    help="time for the selections (default 45 on a GPU, 4 with --dry)")
    ap.add_argument("--max-n", type=float, default=None, help="largest N (default 1e7; 2e4 dry)")
    ap.add_argument("--min-selections", type=int, default=None,
                    help="at least this many selections, time allowing (at most twice --seconds; "
                         "default 2000 on a GPU, 200 dry)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--dry", action="store_true",
                    help="CPU: the torch backend's CPU paths against the torch reference, small N")
    ap.add_argument("--mutant", choices=["threadfence"], default=None,
                    help="GPU: also run the plans with kernels built without __threadfence (report "
                         "only: does the stress see it?)")
    ap.add_argument("--mutant-seconds", type=float, default=10.0)
    args = ap.parse_args(argv)
    dry = args.dry or args.device == "cpu"
    if not dry and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device (use --dry on a CPU machine)")
    seconds = args.seconds if args.seconds is not None else (4.0 if dry else 45.0)
    max_n = int(args.max_n) if args.max_n is not None else (20_000 if dry else 10_000_000)
    min_sel = args.min_selections if args.min_selections is not None else (200 if dry else 2000)
    cand, refs, orefs, sync = _implementations(args.device, dry)
    print(f"stress: {cand} vs {', '.join(map(str, refs))} (selections), vs "
          f"{', '.join(map(str, orefs))} (observe); N up to {max_n:.0e}, {seconds:.0f} s", flush=True)
    res = run_stress(cand, refs, orefs, seconds=seconds, max_n=max_n, seed=args.seed,
                     min_selections=min_sel, sync=sync)
    res["dry"] = dry
    print(f"selections: {res['selections']} (largest N {res['largest_n']:,}), mismatches "
          f"{res['selection_mismatches']}; plans: {res['plans']} (largest N "
          f"{res.get('plan_largest_n', 0):,}), mismatches {res['plan_mismatches']}; "
          f"observe batches: {res['observe_batches']} (mismatches "
          f"{res['observe_mismatches']}), heavy: {res['observe_heavy_batches']} (mismatches "
          f"{res['observe_heavy_mismatches']}); CUDA error: {res['cuda_error'] or 'none'}; "
          f"{res['seconds']:.1f} s")
    for line in res["first"]:
        print("  " + line)
    if args.mutant and not dry:
        dev = torch.device(args.device)
        mut = mutant_without_fences(dev)
        m = run_plans(mut, refs, seconds=args.mutant_seconds, max_n=max_n, seed=args.seed + 1,
                      sync=sync, log=lambda line: None)
        res["mutant"] = {"name": str(mut), "plans": m["plans"], "mismatches": m["plan_mismatches"],
                         "first": m["first"][:3]}
        print(f"mutant ({mut}): {m['plans']} plans, {m['plan_mismatches']} mismatches "
              f"({'caught' if m['plan_mismatches'] else 'not seen in this run'})")
    print("stress: " + ("OK" if res["ok"] else "FAIL"), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
