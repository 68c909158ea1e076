"""Multi-process training: every rank keeps the same statistics and computes the same plan.

Under DDP each rank trains on its own shard of the epoch's plan, so each rank observes only its own
samples. A distributed :class:`~gpuprune.Pruner` therefore does not update its statistics per step:
:class:`EpochSync` logs each observation (an int32 id and a float32 loss, 8 bytes per sample of this
rank's shard). Once per epoch, when the next plan is made, the ranks all-gather their logs and every
rank applies the gathered observations, in rank order, with one call of the backend's update, so all
ranks hold bit-identical statistics and, since plans are a pure function of (seed, epoch, state),
compute the same plan. Nothing is communicated per step.

Semantics. The update of one call merges every id's observations as one group (see
:mod:`gpuprune.update`): when every sample is observed at most once per epoch (the usual case) this is
exactly the single-process per-step update. A sample observed c > 1 times in one epoch (the
``<= W - 1`` wrap-around padding duplicates, or a plan that repeats ids) gets its c losses as one
group of weight ``1 - decay**c`` around the epoch-start mean, independent of which rank saw them.

The protocol. Every gpuprune collective starts with the same fixed-size header exchange (an
all-gather of 10 int64 per rank: the operation, the epoch, a digest of the Pruner's configuration,
this rank's log length and invalid-batch count, and for the plan check a fingerprint of the plan).
Only when all headers agree do size-dependent collectives follow, so ranks that disagree (different
``num_samples``, ``decay``, policy settings, seed; one rank calling :meth:`Pruner.synchronize` while
another plans) all raise :class:`PlanMismatchError` naming the difference instead of aborting inside
the communication library. A configuration mismatch is named setting by setting (one extra
``all_gather_object``).

Failures. A rank that exits makes the next collective fail on the others (gloo: at once, "connection
reset"); a rank that stalls makes it fail after the process group's timeout. gpuprune wraps the
error in a :class:`DistributedError` naming the operation and the epoch. Pass a timeout to
``torch.distributed.init_process_group(timeout=...)`` that is longer than your slowest epoch plus
evaluation.
"""

from __future__ import annotations

import enum
import hashlib
import json
from typing import Any

import torch
import torch.distributed as dist

from ._checks import config_differences, flatten_config
from ._registry import register
from .sizes import index_dtype
from .stats import LossStats
from .update import prepare_losses

__all__ = [
    "DistributedError",
    "PlanMismatchError",
    "EpochSync",
    "resolve_group",
    "rank_and_world",
    "config_digest",
    "flatten_config",
    "Op",
]

_MAGIC = 0x67707275  # "gpru"
_HEADER = 10


class Op(enum.IntEnum):
    """The gpuprune collectives, as named in the header every one of them starts with."""

    PLAN = 1          #: the merge before a new plan (:meth:`Pruner.plan`)
    VERIFY = 2        #: the plan fingerprint check after it
    SYNC = 3          #: :meth:`Pruner.synchronize`


_OP_NAMES = {Op.PLAN: "plan", Op.VERIFY: "plan check", Op.SYNC: "synchronize"}

class DistributedError(RuntimeError):
    """A gpuprune collective failed: a rank exited or stalled, or the ranks disagree."""


class PlanMismatchError(DistributedError):
    """The ranks are configured differently, called different operations, or planned differently."""


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
    """``(rank, world_size)`` of this process in ``process_group`` (``(0, 1)`` without one)."""
    group = resolve_group(process_group)
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def config_digest(config: dict) -> tuple[int, int]:
    """Two int64 words of the sha256 of a configuration dict (canonical JSON)."""
    raw = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).digest()
    return (int.from_bytes(raw[:8], "little", signed=True),
            int.from_bytes(raw[8:16], "little", signed=True))


def _backend(group: Any) -> str:
    try:
        return str(dist.get_backend(group))
    except (RuntimeError, ValueError):  # pragma: no cover - exotic groups
        return "unknown"


