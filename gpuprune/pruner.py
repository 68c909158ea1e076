"""The object users hold: schedule, selection, loss weighting and checkpoints."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ._checks import check_batch, check_choice, check_float, check_int, resolve_device
from . import distributed as _dist
from .plan import Plan
from .policies import POLICIES, InfoBatch, Policy, Static
from .rng import draw_seeds, epoch_generator
from .scores import ScoreBank
from .select import shuffle_order

__all__ = ["Pruner", "budget"]

_SHUFFLE_STREAM = 1


def budget(keep: float, num_samples: int) -> int:
    """k = round(keep * N), rounding half up, at least 1."""
    keep = check_float("keep", keep, low=0.0, high=1.0, low_open=True)
    num_samples = check_int("num_samples", num_samples, minimum=1)
    return max(1, math.floor(keep * num_samples + 0.5))


class Pruner:
    """Dynamic data pruning for one training run.

    Each epoch call :meth:`plan` (or let :class:`~gpuprune.PrunedSampler` / the DALI iterator do it),
    train on the planned samples, and pass every batch's unreduced loss through :meth:`observe`,
    which records it and returns the (weighted) mean loss to backpropagate.

    Args:
        num_samples: N, the dataset size.
        keep: fraction of samples kept per pruned epoch, in (0, 1]. Default ``0.5``. The budget is
            ``k = round(keep * N)`` (half up, at least 1).
        prune_ratio: alternatively ``1 - keep``, in [0, 1). Give one of ``keep`` and ``prune_ratio``.
        policy: ``"uniform"``, ``"epsilon_greedy"``, ``"ucb"`` (default), ``"infobatch"``,
            ``"static"``, ``"full"``, or a :class:`~gpuprune.policies.Policy` instance.
        num_epochs: total epochs; needed for ``final_full_epochs`` and InfoBatch's ``delta``.
        warmup_epochs: full-data epochs at the start. Default ``0``.
        final_full_epochs: full-data epochs at the end. ``None`` (default) takes the policy's
            choice: InfoBatch uses ``num_epochs - ceil(delta * num_epochs)``, the others 0.
        selection_interval: epochs between two selections; in between the last subset is reused,
            reshuffled. Default ``1``.
        decay: EMA weight kept from the old loss statistics per observation. Default ``0.9``.
        epsilon: exploration share of ``epsilon_greedy``. Default ``0.1``.
        c: uncertainty weight of ``ucb``. Default ``1.0``.
        uncertainty: ``"std"`` (default) or ``"var"`` for ``ucb``.
        drift: ``ucb`` only: growth per unobserved epoch of a sample's variance, in units of the
            mean variance. Default ``0.0`` (the paper's rule); ``1.0`` stops UCB from settling on
            one subset (see :class:`~gpuprune.UCB`).
        delta: InfoBatch's annealing point (fraction of ``num_epochs``). Default ``0.875``.
        static_scores: per-sample scores for ``policy="static"`` (keep the highest); ``None`` keeps
            a fixed random subset.
        seed: seed of every random choice; plans are a function of (seed, epoch, observed losses).
        device: where scores live and selection runs. Default ``"cpu"``.
        process_group: ranks to keep in step under multi-process training. ``"auto"`` (default)
            uses the default ``torch.distributed`` group if it is initialised (create the Pruner
            after ``init_process_group``) with more than one rank; ``None`` never synchronises;
            or a ``ProcessGroup``. Statistics are then merged across ranks once per epoch, before
            each plan, so all ranks plan alike (see :mod:`gpuprune.distributed`).
        backend: ``"auto"`` (default), ``"cuda"`` or ``"torch"``: who updates the scores and
            selects (see :class:`~gpuprune.ScoreBank`; ``"auto"`` takes the CUDA kernels of
            :mod:`gpuprune.kernels` on a GPU where CuPy loads them). Plans are the same either way.

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
        decay: float = 0.9,
        epsilon: float = 0.1,
        c: float = 1.0,
        uncertainty: str = "std",
        drift: float = 0.0,
        delta: float = 0.875,
        static_scores: torch.Tensor | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        process_group: Any = "auto",
        backend: str = "auto",
    ) -> None:
        # the keyed tie-break hashes ids as uint32: unique keys, hence exact k, need N <= 2**32
        num_samples = check_int("num_samples", num_samples, minimum=1, maximum=2**32)
        if keep is not None and prune_ratio is not None:
            raise ValueError(f"give keep or prune_ratio, not both (got keep={keep}, "
                             f"prune_ratio={prune_ratio})")
        if prune_ratio is not None:
            prune_ratio = check_float("prune_ratio", prune_ratio, low=0.0, high=1.0, high_open=True)
            keep = 1.0 - prune_ratio
        elif keep is None:
            keep = 0.5
        else:
            keep = check_float("keep", keep, low=0.0, high=1.0, low_open=True)
        self.keep = keep
        self.k = budget(keep, num_samples)
        if num_epochs is not None:
            num_epochs = check_int("num_epochs", num_epochs, minimum=1)
        self.num_epochs = num_epochs
        self.warmup_epochs = check_int("warmup_epochs", warmup_epochs, minimum=0)
        self.selection_interval = check_int("selection_interval", selection_interval, minimum=1)
        self.seed = check_int("seed", seed)
        self.policy = self._make_policy(policy, epsilon=epsilon, c=c, uncertainty=uncertainty,
                                        drift=drift, delta=delta, static_scores=static_scores)
        if static_scores is not None and policy != "static":
            raise ValueError(f"static_scores is only used by policy='static', got policy={policy!r}")
        fixed = getattr(self.policy, "scores", None) if isinstance(self.policy, Static) else None
        if fixed is not None and fixed.numel() != num_samples:
            raise ValueError(f"static_scores must have one score per sample: got {fixed.numel()} "
                             f"scores for num_samples={num_samples}")
        if final_full_epochs is None:
            final_full_epochs = 0
            if isinstance(self.policy, InfoBatch):
                if num_epochs is None:
                    raise ValueError("policy='infobatch' needs num_epochs for its annealing "
                                     "(or pass final_full_epochs)")
                final_full_epochs = self.policy.final_full_epochs(num_epochs)
        self.final_full_epochs = check_int("final_full_epochs", final_full_epochs, minimum=0,
                                           maximum=num_epochs)
        if self.final_full_epochs and num_epochs is None:
            raise ValueError(f"final_full_epochs={self.final_full_epochs} needs num_epochs")
        group = _dist.resolve_group(process_group)
        self.bank = ScoreBank(num_samples, device=device, decay=decay, backend=backend)
        self.bank.deferred = group is not None    # ranks all-reduce each epoch's sums before merging
        self.device = self.bank.device
        self.rounds = 0                         # pruned epochs planned so far
        self._selection: torch.Tensor | None = None
        self._selection_weights: torch.Tensor | None = None
        self._selection_epoch = -1
        self._plan: Plan | None = None
        self._weight_table: torch.Tensor | None = None
        #: called with the Pruner at the start of every new plan (e.g. to merge statistics across ranks)
        self.before_plan: list[Callable[["Pruner"], None]] = []
        #: called with the Pruner and the new plan at the end of every new plan
        self.after_plan: list[Callable[["Pruner", Plan], None]] = []
        #: the process group statistics are merged over (None: single process)
        self.process_group = group
        self.dist_sync = None if group is None else _dist.DistributedSync(group, self.device)
        if self.dist_sync is not None:
            self.dist_sync.attach(self)

    # ------------------------------------------------------------------ construction
    def _make_policy(self, policy, **kw) -> Policy:
        if isinstance(policy, Policy):
            return policy
        if not isinstance(policy, str):
            raise TypeError(f"policy must be a name or a Policy, got {type(policy).__name__}")
        check_choice("policy", policy, POLICIES)
        if policy == "epsilon_greedy":
            return POLICIES[policy](epsilon=kw["epsilon"])
        if policy == "ucb":
            return POLICIES[policy](c=kw["c"], uncertainty=kw["uncertainty"], drift=kw["drift"])
        if policy == "infobatch":
            return InfoBatch(ratio=min(1.0 - self.keep, 0.999), delta=kw["delta"])
        if policy == "static":
            return Static(kw["static_scores"])
        return POLICIES[policy]()

    @property
    def num_samples(self) -> int:
        return self.bank.num_samples

    def is_full_epoch(self, epoch: int) -> bool:
        """Whether ``epoch`` trains on full data (warm-up, final epochs, or the ``full`` policy)."""
        epoch = check_int("epoch", epoch, minimum=0)
        if epoch < self.warmup_epochs or self.policy.name == "full":
            return True
        return self.num_epochs is not None and epoch >= self.num_epochs - self.final_full_epochs

    # ------------------------------------------------------------------ plan
    def plan(self, epoch: int) -> Plan:
        """The plan of ``epoch``: shuffled sample ids and loss weights, on :attr:`device`.

        The first call for an epoch selects (one host sync at most); later calls for the same epoch
        return the same object. Epochs must not go backwards; they may skip ahead.
        """
        epoch = check_int("epoch", epoch, minimum=0)
        if self._plan is not None:
            if epoch == self._plan.epoch:
                return self._plan
            if epoch < self._plan.epoch:
                raise ValueError(f"epoch must not go back: plan({epoch}) after plan({self._plan.epoch})")
        for hook in self.before_plan:
            hook(self)
        n = self.num_samples
        full = self.is_full_epoch(epoch)
        weights = None
        chosen = None
        if not full:
            due = (epoch - self.warmup_epochs) % self.selection_interval == 0
            if self._selection is None or (due and not self.policy.fixed_subset):
                gen_epoch = 0 if self.policy.fixed_subset else epoch
                chosen = self.policy.select(self.bank, self.k, epoch_generator(self.seed, gen_epoch))
                self._check_selection(chosen.indices, chosen.weights)
        # after the (read-only) selection, whose one device read, if any, also fetched the
        # counter, and before any state changes: at most one host sync per plan
        self.bank.raise_if_invalid()
        if full:
            sel = torch.arange(n, device=self.device)
        else:
            if chosen is not None:
                self._selection, self._selection_weights = chosen.indices, chosen.weights
                self._selection_epoch = epoch
            sel, weights = self._selection, self._selection_weights
            self.bank.selected.index_add_(0, sel, torch.ones_like(sel, dtype=torch.int32))
            self.rounds += 1
        (shuffle_seed,) = draw_seeds(epoch_generator(self.seed, epoch, _SHUFFLE_STREAM), 1)
        kernels = self.bank.kernels      # the CUDA kernels hash the ids; the order is the same
        order = (shuffle_order(sel, shuffle_seed) if kernels is None
                 else kernels.shuffle_order(sel, shuffle_seed))
        sel = sel[order]
        if not full:
            # keep the selection in plan order: the same set (the shuffle depends only on the set),
            # and sharing the plan's storage saves 8 bytes per selected sample
            self._selection = sel
        if weights is not None:
            weights = weights[order]
            self._selection_weights = weights
            table = torch.ones(n, dtype=torch.float32, device=self.device)
            table[sel] = weights
            self._weight_table = table
        else:
            self._weight_table = None
        self.bank.epoch = epoch
        self._plan = Plan(epoch, sel, weights, full, n)
        for hook in self.after_plan:
            hook(self, self._plan)
        return self._plan

    def _check_selection(self, idx: torch.Tensor, weights: torch.Tensor | None) -> None:
        if idx.dtype != torch.long or idx.dim() != 1 or idx.device != self.device:
            raise TypeError(f"{self.policy!r}.select must return 1-D int64 indices on {self.device}")
        if self.policy.exact_k and idx.numel() != self.k:
            raise ValueError(f"{self.policy!r} returned {idx.numel()} indices, expected k={self.k}")
        if weights is not None and weights.shape != idx.shape:
            raise ValueError(f"{self.policy!r} returned weights of shape {tuple(weights.shape)} for "
                             f"{idx.numel()} indices")

    # ------------------------------------------------------------------ observe
    def observe(self, indices: torch.Tensor, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """Record a batch's losses; return the loss to backpropagate.

        Args:
            indices: 1-D int tensor of the batch's sample ids, on :attr:`device`.
            per_sample_loss: 1-D float tensor, one unreduced loss per sample (``reduction="none"``),
                on :attr:`device`. Its graph is kept for the returned value; the statistics use a
                detached copy.

        Returns:
            ``mean(weight[i] * loss[i])`` over the batch (weights are 1 except for InfoBatch's
            rescaled samples). Non-finite losses are not recorded but do reach the returned mean,
            so the training loop sees them.
        """
        check_batch(indices, per_sample_loss, self.device, self.num_samples,
                    loss_name="per_sample_loss")
        self.bank.observe(indices, per_sample_loss)
        b = per_sample_loss.numel()
        if self._weight_table is None:
            return per_sample_loss.sum() / max(b, 1)
        w = self._weight_table[indices.long().clamp(0, self.num_samples - 1)]
        return (per_sample_loss * w.to(per_sample_loss.dtype)).sum() / max(b, 1)

    # ------------------------------------------------------------------ statistics
    def selection_stats(self, always: float = 0.9, never: float = 0.1) -> dict:
        """The paper's "sometimes" samples: how often each sample was planned in pruned epochs.

        Returns:
            dict with ``frequency`` (float32 tensor of N, on the CPU), ``rounds`` (pruned epochs),
            and the fractions of samples planned in more than ``always``, fewer than ``never``, and
            in between (``sometimes``) of the rounds.
        """
        always = check_float("always", always, low=0.0, high=1.0)
        never = check_float("never", never, low=0.0, high=1.0)
        freq = self.bank.selection_frequency(self.rounds).cpu()
        n = freq.numel()
        hi = int((freq > always).sum())
        lo = int((freq < never).sum())
        return {"frequency": freq, "rounds": self.rounds, "always": hi / n, "never": lo / n,
                "sometimes": (n - hi - lo) / n}

    def sampler(self, **kwargs):
        """A :class:`~gpuprune.PrunedSampler` over this pruner (keyword arguments pass through)."""
        from .sampler import PrunedSampler
        return PrunedSampler(self, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _config(self) -> dict:
        return {"num_samples": self.num_samples, "k": self.k, "policy": self.policy.name,
                "seed": self.seed, "warmup_epochs": self.warmup_epochs,
                "final_full_epochs": self.final_full_epochs, "num_epochs": self.num_epochs,
                "selection_interval": self.selection_interval}

    def state_dict(self) -> dict:
        """Everything needed to continue with bit-identical plans (tensors are cloned).

        A distributed Pruner raises :class:`~gpuprune.distributed.DistributedError` while it holds
        statistics not merged across ranks: call :func:`gpuprune.distributed.synchronize` on every
        rank first. The state is then the same on all ranks; save it from rank 0.
        """
        if self.dist_sync is not None:
            self.dist_sync.check_saveable(self.bank)
        plan = self._plan
        clone = (lambda t: None if t is None else t.clone())
        return {
            "config": self._config(),
            "bank": self.bank.state_dict(),
            "rounds": self.rounds,
            "selection": clone(self._selection),
            "selection_weights": clone(self._selection_weights),
            "selection_epoch": self._selection_epoch,
            "plan": None if plan is None else {
                "epoch": plan.epoch, "indices": plan.indices.clone(),
                "weights": clone(plan.weights), "full": plan.full},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. The configuration must match this Pruner's.

        Everything is checked first: a state that does not fit raises TypeError/ValueError and
        leaves this Pruner unchanged.
        """
        self._check_state_dict(state)
        self.bank.load_state_dict(state["bank"])
        dev = self.device
        to = (lambda t: None if t is None else t.to(dev))
        self.rounds = int(state["rounds"])
        self._selection = to(state["selection"])
        self._selection_weights = to(state["selection_weights"])
        self._selection_epoch = int(state["selection_epoch"])
        p = state["plan"]
        self._plan = None
        self._weight_table = None
        if p is not None:
            self._plan = Plan(int(p["epoch"]), p["indices"].to(dev), to(p["weights"]),
                              bool(p["full"]), self.num_samples)
            if self._plan.weights is not None:
                table = torch.ones(self.num_samples, dtype=torch.float32, device=dev)
                table[self._plan.indices] = self._plan.weights
                self._weight_table = table
            if (not self._plan.full and self._selection is not None
                    and torch.equal(self._selection, self._plan.indices)):
                self._selection = self._plan.indices          # share storage, as plan() does
                if self._plan.weights is not None:
                    self._selection_weights = self._plan.weights
        if self.dist_sync is not None:   # every rank loads the same state: re-base the counters
            self.dist_sync.after_load(self.bank, None if p is None else self._plan.epoch)

    def _check_state_dict(self, state) -> None:
        if not isinstance(state, dict) or "config" not in state:
            raise TypeError(f"state must be a dict from Pruner.state_dict(), got "
                            f"{type(state).__name__}")
        missing = [key for key in ("bank", "rounds", "selection", "selection_weights",
                                   "selection_epoch", "plan") if key not in state]
        if missing:
            raise ValueError(f"state_dict is missing {missing}")
        if not isinstance(state["config"], dict):
            raise TypeError("state_dict['config'] must be a dict")
        mine = self._config()
        for key, value in state["config"].items():
            if mine.get(key) != value:
                raise ValueError(f"checkpoint was made with {key}={value!r}, this Pruner has "
                                 f"{key}={mine.get(key)!r}")
        self.bank.check_state_dict(state["bank"])
        check_int("state_dict['rounds']", state["rounds"], minimum=0)
        check_int("state_dict['selection_epoch']", state["selection_epoch"], minimum=-1)
        n = self.num_samples
        sel = state["selection"]
        _check_ids("state_dict['selection']", sel, n, optional=True)
        _check_weights("state_dict['selection_weights']", state["selection_weights"], sel)
        p = state["plan"]
        if p is None:
            return
        if not isinstance(p, dict) or any(key not in p for key in ("epoch", "indices", "weights",
                                                                     "full")):
            raise ValueError("state_dict['plan'] must be None or a dict with epoch, indices, "
                             "weights and full")
        check_int("state_dict['plan']['epoch']", p["epoch"], minimum=0)
        _check_ids("state_dict['plan']['indices']", p["indices"], n)
        _check_weights("state_dict['plan']['weights']", p["weights"], p["indices"])

    def __repr__(self) -> str:
        return (f"Pruner(num_samples={self.num_samples}, keep={self.keep}, policy={self.policy!r}, "
                f"device={self.device})")


def _check_ids(name: str, t, num_samples: int, optional: bool = False) -> None:
    """A checkpointed id tensor: 1-D int64 with values in [0, N) (one pass over it)."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 1-D int64 tensor, got {got}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_samples):
        raise ValueError(f"{name} holds ids outside [0, {num_samples})")


def _check_weights(name: str, w, ids) -> None:
    if w is None:
        return
    if (not isinstance(w, torch.Tensor) or not w.is_floating_point()
            or not isinstance(ids, torch.Tensor) or w.shape != ids.shape):
        raise ValueError(f"{name} must be None or a float tensor shaped like its ids")
