"""The DALI examples run, and the readers.file conversion stays a ten-line change.

Each script runs in a subprocess on the CPU (small settings); the readers.file pair writes its own
folder of Fashion-MNIST PNGs into a temporary directory.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nvidia.dali")
pytest.importorskip("PIL")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_data = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(),
                                reason="Fashion-MNIST not installed")


def run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "TMPDIR": str(cwd)}
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def changed_lines(old: Path, new: Path) -> tuple[list[str], list[str]]:
    diff = list(difflib.unified_diff(old.read_text().splitlines(), new.read_text().splitlines(),
                                     lineterm="", n=0))
    removed = [d[1:] for d in diff if d.startswith("-") and not d.startswith("---")]
    added = [d[1:] for d in diff if d.startswith("+") and not d.startswith("+++")]
    return removed, added


def test_readers_file_conversion_is_a_ten_line_diff():
    removed, added = changed_lines(EXAMPLES / "readers_file_train.py",
                                   EXAMPLES / "readers_file_train_pruned.py")
    assert len(added) <= 10 and len(removed) <= len(added)
    assert any("fn.readers.file" in line for line in removed)
    assert any("FileSource(file_root=root" in line for line in added)
    assert any("pruner.observe" in line for line in added)
    assert "gpuprune" not in (EXAMPLES / "readers_file_train.py").read_text()


def test_the_diff_counter_can_fail(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\ny = 2\n")
    b.write_text("x = 1\ny = 3\nz = 4\n")
    assert changed_lines(a, b) == (["y = 2"], ["y = 3", "z = 4"])


@needs_data
def test_readers_file_scripts_train_on_an_image_folder(tmp_path):
    plain = run("readers_file_train.py", "--samples", "256", "--epochs", "2", "--batch-size", "64",
                cwd=tmp_path)
    pruned = run("readers_file_train_pruned.py", "--samples", "256", "--epochs", "2",
                 "--batch-size", "64", cwd=tmp_path)
    assert re.findall(r"epoch \d: (\d+) samples", plain) == ["256", "256"]
    assert re.findall(r"epoch \d: (\d+) samples", pruned) == ["128", "128"]    # keep=0.5


@needs_data
def test_train_dali_sizes_one_cycle_lr_with_the_total_steps(tmp_path):
    out = run("train_dali.py", "--samples", "1000", "--epochs", "3", "--batch-size", "128",
              cwd=tmp_path)
    # epochs 0 and 2 full (warm-up, final), epoch 1 pruned: 8 + 4 + 8 steps; the script asserts
    # that it took exactly that many optimizer steps, so OneCycleLR ran out exactly at the end
    assert "20 optimizer steps in 3 epochs" in out
    assert re.findall(r"planned / +(\d+) steps", out) == ["8", "4", "8"]
