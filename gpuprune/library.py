"""gpuprune's in-step work as torch custom ops, so that ``torch.compile`` treats it as opaque.

Inside a compiled training step (``torch.compile(step)``, ``fullgraph=True`` included)
:meth:`gpuprune.Pruner.observe` makes its metadata checks while tracing (types, dtypes, shapes,
devices) and calls ops registered with :mod:`torch.library` for the rest, instead of running its
eager code: dynamo cannot trace the CuPy kernel launches, the CPU update's numpy fast path, or the
host counters of the coverage guard and the distributed log; and inside an opaque op the
statistics are updated by exactly the eager code, so a compiled step gives bit-identical
statistics on every device (inductor, tracing the update itself, could fuse its float64
multiply-adds differently on a GPU). The returned loss (the weighted mean) is traced as usual.

* ``gpuprune::observe_`` (:func:`observe_`) updates the statistics in place. Its CPU
  implementation is the torch reference update (:func:`gpuprune.update.observe_torch`); on CUDA it
  launches the CuPy kernel (:meth:`gpuprune.kernels.KernelOps.observe_`) or, for ``backend="torch"``,
  the torch update on the GPU. Its fake implementation does nothing: the op returns nothing and
  only mutates its first five arguments, which the schema declares.
* ``gpuprune::count_trained`` (:func:`count_trained`) adds a batch's length (tensor metadata, no
  device read) to a :class:`~gpuprune.guard.CoverageGuard`'s host counter at run time, with the
  eager checks and warnings; a Python counter updated while tracing would be frozen into the graph.
* ``gpuprune::record_batch`` (:func:`record_batch`): under a process group, ``observe`` logs the
  batch (:meth:`gpuprune.distributed.EpochSync.record`) instead of updating the statistics; the log
  grows and counts on the host, so it too runs at run time.

The last two reach their host object by an int key (:mod:`gpuprune._registry`), and return nothing
and mutate no argument, so they are registered as having a side effect, which keeps the graph's
dead-code elimination from dropping them.

The epoch an observation is recorded under is a 0-d int64 CPU tensor read at run time, not a
Python int that dynamo would specialise on, so a compiled step is not recompiled every epoch.
"""

from __future__ import annotations

import torch

from ._checks import check_id_range
from ._registry import lookup
from .backend import Backend, KernelBackend, TorchBackend
from .stats import StatsTensors

__all__ = ["OPS_AVAILABLE", "compiling", "count_trained", "observe_", "record_batch",
           "record_traced"]

#: whether this torch registers custom ops (``torch.library.custom_op``, torch >= 2.4); without it
#: gpuprune imports and runs eagerly, and ``observe`` cannot be compiled
OPS_AVAILABLE = (hasattr(torch.library, "custom_op")
                 and hasattr(getattr(torch, "compiler", None), "is_compiling"))

_STATS = ("mean", "var", "last_epoch", "nonfinite", "invalid_batches")

#: every op here reads host state when it runs (the epoch, a counter, a log's length), so a CUDA
#: graph (``mode="reduce-overhead"``) must not capture it: a replay would not run its Python
_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
_TAGS = {"tags": (_UNSAFE,)} if _UNSAFE is not None else {}


def compiling() -> bool:
    """Whether dynamo is tracing the caller (False on a torch without ``torch.compiler``)."""
    return OPS_AVAILABLE and torch.compiler.is_compiling()


def _backend_for(device: torch.device, backend: str) -> Backend:
    """The eager backend the op runs: the kernels for ``"cuda"`` on a CUDA device, else torch."""
    if device.type == "cuda" and backend == "cuda":
        from . import kernels
        return KernelBackend(kernels.get_ops(device))
    return TorchBackend(device)


