"""The cost model of plan() and observe(), counted on any machine (the CPU included).

What a GPU pays for an operation that moves little data is mostly its launch; for one that moves much,
its bytes. Both can be counted without a GPU:

* **device operations**: every torch operation an entry point issues (counted with a
  ``TorchDispatchMode``; views, allocations and the host-side seed draws from a CPU generator are not
  device work) plus every kernel launch (counted at the runtime, so the concurrency harness counts
  the launches a GPU would get);
* **host reads**: operations that bring a device value to the host (``.item()``, ``int()``, a copy to
  the CPU): each is a synchronisation on a GPU;
* **bytes per sample**: for a torch operation, the sizes of its tensor inputs and outputs (of an
  indexing operation's first operand only the part it touches: the size of its largest other
  tensor); for a kernel, :func:`plan_bytes` / :func:`observe_bytes`, computed from the launch's
  arguments (what the kernel reads and writes in global memory, per sample).

:func:`h100_estimate` turns the counts into a time with stated constants: it is an *estimate*, not a
measurement. ``benchmarks/selection.py`` prints the table; ``tests/test_kernel_cost.py`` keeps the
launch budgets (plan() <= 8 device operations, observe() <= 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ._spec import CONSTANTS, PLAN_ARGS

__all__ = ["OpCount", "count_ops", "plan_bytes", "plan_barriers", "observe_bytes", "h100_estimate",
           "LAUNCH_US", "BARRIER_US", "HBM_BYTES_PER_S", "SECTOR_BYTES", "BUDGET_PLAN",
           "BUDGET_OBSERVE"]

#: assumed cost of one device operation on an H100 (host launch + GPU gap of a small kernel), us
LAUNCH_US = 4.0
#: assumed cost of one grid barrier inside gp_plan (an atomic round trip through L2), us
BARRIER_US = 1.5
#: assumed HBM bandwidth of an H100 (docs: ~3.0 TB/s measured device-to-device)
HBM_BYTES_PER_S = 3.0e12
#: a scattered 4-byte access costs one 32-byte sector
SECTOR_BYTES = 32
#: the launch budgets the tests keep
BUDGET_PLAN = 8
BUDGET_OBSERVE = 2

_ALLOC = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
          "aten.new_empty.default", "aten.new_empty_strided.default"}
_HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default"}
#: operations that touch only part of their first operand (its indexed elements)
_INDEXED = ("aten.index.", "aten.index_put", "aten.index_add", "aten.index_select",
            "aten.index_fill", "aten.gather.", "aten.scatter", "aten.masked_scatter",
            "aten.take.")
_C = CONSTANTS


@dataclass
class OpCount:
    """What one call issued.

    Attributes:
        torch_ops: names of the torch operations counted as device work, in order.
        launches: ``(kernel, grid, block, args by name)`` of each kernel launch.
        host_reads: device values read on the host (synchronisations on a GPU).
        torch_bytes: bytes the torch operations read and wrote (tensor sizes).
    """

    torch_ops: list[str] = field(default_factory=list)
    launches: list[tuple[str, int, int, dict]] = field(default_factory=list)
    host_reads: int = 0
    torch_bytes: int = 0

    @property
    def device_ops(self) -> int:
        """Torch operations plus kernel launches."""
        return len(self.torch_ops) + len(self.launches)

    def sequence(self) -> list[str]:
        """The launch sequence: kernel names and torch operations, in the order issued."""
        return [x if isinstance(x, str) else x[0] for x in self._order]

    _order: list = field(default_factory=list, repr=False)


class _Counter(TorchDispatchMode):
    def __init__(self, count: OpCount, device: torch.device) -> None:
        super().__init__()
        self.count, self.device = count, device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if func.is_view or name in _ALLOC or "generator" in kwargs:
            return out
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        tensors += [t for t in outs if isinstance(t, torch.Tensor)]
        if not any(t.device == self.device or (t.device.type == self.device.type
                                               and self.device.index is None) for t in tensors):
            return out
        c = self.count
        c.torch_ops.append(name)
        c._order.append(name)
        sizes = [t.numel() * t.element_size() for t in tensors]
        if name.startswith(_INDEXED) and args and isinstance(args[0], torch.Tensor):
            # the indexed operand (and an in-place result) counts only its touched part
            base = args[0].untyped_storage().data_ptr()
            other = [b for t, b in zip(tensors, sizes) if t.untyped_storage().data_ptr() != base]
            sizes = other + [max(other, default=0)]
        c.torch_bytes += sum(sizes)
        if name in _HOST_READS or (name in ("aten._to_copy.default", "aten.copy_.default")
                                   and any(t.device.type == "cpu" for t in tensors)
                                   and self.device.type != "cpu"):
            c.host_reads += 1
        return out


class _LaunchLog:
    """Wraps a kernel runtime and records every launch with its arguments by name."""

    def __init__(self, inner, count: OpCount) -> None:
        self.inner, self.count = inner, count

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def launch(self, name, grid, block, args, cooperative=False):
        names = ([n for n, _ in PLAN_ARGS] if name == "gp_plan" else
                 ["idx64", "idx32", "x", "B", "N"] + [f"a{i}" for i in range(len(args) - 5)])
        rec = (name, grid[0], block[0], dict(zip(names, args)))
        self.count.launches.append(rec)
        self.count._order.append(rec)
        return self.inner.launch(name, grid, block, args, cooperative=cooperative)


def count_ops(fn: Callable[[], Any], device: torch.device | str, ops=None) -> OpCount:
    """Run ``fn()`` and count what it issued on ``device``: torch operations (a dispatch mode) and,
    when ``ops`` (a :class:`~gpuprune.kernels.KernelOps`) is given, its kernel launches."""
    count = OpCount()
    device = torch.device(device)
    inner = None
    if ops is not None:
        inner, ops.runtime = ops.runtime, _LaunchLog(ops.runtime, count)
    try:
        with _Counter(count, device):
            fn()
    finally:
        if ops is not None:
            ops.runtime = inner
    # the runtime's own torch calls (none today) would be counted above; launches are separate
    return count


def plan_bytes(args: dict, *, worst: bool = False) -> float:
    """Global-memory bytes per sample of one gp_plan launch, from its arguments.

    Typical case (``worst=False``): after the first two radix passes the candidate lists hold a
    negligible share of the samples (distinct scores); ``worst=True``: every pass of the selection
    reads every sample (all scores tied, as at epoch 0). Scattered 4-byte accesses (the shuffled
    writes of the plan, the bits of given ids) count one 32-byte sector each.
    """
    n, k, mode, flags = args["n"], args["k"], args["mode"], args["flags"]
    explore, nids, prev = args["explore"], args["nids"], args["prev_size"]
    full, by_ids = flags & _C["GP_PLAN_FULL"], flags & _C["GP_PLAN_IDS"]
    select = not full and not by_ids
    b = 0.0
    # phase 0: the bitmaps (scattered atomics), the drift scale / the mean (two arrays each)
    b += SECTOR_BYTES * (nids + (prev if args["prev"] is not None else 0)) / n
    scored = select and mode != _C["GP_SCORE_HASH"]
    if select and mode in (_C["GP_SCORE_UCB_STD"], _C["GP_SCORE_UCB_VAR"]) and args["p1"] > 0:
        b += 8
    if select and mode == _C["GP_SCORE_BELOW_MEAN"]:
        b += 8
    if select:
        inputs = {_C["GP_SCORE_HASH"]: 0, _C["GP_SCORE_MEAN"]: 8, _C["GP_SCORE_UCB_STD"]: 12,
                  _C["GP_SCORE_UCB_VAR"]: 12, _C["GP_SCORE_BELOW_MEAN"]: 8,
                  _C["GP_SCORE_GIVEN"]: 4}[mode]
        b += inputs + (4 if scored else 0)                   # pass 1: inputs, the key word
        word = 4 if scored else 0                            # later passes re-read the key word
        passes = (6 if scored else 3) - 1
        b += word + (passes - 1) * (word + 4) * (1.0 if worst else 0.0)   # pass 2, then lists
        if explore:
            b += 2 * word + (1 * (word + 4) if worst else 0.0)
    # count and write: the key words twice, the bitmaps, the counts, the plan's ids
    b += 2 * (4 if scored else 0) + (2 / 8 if by_ids else 0) + (2 / 8 if args["prev"] is not None else 0)
    if flags & _C["GP_PLAN_COUNT"]:
        b += 8
    if flags & _C["GP_PLAN_BELOW"]:
        b += 1 / 8
    size = n if full else nids if by_ids else k
    b += (SECTOR_BYTES if flags & _C["GP_PLAN_SHUFFLE"] else 4) * size / n
    return b


def plan_barriers(args: dict, *, worst: bool = False) -> int:
    """Grid barriers of one gp_plan launch: the preparation phase, one per radix pass (typically
    the selection is settled after three digits; at worst all six, three for a hash key, run), the
    count and the end."""
    flags, mode = args["flags"], args["mode"]
    select = not flags & (_C["GP_PLAN_FULL"] | _C["GP_PLAN_IDS"])
    prep = flags & _C["GP_PLAN_IDS"] or (args["prev"] is not None) or (select and (
        mode == _C["GP_SCORE_BELOW_MEAN"] or (mode in (_C["GP_SCORE_UCB_STD"],
                                                       _C["GP_SCORE_UCB_VAR"]) and args["p1"] > 0)))
    passes = 0
    if select:
        passes = (6 if mode != _C["GP_SCORE_HASH"] else 3) if worst else 3
        passes += 3 if args["explore"] else 0
    return int(bool(prep)) + passes + 2


def observe_bytes(batch: int, duplicates: bool = False) -> float:
    """Global-memory bytes per batch element of one observe launch: the id, the loss, and a read and
    a write of the sample's mean, variance and last epoch, each in its own 32-byte sector (the
    ids are scattered); a sorted batch (> 4096) adds the torch sort's keys and positions."""
    b = 8 + 4 + 2 * 3 * SECTOR_BYTES
    if batch > _C["GP_OBS_SMALL_MAX"]:
        b += 4 * 8                                         # sort: read and write ids and positions
    return float(b)


def h100_estimate(device_ops: int, bytes_total: float, barriers: int = 0) -> float:
    """An *estimate* of the GPU time in microseconds: ``device_ops * LAUNCH_US + barriers *
    BARRIER_US + bytes / HBM_BYTES_PER_S`` (the constants above; not a measurement)."""
    return device_ops * LAUNCH_US + barriers * BARRIER_US + bytes_total / HBM_BYTES_PER_S * 1e6
