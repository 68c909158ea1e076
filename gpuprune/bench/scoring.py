"""Scores of the static baselines, with their cost measured so the benchmark can charge it.

* EL2N: K models (``cfg.el2n_seeds``) train ``cfg.el2n_epochs`` epochs on full data (on the
  schedule of a full ``cfg.epochs`` run, as the EL2N paper scores early in normal training), then
  :func:`gpuprune.el2n_scores` scores every sample; the scores are averaged over the K models.
  Cost = their training + the scoring passes.
* Forgetting: counted by a :class:`gpuprune.ForgettingTracker` during a full-length full-data run.
  The benchmark's full-data reference run *is* that run (same model, data and schedule), so its
  training time is the forgetting cost (see :mod:`gpuprune.bench.runner`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..pruner import Pruner
from ..rng import mix_seed
from ..static_scores import el2n_scores
from .config import BenchConfig
from .train import DeviceData, autocast, sync, train_run

__all__ = ["ScoringCost", "el2n_cost_and_scores", "run_seed"]

_SEED_MASK = (1 << 62) - 1


def run_seed(seed: int, *stream: int) -> int:
    """A derived seed for (benchmark seed, stream...), in [0, 2**62)."""
    return mix_seed(seed, *stream) & _SEED_MASK


@dataclass
class ScoringCost:
    """Charged cost of a static scoring method: wall seconds, process CPU seconds and samples
    processed (trained on, plus one forward pass over all N per scoring model), and the reference
    step's CPU and wall seconds measured around the scoring (nan: not measured)."""

    seconds: float
    cpu_seconds: float
    samples: int
    probe_cpu_s: float = float("nan")
    probe_wall_s: float = float("nan")


def _ordered_batches(data: DeviceData, batch_size: int):
    n = data.num_samples
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(s + batch_size, n), device=data.device)
        yield data.normalize(data.x_train[idx]), data.y_train[idx], idx


def el2n_cost_and_scores(data: DeviceData, cfg: BenchConfig, seed: int, batches,
                         progress=None) -> tuple[torch.Tensor, ScoringCost]:
    """Mean EL2N scores over ``cfg.el2n_seeds`` briefly trained models, and what they cost."""
    n = data.num_samples
    total = torch.zeros(n, dtype=torch.float64)
    seconds, cpu_seconds, samples = 0.0, 0.0, 0
    for k in range(cfg.el2n_seeds):
        s = run_seed(seed, 0xE12, k)
        pruner = Pruner(n, keep=1.0, policy="full", seed=s, device=data.device)
        model, st = train_run(data=data, cfg=cfg, pruner=pruner, batches=batches,
                              init_seed=run_seed(s, 0), aug_seed=run_seed(s, 1), use_observe=False,
                              stop_after_epochs=cfg.el2n_epochs, evaluate_each_epoch=False,
                              progress=progress)
        sync(data.device)
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast(data.device, cfg.amp):
            scores = el2n_scores(model, _ordered_batches(data, cfg.eval_batch_size), n, data.device)
        sync(data.device)
        seconds += st.train_s + st.select_s + time.perf_counter() - t0
        cpu_seconds += st.cpu_s + time.process_time() - c0
        samples += st.samples + n
        total += scores.double()
    return (total / max(cfg.el2n_seeds, 1)).float(), ScoringCost(seconds, cpu_seconds, samples)
