"""Results on disk (CSV, JSON) and their summary over seeds (the printed tables: ``table.py``)."""

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

__all__ = ["ROW_COLUMNS", "SUMMARY_COLUMNS", "OVERLAP_COLUMNS", "LADDER_COLUMNS",
           "EXPLOITATION_COLUMNS", "summarize", "machine_info", "write_results", "selection_histogram"]

#: columns of results.csv, one row per run
ROW_COLUMNS = ["dataset", "model", "device", "loader", "method", "kind", "prune_ratio", "seed",
               "epochs", "steps", "samples_seen", "epochs_of_data", "scoring_samples", "test_acc",
               "best_acc", "train_s", "select_s", "refresh_s", "refresh_samples", "score_s",
               "total_s", "eval_s", "speedup", "cpu_s", "cpu_speedup", "target_acc",
               "time_to_target_s", "time_to_target_cpu_s", "rounds", "always", "sometimes", "never",
               "overlap_mean", "overlap_max", "lock_in_epochs", "delta_full", "delta_steps",
               "delta_time", "equal_time_acc", "equal_time_fraction", "equal_time_status",
               "exploit_ratio", "exploit_top", "exploit_s", "setup_s", "probe_cpu_s",
               "probe_wall_s", "cmp_time", "cmp_speedup"]

#: columns of overlap.csv, one row per planned epoch of every pruned run (the lock-in detector)
OVERLAP_COLUMNS = ["method", "prune_ratio", "seed", "epoch", "size", "full", "reselected",
                   "overlap"]

#: columns of ladder.csv, one row per run of the equal-time ladder (full and full_short included)
LADDER_COLUMNS = ["seed", "steps", "fraction", "source", "time_s", "cpu_s", "cmp_time", "acc"]

#: columns of exploitation.csv, one row per epoch of every run measured with --exploitation
EXPLOITATION_COLUMNS = ["method", "prune_ratio", "seed", "epoch", "full", "ratio", "top"]

_STAT_FIELDS = ["test_acc", "total_s", "train_s", "select_s", "refresh_s", "score_s", "speedup",
                "cpu_s", "cpu_speedup", "time_to_target_s", "time_to_target_cpu_s", "samples_seen",
                "epochs_of_data", "refresh_samples", "sometimes", "overlap_mean",
                "lock_in_epochs", "delta_full", "delta_steps", "delta_time",
                "equal_time_fraction", "exploit_ratio", "exploit_top", "cmp_time",
                "cmp_speedup"]

#: columns of summary.csv, one row per (method, prune ratio)
SUMMARY_COLUMNS = (["method", "kind", "prune_ratio", "n_seeds", "reached_target",
                    "reached_target_cpu", "locked_in_runs", "slower_than_full"]
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
             "reached_target": sum(not math.isnan(r["time_to_target_s"]) for r in rs),
             "reached_target_cpu": sum(not math.isnan(r["time_to_target_cpu_s"]) for r in rs),
             "locked_in_runs": sum(bool(r.get("lock_in_epochs")) for r in rs),
             "slower_than_full": sum(r.get("equal_time_status") == "slower" for r in rs)}
        for f in _STAT_FIELDS:
            s[f"{f}_mean"], s[f"{f}_std"] = _mean_std([float(r.get(f, float("nan"))) for r in rs])
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


def _write_csv(path: Path, cols: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def write_results(res: BenchResult, out_dir: str | Path, machine: dict,
                  command: str | None = None, timeline: dict | None = None) -> dict[str, Path]:
    """Write results.csv, summary.csv, overlap.csv, ladder.csv, results.json (and, with
    exploitation measured, exploitation.csv) into ``out_dir``; return their paths. ``timeline``
    is the wall-time account to record (:meth:`gpuprune.bench.timeline.Timeline.summary`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results_csv": out / "results.csv", "summary_csv": out / "summary.csv",
             "overlap_csv": out / "overlap.csv", "ladder_csv": out / "ladder.csv",
             "json": out / "results.json"}
    summary = summarize(res.rows)
    _write_csv(paths["results_csv"], ROW_COLUMNS, res.rows)
    _write_csv(paths["summary_csv"], SUMMARY_COLUMNS, summary)
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
    _write_csv(paths["ladder_csv"], LADDER_COLUMNS,
               [{"seed": seed, **e} for seed, entries in res.ladder.items() for e in entries])
    if res.exploitation:
        paths["exploitation_csv"] = out / "exploitation.csv"
        _write_csv(paths["exploitation_csv"], EXPLOITATION_COLUMNS,
                   [{"method": m, "prune_ratio": p, "seed": seed, **e}
                    for (m, p, seed), recs in res.exploitation.items() for e in recs])
    runs = []
    for r in res.rows:
        key = (r["method"], r["prune_ratio"], r["seed"])
        runs.append({**r, "curve": res.curves.get(key, []),
                     "history": res.histories.get(key, []),
                     "exploitation": res.exploitation.get(key, [])})
    d = res.data
    doc = {
        "command": command,
        "config": res.config.to_dict(),
        "dataset": {"name": d.name, "source": d.source, "train": len(d.x_train),
                    "test": len(d.x_test), "image_shape": list(d.image_shape),
                    "classes": d.classes, "notes": d.notes},
        "machine": machine,
        "warnings": list(res.warnings),
        "projection": res.projection,
        "timeline": timeline,
        "ladder": {str(seed): entries for seed, entries in res.ladder.items()},
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
