"""Host synchronisation on a GPU, counted: observe() never waits for the GPU; plan() waits once.

    python scripts/gpu_check_sync.py --json sync.json       # on a GPU (about 15 s)
    python scripts/gpu_check_sync.py --quick                # GPU, the counts only (about 5 s)
    python scripts/gpu_check_sync.py --dry                  # CPU: the same code paths, no GPU checks

A synchronisation is counted wherever the host can wait for the GPU (:class:`SyncCounter`): torch's
own (``torch.cuda.set_sync_debug_mode("warn")`` reports each synchronising operation: ``.item()``,
``nonzero``, blocking copies, ...), and every call of ``torch.cuda.Event.synchronize``,
``torch.cuda.Stream.synchronize`` and ``torch.cuda.synchronize`` (wrapped for the run), each noted
as *blocking* when the GPU had not finished what it waits for (``query()`` was False). Every call
is made with the GPU busy (behind a ``torch.cuda._sleep`` of 0.2 s), so a wait is a blocking one
and 0, 1 and 2+ synchronisations give different counts. For each backend on the GPU (the CUDA
kernels, and the torch backend):

1. **observe()**: 20 batches of 128 ids (one id twice, one NaN loss) at N = 1e6 for UCB and for
   InfoBatch after a pruned plan (its rescaled weights are looked up per batch): synchronisations
   counted (expected 0 on the kernels), the host time they took (expected well under the sleep)
   and whether the GPU was still busy after them (expected yes).
2. **plan()**, every policy, after an epoch of observations: synchronisations and blocking ones,
   and whether plan() came back before the sleep ended. Expected on the kernels: 1 blocking wait
   (the read of the invalid-id counter, through an event); InfoBatch also reads its size, so 2
   waits of which 1 blocks (the event is complete by then).
3. **costs for the end-to-end overhead** at N = 60,000 and batch 128: observe() host time per call
   and GPU time per call (100 calls queued behind a sleep, between CUDA events), and plan() wall
   time per policy (host clock between device synchronisations).

``--dry`` runs 2 and 3 on the CPU (nothing synchronises there), so CI exercises this code.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpuprune as gp                                             # noqa: E402
from gpuprune.doctor.environment import _short                    # noqa: E402

__all__ = ["POLICIES", "EXPECTED_PLAN_WAITS", "SyncCounter", "make_pruner", "observe_epoch", "run",
           "main"]

POLICIES = ("full", "uniform", "epsilon_greedy", "ucb", "infobatch", "static")
#: blocking synchronisations plan() may make on the kernels (the invalid-id counter's event)
EXPECTED_PLAN_WAITS = 1
BATCH = 128


def make_pruner(n: int, policy: str, device: torch.device, backend: str) -> gp.Pruner:
    return gp.Pruner(n, keep=0.5, policy=policy, num_epochs=1000, seed=1, device=device,
                     backend=backend, process_group=None)


def _batch(g: torch.Generator, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, n, (BATCH,), generator=g, device=device)
    ids[1] = ids[0]                                             # one id twice
    losses = torch.rand(BATCH, generator=g, device=device) * 3
    losses[2] = float("nan")
    return ids, losses


def observe_epoch(pruner: gp.Pruner, g: torch.Generator, batches: int) -> None:
    n, dev = pruner.num_samples, pruner.device
    for _ in range(batches):
        pruner.observe(*_batch(g, n, dev))


class SyncCounter:
    """Counts the host's synchronisations with the GPU while active (a context manager).

    Attributes:
        events: ``(what, blocking)`` per synchronisation: torch's own operations (``blocking`` is
            None: torch does not say) and waits on events, streams and the device.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, bool | None]] = []
        self._saved: list = []

    @property
    def count(self) -> int:
        return len(self.events)

    @property
    def blocking(self) -> int:
        """Waits that found the GPU busy, plus torch's own synchronisations."""
        return sum(1 for _, b in self.events if b is not False)

    def _wrap(self, owner, name: str, pending) -> None:
        real = getattr(owner, name)
        counter = self

        def wrapper(*args, **kwargs):
            counter.events.append((f"{getattr(owner, '__name__', 'torch.cuda')}.{name}",
                                   pending(*args)))
            return real(*args, **kwargs)

        self._saved.append((owner, name, real))
        setattr(owner, name, wrapper)

    def __enter__(self) -> "SyncCounter":
        self._wrap(torch.cuda.Event, "synchronize", lambda ev: not ev.query())
        self._wrap(torch.cuda.Stream, "synchronize", lambda st: not st.query())
        self._wrap(torch.cuda, "synchronize",
                   lambda *a: not torch.cuda.current_stream().query())
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(*exc)
        for w in self._caught:
            if "synchroniz" in str(w.message).lower():
                self.events.append(("torch: " + str(w.message).split("\n")[0][:100], None))
        for owner, name, real in reversed(self._saved):
            setattr(owner, name, real)


