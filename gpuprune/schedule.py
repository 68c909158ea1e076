"""When to prune and when to select: the epoch schedule, usable without a Pruner.

A :class:`Schedule` answers, from arithmetic alone: is epoch ``e`` pruned or full data, does it draw a
new selection, how many samples does it train, and how many optimizer steps does each epoch and the
whole run take per rank. The Pruner asks it the first two questions; users size step-based learning
rate schedules (``OneCycleLR(total_steps=...)``) with :meth:`Schedule.total_steps`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ._checks import check_bool, check_int
from .sizes import num_batches, shard_size

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    """Which epochs train on full data and which reselect.

    Args:
        num_epochs: total epochs, or None for an open-ended run (then ``final_full_epochs`` must
            be 0). With it, epochs ``>= num_epochs`` are refused.
        warmup_epochs: full-data epochs at the start. Default ``0``.
        final_full_epochs: full-data epochs at the end. Default ``0``.
        selection_interval: a pruned epoch draws a new selection every this many epochs (counted
            from the first pruned epoch); in between the last selection is reused, reshuffled.
            Default ``1``.

    Example:
        >>> s = Schedule(num_epochs=10, warmup_epochs=1, final_full_epochs=2)
        >>> [s.is_full(e) for e in range(10)].count(True)
        3
        >>> s.total_steps(num_samples=1000, k=500, batch_size=100)
        65
    """

    num_epochs: int | None = None
    warmup_epochs: int = 0
    final_full_epochs: int = 0
    selection_interval: int = 1

    def __post_init__(self) -> None:
        if self.num_epochs is not None:
            check_int("num_epochs", self.num_epochs, minimum=1, maximum=2**31 - 1)
        check_int("warmup_epochs", self.warmup_epochs, minimum=0)
        check_int("final_full_epochs", self.final_full_epochs, minimum=0,
                  maximum=self.num_epochs)
        check_int("selection_interval", self.selection_interval, minimum=1)
        if self.final_full_epochs and self.num_epochs is None:
            raise ValueError(f"final_full_epochs={self.final_full_epochs} needs num_epochs")

    def check_epoch(self, epoch: int, name: str = "epoch") -> int:
        """``epoch`` as an int, or raise if it is negative, beyond ``num_epochs`` or too large for
        the per-sample state (int32 epochs)."""
        top = (self.num_epochs if self.num_epochs is not None else 2**31) - 1
        epoch = check_int(name, epoch, minimum=0)
        if epoch > top:
            what = (f"the schedule has num_epochs={self.num_epochs}" if self.num_epochs is not None
                    else "epochs are stored as int32")
            raise ValueError(f"{name} must be <= {top} ({what}), got {name}={epoch}")
        return epoch

    def is_full(self, epoch: int) -> bool:
        """Whether ``epoch`` trains on full data (a warm-up or final epoch)."""
        epoch = self.check_epoch(epoch)
        if epoch < self.warmup_epochs:
            return True
        return self.num_epochs is not None and epoch >= self.num_epochs - self.final_full_epochs

    def reselects(self, epoch: int) -> bool:
        """Whether a pruned ``epoch`` is due for a new selection (the first pruned epoch always is)."""
        epoch = self.check_epoch(epoch)
        return (epoch - self.warmup_epochs) % self.selection_interval == 0

    def epoch_size(self, epoch: int, num_samples: int, k: int) -> int:
        """Samples planned in ``epoch`` (all ranks together): N when full, else the budget k."""
        return num_samples if self.is_full(epoch) else k

    def steps(self, epoch: int, num_samples: int, k: int, batch_size: int, *,
              world_size: int = 1, drop_last: bool = False) -> int:
        """Optimizer steps of ``epoch`` on each rank (the same on every rank).

        ``drop_last`` applies to both the shard (cut to a multiple of ``world_size``) and the last
        batch, as in :class:`~gpuprune.PrunedSampler` and the DALI iterator with ``DROP``.
        """
        check_int("batch_size", batch_size, minimum=1)
        check_int("world_size", world_size, minimum=1)
        check_bool("drop_last", drop_last)
        per_rank = shard_size(self.epoch_size(epoch, num_samples, k), world_size, drop_last)
        return num_batches(per_rank, batch_size, drop_last)

    def total_steps(self, num_samples: int, k: int, batch_size: int, *, world_size: int = 1,
                    drop_last: bool = False) -> int:
        """Optimizer steps of the whole run on each rank: the sum of :meth:`steps` over epochs.

        Needs ``num_epochs``. The one step-count formula: :meth:`gpuprune.Pruner.total_steps` and
        the DALI iterator's ``total_steps`` call it. Exact for policies that plan exactly k
        samples; InfoBatch plans a data-dependent number (at most N), so ``k=num_samples`` gives an
        upper bound (``Pruner.total_steps(..., upper_bound=True)``).
        """
        if self.num_epochs is None:
            raise ValueError("total_steps needs a schedule with num_epochs")
        check_int("num_samples", num_samples, minimum=1)
        check_int("k", k, minimum=1, maximum=num_samples)
        return sum(self.steps(e, num_samples, k, batch_size, world_size=world_size,
                              drop_last=drop_last) for e in range(self.num_epochs))

    def config(self) -> dict:
        """The settings as a plain dict (for checkpoints and the cross-rank check)."""
        return asdict(self)
