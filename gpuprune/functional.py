"""The pure functional core: tensors in, tensors out, no state.

The policy classes and the Pruner are thin wrappers around these.
"""

from .policies.epsilon_greedy import epsilon_greedy_select, greedy_score
from .policies.infobatch import infobatch_select
from .policies.ucb import ucb_score
from .plan import shard_indices
from .scores import merge_groups
from .select import composite_key, hash32, hash_uniform, random_k, shuffle, top_k, top_k_by_score

__all__ = [
    "composite_key", "hash32", "hash_uniform", "random_k", "shuffle", "top_k", "top_k_by_score",
    "ucb_score", "greedy_score", "epsilon_greedy_select", "infobatch_select", "merge_groups",
    "shard_indices",
]
