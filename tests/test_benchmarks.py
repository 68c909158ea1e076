"""Every benchmark runs in CI, in its seconds-long smoke mode, so that a stale check cannot sit on main
again (``benchmarks/selection.py --device cpu`` failed for weeks before this test existed).

Each is run as a subprocess, as a user would: it must exit 0 and print its table.
``benchmarks/pipeline.py`` joins once it has a ``--smoke`` option (its own work, elsewhere).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


def _has_smoke(script: str) -> bool:
    return "--smoke" in _run(script, "--help", timeout=120).stdout


def test_selection_smoke_prints_the_cost_table_and_every_section(tmp_path):
    out = tmp_path / "selection.json"
    r = _run("selection.py", "--smoke", "--threads", "1", "--json", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = r.stdout
    for header in ("1. cost model", "plan()", "observe()", "launch sequence of plan()",
                   "2. CPU targets", "3. selection at k = N/2", "4. observe() per batch"):
        assert header in text, header
    assert "ucb / kernels" in text and "gp_plan" in text
    res = json.loads(out.read_text())
    assert res["smoke"] and res["cost"]["plan"]["ucb/kernels"]["device_ops"] == 2
    assert res["selection"][0]["plan_us"] > 0 and res["observe"][0]["kernels_us"] > 0


def test_memory_smoke_prints_its_table():
    r = _run("memory.py", "--smoke")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| scenario" in r.stdout and "| infobatch, pruned" in r.stdout
    assert "failed" not in r.stdout and "# over 24 B/sample" in r.stdout


def test_distributed_smoke_prints_its_table():
    r = _run("distributed.py", "--smoke")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if "allgather" in line and "total/single" in line)
    assert lines[head + 1].split()[0] == "10000"


def test_pipeline_smoke_when_it_has_one():
    if not _has_smoke("pipeline.py"):
        pytest.skip("benchmarks/pipeline.py has no --smoke yet (it joins this test when it does)")
    r = _run("pipeline.py", "--smoke")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip()


def test_every_benchmark_is_covered():
    scripts = {p.name for p in BENCH.glob("*.py")}
    covered = {"selection.py", "memory.py", "distributed.py", "pipeline.py", "cost_before.py"}
    assert scripts <= covered, sorted(scripts - covered)
    assert _has_smoke("selection.py") and _has_smoke("memory.py") and _has_smoke("distributed.py")
    r = _run("cost_before.py", "--help", timeout=60)
    assert r.returncode == 0 and "checkout" in r.stdout


def test_cost_before_counts_a_checkout():
    """cost_before.py's smoke: counting this very tree (as it counted main for the "before"
    column) gives the launch counts the budget tests keep."""
    r = _run("cost_before.py", str(ROOT), "4096")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["plan"]["ucb/kernels"]["sequence"] == ["gp_plan", "aten._local_scalar_dense.default"]
    assert res["observe"]["256/kernels"]["device_ops"] == 2
