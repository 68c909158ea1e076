"""The object users hold: plans each epoch, records every batch's losses, states facts.

The Pruner follows its policy's :class:`~gpuprune.policies.Rule` (the one hook, made at
construction): it asks the :class:`~gpuprune.Schedule` what kind each epoch is and the policy to
select. Its saved state (layout, checksum, validation) lives in :mod:`gpuprune.state`.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import replace
from typing import Any

import torch

from ._checks import check_batch, check_bool, check_float, check_int, resolve_device
from .backend import get_backend
from .distributed import DistributedError, EpochSync, Op, resolve_group
from .guard import CoverageGuard
from .library import compiling, record_traced
from .plan import Plan
from .planning import Planned, make_plan, run_rule
from .policies import POLICIES, Policy, make_policy
from .sampler import PrunedSampler
from .schedule import Schedule, check_keep
from .sizes import budget, shard_size
from .state import (FORMAT, Progress, check_extension, check_state, make_state,
                    saved_num_epochs)
from .stats import LossStats

__all__ = ["Pruner", "budget"]

#: Pruner keywords of gpuprune 0.1 that became policy settings under another name
_LEGACY_SETTINGS = {"static_scores": [("Static", "scores")]}


def _policy_settings() -> dict[str, list[tuple[str, str]]]:
    """Setting name -> the ``(policy class, parameter)`` pairs it belongs to: every constructor
    parameter of the registered policies, plus the 0.1 names. For the error a setting given to the
    Pruner raises, so its hint always names a real parameter."""
    table: dict[str, list[tuple[str, str]]] = {}
    for cls in POLICIES.values():
        for name, param in inspect.signature(cls).parameters.items():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                table.setdefault(name, []).append((cls.__name__, name))
    for name, owners in _LEGACY_SETTINGS.items():
        table.setdefault(name, []).extend(owners)
    return table


_POLICY_SETTINGS = _policy_settings()


def _refuse_policy_settings(settings: dict) -> None:
    """A policy setting given to the Pruner raises TypeError naming the policy it belongs to."""
    if settings:
        name = next(iter(settings))
        owners = _POLICY_SETTINGS.get(name, [])
        hint = ("; it is a setting of the policy: pass " + " or ".join(
            f"policy=gpuprune.{cls}({param}=...)" for cls, param in owners) if owners else "")
        raise TypeError(f"Pruner() got an unexpected keyword argument {name!r}{hint}")


def _keep_of(keep, prune_ratio: float | None):
    """The kept fraction from ``keep`` or ``prune_ratio`` (at most one given; default 0.5), or
    ``keep``'s schedule (:func:`gpuprune.schedule.check_keep`)."""
    if keep is not None and prune_ratio is not None:
        raise ValueError(f"give keep or prune_ratio, not both (got keep={keep}, "
                         f"prune_ratio={prune_ratio})")
    if prune_ratio is not None:
        return 1.0 - check_float("prune_ratio", prune_ratio, low=0.0, high=1.0, high_open=True)
    return 0.5 if keep is None else check_keep(keep)


def _keep_setting(keep):
    """``keep`` as a plain config value: the float, ``[shape, start, end]``, or ``"callable"``
    (a callable's values are in the schedule's ``budgets``)."""
    if isinstance(keep, float):
        return keep
    return list(keep) if isinstance(keep, tuple) else "callable"


