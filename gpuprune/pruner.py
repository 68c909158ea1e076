"""The object users hold: plans each epoch, records every batch's losses, saves and restores itself."""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import torch

from ._checks import check_batch, check_bool, check_float, check_int, resolve_device
from .backend import get_backend
from .distributed import EpochSync, Op, flatten_config, resolve_group
from .plan import Plan, pack_mask
from .sizes import budget, index_dtype, shard_size
from .policies import POLICIES, Policy, make_policy
from .rng import draw_seeds, epoch_generator
from .schedule import Schedule
from .stats import LossStats

__all__ = ["Pruner", "budget"]

_SHUFFLE_STREAM = 1
_FORMAT = "gpuprune.Pruner/2"
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




class Pruner:
    """Dynamic data pruning for one training run.

    Each epoch, :meth:`plan` (called for you by :class:`~gpuprune.PrunedSampler` and the DALI
    iterator in ``set_epoch``) chooses the samples to train on; pass every batch's unreduced loss
    through :meth:`observe`, which records it and returns the (weighted) mean loss to backpropagate.

    Args:
        num_samples: N, the dataset size (at most 2**32).
        keep: fraction of samples kept per pruned epoch, in (0, 1]. Default ``0.5``. The budget is
            ``k = round(keep * N)`` (half up, at least 1).
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
        if policy_settings:
            name = next(iter(policy_settings))
            owners = _POLICY_SETTINGS.get(name, [])
            hint = ("; it is a setting of the policy: pass " + " or ".join(
                f"policy=gpuprune.{cls}({param}=...)" for cls, param in owners) if owners else "")
            raise TypeError(f"Pruner() got an unexpected keyword argument {name!r}{hint}")
        # the keyed tie-break hashes ids as uint32: unique keys, hence exact k, need N <= 2**32
        num_samples = check_int("num_samples", num_samples, minimum=1, maximum=2**32)
        if keep is not None and prune_ratio is not None:
            raise ValueError(f"give keep or prune_ratio, not both (got keep={keep}, "
                             f"prune_ratio={prune_ratio})")
        if prune_ratio is not None:
            keep = 1.0 - check_float("prune_ratio", prune_ratio, low=0.0, high=1.0, high_open=True)
        keep = 0.5 if keep is None else check_float("keep", keep, low=0.0, high=1.0, low_open=True)
        if num_epochs is not None:
            num_epochs = check_int("num_epochs", num_epochs, minimum=1, maximum=2**31 - 1)
        self.policy: Policy = make_policy(policy).resolve(keep, num_samples, num_epochs)
        if final_full_epochs is None:
            final_full_epochs = self.policy.final_full_epochs(num_epochs)
        self.schedule = Schedule(num_epochs, warmup_epochs, final_full_epochs, selection_interval)
        self.decay = (self.policy.default_decay if decay is None
                      else check_float("decay", decay, low=0.0, high=1.0, high_open=True))
        self.seed = check_int("seed", seed)
        self.keep = keep
        self.k = num_samples if self.policy.keeps_all else budget(keep, num_samples)
        self.device = resolve_device(device)
        self.backend = get_backend(backend, self.device, num_samples)
        group = resolve_group(process_group)
        self.stats = LossStats(num_samples, self.device)
        #: the process group statistics are merged over (None: single process)
        self.process_group = group
        self._sync = None if group is None else EpochSync(group, self.device, num_samples)
        self.rounds = 0                       # pruned epochs planned so far
        self._plan: Plan | None = None
        self._selection_epoch = -1            # epoch the current selection was drawn in
        self._epoch = 0                       # epoch stamped on observations (the current plan's)
        self._history: list[dict] = []
        self._peeked: tuple | None = None     # (epoch, plan it follows, Plan, reselect) of peek()

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
        return self._plan

    def is_full_epoch(self, epoch: int) -> bool:
        """Whether ``epoch`` trains on full data (warm-up, final epochs, or the ``full`` policy)."""
        full = self.schedule.is_full(epoch)
        return full or self.policy.keeps_all

    def epoch_size(self, epoch: int) -> int | None:
        """Samples planned for ``epoch`` over all ranks, without planning it: exact for the planned
        epoch and for every epoch of an exact-k policy; None for a future pruned InfoBatch epoch,
        whose size depends on the losses observed until then."""
        epoch = self.schedule.check_epoch(epoch)
        if self._plan is not None and self._plan.epoch == epoch:
            return len(self._plan)
        if self.is_full_epoch(epoch):
            return self.num_samples
        return self.k if self.policy.exact_k else None

    def shard_size(self, epoch: int, world_size: int | None = None, drop_last: bool = False
                   ) -> int | None:
        """Samples one rank trains in ``epoch`` (see :func:`gpuprune.plan.shard_size`), or None when
        :meth:`epoch_size` does not know yet."""
        n = self.epoch_size(epoch)
        w = self.world_size if world_size is None else check_int("world_size", world_size, minimum=1)
        return None if n is None else shard_size(n, w, drop_last)

    def total_steps(self, batch_size: int, *, drop_last: bool = False, world_size: int | None = None,
                    upper_bound: bool = False) -> int:
        """Optimizer steps of the whole run on each rank, for step-based learning-rate schedules
        (``OneCycleLR(total_steps=pruner.total_steps(batch_size))``): the sum over the epochs of
        one rank's batches, as the sampler and the DALI iterator deliver them
        (:meth:`gpuprune.Schedule.total_steps`, the one formula). The DALI iterator's
        ``total_steps`` calls this with its own shards and last-batch policy.

        Args:
            batch_size: samples per batch on each rank.
            drop_last: cut each rank's shard to an equal share and drop the last short batch (as
                ``PrunedSampler(drop_last=True)`` with ``DataLoader(drop_last=True)``, or DALI's
                ``LastBatchPolicy.DROP``). Default False.
            world_size: ranks the epochs are sharded over; None (default) takes this Pruner's
                :attr:`world_size`.
            upper_bound: for InfoBatch, whose pruned epochs plan a loss-dependent number of
                samples, return the bound that counts every pruned epoch with all N samples (the
                schedule then never runs out; it ends somewhat early). Ignored by the exact-k
                policies, whose count is exact either way. Default False.

        Raises:
            ValueError: without ``num_epochs``; for InfoBatch unless ``upper_bound=True``.
        """
        check_bool("upper_bound", upper_bound)
        w = self.world_size if world_size is None else check_int("world_size", world_size, minimum=1)
        if not self.policy.exact_k and not upper_bound:
            raise ValueError(f"policy {self.policy.name!r} plans a loss-dependent number of samples, "
                             f"so the run's step count is not known in advance; pass "
                             f"upper_bound=True for the bound that counts every pruned epoch with "
                             f"all N samples, or use an epoch-based schedule")
        k = self.k if self.policy.exact_k else self.num_samples
        return self.schedule.total_steps(self.num_samples, k, batch_size, world_size=w,
                                         drop_last=drop_last)

    # ------------------------------------------------------------------ plan
    def plan(self, epoch: int) -> Plan:
        """The plan of ``epoch``: sample ids in training order and their loss weights.

        The first call for an epoch selects; later calls for the same epoch return the same plan.
        Epochs must not go backwards; they may skip ahead. All or nothing: if anything fails (or is
        interrupted) the Pruner is as it was, and a retry plans the same epoch again. At most one
        host synchronisation (InfoBatch's kept count, or the out-of-range-id check on a GPU). Under
        a process group this is a collective: every rank must call it for every new epoch.
        """
        epoch, current, ready = self._lookup(epoch, "plan")
        if ready is not None and ready[0] is current:
            return current
        stats = self.stats
        check = self._read_invalid_later()
        if self._sync is not None:
            stats = self._sync.merge(stats, self.backend, self.decay, self._epoch, op=Op.PLAN,
                                     epoch=epoch, config=self.config())
        if ready is not None:
            (plan, reselect), selected, overlap = ready, None, None
        else:
            plan, reselect, selected, overlap = self._make_plan(epoch, stats, current, count=True)
        bad = check()
        if bad:
            self.stats.invalid_batches.zero_()
            raise ValueError(f"observe() received indices outside [0, {self.num_samples}) in {bad} "
                             f"batch(es); those batches were not recorded")
        if ready is not None:                 # made ahead by peek(): count it now
            selected = stats.selected if plan.full else stats.selected.index_add(
                0, plan.indices, torch.ones_like(plan.indices, dtype=torch.int32))
            overlap = self._overlap(current, plan)
        if self._sync is not None:
            self._sync.verify(plan, self.config())
            self._sync.reserve(shard_size(len(plan), self.world_size))
        record = {"epoch": epoch, "size": len(plan), "full": plan.full, "reselected": reselect,
                  "overlap": overlap}
        self._commit(stats, selected, plan, reselect, record)
        return plan

    def peek(self, epoch: int) -> Plan | None:
        """The plan :meth:`plan` will return for ``epoch`` if called next, when no observation can
        change it any more; else None. Changes nothing and communicates nothing.

        Determined in advance are full-data epochs, the policies that do not read the losses
        (``uniform``, ``static``, ``full``) and epochs that reuse the current selection
        (``selection_interval > 1``). Loaders use it to read ahead across the epoch boundary; the
        later :meth:`plan` reuses the peeked plan (and still does its collectives and counting).
        """
        epoch, current, ready = self._lookup(epoch, "peek")
        if ready is not None:
            return ready[0]
        full = self.is_full_epoch(epoch)
        reuse = not full and self._reuses(epoch, current)
        if not (full or reuse or not self.policy.reads_losses):
            return None
        plan, reselect, _, _ = self._make_plan(epoch, self.stats, current)
        self._peeked = (epoch, current, plan, reselect)
        return plan

    def _lookup(self, epoch: int, verb: str) -> tuple[int, Plan | None, tuple | None]:
        """``(epoch, current plan, (plan, reselect) already made for epoch or None)``: the current
        plan itself when it is ``epoch``'s, else a plan :meth:`peek` computed after it. Epochs must
        not go back."""
        epoch = self.schedule.check_epoch(epoch)
        current = self._plan
        if current is not None:
            if epoch == current.epoch:
                return epoch, current, (current, False)
            if epoch < current.epoch:
                raise ValueError(f"epoch must not go back: {verb}({epoch}) after "
                                 f"plan({current.epoch})")
        peeked = self._peeked
        if peeked is not None and peeked[0] == epoch and peeked[1] is current:
            return epoch, current, (peeked[2], peeked[3])
        return epoch, current, None

    def will_select(self, epoch: int) -> bool:
        """Whether :meth:`plan` ``(epoch)``, called next, draws a new selection (a pure read): a
        pruned epoch that does not reuse the current selection. A re-score pass is worth running
        before such an epoch (see :mod:`gpuprune.refresh`)."""
        epoch = self.schedule.check_epoch(epoch)
        current = self._plan
        if current is not None and epoch <= current.epoch:
            return False
        return not self.is_full_epoch(epoch) and not self._reuses(epoch, current)

    def _reuses(self, epoch: int, current: Plan | None) -> bool:
        """Whether a pruned ``epoch`` planned after ``current`` reuses its selection."""
        if current is None or current.full:
            return False
        return self.policy.fixed_subset or not self.schedule.reselects(epoch)

    def _make_plan(self, epoch: int, stats: LossStats, current: Plan | None, count: bool = False
                   ) -> tuple[Plan, bool, torch.Tensor | None, torch.Tensor | None]:
        """Select (or reuse the current selection) and shuffle, in one backend call; changes nothing.
        Returns ``(plan, reselect, selected, overlap)``; the last two (the selected counts and the
        overlap with ``current``) only with ``count``, else None."""
        full = self.is_full_epoch(epoch)
        reselect = False
        weight, rescaled, what = 1.0, None, {}
        if full:
            what["full"] = True
        elif not self._reuses(epoch, current):
            choice = self.policy.select(
                stats, self.k, epoch=epoch, backend=self.backend,
                generator=epoch_generator(self.seed, 0 if self.policy.fixed_subset else epoch))
            weight = float(choice.weight)
            if choice.rule is not None:
                if self.policy.exact_k and choice.rule.k != self.k:
                    raise ValueError(f"{self.policy!r} returned a rule for k={choice.rule.k}, "
                                     f"expected k={self.k}")
                what["rule"] = choice.rule
            else:
                what["ids"] = self._checked_selection(choice.indices)
                if choice.rescaled is not None:
                    rescaled = pack_mask(choice.rescaled)
            reselect = True
        else:                                 # reuse the selection, reshuffled
            what["ids"], weight, rescaled = current.indices, current.weight, current.rescaled
        (shuffle_seed,) = draw_seeds(epoch_generator(self.seed, epoch, _SHUFFLE_STREAM), 1)
        previous = None
        if count and current is not None:
            previous = (None if current.full else current.indices, len(current))
        parts = self.backend.plan(stats, shuffle_seed=shuffle_seed, previous=previous, count=count,
                                  **what)
        if parts.rescaled is not None:
            rescaled = parts.rescaled
        weight = weight if rescaled is not None else 1.0
        plan = Plan(epoch, parts.indices, full, self.num_samples, weight, rescaled)
        return plan, reselect, parts.selected, parts.overlap

    def _commit(self, stats: LossStats, selected: torch.Tensor, plan: Plan, reselect: bool,
                record: dict) -> None:
        """Make a new plan current: attribute assignments only, after every check has passed."""
        if stats is not self.stats:
            self.stats.assign(stats)
        self.stats.selected = selected
        self.rounds += 0 if plan.full else 1
        self._selection_epoch = (plan.epoch if reselect else
                                 -1 if plan.full else self._selection_epoch)
        self._plan, self._epoch, self._peeked = plan, plan.epoch, None
        self._history.append(record)
        if self._sync is not None:
            self._sync.clear()

    def _read_invalid_later(self):
        """Start reading the invalid-batch counter without waiting; return a function giving it.

        On a GPU the counter is copied into pinned memory behind the work queued so far, so the
        wait at the end of :meth:`plan` is for that copy only, not for the plan's own work.
        """
        counter = self.stats.invalid_batches
        if counter.device.type != "cuda" or self._sync is not None:
            return lambda: 0 if self._sync is not None else int(counter)
        host = torch.empty((), dtype=torch.int64, pin_memory=True)
        host.copy_(counter, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def result() -> int:
            done.synchronize()
            return int(host)
        return result

    def _checked_selection(self, idx: torch.Tensor) -> torch.Tensor:
        if (not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.device != self.device
                or idx.dtype not in (torch.int32, torch.int64)):
            raise TypeError(f"{self.policy!r}.select must return 1-D int32/int64 ids on "
                            f"{self.device}")
        if self.policy.exact_k and idx.numel() != self.k:
            raise ValueError(f"{self.policy!r} returned {idx.numel()} ids, expected k={self.k}")
        return idx.to(index_dtype(self.num_samples))

    def _overlap(self, previous: Plan | None, plan: Plan) -> torch.Tensor | None:
        """Jaccard overlap of this plan's sample set with the previous plan's (a device scalar)."""
        if previous is None:
            return None
        n, a, b = self.num_samples, len(previous), len(plan)
        if previous.full or plan.full:
            # a fill, not a host-to-device copy: plan() keeps its one host synchronisation
            inter = torch.full((), float(min(a, b)), dtype=torch.float64, device=self.device)
        else:
            mark = torch.zeros(n, dtype=torch.bool, device=self.device)
            mark[previous.indices.long()] = True
            inter = mark[plan.indices.long()].sum().double()
        return inter / (a + b - inter)

    # ------------------------------------------------------------------ observe
    def observe(self, indices: torch.Tensor, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """Record a batch's losses; return the loss to backpropagate.

        Args:
            indices: 1-D integer tensor of the batch's sample ids, on :attr:`device`.
            per_sample_loss: 1-D float tensor, one unreduced loss per sample (``reduction="none"``),
                on :attr:`device`. Its graph is kept for the returned value; the statistics use a
                detached copy.

        Returns:
            ``mean(weight[i] * loss[i])`` over the batch, accumulated in float32 and returned in the
            loss's dtype (fp16/bf16 batches do not overflow). Weights are 1 except for InfoBatch's
            rescaled samples. Non-finite losses are not recorded but do reach the returned mean, so
            the training loop sees them.
        """
        check_batch(indices, per_sample_loss, self.device, self.num_samples,
                    loss_name="per_sample_loss")
        if self._sync is not None:
            self._sync.record(indices, per_sample_loss)
        else:
            self.backend.observe_(self.stats.tensors(), indices, per_sample_loss, self.decay,
                                  self._epoch)
        x = per_sample_loss.float()
        plan = self._plan
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
        merged = self._sync.merge(self.stats, self.backend, self.decay, self._epoch, op=Op.SYNC,
                                  epoch=self._epoch, config=self.config())
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
        held = [r["overlap"] for r in self._history if isinstance(r["overlap"], torch.Tensor)]
        values = iter(torch.stack(held).tolist() if held else ())
        out = []
        for r in self._history:
            ov = r["overlap"]
            out.append({**r, "overlap": (next(values) if isinstance(ov, torch.Tensor) else
                                         None if ov is None else float(ov))})
        return out

    def selection_stats(self, always: float = 0.9, never: float = 0.1) -> dict:
        """The paper's "sometimes" samples: how often each sample was planned in pruned epochs.

        Returns:
            dict with ``frequency`` (float32 tensor of N, on the CPU), ``rounds`` (pruned epochs),
            and the fractions of samples planned in more than ``always``, fewer than ``never``, and
            in between (``sometimes``) of the rounds.
        """
        always = check_float("always", always, low=0.0, high=1.0)
        never = check_float("never", never, low=0.0, high=1.0)
        freq = self.stats.frequency(self.rounds).cpu()
        n = freq.numel()
        hi = int((freq > always).sum())
        lo = int((freq < never).sum())
        return {"frequency": freq, "rounds": self.rounds, "always": hi / n, "never": lo / n,
                "sometimes": (n - hi - lo) / n}

    def nbytes(self) -> int:
        """Bytes of device state this Pruner holds: statistics, current plan, the per-epoch overlap
        scalars of :attr:`history` and, under a process group, the observation log."""
        total = self.stats.nbytes()
        total += sum(r["overlap"].element_size() for r in self._history
                     if isinstance(r["overlap"], torch.Tensor))
        plan = self._plan
        if plan is not None:
            total += plan.indices.numel() * plan.indices.element_size()
            if plan.rescaled is not None:
                total += plan.rescaled.numel()
        if self._sync is not None:
            total += self._sync.nbytes()
        return total

    def sampler(self, **kwargs):
        """A :class:`~gpuprune.PrunedSampler` over this pruner (keyword arguments pass through)."""
        from .sampler import PrunedSampler
        return PrunedSampler(self, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def config(self) -> dict:
        """Everything plans depend on besides the observed losses: checked on load and across ranks."""
        return {"format": _FORMAT, "num_samples": self.num_samples, "keep": self.keep, "k": self.k,
                "policy": self.policy.config(), "decay": self.decay, "seed": self.seed,
                "schedule": self.schedule.config()}

    def state_dict(self) -> dict:
        """Everything needed to continue with bit-identical plans (tensors cloned), with a checksum.

        Each saved id is stored once: the plan's ids (whose set is the current selection); a full
        epoch stores none (its order is recomputed from the seed). A distributed Pruner raises
        :class:`~gpuprune.distributed.DistributedError` while it holds observations not merged
        across ranks: call :meth:`synchronize` on every rank first, then save from rank 0.
        """
        if self._sync is not None and self._sync.pending:
            from .distributed import DistributedError
            raise DistributedError(
                f"gpuprune: Pruner.state_dict() on rank {self.rank}: this rank holds "
                f"{self._sync.pending} observations not merged with the other ranks yet, so a "
                f"checkpoint would lose them. Call pruner.synchronize() on every rank first (for "
                f"example at the end of the epoch), then save from rank 0")
        plan = self._plan
        state = {
            "config": self.config(),
            "stats": self.stats.state_dict(),
            "rounds": self.rounds,
            "epoch": self._epoch,
            "selection_epoch": self._selection_epoch,
            "plan": None if plan is None else {
                "epoch": plan.epoch, "full": plan.full,
                "indices": None if plan.full else plan.indices.clone(),
                "weight": plan.weight,
                "rescaled": None if plan.rescaled is None else plan.rescaled.clone()},
            "history": self.history,
        }
        state["checksum"] = state_checksum(state)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. Everything is checked first, the whole state: the checksum,
        the configuration (every setting must equal this Pruner's), sizes, dtypes, ranges, unique
        ids and the budget. A state that does not fit raises TypeError/ValueError naming the key and
        leaves this Pruner unchanged."""
        plan = self._check_state_dict(state)
        self.stats.load_state_dict(state["stats"])          # checked again: cheap next to the load
        self.rounds = int(state["rounds"])
        self._epoch = int(state["epoch"])
        self._selection_epoch = int(state["selection_epoch"])
        self._plan, self._peeked = plan, None
        self._history = [dict(r) for r in state["history"]]
        if self._sync is not None:
            self._sync.clear()

    def _check_state_dict(self, state) -> Plan | None:
        """Validate a whole state; return the plan it holds (on this device)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from Pruner.state_dict(), got "
                            f"{type(state).__name__}")
        keys = {"config", "stats", "rounds", "epoch", "selection_epoch", "plan", "history",
                "checksum"}
        missing, extra = sorted(keys - set(state)), sorted(set(state) - keys, key=str)
        if missing or extra:
            raise ValueError(f"state_dict must have exactly the keys {sorted(keys)}: missing "
                             f"{missing}, unknown {extra}")
        if not isinstance(state["checksum"], str) or state["checksum"] != state_checksum(state):
            raise ValueError("state_dict['checksum'] does not match the state's content: the state "
                             "was modified or corrupted after Pruner.state_dict()")
        _check_config(state["config"], self.config())
        rounds = check_int("state_dict['rounds']", state["rounds"], minimum=0)
        obs_epoch = self.schedule.check_epoch(state["epoch"], "state_dict['epoch']")
        sel_epoch = check_int("state_dict['selection_epoch']", state["selection_epoch"],
                              minimum=-1, maximum=obs_epoch)
        self.stats.check_state_dict(state["stats"], max_epoch=obs_epoch, max_selected=rounds)
        if not isinstance(state["history"], list) or not all(isinstance(r, dict)
                                                             for r in state["history"]):
            raise ValueError("state_dict['history'] must be a list of dicts")
        p = state["plan"]
        if p is None:
            if obs_epoch or rounds or sel_epoch != -1:
                raise ValueError("state_dict['plan'] is None but the state records planned epochs")
            return None
        if not isinstance(p, dict) or set(p) != {"epoch", "full", "indices", "weight", "rescaled"}:
            raise ValueError("state_dict['plan'] must be None or a dict with epoch, full, indices, "
                             "weight and rescaled")
        epoch = self.schedule.check_epoch(p["epoch"], "state_dict['plan']['epoch']")
        if epoch != obs_epoch:
            raise ValueError(f"state_dict['plan']['epoch']={epoch} differs from "
                             f"state_dict['epoch']={obs_epoch}")
        full = p["full"]
        if full is not self.is_full_epoch(epoch):
            raise ValueError(f"state_dict['plan']['full']={full!r}, but epoch {epoch} is "
                             f"{'full' if self.is_full_epoch(epoch) else 'pruned'} in this schedule")
        n = self.num_samples
        if full:
            if p["indices"] is not None or p["rescaled"] is not None or p["weight"] != 1.0:
                raise ValueError("state_dict['plan'] of a full epoch must have indices=None, "
                                 "rescaled=None and weight=1.0")
            return self._make_plan(epoch, self.stats, None)[0]   # its order comes from the seed
        ids = _checked_ids("state_dict['plan']['indices']", p["indices"], n)
        if self.policy.exact_k and ids.numel() != self.k:
            raise ValueError(f"state_dict['plan']['indices'] holds {ids.numel()} ids, the budget is "
                             f"k={self.k}")
        if sel_epoch == -1 or rounds == 0:
            raise ValueError("state_dict has a pruned plan but no selection epoch or rounds")
        weight = check_float("state_dict['plan']['weight']", p["weight"], low=1.0)
        bits = p["rescaled"]
        if bits is not None:
            size = -(-n // 8)
            if (not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8
                    or tuple(bits.shape) != (size,)):
                raise ValueError(f"state_dict['plan']['rescaled'] must be None or a ({size},) uint8 "
                                 f"tensor")
            bits = bits.to(self.device)
        elif weight != 1.0:
            raise ValueError("state_dict['plan']['weight'] must be 1.0 when nothing is rescaled")
        return Plan(epoch, ids.to(self.device), False, n, weight, bits)

    def __repr__(self) -> str:
        return (f"Pruner(num_samples={self.num_samples}, keep={self.keep}, policy={self.policy!r}, "
                f"device={self.device}, backend={self.backend.name!r})")


def state_checksum(state: dict) -> str:
    """sha256 over a state dict's content (every tensor's dtype, shape and bytes; every value),
    excluding its ``"checksum"`` entry."""
    h = hashlib.sha256()

    def feed(obj) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            h.update(b"{")
            for key in sorted(obj, key=str):
                if key == "checksum" and obj is state:
                    continue
                h.update(repr(key).encode())
                feed(obj[key])
            h.update(b"}")
        elif isinstance(obj, (list, tuple)):
            h.update(b"[")
            for item in obj:
                feed(item)
            h.update(b"]")
        else:
            h.update(f"{type(obj).__name__}:{obj!r};".encode())

    feed(state)
    return h.hexdigest()


def _check_config(saved, mine: dict) -> None:
    """Every setting equal, nested ones (the policy's) named by their dotted path."""
    if not isinstance(saved, dict):
        raise TypeError(f"state_dict['config'] must be a dict, got {type(saved).__name__}")
    a, b = flatten_config(saved), flatten_config(mine)
    for key in sorted(set(a) | set(b), key=str):
        if key not in a:
            raise ValueError(f"state_dict['config'] is missing {key!r} (this Pruner has "
                             f"{key}={b[key]!r})")
        if key not in b:
            raise ValueError(f"state_dict['config'] has an unknown setting {key!r}")
        if a[key] != b[key]:
            raise ValueError(f"checkpoint was made with {key}={a[key]!r}, this Pruner has "
                             f"{key}={b[key]!r}")


def _checked_ids(name: str, t, num_samples: int) -> torch.Tensor:
    """A saved id tensor: 1-D, the id dtype, values unique and in [0, N)."""
    dtype = index_dtype(num_samples)
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1:
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 1-D {dtype} tensor, got {got}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_samples:
        raise ValueError(f"{name} holds ids outside [0, {num_samples}): [{lo}, {hi}]")
    if torch.unique(t).numel() != t.numel():
        raise ValueError(f"{name} holds duplicate ids")
    return t
