"""Count another checkout's plan() and observe() with this tree's cost counter: the "before" column of
``benchmarks/selection.py``'s cost table.

    git archive main | tar -x -C /tmp/main_checkout
    python benchmarks/cost_before.py /tmp/main_checkout > before.json

The checkout is imported in a subprocess (its own ``gpuprune`` and ``tests/kernel_harness``), with
this tree's ``gpuprune/kernels/cost.py`` counter. Counted as on a GPU: the checkout's torch backend
without its CPU-only numpy branches (its own non-CPU code of ``hash32``, ``orderable``, ``top_k``
and ``shuffle``), and ``Pruner.observe`` without the CPU-only id range check. The bytes of its
kernels come from their launch sequence (:func:`kernel_bytes`); those of its torch operations from
their tensor sizes. The figures in ``benchmarks/selection.py`` (``BEFORE``) were counted so on main
at 09725a3 (N = 20000, keep 0.5).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

_CHILD = r'''
import json, sys, torch
sys.path.insert(0, "tests")
src = open(sys.argv[1]).read().replace("from ._spec import CONSTANTS, PLAN_ARGS",
                                       "CONSTANTS, PLAN_ARGS = {}, ()")
cost = {}
exec(compile(src, "cost.py", "exec"), cost)
import kernel_harness as kh
import gpuprune as gp, gpuprune.keys as K, gpuprune.backend as BK, gpuprune.pruner as PR
from gpuprune.backend import KernelBackend, TorchBackend

def _hash32(index, seed):
    lo, hi = K.split_seed(seed)
    return K.fmix32(K.fmix32(index.long() ^ lo) ^ hi)

def _orderable(score):
    s = score.float()
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s) + 0.0
    b = s.view(torch.int32).long()
    return torch.where(b >= 0, b, b ^ 0x7FFFFFFF)

K.hash32, K.orderable, BK.hash32 = _hash32, _orderable, _hash32
BK.TorchBackend._top_k = lambda self, score, n, k, seed: torch.topk(
    K.composite_key(score, seed, n, self.device), k, sorted=False).indices
BK.TorchBackend.shuffle = BK.Backend.shuffle
PR.check_batch = lambda *a, **kw: None

class Log:
    def __init__(self, inner, count):
        self.inner, self.count = inner, count
    def __getattr__(self, a):
        return getattr(self.inner, a)
    def launch(self, name, grid, block, args, **kw):
        self.count.launches.append((name, grid[0], block[0], {}))
        self.count._order.append((name,))
        return self.inner.launch(name, grid, block, args, **kw)

def count(fn, ops):
    c = cost["OpCount"]()
    inner = None
    if ops is not None:
        inner, ops.runtime = ops.runtime, Log(ops.runtime, c)
    try:
        with cost["_Counter"](c, torch.device("cpu")):
            fn()
    finally:
        if ops is not None:
            ops.runtime = inner
    return c

def kernel_bytes(launches, n, k):
    """The kernels of 0.2 (typical case: a radix pass exits at once when the set is known, and
    distinct scores settle after the three score digits): the first score pass reads the score and
    writes the key word (8 B), the next two read the key word (4 B each), hash passes compute the
    hash (0 B); the compaction reads the key word (score keys) and writes k int32 in index order;
    gp_hash_index reads and writes k int64."""
    names = [l[0] for l in launches]
    score_key = names.count("gp_radix_pass") == 6
    b, passes = 0.0, 0
    for name in names:
        if name == "gp_radix_pass":
            passes += 1
            b += (8 if passes == 1 else 4 if passes <= 3 else 0) if score_key else 0
        elif name == "gp_compact":
            b += (4 if score_key else 0) + 4 * k / n
        elif name == "gp_hash_index":
            b += 16 * k / n
    return b

n = int(sys.argv[2])
out = {"plan": {}, "observe": {}}
ops = kh.harness_ops(slots=4, sm_count=3)
for policy in ("uniform", "epsilon_greedy", "ucb", "infobatch", "static", "full"):
    for which in ("kernels", "torch"):
        p = gp.Pruner(n, keep=0.5, policy=policy, seed=0, num_epochs=100, process_group=None,
                      backend="torch")
        p.backend = KernelBackend(ops) if which == "kernels" else TorchBackend(torch.device("cpu"))
        p.plan(0)
        p.observe(torch.arange(n), torch.rand(n))
        p.plan(1)
        c = count(lambda: p.plan(2), ops if which == "kernels" else None)
        kb = kernel_bytes(c.launches, n, len(p.plan(2))) if which == "kernels" else 0.0
        out["plan"][f"{policy}/{which}"] = {
            "device_ops": c.device_ops, "launches": len(c.launches), "host_reads": c.host_reads,
            "bytes_per_sample": round(c.torch_bytes / n + kb, 1), "sequence": c.sequence()}
for b in (256, 4096, 65536):
    for which in ("kernels", "torch"):
        p = gp.Pruner(max(n, b), keep=0.5, policy="ucb", seed=0, process_group=None,
                      backend="torch")
        p.backend = KernelBackend(ops) if which == "kernels" else TorchBackend(torch.device("cpu"))
        ids, x = torch.randperm(max(n, b))[:b].int(), torch.rand(b)
        p.observe(ids, x)
        c = count(lambda: p.observe(ids, x), ops if which == "kernels" else None)
        out["observe"][f"{b}/{which}"] = {
            "device_ops": c.device_ops, "launches": len(c.launches), "host_reads": c.host_reads,
            "bytes_per_element": round(c.torch_bytes / b, 1), "sequence": c.sequence()}
print(json.dumps(out, indent=1))
'''


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    checkout = Path(args[0]).resolve()
    n = args[1] if len(args) > 1 else "20000"
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(HERE / "gpuprune" / "kernels" /
                                                              "cost.py"), n],
                          cwd=checkout, env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr[-3000:])
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
