"""What ``gpuprune bench`` shows: tables within 120 columns with every column explained, plots
that cut no point off, ``--help`` with every default, a wall-time account with nothing missing,
presets, the time limit, and the GPU study's dry run."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpuprune.bench import BenchConfig, run_bench
from gpuprune.bench.config import PRESETS
from gpuprune.bench.plots import accuracy_figure, data_limits
from gpuprune.bench.table import WIDTH, _Col, _columns, _render, legend
from gpuprune.bench.timeline import Timeline, process_age
from gpuprune.cli import _parse_bench, build_parser, main
from gpuprune.data import find_fashion_mnist, load_digits

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--train-subset", "400", "--test-subset", "200", "--epochs", "3",
        "--batch-size", "32", "--el2n-seeds", "1", "--el2n-epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Every method at two ratios, two seeds, exploitation measured; the printed output kept."""
    out = tmp_path_factory.mktemp("out")
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["bench", *TINY, "--prune-ratios", "0.5", "0.7", "--seeds", "0", "1",
                     "--exploitation", "--out", str(out)]) == 0
    return out, buf.getvalue()


def _table_part(printed: str) -> list[str]:
    return printed.split("\nwrote ")[0].splitlines()


def test_every_printed_line_fits_120_columns(sweep):
    _, printed = sweep
    lines = _table_part(printed)
    assert max(len(line) for line in lines) <= WIDTH, max(lines, key=len)
    assert sum("accuracy and equal work" in line for line in lines) == 2
    assert sum("costs and selection" in line for line in lines) == 2


def _explained(cfg: BenchConfig) -> set[str]:
    """The names each legend entry starts with ("a, b: text" explains a and b)."""
    names = set()
    for entry in legend(cfg):
        if not entry.startswith("  ") and ":" in entry:
            names |= {n.strip() for n in entry.split(":", 1)[0].split(",")}
    return names


@pytest.mark.parametrize("cfg", [BenchConfig(), BenchConfig(device="cuda")])
def test_every_column_is_explained(sweep, cfg):
    _, printed = sweep
    work, costs = _columns(cfg)
    headers = {c.header for c in work + costs} - {"method"}
    assert headers <= _explained(cfg), headers - _explained(cfg)
    if cfg.device == "cpu":                 # the sweep ran on the CPU: these are its headers
        header_lines = [line for line in _table_part(printed) if line.startswith("method ")]
        for h in headers:
            assert any(h in line for line in header_lines), h
    text = "\n".join(legend(cfg))
    assert "sometimes:" in text and "10 %" in text and "90 %" in text


def test_render_wraps_columns_that_do_not_fit():
    cols = [_Col("method", 10, lambda s: s["m"])] + [
        _Col(f"c{i}", 12, lambda s, i=i: "x" * (10 + i)) for i in range(12)]
    lines = _render(cols, [{"m": "uniform"}, {"m": "ucb"}], width=80)
    assert max(len(line) for line in lines) <= 80
    blocks = [line for line in lines if line.startswith("method")]
    assert len(blocks) >= 3                                     # wrapped, method repeated
    assert all(f"c{i}" in "\n".join(blocks) for i in range(12))
    assert sum(line.startswith("ucb") for line in lines) == len(blocks)


def test_results_have_paired_differences_and_the_ladder(sweep):
    out, _ = sweep
    doc = json.loads((out / "results.json").read_text())
    runs = {(r["method"], r["prune_ratio"], r["seed"]): r for r in doc["runs"]}
    for seed in (0, 1):
        full = runs[("full", 0.0, seed)]
        ladder = doc["ladder"][str(seed)]
        assert {e["source"] for e in ladder} >= {"full", "full_short p=0.5", "full_short p=0.7"}
        assert all(e["steps"] <= full["steps"] for e in ladder)
        for p in (0.5, 0.7):
            short = runs[("full_short", p, seed)]
            for m in ("uniform", "ucb", "ucb+refresh", "infobatch", "el2n"):
                r = runs[(m, p, seed)]
                assert r["delta_full"] == pytest.approx(r["test_acc"] - full["test_acc"])
                assert r["delta_steps"] == pytest.approx(r["test_acc"] - short["test_acc"])
                if r["equal_time_status"] == "interpolated":
                    assert r["delta_time"] == pytest.approx(r["test_acc"] - r["equal_time_acc"])
                    lo = min(e["acc"] for e in ladder)
                    hi = max(e["acc"] for e in ladder)
                    assert lo <= r["equal_time_acc"] <= hi
                elif r["equal_time_status"] == "slower":
                    assert r["delta_time"] == pytest.approx(r["delta_full"])
    summary = (out / "ladder.csv").read_text().splitlines()
    assert summary[0] == "seed,steps,fraction,source,time_s,cpu_s,cmp_time,acc"
    # times are compared in reference steps: each part of a run over the probe measured around it
    for r in doc["runs"]:
        assert r["probe_cpu_s"] > 0
        if r["method"] in ("full", "uniform", "ucb+refresh"):
            assert r["cmp_time"] == pytest.approx(r["cpu_s"] / r["probe_cpu_s"])
        full = runs[("full", 0.0, r["seed"])]
        assert r["cmp_speedup"] == pytest.approx(full["cmp_time"] / r["cmp_time"])