class Pruner:
    """Dynamic data pruning for one training run.

    Each epoch, :meth:`plan` (called for you by :class:`~gpuprune.PrunedSampler` and the DALI
    iterator in ``set_epoch``) chooses the samples to train on; pass every batch's unreduced loss
    through :meth:`observe`, which records it and returns the (weighted) mean loss to backpropagate.

    Args:
        num_samples: N, the dataset size (at most 2**32).
        keep: fraction of samples kept per pruned epoch, in (0, 1]. Default ``0.5``. The budget is
            ``k = round(keep * N)`` (half up, at least 1). Or a **keep schedule** (with
            ``num_epochs``): ``("linear"|"cosine", start, end)`` over the pruned epochs that select,
            or a callable ``epoch -> fraction`` (:func:`gpuprune.schedule.keep_fractions`); each
            epoch's size is then :attr:`schedule`'s, :attr:`k` the first pruned epoch's. Refused for
            InfoBatch (sizes follow the losses) and a static subset whose size would change.
        prune_ratio: alternatively ``1 - keep``, in [0, 1). Give at most one of the two.
        policy: a :class:`~gpuprune.policies.Policy` instance holding its own settings, e.g.
            ``gpuprune.UCB(c=2.0)``, or a name for the defaults: ``"uniform"``,
            ``"epsilon_greedy"``, ``"ucb"`` (default), ``"infobatch"``, ``"static"``, ``"full"``.
        num_epochs: total epochs; needed for ``final_full_epochs`` and InfoBatch's annealing. With
            it, planning an epoch >= ``num_epochs`` is an error.
        warmup_epochs: full-data epochs at the start. Default ``0``.
        final_full_epochs: full-data epochs at the end. ``None`` (default) takes the policy's
            choice (InfoBatch: its annealing epochs; the others: 0).
        selection_interval: epochs between two selections; in between the last subset is reused,
            reshuffled. Default ``1``.
        decay: EMA weight kept from the old loss statistics per observation, in [0, 1); 0 keeps
            the latest loss only. ``None`` (default) takes the policy's default (0.9; 0.0 for
            InfoBatch, which scores by the latest loss).
        seed: seed of every random choice; plans are a function of (seed, epoch, observed losses).
        device: where the statistics live and selection runs. Default ``"cpu"``.
        process_group: ``"auto"`` (default) uses the default ``torch.distributed`` group when it is
            initialised with more than one rank (create the Pruner after ``init_process_group``);
            ``None`` never synchronises; or a ``ProcessGroup``. See :mod:`gpuprune.distributed`.
        backend: ``"auto"`` (default), ``"cuda"`` or ``"torch"``: see :mod:`gpuprune.backend`.
            Plans are the same either way.

    Example:
        >>> pruner = Pruner(1000, keep=0.3, policy="uniform", seed=0)
        >>> plan = pruner.plan(0)
        >>> len(plan), plan.indices.unique().numel()
        (300, 300)
    """

    def __init__(
        self,
        num_samples: int,
        keep: float | None = None,
        *,
        prune_ratio: float | None = None,
        policy: str | Policy = "ucb",
        num_epochs: int | None = None,
        warmup_epochs: int = 0,
        final_full_epochs: int | None = None,
        selection_interval: int = 1,
        decay: float | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        process_group: Any = "auto",
        backend: str = "auto",
        **policy_settings: Any,
    ) -> None:
        _refuse_policy_settings(policy_settings)
        # the keyed tie-break hashes ids as uint32: unique keys, hence exact k, need N <= 2**32
        num_samples = check_int("num_samples", num_samples, minimum=1, maximum=2**32)
        keep = _keep_of(keep, prune_ratio)
        if decay is not None:
            decay = check_float("decay", decay, low=0.0, high=1.0, high_open=True)
        asked = Schedule(num_epochs, warmup_epochs, final_full_epochs, selection_interval)
        rule = run_rule(make_policy(policy), keep, num_samples, asked, decay)
        #: the policy, its settings concrete for this run (it selects; nothing reads its kind)
        self.policy: Policy = rule.policy
        #: every epoch's kind and size: the one place the Pruner reads them from
        self.schedule: Schedule = rule.schedule
        #: the budget (the first pruned epoch's under a keep schedule: :meth:`epoch_size` says each)
        self.k = rule.k
        #: ``keep`` as given (a float, ``(shape, start, end)`` or a callable)
        self.keep = keep
        self.decay = rule.decay
        self.seed = check_int("seed", seed)
        self.device = resolve_device(device)
        self.backend = get_backend(backend, self.device, num_samples)
        group = resolve_group(process_group)
        self.stats = LossStats(num_samples, self.device)
        #: the process group statistics are merged over (None: single process)
        self.process_group = group
        self._sync = None if group is None else EpochSync(group, self.device, num_samples)
        #: the epoch observations are recorded under, as a 0-d CPU tensor for a compiled step (a
        #: Python int would be specialised on: one recompile per epoch); kept equal to _run.epoch
        self._epoch_now = torch.zeros((), dtype=torch.int64)
        self._set_run(Progress(None, 0, 0, -1, []))   # history overlaps: device scalars until read
        #: this rank's samples observed in the current epoch against its loader's: the coverage
        #: guard (:mod:`gpuprune.guard`), which warns when they do not match
        self.coverage = CoverageGuard(self.rank)
        self._asked = (asked, decay)              # for a checkpoint of a shorter run (extend)

    # ------------------------------------------------------------------ facts
    @property
    def num_samples(self) -> int:
        return self.stats.num_samples

    @property
    def num_epochs(self) -> int | None:
        return self.schedule.num_epochs

    @property
    def rank(self) -> int:
        """This process's rank in the process group (0 without one)."""
        return 0 if self._sync is None else self._sync.rank

    @property
    def world_size(self) -> int:
        """Ranks in the process group (1 without one)."""
        return 1 if self._sync is None else self._sync.world_size

    @property
    def current_plan(self) -> Plan | None:
        """The last plan made (or restored), or None."""
        return self._run.plan

    @property
    def rounds(self) -> int:
        """Pruned epochs planned so far."""
        return self._run.rounds

    def check_epoch(self, epoch: int, name: str = "epoch") -> int:
        """``epoch`` as an int, or raise naming ``name`` (see :meth:`Schedule.check_epoch`)."""
        return self.schedule.check_epoch(epoch, name)

    def is_full_epoch(self, epoch: int) -> bool:
        """Whether ``epoch`` trains on full data (:meth:`Schedule.is_full`)."""
        return self.schedule.is_full(epoch)

    def _previous(self) -> int | None:
        plan = self._run.plan
        return None if plan is None else plan.epoch

    def epoch_size(self, epoch: int) -> int | None:
        """Samples planned for ``epoch`` over all ranks, without planning it: the plan's size once
        it is made, else the schedule's (None for a future pruned InfoBatch epoch, whose size
        depends on the losses observed until then)."""
        epoch = self.schedule.check_epoch(epoch)
        plan = self._run.plan
        if plan is not None and plan.epoch == epoch:
            return len(plan)
        return self.schedule.epoch_size(epoch, self.num_samples, self.k)

    def shard_size(self, epoch: int, world_size: int | None = None, drop_last: bool = False
                   ) -> int | None:
        """Deprecated: ``gpuprune.shard.EpochShard(pruner, world_size, drop_last=...)
        .shard_size(epoch)``, the one home of a rank's share length."""
        warnings.warn("Pruner.shard_size is deprecated; use gpuprune.shard.EpochShard(pruner, ...)"
                      ".shard_size(epoch)", DeprecationWarning, stacklevel=2)
        n = self.epoch_size(epoch)
        w = self.world_size if world_size is None else check_int("world_size", world_size, minimum=1)
        return None if n is None else shard_size(n, w, check_bool("drop_last", drop_last))

    def total_steps(self, batch_size: int, *, drop_last: bool = False, world_size: int | None = None,
                    upper_bound: bool = False) -> int:
        """Optimizer steps of the whole run on each rank, for step-based learning-rate schedules
        (``OneCycleLR(total_steps=pruner.total_steps(batch_size))``): one rank's batches summed
        over the epochs, as the sampler and the DALI iterator deliver them
        (:meth:`gpuprune.Schedule.total_steps`, the one formula).

        Args:
            batch_size: samples per batch on each rank.
            drop_last: cut each rank's shard to an equal share and drop the last short batch (as
                ``PrunedSampler(drop_last=True)`` with ``DataLoader(drop_last=True)``, or DALI's
                ``LastBatchPolicy.DROP``). Default False.
            world_size: ranks sharing each epoch; None (default) takes :attr:`world_size`.
            upper_bound: where pruned epochs plan a loss-dependent number of samples (InfoBatch),
                the bound that counts each of them with all N samples; ignored where sizes are
                exact. Default False: such a schedule raises ValueError, as one without
                ``num_epochs`` does.
        """
        w = self.world_size if world_size is None else check_int("world_size", world_size, minimum=1)
        return self.schedule.total_steps(self.num_samples, self.k, batch_size, world_size=w,
                                         drop_last=drop_last, upper_bound=upper_bound)

    # ------------------------------------------------------------------ plan
    def plan(self, epoch: int) -> Plan:
        """The plan of ``epoch``: sample ids in training order and their loss weights.

        The first call for an epoch selects; later calls for the same epoch return the same plan.
        Epochs must not go backwards; they may skip ahead. All or nothing: if anything fails (or is
        interrupted) the Pruner is as it was, and a retry plans the same epoch again. At most one
        host synchronisation (InfoBatch's kept count, or the out-of-range-id check on a GPU). Under
        a process group this is a collective: every rank must call it for every new epoch.
        """
        epoch, current = self._lookup(epoch)
        if current is not None and current.epoch == epoch:
            return current
        stats = self.stats
        # a distributed log counts invalid batches itself (the merge raises on every rank)
        check = (lambda: 0) if self._sync is not None else self.stats.read_invalid_later()
        if self._sync is not None:
            stats = self._sync.merge(stats, self.backend, self.decay, self._run.epoch, op=Op.PLAN,
                                     epoch=epoch, config=self.config())
        plan, reselect, selected, overlap = self._make_plan(epoch, stats, current)
        bad = check()
        if bad:
            self.stats.invalid_batches.zero_()
            raise ValueError(f"observe() received indices outside [0, {self.num_samples}) in {bad} "
                             f"batch(es); those batches were not recorded")
        if self._sync is not None:
            self._sync.verify(plan.fingerprint(), epoch, self.config())
            self._sync.reserve(shard_size(len(plan), self.world_size))
        record = {"epoch": epoch, "size": len(plan), "full": plan.full, "reselected": reselect,
                  "overlap": overlap}
        self._commit(stats, selected, plan, reselect, record)
        self.coverage.planned(epoch, first=current is None)   # after every collective: may warn
        return plan

    def _lookup(self, epoch: int) -> tuple[int, Plan | None]:
        """``(epoch, current plan)``, checking that epochs do not go back."""
        epoch = self.schedule.check_epoch(epoch)
        current = self._run.plan
        if current is not None and epoch < current.epoch:
            raise ValueError(f"epoch must not go back: plan({epoch}) after plan({current.epoch})")
        return epoch, current

    def will_select(self, epoch: int) -> bool:
        """Whether :meth:`plan` ``(epoch)``, called next, draws a new selection (a pure read,
        :meth:`Schedule.selects`). A re-score pass is worth running before such an epoch (see
        :mod:`gpuprune.refresh`)."""
        epoch = self.schedule.check_epoch(epoch)
        previous = self._previous()
        if previous is not None and epoch <= previous:
            return False
        return self.schedule.selects(epoch, previous)

    def _make_plan(self, epoch: int, stats: LossStats, current: Plan | None,
                   schedule: Schedule | None = None) -> Planned:
        return make_plan(epoch, current, schedule=schedule or self.schedule, policy=self.policy,
                         k=self.k, stats=stats, seed=self.seed, backend=self.backend)

    def _commit(self, stats: LossStats, selected: torch.Tensor, plan: Plan, reselect: bool,
                record: dict) -> None:
        """Make a new plan current: attribute assignments only, after every check has passed."""
        if stats is not self.stats:
            self.stats.assign(stats)
        self.stats.selected = selected
        self._set_run(self._run.advance(plan, reselect, record))
        if self._sync is not None:
            self._sync.clear()

    def _set_run(self, run: Progress) -> None:
        """Make ``run`` the progress (the one place it changes), and its epoch the observed one."""
        self._run = run
        self._epoch_now.numpy()[()] = run.epoch      # a host write, not an op for any device

    # ------------------------------------------------------------------ observe
    def observe(self, indices: torch.Tensor, per_sample_loss: torch.Tensor, *,
                trained: bool = True) -> torch.Tensor:
        """Record a batch's losses; return the loss to backpropagate.

        Args:
            indices: 1-D integer tensor of the batch's sample ids, on :attr:`device`.
            per_sample_loss: 1-D float tensor, one unreduced loss per sample (``reduction="none"``),
                on :attr:`device`. Its graph is kept for the returned value; the statistics use a
                detached copy.
            trained: the batch is a training step's (default ``True``): :attr:`coverage` counts it
                against the samples planned for this rank. ``False`` records the losses without
                counting them (a re-score pass, :mod:`gpuprune.refresh`).

        Returns:
            ``mean(weight[i] * loss[i])`` over the batch, accumulated in float32 and returned in the
            loss's dtype (fp16/bf16 batches do not overflow). Weights are 1 except for InfoBatch's
            rescaled samples. Non-finite losses are not recorded but do reach the returned mean, so
            the training loop sees them.
        """
        traced = compiling()     # inside torch.compile: metadata checks here, the rest in ops
        check_batch(indices, per_sample_loss, self.device, self.num_samples,
                    loss_name="per_sample_loss", values=not traced)
        trained = check_bool("trained", trained)
        if traced:           # the same work in opaque ops that run it eagerly (gpuprune.library)
            record_traced(self.stats.tensors(), None if self._sync is None else self._sync.key,
                          self.coverage.key if trained else None, indices,
                          per_sample_loss.detach(), self.decay, self._epoch_now, self.backend.name)
        else:
            if self._sync is not None:
                self._sync.record(indices, per_sample_loss)
            else:
                self.backend.observe_(self.stats.tensors(), indices, per_sample_loss, self.decay,
                                      self._run.epoch)
            if trained:
                self.coverage.observe(indices.numel())     # metadata: no device read
        x = per_sample_loss.float()
        plan = self._run.plan
        if plan is not None and plan.rescaled is not None:
            x = x * plan.weights_of(indices)
        # one reduction (the empty batch: 0)
        return (x.mean() if x.numel() else x.sum()).to(per_sample_loss.dtype)

    def synchronize(self) -> None:
        """Merge the statistics every rank has observed so far, now instead of at the next plan
        (a collective: call it on every rank, e.g. before rank 0 saves :meth:`state_dict`). Does
        nothing without a process group."""
        if self._sync is None:
            return
        epoch = self._run.epoch
        merged = self._sync.merge(self.stats, self.backend, self.decay, epoch, op=Op.SYNC,
                                  epoch=epoch, config=self.config())
        if merged is not self.stats:
            self.stats.assign(merged)
        self._sync.clear()

    # ------------------------------------------------------------------ statistics
    @property
    def history(self) -> list[dict]:
        """One record per plan made: ``epoch``, ``size`` (samples, all ranks), ``full``,
        ``reselected`` (a new selection was drawn) and ``overlap``: the Jaccard overlap of its
        sample set with the previous plan's (None for the first plan). Reading it syncs once:
        the overlaps (device scalars) are stacked and copied to the host together."""
        return self._run.records()

    def selection_stats(self, always: float = 0.9, never: float = 0.1) -> dict:
        """The paper's "sometimes" samples over the pruned epochs so far
        (:meth:`LossStats.selection_stats`)."""
        return self.stats.selection_stats(self.rounds, always, never)

    def nbytes(self) -> int:
        """Bytes of the tensors this Pruner holds: statistics, current plan, :attr:`history`'s
        overlaps, a process group's observation log, the epoch a compiled step reads (8 B)."""
        return (self.stats.nbytes() + self._run.nbytes() + self._epoch_now.nbytes
                + (0 if self._sync is None else self._sync.nbytes()))

    def sampler(self, **kwargs) -> PrunedSampler:
        """A :class:`~gpuprune.PrunedSampler` over this Pruner (keyword arguments pass through):
        the same as ``gpuprune.PrunedSampler(pruner, **kwargs)``."""
        return PrunedSampler(self, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def config(self) -> dict:
        """Everything plans depend on besides the observed losses: checked on load and across ranks."""
        return {"format": FORMAT, "num_samples": self.num_samples,
                "keep": _keep_setting(self.keep), "k": self.k,
                "policy": self.policy.config(), "decay": self.decay, "seed": self.seed,
                "schedule": self.schedule.config()}

    def state_dict(self) -> dict:
        """Everything needed to continue with bit-identical plans (tensors cloned), with a checksum
        (layout: :mod:`gpuprune.state`). A distributed Pruner raises
        :class:`~gpuprune.distributed.DistributedError` while it holds observations not merged
        across ranks: call :meth:`synchronize` on every rank first, then save from rank 0.
        """
        if self._sync is not None and self._sync.pending:
            raise DistributedError(
                f"gpuprune: Pruner.state_dict() on rank {self.rank}: this rank holds "
                f"{self._sync.pending} observations not merged with the other ranks yet, so a "
                f"checkpoint would lose them. Call pruner.synchronize() on every rank first (for "
                f"example at the end of the epoch), then save from rank 0")
        return make_state(self.config(), self.stats, self._run._replace(history=self.history))

    def load_state_dict(self, state: dict, *, extend: bool = False) -> None:
        """Restore :meth:`state_dict`. The whole state is checked first (:func:`gpuprune.state.
        check_state`): the checksum, every setting against this Pruner's, every field's type and
        range, and that the fields tell one story this Pruner's rule could have made. A state that
        does not fit raises TypeError/ValueError naming the key and leaves this Pruner unchanged.

        Args:
            state: a :meth:`state_dict`.
            extend: continue a run saved with fewer epochs (resuming with a larger ``--epochs``):
                every other setting must be equal; the final full-data epochs are recomputed for
                the new ``num_epochs`` as at construction, and the state is refused (ValueError
                naming the epoch) if it already planned an epoch whose kind or size that changes
                (:func:`gpuprune.state.check_extension`), so every plan up to the saved run's end is
                the saved run's. Default ``False``. See docs/integrations.md, "Resume with more
                epochs".
        """
        config, schedule = self.config(), self.schedule
        if check_bool("extend", extend):
            schedule = self._schedule_with(saved_num_epochs(state, self.num_epochs))
            config = {**config, "schedule": schedule.config()}
        run = check_state(state, config=config, schedule=schedule, policy=self.policy, k=self.k,
                          stats=self.stats,
                          full_plan=lambda e: self._make_plan(e, self.stats, None, schedule)[0])
        if schedule is not self.schedule:
            check_extension(run, schedule, self.schedule)
        self.stats.load_state_dict(state["stats"])          # checked again: cheap next to the load
        self._set_run(run)
        self.coverage.restart(None if run.plan is None else run.epoch)
        if self._sync is not None:
            self._sync.clear()

    def _schedule_with(self, num_epochs: int) -> Schedule:
        """The schedule this Pruner's arguments give for a run of ``num_epochs`` epochs (its
        policy's rule applied again: derived final full-data epochs are derived anew)."""
        asked, decay = self._asked
        try:
            rule = run_rule(self.policy, self.keep, self.num_samples,
                            replace(asked, num_epochs=num_epochs), decay)
        except ValueError as e:
            raise ValueError(f"the checkpoint's run had num_epochs={num_epochs}, which this "
                             f"Pruner's arguments do not allow: {e}") from None
        return rule.schedule

    def __repr__(self) -> str:
        return (f"Pruner(num_samples={self.num_samples}, keep={self.keep}, policy={self.policy!r}, "
                f"device={self.device}, backend={self.backend.name!r})")
