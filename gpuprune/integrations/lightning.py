"""PyTorch Lightning: each epoch sized by its own plan, and the run's real optimizer-step count.

What Lightning does with a pruned loader, read from its code (lightning 2.6):

* Under DDP it shards a loader again unless its sampler is a ``DistributedSampler``
  (``use_distributed_sampler``, on by default). :class:`~gpuprune.PrunedSampler` is one by type,
  so Lightning leaves it alone: no glue needed for that.
* It calls ``sampler.set_epoch(current_epoch)`` before every epoch (0-based), so plans follow.
* It measures the train loader once, when it loads it (epoch 0), and then treats that count as
  every epoch's length: a later epoch with more batches (final full-data epochs after pruned ones,
  InfoBatch) is cut at that count, and with ``val_check_interval=1.0`` an epoch with fewer batches
  (every pruned epoch after a full warm-up) never reaches the batch that runs validation.
  :class:`PruningCallback` re-measures the loader at every epoch start.
* ``trainer.estimated_stepping_batches`` is that first count times ``max_epochs``: 282 steps where
  a 3-epoch run with one full warm-up epoch takes 188. Size step-based schedulers with
  :func:`stepping_batches` instead; the callback refuses a scheduler sized with the estimate.

Usage (the Pruner is made in ``setup()``, after Lightning has started the process group)::

    from gpuprune.integrations.lightning import PruningCallback, stepping_batches

    class Model(L.LightningModule):
        def setup(self, stage):
            self.pruner = gpuprune.Pruner(len(train_set), keep=0.5, num_epochs=EPOCHS)
        def train_dataloader(self):
            return DataLoader(gpuprune.IndexedDataset(train_set), batch_size=64,
                              sampler=self.pruner.sampler())
        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            return self.pruner.observe(idx, F.cross_entropy(self(x), y, reduction="none"))
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            steps = stepping_batches(self.trainer, self.pruner, batch_size=64)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
            return [opt], [{"scheduler": sched, "interval": "step"}]

    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=[PruningCallback()])
"""

from __future__ import annotations

import math

from .._checks import check_int
from ..pruner import Pruner
from ..sampler import PrunedSampler
from ._common import find_sampler, optimizer_steps, require

L = require("lightning.pytorch", "lightning", minimum="2.1")
from lightning.fabric.utilities.data import sized_len  # noqa: E402
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper  # noqa: E402
from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches  # noqa: E402
from lightning.pytorch.trainer.states import RunningStage  # noqa: E402

__all__ = ["PruningCallback", "stepping_batches"]

#: scheduler attributes that hold the step count a schedule was sized for
_SIZE_ATTRIBUTES = ("total_steps", "total_iters", "T_max")


def stepping_batches(trainer: "L.Trainer", pruner: Pruner, batch_size: int, *,
                     drop_last: bool = False, upper_bound: bool = False) -> int:
    """Optimizer steps this pruned run takes on each rank: what ``trainer.estimated_stepping_batches``
    should say. Call it in ``configure_optimizers`` to size a step-based scheduler.

    Reads ``max_epochs``, ``accumulate_grad_batches`` and the world size from the trainer; each
    epoch's batches come from the pruner's schedule, over ``world_size`` shards (the Pruner's
    process group), so it needs no loader and plans nothing.

    Args:
        trainer: the Lightning Trainer (``self.trainer`` in a LightningModule).
        pruner: the run's Pruner.
        batch_size: samples per batch on each rank.
        drop_last: ``True`` when the DataLoader drops its last short batch. Default False.
        upper_bound: for InfoBatch (loss-dependent epoch sizes): the bound that counts every
            pruned epoch with all N samples. Default False (InfoBatch raises).

    Raises:
        ValueError: ``max_epochs`` unset, -1 or beyond the pruner's ``num_epochs``; InfoBatch
            without ``upper_bound=True``.
    """
    if not isinstance(pruner, Pruner):
        raise TypeError(f"pruner must be a gpuprune.Pruner, got {type(pruner).__name__}")
    epochs = _max_epochs(trainer, pruner)
    accumulate = check_int("trainer.accumulate_grad_batches", trainer.accumulate_grad_batches,
                           minimum=1)
    steps = optimizer_steps(pruner, batch_size, num_epochs=epochs, accumulate=accumulate,
                            drop_last=drop_last, upper_bound=upper_bound)
    return steps if trainer.max_steps in (None, -1) else min(steps, trainer.max_steps)


def _max_epochs(trainer: "L.Trainer", pruner: Pruner) -> int:
    """``trainer.max_epochs``, checked against the pruner's schedule."""
    epochs = trainer.max_epochs
    if epochs is None or epochs < 0:
        raise ValueError(f"Trainer(max_epochs={epochs}) trains until max_steps; a pruned run needs "
                         f"its epochs: pass Trainer(max_epochs=pruner.num_epochs)"
                         + (f" (= {pruner.num_epochs})" if pruner.num_epochs is not None else ""))
    if pruner.num_epochs is not None and epochs > pruner.num_epochs:
        raise ValueError(f"Trainer(max_epochs={epochs}) is more than the pruner's num_epochs="
                         f"{pruner.num_epochs}: epoch {pruner.num_epochs} has no plan. Pass "
                         f"Trainer(max_epochs={pruner.num_epochs}) or create the Pruner with "
                         f"num_epochs={epochs}")
    return epochs


