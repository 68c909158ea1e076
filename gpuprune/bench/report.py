"""Results on disk (CSV, JSON) and on screen (a table of mean +- std over seeds)."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from .config import METHODS
from .runner import BenchResult

__all__ = ["ROW_COLUMNS", "SUMMARY_COLUMNS", "OVERLAP_COLUMNS", "summarize", "machine_info",
           "write_results", "format_table", "selection_histogram"]

#: columns of results.csv, one row per run
ROW_COLUMNS = ["dataset", "model", "device", "loader", "method", "kind", "prune_ratio", "seed",
               "epochs", "steps", "samples_seen", "epochs_of_data", "scoring_samples", "test_acc",
               "best_acc", "train_s", "select_s", "refresh_s", "refresh_samples", "score_s",
               "total_s", "eval_s", "speedup", "cpu_s", "cpu_speedup", "target_acc",
               "time_to_target_s", "time_to_target_cpu_s", "rounds", "always", "sometimes", "never",
               "overlap_mean", "overlap_max", "lock_in_epochs"]

#: columns of overlap.csv, one row per planned epoch of every pruned run (the lock-in detector)
OVERLAP_COLUMNS = ["method", "prune_ratio", "seed", "epoch", "size", "full", "reselected",
                   "overlap"]

_STAT_FIELDS = ["test_acc", "total_s", "train_s", "select_s", "refresh_s", "score_s", "speedup",
                "cpu_s", "cpu_speedup", "time_to_target_s", "time_to_target_cpu_s", "samples_seen",
                "sometimes", "overlap_mean", "lock_in_epochs"]

#: columns of summary.csv, one row per (method, prune ratio)
SUMMARY_COLUMNS = (["method", "kind", "prune_ratio", "n_seeds", "reached_target"]
                   + [f"{f}_{s}" for f in _STAT_FIELDS for s in ("mean", "std")])


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and sample std over seeds per (method, prune ratio), in table order."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["prune_ratio"]), []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    out = []
    for (method, p), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], order[kv[0][0]])):
        s = {"method": method, "kind": rs[0]["kind"], "prune_ratio": p, "n_seeds": len(rs),
             "reached_target": sum(not math.isnan(r["time_to_target_s"]) for r in rs)}
        for f in _STAT_FIELDS:
            s[f"{f}_mean"], s[f"{f}_std"] = _mean_std([float(r[f]) for r in rs])
        out.append(s)
    return out


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows (shared by benchmarks/)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(device: str) -> dict:
    """Machine and library versions, for the record."""
    cpu = cpu_name()
    info = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import numpy
        info["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    from .. import __version__
    info["gpuprune"] = __version__
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        import nvidia.dali as dali
        info["dali"] = dali.__version__
    except ImportError:
        pass
    return info


def _clean(x):
    """NaN/inf -> None so the JSON is standard."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def selection_histogram(freq: torch.Tensor, rounds: int) -> list[int]:
    """Number of samples planned in exactly j of ``rounds`` pruned epochs, for j = 0..rounds."""
    times = torch.round(freq.double() * max(rounds, 1)).long()
    return torch.bincount(times, minlength=max(rounds, 1) + 1).tolist()