class _Sleeper:
    """Keeps the current CUDA stream busy for a given time (``torch.cuda._sleep`` is in cycles)."""

    def __init__(self) -> None:
        torch.cuda.synchronize()
        cycles = 20_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)                        # warm-up (first launch)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        self.cycles_per_s = cycles / (start.elapsed_time(end) / 1e3)

    def sleep(self, seconds: float) -> None:
        torch.cuda._sleep(int(self.cycles_per_s * seconds))


def _behind_a_sleep(fn, sleeper: _Sleeper, device: torch.device, sleep_s: float = 0.2) -> dict:
    """Run fn() with the GPU busy for ``sleep_s``: synchronisations counted, host time, whether
    the GPU was still busy when fn returned."""
    torch.cuda.synchronize()
    sleeper.sleep(sleep_s)
    with SyncCounter() as c:
        t0 = time.perf_counter()
        fn()
        host = time.perf_counter() - t0
    busy = not torch.cuda.current_stream(device).query()
    torch.cuda.synchronize()
    return {"syncs": c.count, "blocking": c.blocking, "ops": sorted({w for w, _ in c.events}),
            "host_s": host, "sleep_s": sleep_s, "gpu_still_busy": busy}


def _pruned_pruner(n: int, policy: str, device: torch.device, backend: str,
                   g: torch.Generator) -> gp.Pruner:
    """A Pruner of ``policy`` after one epoch of observations and a pruned plan (epoch 1)."""
    p = make_pruner(n, policy, device, backend)
    p.plan(0)
    observe_epoch(p, g, 5)
    plan = p.plan(1)
    if plan.full or (policy == "infobatch" and plan.rescaled is None):
        raise RuntimeError(f"{policy}: epoch 1 should be pruned with rescaled samples")
    return p


def _costs(device: torch.device, backend: str, g: torch.Generator, sleeper: _Sleeper | None,
           n: int = 60_000, calls: int = 100) -> dict:
    """observe() host/GPU time per call and plan() wall time per policy at the benchmark's shape."""
    cuda = device.type == "cuda"
    pruner = make_pruner(n, "ucb", device, backend)
    pruner.plan(0)
    inputs = [_batch(g, n, device) for _ in range(calls)]
    for ids, losses in inputs[:10]:                         # warm-up
        pruner.observe(ids, losses)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for ids, losses in inputs:
        pruner.observe(ids, losses)
    out = {"n": n, "batch": BATCH, "observe_host_us": (time.perf_counter() - t0) / calls * 1e6}
    if cuda:
        torch.cuda.synchronize()
        gpu = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sleeper.sleep(0.05)
            start.record()
            for ids, losses in inputs:
                pruner.observe(ids, losses)
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end) / 1e3 / calls)
        out["observe_gpu_us"] = statistics.median(gpu) * 1e6
    plans = {}
    for policy in POLICIES:
        p = make_pruner(n, policy, device, backend)
        p.plan(0)
        observe_epoch(p, g, 20)
        times = []
        for e in range(1, 6):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            p.plan(e)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        plans[policy] = {"plan_wall_us_median": statistics.median(times) * 1e6,
                         "plan_wall_us_min": min(times) * 1e6}
    out["plan"] = plans
    return out


