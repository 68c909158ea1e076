"""Hugging Face accelerate: a prepared loader that is not sharded again, and the scheduler's steps.

What accelerate does with a pruned loader, read from its code (accelerate 1.16):

* ``accelerator.prepare(loader)`` with several processes wraps the loader's batch sampler in
  ``BatchSamplerShard``, which deals whole batches round-robin to the processes, whatever the
  sampler: a loader over gpuprune's per-rank shard is split again, so each rank trains about half
  of its shard (256 of 500 with 2 processes, padded by ``even_batches``) and takes half the
  optimizer steps (12 instead of 24). There is no setting that turns this off.
* It leaves alone a loader marked as prepared (``_is_accelerate_prepared``, its guard against
  wrapping twice): :func:`prepare_data_loader` builds accelerate's own ``DataLoaderShard`` for one
  process (device placement, end-of-loader tracking for gradient accumulation, the RNG sync) over
  gpuprune's sampler, marks it so, and registers it with the Accelerator. The later
  ``accelerator.prepare(model, optimizer, loader, scheduler)`` returns it unchanged.
* The prepared loader calls ``set_epoch(n)`` on the sampler at its n-th pass (from 0), so a loop
  that never calls ``set_epoch`` still plans every epoch.
* A prepared scheduler steps ``num_processes`` times per optimizer step (accelerate sizes schedules
  for one process); :func:`scheduler_steps` is the count to create it with.

Usage (one line added before ``accelerator.prepare``)::

    from gpuprune.integrations.accelerate import prepare_data_loader, scheduler_steps

    accelerator = Accelerator()
    pruner = gpuprune.Pruner(len(train_set), keep=0.5, num_epochs=EPOCHS, device=accelerator.device)
    loader = DataLoader(gpuprune.IndexedDataset(train_set), batch_size=64, sampler=pruner.sampler())
    loader = prepare_data_loader(accelerator, loader)
    sched = OneCycleLR(opt, max_lr=0.1, total_steps=scheduler_steps(accelerator, pruner, 64))
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
"""

from __future__ import annotations

from ..pruner import Pruner
from ._common import find_sampler, optimizer_steps, require

require("accelerate", "accelerate", minimum="1.0")
from accelerate import Accelerator  # noqa: E402
from accelerate.data_loader import prepare_data_loader as _accelerate_prepare  # noqa: E402

__all__ = ["prepare_data_loader", "scheduler_steps"]


def prepare_data_loader(accelerator: Accelerator, dataloader):
    """Prepare a DataLoader that draws from a :class:`~gpuprune.PrunedSampler` for ``accelerator``
    without sharding it again; ``accelerator.prepare`` then leaves the result alone.

    Args:
        accelerator: the ``accelerate.Accelerator`` of the run.
        dataloader: a ``torch.utils.data.DataLoader`` whose ``sampler`` (or batch sampler's
            ``sampler``) is a PrunedSampler over a Pruner created after the Accelerator (so it
            shares accelerate's process group), not yet prepared.

    Returns:
        accelerate's ``DataLoaderShard`` over the same dataset and batches, placed on
        ``accelerator.device`` when ``accelerator.device_placement`` is on.

    Raises:
        ValueError: the loader has no PrunedSampler, was already prepared (and so sharded again),
            or its shard disagrees with the accelerator's processes.
    """
    if not isinstance(accelerator, Accelerator):
        raise TypeError(f"accelerator must be an accelerate.Accelerator, got "
                        f"{type(accelerator).__name__}")
    if getattr(dataloader, "_is_accelerate_prepared", False):
        raise ValueError("prepare_data_loader: this DataLoader was already prepared by accelerate, "
                         "which shards its batches across processes again; call "
                         "prepare_data_loader(accelerator, loader) on the plain DataLoader, before "
                         "accelerator.prepare")
    sampler = find_sampler(dataloader)
    if sampler is None:
        raise ValueError("prepare_data_loader: the DataLoader does not draw from a gpuprune "
                         "PrunedSampler; pass sampler=pruner.sampler()")
    if (sampler.num_replicas, sampler.rank) != (accelerator.num_processes, accelerator.process_index):
        raise ValueError(f"prepare_data_loader: the sampler deals shard {sampler.rank} of "
                         f"{sampler.num_replicas}, but this is process {accelerator.process_index} "
                         f"of {accelerator.num_processes}: create the Pruner after the Accelerator, "
                         f"so it finds accelerate's process group")
    prepared = _accelerate_prepare(
        dataloader, accelerator.device, num_processes=1, process_index=0, split_batches=False,
        put_on_device=accelerator.device_placement, rng_types=list(accelerator.rng_types or []),
        dispatch_batches=False, even_batches=True, non_blocking=accelerator.non_blocking,
        use_stateful_dataloader=accelerator.use_stateful_dataloader)
    prepared._is_accelerate_prepared = True
    return accelerator.prepare_data_loader(prepared)      # registers it, leaves it as it is


def scheduler_steps(accelerator: Accelerator, pruner: Pruner, batch_size: int, *,
                    drop_last: bool = False, upper_bound: bool = False) -> int:
    """The ``total_steps`` to create a step-based scheduler with before ``accelerator.prepare``:
    the run's optimizer steps on each rank, times ``num_processes`` unless accelerate splits
    batches (a prepared scheduler steps once per process per optimizer step).

    Args:
        accelerator: the run's Accelerator (its processes, ``split_batches`` and
            ``gradient_accumulation_steps`` are read).
        pruner: the run's Pruner.
        batch_size: samples per batch on each process.
        drop_last: ``True`` when the DataLoader drops its last short batch. Default False.
        upper_bound: for InfoBatch: the bound that counts every pruned epoch with all N samples.

    Raises:
        ValueError: the pruner has no ``num_epochs``; InfoBatch without ``upper_bound=True``.
    """
    if not isinstance(pruner, Pruner):
        raise TypeError(f"pruner must be a gpuprune.Pruner, got {type(pruner).__name__}")
    steps = optimizer_steps(pruner, batch_size, accumulate=accelerator.gradient_accumulation_steps,
                            drop_last=drop_last, upper_bound=upper_bound)
    return steps if accelerator.split_batches else steps * accelerator.num_processes
