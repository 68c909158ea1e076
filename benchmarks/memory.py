"""Memory of the pruning state: persistent bytes per sample, and no growth while observing.

    python benchmarks/memory.py                      # N = 1e8 on the CPU (needs about 7 GB free)
    python benchmarks/memory.py --n 1e6 --steps 2000 # quick look

Each scenario runs in a fresh subprocess, so one's freed memory cannot hide another's. For each it
reports, per sample (divided by N):

* ``tensor B/s``: the bytes of every distinct tensor storage the object keeps (the ScoreBank's
  statistics, the Pruner's selection, plan and loss-weight table), found by walking the objects;
* ``RSS B/s``: how much the process's resident memory grew from before the object was built to
  after ``plan()`` returned and ``malloc_trim`` gave freed memory back (at small N glibc keeps
  freed blocks below its mmap threshold; at N = 1e8 every large block is its own mapping);
* ``peak GB``: the process's peak resident memory (VmHWM) during construction and planning;
* over ``--steps`` calls of ``observe`` (batches of ``--batch`` random ids, after a warm-up):
  the growth of RSS and of glibc's heap in use (``mallinfo2``: where torch's CPU tensors live),
  then, over as many further steps, of Python objects (``tracemalloc``). A leak of one byte per
  step would show as ``steps`` bytes, of one batch-sized tensor as ``steps * batch * 4``.

The bank is given random statistics before planning (as after an epoch of training), so InfoBatch
keeps a realistic ``N - n_below/2`` samples. Target: at most 24 bytes per sample for the state.
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
import tracemalloc
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpuprune as gp                                     # noqa: E402

SCENARIOS = {
    # name: (what, policy, warmup_epochs, deferred)
    "ScoreBank": ("bank", None, 0, False),
    "ScoreBank deferred": ("bank", None, 0, True),
    "Pruner ucb": ("pruner", "ucb", 0, False),
    "Pruner epsilon_greedy": ("pruner", "epsilon_greedy", 0, False),
    "Pruner uniform": ("pruner", "uniform", 0, False),
    "Pruner static": ("pruner", "static", 0, False),
    "Pruner infobatch": ("pruner", "infobatch", 0, False),
    "Pruner full epoch": ("pruner", "ucb", 1, False),
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


def tensor_bytes(*objects) -> int:
    """Bytes of the distinct tensor storages reachable from the objects' attributes (one level
    into Plans, Policies and ScoreBanks), counting a storage shared by two tensors once."""
    seen: dict[int, int] = {}

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            st = value.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        elif isinstance(value, (gp.Plan, gp.Policy, gp.ScoreBank)):
            for v in vars(value).values():
                visit(v)

    for obj in objects:
        for v in vars(obj).values():
            visit(v)
    return sum(seen.values())


# ---------------------------------------------------------------- one scenario (in a subprocess)
def fill_bank(bank: gp.ScoreBank, seed: int = 0) -> None:
    """Random statistics, as after an epoch in which every sample was seen."""
    g = torch.Generator().manual_seed(seed)
    bank.mean.copy_(torch.rand(bank.num_samples, generator=g))
    bank.var.copy_(torch.rand(bank.num_samples, generator=g) * 0.1)
    bank.count.fill_(1)
    bank.last_epoch.fill_(0)


def run_scenario(name: str, n: int, steps: int, batch: int, keep: float) -> dict:
    what, policy, warmup, deferred = SCENARIOS[name]
    torch.manual_seed(0)    # only the benchmark's batches; the library never uses global RNG
    warm = gp.ScoreBank(16)
    warm.observe(torch.tensor([1, 2]), torch.tensor([1.0, 2.0]))
    rss0 = rss_bytes()
    if what == "bank":
        obj = gp.ScoreBank(n, deferred=deferred)
        fill_bank(obj)
        if deferred:
            obj.pending()
        holders = (obj,)
        observe = obj.observe
    else:
        kw = {"static_scores": None} if policy == "static" else {}
        obj = gp.Pruner(n, keep=keep, policy=policy, num_epochs=10, warmup_epochs=warmup, seed=0,
                        **kw)
        if not warmup:
            fill_bank(obj.bank)
        plan = obj.plan(0)
        del plan
        holders = (obj,)
        observe = obj.observe
    malloc_trim()
    per_sample = {"tensor": tensor_bytes(*holders) / n, "rss": (rss_bytes() - rss0) / n,
                  "peak_gb": peak_rss_bytes() / 1e9}
    if what == "pruner":
        per_sample["planned"] = len(obj._plan)

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
    per_sample.update(steps=steps, rss_growth=rss2 - rss1, tracemalloc_growth=t1 - t0,
                      heap_growth=None if heap0 is None else heap1 - heap0)
    return per_sample


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
    ap.add_argument("--one", help=argparse.SUPPRESS)   # internal: run one scenario, print JSON
    args = ap.parse_args()
    n = int(args.n)
    if args.one:
        print(json.dumps(run_scenario(args.one, n, args.steps, args.batch, args.keep)))
        return

    print(f"# gpuprune memory: N = {n:,}, keep = {args.keep}, {args.steps:,} observe steps of "
          f"{args.batch}")
    print(f"# {machine()}")
    head = (f"| {'scenario':<22} | planned | tensor B/s | RSS B/s | peak GB | "
            f"observe: RSS growth | heap growth | tracemalloc growth |")
    print(head)
    print("|" + "|".join("-" * (len(c) + 0) for c in head.split("|")[1:-1]) + "|")
    over = []
    for name in args.scenarios:
        cmd = [sys.executable, __file__, "--one", name, "--n", str(n), "--steps", str(args.steps),
               "--batch", str(args.batch), "--keep", str(args.keep)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"| {name:<22} | failed: {out.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        planned = f"{r['planned'] / n:.3f} N" if "planned" in r else "-"
        heap = "n/a" if r["heap_growth"] is None else f"{r['heap_growth']:,} B"
        print(f"| {name:<22} | {planned:>7} | {r['tensor']:>10.2f} | {r['rss']:>7.2f} | "
              f"{r['peak_gb']:>7.2f} | {r['rss_growth']:>17,} B | {heap:>11} | "
              f"{r['tracemalloc_growth']:>16,} B |", flush=True)
        if r["tensor"] > 24 + 64 / n:              # 24 B/sample plus a few scalar counters
            over.append(name)
    print(f"# over 24 B/sample (tensor bytes): {', '.join(over) if over else 'none'}")


if __name__ == "__main__":
    main()