def run(device: torch.device, backends: list[str], n_sync: int = 1_000_000,
        n_costs: int = 60_000, quick: bool = False) -> dict:
    """Every measurement for every backend (JSON-ready)."""
    cuda = device.type == "cuda"
    sleeper = _Sleeper() if cuda else None
    res: dict = {"device": str(device), "batch": BATCH, "n": n_sync, "backends": {},
                 "expected": {"observe_syncs": 0, "plan_blocking": EXPECTED_PLAN_WAITS}}
    if cuda:
        res["gpu"] = torch.cuda.get_device_name(device)
    ok = True
    for backend in backends:
        g = torch.Generator(device=device).manual_seed(0)
        r: dict = {}
        try:
            kernels = None
            for policy in ("ucb", "infobatch"):
                p = _pruned_pruner(n_sync, policy, device, backend, g)
                kernels = p.backend.name == "cuda"
                r["backend"] = p.backend.name
                inputs = [_batch(g, n_sync, device) for _ in range(20)]

                def observe_all(p=p, inputs=inputs):
                    for ids, losses in inputs:
                        p.observe(ids, losses)
                if not cuda:
                    observe_all()
                    continue
                o = _behind_a_sleep(observe_all, sleeper, device)
                o["ok"] = o["syncs"] == 0 and o["gpu_still_busy"] and o["host_s"] < 0.5 * o["sleep_s"]
                r[f"observe_{policy}"] = o
                ok &= o["ok"] or not kernels
            per_policy = {}
            for policy in POLICIES:
                p = make_pruner(n_sync, policy, device, backend)
                p.plan(0)
                observe_epoch(p, g, 20)
                if not cuda:
                    p.plan(1)
                    continue
                q = _behind_a_sleep(lambda p=p: p.plan(1), sleeper, device)
                q["ok"] = q["blocking"] <= EXPECTED_PLAN_WAITS if kernels else None
                ok &= q["ok"] is not False
                per_policy[policy] = q
            r["plan"] = per_policy
            if not quick:
                r["costs"] = _costs(device, backend, g, sleeper, n=n_costs)
        except Exception as e:  # noqa: BLE001 - reported, and the run fails
            r["error"] = _short(e, 500)
            ok = False
        res["backends"][backend] = r
    res["ok"] = ok
    return res


def _print(res: dict) -> None:
    exp = res["expected"]
    for backend, r in res["backends"].items():
        print(f"backend={backend} ({r.get('backend', '?')})")
        if "error" in r:
            print(f"  ERROR {r['error']}")
            continue
        for policy in ("ucb", "infobatch"):
            o = r.get(f"observe_{policy}")
            if o:
                print(f"  observe x20 ({policy}) behind a {o['sleep_s']:.2f} s GPU sleep: syncs "
                      f"{o['syncs']} (target {exp['observe_syncs']}), host {o['host_s'] * 1e3:.2f} ms, "
                      f"GPU still busy: {o['gpu_still_busy']} -> {'ok' if o['ok'] else 'FAIL'}")
        for policy, q in r.get("plan", {}).items():
            print(f"  plan() {policy:<15} syncs {q['syncs']}, blocking {q['blocking']} (target <= "
                  f"{exp['plan_blocking']} on the kernels), {q['host_s'] * 1e3:.1f} ms behind the "
                  f"sleep, GPU still busy after: {q['gpu_still_busy']}; {'; '.join(q['ops'])}")
        c = r.get("costs")
        if c:
            gpu = f", GPU {c['observe_gpu_us']:.2f} us" if "observe_gpu_us" in c else ""
            print(f"  observe() at N={c['n']}, batch {c['batch']}: host {c['observe_host_us']:.1f} us{gpu}")
            print("  plan() wall, median of 5 (us): " + ", ".join(
                f"{k} {v['plan_wall_us_median']:.0f}" for k, v in c["plan"].items()))
    print("sync: " + ("OK" if res["ok"] else "FAIL"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--dry", action="store_true", help="CPU: exercise the code paths only")
    ap.add_argument("--quick", action="store_true", help="the synchronisation counts only")
    args = ap.parse_args(argv)
    if args.dry:
        res = run(torch.device("cpu"), ["torch"], n_sync=5_000, n_costs=5_000, quick=args.quick)
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA device (use --dry on a CPU machine)")
        dev = torch.device(args.device)
        dev = torch.device("cuda", torch.cuda.current_device()) if dev.index is None else dev
        backends = ["cuda", "torch"] if gp.kernels.available(dev) else ["torch"]
        res = run(dev, backends, quick=args.quick)
        res["kernels_unavailable"] = gp.kernels.unavailable_reason(dev)
        if res["kernels_unavailable"]:
            res["ok"] = False
    res["dry"] = args.dry
    _print(res)
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
