"""Selection policies, one per module, and a name -> class registry.

Each module holds one policy: a pure ``<name>_select(...) -> Selection`` over tensors, and a class
owning the policy's settings and its whole rule (:meth:`Policy.rule`, the one hook).
"""

from __future__ import annotations

from .base import Policy, Rule, Selection
from .epsilon_greedy import EpsilonGreedy
from .full import FULL_DATA, FullData
from .infobatch import InfoBatch
from .static import Static
from .uniform import Uniform
from .ucb import UCB

__all__ = ["Policy", "Selection", "Rule", "FullData", "Uniform", "EpsilonGreedy", "UCB",
           "InfoBatch", "Static", "POLICIES", "FULL_DATA", "make_policy"]

#: policy name -> class, for ``Pruner(policy="name")``
POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (FullData, Uniform, EpsilonGreedy, UCB, InfoBatch, Static)
}


def make_policy(policy: str | Policy) -> Policy:
    """A policy instance from a registry name (default settings) or an instance (returned as is)."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, type) and issubclass(policy, Policy):
        raise TypeError(f"policy must be a name or a Policy instance, got the class "
                        f"{policy.__name__}; write policy={policy.__name__}()")
    if not isinstance(policy, str):
        raise TypeError(f"policy must be a name or a Policy instance, got "
                        f"{type(policy).__name__} {policy!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)} or a Policy instance, got "
                         f"policy={policy!r}")
    return POLICIES[policy]()
