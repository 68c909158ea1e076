"""Memory of the pruning state: persistent bytes per sample, and no growth while observing.

    python benchmarks/memory.py                      # N = 1e8 on the CPU (needs about 7 GB free)
    python benchmarks/memory.py --n 1e6 --steps 2000 # quick look
    python benchmarks/memory.py --smoke              # seconds: N = 1e4, 50 steps, 3 scenarios (CI)

Each scenario (a policy in a phase: warm-up, pruned, final full epochs; one rank of a 2-rank gloo
group) runs in fresh subprocesses, so one's freed memory cannot hide another's. For each it reports,
per sample (divided by N):

* ``tensor B/s``: the bytes of every distinct tensor storage the object keeps (statistics, plan,
  InfoBatch's rescaled-sample bits, the observation log of a distributed Pruner), found by walking
  the objects (independently of ``Pruner.nbytes()``, which must agree);
* ``disk B/s``: the size of ``save_checkpoint(pruner.state_dict())`` (each saved id once);
* ``RSS B/s``: how much the process's resident memory grew from before the object was built to
  after ``plan()`` returned and ``malloc_trim`` gave freed memory back (at small N glibc keeps
  freed blocks below its mmap threshold; at N = 1e8 every large block is its own mapping);
* ``peak GB``: the process's peak resident memory (VmHWM) during construction and planning;
* over ``--steps`` calls of ``observe`` (batches of ``--batch`` random ids, after a warm-up):
  the growth of RSS and of glibc's heap in use (``mallinfo2``: where torch's CPU tensors live),
  then, over as many further steps, of Python objects (``tracemalloc``). A leak of one byte per
  step would show as ``steps`` bytes, of one batch-sized tensor as ``steps * batch * 4``.

The statistics are given random values before planning (as after an epoch of training), so
InfoBatch keeps a realistic ``N - n_below/2`` samples. Target: at most 24 bytes per sample for the
state, in memory and on disk.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpuprune as gp                                     # noqa: E402

SCENARIOS = {
    # name: (policy, epoch planned, ranks); warm-up is epoch 0, the final full epoch is 9 of 10
    "LossStats": (None, None, 1),
    "ucb, pruned": ("ucb", 1, 1),
    "epsilon_greedy, pruned": ("epsilon_greedy", 1, 1),
    "uniform, pruned": ("uniform", 1, 1),
    "static, pruned": ("static", 1, 1),
    "infobatch, pruned": ("infobatch", 1, 1),
    "full": ("full", 1, 1),
    "ucb, warm-up (full)": ("ucb", 0, 1),
    "infobatch, annealing (full)": ("infobatch", 9, 1),
    "ucb, 2 ranks (gloo)": ("ucb", 1, 2),
    "infobatch, 2 ranks (gloo)": ("infobatch", 1, 2),
}


# ---------------------------------------------------------------- measuring
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so RSS shows what is still in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def heap_in_use() -> int | None:
    """Bytes malloc'ed and not freed (small blocks + mmapped blocks), or None without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def tensor_bytes(obj) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj``'s attributes (recursively,
    through lists, dicts and objects), counting a storage shared by two tensors once."""
    storages: dict[int, int] = {}
    visited: set[int] = set()

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            st = value.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif hasattr(value, "__dict__") and not isinstance(value, type) and id(value) not in visited:
            visited.add(id(value))
            for v in vars(value).values():
                visit(v)

    visit(obj)
    return sum(storages.values())


# ---------------------------------------------------------------- one scenario (in a subprocess)
def fill(stats: gp.LossStats, seed: int = 0) -> None:
    """Random statistics, as after an epoch in which every sample was seen."""
    g = torch.Generator().manual_seed(seed)
    stats.mean.copy_(torch.rand(stats.num_samples, generator=g))
    stats.var.copy_(torch.rand(stats.num_samples, generator=g) * 0.1)
    stats.last_epoch.fill_(0)


def run_scenario(name: str, n: int, steps: int, batch: int, keep: float, rank: int = 0,
                 store: str | None = None) -> dict:
    policy, epoch, ranks = SCENARIOS[name]
    torch.manual_seed(0)    # only the benchmark's batches; the library never uses global RNG
    if ranks > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo", store=dist.FileStore(store, ranks), rank=rank,
                                world_size=ranks, timeout=datetime.timedelta(minutes=10))
    warm = gp.Pruner(16, policy="uniform", process_group=None)
    warm.observe(torch.tensor([1, 2]), torch.tensor([1.0, 2.0]))
    rss0 = rss_bytes()
    out: dict = {}
    if policy is None:
        obj = gp.LossStats(n)
        fill(obj)
        observe = None
    else:
        obj = gp.Pruner(n, keep=keep, policy=policy, num_epochs=10, warmup_epochs=1,
                        final_full_epochs=1 if policy != "infobatch" else None, seed=0)
        if epoch > 0:
            fill(obj.stats)
        obj.plan(epoch)
        if ranks > 1:               # fill this rank's observation log with its shard of the epoch
            sampler = gp.PrunedSampler(obj)
            sampler.set_epoch(epoch)
            shard = sampler.plan().indices
            for lo in range(0, len(shard), batch):
                ids = shard[lo:lo + batch]
                obj.observe(ids, torch.rand(len(ids)))
        out["planned"] = len(obj.current_plan)
        observe = obj.observe
    malloc_trim()
    out.update(tensor=tensor_bytes(obj) / n, rss=(rss_bytes() - rss0) / n,
               peak_gb=peak_rss_bytes() / 1e9)
    if policy is not None:
        out["nbytes"] = obj.nbytes() / n
        if ranks > 1:
            obj.synchronize()       # a checkpoint holds merged statistics
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ckpt.pt")
            gp.save_checkpoint(obj.state_dict(), path)
            out["disk"] = os.path.getsize(path) / n
    if observe is None or ranks > 1:
        out.update(steps=0, rss_growth=None, tracemalloc_growth=None, heap_growth=None)
        return out

    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, n, (batch,), generator=g), torch.rand(batch, generator=g))
               for _ in range(64)]

    def steps_of(count: int) -> None:
        for i in range(count):
            idx, loss = batches[i % len(batches)]
            observe(idx, loss)

    steps_of(200)                                  # warm-up: allocator caches, lazy buffers
    heap0, rss1 = heap_in_use(), rss_bytes()
    steps_of(steps)
    heap1, rss2 = heap_in_use(), rss_bytes()
    tracemalloc.start()                            # a second window: tracemalloc costs time
    steps_of(200)
    t0 = tracemalloc.get_traced_memory()[0]
    steps_of(steps)
    t1 = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    out.update(steps=steps, rss_growth=rss2 - rss1, tracemalloc_growth=t1 - t0,
               heap_growth=None if heap0 is None else heap1 - heap0)
    return out


def launch(name: str, n: int, args) -> dict:
    """Run one scenario in fresh processes (one per rank); rank 0's figures."""
    ranks = SCENARIOS[name][2]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--one", name, "--n", str(n), "--steps", str(args.steps),
               "--batch", str(args.batch), "--keep", str(args.keep), "--store",
               os.path.join(tmp, "store")]
        procs = [subprocess.Popen(cmd + ["--rank", str(r)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for r in range(ranks)]
        outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        err = next(e for p, (_, e) in zip(procs, outs) if p.returncode)
        raise RuntimeError(err.strip().splitlines()[-1] if err.strip() else "failed")
    return json.loads(outs[0][0].strip().splitlines()[-1])


# ---------------------------------------------------------------- driver
def machine() -> str:
    from gpuprune.bench.report import cpu_name
    cpu = cpu_name()
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB RAM"
    except OSError:
        pass
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.platform()}; "
            f"{cpu}; {os.cpu_count()} CPUs; {mem}; Python {platform.python_version()}; "
            f"torch {torch.__version__}; gpuprune {gp.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=float, default=1e8, help="samples N (default 1e8)")
    ap.add_argument("--steps", type=int, default=10_000, help="observe() steps (default 10000)")
    ap.add_argument("--batch", type=int, default=256, help="ids per observe() (default 256)")
    ap.add_argument("--keep", type=float, default=0.5, help="keep fraction (default 0.5)")
    ap.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=list(SCENARIOS),
                    metavar="NAME", help=f"subset of: {', '.join(SCENARIOS)}")
    ap.add_argument("--smoke", action="store_true",
                    help="N = 1e4, 50 steps, three scenarios: the whole table in seconds (CI)")
    ap.add_argument("--one", help=argparse.SUPPRESS)   # internal: run one scenario, print JSON
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke and not args.one:
        args.n, args.steps = 1e4, 50
        args.scenarios = ["LossStats", "infobatch, pruned", "ucb, 2 ranks (gloo)"]
    n = int(args.n)
    if args.one:
        print(json.dumps(run_scenario(args.one, n, args.steps, args.batch, args.keep, args.rank,
                                      args.store)))
        return

    print(f"# gpuprune memory: N = {n:,}, keep = {args.keep}, {args.steps:,} observe steps of "
          f"{args.batch}")
    print(f"# {machine()}")
    head = (f"| {'scenario':<28} | planned | tensor B/s | nbytes B/s | disk B/s | RSS B/s | "
            f"peak GB | observe: RSS growth | heap growth | tracemalloc growth |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    over = []
    fmt = (lambda v, unit=" B": "-" if v is None else f"{v:,}{unit}")
    for name in args.scenarios:
        try:
            r = launch(name, n, args)
        except RuntimeError as e:
            print(f"| {name:<28} | failed: {e} |")
            continue
        planned = f"{r['planned'] / n:.3f} N" if "planned" in r else "-"
        nb = f"{r['nbytes']:.2f}" if "nbytes" in r else "-"
        disk = f"{r['disk']:.2f}" if "disk" in r else "-"
        print(f"| {name:<28} | {planned:>7} | {r['tensor']:>10.2f} | {nb:>10} | {disk:>8} | "
              f"{r['rss']:>7.2f} | {r['peak_gb']:>7.2f} | {fmt(r['rss_growth']):>19} | "
              f"{fmt(r['heap_growth']):>11} | {fmt(r['tracemalloc_growth']):>18} |", flush=True)
        if max(r["tensor"], r.get("disk", 0.0)) > 24 + 4096 / n:   # + a few scalars and headers
            over.append(name)
    print(f"# over 24 B/sample (tensor bytes or disk): {', '.join(over) if over else 'none'}")


if __name__ == "__main__":
    main()
