"""``gpuprune bench`` end to end on tiny real data (scikit-learn digits, a Fashion-MNIST subset)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from gpuprune.bench import BASELINES, lr_factor, step_budget
from gpuprune.bench.config import ALL_METHODS as METHODS  # what --methods all runs
from gpuprune.bench.config import BenchConfig
from gpuprune.bench.report import OVERLAP_COLUMNS, ROW_COLUMNS, SUMMARY_COLUMNS
from gpuprune.bench.runner import lock_in_runs, selection_overlaps
from gpuprune.cli import main
from gpuprune.data import fashion_mnist as fm
from gpuprune.data import find_fashion_mnist
from gpuprune.sizes import budget

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--dataset", "digits", "--train-subset", "400", "--test-subset", "200", "--epochs", "2",
        "--batch-size", "32", "--el2n-seeds", "1", "--el2n-epochs", "1", "--no-progress"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def full_sweep(tmp_path_factory):
    """Every method at two ratios and two seeds, on 400 digits, 2 epochs."""
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", *TINY, "--prune-ratios", "0.5", "0.75", "--seeds", "0", "1",
               "--out", str(out)])
    assert rc == 0
    return out


def test_files_and_columns(full_sweep):
    rows = read_csv(full_sweep / "results.csv")
    assert list(rows[0].keys()) == ROW_COLUMNS
    # per seed: full once, then 8 methods at each of 2 ratios
    assert len(rows) == 2 * (1 + 2 * (len(METHODS) - 1))
    assert {(r["method"], r["prune_ratio"]) for r in rows if r["seed"] == "1"} == \
        {("full", "0")} | {(m, p) for m in METHODS[1:] for p in ("0.5", "0.75")}
    summary = read_csv(full_sweep / "summary.csv")
    assert list(summary[0].keys()) == SUMMARY_COLUMNS
    assert len(summary) == 1 + 2 * (len(METHODS) - 1)
    assert all(s["n_seeds"] == "2" for s in summary)
    for name in ("accuracy_vs_time.png", "accuracy_vs_cpu_time.png", "selection_frequency.png"):
        data = (full_sweep / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    doc = json.loads((full_sweep / "results.json").read_text())
    assert doc["dataset"]["name"] == "digits" and doc["dataset"]["train"] == 400
    assert doc["config"]["prune_ratios"] == [0.5, 0.75]
    assert doc["machine"]["torch"] == torch.__version__
    assert doc["command"].startswith("gpuprune bench --dataset digits")
    assert len(doc["runs"]) == len(rows)
    hists = doc["selection_frequency_histograms"]
    assert len(hists) == 2 * len([m for m in METHODS if m not in BASELINES])   # seed 0, pruned
    for h in hists:
        assert h["seed"] == 0 and len(h["samples_by_times_selected"]) == h["rounds"] + 1
        assert sum(h["samples_by_times_selected"]) == 400
        if h["method"] in ("static_random", "el2n", "forgetting"):   # fixed subset: 0 or R times
            assert h["samples_by_times_selected"][1:-1] == [0] * (h["rounds"] - 1)


def test_accounting_invariants(full_sweep):
    doc = json.loads((full_sweep / "results.json").read_text())
    runs = {(r["method"], r["prune_ratio"], r["seed"]): r for r in doc["runs"]}
    n, bs, epochs = 400, 32, 2
    for seed in (0, 1):
        full = runs[("full", 0.0, seed)]
        assert full["samples_seen"] == epochs * n and full["steps"] == epochs * math.ceil(n / bs)
        assert full["target_acc"] == pytest.approx(full["test_acc"] - 1.0)
        for p in (0.5, 0.75):
            k = budget(1 - p, n)
            for m in ("uniform", "epsilon_greedy", "epsilon_greedy+refresh", "ucb", "ucb+refresh",
                      "static_random", "el2n", "forgetting"):
                r = runs[(m, p, seed)]
                assert r["samples_seen"] == epochs * k, m
                assert r["steps"] == epochs * math.ceil(k / bs), m
            short = runs[("full_short", p, seed)]
            assert short["steps"] == runs[("uniform", p, seed)]["steps"]   # same optimizer steps
            assert short["samples_seen"] < n * epochs
            for m in ("infobatch", "infobatch+refresh"):
                assert k * epochs <= runs[(m, p, seed)]["samples_seen"] <= n * epochs
            for m in METHODS[1:]:
                r = runs[(m, p, seed)]
                assert r["total_s"] == pytest.approx(r["train_s"] + r["select_s"] + r["refresh_s"]
                                                     + r["score_s"])
                # (at 2 epochs InfoBatch plans all samples, then anneals: nothing to re-score)
                assert (r["refresh_s"] > 0) == (m in ("epsilon_greedy+refresh", "ucb+refresh")), m
                assert r["speedup"] == pytest.approx(full["total_s"] / r["total_s"])
                curve = r["curve"]
                assert [c["epoch"] for c in curve] == list(range(1, len(curve) + 1))
                assert curve[-1]["acc"] == r["test_acc"]
                assert curve[0]["time_s"] >= r["score_s"]
                hit = [c for c in curve if c["acc"] >= r["target_acc"]]
                assert r["time_to_target_s"] == (hit[0]["time_s"] if hit else None)
                assert r["time_to_target_cpu_s"] == (hit[0]["cpu_s"] if hit else None)
                assert r["cpu_s"] > 0 and curve[-1]["cpu_s"] == pytest.approx(r["cpu_s"])
                assert r["cpu_speedup"] == pytest.approx(full["cpu_s"] / r["cpu_s"])
            # scoring is charged: EL2N (1 model x 1 epoch + a pass) and forgetting (the full run)
            el2n, forg = runs[("el2n", p, seed)], runs[("forgetting", p, seed)]
            assert el2n["score_s"] > 0 and el2n["scoring_samples"] == n + n
            assert forg["score_s"] >= full["train_s"] + full["select_s"]
            assert forg["scoring_samples"] == full["samples_seen"]
            # static subsets never change: every sample is always or never planned
            for m in ("static_random", "el2n", "forgetting"):
                assert runs[(m, p, seed)]["sometimes"] == 0.0
                assert runs[(m, p, seed)]["always"] == pytest.approx(k / n)
            assert runs[("uniform", p, seed)]["rounds"] == epochs


def test_overlap_recorded_per_epoch_and_summarised(full_sweep):
    """overlap.csv holds every pruned run's Pruner.history; results.csv's overlap columns are the
    mean / max of its selection overlaps, recomputed here from the CSV."""
    rows = read_csv(full_sweep / "overlap.csv")
    assert list(rows[0].keys()) == OVERLAP_COLUMNS
    doc = json.loads((full_sweep / "results.json").read_text())
    runs = {(r["method"], r["prune_ratio"], r["seed"]): r for r in doc["runs"]}
    for (m, p, seed), run in runs.items():
        mine = [r for r in rows if (r["method"], float(r["prune_ratio"]), int(r["seed"])) ==
                (m, p, seed)]
        if m in ("full", "full_short"):
            assert mine == [] and run["history"] == [] and run["overlap_mean"] is None
            continue
        assert [int(r["epoch"]) for r in mine] == [0, 1]              # 2 epochs planned
        assert mine[0]["overlap"] == ""                               # no previous plan
        history = [{"epoch": int(r["epoch"]), "size": int(r["size"]), "full": r["full"] == "True",
                    "reselected": r["reselected"] == "True",
                    "overlap": None if r["overlap"] == "" else float(r["overlap"])} for r in mine]
        for mine_rec, json_rec in zip(history, run["history"], strict=True):
            assert {k: v for k, v in mine_rec.items() if k != "overlap"} == \
                {k: v for k, v in json_rec.items() if k != "overlap"}
            assert (mine_rec["overlap"] is None) == (json_rec["overlap"] is None)
            if json_rec["overlap"] is not None:
                assert mine_rec["overlap"] == pytest.approx(json_rec["overlap"], rel=1e-5)
        ov = [o for _, o in selection_overlaps(history)]
        if m in ("static_random", "el2n", "forgetting"):
            assert history[1]["overlap"] == 1.0 and not history[1]["reselected"]
        if ov:
            assert run["overlap_mean"] == pytest.approx(sum(ov) / len(ov), rel=1e-5)
            assert run["overlap_max"] == pytest.approx(max(ov), rel=1e-5)
        else:
            assert run["overlap_mean"] is None
        assert run["lock_in_epochs"] == 0
    assert doc["warnings"] == []


def test_lock_in_warning_on_a_known_bad_setting(tmp_path, capsys):
    """UCB without drift, with a large uncertainty weight, on 400 digits: once every sample has
    been seen it trains the same half every epoch; the bench says so. Uniform never does."""
    args = [*TINY, "--epochs", "7", "--methods", "ucb", "uniform", "--ucb-drift", "0", "--ucb-c",
            "3", "--no-plots", "--out", str(tmp_path)]
    assert main(["bench", *args]) == 0
    out, err = capsys.readouterr()
    doc = json.loads((tmp_path / "results.json").read_text())
    runs = {r["method"]: r for r in doc["runs"]}
    locked = lock_in_runs(runs["ucb"]["history"])
    assert locked and runs["ucb"]["lock_in_epochs"] == sum(b - a + 1 for a, b in locked) >= 3
    assert runs["uniform"]["lock_in_epochs"] == 0
    assert len(doc["warnings"]) == 1 and doc["warnings"][0].startswith("lock-in: ucb p=0.5 seed 0")
    assert "scores are frozen" in doc["warnings"][0]
    assert "WARNING: lock-in: ucb p=0.5 seed 0" in err and "WARNING: lock-in: ucb" in out
    assert "uniform p=" not in err


def test_refresh_is_charged_and_counts_the_unselected(tmp_path):
    """The +refresh methods run in the same sweep as the plain ones (same reference); their pass
    is charged and covers exactly the samples the last plan did not train."""
    n, epochs = 400, 3
    args = [*TINY, "--epochs", str(epochs), "--methods", "ucb", "ucb+refresh", "infobatch+refresh",
            "uniform", "--refresh", "unselected", "--no-plots", "--no-equal-time"]
    assert main(["bench", *args, "--out", str(tmp_path / "t")]) == 0
    doc = json.loads((tmp_path / "t" / "results.json").read_text())
    assert doc["config"]["refresh"] == "unselected"
    runs = {r["method"]: r for r in doc["runs"]}
    assert [r["method"] for r in doc["runs"]].count("full") == 1      # one reference for all
    k = budget(0.5, n)
    # ucb reselects before epochs 1 and 2: each time the N - k samples of the last plan are scored
    assert runs["ucb+refresh"]["refresh_samples"] == (epochs - 1) * (n - k)
    ib = runs["infobatch+refresh"]["history"]         # epochs 0, 1 pruned; 2 full (floor 2.625)
    assert [r["full"] for r in ib] == [False, False, True]
    assert runs["infobatch+refresh"]["refresh_samples"] == n - ib[0]["size"]   # before epoch 1
    for m in ("uniform", "ucb"):
        assert runs[m]["refresh_samples"] == 0 and runs[m]["refresh_s"] == 0.0
    for m in ("ucb+refresh", "infobatch+refresh"):
        r = runs[m]
        assert r["refresh_s"] > 0
        assert r["total_s"] == pytest.approx(r["train_s"] + r["select_s"] + r["refresh_s"]
                                             + r["score_s"])
        assert r["curve"][-1]["time_s"] == pytest.approx(r["total_s"])
        assert r["speedup"] == pytest.approx(runs["full"]["total_s"] / r["total_s"])
    # the fresh losses changed ucb's selections
    assert runs["ucb"]["overlap_mean"] != runs["ucb+refresh"]["overlap_mean"]
    # the DataLoader path feeds the same samples in the same batches: identical training
    assert main(["bench", *args, "--loader", "torch", "--out", str(tmp_path / "d")]) == 0
    a = read_csv(tmp_path / "t" / "results.csv")
    b = read_csv(tmp_path / "d" / "results.csv")
    assert [(r["method"], r["test_acc"], r["refresh_samples"], r["overlap_mean"]) for r in a] == \
        [(r["method"], r["test_acc"], r["refresh_samples"], r["overlap_mean"]) for r in b]
    from gpuprune.bench.dali_batches import dali_unavailable_reason
    if dali_unavailable_reason() is None:             # and so does DALI (tested in test_dali.py)
        assert main(["bench", *args, "--loader", "dali", "--out", str(tmp_path / "l")]) == 0
        d = read_csv(tmp_path / "l" / "results.csv")
        assert [(r["method"], r["test_acc"], r["refresh_samples"], r["overlap_mean"])
                for r in a] == \
            [(r["method"], r["test_acc"], r["refresh_samples"], r["overlap_mean"]) for r in d]


def test_same_seed_same_results_whatever_the_global_rng(tmp_path):
    args = [*TINY, "--methods", "uniform", "ucb", "--no-plots"]
    accs = []
    for i, global_seed in enumerate((0, 12345)):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        assert main(["bench", *args, "--out", str(tmp_path / str(i))]) == 0
        accs.append([(r["method"], r["test_acc"], r["samples_seen"])
                     for r in read_csv(tmp_path / str(i) / "results.csv")])
    assert accs[0] == accs[1]


def test_torch_loader_trains_exactly_like_the_tensor_loader(tmp_path):
    base = [*TINY, "--methods", "uniform", "infobatch", "--no-plots"]
    assert main(["bench", *base, "--loader", "tensor", "--out", str(tmp_path / "t")]) == 0
    state = torch.random.get_rng_state()
    assert main(["bench", *base, "--loader", "torch", "--out", str(tmp_path / "d")]) == 0
    assert torch.equal(torch.random.get_rng_state(), state)      # the global RNG is never used
    a = read_csv(tmp_path / "t" / "results.csv")
    b = read_csv(tmp_path / "d" / "results.csv")
    assert [r["loader"] for r in b] == ["torch"] * len(b)
    assert [(r["method"], r["test_acc"], r["samples_seen"]) for r in a] == \
        [(r["method"], r["test_acc"], r["samples_seen"]) for r in b]


def test_printed_table(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert main(["bench", *TINY, "--methods", "uniform", "--no-plots",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "prune ratio 0.5 (keep 0.5)" in out
    lines = out.splitlines()
    assert any(line.startswith("full ") for line in lines)
    assert any(line.startswith("uniform ") for line in lines)
    assert f"wrote {tmp_path / 'results.csv'}" in out
    assert torch.get_num_threads() == threads          # the CLI's 1-thread default is undone


@pytest.mark.parametrize("args,named", [
    (["--prune-ratios", "1.5"], "--prune-ratios"),
    (["--prune-ratios", "0"], "--prune-ratios"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "two"], "--epochs"),
    (["--methods", "bogus"], "--methods"),
    (["--seeds", "-1"], "--seeds"),
    (["--seeds", "1", "1"], "--seeds"),
    (["--lr", "0"], "--lr"),
    (["--el2n-epochs", "5"], "--el2n-epochs"),
    (["--warmup-epochs", "2"], "--warmup-epochs"),
    (["--data-dir", "/nonexistent/folder"], "--data-dir"),
    (["--model", "vgg"], "--model"),
    (["--loader", "ffcv"], "--loader"),
    (["--ucb-drift", "-1"], "--ucb-drift"),
    (["--refresh", "some"], "--refresh"),
    (["--refresh", "none"], "--refresh"),
    (["--methods", "ucb+pass"], "--methods"),
    (["--width", "8"], "--width"),                       # the MLP has no width
    (["--eval-every", "0"], "--eval-every"),
    (["--ladder", "1.5"], "--ladder"),
    (["--clock", "sundial"], "--clock"),
    (["--amp", "fp8"], "--amp"),
    (["--time-limit-s", "0"], "--time-limit-s"),
    (["--assume-rates", "100"], "--assume-rates"),
    (["--preset", "nope"], "--preset"),
])
def test_bad_arguments_exit_2_naming_the_argument(args, named, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["bench", *TINY, *args, "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {named}" in err and "gpuprune bench: error:" in err
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *TINY, "--device", "cuda"])
    assert e.value.code == 2
    assert "argument --device" in capsys.readouterr().err


def test_dali_loader_trains_exactly_like_the_tensor_loader(tmp_path):
    from gpuprune.bench.dali_batches import dali_unavailable_reason
    if dali_unavailable_reason() is not None:
        pytest.skip(dali_unavailable_reason())
    base = [*TINY, "--methods", "uniform", "infobatch", "full_short", "--no-plots"]
    assert main(["bench", *base, "--loader", "tensor", "--out", str(tmp_path / "t")]) == 0
    assert main(["bench", *base, "--loader", "dali", "--out", str(tmp_path / "d")]) == 0
    a = read_csv(tmp_path / "t" / "results.csv")
    b = read_csv(tmp_path / "d" / "results.csv")
    assert [r["loader"] for r in b] == ["dali"] * len(b)
    assert [(r["method"], r["test_acc"], r["steps"], r["samples_seen"]) for r in a] == \
        [(r["method"], r["test_acc"], r["steps"], r["samples_seen"]) for r in b]


def test_dali_loader_unavailable_is_a_clear_error(capsys, tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_dali(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "dali" and level > 0 or name.startswith("nvidia.dali") or name == "gpuprune.dali":
            raise ImportError("No module named 'nvidia.dali' (simulated)")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    with pytest.raises(SystemExit) as e:
        main(["bench", *TINY, "--loader", "dali", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --loader" in err and "DALI loader unavailable" in err


def test_missing_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_fallback_to_digits_is_announced(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fm, "DEFAULT_ROOT", tmp_path / "no-fashion-mnist")
    args = ["bench", "--epochs", "1", "--methods", "uniform", "--train-subset", "200",
            "--test-subset", "100", "--no-progress", "--no-plots", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "FALLBACK" in captured.err and "digits" in captured.err
    assert "NOTE: FALLBACK" in captured.out                  # also in the printed table
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert doc["dataset"]["name"] == "digits"
    assert any("FALLBACK" in n for n in doc["dataset"]["notes"])


def test_image_folder_via_data_dir(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, name in enumerate(["circle", "square"]):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for j in range(10):
            a = rng.integers(0, 60, (12, 12, 3), dtype=np.uint8) + np.uint8(120 * c)
            Image.fromarray(a, "RGB").save(tmp_path / "imgs" / name / f"{j}.png")
    out = tmp_path / "o"
    assert main(["bench", "--data-dir", str(tmp_path / "imgs"), "--epochs", "2", "--batch-size", "4",
                 "--methods", "uniform", "el2n", "--el2n-epochs", "1", "--el2n-seeds", "1",
                 "--model", "cnn", "--no-progress", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["dataset"]["name"] == "folder:imgs"
    assert doc["dataset"]["image_shape"] == [3, 12, 12]
    assert doc["dataset"]["train"] + doc["dataset"]["test"] == 20
    assert doc["dataset"]["classes"] == ["circle", "square"]
    rows = read_csv(out / "results.csv")
    assert [r["method"] for r in rows] == ["full", "uniform", "el2n"]


@pytest.mark.skipif(find_fashion_mnist() is None, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_subset_run(tmp_path):
    assert main(["bench", "--dataset", "fashion-mnist", "--train-subset", "1000", "--test-subset",
                 "500", "--epochs", "2", "--methods", "uniform", "--no-progress", "--no-plots",
                 "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "results.csv")
    assert [r["dataset"] for r in rows] == ["fashion-mnist"] * 2
    assert float(rows[0]["test_acc"]) > 50.0            # 10 classes: chance is 10%


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "gpuprune", "bench", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0
    assert "--prune-ratios" in r.stdout and "--loader" in r.stdout


# ------------------------------------------------------------------------------ pure helpers
def test_lr_factor_shape():
    assert lr_factor(0.0, 0.2) == pytest.approx(0.1)
    assert lr_factor(0.1, 0.2) == pytest.approx(0.55)
    assert lr_factor(0.2, 0.2) == pytest.approx(1.0)
    assert lr_factor(0.6, 0.2) == pytest.approx(0.5)
    assert lr_factor(1.0, 0.2) == 0.0 and lr_factor(1.5, 0.2) == 0.0
    assert lr_factor(0.0, 0.0) == 1.0


def test_step_budget_hand_cases():
    cfg = BenchConfig(epochs=3, batch_size=10)
    assert step_budget(cfg, 100, 0.5) == 3 * 5
    assert step_budget(cfg, 100, 0.75) == 3 * 3               # k = 25 -> 3 batches
    cfg = BenchConfig(epochs=3, batch_size=10, warmup_epochs=1)
    assert step_budget(cfg, 100, 0.5) == 10 + 2 * 5           # the warm-up epoch is full data


def test_augment_is_a_seeded_shift_and_flip():
    import torch.nn.functional as F
    from gpuprune.bench.train import augment
    x = torch.randint(0, 256, (16, 2, 5, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = augment(x, torch.Generator().manual_seed(7))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(7)))
    xp = F.pad(x, (2, 2, 2, 2))
    for b in range(16):
        crops = [c for dy in range(5) for dx in range(5)
                 for c in (xp[b, :, dy:dy + 5, dx:dx + 6], xp[b, :, dy:dy + 5, dx:dx + 6].flip(2))]
        assert any(torch.equal(out[b], c) for c in crops)
