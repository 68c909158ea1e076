"""DALI stays optional: ``import gpuprune`` works without it; ``gpuprune.dali`` says what is missing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpuprune_imports_without_dali():
    # make every `nvidia.dali` import fail, as on a machine without the wheel
    code = textwrap.dedent("""
        import sys
        sys.modules["nvidia.dali"] = None
        import gpuprune
        assert "nvidia.dali" not in [m for m in sys.modules if sys.modules[m] is not None]
        p = gpuprune.Pruner(10, keep=0.5)
        assert len(p.plan(0)) == 5
        try:
            import gpuprune.dali
        except ImportError as e:
            print("IMPORT-ERROR", e)
        else:
            raise SystemExit("gpuprune.dali imported without DALI")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORT-ERROR" in out.stdout and "nvidia.dali" in out.stdout