def test_exploitation_is_recorded_and_uncharged(sweep, tmp_path):
    out, _ = sweep
    doc = json.loads((out / "results.json").read_text())
    runs = {(r["method"], r["prune_ratio"], r["seed"]): r for r in doc["runs"]}
    full = runs[("full", 0.0, 0)]
    assert [e["ratio"] for e in full["exploitation"]] == pytest.approx([1.0] * 3)
    ucb = runs[("ucb", 0.5, 0)]
    assert [e["epoch"] for e in ucb["exploitation"]] == [0, 1, 2]
    assert ucb["exploit_s"] > 0
    pruned = [e["ratio"] for e in ucb["exploitation"] if e["epoch"] > 0 and not e["full"]]
    assert ucb["exploit_ratio"] == pytest.approx(sum(pruned) / len(pruned))
    assert (out / "exploitation.csv").exists() and (out / "exploitation.png").exists()
    # neither the measurement nor the reference-step probes change anything the training reads:
    # the same accuracies without them (and without probes, times are compared in seconds)
    assert main(["bench", *TINY, "--prune-ratios", "0.5", "--seeds", "0", "--methods", "ucb",
                 "infobatch", "--no-plots", "--no-equal-time", "--probe-steps", "0",
                 "--out", str(tmp_path)]) == 0
    plain = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    for m in ("full", "ucb", "infobatch"):
        key = (m, 0.0 if m == "full" else 0.5, 0)
        assert plain[m]["test_acc"] == runs[key]["test_acc"]
        assert plain[m]["samples_seen"] == runs[key]["samples_seen"]
        assert plain[m]["exploit_s"] == 0.0
        assert plain[m]["probe_cpu_s"] is None                      # nan in the JSON
        assert plain[m]["cmp_time"] == pytest.approx(plain[m]["cpu_s"])


def test_time_account_leaves_nothing_out(sweep):
    out, printed = sweep
    t = json.loads((out / "results.json").read_text())["timeline"]
    assert t["total_s"] > 0
    assert abs(t["not_accounted_s"]) <= 0.05 * t["total_s"] + 0.5
    assert sum(t["parts"].values()) + t["not_accounted_s"] == pytest.approx(t["total_s"])
    for part in ("data: load", "warm-up (uncharged)", "runs: charged", "runs: test evaluation",
                 "runs: exploitation (uncharged)", "plots"):
        assert part in t["parts"], part
    # called from this (long-lived) process, not as the command: no interpreter start-up counted
    assert not any(p.startswith("start-up") for p in t["parts"])
    assert "time accounted (wall s)" in printed


