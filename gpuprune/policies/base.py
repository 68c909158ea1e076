"""The policy contract: pick this epoch's samples from the score state.

A policy is a small object holding hyper-parameters. Its one core method, :meth:`Policy.select`,
returns the epoch's subset as device indices (in any order: the Pruner shuffles them) and, for
policies that rescale the loss, one weight per selected sample.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..scores import ScoreBank

__all__ = ["Policy", "Selection"]


@dataclass(frozen=True)
class Selection:
    """A policy's answer: sample ids (unordered) and optional per-sample loss weights."""

    indices: torch.Tensor
    weights: torch.Tensor | None = None


class Policy(ABC):
    """Base class of selection policies.

    Subclasses set :attr:`name` and implement :meth:`select`. Set :attr:`fixed_subset` to True when
    the subset must not change between epochs (static baselines): the Pruner then passes the same
    generator every epoch.
    """

    name: ClassVar[str] = "policy"
    fixed_subset: ClassVar[bool] = False
    #: whether the kept count is exactly k (False for InfoBatch, whose count depends on the scores)
    exact_k: ClassVar[bool] = True

    @abstractmethod
    def select(self, bank: ScoreBank, k: int, generator: torch.Generator) -> Selection:
        """Choose the samples of one epoch.

        Args:
            bank: the per-sample loss statistics (read only).
            k: the budget, ``round(keep * N)``; exact for every policy with ``exact_k``.
            generator: a CPU generator seeded from (seed, epoch); draw hash seeds from it with
                :func:`gpuprune.rng.draw_seeds`. Never use global RNG.
        """

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"
