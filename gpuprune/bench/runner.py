"""The sweep: every method x prune ratio x seed, on one dataset, with costs charged.

Per seed, in this order:

1. ``full``: the full-data reference run (``cfg.epochs`` epochs). When ``forgetting`` is asked for,
   this run also carries the ForgettingTracker: it is exactly the full-length scoring run the
   method needs, so its training + selection time (plus the tracker's own time) is charged to
   every forgetting row of that seed, and the tracker's time is kept out of ``full``'s time.
2. EL2N scoring (when asked for): ``cfg.el2n_seeds`` short runs; their cost is charged to every
   el2n row of that seed (scores are computed once per seed and reused across prune ratios).
3. For each prune ratio, each other method. All runs of one seed start from the same weights.

``full_short`` is full data for exactly as many optimizer steps as ``uniform`` takes at that ratio
(the "proportionally shortened schedule" baseline); its schedule runs over those steps.

With ``cfg.refresh`` other than ``"none"``, the policies that read losses (epsilon_greedy, ucb,
infobatch) run a re-score pass before each selection, charged to them (``refresh_s``); the others
ignore losses, so a pass would change nothing and they run without one.

**Lock-in detector.** Every pruned run records ``Pruner.history``: per plan, the Jaccard overlap of
its sample set with the previous plan's. The *selection overlaps* are those of plans that drew a
new selection after a pruned plan (a reused subset overlaps 1.0 by design, a full epoch says
nothing). When a dynamic method's selection overlap exceeds :data:`LOCK_IN_OVERLAP` in
:data:`LOCK_IN_EPOCHS` consecutive selections, the run has settled on one subset (dynamic pruning
turned static) and the benchmark warns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
import torch

from .._checks import resolve_device
from ..data import ImageData
from ..policies import UCB, EpsilonGreedy, InfoBatch, Policy, Static
from ..pruner import Pruner, budget
from ..schedule import Schedule
from ..static_scores import ForgettingTracker
from .config import DYNAMIC, SCORED, STATIC, BenchConfig
from .scoring import ScoringCost, el2n_cost_and_scores, run_seed
from .train import DeviceData, RunStats, make_batches, train_run

__all__ = ["BenchResult", "run_bench", "kind_of", "step_budget", "time_to_target",
           "selection_overlaps", "lock_in_runs", "LOCK_IN_OVERLAP", "LOCK_IN_EPOCHS"]

#: a selection overlap above this counts towards lock-in
LOCK_IN_OVERLAP = 0.95
#: this many consecutive such selections make a lock-in warning
LOCK_IN_EPOCHS = 3


def kind_of(method: str) -> str:
    return "dynamic" if method in DYNAMIC else "static" if method in STATIC else "baseline"


@dataclass
class BenchResult:
    """Rows (one per run), the learning curves, and the first seed's selection frequencies."""

    config: BenchConfig
    data: ImageData
    rows: list[dict] = field(default_factory=list)
    #: (method, prune_ratio, seed) -> curve points
    curves: dict[tuple[str, float, int], list[dict]] = field(default_factory=dict)
    #: (method, prune_ratio) -> (per-sample selection frequency, pruned rounds) of the first seed
    frequencies: dict[tuple[str, float], tuple[torch.Tensor, int]] = field(default_factory=dict)
    #: (method, prune_ratio, seed) -> Pruner.history of the run (pruned methods)
    histories: dict[tuple[str, float, int], list[dict]] = field(default_factory=dict)
    #: lock-in warnings, one sentence each
    warnings: list[str] = field(default_factory=list)


def selection_overlaps(history: list[dict]) -> list[tuple[int, float]]:
    """``(epoch, overlap)`` of every plan that drew a new selection right after a pruned plan."""
    out = []
    for prev, rec in zip(history, history[1:]):
        if rec["reselected"] and not rec["full"] and not prev["full"] and rec["overlap"] is not None:
            out.append((rec["epoch"], float(rec["overlap"])))
    return out


def lock_in_runs(history: list[dict], threshold: float = LOCK_IN_OVERLAP,
                 length: int = LOCK_IN_EPOCHS) -> list[tuple[int, int]]:
    """``(first epoch, last epoch)`` of every stretch of at least ``length`` consecutive selection
    overlaps (:func:`selection_overlaps`) above ``threshold``."""
    runs, start, count, last = [], None, 0, None
    for epoch, ov in selection_overlaps(history) + [(None, -1.0)]:
        if ov > threshold:
            start = epoch if count == 0 else start
            count += 1
            last = epoch
            continue
        if count >= length:
            runs.append((start, last))
        count = 0
    return runs


def _overlap_stats(history: list[dict]) -> dict:
    ovs = [ov for _, ov in selection_overlaps(history)]
    runs = lock_in_runs(history)
    return {"overlap_mean": sum(ovs) / len(ovs) if ovs else float("nan"),
            "overlap_max": max(ovs) if ovs else float("nan"),
            "lock_in_epochs": sum(b - a + 1 for a, b in runs) if runs else 0}


