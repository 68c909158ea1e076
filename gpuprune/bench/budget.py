"""How much work a sweep is, before running it, and how long that takes at given rates.

The work is counted in samples: *trained* (a forward and a backward pass, plus the Pruner's
bookkeeping) and *forward-only* (test evaluation, the re-score pass, EL2N's scoring pass, the
exploitation measurement). Sizes come from each method's :class:`gpuprune.Schedule` and budget,
so they are exact for every policy that plans exactly k samples (the reference-step probes around
every run are counted as training too); InfoBatch plans a loss-dependent
number, estimated with :data:`INFOBATCH_BELOW_MEAN` of the samples below the mean loss (measured
on Fashion-MNIST: 0.65 to 0.7), and the equal-time ladder is counted as every grid fraction
between the smallest kept share and 1 that no ``full_short`` run covers (an upper estimate: only
the fractions that bracket some method's time run).

:func:`project` turns the work into seconds at a training rate and a forward rate (samples per
second), measured by the benchmark's warm-up or assumed for another machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..pruner import Pruner
from ..sizes import budget
from ..sizes import num_batches
from .config import (BenchConfig, base_method, keep_argument, make_policy, step_budget,
                     uses_refresh)

__all__ = ["Work", "planned_work", "project", "INFOBATCH_BELOW_MEAN", "evaluations",
           "step_budget_samples"]

#: share of samples InfoBatch finds below the mean loss in a pruned epoch (an estimate)
INFOBATCH_BELOW_MEAN = 0.7


@dataclass
class Work:
    """Samples processed by one item of a sweep (all seeds together).

    Attributes:
        what: a label (a method and ratio, ``"el2n scoring"``, ``"ladder (upper estimate)"``).
        train: samples trained (forward + backward).
        forward: forward-only samples.
        exact: False when the count is an estimate (InfoBatch, the ladder).
    """

    what: str
    train: float
    forward: float
    exact: bool = True


def evaluations(epochs: int, eval_every: int) -> int:
    """Test-set evaluations of a run of ``epochs`` epochs: every ``eval_every`` and the last."""
    return epochs // eval_every + (1 if epochs % eval_every else 0)


def step_budget_samples(steps: int, n: int, batch_size: int) -> int:
    """Samples a full-data run trains in ``steps`` optimizer steps (whole epochs, then the
    first batches of the next)."""
    per_epoch = num_batches(n, batch_size)
    whole, rest = divmod(steps, per_epoch)
    return whole * n + min(rest * batch_size, n)


def _pruned_sizes(method: str, cfg: BenchConfig, n: int, p: float) -> tuple[list[float], bool]:
    """Samples planned per epoch by ``method`` at ratio ``p``, and whether that is exact."""
    base = base_method(method)
    pruner = Pruner(n, **keep_argument(method, cfg, p),
                    policy=make_policy(method, cfg, _placeholder(base, n)),
                    num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                    selection_interval=cfg.selection_interval)
    sched, k = pruner.schedule, budget(1.0 - p, n)
    if base != "infobatch":
        return [float(sched.epoch_size(e, n, k)) for e in range(cfg.epochs)], True
    q = min(1.0, max(pruner.policy.min_keep, 1.0 - p))
    sizes, first = [], True
    for e in range(cfg.epochs):
        if sched.is_full(e) or first:          # epoch 0 of InfoBatch: every sample unseen
            sizes.append(float(n))
            first = first and sched.is_full(e)
        else:
            below = INFOBATCH_BELOW_MEAN * n
            sizes.append(n - below + math.floor(q * below))
    return sizes, False


def _placeholder(base: str, n: int):
    import torch
    return torch.zeros(n) if base in ("static_random", "el2n", "forgetting") else None


def planned_work(cfg: BenchConfig, n: int, n_test: int) -> list[Work]:
    """Every item of the sweep ``cfg`` on ``n`` training and ``n_test`` test samples."""
    seeds, e = len(cfg.seeds), cfg.epochs
    evals = evaluations(e, cfg.eval_every) * n_test
    explore = e * n if cfg.exploitation else 0
    out = [Work("full", seeds * e * n, seeds * (evals + explore))]
    if "el2n" in cfg.methods:
        out.append(Work("el2n scoring", seeds * cfg.el2n_seeds * cfg.el2n_epochs * n,
                        seeds * cfg.el2n_seeds * n))
    shorts = set()
    for p in cfg.prune_ratios:
        for m in cfg.methods:
            if m == "full":
                continue
            if m == "full_short":
                steps = step_budget(cfg, n, p)
                shorts.add(steps)
                epochs = -(-steps // num_batches(n, cfg.batch_size))
                out.append(Work(f"full_short p={p:g}",
                                seeds * step_budget_samples(steps, n, cfg.batch_size),
                                seeds * (evaluations(epochs, cfg.eval_every) * n_test
                                         + (epochs * n if cfg.exploitation else 0))))
                continue
            sizes, exact = _pruned_sizes(m, cfg, n, p)
            fwd = evals + explore
            if uses_refresh(m):
                fwd += sum(_refreshed(cfg, n, sizes, e_) for e_ in range(1, e))
            out.append(Work(f"{m} p={p:g}", seeds * sum(sizes), seeds * fwd, exact))
    runs = 1 + len(cfg.prune_ratios) * (len(cfg.methods) - 1) + ("el2n" in cfg.methods)
    if cfg.equal_time:
        total_steps = e * num_batches(n, cfg.batch_size)
        lowest = 1.0 - max(cfg.prune_ratios)
        fractions = [f for f in cfg.ladder if lowest - 0.1 < f < 1.0
                     and not any(abs(s - f * total_steps) <= 0.02 * total_steps for s in shorts)]
        train = sum(step_budget_samples(max(1, round(f * total_steps)), n, cfg.batch_size)
                    for f in fractions)
        evs = sum(evaluations(max(1, math.ceil(f * e)), cfg.eval_every) for f in fractions)
        out.append(Work("ladder (upper estimate)", seeds * train, seeds * evs * n_test, False))
        runs += len(fractions)
    if cfg.probe_steps:
        out.append(Work("reference-step probes", seeds * runs * 2 * cfg.probe_steps
                        * min(cfg.batch_size, n), 0.0, cfg.equal_time is False))
    return out


def _refreshed(cfg: BenchConfig, n: int, sizes: list[float], epoch: int) -> float:
    """Samples re-scored before ``epoch`` (a selection after a pruned plan; see
    :func:`gpuprune.refresh.refresh_due`)."""
    prev_full = sizes[epoch - 1] >= n
    if epoch < cfg.warmup_epochs or sizes[epoch] >= n:
        return 0.0
    if (epoch - cfg.warmup_epochs) % cfg.selection_interval:
        return 0.0
    if cfg.refresh == "all":
        return float(n)
    return 0.0 if prev_full else n - sizes[epoch - 1]


def project(work: list[Work], train_rate: float, forward_rate: float) -> dict:
    """Seconds for ``work`` at ``train_rate`` trained and ``forward_rate`` forward-only samples
    per second: ``{"seconds", "train", "forward", "full_run_equivalents", "exact"}``. A full-run
    equivalent is the work of the ``full`` item (all seeds)."""
    train = sum(w.train for w in work)
    forward = sum(w.forward for w in work)
    full = next((w for w in work if w.what == "full"), None)
    unit = full.train / train_rate + full.forward / forward_rate if full else float("nan")
    seconds = train / train_rate + forward / forward_rate
    return {"seconds": seconds, "train": train, "forward": forward,
            "full_run_equivalents": seconds / unit if unit else float("nan"),
            "train_rate": train_rate, "forward_rate": forward_rate,
            "exact": all(w.exact for w in work)}
