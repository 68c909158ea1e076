"""The kind of every epoch: full or pruned, a new selection or a reused one, and its size.

A :class:`Schedule` answers, from arithmetic alone: is epoch ``e`` pruned or full data, does it
draw a new selection or reuse the last one, does a selection read the losses, how many samples does it plan, and how many optimizer steps does each epoch and the whole
run take per rank. It is the one home of these answers: the Pruner, the loaders and the re-score
pass ask it and read nothing else.

A policy shapes it through one hook (:meth:`gpuprune.Policy.rule`): InfoBatch adds its annealing
epochs and makes pruned sizes loss-dependent, ``Static`` selects once, ``"full"`` makes every
epoch full, and policies that ignore the losses say so. Users size step-based learning-rate
schedules (``OneCycleLR(total_steps=...)``) with :meth:`Schedule.total_steps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

from ._checks import check_bool, check_choice, check_float, check_int
from .sizes import budget, num_batches, shard_size

__all__ = ["Schedule", "KeepSchedule", "KEEP_SHAPES", "check_keep", "call_keep",
           "keep_fractions", "keep_budgets"]

#: the named shapes of a keep schedule ``(shape, start, end)``
KEEP_SHAPES = ("linear", "cosine")
#: what ``Pruner(keep=...)`` accepts: a constant fraction, ``(shape, start, end)``, or a callable
#: ``epoch -> fraction``
KeepSchedule = Union[float, tuple, Callable[[int], float]]

#: epochs are stored as int32 in the per-sample state
_MAX_EPOCHS = 2**31 - 1


@dataclass(frozen=True)
class Schedule:
    """Which epochs train on full data, which reselect, and how many samples each plans.

    Args:
        num_epochs: total epochs, or None for an open-ended run (then ``final_full_epochs`` must
            be 0). With it, epochs ``>= num_epochs`` are refused. Epochs count from 0, as
            ``DistributedSampler.set_epoch``'s.
        warmup_epochs: full-data epochs at the start. Default ``0``.
        final_full_epochs: full-data epochs at the end. ``None`` (default) leaves it to the
            policy (InfoBatch: its annealing epochs); a Schedule used on its own reads None as 0.
        selection_interval: a pruned epoch draws a new selection every this many epochs (counted
            from the first pruned epoch); in between the last selection is reused, reshuffled.
            Default ``1``.
        all_full: every epoch trains on full data (the ``"full"`` baseline). Default ``False``.
        select_once: one selection for the whole run, drawn from epoch 0's generator and reused
            by every later pruned epoch (the static baselines). Default ``False``.
        exact_size: a pruned epoch plans exactly the budget k. ``False`` for a policy whose count
            depends on the losses (InfoBatch): its future pruned epochs have no known size.
            Default ``True``.
        reads_losses: a new selection depends on the observed losses. ``False`` for uniform and
            static selection (a re-score pass before them is pointless).
            Default ``True``.
        budgets: the budget of every epoch ``0 .. num_epochs - 1`` (a keep schedule, made by
            :func:`keep_budgets`), used for the pruned epochs in place of the run's constant k;
            ``None`` (default): every pruned epoch plans k.

    ``all_full`` to ``reads_losses`` are the policy's part: :meth:`gpuprune.Policy.rule` sets
    them; ``budgets`` is the Pruner's, from its ``keep`` schedule.

    Example:
        >>> s = Schedule(num_epochs=10, warmup_epochs=1, final_full_epochs=2)
        >>> [s.is_full(e) for e in range(10)].count(True)
        3
        >>> s.total_steps(num_samples=1000, k=500, batch_size=100)
        65
    """

    num_epochs: int | None = None
    warmup_epochs: int = 0
    final_full_epochs: int | None = None
    selection_interval: int = 1
    all_full: bool = False
    select_once: bool = False
    exact_size: bool = True
    reads_losses: bool = True
    budgets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_epochs is not None:
            check_int("num_epochs", self.num_epochs, minimum=1, maximum=_MAX_EPOCHS)
        check_int("warmup_epochs", self.warmup_epochs, minimum=0)
        if self.final_full_epochs is not None:
            check_int("final_full_epochs", self.final_full_epochs, minimum=0,
                      maximum=self.num_epochs)
            if self.final_full_epochs and self.num_epochs is None:
                raise ValueError(f"final_full_epochs={self.final_full_epochs} needs num_epochs")
        check_int("selection_interval", self.selection_interval, minimum=1)
        for name in ("all_full", "select_once", "exact_size", "reads_losses"):
            check_bool(name, getattr(self, name))
        if self.budgets is not None:
            if self.num_epochs is None or not isinstance(self.budgets, tuple) \
                    or len(self.budgets) != self.num_epochs:
                raise ValueError(f"budgets must be a tuple of num_epochs={self.num_epochs} "
                                 f"per-epoch budgets, got budgets={self.budgets!r}")
            for e, b in enumerate(self.budgets):
                check_int(f"budgets[{e}]", b, minimum=1)

    @property
    def final(self) -> int:
        """Full-data epochs at the end (``final_full_epochs``, None read as 0)."""
        return self.final_full_epochs or 0

    def check_epoch(self, epoch: int, name: str = "epoch") -> int:
        """``epoch`` as an int, or raise if it is negative, beyond ``num_epochs`` or too large for
        the per-sample state (int32 epochs). Epochs count from 0, as in
        ``DistributedSampler.set_epoch``: a loop ``for epoch in range(1, num_epochs + 1)`` would
        skip epoch 0 and fail at its last epoch, and the message says so."""
        epoch = check_int(name, epoch, minimum=0)
        top = (self.num_epochs if self.num_epochs is not None else _MAX_EPOCHS + 1) - 1
        if epoch > top:
            what = (f"epochs count from 0; the schedule has num_epochs={self.num_epochs}"
                    if self.num_epochs is not None else "epochs are stored as int32")
            raise ValueError(f"{name} must be <= {top} ({what}), got {name}={epoch}")
        return epoch

    # ------------------------------------------------------------------ the kind of an epoch
    def is_full(self, epoch: int) -> bool:
        """Whether ``epoch`` trains on full data (a warm-up or final epoch, or ``all_full``)."""
        epoch = self.check_epoch(epoch)
        if self.all_full or epoch < self.warmup_epochs:
            return True
        return self.num_epochs is not None and epoch >= self.num_epochs - self.final

    def interval_start(self, epoch: int) -> int:
        """The epoch that starts ``epoch``'s selection interval (the pruned epochs from
        ``warmup_epochs`` on, in runs of ``selection_interval``): by the interval alone, the
        epoch whose selection a pruned ``epoch`` trains."""
        epoch = self.check_epoch(epoch)
        w, i = self.warmup_epochs, self.selection_interval
        return w + (epoch - w) // i * i

    def reselects(self, epoch: int) -> bool:
        """Whether a pruned ``epoch`` is due for a new selection by the interval alone (the first
        pruned epoch always is); see :meth:`reuses` for the whole rule."""
        return self.interval_start(epoch) == self.check_epoch(epoch)

    def reuses(self, epoch: int, previous: int | None) -> bool:
        """Whether a pruned ``epoch`` planned right after the plan of epoch ``previous`` (None: no
        plan yet) reuses that plan's selection, reshuffled: the previous plan was pruned, and the
        policy selects once or the interval is not due. False for a full ``epoch``."""
        if self.is_full(epoch) or previous is None or self.is_full(previous):
            return False
        return self.select_once or not self.reselects(epoch)

    def selects(self, epoch: int, previous: int | None) -> bool:
        """Whether ``epoch``, planned right after the plan of epoch ``previous``, draws a new
        selection: a pruned epoch that does not reuse one."""
        return not self.is_full(epoch) and not self.reuses(epoch, previous)

    def draw_epoch(self, epoch: int) -> int:
        """The epoch whose generator a selection in ``epoch`` draws from: 0 when selecting once
        (so the one subset does not depend on when it is drawn), else ``epoch``."""
        return 0 if self.select_once else epoch

    # ------------------------------------------------------------------ sizes
    def budget(self, epoch: int, k: int) -> int:
        """The budget of a pruned ``epoch``: ``budgets[epoch]`` under a keep schedule, else k."""
        return k if self.budgets is None else self.budgets[self.check_epoch(epoch)]

    def epoch_size(self, epoch: int, num_samples: int, k: int) -> int | None:
        """Samples planned in ``epoch`` (all ranks together): N when full, else the epoch's budget
        (:meth:`budget`: k, or the keep schedule's), or None for a pruned epoch whose size depends
        on the losses (``exact_size=False``)."""
        if self.is_full(epoch):
            return num_samples
        return self.budget(epoch, k) if self.exact_size else None

    def steps(self, epoch: int, num_samples: int, k: int, batch_size: int, *,
              world_size: int = 1, drop_last: bool = False, drop_last_batch: bool | None = None,
              accumulate: int = 1) -> int | None:
        """Optimizer steps of ``epoch`` on each rank (the same on every rank), or None when the
        epoch's size depends on the losses.

        ``drop_last`` applies to both the shard (cut to a multiple of ``world_size``) and the last
        batch, as in :class:`~gpuprune.PrunedSampler` and the DALI iterator with ``DROP``;
        ``drop_last_batch`` (None, the default: as ``drop_last``) sets the last batch apart, for a
        loader that drops it from a padded shard (``DataLoader(drop_last=True)`` over the sampler's
        default). ``accumulate`` batches make one optimizer step (default 1), and a last,
        incomplete accumulation steps too, as in PyTorch Lightning and the Hugging Face Trainer.
        """
        drop_batch, accumulate = _check_batching(batch_size, world_size, drop_last,
                                                 drop_last_batch, accumulate)
        n = self.epoch_size(epoch, num_samples, k)
        return None if n is None else _steps(n, batch_size, world_size, drop_last, drop_batch,
                                             accumulate)

    def total_steps(self, num_samples: int, k: int, batch_size: int, *, world_size: int = 1,
                    drop_last: bool = False, upper_bound: bool = False,
                    drop_last_batch: bool | None = None, accumulate: int = 1,
                    epochs: int | None = None) -> int:
        """Optimizer steps of the whole run on each rank: the sum of :meth:`steps` over epochs
        ``0 .. epochs - 1`` (``epochs``: default ``num_epochs``, at most it; a framework's
        ``max_epochs`` may stop earlier).

        Needs ``num_epochs``. The one step-count formula: :meth:`gpuprune.Pruner.total_steps`, the
        DALI iterator's ``total_steps`` and the framework glue (:mod:`gpuprune.integrations`) call
        it. Exact when every epoch's size is known (``exact_size``); otherwise it raises unless
        ``upper_bound``, which counts every pruned epoch of unknown size with all N samples (the
        schedule then never runs out).
        """
        if self.num_epochs is None:
            raise ValueError("total_steps needs a schedule with num_epochs")
        check_int("num_samples", num_samples, minimum=1)
        check_int("k", k, minimum=1, maximum=num_samples)
        drop_batch, accumulate = _check_batching(batch_size, world_size, drop_last,
                                                 drop_last_batch, accumulate)
        end = self.num_epochs if epochs is None else check_int("epochs", epochs, minimum=0,
                                                               maximum=self.num_epochs)
        if not check_bool("upper_bound", upper_bound) and not self.exact_size:
            raise ValueError(
                "the policy plans a loss-dependent number of samples, so the run's step count is "
                "not known in advance; pass upper_bound=True for the bound that counts every "
                "pruned epoch with all N samples, or use an epoch-based schedule")
        kw = dict(world_size=world_size, drop_last=drop_last, drop_last_batch=drop_batch,
                  accumulate=accumulate)
        steps = (self.steps(e, num_samples, k, batch_size, **kw) for e in range(end))
        return sum(_steps(num_samples, batch_size, world_size, drop_last, drop_batch, accumulate)
                   if n is None else n for n in steps)

    def config(self) -> dict:
        """The run's settings as a plain dict (for checkpoints and the cross-rank check):
        ``num_epochs``, ``warmup_epochs``, ``final_full_epochs``, ``selection_interval`` and,
        under a keep schedule only, ``budgets``. The
        policy's part is not repeated here: it follows from the policy's settings, which the
        configuration holds too (and the format stays the one of 0.2 checkpoints)."""
        out = {"num_epochs": self.num_epochs, "warmup_epochs": self.warmup_epochs,
               "final_full_epochs": self.final, "selection_interval": self.selection_interval}
        if self.budgets is not None:        # only under a keep schedule: 0.2's format otherwise
            out["budgets"] = list(self.budgets)
        return out


def _check_batching(batch_size: int, world_size: int, drop_last: bool,
                    drop_last_batch: bool | None = None, accumulate: int = 1) -> tuple[bool, int]:
    """Check the batching arguments; return ``(drop_last_batch, accumulate)`` resolved."""
    check_int("batch_size", batch_size, minimum=1)
    check_int("world_size", world_size, minimum=1)
    check_bool("drop_last", drop_last)
    drop_batch = drop_last if drop_last_batch is None else check_bool("drop_last_batch",
                                                                      drop_last_batch)
    return drop_batch, check_int("accumulate", accumulate, minimum=1)


def _steps(n: int, batch_size: int, world_size: int, drop_last: bool, drop_batch: bool,
           accumulate: int) -> int:
    """Optimizer steps one rank takes from a plan of ``n`` samples shared over ``world_size``
    ranks: its batches, ``accumulate`` to a step (a last, incomplete group steps too)."""
    return -(-num_batches(shard_size(n, world_size, drop_last), batch_size, drop_batch)
             // accumulate)


# ---------------------------------------------------------------------- keep schedules
def check_keep(keep) -> float | tuple | Callable[[int], float]:
    """``keep`` checked: a float in (0, 1] (returned as a float), a ``(shape, start, end)`` with
    ``shape`` in :data:`KEEP_SHAPES` and both fractions in (0, 1] (returned as a tuple), or a
    callable (checked later, over every epoch, by :func:`keep_fractions`). TypeError/ValueError
    naming ``keep`` otherwise."""
    if callable(keep):
        return keep
    if isinstance(keep, (tuple, list)):
        if len(keep) != 3:
            raise ValueError(f"keep as a schedule must be (shape, start, end) with shape in "
                             f"{list(KEEP_SHAPES)}, got keep={keep!r}")
        shape = check_choice("keep[0] (the schedule's shape)", keep[0], KEEP_SHAPES)
        return (shape, check_float("keep[1] (start)", keep[1], low=0.0, high=1.0, low_open=True),
                check_float("keep[2] (end)", keep[2], low=0.0, high=1.0, low_open=True))
    return check_float("keep", keep, low=0.0, high=1.0, low_open=True)


def call_keep(keep: Callable[[int], float], num_epochs: int) -> tuple[float, ...]:
    """``keep(e)`` for every epoch ``0 .. num_epochs - 1``, each checked to be a real number in
    (0, 1] (TypeError/ValueError naming the epoch, as ``keep(3)``); an exception inside ``keep``
    becomes a ValueError naming the epoch."""
    out = []
    for e in range(num_epochs):
        try:
            value = keep(e)
        except Exception as err:  # noqa: BLE001 - named, then re-raised
            raise ValueError(f"keep({e}) raised {type(err).__name__}: {err}") from err
        out.append(check_float(f"keep({e})", value, low=0.0, high=1.0, low_open=True))
    return tuple(out)


def keep_fractions(keep, schedule: Schedule) -> list[float]:
    """The fraction kept in every epoch ``0 .. num_epochs - 1`` of ``schedule`` (its full epochs
    settled): 1.0 in a full epoch; in a pruned epoch, the keep schedule's value at the epoch whose
    selection it trains (itself, or under ``selection_interval > 1`` the epoch that drew the
    selection it reuses, so a reused selection keeps its size).

    * a float: that fraction in every pruned epoch;
    * ``("linear", start, end)``: ``start + (end - start) * i / (P - 1)`` in the i-th of the P
      pruned epochs that select (``start`` when P = 1);
    * ``("cosine", start, end)``: ``end + (start - end) * (1 + cos(pi * i / (P - 1))) / 2``;
    * a callable: ``keep(epoch)``, called for **every** epoch (full ones included) and checked
      to be a real number in (0, 1]; ValueError/TypeError naming the epoch otherwise.
    """
    if schedule.num_epochs is None:
        raise ValueError(f"a keep schedule needs num_epochs, got keep={keep!r} and "
                         f"num_epochs=None")
    epochs = range(schedule.num_epochs)
    if callable(keep):
        asked = call_keep(keep, schedule.num_epochs)
    else:
        keep = check_keep(keep)
        selecting = [e for e in epochs if not schedule.is_full(e) and schedule.reselects(e)]
        asked = [1.0] * schedule.num_epochs
        if isinstance(keep, float):
            asked = [keep] * schedule.num_epochs
        else:
            shape, start, end = keep
            last = max(len(selecting) - 1, 1)
            for i, e in enumerate(selecting):
                t = i / last
                asked[e] = (start + (end - start) * t if shape == "linear"
                            else end + (start - end) * (1.0 + math.cos(math.pi * t)) / 2.0)
    out = []
    for e in epochs:
        if schedule.is_full(e):
            out.append(1.0)
        else:   # the epoch whose selection e trains (itself unless it reuses one)
            out.append(asked[schedule.interval_start(e)])
    return out


def keep_budgets(keep, schedule: Schedule, num_samples: int) -> tuple[int, ...]:
    """Every epoch's budget under ``keep`` (:func:`keep_fractions`): ``round(f * N)`` (half up,
    at least 1, as :func:`gpuprune.sizes.budget`), N in a full epoch."""
    return tuple(num_samples if schedule.is_full(e) else budget(f, num_samples)
                 for e, f in enumerate(keep_fractions(keep, schedule)))