class PruningCallback(L.Callback):
    """Keep Lightning's per-epoch bookkeeping true to each epoch's plan.

    At every training epoch start (after Lightning's ``set_epoch``, before the loader is
    iterated) it re-measures the train loaders that draw from a
    :class:`~gpuprune.PrunedSampler` and sets the epoch's batch limit, ``num_training_batches``
    and, for a fractional ``val_check_interval``, the batch that runs validation, exactly as
    Lightning computes them when it loads a loader (``limit_train_batches`` applies). At the
    start of training it checks the run and raises ``ValueError`` with the fix when:

    * no train loader draws from a PrunedSampler, or one was wrapped by another sampler;
    * ``max_epochs`` is unset or beyond the pruner's ``num_epochs``;
    * a step-interval scheduler was sized with ``trainer.estimated_stepping_batches`` (its
      ``total_steps``/``total_iters``/``T_max`` equals that estimate while the run takes a
      different number of steps): size it with :func:`stepping_batches`.

    Needs no arguments: it finds the Pruner through the loader, so the Pruner may be made in
    ``setup()`` (under DDP it must be: the process group starts inside ``trainer.fit``).
    """

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        loaders = _train_loaders(trainer)
        samplers = [find_sampler(dl) for dl in loaders]
        if not any(s is not None for s in samplers):
            resharded = any(isinstance(getattr(dl, "sampler", None), DistributedSamplerWrapper)
                            for dl in loaders)
            raise ValueError(
                "PruningCallback: no train dataloader draws from a gpuprune PrunedSampler"
                + (": Lightning wrapped the loader's sampler in its DistributedSamplerWrapper, "
                   "which shards it again (use_distributed_sampler), so each rank would train "
                   "part of its shard. Pass sampler=pruner.sampler() itself to the DataLoader (a "
                   "DistributedSampler, which Lightning leaves alone), not a sampler around it"
                   if resharded else ". Pass sampler=pruner.sampler() to the train DataLoader"))
        for sampler, dl in zip(samplers, loaders):
            if sampler is None:
                continue
            epochs = _max_epochs(trainer, sampler.pruner)
            batch_size = getattr(dl, "batch_size", None) or getattr(dl.batch_sampler, "batch_size")
            if sampler.pruner.schedule.exact_size:
                self._check_schedulers(trainer, sampler, batch_size, epochs,
                                       bool(getattr(dl, "drop_last", False)))

    @staticmethod
    def _check_schedulers(trainer, sampler: PrunedSampler, batch_size: int, epochs: int,
                          drop_last: bool) -> None:
        """Refuse a step-interval scheduler sized with Lightning's estimate when it is wrong."""
        real = optimizer_steps(sampler.pruner, batch_size, world_size=sampler.num_replicas,
                               shard_drop_last=sampler.drop_last, num_epochs=epochs,
                               accumulate=trainer.accumulate_grad_batches, drop_last=drop_last)
        if trainer.max_steps not in (None, -1):
            real = min(real, trainer.max_steps)
        estimate = trainer.estimated_stepping_batches   # from epoch 0's batches, as measured
        if estimate == real:
            return
        for config in trainer.lr_scheduler_configs:
            if config.interval != "step":
                continue
            for name in _SIZE_ATTRIBUTES:
                if getattr(config.scheduler, name, None) == estimate:
                    raise ValueError(
                        f"{type(config.scheduler).__name__}.{name}={estimate} is Lightning's "
                        f"trainer.estimated_stepping_batches: epoch 0's "
                        f"{trainer.num_training_batches} batches times max_epochs={epochs}, but "
                        f"this pruned run takes {real} optimizer steps on "
                        f"each rank (its epochs differ in size). Size it with gpuprune.integrations."
                        f"lightning.stepping_batches(self.trainer, pruner, batch_size={batch_size})"
                        f" = {real}")

    def on_train_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        loop = trainer.fit_loop
        combined = loop._combined_loader
        if combined is None or not any(find_sampler(dl) is not None for dl in combined.flattened):
            return
        counts = []                   # (batches, limit) per loader, as Lightning measures them
        for dl, limit in zip(combined.flattened, combined.limits or [math.inf] * len(combined.flattened)):
            if find_sampler(dl) is not None:      # this epoch's length: set_epoch has planned it
                limit = _parse_num_batches(RunningStage.TRAINING, len(dl), trainer.limit_train_batches)
            n = sized_len(dl)
            counts.append((math.inf if n is None else n, limit))
        combined.limits = [limit for _, limit in counts]
        # what CombinedLoader.__len__ gives once iterated with these limits (it reads the limits
        # of its last iterator, so it cannot be asked before the epoch's iterator exists)
        limited = [min(n, limit) for n, limit in counts]
        loop.max_batches = min(limited) if combined._mode == "min_size" else max(limited)
        interval = trainer.val_check_interval
        if (isinstance(interval, float) and getattr(trainer, "_val_check_time_interval", None) is None
                and trainer.val_check_batch not in (None, float("inf"))):
            trainer.val_check_batch = max(1, int(loop.max_batches * interval))


def _train_loaders(trainer) -> list:
    """The train DataLoaders Lightning iterates (flattened from its CombinedLoader)."""
    combined = trainer.fit_loop._combined_loader
    if combined is not None:
        return list(combined.flattened)
    loader = trainer.train_dataloader
    return [] if loader is None else [loader]
