"""setup.py: the metadata is in pyproject.toml; this adds the optional prebuild of the CUDA kernels.

``build_py`` copies ``csrc/gpuprune_kernels.cu`` into the package (``gpuprune/kernels/``) and, when
nvcc is found, compiles it into ``gpuprune/kernels/gpuprune_kernels-<hash>.fatbin``: SASS for sm_80 and
sm_90 plus compute_90 PTX. sm_86/sm_89 GPUs run the sm_80 SASS (same major version); newer GPUs
(sm_100, sm_120) JIT-compile the PTX, which needs a driver that knows the PTX version of the nvcc
that built it (nvcc 13.0: an R580 or newer driver). ``<hash>`` is the start of the sha256 of the
source it was built from: the loader only takes the fatbin of the source it finds, so a stale one (an
editable install after a source edit) is never loaded. Plain nvcc,
no torch extension: nothing is tied to a torch version. A missing nvcc, a failed build or
``GPUPRUNE_NO_FATBIN=1`` only prints a note; gpuprune then compiles the source with NVRTC (through
CuPy) at first use. In an editable install the fatbin is written into the source tree instead (it is
git-ignored).

nvcc is looked up in ``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, then on the PATH.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT / "csrc" / "gpuprune_kernels.cu"
FATBIN_PREFIX = "gpuprune_kernels-"
SASS_ARCHS = ("80", "90")
PTX_ARCH = "90"
NVCC_TIMEOUT_S = 900


def _note(message: str) -> None:
    print(f"gpuprune setup: {message}", file=sys.stderr)


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME / CUDA_PATH, else the PATH; None if there is none."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            cand = Path(home) / "bin" / "nvcc"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    return shutil.which("nvcc")


def nvcc_command(nvcc: str, source: Path, output: Path, archs=SASS_ARCHS, ptx_arch=PTX_ARCH) -> list[str]:
    """The fatbin build: one SASS per arch in ``archs`` and PTX for ``ptx_arch``."""
    cmd = [nvcc, "-fatbin", "-std=c++17", "-O3"]
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    if ptx_arch:
        cmd += ["-gencode", f"arch=compute_{ptx_arch},code=compute_{ptx_arch}"]
    return cmd + ["-o", str(output), str(source)]


def fatbin_name(source: Path) -> str:
    """The fatbin's file name for a source: ``gpuprune_kernels-<first 16 hex of its sha256>.fatbin``
    (gpuprune/kernels/_loader.py computes the same name)."""
    return f"{FATBIN_PREFIX}{hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16]}.fatbin"


def build_fatbin(out_dir: Path, source: Path = SOURCE) -> Path | None:
    """Build the fatbin into ``out_dir``; return its path, or None (with a note) if skipped or failed."""
    if os.environ.get("GPUPRUNE_NO_FATBIN", "").strip() not in ("", "0"):
        _note("GPUPRUNE_NO_FATBIN is set: not building the fatbin (NVRTC compiles at run time)")
        return None
    if not source.is_file():
        _note(f"{source} not found: not building the fatbin")
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        _note("nvcc not found: not building the fatbin (NVRTC compiles the kernels at run time)")
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / fatbin_name(source)
    tmp = out_dir / f".{output.name}.{os.getpid()}"
    try:
        subprocess.run(nvcc_command(nvcc, source, tmp), check=True, capture_output=True, text=True,
                       timeout=NVCC_TIMEOUT_S)
        for old in out_dir.glob(FATBIN_PREFIX + "*.fatbin"):     # fatbins of older sources
            if old != output:
                old.unlink()
        os.replace(tmp, output)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        _note(f"nvcc failed, no fatbin (NVRTC compiles at run time): {detail.strip()[:2000]}")
        tmp.unlink(missing_ok=True)
        return None
    _note(f"built {output}")
    return output


class BuildPyWithKernels(build_py):
    """build_py, plus the kernel source copied into the package and the optional fatbin."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            build_fatbin(ROOT / "gpuprune" / "kernels")    # the package is the source tree
            return
        target = Path(self.build_lib) / "gpuprune" / "kernels"
        if SOURCE.is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(SOURCE, target / SOURCE.name)
        build_fatbin(target)


if __name__ == "__main__":
    setup(cmdclass={"build_py": BuildPyWithKernels})
