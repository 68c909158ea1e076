"""The re-score pass: fresh losses for samples that were not trained, before a selection.

Only trained samples get new losses, so the statistics of the others go stale (and UCB can lock in
on one subset: see :mod:`gpuprune.policies.ucb`). A public reimplementation of the paper's methods
refreshes the scores with a forward-only pass before each selection; this module offers that pass.
Before an epoch that draws a new selection (every ``selection_interval``), :meth:`Refresher.run`
runs the model in inference mode (``torch.inference_mode()``, ``model.eval()``, the training flag
restored afterwards) over

* ``which="unselected"`` (default): the samples the current plan did not train,
* ``which="all"``: every sample,
* either one cut to a random ``share`` of it, drawn with a keyed hash seeded from (seed, epoch),

and records the per-sample losses with :meth:`Pruner.observe <gpuprune.Pruner.observe>`: the
statistics move exactly as for a training observation (stamped with the current plan's epoch), but
nothing counts as training (``rounds``, ``selected`` and ``history`` change only in
:meth:`Pruner.plan <gpuprune.Pruner.plan>`). The pass is not free (one forward per refreshed
sample, about a third of a training step): charge its time, as ``gpuprune bench --refresh`` does.

Losses come from ``model.eval()``: with batch norm or dropout they differ from training-mode
losses of the same weights (batch statistics vs running statistics), as in any evaluation.

Three ways to feed it, all giving each sample the same loss:

* **In-memory tensors** ``(x, y)`` indexed by sample id: the pass gathers the samples itself.
* **A DataLoader** over only the samples to refresh: :meth:`Refresher.sampler` is a
  :class:`~gpuprune.PrunedSampler` whose epochs hold exactly them::

      refresher = Refresher(pruner, which="unselected")     # from gpuprune.refresh
      rloader = DataLoader(gpuprune.IndexedDataset(train_set), batch_size=1024,
                           sampler=refresher.sampler())
      for epoch in range(num_epochs):
          refresher.run(model, rloader, epoch, transform=lambda x: x.cuda())   # no-op unless due
          loader.sampler.set_epoch(epoch)
          ...

* **DALI**: a :class:`~gpuprune.dali.PrunedDALIIterator` over :attr:`Refresher.feed` (a
  :class:`~gpuprune.shard.Planner` whose plans are the samples to refresh) and the same source and
  graph as training, without random augmentation::

      rit = gpuprune.dali.build_iterator(refresher.feed, source, eval_graph, batch_size=1024)
      refresher.run(model, rit, epoch)

  The pass calls ``set_epoch(epoch)`` on the iterator (or on a DataLoader's sampler) after choosing
  the samples, so the loader plans them. Any other iterable of ``(x, y, idx)`` batches (or DALI's
  ``[{"data", "label", "index"}]``) works too: samples not due are skipped before the forward.

**All or nothing.** A pass validates and computes every batch before it records anything: a bad
``loss_fn`` output, a sample id outside ``[0, N)`` or an exception anywhere in the forward passes
raises (a ValueError naming the argument and the value) with nothing recorded. Until then the
observations are staged on the Pruner's device, 8 bytes per refreshed sample (an id in the id
dtype, int32 up to 2**31 samples, and a float32 loss), at most N of them: at most half the
statistics' 16 bytes per sample, and as much again for the moment they are joined and recorded with
one ``observe`` (each sample is observed at most once per pass, so one call records exactly what
one call per batch would).

Under ``torch.distributed`` the feed has the main Pruner's rank and world size, so each rank
refreshes its share (in-memory tensors are shared out the same way) without the wrap-around padding
a loader's share may end with (:meth:`EpochShard.owned <gpuprune.shard.EpochShard.owned>`: a padded
sample is another rank's, and a second observation of it would weigh it twice); the observations
are merged at the next plan like training ones, so the statistics equal those of one process
refreshing every target (``tests/test_refresh.py``, 2 and 4 gloo ranks, in-memory tensors and a
DataLoader). The targets are a pure function of the main Pruner's (already identical) plan, so the
feed needs no collective of its own.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ._checks import check_batch, check_choice, check_float, check_int
from .plan import Plan
from .pruner import Pruner
from .rng import draw_seeds, epoch_generator, shuffle_seed
from .sampler import PrunedSampler
from .shard import EpochShard
from .sizes import index_dtype, owned_size
from .update import prepare_losses

__all__ = ["Refresher", "RefreshResult", "RefreshFeed", "refresh_scores", "refresh_due",
           "refresh_targets", "WHICH"]

#: the sample sets a refresh pass can cover
WHICH = ("unselected", "all")
#: generator stream of the random share (the Pruner uses streams 0 and 1)
_REFRESH_STREAM = 0x52F5


@dataclass(frozen=True)
class RefreshResult:
    """What one pass did.

    Attributes:
        epoch: the epoch about to be planned.
        requested: samples due on this rank (for an iterable that is not the feed, all ranks').
        scored: samples whose loss was recorded (one observation each).
    """

    epoch: int
    requested: int
    scored: int


def refresh_due(pruner: Pruner, epoch: int) -> bool:
    """Whether ``pruner.plan(epoch)`` will draw a new selection from the losses, after a plan.

    True when a plan exists for an earlier epoch, ``epoch`` is pruned, the policy's selections read
    the losses (``Schedule.reads_losses``: not ``uniform``, ``static``, ``full``), and the plan
    reselects (:meth:`Pruner.will_select`): the first pruned epoch after full ones, then every
    ``selection_interval``. A pure read of the Pruner.
    """
    epoch = pruner.check_epoch(epoch)
    if pruner.current_plan is None or not pruner.schedule.reads_losses:
        return False
    return pruner.will_select(epoch)


def refresh_targets(pruner: Pruner, epoch: int, which: str = "unselected", share: float = 1.0,
                    seed: int | None = None) -> torch.Tensor:
    """The sample ids a pass before ``epoch`` covers (1-D, on the Pruner's device, ascending
    unless ``share < 1``).

    ``"unselected"``: the samples not in the current plan (all of them before any plan, none after
    a full epoch); ``"all"``: every sample. With ``share < 1``, ``floor(share * n + 0.5)`` of those
    ``n`` (at least 1 when ``n > 0``), drawn uniformly without replacement by the keyed hash of a
    seed drawn from a generator seeded from (``seed``, ``epoch``) (``seed`` defaults to the
    Pruner's): the same on every rank and device.
    """
    which = check_choice("which", which, WHICH)
    share = check_float("share", share, low=0.0, high=1.0, low_open=True)
    seed = pruner.seed if seed is None else check_int("seed", seed)
    epoch = pruner.check_epoch(epoch)
    n = pruner.num_samples
    plan = pruner.current_plan
    mask = torch.ones(n, dtype=torch.bool, device=pruner.device)
    if which == "unselected" and plan is not None:
        if plan.full:
            mask.zero_()
        else:
            mask[plan.indices.long()] = False
    if share >= 1.0:
        return torch.nonzero(mask).flatten()
    count = int(mask.sum())
    m = 0 if count == 0 else max(1, math.floor(share * count + 0.5))
    score = torch.where(mask, torch.zeros(n, dtype=torch.float32, device=pruner.device),
                        torch.full((n,), float("-inf"), device=pruner.device))
    (hseed,) = draw_seeds(epoch_generator(seed, epoch, _REFRESH_STREAM), 1)
    return pruner.backend.top_k(score, n, m, hseed).long()


class RefreshFeed:
    """The samples a re-score pass covers, as a :class:`~gpuprune.shard.Planner`: ``plan(epoch)``
    holds exactly :meth:`Refresher.targets` ``(epoch)``, in the order the main Pruner would shuffle
    them (seed, epoch), so a :class:`~gpuprune.PrunedSampler` or a DALI iterator over it loads only
    them. It has the main Pruner's rank, world size and epochs, and no statistics or collectives of
    its own: the targets are a pure function of the main Pruner's current plan."""

    def __init__(self, refresher: "Refresher") -> None:
        self.refresher = refresher
        self._plan: tuple[Any, Plan] | None = None     # (targets tensor, its plan)

    @property
    def num_samples(self) -> int:
        return self.refresher.pruner.num_samples

    @property
    def rank(self) -> int:
        return self.refresher.pruner.rank

    @property
    def world_size(self) -> int:
        return self.refresher.pruner.world_size

    @property
    def num_epochs(self) -> int | None:
        return self.refresher.pruner.num_epochs

    @property
    def device(self) -> torch.device:
        return self.refresher.pruner.device

    def check_epoch(self, epoch: int, name: str = "epoch") -> int:
        return self.refresher.pruner.check_epoch(epoch, name)

    def epoch_size(self, epoch: int) -> int:
        """The number of targets of a pass before ``epoch`` (computes them once; no planning)."""
        return int(self.refresher.targets(self.check_epoch(epoch)).numel())

    def plan(self, epoch: int) -> Plan:
        """The targets of ``epoch``, shuffled; the same Plan object while they do not change."""
        targets = self.refresher.targets(self.check_epoch(epoch))
        cached = self._plan
        if cached is None or cached[0] is not targets:
            p = self.refresher.pruner
            ids = targets.to(index_dtype(p.num_samples))
            plan = Plan(epoch, p.backend.shuffle(ids, shuffle_seed(p.seed, epoch)), False,
                        p.num_samples)
            self._plan = cached = (targets, plan)
        return cached[1]

    def __repr__(self) -> str:
        return f"RefreshFeed({self.refresher!r})"


class Refresher:
    """Re-score samples with a forward-only pass before selections (see the module docstring).

    Args:
        pruner: the Pruner whose statistics the pass updates.
        which: ``"unselected"`` (default) or ``"all"``.
        share: fraction of those refreshed, in (0, 1]. Default ``1.0``.
        seed: seed of the random share; defaults to the Pruner's seed.
    """

    def __init__(self, pruner: Pruner, which: str = "unselected", share: float = 1.0,
                 seed: int | None = None) -> None:
        if not isinstance(pruner, Pruner):
            raise TypeError(f"pruner must be a gpuprune.Pruner, got {type(pruner).__name__}")
        self.pruner = pruner
        self.which = check_choice("which", which, WHICH)
        self.share = check_float("share", share, low=0.0, high=1.0, low_open=True)
        self.seed = pruner.seed if seed is None else check_int("seed", seed)
        #: the samples to refresh as a Planner, for a loader that should load only them
        self.feed = RefreshFeed(self)
        self._targets: tuple[int, Any, torch.Tensor] | None = None   # (epoch, plan, ids)

    def __repr__(self) -> str:
        return f"Refresher(which={self.which!r}, share={self.share}, seed={self.seed})"

    def due(self, epoch: int) -> bool:
        """Whether a pass belongs before ``epoch`` (:func:`refresh_due`)."""
        return refresh_due(self.pruner, epoch)

    def targets(self, epoch: int) -> torch.Tensor:
        """The ids a pass before ``epoch`` covers (:func:`refresh_targets`), computed once per
        (epoch, current plan)."""
        plan = self.pruner.current_plan
        cached = self._targets
        if cached is None or cached[0] != epoch or cached[1] is not plan:
            ids = refresh_targets(self.pruner, epoch, self.which, self.share, self.seed)
            self._targets = cached = (epoch, plan, ids)
        return cached[2]

    def sampler(self, **kwargs) -> PrunedSampler:
        """A :class:`~gpuprune.PrunedSampler` over :attr:`feed` (keyword arguments pass through)."""
        return PrunedSampler(self.feed, **kwargs)

    def run(self, model: torch.nn.Module, data, epoch: int, *,
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
            batch_size: int = 1024, force: bool = False) -> RefreshResult:
        """The pass before ``epoch`` (call it before ``plan(epoch)`` / ``set_epoch(epoch)``).

        Does nothing (``scored == 0``) unless :meth:`due` or ``force``.

        Args:
            model: the model; run in ``eval()`` mode under ``torch.inference_mode()``, its training
                flag restored afterwards.
            data: ``(x, y)`` tensors of all N samples indexed by sample id, or an iterable of
                batches ``(x, y, idx)`` / DALI ``[{"data", "label", "index"}]`` (a loader over
                :meth:`sampler` or :attr:`feed`, or any loader: samples not due are skipped).
            epoch: the epoch about to be planned.
            loss_fn: ``loss_fn(outputs, targets)`` -> one loss per sample. Default: cross-entropy
                with ``reduction="none"``. Use the training criterion (e.g. its label smoothing).
            transform: applied to each input batch before the model (e.g. normalisation, moving
                to the GPU). Inputs are moved to the model's device first.
            batch_size: batch size for in-memory tensors. Default ``1024``.
            force: run even when not due.

        Raises:
            TypeError, ValueError: a bad argument, a bad batch (an id outside ``[0, N)``, not a
                tensor of ids) or a bad ``loss_fn`` output, naming the argument and the value.
                Nothing is recorded then (see "All or nothing" in the module docstring).
        """
        epoch = self.pruner.check_epoch(epoch)
        batch_size = check_int("batch_size", batch_size, minimum=1)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        tensors = _as_tensor_pair(data)
        if tensors is None and not isinstance(data, Iterable):
            raise TypeError(f"data must be a pair (x, y) of tensors or an iterable of batches, got "
                            f"{type(data).__name__}")
        planner = None if tensors is not None else _planner_of(data)
        if planner is not None and planner.pruner is self.pruner:
            raise ValueError("data iterates the training Pruner's own plans: a refresh pass over "
                             "it would plan the next epoch before the fresh losses are recorded; "
                             "pass a loader over refresher.sampler() / refresher.feed, or one "
                             "that is not driven by this Pruner")
        if not (force or self.due(epoch)):
            return RefreshResult(epoch, 0, 0)
        targets = self.targets(epoch)
        if targets.numel() == 0:
            return RefreshResult(epoch, 0, 0)
        loss_fn = loss_fn if loss_fn is not None else _cross_entropy
        was_training = model.training
        model.eval()
        try:
            if tensors is not None:
                return self._run_tensors(model, tensors, epoch, loss_fn, transform, batch_size)
            return self._run_batches(model, data, epoch, targets, loss_fn, transform)
        finally:
            model.train(was_training)

    # ------------------------------------------------------------------ feeding
    def _run_tensors(self, model, tensors, epoch, loss_fn, transform, batch_size) -> RefreshResult:
        x_all, y_all = tensors
        n = self.pruner.num_samples
        if len(x_all) != n or len(y_all) != n:
            raise ValueError(f"data tensors must hold all num_samples={n} samples, got "
                             f"x: {len(x_all)}, y: {len(y_all)}")
        view = EpochShard(self.feed)            # this rank's share, in the order a loader gets
        view.set_epoch(epoch)
        ids = view.owned()                      # without the padding: each target once overall
        staged = _Staged(self.pruner)
        for s in range(0, ids.numel(), batch_size):
            b = ids[s:s + batch_size]
            staged.add(b, self._losses(model, x_all[b.to(x_all.device)], y_all[b.to(y_all.device)],
                                       b, loss_fn, transform))
        return RefreshResult(epoch, int(ids.numel()), staged.record())

    def _run_batches(self, model, data, epoch, targets, loss_fn, transform) -> RefreshResult:
        p = self.pruner
        planner = _planner_of(data)
        own = None
        if planner is not None and planner.pruner is self.feed:
            planner.set_epoch(epoch)             # the loader now plans exactly the targets
            if p.world_size > 1:
                own = _own_share(planner, targets.numel(), p.rank, p.world_size)
        due = torch.zeros(p.num_samples, dtype=torch.bool, device=p.device)
        due[targets if own is None else own.to(p.device).long()] = True
        staged = _Staged(p)
        for i, batch in enumerate(data):
            x, y, idx = _unpack(batch)
            idx = _checked_ids(idx, p.num_samples, i).to(p.device)
            keep = due[idx]
            if not bool(keep.all()):
                pos = torch.nonzero(keep).flatten()
                x, y, idx = x[pos.to(x.device)], y[pos.to(y.device)], idx[pos]
            if idx.numel():
                due[idx] = False                 # one observation per sample and pass
                staged.add(idx, self._losses(model, x, y, idx, loss_fn, transform))
        scored = staged.record()
        requested = int(targets.numel() if own is None else own.numel())
        if p.world_size == 1 and scored < requested:
            warnings.warn(f"gpuprune refresh before epoch {epoch}: the data delivered {scored} of "
                          f"the {requested} samples due; the others keep their old losses",
                          RuntimeWarning, stacklevel=3)
        return RefreshResult(epoch, requested, scored)

    def _losses(self, model, x, y, idx, loss_fn, transform) -> torch.Tensor:
        """The batch's losses as the Pruner will record them (float32 on its device), checked."""
        dev = _device_of(model, x.device)
        # only the forward runs in inference mode: the observation is recorded outside it, since
        # a distributed Pruner's log may grow then, and tensors allocated in inference mode cannot
        # be written by the training steps that follow
        with torch.inference_mode():
            x = x.to(dev)
            if transform is not None:
                x = transform(x)
            losses = loss_fn(model(x), y.to(dev))
        if not isinstance(losses, torch.Tensor) or losses.shape != idx.shape:
            raise ValueError(f"loss_fn must return one loss per sample (shape {tuple(idx.shape)}), "
                             f"got {getattr(losses, 'shape', type(losses).__name__)}")
        p = self.pruner
        losses = losses.to(p.device)
        check_batch(idx.to(p.device), losses, p.device, p.num_samples, loss_name="loss_fn's output")
        return prepare_losses(losses)


def refresh_scores(model: torch.nn.Module, data, pruner: Pruner, epoch: int, *,
                   which: str = "unselected", share: float = 1.0, seed: int | None = None,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                   transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   batch_size: int = 1024, force: bool = False) -> RefreshResult:
    """One pass before ``epoch`` with in-memory tensors or any iterable of batches: a
    :class:`Refresher` used once (see :meth:`Refresher.run`). For loaders that should load only the
    due samples, keep a :class:`Refresher` and use its :meth:`~Refresher.sampler` or
    :attr:`~Refresher.feed`."""
    return Refresher(pruner, which, share, seed).run(model, data, epoch, loss_fn=loss_fn,
                                                     transform=transform, batch_size=batch_size,
                                                     force=force)


# ------------------------------------------------------------------------------ helpers
class _Staged:
    """A pass's checked (ids, losses), recorded with one observe once every batch has passed."""

    def __init__(self, pruner: Pruner) -> None:
        self.pruner = pruner
        self.ids: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []

    def add(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        p = self.pruner
        self.ids.append(ids.to(p.device, dtype=index_dtype(p.num_samples)))
        self.losses.append(losses)

    def record(self) -> int:
        """Observe everything staged (each id at most once, so one call equals one per batch)."""
        if not self.ids:
            return 0
        ids, losses = torch.cat(self.ids), torch.cat(self.losses)
        self.ids, self.losses = [], []
        self.pruner.observe(ids, losses, trained=False)     # not counted as trained samples
        return int(ids.numel())


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def _device_of(model: torch.nn.Module, default: torch.device) -> torch.device:
    for t in model.parameters():
        return t.device
    return default


def _as_tensor_pair(data):
    if (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)):
        return data[0], data[1]
    return None


def _planner_of(data):
    """The loader object of ``data`` that plans epochs from a planner (a DALI iterator, or a
    DataLoader's PrunedSampler), or None."""
    for obj in (data, getattr(data, "sampler", None)):
        if isinstance(getattr(obj, "pruner", None), (Pruner, RefreshFeed)) \
                and hasattr(obj, "set_epoch"):
            return obj
    return None


def _own_share(planner, n: int, rank: int, world_size: int) -> torch.Tensor:
    """The feed's samples this rank refreshes when ``planner`` (a loader over the feed whose
    ``set_epoch`` was just called with the pass's epoch) serves it a share of the ``n`` targets:
    :meth:`EpochShard.owned <gpuprune.shard.EpochShard.owned>`, the share without its wrap-around
    padding, so every target is refreshed once over all ranks (a padded copy would be a second
    observation, merged with weight ``1 - decay**2``)."""
    shard = getattr(planner, "shard", None)
    if isinstance(shard, EpochShard):
        return shard.owned()
    # a loader that keeps no EpochShard (the DALI iterator, until it delegates to one): its plan()
    # is its share, whose first owned_size entries are its own
    return planner.plan().indices[:owned_size(n, rank, world_size)]


def _checked_ids(idx, num_samples: int, batch: int) -> torch.Tensor:
    """A batch's sample ids as int64, or a ValueError/TypeError naming the batch and the id."""
    if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.is_complex() \
            or idx.dtype == torch.bool or idx.dim() != 1:
        got = (f"{idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor)
               else type(idx).__name__)
        raise TypeError(f"data must yield 1-D integer sample ids, got a {got} in batch {batch}")
    idx = idx.long()
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= num_samples:
            raise ValueError(f"data yielded sample id {lo if lo < 0 else hi} in batch {batch}, "
                             f"outside [0, {num_samples}); nothing was recorded")
    return idx


def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) == 1 and isinstance(batch[0], dict):
        batch = batch[0]                                   # DALI: one dict per pipeline
    if isinstance(batch, dict):
        try:
            return batch["data"], batch["label"], batch["index"]
        except KeyError as e:
            raise ValueError(f"a batch dict must have 'data', 'label' and 'index', got "
                             f"{sorted(batch)}") from e
    if isinstance(batch, (list, tuple)) and len(batch) >= 3:
        return batch[0], batch[1], batch[2]
    raise TypeError(f"batches must be (x, y, idx) or DALI's [{{'data', 'label', 'index'}}], got "
                    f"{type(batch).__name__}")