def step_budget(cfg: BenchConfig, num_samples: int, prune_ratio: float) -> int:
    """Optimizer steps of a ``uniform`` run at ``prune_ratio`` (warm-up epochs at full data)."""
    schedule = Schedule(cfg.epochs, warmup_epochs=cfg.warmup_epochs)
    return schedule.total_steps(num_samples, budget(1.0 - prune_ratio, num_samples), cfg.batch_size)


def make_policy(method: str, cfg: BenchConfig, scores: torch.Tensor | None) -> Policy | str:
    """The policy a benchmark method runs, with the sweep's settings."""
    if method == "epsilon_greedy":
        return EpsilonGreedy(epsilon=cfg.epsilon)
    if method == "ucb":
        return UCB(c=cfg.ucb_c, uncertainty=cfg.uncertainty, drift=cfg.ucb_drift)
    if method == "infobatch":
        return InfoBatch(delta=cfg.delta)
    if method in ("static_random", "el2n", "forgetting"):
        return Static(scores)
    return method


def time_to_target(curve: list[dict], target: float | None, clock: str = "time_s") -> float:
    """Charged seconds (``clock``: ``"time_s"`` wall, ``"cpu_s"`` process CPU) at the end of the
    first epoch whose accuracy reaches ``target``; nan if none does."""
    if target is None or math.isnan(target):
        return float("nan")
    for p in curve:
        if p["acc"] >= target:
            return p[clock]
    return float("nan")


def _make_pruner(method: str, n: int, p: float, cfg: BenchConfig, seed: int,
                 device: torch.device, scores: torch.Tensor | None) -> Pruner:
    if method in ("full", "full_short"):
        return Pruner(n, keep=1.0, policy="full", seed=seed, device=device)
    decay = cfg.decay if method in SCORED else None     # the others never read the statistics
    return Pruner(n, prune_ratio=p, policy=make_policy(method, cfg, scores), num_epochs=cfg.epochs,
                  warmup_epochs=cfg.warmup_epochs, selection_interval=cfg.selection_interval,
                  decay=decay, seed=seed, device=device)


