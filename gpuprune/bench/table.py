"""The printed result: two tables per prune ratio, at most :data:`WIDTH` columns, every column
explained underneath.

* **accuracy and equal work**: accuracy, the paired differences against the three full-data
  baselines (same epochs, same optimizer steps, same charged time), the charged time on the
  compared clock, the speed-up and the epochs of data trained;
* **costs and selection**: the charged time's parts, the time to the target accuracy, and how the
  method selects (the paper's "sometimes" samples, the selection overlap, lock-in, exploitation).

Below them: the equal-time ladder (the full-data runs the "same time" column interpolates), the
legend, warnings and, when given, where the sweep's wall time went.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Callable

from .config import BenchConfig
from .equal_time import Rung, cost_scatter, fit_cost
from .report import summarize
from .runner import LOCK_IN_EPOCHS, LOCK_IN_OVERLAP, BenchResult
from .timeline import Timeline

__all__ = ["format_table", "WIDTH", "legend"]

#: the widest line the printed result may have
WIDTH = 120
#: width of the method column (the longest name, "epsilon_greedy+refresh", is 22)
_NAME = 22


@dataclass(frozen=True)
class _Col:
    header: str
    width: int
    cell: Callable[[dict], str]


def _pm(s: dict, field: str, digits: int, signed: bool = False) -> str:
    """``mean ± std`` of summary field ``field`` (just the mean for one seed; "-" when nan)."""
    mean, std = s[f"{field}_mean"], s[f"{field}_std"]
    if math.isnan(mean):
        return "-"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(mean)
    return f"{text} ± {std:.{digits}f}" if s["n_seeds"] > 1 else text


def _mean(s: dict, field: str, fmt: str) -> str:
    value = s[f"{field}_mean"]
    return "-" if math.isnan(value) else fmt.format(value)


def _delta_time(s: dict) -> str:
    text = _pm(s, "delta_time", 2, signed=True)
    return text + ("*" if s["slower_than_full"] and text != "-" else "")


def _to_target(s: dict, clock: str) -> str:
    field, count = (("time_to_target_cpu_s", s["reached_target_cpu"]) if clock == "cpu"
                    else ("time_to_target_s", s["reached_target"]))
    if count == 0:
        return "not reached"
    text = f"{s[f'{field}_mean']:.1f}"
    return text if count == s["n_seeds"] else f"{text} ({count}/{s['n_seeds']})"


def _columns(cfg: BenchConfig) -> tuple[list[_Col], list[_Col]]:
    clock = cfg.clock_name
    time_field = "cpu_s" if clock == "cpu" else "total_s"
    other_field, other_name = (("total_s", "wall s") if clock == "cpu" else ("cpu_s", "CPU s"))
    name = _Col("method", _NAME, lambda s: s["method"])
    work = [
        name,
        _Col("acc %", 13, lambda s: _pm(s, "test_acc", 2)),
        _Col("Δ full", 13, lambda s: _pm(s, "delta_full", 2, True)),
        _Col("Δ same steps", 13, lambda s: _pm(s, "delta_steps", 2, True)),
        _Col("Δ same time", 14, _delta_time),
        _Col(f"{clock.upper() if clock == 'cpu' else clock} s", 13,
             lambda s: _pm(s, time_field, 1)),
        _Col("speed-up", 12, lambda s: _pm(s, "cmp_speedup", 2) + "x"),
        _Col("data ep.", 8, lambda s: _mean(s, "epochs_of_data", "{:.2f}")),
    ]
    costs = [
        name,
        _Col(other_name, 13, lambda s: _pm(s, other_field, 1)),
        _Col("train", 7, lambda s: _mean(s, "train_s", "{:.1f}")),
        _Col("select", 7, lambda s: _mean(s, "select_s", "{:.2f}")),
        _Col("refresh", 7, lambda s: _mean(s, "refresh_s", "{:.1f}")),
        _Col("score", 7, lambda s: _mean(s, "score_s", "{:.1f}")),
        _Col("to target", 12, lambda s: _to_target(s, clock)),
        _Col("sometimes", 9, lambda s: _mean(s, "sometimes", "{:.0%}")),
        _Col("overlap", 7, lambda s: _mean(s, "overlap_mean", "{:.2f}")),
        _Col("lock-in", 7, lambda s: ("-" if s["kind"] != "dynamic"
                                      else f"{s['locked_in_runs']}/{s['n_seeds']}")),
        _Col("exploit", 7, lambda s: _mean(s, "exploit_ratio", "{:.2f}")),
    ]
    return work, costs


def _render(cols: list[_Col], rows: list[dict], width: int = WIDTH) -> list[str]:
    """The rows under ``cols``, each column as wide as its widest cell (at least its nominal
    width); when the columns do not fit in ``width``, the ones that do not are printed in a
    further block below, the method column repeated."""
    cells = [[c.cell(s) for c in cols] for s in rows]
    widths = [max([c.width, len(c.header)] + [len(r[i]) for r in cells])
              for i, c in enumerate(cols)]
    blocks, current, used = [], [0], widths[0]
    for i in range(1, len(cols)):
        if used + 1 + widths[i] > width and len(current) > 1:
            blocks.append(current)
            current, used = [0], widths[0]
        current.append(i)
        used += 1 + widths[i]
    blocks.append(current)
    def line(values: list[str], idx: list[int]) -> str:
        return " ".join(values[i].ljust(widths[i]) if i == 0 else values[i].rjust(widths[i])
                        for i in idx).rstrip()
    out = []
    for b, idx in enumerate(blocks):
        header = line([c.header for c in cols], idx)
        out += ([""] if b else []) + [header, "-" * len(header)]
        out += [line(r, idx) for r in cells]
    return out


def legend(cfg: BenchConfig) -> list[str]:
    """One entry per column of the two tables (wrapped to :data:`WIDTH`)."""
    clock = "process CPU" if cfg.clock_name == "cpu" else "wall (device synchronised)"
    entries = [
        "acc %: final test accuracy, mean ± sample std over seeds.",
        "Δ full, Δ same steps, Δ same time: paired differences in points (each seed's run minus "
        "the same seed's baseline; mean ± std over seeds) against full data for the same epochs, "
        "against full data for as many optimizer steps (full_short), and against full data for "
        "the same charged time (the equal-time ladder below, interpolated at the method's "
        "charged time). * = slower than full data in some seed: there it is compared with full "
        "data itself, which costs less.",
        f"{'CPU' if cfg.clock_name == 'cpu' else 'wall'} s: charged {clock} time = train + select "
        "+ refresh + score (test evaluation, the exploitation measurement and the probes are not "
        "charged).",
        "speed-up: full data's charged time / the method's, per seed, "
        + ("both in reference steps (each run's charged time divided by one reference training "
           "step timed just before and after it, so that a change of the machine's load between "
           "runs cancels out); Δ same time compares the same unit."
           if cfg.probe_steps else "both in seconds on the same clock."),
        "data ep.: samples trained / N (\"epochs of data\"); a re-score pass trains nothing.",
        f"{'wall s' if cfg.clock_name == 'cpu' else 'CPU s'}: the same charged time on the other "
        "clock.",
        "train, select, refresh, score: the charged wall time's parts in seconds (mean): training "
        "steps with the Pruner's bookkeeping, Pruner.plan, the +refresh methods' re-score pass, "
        "and the static methods' scoring (EL2N's scoring runs; for forgetting, the full run it "
        "counts in).",
        "to target: charged time at the end of the first evaluated epoch whose accuracy reaches "
        + (f"{cfg.target_acc:g} %" if cfg.target_acc is not None
           else f"full data's accuracy - {cfg.target_drop:g} pt (per seed)")
        + "; (r/k): only r of k seeds reached it.",
        "sometimes: share of samples trained in more than 10 % and fewer than 90 % of the pruned "
        "epochs (the paper's \"sometimes\" samples; the rest are always or never trained), mean "
        "over seeds. Static subsets have none; uniform sampling makes most samples sometimes.",
        "overlap: mean Jaccard overlap of each new selection with the previous epoch's plan "
        "(uniform at keep q: about q / (2 - q)).",
        f"lock-in: runs whose selection overlap stayed above {LOCK_IN_OVERLAP:g} for "
        f"{LOCK_IN_EPOCHS} or more consecutive selections (the method turned into static "
        "pruning).",
        "exploit: planned samples' mean current loss / all samples' mean, averaged over the "
        "pruned epochs after the first (an uncharged forward pass over all N before each epoch, "
        "with --exploitation; 1 = no preference for high-loss samples).",
        "+refresh: the policy with a forward-only re-score pass over the "
        f"{cfg.refresh} samples before each selection (charged).",
    ]
    if any(m.startswith("infobatch+no") for m in cfg.methods):
        entries.append("+norescale, +noanneal: InfoBatch without rescaling the kept well-learned "
                       "samples' loss (weight 1), and without annealing (no full-data epochs at "
                       "the end, delta = 1).")
    if cfg.keep_schedule is not None:
        shape, start, end = cfg.keep_schedule
        entries.append(f"+sched: the policy keeping a {shape} schedule from {start:g} to {end:g} "
                       "of the samples over the pruned epochs, instead of 1 - p (the same rows "
                       "in every ratio's table).")
    out = []
    for e in entries:
        out += textwrap.wrap(e, WIDTH, subsequent_indent="  ")
    return out


def _ladder_lines(res: BenchResult) -> list[str]:
    cfg = res.config
    if not res.ladder:
        return []
    raw = "cpu_s" if cfg.clock_name == "cpu" else "time_s"
    groups: dict[tuple[float, str], list[dict]] = {}
    for entries in res.ladder.values():
        for e in entries:
            groups.setdefault((round(e["fraction"], 2), e["source"]), []).append(e)
    clock = "CPU s" if cfg.clock_name == "cpu" else "wall s"
    unit = "ref steps" if cfg.probe_steps else clock
    out = ["", "equal-time ladder: full data with the schedule compressed onto a fraction of the "
           "full run's optimizer steps",
           f"{'fraction':>8} {'source':<20} {'seeds':>5} {'acc %':>13} {clock:>13} "
           + (f"{unit:>15}" if cfg.probe_steps else "")]
    for (frac, source), es in sorted(groups.items()):
        accs = [e["acc"] for e in es]
        line = (f"{frac:>8.2f} {source:<20} {len(es):>5} {_pm_list(accs, 2):>13} "
                f"{_pm_list([e[raw] for e in es], 1):>13}")
        if cfg.probe_steps:
            line += f" {_pm_list([e['cmp_time'] for e in es], 0):>15}"
        out.append(line)
    key = "cmp_time"
    fits = []
    for seed, entries in res.ladder.items():
        rungs = [Rung(e["steps"], e[key], e["acc"]) for e in entries]
        try:
            a, b = fit_cost(rungs)
        except ValueError:
            fits.append(f"seed {seed}: no line")
            continue
        scatter = cost_scatter(rungs)
        line = (f"{a:.0f} + {b:.3f} ref steps per step" if cfg.probe_steps
                else f"{a:.2f} s + {1e3 * b:.3f} ms/step")
        fits.append(f"seed {seed}: {line}"
                    + ("" if math.isnan(scatter) else f", runs off it by {scatter:.0%} rms"))
    out += textwrap.wrap("cost line (" + unit + " = a + b * steps, fitted per seed over these runs; "
                         "its scatter is the timing noise): " + "; ".join(fits), WIDTH,
                         subsequent_indent="  ")
    return out


def _pm_list(values: list[float], digits: int) -> str:
    """``mean ± sample std`` of ``values`` (the mean alone for one value)."""
    k = len(values)
    m = sum(values) / k
    if k == 1:
        return f"{m:.{digits}f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in values) / (k - 1))
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def format_table(res: BenchResult, timeline: dict | None = None) -> str:
    """The printed result (see the module docstring); every line at most :data:`WIDTH` wide.

    Args:
        res: the sweep's result.
        timeline: a :meth:`Timeline.summary` to print at the end (where the wall time went).
    """
    cfg, d = res.config, res.data
    summary = summarize(res.rows)
    full = [s for s in summary if s["method"] == "full"]
    head = [d.describe(),
            f"model {cfg.model}, {cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr:g} "
            f"({cfg.lr_schedule}), device {cfg.device}, loader {cfg.loader}, seeds "
            f"{list(cfg.seeds)}; compared clock: {cfg.clock_name}"]
    head += [f"NOTE: {note}" for note in d.notes]
    proj = res.projection
    if proj:
        head.append(f"projected before the sweep: {proj['seconds']:.0f} s "
                    f"({proj['full_run_equivalents']:.1f} full-run equivalents; "
                    f"{proj['source']})")
    lines = []
    for line in head:
        lines += textwrap.wrap(line, WIDTH, subsequent_indent="  ")
    work, costs = _columns(cfg)
    for p in cfg.prune_ratios:
        rows = full + [s for s in summary if s["prune_ratio"] == p and s["method"] != "full"]
        lines += ["", f"prune ratio {p:g} (keep {1 - p:g}): accuracy and equal work"]
        lines += _render(work, rows)
        lines += ["", f"prune ratio {p:g}: costs and selection"]
        lines += _render(costs, rows)
    lines += _ladder_lines(res)
    lines += ["", "columns:"] + legend(cfg)
    for w in res.warnings:
        lines += textwrap.wrap(f"WARNING: {w}", WIDTH, subsequent_indent="  ")
    if timeline is not None:
        lines += [""] + Timeline.lines(timeline, WIDTH)
    return "\n".join(lines)
