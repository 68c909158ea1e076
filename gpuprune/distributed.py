"""Multi-process training: keep every rank's pruning state bit-identical with torch.distributed.

Under DDP each rank trains on its own shard of the epoch's plan, so each rank observes only its own
samples. A distributed :class:`~gpuprune.Pruner` therefore runs its :class:`~gpuprune.ScoreBank` in
*deferred* mode: ``observe`` only adds this epoch's per-sample sums ``[count, sum(x - mean),
sum((x - mean)**2)]`` to a ``(3, N)`` float64 buffer. Once per epoch, before the next plan is made,
:class:`DistributedSync` all-reduces that buffer (plus two counters) over the process group and
merges the global sums into the state. Every rank then holds the same state and, since plans are a
pure function of (seed, epoch, state), computes the same plan; :meth:`Plan.shard` gives each rank an
equal share, so step counts match and DDP never waits for a missing rank.

Cost: one all-reduce of ``3 * N`` float64 values (24 bytes per sample) and one of 2 int64 counters
per epoch, plus, with ``verify_plans`` (default on), one all-reduce of 8 int64 values after the plan.
Nothing is communicated per step.

Semantics. The merge adds, per sample, a group of the c losses observed anywhere in the epoch, with
the weight ``1 - decay**c`` of c observations, to the state of the epoch's start (the exact group
merge of :mod:`gpuprune.scores`). When every sample is seen at most once per epoch (the usual case)
this is exactly the single-process per-step update. When a sample is seen c > 1 times in one epoch
(the <= W - 1 wrap-around padding duplicates of ``drop_last=False``, or a plan that repeats ids),
its c losses count as one group around the epoch-start mean instead of c successive EMA steps:
the new mean moves toward the mean of the c losses with weight ``1 - decay**c``, independent of the
order in which they were seen (per-step updates would weigh the later losses more).

The all-reduced sums are identical on all ranks (ring and tree all-reduces hand every rank the same
result), and sums of at most two non-zero terms per sample do not depend on the summation order, so
the merged state does not depend on how samples were spread over ranks. With ``verify_plans`` a
fingerprint of each plan is compared across ranks and a :class:`PlanMismatchError` is raised on every
rank if they differ (different seeds or settings on different ranks, a state loaded on some ranks
only, a non-deterministic custom policy).

Failures. A rank that exits makes the next collective fail on the others (gloo: at once, "connection
reset"); a rank that stalls makes it fail after the process group's timeout. gpuprune wraps the
error in a :class:`DistributedError` naming the epoch. Pass a timeout to
``torch.distributed.init_process_group(timeout=...)`` that is longer than your slowest epoch plus
evaluation (default ten minutes for NCCL, thirty for gloo). With NCCL the all-reduce runs on the GPU
asynchronously: a stalled peer is detected by the NCCL watchdog after the timeout, which tears the
process down with its own message (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from .plan import Plan
from .select import MASK32, fmix32, hash32

if TYPE_CHECKING:  # pragma: no cover
    from .pruner import Pruner
    from .scores import ScoreBank

__all__ = [
    "DistributedError",
    "PlanMismatchError",
    "DistributedSync",
    "resolve_group",
    "rank_and_world",
    "plan_fingerprint",
    "synchronize",
]

# Constants of the plan fingerprint: a hash seed, an odd 32-bit Weyl step, a 32-bit weight key.
_FP_INDEX, _FP_POSITION, _FP_WEIGHT = 0x6A09E667F3BCC908, 0x9E3779B1, 0x3C6EF372


class DistributedError(RuntimeError):
    """A gpuprune collective failed: a rank exited or stalled, or the ranks disagree."""


class PlanMismatchError(DistributedError):
    """The ranks computed different plans for the same epoch."""


def _available() -> bool:
    return dist.is_available() and dist.is_initialized()


def resolve_group(process_group: Any = "auto") -> Any:
    """The process group a Pruner synchronises over, or None for single-process pruning.

    Args:
        process_group: ``"auto"`` (default) takes the default group when ``torch.distributed`` is
            initialised with more than one rank; ``None`` never synchronises; a
            ``torch.distributed.ProcessGroup`` (e.g. from ``dist.new_group``) is used as given.

    Returns:
        The group, or None when there is nothing to synchronise (no initialised group, or a group
        of one rank).

    Raises:
        TypeError: ``process_group`` is neither ``"auto"``, None nor a ProcessGroup.
        ValueError: another string, a group without an initialised default group, or a group
            this process is not a member of.
    """
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(f"process_group must be 'auto', None or a torch.distributed "
                             f"ProcessGroup, got process_group={process_group!r}")
        if not _available() or dist.get_world_size() == 1:
            return None
        return dist.group.WORLD
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"process_group must be 'auto', None or a torch.distributed ProcessGroup, "
                        f"got {type(process_group).__name__} {process_group!r}")
    if not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group() first")
    if dist.get_rank(process_group) < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of "
                         f"process_group={process_group!r}")
    return None if dist.get_world_size(process_group) == 1 else process_group


def rank_and_world(process_group: Any = "auto") -> tuple[int, int]:
    """``(rank, world_size)`` of this process in ``process_group`` (``(0, 1)`` without one).

    Data loaders use it to pick their shard: ``shard_id, num_shards = rank_and_world(
    pruner.process_group)``. Accepts the same values as :func:`resolve_group`.
    """
    group = resolve_group(process_group)
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def plan_fingerprint(plan: Plan) -> torch.Tensor:
    """Four int64 values identifying a plan: a hash-sum of (position, index, weight), length, epoch, full.

    Computed on the plan's device without a host synchronisation. Two plans that differ in any index,
    order or weight get different hash-sums except with probability about ``2**-32``.
    """
    idx = plan.indices
    dev = idx.device
    n = idx.numel()
    # keyed hash of the id, offset by a Weyl sequence of the position (fmix32 reads the low 32 bits)
    term = hash32(idx, _FP_INDEX) + torch.arange(n, device=dev) * _FP_POSITION
    if plan.weights is not None:
        wbits = plan.weights.float().contiguous().view(torch.int32).long() & MASK32
        term = term ^ fmix32(wbits ^ _FP_WEIGHT)
    total = fmix32(term).sum()               # < n * 2**32, no int64 overflow below 2**31 entries
    meta = torch.tensor([n, plan.epoch, int(plan.full)], dtype=torch.int64, device=dev)
    return torch.cat([total.reshape(1), meta])


def _backend(group: Any) -> str:
    try:
        return str(dist.get_backend(group))
    except (RuntimeError, ValueError):  # pragma: no cover - exotic groups
        return "unknown"


class DistributedSync:
    """Merges a Pruner's statistics over a process group once per epoch and checks the plans agree.

    Created by ``Pruner(..., process_group=...)`` (available as ``pruner.dist_sync``); not normally
    built by hand. It registers itself in the Pruner's ``before_plan`` (merge) and ``after_plan``
    (verify) hooks, so every rank must call ``Pruner.plan`` for every new epoch, in the same order,
    as it must call any collective.

    Args:
        group: the resolved process group (see :func:`resolve_group`).
        device: the Pruner's device. NCCL groups need a CUDA device.
        verify_plans: compare a fingerprint of every new plan across ranks (one 8-value all-reduce
            and one host sync per epoch). Default True.
    """

    def __init__(self, group: Any, device: torch.device, verify_plans: bool = True) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = _backend(group)
        if device.type == "cpu" and self.backend == "nccl":
            raise ValueError("process_group uses NCCL, which reduces CUDA tensors only, but "
                             "device='cpu': pass device=f'cuda:{local_rank}' or a gloo group")
        self.verify_plans = bool(verify_plans)
        self.merges = 0                          # number of completed merges (for tests and logs)
        self._epoch: int | None = None           # epoch of the last plan: its losses are pending
        self._nonfinite_base: torch.Tensor | None = None  # global count after the last merge

    # ------------------------------------------------------------------ wiring
    def attach(self, pruner: "Pruner") -> None:
        """Register the hooks on ``pruner`` (its bank must be in deferred mode)."""
        if not pruner.bank.deferred:
            raise ValueError("a distributed Pruner needs its ScoreBank in deferred mode")
        self._nonfinite_base = pruner.bank.nonfinite.clone()
        pruner.before_plan.append(self._before_plan)
        pruner.after_plan.append(self._after_plan)

    def _before_plan(self, pruner: "Pruner") -> None:
        self.merge(pruner.bank)

    def _after_plan(self, pruner: "Pruner", plan: Plan) -> None:
        self._epoch = plan.epoch
        if self.verify_plans:
            self.verify(plan)

    def _what(self) -> str:
        if self._epoch is None:
            return "before the first plan"
        return f"of epoch {self._epoch}"

    def _fail(self, action: str, err: BaseException) -> DistributedError:
        return DistributedError(
            f"gpuprune: {action} failed on rank {self.rank} of {self.world_size} "
            f"({self.backend} process group): another rank has probably exited, crashed or "
            f"stalled past the process group's timeout. Every rank must call Pruner.plan() for "
            f"every new epoch; set a bounded timeout with "
            f"torch.distributed.init_process_group(timeout=...). Collective error: {err}")

    # ------------------------------------------------------------------ collectives
    def merge(self, bank: "ScoreBank") -> None:
        """All-reduce the epoch's pending sums and counters, then commit them (collective)."""
        if self._nonfinite_base is None:
            self._nonfinite_base = torch.zeros_like(bank.nonfinite)
        # nonfinite is cumulative and already holds the global total of earlier epochs; send only
        # this rank's increase. invalid_batches is zero after every successful plan (plan() raises
        # and clears it otherwise), so its local value is this rank's increase.
        counters = torch.stack([bank.nonfinite - self._nonfinite_base, bank.invalid_batches])

        def reduce(acc: torch.Tensor) -> None:
            try:
                works = [dist.all_reduce(acc, group=self.group, async_op=True),
                         dist.all_reduce(counters, group=self.group, async_op=True)]
                for work in works:
                    work.wait()
            except RuntimeError as e:
                raise self._fail(f"merging the loss statistics {self._what()}", e) from e

        bank.commit(reduce)
        bank.nonfinite.copy_(self._nonfinite_base + counters[0])
        bank.invalid_batches.copy_(counters[1])
        self._nonfinite_base = bank.nonfinite.clone()
        self.merges += 1

    def verify(self, plan: Plan) -> None:
        """Raise :class:`PlanMismatchError` on every rank if the ranks' plans differ (collective)."""
        mine = plan_fingerprint(plan)
        both = torch.cat([mine, -mine])          # one MAX all-reduce gives the max and the min
        try:
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        except RuntimeError as e:
            raise self._fail(f"comparing the plan of epoch {plan.epoch} across ranks", e) from e
        values = torch.cat([mine, both]).tolist()   # the one host sync
        m = len(values) // 3
        own, hi, lo = values[:m], values[m:2 * m], [-v for v in values[2 * m:]]
        if hi != lo:
            raise PlanMismatchError(
                f"gpuprune: the ranks computed different plans for epoch {plan.epoch} (plan "
                f"fingerprint [hash, length, epoch, full] on rank {self.rank}: {own}; range over "
                f"the {self.world_size} ranks: {lo} .. {hi}). The ranks must construct the Pruner "
                f"with the same arguments (seed, keep, policy, static_scores, ...), load the same "
                f"checkpoint, and observe losses only through Pruner.observe()")

    # ------------------------------------------------------------------ checkpoints
    def has_unmerged(self, bank: "ScoreBank") -> bool:
        """Whether this rank holds observations not merged yet (one host sync)."""
        base = self._nonfinite_base if self._nonfinite_base is not None else 0
        flags = torch.stack([bank.pending()[0].ne(0).any().long(),
                             (bank.nonfinite - base).ne(0).long(),
                             bank.invalid_batches.ne(0).long()])
        return bool(flags.any())

    def check_saveable(self, bank: "ScoreBank") -> None:
        """Raise if a checkpoint written now would lose the other ranks' unmerged observations."""
        if self.has_unmerged(bank):
            raise DistributedError(
                f"gpuprune: Pruner.state_dict() on rank {self.rank}: this rank holds loss statistics "
                f"{self._what()} that are not merged with the other ranks yet, so a checkpoint would "
                f"lose their share. Call gpuprune.distributed.synchronize(pruner) on every rank "
                f"first (for example at the end of the epoch), then save from rank 0")

    def after_load(self, bank: "ScoreBank", plan_epoch: int | None) -> None:
        """Adopt a loaded state (the same on every rank): counters are global, pending sums counted once."""
        self._epoch = plan_epoch
        if self.rank != 0:   # the checkpoint's unmerged sums (if any) must enter the merge once
            bank.pending().zero_()
            bank.invalid_batches.zero_()
        self._nonfinite_base = bank.nonfinite.clone()


def synchronize(pruner: "Pruner") -> None:
    """Merge the statistics observed so far now, instead of at the next plan.

    On a distributed Pruner this is a collective: call it on every rank, e.g. at the end of an epoch
    before rank 0 saves ``pruner.state_dict()``. The next plan still merges (what was observed in
    between), so this costs one extra all-reduce. On a single-process Pruner it merges a deferred
    bank and otherwise does nothing.
    """
    sync = getattr(pruner, "dist_sync", None)
    if sync is not None:
        sync.merge(pruner.bank)
    elif pruner.bank.deferred:
        pruner.bank.commit()