if OPS_AVAILABLE:
    @torch.library.custom_op("gpuprune::observe_", mutates_args=_STATS, **_TAGS)
    def observe_(mean: torch.Tensor, var: torch.Tensor, last_epoch: torch.Tensor,
                 nonfinite: torch.Tensor, invalid_batches: torch.Tensor, ids: torch.Tensor,
                 losses: torch.Tensor, decay: float, epoch: torch.Tensor, backend: str) -> None:
        """Record a batch of losses in the statistics, in place: :meth:`Backend.observe_` as an op.

        Args:
            mean, var, last_epoch, nonfinite, invalid_batches: the statistics
                (:class:`~gpuprune.stats.StatsTensors`), mutated.
            ids: 1-D integer sample ids, on the statistics' device. On the CPU an id outside
                ``[0, N)`` raises ValueError before anything changes; on a GPU the batch is ignored
                and counted in ``invalid_batches`` (no host read), as in eager mode.
            losses: 1-D float losses, one per id (detached: the op has no gradient).
            decay: EMA weight kept per observation, in [0, 1).
            epoch: 0-d integer CPU tensor, the epoch written to ``last_epoch`` (read on the host).
            backend: ``"cuda"`` runs the CUDA kernel on a CUDA device; ``"torch"`` the torch
                update. On the CPU both run the torch reference update.
        """
        if ids.device.type == "cpu":     # the eager error (reading CPU values costs nothing)
            check_id_range(ids, mean.numel())
        stats = StatsTensors(mean, var, last_epoch, nonfinite, invalid_batches)
        _backend_for(ids.device, backend).observe_(stats, ids, losses, decay, int(epoch))

    @observe_.register_fake
    def _observe_fake(mean, var, last_epoch, nonfinite, invalid_batches, ids, losses, decay, epoch,
                      backend) -> None:
        return None

    @torch.library.custom_op("gpuprune::count_trained", mutates_args=(), **_TAGS)
    def count_trained(ids: torch.Tensor, guard: int) -> None:
        """Add ``ids.numel()`` trained samples to the coverage guard whose
        :attr:`~gpuprune.guard.CoverageGuard.key` is ``guard``, at run time (an unknown key counts
        nothing)."""
        target = lookup(guard)
        if target is not None:
            target.observe(ids.numel())

    @count_trained.register_fake
    def _count_fake(ids, guard) -> None:
        return None

    @torch.library.custom_op("gpuprune::record_batch", mutates_args=(), **_TAGS)
    def record_batch(ids: torch.Tensor, losses: torch.Tensor, log: int) -> None:
        """Log a batch in the observation log whose :attr:`~gpuprune.distributed.EpochSync.key` is
        ``log``, at run time (an unknown key logs nothing): a distributed Pruner's ``observe``."""
        target = lookup(log)
        if target is not None:
            target.record(ids, losses)

    @record_batch.register_fake
    def _record_fake(ids, losses, log) -> None:
        return None

    # these ops return nothing and mutate no argument: they act on host objects, so say they have
    # a side effect, or the graph's dead-code elimination would drop them
    for _op in (torch.ops.gpuprune.count_trained.default, torch.ops.gpuprune.record_batch.default):
        torch.fx.node.has_side_effect(_op)
else:                                                   # pragma: no cover - torch < 2.4
    observe_ = count_trained = record_batch = None


def record_traced(stats: StatsTensors, log_key: int | None, guard_key: int | None,
                  ids: torch.Tensor, losses: torch.Tensor, decay: float, epoch: torch.Tensor,
                  backend: str) -> None:
    """What :meth:`gpuprune.Pruner.observe` records, as calls of the ops above, for a traced step:
    the batch logged under a process group (``log_key``: its ``EpochSync.key``) or else the
    statistics updated; and, for a trained batch (``guard_key``: its ``CoverageGuard.key``; None
    for ``trained=False``), the coverage count. ``losses`` detached."""
    if log_key is not None:
        torch.ops.gpuprune.record_batch(ids, losses, log_key)
    else:
        torch.ops.gpuprune.observe_(*stats, ids, losses, decay, epoch, backend)
    if guard_key is not None:
        torch.ops.gpuprune.count_trained(ids, guard_key)
