"""benchmarks/pipeline.py runs in its seconds-long smoke mode (every section, tiny data): CI keeps
the benchmark working; its figures mean nothing at this size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nvidia.dali")
pytest.importorskip("PIL")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
                    .exists(), reason="Fashion-MNIST not installed")
def test_pipeline_benchmark_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pipeline.py"), "--smoke"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    for header in ("machine:", "\n1. arrays", "\n2. files", "\n3. epoch time", "\n4. turnover",
                   "\n5. the epoch boundary"):
        assert header in out.stdout, header
    assert "% of a pruned epoch" in out.stdout