class EpochSync:
    """Logs a rank's observations and merges every rank's once per epoch; checks ranks agree.

    Held by a distributed :class:`~gpuprune.Pruner` (built by it from ``process_group``); the Pruner
    calls :meth:`record` from ``observe``, :meth:`merge` and :meth:`verify` from ``plan`` and
    :meth:`merge` from ``synchronize``. Every rank must make these calls in the same order, as with
    any collective.

    Args:
        group: the resolved process group (see :func:`resolve_group`).
        device: the Pruner's device. NCCL groups need a CUDA device.
        num_samples: N.
    """

    def __init__(self, group: Any, device: torch.device, num_samples: int) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = _backend(group)
        if device.type == "cpu" and self.backend == "nccl":
            raise ValueError("process_group uses NCCL, which reduces CUDA tensors only, but "
                             "device='cpu': pass device=f'cuda:{local_rank}' or a gloo group")
        self.device = device
        self.comm_device = device if self.backend == "nccl" else torch.device("cpu")
        self.num_samples = num_samples
        self.merges = 0                       # completed merges (for tests and logs)
        self._ids = torch.empty(0, dtype=index_dtype(num_samples), device=device)
        self._losses = torch.empty(0, dtype=torch.float32, device=device)
        self._len = 0                         # host count of logged entries (no sync needed)
        self._invalid = torch.zeros((), dtype=torch.int64, device=device)
        #: this log's key for the op that records a compiled step's batches (:mod:`gpuprune.library`)
        self.key = register(self)

    # ------------------------------------------------------------------ the log
    @property
    def pending(self) -> int:
        """Observations logged since the last merge on this rank."""
        return self._len

    def nbytes(self) -> int:
        """Bytes held by the log."""
        return (self._ids.numel() * self._ids.element_size()
                + self._losses.numel() * self._losses.element_size())

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` entries in all (e.g. this rank's shard of the next epoch)."""
        if capacity > self._ids.numel():
            ids = torch.empty(capacity, dtype=self._ids.dtype, device=self.device)
            losses = torch.empty(capacity, dtype=torch.float32, device=self.device)
            ids[:self._len] = self._ids[:self._len]
            losses[:self._len] = self._losses[:self._len]
            self._ids, self._losses = ids, losses

    def record(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        """Log a batch (no host synchronisation), under the single-process input rules.

        The ids are range-checked as given, before they are narrowed to the log's dtype (an int64
        id ``2**32 + 5`` must not wrap to sample 5): a batch with an out-of-range id is logged as
        ignored entries and counted, and the next merge raises on every rank, as a single-process
        GPU Pruner's next plan does. (:meth:`Pruner.observe` already refuses such a CPU batch; the
        check here covers GPU batches, whose range is not read on the host.) The losses are
        logged as :func:`gpuprune.update.prepare_losses` makes them for a single-process update:
        float64 values beyond the float32 range saturate instead of becoming inf.
        """
        b = ids.numel()
        if b == 0:
            return
        if self._len + b > self._ids.numel():
            self.reserve(max(2 * self._ids.numel(), self._len + b))
        ok = (ids.min() >= 0) & (ids.max() < self.num_samples)
        # narrowing is lossless when ok; else every entry becomes -1 (an uint8 -1 would be 255)
        ids = torch.where(ok, ids.to(self._ids.dtype),
                          torch.full((), -1, dtype=self._ids.dtype, device=ids.device))
        self._invalid += (~ok).long()
        self._ids[self._len:self._len + b] = ids
        self._losses[self._len:self._len + b] = prepare_losses(losses)
        self._len += b

    def clear(self) -> None:
        """Forget the logged observations (after a committed merge, or a loaded state)."""
        self._len = 0
        self._invalid.zero_()

    # ------------------------------------------------------------------ collectives
    def _fail(self, action: str, err: BaseException) -> DistributedError:
        return DistributedError(
            f"gpuprune: {action} failed on rank {self.rank} of {self.world_size} "
            f"({self.backend} process group): another rank has probably exited, crashed or "
            f"stalled past the process group's timeout. Every rank must call Pruner.plan() for "
            f"every new epoch (sampler.set_epoch / the DALI iterator do); set a bounded timeout "
            f"with torch.distributed.init_process_group(timeout=...). Collective error: {err}")

    def _gather(self, action: str, t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        try:
            dist.all_gather(out, t, group=self.group)
        except RuntimeError as e:
            raise self._fail(action, e) from e
        return out

    def _headers(self, op: Op, epoch: int, config: dict, extra: list[int]) -> list[list[int]]:
        """The fixed-size header exchange every collective starts with; raises on disagreement."""
        lo, hi = config_digest(config)
        mine = [_MAGIC, int(op), epoch, lo, hi, *extra]
        mine += [0] * (_HEADER - len(mine))
        action = f"the {_OP_NAMES[op]} exchange of epoch {epoch}"
        t = torch.tensor(mine, dtype=torch.int64, device=self.comm_device)
        rows = [r.tolist() for r in self._gather(action, t)]
        if any(r[0] != _MAGIC for r in rows):
            raise PlanMismatchError(f"gpuprune: rank(s) {[i for i, r in enumerate(rows) if r[0] != _MAGIC]}"
                                    f" answered {action} with a collective that is not gpuprune's")
        calls = {(r[1], r[2]) for r in rows}
        if len(calls) > 1:
            what = "; ".join(f"rank {i}: {_OP_NAMES.get(r[1], r[1])} of epoch {r[2]}"
                             for i, r in enumerate(rows))
            raise PlanMismatchError(f"gpuprune: the ranks are in different gpuprune collectives "
                                    f"({what}). Every rank must call Pruner.plan() (or set_epoch) "
                                    f"for the same epochs, and Pruner.synchronize() together")
        if len({(r[3], r[4]) for r in rows}) > 1:
            self._raise_config_mismatch(config)
        return rows

    def _raise_config_mismatch(self, config: dict) -> None:
        configs: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(configs, config, group=self.group)
        except RuntimeError as e:
            raise self._fail("comparing the ranks' configurations", e) from e
        diffs = [f"{key}: " + ", ".join(f"rank {i}: {v!r}" for i, v in enumerate(values))
                 for key, values in config_differences(*configs).items()]
        raise PlanMismatchError("gpuprune: the ranks' Pruners are configured differently, so their "
                                "plans would differ: " + "; ".join(diffs) + ". Construct the "
                                "Pruner with the same arguments on every rank and load the same "
                                "checkpoint")

    def merge(self, stats: LossStats, backend, decay: float, obs_epoch: int, *, op: Op,
              epoch: int, config: dict) -> LossStats:
        """All ranks' logged observations applied to a copy of ``stats`` (collective).

        Returns ``stats`` itself when no rank logged anything. Raises ValueError on every rank when
        some rank observed out-of-range ids (those batches were not recorded; the counter is reset).
        Changes nothing here: the caller commits the copy and then calls :meth:`clear`.
        """
        invalid = int(self._invalid)
        rows = self._headers(op, epoch, config, [self._len, invalid])
        bad = {i: r[6] for i, r in enumerate(rows) if r[6]}
        if bad:
            self._invalid.zero_()
            raise ValueError(f"observe() received indices outside [0, {self.num_samples}) in "
                             f"{sum(bad.values())} batch(es) (per rank: {bad}); those batches were "
                             f"not recorded")
        longest = max(r[5] for r in rows)
        if longest == 0:
            return stats
        ids = torch.full((longest,), -1, dtype=self._ids.dtype, device=self.comm_device)
        losses = torch.zeros(longest, dtype=torch.float32, device=self.comm_device)
        ids[:self._len] = self._ids[:self._len].to(self.comm_device)
        losses[:self._len] = self._losses[:self._len].to(self.comm_device)
        action = f"merging the loss statistics of epoch {obs_epoch}"
        all_ids = torch.cat(self._gather(action, ids)).to(self.device)
        all_losses = torch.cat(self._gather(action, losses)).to(self.device)
        keep = all_ids >= 0                    # padding and ignored batches
        merged = stats.clone()
        backend.observe_(merged.tensors(), all_ids[keep], all_losses[keep], decay, obs_epoch,
                         exact=True)
        self.merges += 1
        return merged

    def verify(self, fingerprint: torch.Tensor, epoch: int, config: dict) -> None:
        """Raise :class:`PlanMismatchError` on every rank if the ranks' plans of ``epoch`` differ
        (collective): ``fingerprint`` is this rank's :meth:`gpuprune.Plan.fingerprint`, four int64
        values (a hash-sum, the length, the epoch, the full flag)."""
        fp = fingerprint.tolist()
        rows = self._headers(Op.VERIFY, epoch, config, fp)
        prints = {tuple(r[5:9]) for r in rows}
        if len(prints) > 1:
            raise PlanMismatchError(
                f"gpuprune: the ranks computed different plans for epoch {epoch} (plan "
                f"fingerprints [hash, length, epoch, full] per rank: {[r[5:9] for r in rows]}). "
                f"The ranks must load the same checkpoint and observe losses only through "
                f"Pruner.observe(); a custom policy must be deterministic")