class _NullBar:
    """Stands in for a tqdm bar when progress bars are off and tqdm is not installed."""

    def __init__(self, *args, total=None, **kwargs) -> None:
        self.total = total

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _tqdm_or_null(progress: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if progress:
            raise ImportError("progress bars need tqdm (pip install tqdm), or pass progress=False "
                              "(--no-progress)") from None
        return _NullBar
    return tqdm


def _warm_up(data: DeviceData, cfg: BenchConfig, batches, steps: int = 30) -> None:
    """An untimed throw-away run of a few steps, so that one-off costs (thread pools, allocator
    growth, kernel selection) are not charged to whichever method happens to run first."""
    n = data.num_samples
    keep = min(1.0, steps * cfg.batch_size / n)
    pruner = Pruner(n, keep=keep, policy="uniform", seed=0, device=data.device)
    short = BenchConfig(**{**cfg.to_dict(), "epochs": 1, "el2n_epochs": 1, "warmup_epochs": 0,
                           "prune_ratios": tuple(cfg.prune_ratios), "seeds": tuple(cfg.seeds),
                           "methods": tuple(cfg.methods)})
    train_run(data=data, cfg=short, pruner=pruner, batches=batches, init_seed=0, aug_seed=0,
              use_observe=True)


def _count_runs(cfg: BenchConfig) -> int:
    others = [m for m in cfg.methods if m != "full"]
    per_seed = 1 + len(cfg.prune_ratios) * len(others)
    return len(cfg.seeds) * per_seed


def run_bench(cfg: BenchConfig, data: ImageData, *, progress: bool = True) -> BenchResult:
    """Run the sweep and return its rows (see the module docstring for what is charged)."""
    tqdm = _tqdm_or_null(progress)
    device = resolve_device(cfg.device)
    ddata = DeviceData(data, device)
    batches = make_batches(cfg.loader, ddata, cfg)
    n = ddata.num_samples
    res = BenchResult(cfg, data)
    runs_bar = tqdm(total=_count_runs(cfg), desc="runs", unit="run", disable=not progress,
                    position=0, dynamic_ncols=True)

    def epochs_bar(desc: str, total: int):
        return tqdm(total=total, desc=desc, unit="ep", leave=False, disable=not progress,
                    position=1, dynamic_ncols=True)

    _warm_up(ddata, cfg, batches)
    try:
        for seed in cfg.seeds:
            init_seed, aug_seed = run_seed(seed, 1), run_seed(seed, 2)
            common = dict(data=ddata, cfg=cfg, batches=batches, init_seed=init_seed,
                          aug_seed=aug_seed)
            # 1. the full-data reference (and forgetting's scoring run)
            tracker = ForgettingTracker(n, device=device) if "forgetting" in cfg.methods else None
            bar = epochs_bar(f"seed {seed} full", cfg.epochs)
            _, full = train_run(pruner=_make_pruner("full", n, 0.0, cfg, seed, device, None),
                                use_observe=False, tracker=tracker, progress=bar, **common)
            bar.close()
            full_total = full.train_s + full.select_s
            target = cfg.target_acc if cfg.target_acc is not None else full.final_acc - cfg.target_drop
            ref = {"full_total_s": full_total, "full_cpu_s": full.cpu_s, "target": target}
            res.rows.append(_row(cfg, data, "full", 0.0, seed, full, ScoringCost(0.0, 0.0, 0), ref,
                                 None, n))
            res.curves[("full", 0.0, seed)] = full.curve
            runs_bar.update(1)
            forgetting = None
            if tracker is not None:
                forgetting = (tracker.counts(),
                              ScoringCost(full_total + full.tracker_s, full.cpu_s + full.tracker_cpu_s,
                                          full.samples))
            # 2. EL2N scores, once per seed
            el2n = None
            if "el2n" in cfg.methods:
                bar = epochs_bar(f"seed {seed} el2n scoring", cfg.el2n_seeds * cfg.el2n_epochs)
                scores, cost = el2n_cost_and_scores(ddata, cfg, seed, batches, progress=bar)
                bar.close()
                el2n = (scores, cost)
            # 3. every other method at every ratio
            for p in cfg.prune_ratios:
                for method in cfg.methods:
                    if method == "full":
                        continue
                    scores, cost = None, ScoringCost(0.0, 0.0, 0)
                    if method == "el2n":
                        scores, cost = el2n
                    elif method == "forgetting":
                        scores, cost = forgetting
                    pruner = _make_pruner(method, n, p, cfg, seed, device, scores)
                    budget_steps = step_budget(cfg, n, p) if method == "full_short" else None
                    bar = epochs_bar(f"seed {seed} p={p:g} {method}", cfg.epochs
                                     if budget_steps is None
                                     else -(-budget_steps // -(-n // cfg.batch_size)))
                    _, st = train_run(pruner=pruner, use_observe=method in SCORED,
                                      step_budget=budget_steps, time_offset=cost.seconds,
                                      cpu_offset=cost.cpu_seconds, progress=bar,
                                      refresh=cfg.refresh if method in SCORED else "none",
                                      **common)
                    bar.close()
                    stats = None if method == "full_short" else pruner.selection_stats()
                    history = [] if method == "full_short" else pruner.history
                    if history:
                        res.histories[(method, p, seed)] = history
                        _warn_lock_in(res, method, p, seed, history)
                    res.rows.append(_row(cfg, data, method, p, seed, st, cost, ref, stats, n,
                                         history))
                    res.curves[(method, p, seed)] = st.curve
                    if stats is not None and seed == cfg.seeds[0]:
                        res.frequencies[(method, p)] = (stats["frequency"], stats["rounds"])
                    runs_bar.update(1)
    finally:
        runs_bar.close()
    return res


def _warn_lock_in(res: BenchResult, method: str, p: float, seed: int, history: list[dict]) -> None:
    if method not in DYNAMIC:
        return
    why = (" (with losses from training only, the unselected samples' scores are frozen; see "
           "UCB's drift, or --refresh)" if res.config.refresh == "none" else
           " (with fresh losses for every sample: the method keeps choosing the same hard subset)")
    for a, b in lock_in_runs(history):
        res.warnings.append(
            f"{method} p={p:g} seed {seed}: the selection overlap with the previous epoch stayed "
            f"above {LOCK_IN_OVERLAP:g} in epochs {a}-{b} ({b - a + 1} consecutive selections): "
            f"it trained (almost) the same subset every epoch, as static pruning does{why}")


def _row(cfg: BenchConfig, data: ImageData, method: str, p: float, seed: int, st: RunStats,
         cost: ScoringCost, ref: dict, stats: dict | None, n: int,
         history: list[dict] | None = None) -> dict:
    total = cost.seconds + st.train_s + st.select_s + st.refresh_s
    cpu = cost.cpu_seconds + st.cpu_s
    return {
        "dataset": data.name,
        "model": cfg.model,
        "device": cfg.device,
        "loader": cfg.loader,
        "method": method,
        "kind": kind_of(method),
        "prune_ratio": p,
        "seed": seed,
        "epochs": st.epochs,
        "steps": st.steps,
        "samples_seen": st.samples,
        "epochs_of_data": st.samples / n,
        "scoring_samples": cost.samples,
        "test_acc": st.final_acc,
        "best_acc": st.best_acc,
        "train_s": st.train_s,
        "select_s": st.select_s,
        "refresh_s": st.refresh_s,
        "refresh_samples": st.refresh_samples,
        "score_s": cost.seconds,
        "total_s": total,
        "eval_s": st.eval_s,
        "speedup": ref["full_total_s"] / total if total > 0 else float("nan"),
        "cpu_s": cpu,
        "cpu_speedup": ref["full_cpu_s"] / cpu if cpu > 0 else float("nan"),
        "target_acc": ref["target"],
        "time_to_target_s": time_to_target(st.curve, ref["target"]),
        "time_to_target_cpu_s": time_to_target(st.curve, ref["target"], "cpu_s"),
        "rounds": stats["rounds"] if stats else 0,
        "always": stats["always"] if stats else float("nan"),
        "sometimes": stats["sometimes"] if stats else float("nan"),
        "never": stats["never"] if stats else float("nan"),
        **_overlap_stats(history or []),
    }
