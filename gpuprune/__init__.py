"""gpuprune: dynamic data pruning for deep-learning training.

Train each epoch on a subset chosen from per-sample loss statistics that stay on the training
device (Raju, Daruwalla & Lipasti, "Accelerating Deep Learning with Dynamic Data Pruning", 2021).

Three changed lines in a plain PyTorch loop::

    pruner = gpuprune.Pruner(len(train_set), keep=0.5, policy="ucb", device=device)
    loader = DataLoader(gpuprune.IndexedDataset(train_set), batch_size=128, sampler=pruner.sampler())
    ...
        loss = pruner.observe(idx.to(device), F.cross_entropy(model(x), y, reduction="none"))

DALI users swap their iterator for :class:`gpuprune.dali.PrunedDALIIterator` (needs DALI).
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .plan import Plan, shard_indices
from .policies import POLICIES, EpsilonGreedy, FullData, InfoBatch, Policy, Selection, Static, UCB, Uniform
from .pruner import Pruner, budget
from .sampler import IndexedDataset, PrunedSampler
from .scores import ScoreBank
from .static_scores import ForgettingTracker, el2n_scores

__version__ = "0.1.0"

__all__ = [
    "Pruner", "Plan", "ScoreBank", "PrunedSampler", "IndexedDataset", "budget", "shard_indices",
    "Policy", "Selection", "POLICIES", "FullData", "Uniform", "EpsilonGreedy", "UCB", "InfoBatch",
    "Static", "el2n_scores", "ForgettingTracker", "save_checkpoint", "load_checkpoint",
    "__version__",
]
