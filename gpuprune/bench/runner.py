"""The sweep: every method x prune ratio x seed, on one dataset, with costs charged.

Per seed, in this order:

1. ``full``: the full-data reference run (``cfg.epochs`` epochs). When ``forgetting`` is asked for,
   this run also carries the ForgettingTracker: it is exactly the full-length scoring run the
   method needs, so its training + selection time (plus the tracker's own time) is charged to
   every forgetting row of that seed, and the tracker's time is kept out of ``full``'s time.
2. EL2N scoring (when asked for): ``cfg.el2n_seeds`` short runs; their cost is charged to every
   el2n row of that seed (scores are computed once per seed and reused across prune ratios).
3. For each prune ratio, each other method. All runs of one seed start from the same weights.
   The ``+refresh`` methods run their policy with a re-score pass before each selection
   (``cfg.refresh`` says over which samples), charged to them (``refresh_s``), in the same sweep
   and against the same reference as the plain policy.
4. The equal-time ladder (``cfg.equal_time``): full data on shortened schedules whose charged
   times bracket each method's (:mod:`gpuprune.bench.equal_time`); then every row of the seed
   gets its paired differences: against full data (``delta_full``), against full data for as
   many optimizer steps (``full_short``, ``delta_steps``), and against full data for the same
   charged time (``delta_time``).

``full_short`` is full data for exactly as many optimizer steps as ``uniform`` takes at that ratio
(the "proportionally shortened schedule" baseline); its schedule runs over those steps. It and
the full run are ladder runs too.

**Lock-in detector.** Every pruned run records ``Pruner.history``: per plan, the Jaccard overlap of
its sample set with the previous plan's. The *selection overlaps* are those of plans that drew a
new selection after a pruned plan (a reused subset overlaps 1.0 by design, a full epoch says
nothing). When a dynamic method's selection overlap exceeds :data:`LOCK_IN_OVERLAP` in
:data:`LOCK_IN_EPOCHS` consecutive selections, the run has settled on one subset (dynamic pruning
turned static) and the benchmark warns.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .._checks import resolve_device
from ..data import ImageData
from ..pruner import Pruner
from ..static_scores import ForgettingTracker
from .budget import planned_work, project
from .config import (DYNAMIC, SCORED, STATIC, BenchConfig, base_method, keep_argument,
                     make_policy, step_budget, uses_refresh)
from .equal_time import Rung, equal_time, rungs_to_add
from .scoring import ScoringCost, el2n_cost_and_scores, run_seed
from .timeline import Timeline
from .train import DeviceData, ReferenceStep, RunStats, make_batches, train_run

__all__ = ["BenchResult", "run_bench", "kind_of", "step_budget", "time_to_target",
           "selection_overlaps", "lock_in_runs", "LOCK_IN_OVERLAP", "LOCK_IN_EPOCHS",
           "LADDER_ROUNDS", "BudgetExceeded", "make_policy"]

#: a selection overlap above this counts towards lock-in
LOCK_IN_OVERLAP = 0.95
#: this many consecutive such selections make a lock-in warning
LOCK_IN_EPOCHS = 3
#: rounds of adding ladder runs after refitting the cost line (see equal_time.rungs_to_add)
LADDER_ROUNDS = 3


def kind_of(method: str) -> str:
    base = base_method(method)
    return "dynamic" if base in DYNAMIC else "static" if base in STATIC else "baseline"


@dataclass
class BenchResult:
    """Rows (one per run), the learning curves, the equal-time ladder, and the first seed's
    selection frequencies."""

    config: BenchConfig
    data: ImageData
    rows: list[dict] = field(default_factory=list)
    #: (method, prune_ratio, seed) -> curve points
    curves: dict[tuple[str, float, int], list[dict]] = field(default_factory=dict)
    #: (method, prune_ratio) -> (per-sample selection frequency, pruned rounds) of the first seed
    frequencies: dict[tuple[str, float], tuple[torch.Tensor, int]] = field(default_factory=dict)
    #: (method, prune_ratio, seed) -> Pruner.history of the run (pruned methods)
    histories: dict[tuple[str, float, int], list[dict]] = field(default_factory=dict)
    #: (method, prune_ratio, seed) -> per-epoch exploitation records (cfg.exploitation)
    exploitation: dict[tuple[str, float, int], list[dict]] = field(default_factory=dict)
    #: seed -> the ladder's runs: {"steps", "fraction", "source", "time_s", "cpu_s", "acc"}
    ladder: dict[int, list[dict]] = field(default_factory=dict)
    #: lock-in warnings, one sentence each
    warnings: list[str] = field(default_factory=list)
    #: the warm-up's measured rates and the projected length of the sweep
    projection: dict = field(default_factory=dict)
    #: where the wall time went (see :class:`gpuprune.bench.timeline.Timeline`)
    timeline: Timeline = field(default_factory=Timeline)


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


def time_to_target(curve: list[dict], target: float | None, clock: str = "time_s") -> float:
    """Charged seconds (``clock``: ``"time_s"`` wall, ``"cpu_s"`` process CPU) at the end of the
    first evaluated epoch whose accuracy reaches ``target``; nan if none does."""
    if target is None or math.isnan(target):
        return float("nan")
    for p in curve:
        if p["acc"] >= target:
            return p[clock]
    return float("nan")


def _make_pruner(method: str, n: int, p: float, cfg: BenchConfig, seed: int,
                 device: torch.device, scores: torch.Tensor | None) -> Pruner:
    if method in ("full", "full_short"):
        return Pruner(n, keep=1.0, policy="full", seed=seed, device=device,
                      backend=cfg.pruner_backend)
    decay = cfg.decay if base_method(method) in SCORED else None   # the others never read it
    return Pruner(n, **keep_argument(method, cfg, p), policy=make_policy(method, cfg, scores),
                  num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                  selection_interval=cfg.selection_interval,
                  decay=decay, seed=seed, device=device, backend=cfg.pruner_backend)


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


def _warm_up(data: DeviceData, cfg: BenchConfig, batches, steps: int = 30) -> dict:
    """Untimed throw-away runs, so that one-off costs (thread pools, allocator growth, kernel
    selection) are not charged to whichever method happens to run first. They also measure the
    rates the projection uses: trained samples per second in a second run of ``steps`` steps
    (the first, of ``steps // 3``, absorbs the one-off costs), and forward-only samples per second
    in a test-set evaluation (after an untimed one)."""
    from .train import evaluate, sync
    n = data.num_samples
    short = cfg.replace(epochs=1, el2n_epochs=1, warmup_epochs=0, eval_every=1)
    st = None
    for count in (max(1, steps // 3), steps):
        keep = min(1.0, count * cfg.batch_size / n)
        pruner = Pruner(n, keep=keep, policy="uniform", seed=0, device=data.device,
                        backend=cfg.pruner_backend)
        model, st = train_run(data=data, cfg=short, pruner=pruner, batches=batches, init_seed=0,
                              aug_seed=0, use_observe=True, evaluate_each_epoch=False)
    evaluate(model, data, cfg.eval_batch_size, cfg.amp)
    sync(data.device)
    t0 = time.perf_counter()
    evaluate(model, data, cfg.eval_batch_size, cfg.amp)
    sync(data.device)
    fwd = len(data.x_test) / max(time.perf_counter() - t0, 1e-9)
    return {"train_rate": st.samples / max(st.train_s, 1e-9), "forward_rate": fwd,
            "source": f"measured by the warm-up ({st.samples} samples trained, "
                      f"{len(data.x_test)} evaluated)"}


def _count_runs(cfg: BenchConfig) -> int:
    others = [m for m in cfg.methods if m != "full"]
    per_seed = 1 + len(cfg.prune_ratios) * len(others)
    return len(cfg.seeds) * per_seed


class BudgetExceeded(RuntimeError):
    """The projected length of a sweep is over the time limit it was given."""


def run_bench(cfg: BenchConfig, data: ImageData, *, progress: bool = True,
              timeline: Timeline | None = None, time_limit_s: float | None = None,
              rates: dict | None = None, log=None) -> BenchResult:
    """Run the sweep and return its rows (see the module docstring for what is charged).

    Args:
        cfg: the sweep.
        data: the dataset.
        progress: tqdm progress bars.
        timeline: where to record the wall time of each part (a new one by default).
        time_limit_s: after the warm-up, raise :class:`BudgetExceeded` if the projected length
            of the sweep (:func:`gpuprune.bench.budget.project`) is over this many seconds.
        rates: ``{"train_rate", "forward_rate"}`` (samples per second) to project with instead
            of the warm-up's measurement.
        log: called with one line of text when the projection is known (before the sweep).
    """
    tqdm = _tqdm_or_null(progress)
    tl = timeline if timeline is not None else Timeline()
    res = BenchResult(cfg, data, timeline=tl)
    device = resolve_device(cfg.device)
    with tl.phase("data to device"):
        ddata = DeviceData(data, device, cfg.channels_last)
        batches = make_batches(cfg.loader, ddata, cfg)
    # cudnn.benchmark stays as torch leaves it (off): the last batch of an epoch changes size
    # from epoch to epoch (InfoBatch, re-score passes), and each new shape would be re-timed
    runs_bar = tqdm(total=_count_runs(cfg), desc="runs", unit="run", disable=not progress,
                    position=0, dynamic_ncols=True)
    try:
        with tl.phase("warm-up (uncharged)"):
            measured = _warm_up(ddata, cfg, batches)
        use = dict(rates) if rates else measured
        use.setdefault("source", "given")
        res.projection = {**project(planned_work(cfg, ddata.num_samples, len(data.x_test)),
                                    use["train_rate"], use["forward_rate"]),
                          "source": use["source"], "measured": measured}
        if log is not None:
            log(f"projected {res.projection['seconds']:.0f} s "
                f"({res.projection['full_run_equivalents']:.1f} full-run equivalents; "
                f"{use['source']})")
        if time_limit_s is not None and res.projection["seconds"] > time_limit_s:
            raise BudgetExceeded(
                f"the sweep is projected to take {res.projection['seconds']:.0f} s "
                f"({res.projection['full_run_equivalents']:.1f} full-run equivalents at "
                f"{use['train_rate']:.0f} trained and {use['forward_rate']:.0f} forward samples/s, "
                f"{use['source']}), over the limit of {time_limit_s:.0f} s")
        probe = ReferenceStep(ddata, cfg, cfg.probe_steps) if cfg.probe_steps else None
        for seed in cfg.seeds:
            _run_seed(res, ddata, batches, seed, tqdm, runs_bar, progress, probe)
    finally:
        runs_bar.close()
    return res


def _run_seed(res: BenchResult, ddata: DeviceData, batches, seed: int, tqdm, runs_bar,
              progress: bool, probe: ReferenceStep | None) -> None:
    cfg, data, tl = res.config, res.data, res.timeline
    n, device = ddata.num_samples, ddata.device
    init_seed, aug_seed = run_seed(seed, 1), run_seed(seed, 2)
    common = dict(data=ddata, cfg=cfg, batches=batches, init_seed=init_seed, aug_seed=aug_seed)

    def epochs_bar(desc: str, total: int):
        return tqdm(total=total, desc=desc, unit="ep", leave=False, disable=not progress,
                    position=1, dynamic_ncols=True)

    def measure_probe() -> tuple[float, float]:
        if probe is None:
            return float("nan"), float("nan")
        with tl.phase("reference-step probes (uncharged)"):
            return probe.measure()

    def probed(fn):
        """``fn()`` with the reference step measured before and after it: (result, (cpu, wall))."""
        before = measure_probe()
        out = fn()
        after = measure_probe()
        return out, ((before[0] + after[0]) / 2, (before[1] + after[1]) / 2)

    def timed(group: str, **kwargs) -> tuple[torch.nn.Module, RunStats]:
        """A probed training run; its wall time goes into the timeline's ``group`` parts."""
        def run():
            t0 = time.perf_counter()
            model, st = train_run(**common, **kwargs)
            return model, st, time.perf_counter() - t0
        (model, st, wall), (st_probe_cpu, st_probe_wall) = probed(run)
        st.probe_cpu_s, st.probe_wall_s = st_probe_cpu, st_probe_wall
        parts = {"charged": st.charged_s, "test evaluation": st.eval_s, "set-up": st.setup_s,
                 "exploitation (uncharged)": st.exploit_s, "forgetting tracker": st.tracker_s}
        for name, value in parts.items():
            if value:
                tl.add(f"{group}: {name}", value)
        tl.add(f"{group}: other", wall - sum(parts.values()))
        return model, st

    # 1. the full-data reference (and forgetting's scoring run)
    tracker = ForgettingTracker(n, device=device) if "forgetting" in cfg.methods else None
    bar = epochs_bar(f"seed {seed} full", cfg.epochs)
    _, full = timed("runs", pruner=_make_pruner("full", n, 0.0, cfg, seed, device, None),
                    use_observe=False, tracker=tracker, progress=bar,
                    exploitation=cfg.exploitation)
    bar.close()
    full_total = full.charged_s
    target = cfg.target_acc if cfg.target_acc is not None else full.final_acc - cfg.target_drop
    ref = {"full_total_s": full_total, "full_cpu_s": full.cpu_s, "target": target,
           "full_cmp": _compared_time(cfg, full, ScoringCost(0.0, 0.0, 0))}
    rows = [_row(cfg, data, "full", 0.0, seed, full, ScoringCost(0.0, 0.0, 0), ref, None, n)]
    res.curves[("full", 0.0, seed)] = full.curve
    if full.exploit:
        res.exploitation[("full", 0.0, seed)] = full.exploit
    runs_bar.update(1)
    forgetting = None
    if tracker is not None:
        forgetting = (tracker.counts(),
                      ScoringCost(full_total + full.tracker_s, full.cpu_s + full.tracker_cpu_s,
                                  full.samples, full.probe_cpu_s, full.probe_wall_s))
    # 2. EL2N scores, once per seed
    el2n = None
    if "el2n" in cfg.methods:
        bar = epochs_bar(f"seed {seed} el2n scoring", cfg.el2n_seeds * cfg.el2n_epochs)
        with tl.phase("EL2N scoring (charged to el2n)"):
            (scores, cost), (pc, pw) = probed(
                lambda: el2n_cost_and_scores(ddata, cfg, seed, batches, progress=bar))
        cost.probe_cpu_s, cost.probe_wall_s = pc, pw
        el2n = (scores, cost)
        bar.close()
    # 3. every other method at every ratio
    for p in cfg.prune_ratios:
        for method in cfg.methods:
            if method == "full":
                continue
            t0 = time.perf_counter()
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
            t1 = time.perf_counter()
            _, st = timed("runs", pruner=pruner, use_observe=base_method(method) in SCORED,
                          step_budget=budget_steps, time_offset=cost.seconds,
                          cpu_offset=cost.cpu_seconds, progress=bar,
                          refresh=cfg.refresh if uses_refresh(method) else "none",
                          exploitation=cfg.exploitation)
            t2 = time.perf_counter()
            bar.close()
            stats = None if method == "full_short" else pruner.selection_stats()
            history = [] if method == "full_short" else pruner.history
            if history:
                res.histories[(method, p, seed)] = history
                _warn_lock_in(res, method, p, seed, history)
            if st.exploit:
                res.exploitation[(method, p, seed)] = st.exploit
            rows.append(_row(cfg, data, method, p, seed, st, cost, ref, stats, n, history))
            res.curves[(method, p, seed)] = st.curve
            if stats is not None and seed == cfg.seeds[0]:
                res.frequencies[(method, p)] = (stats["frequency"], stats["rounds"])
            runs_bar.update(1)
            tl.add("runs: other", time.perf_counter() - t0 - (t2 - t1))
    # 4. the equal-time ladder, then every row's paired differences
    with tl.phase("equal-time ladder: bookkeeping"):
        ladder = _ladder_from_rows(rows, full.steps)
    if cfg.equal_time:
        _extend_ladder(res, rows, ladder, full.steps, seed,
                       lambda steps: timed("equal-time ladder",
                                           pruner=_make_pruner("full", n, 0.0, cfg, seed, device,
                                                               None),
                                           use_observe=False, step_budget=steps)[1])
    res.ladder[seed] = ladder
    _paired_differences(cfg, rows, ladder, full.steps)
    res.rows.extend(rows)


def _compared_time(cfg: BenchConfig, st: RunStats, cost: ScoringCost) -> float:
    """A run's charged time as compared at equal time and in the speed-ups: on the clock
    ``cfg.clock_name``, in reference steps (each part divided by the reference step measured
    around it) when ``cfg.probe_steps``, else in seconds."""
    cpu = cfg.clock_name == "cpu"
    parts = [(cost.cpu_seconds if cpu else cost.seconds,
              cost.probe_cpu_s if cpu else cost.probe_wall_s),
             (st.cpu_s if cpu else st.charged_s, st.probe_cpu_s if cpu else st.probe_wall_s)]
    if not cfg.probe_steps:
        return sum(t for t, _ in parts)
    return sum(t / unit for t, unit in parts if t)


#: the row (and ladder entry) field compared at equal time (see :func:`_compared_time`)
CMP = "cmp_time"


def _ladder_from_rows(rows: list[dict], full_steps: int) -> list[dict]:
    """The seed's full and full_short rows as ladder entries."""
    return [{"steps": r["steps"], "fraction": r["steps"] / full_steps,
             "source": r["method"] if r["method"] == "full" else f"full_short p={r['prune_ratio']:g}",
             "time_s": r["total_s"], "cpu_s": r["cpu_s"], "cmp_time": r["cmp_time"],
             "acc": r["test_acc"]}
            for r in rows if r["method"] in ("full", "full_short")]


def _rungs(ladder: list[dict]) -> list[Rung]:
    return [Rung(e["steps"], e[CMP], e["acc"]) for e in ladder]


def _extend_ladder(res: BenchResult, rows: list[dict], ladder: list[dict], full_steps: int,
                   seed: int, train) -> None:
    """Run the ladder's missing rungs for this seed's methods (up to :data:`LADDER_ROUNDS`
    rounds: the cost line is refitted after each)."""
    cfg = res.config
    times = [r[CMP] for r in rows if r["method"] not in ("full", "full_short")]
    for _ in range(LADDER_ROUNDS):
        try:
            need = rungs_to_add(_rungs(ladder), times, full_steps, cfg.ladder)
        except ValueError as e:
            res.warnings.append(f"equal-time ladder, seed {seed}: {e}")
            return
        if not need:
            return
        for steps in need:
            st = train(steps)
            ladder.append({"steps": st.steps, "fraction": st.steps / full_steps,
                           "source": "ladder", "time_s": st.charged_s, "cpu_s": st.cpu_s,
                           "cmp_time": _compared_time(cfg, st, ScoringCost(0.0, 0.0, 0)),
                           "acc": st.final_acc})


def _paired_differences(cfg: BenchConfig, rows: list[dict], ladder: list[dict],
                        full_steps: int) -> None:
    """Each row's accuracy minus the same seed's full run (``delta_full``), full_short at its
    ratio (``delta_steps``) and the ladder at its charged time (``delta_time``)."""
    full_acc = next(r["test_acc"] for r in rows if r["method"] == "full")
    short = {r["prune_ratio"]: r["test_acc"] for r in rows if r["method"] == "full_short"}
    rungs = _rungs(ladder)
    for r in rows:
        nan = float("nan")
        r.update(delta_full=nan, delta_steps=nan, delta_time=nan, equal_time_acc=nan,
                 equal_time_fraction=nan, equal_time_status="")
        if r["method"] == "full":
            continue
        r["delta_full"] = r["test_acc"] - full_acc
        if r["method"] != "full_short" and r["prune_ratio"] in short:
            r["delta_steps"] = r["test_acc"] - short[r["prune_ratio"]]
        if not cfg.equal_time:
            continue
        try:
            et = equal_time(rungs, r[CMP], full_steps)
        except ValueError:
            r["equal_time_status"] = "unfit"
            continue
        r.update(equal_time_acc=et.acc, equal_time_fraction=et.fraction,
                 equal_time_status=et.status, delta_time=r["test_acc"] - et.acc)


def _warn_lock_in(res: BenchResult, method: str, p: float, seed: int, history: list[dict]) -> None:
    if base_method(method) not in DYNAMIC:
        return
    why = (" (with losses from training only, the unselected samples' scores are frozen; see "
           "UCB's drift, or the +refresh methods)" if not uses_refresh(method) else
           " (with fresh losses for every sample: the method keeps choosing the same hard subset)")
    for a, b in lock_in_runs(history):
        res.warnings.append(
            f"lock-in: {method} p={p:g} seed {seed}: the selection overlap with the previous epoch stayed "
            f"above {LOCK_IN_OVERLAP:g} in epochs {a}-{b} ({b - a + 1} consecutive selections): "
            f"it trained (almost) the same subset every epoch, as static pruning does{why}")


def _mean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def _row(cfg: BenchConfig, data: ImageData, method: str, p: float, seed: int, st: RunStats,
         cost: ScoringCost, ref: dict, stats: dict | None, n: int,
         history: list[dict] | None = None) -> dict:
    total = cost.seconds + st.charged_s
    cpu = cost.cpu_seconds + st.cpu_s
    cmp = _compared_time(cfg, st, cost)
    pruned = [e for e in st.exploit if not e["full"] and e["epoch"] > 0]
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
        "exploit_s": st.exploit_s,
        "setup_s": st.setup_s,
        "speedup": ref["full_total_s"] / total if total > 0 else float("nan"),
        "cpu_s": cpu,
        "cpu_speedup": ref["full_cpu_s"] / cpu if cpu > 0 else float("nan"),
        "probe_cpu_s": st.probe_cpu_s,
        "probe_wall_s": st.probe_wall_s,
        "cmp_time": cmp,
        "cmp_speedup": ref["full_cmp"] / cmp if cmp > 0 else float("nan"),
        "target_acc": ref["target"],
        "time_to_target_s": time_to_target(st.curve, ref["target"]),
        "time_to_target_cpu_s": time_to_target(st.curve, ref["target"], "cpu_s"),
        "rounds": stats["rounds"] if stats else 0,
        "always": stats["always"] if stats else float("nan"),
        "sometimes": stats["sometimes"] if stats else float("nan"),
        "never": stats["never"] if stats else float("nan"),
        "exploit_ratio": _mean([e["ratio"] for e in pruned]),
        "exploit_top": _mean([e["top"] for e in pruned]),
        **_overlap_stats(history or []),
    }
