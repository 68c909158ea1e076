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

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .guard import CoverageWarning
from .plan import Plan
from .policies import (POLICIES, EpsilonGreedy, FullData, InfoBatch, Policy, Rule, Selection,
                       Static, UCB, Uniform)
from .pruner import Pruner
from .sizes import budget
from .refresh import Refresher, refresh_scores
from .sampler import IndexedDataset, PrunedSampler
from .schedule import Schedule
from .shard import EpochShard, Planner
from .stats import LossStats
from .static_scores import ForgettingTracker, el2n_scores

__version__ = "0.3.0"

__all__ = [
    "Pruner", "Plan", "Schedule", "LossStats", "PrunedSampler", "IndexedDataset", "budget",
    "EpochShard", "Planner", "Policy", "Rule", "Selection", "POLICIES", "FullData", "Uniform",
    "EpsilonGreedy", "UCB", "InfoBatch", "Static", "el2n_scores", "ForgettingTracker",
    "save_checkpoint", "load_checkpoint", "CheckpointError", "Refresher", "refresh_scores",
    "CoverageWarning", "__version__",
]
