"""Stress the selection and the observe update: thousands of random cases, kernels vs torch.

    python scripts/gpu_check_stress.py --device cuda --seconds 45 --json stress.json   # GPU
    python scripts/gpu_check_stress.py --dry                                           # CPU, ~5 s

On a GPU the CUDA kernels (``KernelBackend``) are compared with the torch backend:

* **selections**: N drawn log-uniformly from 1 to 1e5, and in 3% of the cases from 1e5 to
  ``--max-n`` (1e7); k from 0 to N with the edges (0, 1, N - 1, N) often; scores of many kinds
  (none, random, 3-value ties, constant, all NaN, all -inf, +-0 only, denormals only,
  NaN/+-inf/+-0/denormal/FLT_MAX mixed in). The selected *sets* and their sizes must be identical
  to the torch backend's on the same GPU;
* **observe**: batches of 1 to 20,000 ids (both sides of the kernels' one-block batch limit,
  ``GP_OBS_SMALL_MAX``) with up to 16 copies of an id and the decays 0, 0.5, 0.9, 0.99, then a
  second series (``observe_heavy``)
  with random decays and up to 64 copies, reported apart: ``decay ** c`` is computed by different
  ``pow`` implementations (torch's vectorised one on the CPU, CUDA's on the GPU, which may differ in
  the last bit of a float64). The statistics must be bit-identical to the torch backend on the CPU
  and, with ``exact=True``, on the GPU;
* **no illegal address**: every CUDA error (illegal address, launch failure) ends the run and is
  reported with the case that raised it; the device is synchronised after every large case.

``--dry`` runs the same machinery on the CPU with the torch backend against the independent numpy
reference of :mod:`gpuprune.doctor` (N up to 2e4, a few seconds), so CI exercises this code. The
exit status is 0 when every comparison agreed (``observe_heavy`` included), 1 otherwise.
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
from gpuprune.doctor.reference import (BackendImplementation, Implementation,  # noqa: E402
                                       NumpyReference)
from gpuprune.doctor.selftest import _compare_ids, _compare_states, _losses    # noqa: E402

__all__ = ["SCORE_KINDS", "stress_scores", "draw_case", "run_stress", "main"]

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
               seed: int = 0, min_selections: int = 0, sync=None, log=print) -> dict:
    """Run the stress; return its figures (JSON-ready).

    Args:
        candidate: the implementation under test (the kernels).
        references: what its selections must equal (the torch backend).
        observe_references: what its statistics must equal (torch on the CPU, and on the GPU).
        seconds: time for the selections (observe series run after, on a fixed count).
        max_n: largest N of a selection.
        seed: seed of the cases (numpy ``default_rng``).
        min_selections: run at least this many selections even past ``seconds``.
        sync: called after every large case (``torch.cuda.synchronize`` on a GPU), so an illegal
            address is caught at the case that caused it.
        log: where progress lines go.
    """
    rng = np.random.default_rng([seed, 11])
    res: dict = {"candidate": str(candidate), "references": [str(r) for r in references],
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
                 and res["observe_heavy_mismatches"] == 0 and res["cuda_error"] is None
                 and not res["errors"] and res["selections"] > 0)
    return res


def _implementations(device: str, dry: bool):
    from gpuprune.backend import TorchBackend, get_backend
    if dry or device == "cpu":
        return (BackendImplementation(TorchBackend(torch.device("cpu"))), [NumpyReference()],
                [NumpyReference()], None)
    dev = torch.device(device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    kern = BackendImplementation(get_backend("cuda", dev, 1000))
    torch_gpu = BackendImplementation(TorchBackend(dev))
    torch_cpu = BackendImplementation(TorchBackend(torch.device("cpu")))
    return kern, [torch_gpu], [torch_cpu, torch_gpu], lambda: torch.cuda.synchronize(dev)


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
                    help="CPU: the torch backend against the numpy reference, small N")
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
          f"{res['selection_mismatches']}; observe batches: {res['observe_batches']} (mismatches "
          f"{res['observe_mismatches']}), heavy: {res['observe_heavy_batches']} (mismatches "
          f"{res['observe_heavy_mismatches']}); CUDA error: {res['cuda_error'] or 'none'}; "
          f"{res['seconds']:.1f} s")
    for line in res["first"]:
        print("  " + line)
    print("stress: " + ("OK" if res["ok"] else "FAIL"), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
