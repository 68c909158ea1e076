"""PNG plots: accuracy against charged time, the "sometimes samples" histograms with the selection
overlap, and (when measured) the exploitation of the loss per epoch. Axis limits come from the
data plotted, so no point is cut off."""

from __future__ import annotations

from pathlib import Path

from .config import METHODS, STATIC, base_method, uses_refresh
from .report import summarize
from .runner import BenchResult

__all__ = ["accuracy_figure", "plot_accuracy_vs_time", "plot_selection_frequency",
           "plot_exploitation", "write_plots", "data_limits"]

#: one colour per policy; its variants share it: +refresh dashed, the others (+sched, InfoBatch's
#: ablations) dotted
_COLORS = {m: f"C{i}" for i, m in enumerate(m for m in METHODS if "+" not in m)}


def _style(method: str) -> dict:
    ls = "--" if uses_refresh(method) else ":" if "+" in method else "-"
    return {"color": _COLORS[base_method(method)], "ls": ls}


def data_limits(values: list[float], margin: float = 0.04) -> tuple[float, float]:
    """Axis limits holding every finite value of ``values``, with ``margin`` of their range
    (at least 0.5 units) on each side."""
    vals = [v for v in values if v == v and abs(v) != float("inf")]
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    pad = max((hi - lo) * margin, 0.5)
    return lo - pad, hi + pad


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")             # files only; no display needed
    import matplotlib.pyplot as plt
    return plt