def test_the_command_accounts_its_start_up(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gpuprune", "bench", *TINY, "--epochs", "1",
                        "--methods", "uniform", "--no-plots", "--no-equal-time",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    t = json.loads((tmp_path / "results.json").read_text())["timeline"]
    start = t["parts"]["start-up (interpreter, imports)"]
    assert 0.0 < start < t["total_s"]
    assert abs(t["not_accounted_s"]) <= 0.05 * t["total_s"] + 0.5


def test_timeline_lines_wrap_and_process_age():
    t = Timeline()
    with t.phase("a"):
        pass
    t.add("b" * 70, 2.0)
    t.add("c" * 70, 3.0)
    summary = t.summary(before=1.5)
    assert list(summary["parts"])[0].startswith("start-up")
    assert summary["total_s"] >= 1.5
    lines = Timeline.lines(summary, 100)
    assert max(len(line) for line in lines) <= 100 and "not accounted" in lines[-1]
    age = process_age()
    assert age is None or age > 0.0


def test_accuracy_plot_clips_no_point():
    """A run whose first epoch is far below the others (the p = 0.7 plot used to cut it off)."""
    data = load_digits().subset(300, 100)
    cfg = BenchConfig(epochs=3, batch_size=32, prune_ratios=(0.9,), methods=("uniform",),
                      equal_time=False, lr=0.01)
    res = run_bench(cfg, data, progress=False)
    first = [c[0]["acc"] for c in res.curves.values()]
    assert min(first) < max(p["acc"] for c in res.curves.values() for p in c) - 12.0
    import matplotlib.pyplot as plt
    fig = accuracy_figure(res, "cpu_s")
    ax = fig.axes[0]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    for line in ax.get_lines():
        for x, y in zip(line.get_xdata(), line.get_ydata()):
            assert x0 <= x <= x1 and y0 <= y <= y1, (x, y)
    plt.close(fig)
    assert data_limits([1.0, 2.0]) == pytest.approx((0.5, 2.5))
    assert data_limits([80.0, 90.0], 0.1) == pytest.approx((79.0, 91.0))
    assert data_limits([float("nan")]) == (0.0, 1.0)


def test_help_shows_every_default():
    parser = build_parser()
    bench = next(a for a in parser._subparsers._group_actions[0].choices.items()
                 if a[0] == "bench")[1]
    formatter = bench._get_formatter()
    missing = []
    for action in bench._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = formatter._get_help_string(action) or ""
        if not action.help or "%(default)" not in text:
            missing.append(action.option_strings)
    assert missing == []
    rendered = bench.format_help()
    assert rendered.count("(default:") == len(bench._actions) - 1


def test_presets_are_defaults_that_explicit_options_override():
    parser = build_parser()
    args = _parse_bench(parser, ["bench", "--preset", "exploitation-30"])
    assert args.epochs == 30 and args.exploitation and args.prune_ratios == [0.5]
    args = _parse_bench(parser, ["bench", "--preset", "exploitation-30", "--epochs", "4"])
    assert args.epochs == 4 and args.exploitation
    args = _parse_bench(build_parser(), ["bench", "--preset", "gpu-study"])
    assert (args.model, args.cifar_shaped, args.lr_schedule, args.amp) == \
        ("resnet18", True, "onecycle", "bf16")
    fields = set(BenchConfig.__dataclass_fields__) | {
        "dataset", "cifar_shaped", "train_subset", "test_subset", "time_limit_s"}
    for name, preset in PRESETS.items():
        assert set(preset) - {"_about"} <= fields, name


def test_time_limit_stops_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *TINY, "--methods", "uniform", "--time-limit-s", "0.001",
              "--out", str(tmp_path)])
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "projected to take" in err and "--time-limit-s" in err
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.skipif(find_fashion_mnist() is None, reason="dataset-fashion-mnist not installed")
def test_gpu_study_dry_run(tmp_path):
    """scripts/gpu_study.sh --dry-run: the H100 estimate from CPU measurements, then the study's
    code path (CIFAR-shaped data, ResNet-18, crops, OneCycle, bf16 autocast, channels-last, every
    method, the ladder) shrunk to seconds on the CPU, printing the same tables."""
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_study.sh"), "--dry-run"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "GFLOP per trained image" in out and "estimate:" in out
    assert "dry run; the real run:" in out and "full-run equivalents" in out
    assert "resnet18" in out and "3x32x32" in out and "onecycle" in out
    assert "accuracy and equal work" in out and "gpu_study: dry run OK" in out
    for m in ("epsilon_greedy+refresh", "ucb+refresh", "infobatch+refresh", "el2n", "forgetting"):
        assert f"\n{m} " in out
    table = out.split("prune ratio 0.5 (keep 0.5)")[1].split("\nwrote ")[0]
    assert max(len(line) for line in table.splitlines()) <= WIDTH


def test_gpu_study_refuses_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU message")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_study.sh")], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr


def test_dry_run_shrinks_and_runs_on_the_cpu(tmp_path, capsys):
    assert main(["bench", "--dataset", "digits", "--model", "cnn", "--epochs", "7",
                 "--methods", "uniform", "--seeds", "3", "4", "--device", "cuda", "--dry-run",
                 "--no-progress", "--no-plots", "--assume-rates", "1000", "3000",
                 "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "dry run; the real run:" in err and "at assumed rates 1000 / 3000" in err
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["config"]["epochs"] == 2 and doc["config"]["device"] == "cpu"
    assert doc["config"]["seeds"] == [3] and doc["config"]["width"] == 8
    assert doc["dataset"]["train"] == 64 and doc["dataset"]["test"] == 32
    assert not math.isnan(doc["runs"][0]["test_acc"])


def test_keep_schedule_methods_run_and_are_explained(tmp_path, capsys):
    assert main(["bench", *TINY, "--prune-ratios", "0.5", "--seeds", "0", "--methods", "ucb",
                 "ucb+sched", "--keep-schedule", "linear", "0.7", "0.3", "--no-plots",
                 "--no-equal-time", "--probe-steps", "0", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "+sched: the policy keeping a linear schedule from 0.7 to 0.3" in printed
    runs = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    # 3 epochs of 400: 0.7, 0.5, 0.3 keep 280 + 200 + 120 = 600 samples, as 0.5 keeps
    assert runs["ucb+sched"]["samples_seen"] == 600 == runs["ucb"]["samples_seen"]
    with pytest.raises(SystemExit):
        main(["bench", *TINY, "--methods", "ucb+sched"])
    assert "need --keep-schedule SHAPE START END" in capsys.readouterr().err
