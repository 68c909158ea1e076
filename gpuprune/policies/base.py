"""The policy contract: pick an epoch's samples from the loss statistics.

A policy is a small object that owns its settings (validated at construction, reported by
:meth:`Policy.settings` for checkpoints and the cross-rank check) and one method, :meth:`Policy.select`,
which calls a pure function of its module: tensors in, a :class:`Selection` out. Policies compute
their scores with plain torch ops and select through the backend's primitives, so they never branch
on the backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..keys import Rule

if TYPE_CHECKING:  # pragma: no cover
    from ..backend import Backend
    from ..stats import LossStats

__all__ = ["Policy", "Selection"]


@dataclass(frozen=True, eq=False)
class Selection:
    """A policy's answer: the chosen ids, or a :class:`~gpuprune.keys.Rule` describing them (which
    the backend carries out with the shuffle and the bookkeeping, in one launch on the kernels).

    Attributes:
        indices: the chosen sample ids, unordered (the Pruner shuffles them), on the stats' device;
            None when ``rule`` is given.
        rescaled: optional bool mask over all N samples: the chosen ones among them have their loss
            multiplied by ``weight`` (InfoBatch's rescaling); None when every weight is 1. A rule
            brings its own (its rank-0 samples).
        weight: the loss weight of the rescaled samples.
        rule: the selection described instead of computed.
    """

    indices: torch.Tensor | None = None
    rescaled: torch.Tensor | None = None
    weight: float = 1.0
    rule: Rule | None = None

    def __post_init__(self) -> None:
        if (self.indices is None) == (self.rule is None):
            raise ValueError("a Selection holds indices or a rule, exactly one")


class Policy(ABC):
    """Base class of selection policies.

    Class attributes a subclass may set:
        name: the registry name (``Pruner(policy=name)``).
        exact_k: plans exactly the budget k (False for InfoBatch, whose count depends on the scores).
        fixed_subset: one subset for the whole run (static baselines): selected once, from epoch 0's
            generator.
        keeps_all: every epoch is full data (the ``full`` baseline).
        reads_losses: the selection depends on the loss statistics (False for uniform, static and
            full: their plans are known before the epoch's losses, see ``Pruner.peek``).
        default_decay: the EMA weight the statistics use when the Pruner is not given ``decay``.
    """

    name: ClassVar[str] = "policy"
    exact_k: ClassVar[bool] = True
    fixed_subset: ClassVar[bool] = False
    keeps_all: ClassVar[bool] = False
    reads_losses: ClassVar[bool] = True
    default_decay: ClassVar[float] = 0.9

    def settings(self) -> dict[str, Any]:
        """The policy's settings as plain values (tensors by digest); part of the Pruner's config."""
        return {}

    def config(self) -> dict[str, Any]:
        """``{"name": ..., **settings}``."""
        return {"name": self.name, **self.settings()}

    def resolve(self, keep: float, num_samples: int, num_epochs: int | None) -> "Policy":
        """This policy with every setting made concrete for a run (defaults taken from the budget),
        checked against it; raises ValueError naming the setting that does not fit. Default: self."""
        return self

    def final_full_epochs(self, num_epochs: int | None) -> int:
        """Full-data epochs this policy wants at the end of a run of ``num_epochs``. Default 0."""
        return 0

    @abstractmethod
    def select(self, stats: "LossStats", k: int, *, epoch: int, generator: torch.Generator,
               backend: "Backend") -> Selection:
        """Choose the samples of one epoch.

        Args:
            stats: the per-sample loss statistics (read only).
            k: the budget ``round(keep * N)``; exact for every policy with ``exact_k``.
            epoch: the epoch being planned.
            generator: a CPU generator seeded from (seed, epoch); draw hash seeds from it with
                :func:`gpuprune.rng.draw_seeds`. Never use global RNG.
            backend: the primitives (:meth:`~gpuprune.backend.Backend.top_k`).
        """

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Policy) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(repr(self.config()))