def accuracy_figure(res: BenchResult, clock: str = "time_s"):
    """The accuracy-against-time figure (see :func:`plot_accuracy_vs_time`), not yet saved."""
    total = "total_s" if clock == "time_s" else "cpu_s"
    plt = _pyplot()
    ratios = list(res.config.prune_ratios)
    cols = min(len(ratios), 2)
    rows = -(-len(ratios) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    summary = summarize(res.rows)
    for ax, p in zip(axes.flat, ratios):
        xs, ys = [0.0], []
        for method in res.config.methods:
            key_p = 0.0 if method == "full" else p
            style = _style(method)
            for seed in res.config.seeds:
                curve = res.curves.get((method, key_p, seed), [])
                if curve:
                    x, y = [q[clock] for q in curve], [q["acc"] for q in curve]
                    ax.plot(x, y, lw=0.8, alpha=0.45, **style)
                    xs += x
                    ys += y
            s = next((s for s in summary if s["method"] == method and s["prune_ratio"] == key_p),
                     None)
            if s is not None and s[f"{total}_mean"] == s[f"{total}_mean"]:
                xe, ye = s[f"{total}_std"], s["test_acc_std"]
                ax.errorbar(s[f"{total}_mean"], s["test_acc_mean"], xerr=xe, yerr=ye,
                            fmt="s" if uses_refresh(method) else "o", ms=5, color=style["color"],
                            label=method, capsize=2)
                xs += [s[f"{total}_mean"] - xe, s[f"{total}_mean"] + xe]
                ys += [s["test_acc_mean"] - ye, s["test_acc_mean"] + ye]
        ax.set_xlim(*data_limits(xs, 0.03))
        ax.set_ylim(*data_limits(ys, 0.04))
        ax.set_title(f"prune ratio {p:g}")
        ax.set_xlabel(f"charged {'wall' if clock == 'time_s' else 'CPU'} time, s "
                      f"(train + select + refresh + score)")
        ax.set_ylabel("test accuracy, %")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(ratios):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{res.data.name}, {res.config.model}, {res.config.epochs} epochs, "
                 f"seeds {list(res.config.seeds)}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_accuracy_vs_time(res: BenchResult, path: str | Path, dpi: int = 80,
                          clock: str = "time_s") -> Path:
    """One panel per prune ratio: each seed's test-accuracy curve against charged seconds (thin
    lines; static methods start after their scoring time; +refresh variants dashed), and each
    method's mean final point with +-1 std bars over seeds. ``clock``: ``"time_s"`` (wall) or
    ``"cpu_s"`` (process CPU time, which other processes sharing the cores disturb much less).
    The axes hold every point (the first epochs' lower accuracies included)."""
    plt = _pyplot()
    fig = accuracy_figure(res, clock)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def plot_exploitation(res: BenchResult, path: str | Path, dpi: int = 80) -> Path | None:
    """Per prune ratio, each method's exploitation ratio per epoch (the planned samples' mean
    current loss over all samples' mean; first seed), with 1 (no preference) dashed. None
    when exploitation was not measured."""
    if not res.exploitation:
        return None
    plt = _pyplot()
    ratios = list(res.config.prune_ratios)
    fig, axes = plt.subplots(1, len(ratios), figsize=(5.5 * len(ratios), 3.8), squeeze=False)
    seed0 = res.config.seeds[0]
    for ax, p in zip(axes.flat, ratios):
        ys = [1.0]
        for method in res.config.methods:
            recs = res.exploitation.get((method, p, seed0), [])
            pts = [(r["epoch"], r["ratio"]) for r in recs if not r["full"]]
            if pts:
                ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", ms=2.5, lw=1.0,
                        label=method, **_style(method))
                ys += [v for _, v in pts]
        ax.axhline(1.0, color="0.4", ls=":", lw=0.8)
        ax.set_ylim(*data_limits(ys, 0.05))
        ax.set_title(f"exploitation, p={p:g} (seed {seed0})", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("planned mean loss / mean loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def plot_selection_frequency(res: BenchResult, path: str | Path, dpi: int = 80) -> Path | None:
    """How often each sample was planned: one bar per j = 0..R (samples planned in exactly j of
    the R pruned epochs, log scale), one panel per method (columns) and prune ratio (rows), first
    seed. The grey band (frequency 0.1 to 0.9) holds the paper's "sometimes" samples; static
    methods have only 0 and R. Beside them, per prune ratio, the lock-in detector: each dynamic
    method's Jaccard overlap of every new selection with the previous epoch's plan (first seed),
    with the warning threshold dashed."""
    if not res.frequencies:
        return None
    from matplotlib.ticker import NullFormatter

    from .report import selection_histogram
    from .runner import LOCK_IN_OVERLAP, selection_overlaps
    plt = _pyplot()
    methods = [m for m in METHODS if any(k[0] == m for k in res.frequencies)]
    ratios = [p for p in res.config.prune_ratios if any(k[1] == p for k in res.frequencies)]
    cols = len(methods) + 1
    fig, axes = plt.subplots(len(ratios), cols, squeeze=False,
                             figsize=(2.1 * cols, 2.0 * len(ratios) + 0.5))
    seed0 = res.config.seeds[0]
    for i, p in enumerate(ratios):
        for j, m in enumerate(methods):
            ax = axes[i][j]
            entry = res.frequencies.get((m, p))
            if entry is None:
                ax.axis("off")
                continue
            freq, rounds = entry
            r = max(rounds, 1)
            counts = selection_histogram(freq, rounds)
            ax.axvspan(0.1, 0.9, color="0.88", zorder=0)
            ax.bar([t / r for t in range(r + 1)], counts, width=0.7 / r, zorder=2,
                   color=_style(m)["color"], hatch="//" if uses_refresh(m) else None)
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlim(-0.08, 1.08)
            n = freq.numel()
            hi = float((freq > 0.9).sum()) / n
            lo = float((freq < 0.1).sum()) / n
            ax.set_title(f"{m} p={p:g} ({rounds} rounds)\nsometimes {100 * (1 - hi - lo):.0f}%\n"
                         f"always {100 * hi:.0f}%, never {100 * lo:.0f}%", fontsize=7)
            ax.tick_params(labelsize=6)
            if i == len(ratios) - 1:
                ax.set_xlabel("share of pruned epochs planned", fontsize=7)
        ax = axes[i][-1]
        for m in methods:
            if m in STATIC:
                continue
            pts = selection_overlaps(res.histories.get((m, p, seed0), []))
            if pts:
                ax.plot([e for e, _ in pts], [o for _, o in pts], marker="o", ms=2.5, lw=1.0,
                        label=m, **_style(m))
        ax.axhline(LOCK_IN_OVERLAP, color="0.4", ls="--", lw=0.8)
        ax.set_ylim(0.0, 1.05)
        ax.set_title(f"selection overlap, p={p:g}\n(Jaccard with the previous epoch)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if i == len(ratios) - 1:
            ax.set_xlabel("epoch", fontsize=7)
        if i == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=5, loc="lower left")
    fig.suptitle(f"How often each sample was trained on, and how much each epoch's selection "
                 f"repeats the last ({res.data.name}, seed {seed0}); grey band: 'sometimes' "
                 f"samples (0.1 to 0.9)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def write_plots(res: BenchResult, out_dir: str | Path, dpi: int = 80) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"accuracy_png": plot_accuracy_vs_time(res, out / "accuracy_vs_time.png", dpi),
             "accuracy_cpu_png": plot_accuracy_vs_time(res, out / "accuracy_vs_cpu_time.png", dpi,
                                                       clock="cpu_s")}
    hist = plot_selection_frequency(res, out / "selection_frequency.png", dpi)
    if hist is not None:
        paths["selection_png"] = hist
    expl = plot_exploitation(res, out / "exploitation.png", dpi)
    if expl is not None:
        paths["exploitation_png"] = expl
    return paths
