"""The object users hold: schedule, selection, loss weighting and checkpoints."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ._checks import check_batch, check_choice, check_float, check_int, resolve_device
from .plan import Plan
from .policies import POLICIES, InfoBatch, Policy, Static
from .rng import draw_seeds, epoch_generator
from .scores import ScoreBank
from .select import shuffle_order

__all__ = ["Pruner", "budget"]

_SHUFFLE_STREAM = 1


def budget(keep: float, num_samples: int) -> int:
    """k = round(keep * N), rounding half up, at least 1."""
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
        delta: InfoBatch's annealing point (fraction of ``num_epochs``). Default ``0.875``.
        static_scores: per-sample scores for ``policy="static"`` (keep the highest); ``None`` keeps
            a fixed random subset.
        seed: seed of every random choice; plans are a function of (seed, epoch, observed losses).
        device: where scores live and selection runs. Default ``"cpu"``.

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
        delta: float = 0.875,
        static_scores: torch.Tensor | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        num_samples = check_int("num_samples", num_samples, minimum=1)
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
                                        delta=delta, static_scores=static_scores)
        if final_full_epochs is None:
            final_full_epochs = 0
            if isinstance(self.policy, InfoBatch):
                if num_epochs is None:
                    raise ValueError("policy='infobatch' needs num_epochs for its annealing "
                                     "(or pass final_full_epochs)")
                final_full_epochs = self.policy.final_full_epochs(num_epochs)
        self.final_full_epochs = check_int("final_full_epochs", final_full_epochs, minimum=0)
        if self.final_full_epochs and num_epochs is None:
            raise ValueError(f"final_full_epochs={self.final_full_epochs} needs num_epochs")
        self.bank = ScoreBank(num_samples, device=device, decay=decay)
        self.device = self.bank.device
        self.rounds = 0                         # pruned epochs planned so far
        self._selection: torch.Tensor | None = None
        self._selection_weights: torch.Tensor | None = None
        self._selection_epoch = -1
        self._plan: Plan | None = None
        self._weight_table: torch.Tensor | None = None
        #: called with the Pruner at the start of every new plan (e.g. to merge statistics across ranks)
        self.before_plan: list[Callable[["Pruner"], None]] = []

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
            return POLICIES[policy](c=kw["c"], uncertainty=kw["uncertainty"])
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
        self.bank.raise_if_invalid()
        n = self.num_samples
        full = self.is_full_epoch(epoch)
        weights = None
        if full:
            sel = torch.arange(n, device=self.device)
        else:
            due = (epoch - self.warmup_epochs) % self.selection_interval == 0
            if self._selection is None or (due and not self.policy.fixed_subset):
                gen_epoch = 0 if self.policy.fixed_subset else epoch
                chosen = self.policy.select(self.bank, self.k, epoch_generator(self.seed, gen_epoch))
                self._check_selection(chosen.indices, chosen.weights)
                self._selection, self._selection_weights = chosen.indices, chosen.weights
                self._selection_epoch = epoch
            sel, weights = self._selection, self._selection_weights
            self.bank.selected.index_add_(0, sel, torch.ones_like(sel, dtype=torch.int32))
            self.rounds += 1
        (shuffle_seed,) = draw_seeds(epoch_generator(self.seed, epoch, _SHUFFLE_STREAM), 1)
        order = shuffle_order(sel, shuffle_seed)
        sel = sel[order]
        if weights is not None:
            weights = weights[order]
            table = torch.ones(n, dtype=torch.float32, device=self.device)
            table[sel] = weights
            self._weight_table = table
        else:
            self._weight_table = None
        self.bank.epoch = epoch
        self._plan = Plan(epoch, sel, weights, full, n)
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
        """Everything needed to continue with bit-identical plans (tensors are cloned)."""
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
        """Restore :meth:`state_dict`. The configuration must match this Pruner's."""
        if not isinstance(state, dict) or "config" not in state:
            raise TypeError("state must be a dict from Pruner.state_dict()")
        mine = self._config()
        for key, value in state["config"].items():
            if mine.get(key) != value:
                raise ValueError(f"checkpoint was made with {key}={value!r}, this Pruner has "
                                 f"{key}={mine.get(key)!r}")
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

    def __repr__(self) -> str:
        return (f"Pruner(num_samples={self.num_samples}, keep={self.keep}, policy={self.policy!r}, "
                f"device={self.device})")
