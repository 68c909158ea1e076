"""Host synchronisation on a GPU: observe() never waits for the GPU; how often plan() does.

    python scripts/gpu_check_sync.py --json sync.json       # on a GPU (about 20 s)
    python scripts/gpu_check_sync.py --dry                  # CPU: the same code paths, no GPU checks

For each backend on the GPU (the CUDA kernels, and the torch backend):

1. **observe() under** ``torch.cuda.set_sync_debug_mode("error")``: 50 batches of 128 ids (one id
   twice, one NaN loss) at N = 1e6 must run without an error, for UCB and for InfoBatch after a
   pruned plan (its rescaled loss weights are looked up per batch). The mode raises on every
   synchronising torch operation; it cannot see a synchronisation inside CuPy, hence 2.
2. **the host returns at once**: the GPU is kept busy for about 0.25 s with ``torch.cuda._sleep``,
   then 20 observe() calls are made. They must come back in under 10% of the sleep with the GPU still
   busy afterwards (``stream.query()`` False): nothing in them waited for the GPU.
3. **syncs per plan()**, every policy, after an epoch of observations: (a) the synchronising torch
   operations ``set_sync_debug_mode("warn")`` reports during ``plan(e)``, and (b) whether ``plan(e)``
   queued behind a GPU sleep came back before the sleep ended (``waits`` False) or waited for it.
   The Pruner promises at most one host synchronisation per plan (InfoBatch's kept count, or the read
   of the out-of-range-id counter, which is made through an event and is not counted by (a)).
4. **costs for the end-to-end overhead** at N = 60,000 and batch 128 (the benchmark's shape):
   observe() host time per call and GPU time per call (100 calls queued behind a sleep, between CUDA
   events), and plan() wall time per policy (host clock between device synchronisations).

``--dry`` runs 3 and 4 on the CPU (no sync checks, no GPU timings), so CI exercises this code.
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

__all__ = ["POLICIES", "make_pruner", "observe_epoch", "run", "main"]

POLICIES = ("full", "uniform", "epsilon_greedy", "ucb", "infobatch", "static")
#: policies whose observe() runs under sync debug mode "error" (InfoBatch weights the losses)
OBSERVE_POLICIES = ("ucb", "infobatch")
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


def _sync_mode_errors(pruner: gp.Pruner, g: torch.Generator, batches: int) -> str | None:
    """None if observe() ran under sync debug mode 'error', else the error."""
    n, dev = pruner.num_samples, pruner.device
    inputs = [_batch(g, n, dev) for _ in range(batches)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for ids, losses in inputs:
            pruner.observe(ids, losses)
    except RuntimeError as e:
        return _short(e, 400)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return None


def _host_return(pruner: gp.Pruner, g: torch.Generator, sleeper: _Sleeper, sleep_s: float = 0.25
                 ) -> dict:
    n, dev = pruner.num_samples, pruner.device
    inputs = [_batch(g, n, dev) for _ in range(20)]
    torch.cuda.synchronize()
    sleeper.sleep(sleep_s)
    t0 = time.perf_counter()
    for ids, losses in inputs:
        pruner.observe(ids, losses)
    host = time.perf_counter() - t0
    busy = not torch.cuda.current_stream(dev).query()
    torch.cuda.synchronize()
    return {"calls": len(inputs), "sleep_s": sleep_s, "host_s": host, "gpu_still_busy": busy,
            "ok": busy and host < 0.1 * sleep_s}


def _plan_syncs(pruner: gp.Pruner, epoch: int, sleeper: _Sleeper | None, g: torch.Generator,
                sleep_s: float = 0.25) -> dict:
    """Syncs reported during plan(epoch) (warn mode) and whether plan(epoch + 1) waited for the GPU."""
    out: dict = {}
    cuda = pruner.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                pruner.plan(epoch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        msgs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
        out["torch_syncs"] = len(msgs)
        out["sync_ops"] = sorted({m.split("\n")[0][:120] for m in msgs})
        observe_epoch(pruner, g, 20)
        torch.cuda.synchronize()
        sleeper.sleep(sleep_s)
        t0 = time.perf_counter()
        pruner.plan(epoch + 1)
        host = time.perf_counter() - t0
        busy = not torch.cuda.current_stream(pruner.device).query()
        torch.cuda.synchronize()
        out.update(host_s_behind_sleep=host, sleep_s=sleep_s, waits=not busy or host > 0.5 * sleep_s)
    else:
        pruner.plan(epoch)
        observe_epoch(pruner, g, 5)
        pruner.plan(epoch + 1)
    return out


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
    host = (time.perf_counter() - t0) / calls
    out = {"n": n, "batch": BATCH, "observe_host_us": host * 1e6}
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
        n_costs: int = 60_000) -> dict:
    """Every measurement for every backend (JSON-ready)."""
    cuda = device.type == "cuda"
    sleeper = _Sleeper() if cuda else None
    res: dict = {"device": str(device), "batch": BATCH, "n": n_sync, "backends": {}}
    if cuda:
        res["gpu"] = torch.cuda.get_device_name(device)
        res["sleep_cycles_per_s"] = sleeper.cycles_per_s
    ok = True
    for backend in backends:
        g = torch.Generator(device=device).manual_seed(0)
        r: dict = {}
        try:
            pruner = make_pruner(n_sync, "ucb", device, backend)
            r["backend"] = pruner.backend.name
            pruner.plan(0)
            observe_epoch(pruner, g, 5)
            errors = []
            for policy in OBSERVE_POLICIES:
                p = pruner if policy == "ucb" else _pruned_pruner(n_sync, policy, device,
                                                                  backend, g)
                if not cuda:                   # --dry: the same calls, without the check
                    observe_epoch(p, g, 5)
                    continue
                err = _sync_mode_errors(p, g, 50)
                if err is not None:
                    errors.append(f"{policy}: {err}")
            if cuda:
                r["observe_sync_policies"] = list(OBSERVE_POLICIES)
                r["observe_sync_error"] = "; ".join(errors) or None
                r["observe_host_return"] = _host_return(pruner, g, sleeper)
                ok &= r["observe_sync_error"] is None and r["observe_host_return"]["ok"]
            per_policy = {}
            for policy in POLICIES:
                p = make_pruner(n_sync, policy, device, backend)
                p.plan(0)
                observe_epoch(p, g, 20)
                per_policy[policy] = _plan_syncs(p, 1, sleeper, g)
            r["plan"] = per_policy
            r["costs"] = _costs(device, backend, g, sleeper, n=n_costs)
        except Exception as e:  # noqa: BLE001 - reported, and the run fails
            r["error"] = _short(e, 500)
            ok = False
        res["backends"][backend] = r
    res["ok"] = ok
    return res


def _print(res: dict) -> None:
    for backend, r in res["backends"].items():
        print(f"backend={backend} ({r.get('backend', '?')})")
        if "error" in r:
            print(f"  ERROR {r['error']}")
            continue
        if "observe_sync_error" in r:
            h = r["observe_host_return"]
            print(f"  observe under sync debug 'error': "
                  f"{'no sync' if r['observe_sync_error'] is None else 'SYNC: ' + r['observe_sync_error']}")
            print(f"  observe behind a {h['sleep_s']:.2f} s GPU sleep: {h['calls']} calls returned in "
                  f"{h['host_s'] * 1e3:.2f} ms, GPU still busy: {h['gpu_still_busy']} -> "
                  f"{'ok' if h['ok'] else 'FAIL'}")
        for policy, p in r["plan"].items():
            if "torch_syncs" in p:
                print(f"  plan() {policy:<15} torch syncs {p['torch_syncs']}, waits for the GPU: "
                      f"{p['waits']} ({p['host_s_behind_sleep'] * 1e3:.1f} ms behind a "
                      f"{p['sleep_s']:.2f} s sleep) {'; '.join(p['sync_ops'])}")
        c = r["costs"]
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
    args = ap.parse_args(argv)
    if args.dry:
        res = run(torch.device("cpu"), ["torch"], n_sync=5_000, n_costs=5_000)
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA device (use --dry on a CPU machine)")
        dev = torch.device(args.device)
        dev = torch.device("cuda", torch.cuda.current_device()) if dev.index is None else dev
        backends = ["cuda", "torch"] if gp.kernels.available(dev) else ["torch"]
        res = run(dev, backends)
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
