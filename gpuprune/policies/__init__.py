"""Selection policies, one per module, and a name -> class registry."""

from __future__ import annotations

from .base import Policy, Selection
from .epsilon_greedy import EpsilonGreedy
from .full import FullData
from .infobatch import InfoBatch
from .static import Static
from .uniform import Uniform
from .ucb import UCB

__all__ = ["Policy", "Selection", "FullData", "Uniform", "EpsilonGreedy", "UCB", "InfoBatch",
           "Static", "POLICIES"]

#: policy name -> class, for ``Pruner(policy="name")``
POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (FullData, Uniform, EpsilonGreedy, UCB, InfoBatch, Static)
}
