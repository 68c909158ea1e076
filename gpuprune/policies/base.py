"""The policy contract: a policy owns its whole rule.

A policy is a small object that owns its settings (validated at construction, reported by
:meth:`Policy.settings` for checkpoints and the cross-rank check) and two methods:

* :meth:`Policy.rule`, **the one hook** through which it shapes a run: it makes its settings
  concrete for the run and returns the :class:`Rule` the Pruner follows, the run's
  :class:`~gpuprune.Schedule` (which epochs are full, whether it selects once, whether a pruned
  epoch's size is exactly the budget, whether its selections read the losses), the budget k and
  the EMA decay. Nothing else reads a policy's kind: the Pruner, the loaders and the re-score pass
  ask the Schedule.
* :meth:`Policy.select`, which calls the pure ``<name>_select`` function of its module: the
  settings and hash seeds in, a :class:`Selection` out. A built-in policy *describes* its
  selection (a :class:`~gpuprune.keys.Pick`: a :class:`~gpuprune.keys.Score` of the statistics,
  the budget, the seeds) and the backend carries it out with the shuffle and the bookkeeping in
  one call (one kernel launch on a GPU), so no policy ever branches on the backend. A custom
  policy may instead return the ids it computed itself.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..keys import Pick
from ..schedule import Schedule
from ..sizes import budget

if TYPE_CHECKING:  # pragma: no cover
    from ..backend import Backend
    from ..stats import LossStats

__all__ = ["Policy", "Selection", "Rule", "DEFAULT_DECAY"]

#: the EMA weight the statistics keep per observation when neither the user nor the policy says
DEFAULT_DECAY = 0.9


@dataclass(frozen=True, eq=False)
class Selection:
    """A policy's answer, in exactly one of three forms: ``pick`` (a selection described, which the
    backend carries out), ``indices`` (ids chosen by the policy itself) or ``everything``.

    Attributes:
        indices: the chosen sample ids, unordered (the plan orders them), on the stats' device.
        rescaled: with ``indices``, an optional bool mask over all N samples: the chosen ones
            among them have their loss multiplied by ``weight``; None when every weight is 1.
        weight: the loss weight of the rescaled samples.
        pick: the selection described (:class:`~gpuprune.keys.Pick`); an InfoBatch pick brings
            its own rescaled samples (those of rank 0).
        everything: every sample (the full-data epochs).
    """

    indices: torch.Tensor | None = None     # first, as in 0.2: Selection(ids, rescaled, weight)
    rescaled: torch.Tensor | None = None
    weight: float = 1.0
    pick: Pick | None = None
    everything: bool = False

    def __post_init__(self) -> None:
        forms = (self.pick is not None) + (self.indices is not None) + bool(self.everything)
        if forms != 1:
            raise ValueError("a Selection holds exactly one of pick=, indices= and everything=True")
        if self.rescaled is not None and self.indices is None:
            raise ValueError("rescaled= goes with indices= (a pick brings its own)")


@dataclass(frozen=True)
class Rule:
    """A policy's whole rule for one run: what :meth:`Policy.rule` returns and the Pruner follows.

    Attributes:
        policy: the policy with every setting concrete for this run (InfoBatch's ``ratio`` taken
            from ``keep``); its :meth:`Policy.select` makes the selections.
        schedule: the run's :class:`~gpuprune.Schedule`, the policy's part included
            (``final_full_epochs`` resolved, ``all_full``, ``select_once``, ``exact_size``,
            ``reads_losses``).
        k: the budget, ``round(keep * N)`` (half up, at least 1); N for the ``"full"`` baseline.
        decay: the EMA weight the statistics keep per observation, in [0, 1).
    """

    policy: "Policy"
    schedule: Schedule
    k: int
    decay: float


class Policy(ABC):
    """Base class of selection policies.

    A subclass sets :attr:`name`, implements :meth:`select` and, when its rule differs from the
    default (a selection per epoch from the losses, exactly k samples, ``decay=0.9``, no extra
    full epochs), overrides :meth:`rule`, the one hook, and :meth:`check_selection` with it.
    """

    #: the registry name (``Pruner(policy=name)``)
    name: ClassVar[str] = "policy"

    def settings(self) -> dict[str, Any]:
        """The policy's settings as plain values (tensors by digest); part of the Pruner's config."""
        return {}

    def config(self) -> dict[str, Any]:
        """``{"name": ..., **settings}``."""
        return {"name": self.name, **self.settings()}

    def rule(self, keep: float, num_samples: int, schedule: Schedule,
             decay: float | None = None) -> Rule:
        """The one hook: this policy's rule for a run of ``num_samples`` samples keeping ``keep``
        of them per pruned epoch, on the user's ``schedule`` (``final_full_epochs=None``: the
        policy decides), with the user's ``decay`` (None: the policy's default).

        Raises ValueError naming the setting that does not fit the run. The default: this policy
        as it is, the schedule with no extra full epochs, ``k = budget(keep, num_samples)``, exact
        sizes, selections that read the losses, ``decay=0.9``. Subclasses call it and adjust.
        (A subclass written for 0.2 that sets its kind through the class attributes of 0.2 keeps
        working, with a DeprecationWarning: see :func:`_legacy_rule`.)
        """
        rule = Rule(self, replace(schedule, final_full_epochs=schedule.final),
                    budget(keep, num_samples), DEFAULT_DECAY if decay is None else decay)
        return _legacy_rule(self, rule, keep, num_samples, schedule, decay)

    def check_selection(self, selection: Selection, k: int | None, num_samples: int,
                        name: str) -> None:
        """Raise ValueError naming ``name`` unless ``selection`` is one this policy can make with
        budget ``k`` (None: the run's pruned sizes depend on the losses) over ``num_samples``
        samples. Used on a plan restored from a checkpoint (its ids already checked unique and in
        range, its rescaled mask unpacked), so it may read the host. Default: exactly k ids and
        no rescaled samples (a policy that rescales losses overrides this, as InfoBatch does).
        """
        n = selection.indices.numel()
        if k is not None and n != k:
            raise ValueError(f"{name} holds {n} ids, the budget is k={k}")
        if selection.rescaled is not None:
            raise ValueError(f"{name}: {self!r} does not rescale losses, but the plan marks "
                             f"rescaled samples")

    @abstractmethod
    def select(self, stats: "LossStats", k: int, *, epoch: int, generator: torch.Generator,
               backend: "Backend") -> Selection:
        """Choose the samples of one epoch.

        Args:
            stats: the per-sample loss statistics (read only).
            k: the budget from :meth:`rule`; a policy whose schedule has ``exact_size`` returns
                exactly k ids.
            epoch: the epoch being planned.
            generator: a CPU generator seeded from (seed, epoch); draw hash seeds from it with
                :func:`gpuprune.rng.draw_seeds`. Never use global RNG.
            backend: the backend (for a custom policy that computes its ids with
                :meth:`~gpuprune.backend.Backend.top_k`); built-in policies return a pick.
        """

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Policy) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(repr(self.config()))


#: the 0.2 class attributes and methods through which a subclass set its kind
_LEGACY = ("exact_k", "fixed_subset", "keeps_all", "reads_losses", "default_decay", "resolve",
           "final_full_epochs")


def _legacy_rule(policy: Policy, rule: Rule, keep: float, num_samples: int, schedule: Schedule,
                 decay: float | None) -> Rule:
    """``rule`` adjusted by a 0.2-style subclass's class attributes (``exact_k = False``,
    ``fixed_subset``, ``keeps_all``, ``reads_losses = False``, ``default_decay``) and methods
    (``resolve``, ``final_full_epochs``), with a DeprecationWarning naming them; ``rule`` itself for
    every other policy. So a custom policy from 0.2 keeps its behaviour instead of silently
    losing it; a new one overrides :meth:`Policy.rule`."""
    cls = type(policy)
    used = [name for name in _LEGACY if hasattr(cls, name)]
    if not used:
        return rule
    warnings.warn(f"{cls.__name__} sets {', '.join(used)}, the policy kind of gpuprune 0.2; "
                  f"override Policy.rule() instead (see gpuprune.policies.base)",
                  DeprecationWarning, stacklevel=4)
    chosen = policy.resolve(keep, num_samples, schedule.num_epochs) if "resolve" in used else policy
    final = schedule.final_full_epochs
    if final is None and "final_full_epochs" in used:
        final = policy.final_full_epochs(schedule.num_epochs)
    s = rule.schedule
    keeps_all = getattr(cls, "keeps_all", s.all_full)
    kind = replace(s, final_full_epochs=final or 0, all_full=keeps_all,
                   select_once=getattr(cls, "fixed_subset", s.select_once),
                   exact_size=getattr(cls, "exact_k", s.exact_size),
                   reads_losses=getattr(cls, "reads_losses", s.reads_losses))
    return Rule(chosen, kind, num_samples if keeps_all else rule.k,
                getattr(cls, "default_decay", rule.decay) if decay is None else decay)