def write_results(res: BenchResult, out_dir: str | Path, machine: dict,
                  command: str | None = None) -> dict[str, Path]:
    """Write results.csv, summary.csv, overlap.csv and results.json into ``out_dir``; return their
    paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results_csv": out / "results.csv", "summary_csv": out / "summary.csv",
             "overlap_csv": out / "overlap.csv", "json": out / "results.json"}
    summary = summarize(res.rows)
    for path, cols, rows in ((paths["results_csv"], ROW_COLUMNS, res.rows),
                             (paths["summary_csv"], SUMMARY_COLUMNS, summary)):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    with open(paths["overlap_csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=OVERLAP_COLUMNS)
        w.writeheader()
        for (m, p, seed), history in res.histories.items():
            for rec in history:
                ov = rec["overlap"]
                w.writerow({"method": m, "prune_ratio": p, "seed": seed, "epoch": rec["epoch"],
                            "size": rec["size"], "full": rec["full"],
                            "reselected": rec["reselected"],
                            "overlap": "" if ov is None else f"{ov:.6g}"})
    runs = []
    for r in res.rows:
        key = (r["method"], r["prune_ratio"], r["seed"])
        runs.append({**r, "curve": res.curves.get(key, []),
                     "history": res.histories.get(key, [])})
    d = res.data
    doc = {
        "command": command,
        "config": res.config.to_dict(),
        "dataset": {"name": d.name, "source": d.source, "train": len(d.x_train),
                    "test": len(d.x_test), "image_shape": list(d.image_shape),
                    "classes": d.classes, "notes": d.notes},
        "machine": machine,
        "warnings": list(res.warnings),
        "runs": runs,
        "summary": summary,
        # samples_by_times_selected[j]: samples planned in exactly j of the `rounds` pruned epochs
        "selection_frequency_histograms": [
            {"method": m, "prune_ratio": p, "seed": res.config.seeds[0], "rounds": r,
             "samples_by_times_selected": selection_histogram(f, r)}
            for (m, p), (f, r) in res.frequencies.items()],
    }
    with open(paths["json"], "w") as f:
        json.dump(_clean(doc), f, indent=1)
    return paths


def _pm(mean: float, std: float, fmt: str, n: int) -> str:
    if math.isnan(mean):
        return "-"
    return (fmt.format(mean) + " ± " + fmt.format(std)) if n > 1 else fmt.format(mean)


def format_table(res: BenchResult) -> str:
    """A plain-text table per prune ratio (``full`` repeated in each as the reference)."""
    cfg, d = res.config, res.data
    summary = summarize(res.rows)
    full = [s for s in summary if s["method"] == "full"]
    lines = [f"{d.describe()}",
             f"model {cfg.model}, {cfg.epochs} epochs, batch {cfg.batch_size}, device {cfg.device}, "
             f"loader {cfg.loader}, seeds {list(cfg.seeds)}; times in seconds, charged = train + "
             f"select + refresh + score (test evaluation not charged); CPU = process CPU time of "
             f"the same"]
    for note in d.notes:
        lines.append(f"NOTE: {note}")
    target = (f"target accuracy {cfg.target_acc:g}%" if cfg.target_acc is not None
              else f"target accuracy = full-data accuracy - {cfg.target_drop:g} pt (per seed)")
    lines.append(target)
    header = (f"{'method':<15}{'test acc %':>15}{'total s':>14}{'train s':>9}{'select s':>10}"
              f"{'refresh s':>10}{'score s':>9}{'speed-up':>10}{'CPU s':>8}{'CPU sp-up':>11}"
              f"{'time to target s':>19}{'epochs of data':>16}{'sometimes':>11}{'overlap':>9}")
    for p in cfg.prune_ratios:
        rows = full + [s for s in summary if s["prune_ratio"] == p and s["method"] != "full"]
        lines += ["", f"prune ratio {p:g} (keep {1 - p:g})", header, "-" * len(header)]
        for s in rows:
            k = s["n_seeds"]
            ttt = _pm(s["time_to_target_s_mean"], s["time_to_target_s_std"], "{:.1f}",
                      s["reached_target"])
            if s["reached_target"] < k:
                ttt = f"{ttt} ({s['reached_target']}/{k})" if s["reached_target"] else "not reached"
            some, ov = s["sometimes_mean"], s["overlap_mean_mean"]
            lines.append(
                f"{s['method']:<15}"
                f"{_pm(s['test_acc_mean'], s['test_acc_std'], '{:.2f}', k):>15}"
                f"{_pm(s['total_s_mean'], s['total_s_std'], '{:.1f}', k):>14}"
                f"{s['train_s_mean']:>9.1f}{s['select_s_mean']:>10.2f}{s['refresh_s_mean']:>10.1f}"
                f"{s['score_s_mean']:>9.1f}"
                f"{s['speedup_mean']:>9.2f}x{s['cpu_s_mean']:>8.1f}{s['cpu_speedup_mean']:>10.2f}x"
                f"{ttt:>19}{s['samples_seen_mean'] / len(d.x_train):>16.2f}"
                f"{'-' if math.isnan(some) else f'{100 * some:.0f}%':>11}"
                f"{'-' if math.isnan(ov) else f'{ov:.2f}':>9}")
    lines += ["", "overlap: mean Jaccard overlap of each new selection with the previous epoch's "
              "plan (uniform at keep q: about q / (2 - q))"]
    if cfg.refresh != "none":
        lines.append(f"refresh: a forward-only re-score pass over the {cfg.refresh} samples before "
                     f"each selection of epsilon_greedy, ucb and infobatch (charged)")
    for w in res.warnings:
        lines.append(f"WARNING: lock-in: {w}")
    return "\n".join(lines)
