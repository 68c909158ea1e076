"""Cost of keeping pruning state in step across ranks: the per-epoch merge next to the plan itself.

    python benchmarks/distributed.py                       # starts 2 CPU ranks (gloo) itself
    python benchmarks/distributed.py --sizes 1e5 1e6 --reps 5 --world 2
    torchrun --nproc_per_node=8 benchmarks/distributed.py  # GPUs: NCCL, device cuda:LOCAL_RANK
    python benchmarks/distributed.py --smoke               # seconds: N = 1e4, 2 epochs (CI)

A distributed Pruner adds, once per epoch: a fixed-size header exchange (an all-gather of 10 int64
per rank), an all-gather of every rank's observation log (an int32 id and a float32 loss per
observed sample: 8 bytes per sample of the epoch), one update of a copy of the statistics with the
gathered observations, and a second header exchange carrying the plan's
fingerprint. Each repetition observes one epoch of losses on every rank (not timed), then times
``sampler.set_epoch(epoch)`` (which plans) with the merge and the verification timed separately, so all three are
measured in the same call. For comparison it also times the plan of a single-process Pruner given
the same merged statistics, and a bare all-gather of the same amount of data. Medians over
``--reps`` epochs, seconds, rank 0's clock (the ranks wait for each other in the collectives).

Correctness first: every repetition checks that all ranks hold the same plan and that the
single-process Pruner given the merged statistics plans the same epoch identically.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpuprune as gp                                     # noqa: E402
from gpuprune.keys import hash32                          # noqa: E402

# a timing harness plans epochs it never trains: the coverage guard has nothing to report
warnings.filterwarnings("ignore", category=gp.CoverageWarning)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, sink: list):
    def wrapper(*a, **kw):
        _sync(device)
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        _sync(device)
        sink.append(time.perf_counter() - t0)
        return out
    return wrapper


def _losses(idx: torch.Tensor, epoch: int) -> torch.Tensor:
    return (hash32(idx, 77 + epoch).double() / 2.0**32 * (1 + (idx + epoch) % 5)).float()


def run_size(n: int, reps: int, policy: str, device: torch.device, rank: int, world: int) -> dict:
    pruner = gp.Pruner(n, keep=0.5, policy=policy, num_epochs=reps + 2, warmup_epochs=1, seed=1,
                       device=device)
    sync = pruner._sync             # the benchmark times the Pruner's EpochSync from outside
    t_merge, t_verify = [], []
    sync.merge = _timed(sync.merge, device, t_merge)
    sync.verify = _timed(sync.verify, device, t_verify)
    sampler = gp.PrunedSampler(pruner)
    single = gp.Pruner(n, keep=0.5, policy=policy, num_epochs=reps + 2, warmup_epochs=1, seed=1,
                       device=device, process_group=None)
    per_rank = -(-gp.budget(0.5, n) // world)          # this rank's log: 8 B per observed sample
    buf = torch.zeros(2 * per_rank, dtype=torch.float32, device=device)
    gathered = [torch.empty_like(buf) for _ in range(world)]
    rows = {"total": [], "merge": [], "verify": [], "plan": [], "single": [], "allgather": []}
    for epoch in range(reps + 1):
        del t_merge[:], t_verify[:]
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)                          # plans: merge, select, verify
        _sync(device)
        total = time.perf_counter() - t0
        plan = pruner.current_plan
        # a single-process Pruner given the merged statistics must plan the same epoch
        if epoch > 0:
            for name in ("mean", "var", "last_epoch"):
                getattr(single.stats, name).copy_(getattr(pruner.stats, name))
            _sync(device)
            t1 = time.perf_counter()
            sp = single.plan(epoch)
            _sync(device)
            rows["single"].append(time.perf_counter() - t1)
            assert torch.equal(sp.indices, plan.indices), "single-process plan differs"
        # a bare all-gather of the same amount of data
        dist.barrier()
        _sync(device)
        t2 = time.perf_counter()
        dist.all_gather(gathered, buf)
        _sync(device)
        t_ag = time.perf_counter() - t2
        if epoch > 0:        # epoch 0 warms up (allocations, gloo connections)
            rows["total"].append(total)
            rows["merge"].append(t_merge[0] if t_merge else 0.0)
            rows["verify"].append(t_verify[0])
            rows["plan"].append(total - t_merge[0] - t_verify[0])
            rows["allgather"].append(t_ag)
        shard = torch.tensor(list(sampler), dtype=torch.long, device=device)
        for i in range(0, shard.numel(), 8192):
            b = shard[i:i + 8192]
            pruner.observe(b, _losses(b, epoch))
    return {k: statistics.median(v) for k, v in rows.items()}


def worker(args) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available() and not args.cpu
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    timeout = datetime.timedelta(seconds=300)
    store_path = os.environ.get("GPUPRUNE_BENCH_STORE")
    if store_path:
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                                world_size=world, timeout=timeout)
    else:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    if rank == 0:
        dev = torch.cuda.get_device_name(device) if cuda else (platform.processor() or
                                                                platform.machine())
        print(f"machine: {platform.node()} {platform.platform()}; {dev}; "
              f"{os.cpu_count()} logical CPUs; {world} ranks, backend {dist.get_backend()}, "
              f"torch threads per rank {torch.get_num_threads()}")
        print(f"versions: python {platform.python_version()}, torch {torch.__version__}, "
              f"numpy {np.__version__}, gpuprune {gp.__version__}")
        print(f"policy {args.policy}, keep 0.5, medians of {args.reps} epochs, milliseconds\n")
        print(f"{'N':>9} {'allgather(8 B x shard)':>23} {'merge':>8} {'plan':>8} {'verify':>8} "
              f"{'total':>8} {'single-process plan':>20} {'total/single':>13}")
    for size in args.sizes:
        n = int(float(size))
        r = run_size(n, args.reps, args.policy, device, rank, world)
        if rank == 0:
            ms = {k: 1e3 * v for k, v in r.items()}
            print(f"{n:>9} {ms['allgather']:>23.2f} {ms['merge']:>8.2f} {ms['plan']:>8.2f} "
                  f"{ms['verify']:>8.2f} {ms['total']:>8.2f} {ms['single']:>20.2f} "
                  f"{r['total'] / r['single']:>12.2f}x", flush=True)
    dist.destroy_process_group()


def launch(args) -> int:
    """Start ``--world`` CPU ranks of this script on localhost (gloo, FileStore rendezvous)."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for r in range(args.world):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(args.world), LOCAL_RANK=str(r),
                       GPUPRUNE_BENCH_STORE=str(Path(tmp) / "store"), OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen([sys.executable, __file__, "--cpu", *sys.argv[1:]],
                                          env=env))
        return max(p.wait() for p in procs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["1e5", "1e6"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--world", type=int, default=2, help="ranks to start when not under torchrun")
    ap.add_argument("--policy", default="ucb", choices=sorted(gp.POLICIES))
    ap.add_argument("--cpu", action="store_true", help="use CPU tensors and gloo even with CUDA")
    ap.add_argument("--smoke", action="store_true", help="N = 1e4, 2 epochs: seconds (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.reps = ["1e4"], 2
    if "RANK" in os.environ:
        worker(args)
    else:
        sys.exit(launch(args))


if __name__ == "__main__":
    main()
