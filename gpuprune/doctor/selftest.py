"""The self-test (observe, top-k, shuffle, plans of every policy, the DALI iterator) and the
``gpuprune doctor`` command around it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .environment import (BackendDiagnosis, FatbinEntry, _cuda_version, _probe_backend,
                          _short, collect_environment, describe_fatbin)
from .reference import BackendImplementation, Implementation, RunSpec

_F32_MAX = float(np.finfo(np.float32).max)
_M32 = 0xFFFFFFFF


# ================================================================================== random data
_SPECIALS = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39,
                      1.1754944e-38, _F32_MAX, -_F32_MAX, 1.0, -1.0], dtype=np.float32)


def _scores(kind: str, n: int, rng: np.random.Generator) -> np.ndarray | None:
    """Scores of one kind: ``none`` (no score: a uniform draw), ``random``, ``ties`` (3 values),
    ``constant``, ``special`` (NaN, +-inf, +-0, denormals, +-FLT_MAX among random values)."""
    if kind == "none":
        return None
    if kind == "random":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "ties":
        return rng.choice(np.array([0.25, 1.5, -2.0], np.float32), n)
    if kind == "constant":
        return np.full(n, 0.75, np.float32)
    s = rng.standard_normal(n).astype(np.float32)
    pick = rng.random(n) < 0.5
    s[pick] = rng.choice(_SPECIALS, int(pick.sum()))
    return s


def _losses(rng: np.random.Generator, b: int, dtype: torch.dtype, huge: bool = True) -> torch.Tensor:
    """Batch losses: mostly in [0, 5), some negative, NaN, +-inf, +-0, denormal, and (``huge``)
    some of magnitude 1e30..3e38 (float64: also 1e300, which saturates)."""
    x = (rng.random(b) * 5.0).astype(np.float64)
    u = rng.random(b)
    x[u < 0.10] = -x[u < 0.10]
    x[(u >= 0.10) & (u < 0.16)] = np.nan
    x[(u >= 0.16) & (u < 0.19)] = np.inf
    x[(u >= 0.19) & (u < 0.21)] = -np.inf
    x[(u >= 0.21) & (u < 0.25)] = rng.choice(np.array([1e-45, -1e-45, 1e-40, 2e-39, 0.0, -0.0]),
                                             int(((u >= 0.21) & (u < 0.25)).sum()))
    if huge:
        x[(u >= 0.25) & (u < 0.27)] = rng.choice(np.array([3e38, -3e38, 1e30]),
                                                 int(((u >= 0.25) & (u < 0.27)).sum()))
    if dtype == torch.float64 and huge:
        x[(u >= 0.27) & (u < 0.30)] = rng.choice(np.array([1e300, -1e300, 3.5e38]),
                                                 int(((u >= 0.27) & (u < 0.30)).sum()))
        return torch.from_numpy(x)
    return torch.from_numpy(x.astype(np.float32)).to(dtype)


def _dup_ids(rng: np.random.Generator, n: int, b: int, max_copies: int) -> torch.Tensor:
    """b ids in [0, n) in random order, about 3 copies of each on average, at most ``max_copies``."""
    distinct = rng.permutation(n)[:max(1, min(n, b // 3))]
    if b > distinct.size * max_copies:
        raise ValueError(f"cannot draw {b} ids from {distinct.size} with at most {max_copies} copies")
    pool = np.repeat(distinct, max_copies)
    return torch.from_numpy(rng.choice(pool, b, replace=False).astype(np.int64))


# ================================================================================== the self-test
@dataclass
class CheckResult:
    """One check of the self-test: its name, whether every comparison agreed, how many were made,
    and the first disagreement (or a summary)."""

    name: str
    ok: bool
    detail: str
    comparisons: int = 0
    seconds: float = 0.0


def _first_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.flatnonzero(a != b)[0])


def _bits_repr(v: np.floating) -> str:
    return f"{float(v)!r} ({np.float32(v).view(np.uint32):#010x})"


def _compare_states(a: dict, b: dict) -> str | None:
    """None when two statistics are bit-identical, else what differs."""
    for name in ("mean", "var"):
        x, y = a[name].view(np.uint32), b[name].view(np.uint32)
        if x.shape != y.shape or not np.array_equal(x, y):
            i = _first_diff(x, y)
            return (f"{name} differs at {int((x != y).sum())} of {x.size} samples; first at id {i}: "
                    f"{_bits_repr(a[name][i])} vs {_bits_repr(b[name][i])}")
    if not np.array_equal(a["last_epoch"], b["last_epoch"]):
        i = _first_diff(a["last_epoch"], b["last_epoch"])
        return f"last_epoch differs at id {i}: {a['last_epoch'][i]} vs {b['last_epoch'][i]}"
    for name in ("nonfinite", "invalid_batches"):
        if int(a[name]) != int(b[name]):
            return f"{name} differs: {int(a[name])} vs {int(b[name])}"
    return None


def _compare_ids(what: str, a: np.ndarray, b: np.ndarray) -> str | None:
    if a.shape == b.shape and np.array_equal(a, b):
        return None
    if a.shape != b.shape:
        return f"{what}: {a.size} ids vs {b.size} ids"
    i = _first_diff(a, b)
    return f"{what}: {int((a != b).sum())} of {a.size} positions differ; first at {i}: {a[i]} vs {b[i]}"


class SelfTest:
    """Compare implementations under test with references on random data, bit for bit.

    Args:
        candidates: the implementations under test (e.g. the CUDA kernels).
        references: what they must agree with (e.g. the torch reference).
        seed: seed of all random data (numpy ``default_rng``; no global RNG).
        scale: ``"small"`` (CPU: N up to ~4e3, a few seconds) or ``"gpu"`` (adds N = 1e5 and 1e6 to
            the top-k cases and a batch past the kernels' 2048-id one-block path).

    Every check stops at its first disagreement and names the two implementations and the case.
    """

    def __init__(self, candidates: Sequence[Implementation], references: Sequence[Implementation],
                 *, seed: int = 0, scale: str = "small") -> None:
        if not candidates or not references:
            raise ValueError("the self-test needs at least one candidate and one reference")
        self.candidates, self.references = list(candidates), list(references)
        self.seed, self.scale = int(seed), scale

    def pairs(self):
        for c in self.candidates:
            for r in self.references:
                if c is not r:
                    yield c, r

    def run(self) -> list[CheckResult]:
        out = []
        for name, fn in (("observe", self.check_observe), ("top_k", self.check_top_k),
                         ("shuffle", self.check_shuffle), ("plans", self.check_plans)):
            t0 = time.perf_counter()
            try:
                ok, detail, count = fn()
            except Exception as e:  # noqa: BLE001 - a crash is a failed check, with its reason
                ok, detail, count = False, f"raised {_short(e)}", 0
            out.append(CheckResult(name, ok, detail, count, time.perf_counter() - t0))
        return out

    # ---------------------------------------------------------------- observe
    def _observe_scenarios(self):
        """(N, decay, batches): each batch (ids, losses, epoch), duplicates up to 8 copies."""
        rng = np.random.default_rng([self.seed, 1])
        plans = [(1, 0.9, (1, 3, 8)), (5, 0.0, (4, 9, 30)), (300, 0.9, (1, 7, 64, 600)),
                 (300, 0.5, (64, 250)), (2000, 0.99, (128, 2500))]
        if self.scale == "gpu":
            plans.append((50_000, 0.9, (4096, 20_000)))
        dtypes = (torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16)
        for n, decay, sizes in plans:
            batches, epoch = [], 0
            for j in range(3 * len(sizes)):
                b = sizes[j % len(sizes)]
                ids = _dup_ids(rng, n, b, max_copies=8)
                batches.append((ids, _losses(rng, b, dtypes[j % len(dtypes)]), epoch))
                epoch += j % 2
            yield n, decay, batches

    def check_observe(self) -> tuple[bool, str, int]:
        count = 0
        for n, decay, batches in self._observe_scenarios():
            for cand, ref in self.pairs():
                sc, sr = cand.new_state(n), ref.new_state(n)
                bad_ids = cand.ignores_bad_batches and ref.ignores_bad_batches
                extra = [(torch.tensor([0, n + 3, 1]), torch.ones(3), 9),
                         (torch.tensor([-1]), torch.ones(1), 9)] if bad_ids else []
                for j, (ids, losses, epoch) in enumerate(batches + extra):
                    cand.observe(sc, ids, losses, decay, epoch)
                    ref.observe(sr, ids, losses, decay, epoch)
                    count += 1
                    diff = _compare_states(cand.arrays(sc), ref.arrays(sr))
                    if diff:
                        return False, (f"{cand} vs {ref}: N={n} decay={decay}, batch {j} (B="
                                       f"{ids.numel()}, {losses.dtype}, epoch {epoch}): {diff}"), count
        return True, f"{count} batches (duplicate ids, NaN/+-inf/+-0/denormal/huge losses) identical", count

    # ---------------------------------------------------------------- top-k
    def _top_k_cases(self):
        rng = np.random.default_rng([self.seed, 2])
        sizes = [1, 2, 3, 17, 256, 1000, 4099]
        kinds = ["none", "random", "ties", "constant", "special"]
        for n in sizes:
            for kind in kinds:
                score = _scores(kind, n, rng)
                ks = sorted({0, 1 % (n + 1), n // 2, max(n - 1, 0), n, int(rng.integers(0, n + 1))})
                for k in ks:
                    yield n, k, kind, score, int(rng.integers(0, 2**63))
        if self.scale == "gpu":
            for n in (100_000, 1_000_000):
                for kind in ("none", "ties", "special"):
                    score = _scores(kind, n, rng)
                    for k in (1, n // 2, n - 1):
                        yield n, k, kind, score, int(rng.integers(0, 2**63))

    def check_top_k(self) -> tuple[bool, str, int]:
        count, largest = 0, 0
        for n, k, kind, score, seed in self._top_k_cases():
            largest = max(largest, n)
            t = None if score is None else torch.from_numpy(score)
            results = {}
            for impl in self.candidates + self.references:
                results[id(impl)] = impl.top_k(t, n, k, seed)
            for cand, ref in self.pairs():
                count += 1
                diff = _compare_ids("sets differ", results[id(cand)], results[id(ref)])
                if diff:
                    return False, f"{cand} vs {ref}: N={n} k={k} scores={kind} seed={seed}: {diff}", count
        return True, (f"{count} exact-k selections (N 1..{largest}, ties, NaN/+-inf/+-0/denormals) "
                      f"identical"), count

    # ---------------------------------------------------------------- shuffle
    def check_shuffle(self) -> tuple[bool, str, int]:
        rng = np.random.default_rng([self.seed, 3])
        count = 0
        for n in (1, 2, 5, 100, 4097):
            for _ in range(3):
                ids = rng.permutation(n * 3)[:n].astype(np.int64)
                seed = int(rng.integers(0, 2**63))
                other = torch.from_numpy(rng.permutation(ids))       # same set, other order
                for cand, ref in self.pairs():
                    count += 1
                    a = cand.shuffle(torch.from_numpy(ids), seed)
                    b = ref.shuffle(other, seed)
                    diff = _compare_ids("orders differ", a, b)
                    if diff:
                        return False, f"{cand} vs {ref}: {n} ids, seed={seed}: {diff}", count
        return True, f"{count} shuffles identical (the order depends only on the set and the seed)", count

    # ---------------------------------------------------------------- plans
    def _run_specs(self) -> list[RunSpec]:
        rng = np.random.default_rng([self.seed, 4])
        static_scores = tuple(float(v) for v in _scores("special", 300, rng))
        s = self.seed
        return [
            RunSpec("full", 300, 1.0, 3, seed=s + 1),
            RunSpec("uniform", 300, 0.5, 5, warmup_epochs=1, seed=s + 2),
            RunSpec("epsilon_greedy", 300, 0.3, 5, seed=s + 3, settings=(("epsilon", 0.25),)),
            RunSpec("ucb", 300, 0.5, 5, seed=s + 4),
            RunSpec("ucb", 1000, 0.5, 4, seed=s + 5, decay=0.5,
                    settings=(("c", 2.0), ("uncertainty", "var"))),
            RunSpec("ucb", 300, 0.5, 5, seed=s + 9, settings=(("drift", 0.5),)),
            RunSpec("infobatch", 300, 0.5, 8, seed=s + 6),
            RunSpec("infobatch", 300, 0.05, 4, seed=s + 10, decay=0.9),
            RunSpec("static", 300, 0.5, 4, warmup_epochs=1, seed=s + 7),
            RunSpec("static", 300, 0.4, 3, seed=s + 8, settings=(("scores", static_scores),)),
        ]

    def check_plans(self) -> tuple[bool, str, int]:
        count = 0
        specs = self._run_specs()
        for spec in specs:
            for cand, ref in self.pairs():
                rc, rr = cand.start(spec), ref.start(spec)
                rng = np.random.default_rng([self.seed, 5, spec.seed])
                for epoch in range(spec.num_epochs):
                    (oc, wc), (orr, wr) = rc.plan(epoch), rr.plan(epoch)
                    count += 1
                    where = f"{cand} vs {ref}: {spec.label()}, epoch {epoch}"
                    diff = _compare_ids("plans differ", oc, orr)
                    if diff:
                        return False, f"{where}: {diff}", count
                    if not np.array_equal(wc.view(np.uint32), wr.view(np.uint32)):
                        i = _first_diff(wc, wr)
                        return False, (f"{where}: loss weights differ at plan entry {i} (id {oc[i]}): "
                                       f"{wc[i]} vs {wr[i]}"), count
                    for s in range(0, oc.size, 64):           # the epoch's batches, losses random
                        ids = torch.from_numpy(oc[s:s + 64].copy())
                        if s == 0 and ids.numel() > 1:
                            ids = torch.cat([ids, ids[:1]])     # one id twice in a batch
                        # no huge losses here: a float64 sum over values of +-3e38 and of 1 keeps
                        # only rounding error, so InfoBatch's mean would depend on summation order
                        losses = _losses(rng, ids.numel(), torch.float32, huge=False)
                        rc.observe(ids, losses)
                        rr.observe(ids, losses)
                diff = _compare_states(rc.arrays(), rr.arrays())
                if diff:
                    return False, f"{cand} vs {ref}: {spec.label()}, statistics after the run: {diff}", count
        policies = sorted({s.policy for s in specs})
        return True, f"{count} plans of {', '.join(policies)} identical (order and loss weights)", count


# ================================================================================== DALI
def check_dali(seed: int = 0) -> CheckResult:
    """:class:`~gpuprune.dali.PrunedDALIIterator` on a tiny CPU pipeline: for two epochs of two
    policies, the batches cover the plan exactly once, in plan order, and each sample's data and
    label are those of its id."""
    t0 = time.perf_counter()
    try:
        import gpuprune as gp
        from ..dali import ArraySource, build_iterator
    except Exception as e:  # noqa: BLE001
        return CheckResult("dali", True, f"skipped: DALI is not usable ({_short(e, 120)})", 0,
                           time.perf_counter() - t0)
    n, bs = 203, 16
    x = (np.arange(n, dtype=np.int32)[:, None] * np.array([1, -3], np.int32))   # sample i: [i, -3i]
    y = (np.arange(n, dtype=np.int64) * 7 + 1)
    count = 0
    try:
        for policy in ("uniform", "ucb"):
            pruner = gp.Pruner(n, keep=0.3, policy=policy, seed=seed, process_group=None)
            it = build_iterator(pruner, ArraySource(x, y), batch_size=bs, num_threads=1)
            for epoch in range(2):
                it.set_epoch(epoch)
                got, data, labels = [], [], []
                for (b,) in it:
                    got.append(b["index"].numpy().astype(np.int64))
                    data.append(b["data"].numpy())
                    labels.append(b["label"].numpy().reshape(-1))
                    if policy == "ucb":
                        pruner.observe(b["index"], torch.from_numpy(labels[-1] % 5).float())
                ids = np.concatenate(got)
                plan = pruner.plan(epoch).indices.numpy().astype(np.int64)
                count += 1
                where = f"{policy} epoch {epoch}"
                if not np.array_equal(ids, plan):
                    return CheckResult("dali", False, f"{where}: the iterator served {ids.size} ids, "
                                       f"not the plan's {plan.size} in order "
                                       f"({np.setdiff1d(plan, ids).size} planned ids missing)",
                                       count, time.perf_counter() - t0)
                if not (np.array_equal(np.concatenate(data), x[ids])
                        and np.array_equal(np.concatenate(labels), y[ids])):
                    return CheckResult("dali", False, f"{where}: a batch's data or labels are not "
                                       "those of its ids", count, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        return CheckResult("dali", False, f"raised {_short(e)}", count, time.perf_counter() - t0)
    return CheckResult("dali", True, f"PrunedDALIIterator on a CPU pipeline: {count} epochs, each "
                       "planned sample exactly once, in plan order, with its own data and label",
                       count, time.perf_counter() - t0)


# ================================================================================== the command
def _default_candidates(device: torch.device, diagnosis: BackendDiagnosis) -> list[Implementation]:
    from ..backend import TorchBackend, get_backend
    if device.type != "cuda":
        return [BackendImplementation(TorchBackend(device))]
    out: list[Implementation] = []
    if diagnosis.backend == "cuda":
        out.append(BackendImplementation(get_backend("cuda", device, 1000)))
    out.append(BackendImplementation(TorchBackend(device)))
    return out


def _default_references(device: torch.device, candidates: Sequence[Implementation]
                        ) -> list[Implementation]:
    """What can differ on a user's machine is checked against the torch reference: the torch
    backend without its numpy paths (the operations a GPU runs), on the CPU. On the CPU it is the
    reference of the torch backend's numpy paths (which depend on the installed numpy and torch);
    on a GPU also of the kernels (CuPy, NVRTC or the fatbin, the driver) and of the torch backend on
    the GPU, and the torch backend on the same GPU is a second reference of the kernels (the very
    object under test as a candidate too, so it is not compared with itself)."""
    from ..backend import TorchBackend
    refs: list[Implementation] = [BackendImplementation(
        TorchBackend(torch.device("cpu"), cpu_fast_paths=False), name="torch reference (cpu)")]
    if device.type == "cuda":
        same = [c for c in candidates if isinstance(c, BackendImplementation)
                and c.backend.name == "torch" and c.device == device]
        refs[:0] = same[:1]
    return refs


def _resolve(device: str) -> torch.device:
    from .._checks import resolve_device
    if device == "auto":
        return resolve_device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_device(device)


def run_doctor(device: str = "auto", *, seed: int = 0, dali: bool = True,
               require_kernels: bool = False, json_path: str | Path | None = None,
               candidates: Sequence[Implementation] | None = None,
               references: Sequence[Implementation] | None = None,
               out: Callable[[str], None] | None = None) -> int:
    """Run the doctor; return its exit status (0 all agree, 1 otherwise).

    Args:
        device: ``"auto"`` (CUDA when torch sees it, else the CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``.
        seed: seed of the random test data.
        dali: run the DALI check when DALI is installed.
        require_kernels: fail unless ``backend="auto"`` runs the CUDA kernels (for GPU machines).
        json_path: write every fact and check there as JSON.
        candidates, references: replace the implementations compared (default: the backend(s) of
            the device under test, and the references described in the module docstring).
        out: where lines go (default: print to stdout).
    """
    say = out if out is not None else (lambda line: print(line, flush=True))
    t_start = time.perf_counter()
    report: dict[str, Any] = {"result": "fail", "reason": None}
    try:
        reason = _examine(report, say, device, seed=seed, dali=dali,
                          require_kernels=require_kernels, candidates=candidates,
                          references=references)
    except Exception as e:  # noqa: BLE001 - the doctor's own failure is a failed check too
        reason = f"the doctor could not finish: {_short(e)}"
    seconds = time.perf_counter() - t_start
    report["seconds"] = seconds
    if reason is None:
        report["result"] = "ok"
        n = sum(c["comparisons"] for c in report["checks"])
        say(f"gpuprune doctor: OK: {', '.join(report['candidates'])} bit-identical to "
            f"{', '.join(report['references'])} ({n} comparisons, {seconds:.1f} s)")
    else:
        report["reason"] = reason
        say(f"gpuprune doctor: FAIL: {reason}")
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if reason is None else 1


def _examine(report: dict, say: Callable[[str], None], device: str, *, seed: int, dali: bool,
             require_kernels: bool, candidates: Sequence[Implementation] | None,
             references: Sequence[Implementation] | None) -> str | None:
    """Everything :func:`run_doctor` prints before its verdict; fills ``report``; returns the
    reason of the first failure, or None."""
    reason = None
    try:
        dev = _resolve(device)
    except ValueError as e:
        return str(e)
    env = collect_environment(dev)
    report["environment"] = asdict(env)
    say(f"gpuprune doctor {env.gpuprune}")
    say(f"  python   {env.python} ({env.platform}) | torch {env.torch} (CUDA "
        f"{env.torch_cuda or 'none'}) | numpy {env.numpy}")
    cupy = (f"CuPy {env.cupy} (CUDA runtime {_cuda_version(env.cuda_runtime)}, NVRTC "
            f"{env.nvrtc or 'missing'})" if env.cupy else f"CuPy missing ({env.cupy_error})")
    dali_v = f"DALI {env.dali}" if env.dali else "DALI not installed"
    say(f"  cuda     {cupy} | {dali_v} | driver "
        f"{'CUDA ' + _cuda_version(env.driver) if env.driver else 'none found'}")
    if dev.type == "cuda":
        say(f"  device   {dev}: {env.gpu_name}, compute capability {env.capability[0]}."
            f"{env.capability[1]}, {env.sm_count} SMs, {env.memory_gib:.0f} GiB")
    else:
        say(f"  device   cpu ({'CUDA available but not asked for' if env.cuda_available else env.cuda_reason})")
    diagnosis, actual, facts = _probe_backend(env, dev)
    report["backend"] = {**asdict(diagnosis), "get_backend": actual, **facts}
    if facts["fatbin"]:
        say(f"  fatbin   {facts['fatbin']}: "
            + (describe_fatbin([FatbinEntry(**e) for e in facts["fatbin_entries"]])
               if facts["fatbin_error"] is None else f"unreadable ({facts['fatbin_error']})"))
    say(f"  backend  auto -> {'CUDA kernels' if diagnosis.backend == 'cuda' else 'torch'} on {dev}"
        f" ({'seen' if diagnosis.observed else 'predicted'}): {diagnosis.reason}")
    if diagnosis.backend == "torch" and dev.type == "cuda" or diagnosis.backend == "cuda":
        say(f"           fatbin: {diagnosis.fatbin.why}; NVRTC: {diagnosis.source.why}")
    expected = "cuda" if diagnosis.backend == "cuda" else "torch"
    if actual != expected:
        reason = (f"backend='auto' returned the {actual} backend but the diagnosis says {expected}: "
                  f"{diagnosis.reason}")
    elif require_kernels and diagnosis.backend != "cuda":
        reason = f"--require-kernels: backend='auto' does not run the CUDA kernels: {diagnosis.reason}"

    cands = list(candidates) if candidates is not None else _default_candidates(dev, diagnosis)
    refs = list(references) if references is not None else _default_references(dev, cands)
    say(f"self-test: {', '.join(map(str, cands))} vs {', '.join(map(str, refs))}")
    scale = "gpu" if dev.type == "cuda" else "small"
    checks = SelfTest(cands, refs, seed=seed, scale=scale).run()
    if dali:
        checks.append(check_dali(seed))
    for c in checks:
        say(f"  {'ok  ' if c.ok else 'FAIL'} {c.name:<8} {c.detail} [{c.seconds:.1f} s]")
    report["checks"] = [asdict(c) for c in checks]
    failed = [c for c in checks if not c.ok]
    if failed and reason is None:
        reason = f"{failed[0].name}: {failed[0].detail}"
    report.update(candidates=[str(c) for c in cands], references=[str(r) for r in refs])
    return reason


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The doctor's options (shared by ``gpuprune doctor`` and ``python -m gpuprune.doctor``)."""
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when torch sees a GPU, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random test data")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write every fact and check to this JSON file")
    parser.add_argument("--require-kernels", action="store_true",
                        help="fail unless backend='auto' runs the CUDA kernels (for GPU machines)")
    parser.add_argument("--no-dali", action="store_true", help="skip the DALI iterator check")


def run_from_args(args: argparse.Namespace) -> int:
    """Run with parsed :func:`add_arguments` options; a ``--json`` path that cannot be written is a
    usage error (status 2) before anything runs, not a traceback after the self-test."""
    if args.json is not None:
        folder = args.json.parent
        if args.json.is_dir() or str(args.json).endswith(("/", "\\")):
            print(f"gpuprune doctor: error: --json {str(args.json)!r} names a directory; give a file "
                  f"path such as {str(args.json / 'doctor.json')!r}", file=sys.stderr)
            return 2
        if not folder.is_dir():
            print(f"gpuprune doctor: error: --json {str(args.json)!r}: its directory "
                  f"{str(folder)!r} does not exist", file=sys.stderr)
            return 2
    return run_doctor(args.device, seed=args.seed, dali=not args.no_dali,
                      require_kernels=args.require_kernels, json_path=args.json)


def main(argv: list[str] | None = None) -> int:
    """``python -m gpuprune.doctor [options]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="gpuprune doctor", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))
