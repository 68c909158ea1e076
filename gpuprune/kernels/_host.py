"""A serial host build of the kernel source, for testing the kernel backend without a GPU.

``csrc/gpuprune_kernels.cu`` compiled by a C++ compiler with ``-DGPUPRUNE_HOST_TEST`` exports, for
every kernel ``gp_<name>``, a host function ``gp_host_<name>`` with the same arguments and the same
per-element helpers (hash, key, score word, merge arithmetic, bitonic network, bucket bookkeeping),
run serially. :func:`host_ops` wraps it in a :class:`~gpuprune.kernels.ops.KernelOps` on the CPU, so
the very launch sequences used on a GPU can be checked against the torch reference in CPU CI.
What it cannot check is the kernels' parallel mechanics (atomics, barriers, warp votes, the
last-block hand-off): the GPU tests do.

Not used by the library at run time.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from ._loader import find_source
from ._spec import SIGNATURES
from .ops import KernelOps

__all__ = ["HOST_FLAGS", "find_compiler", "build_host_library", "HostRuntime", "host_ops"]

#: strict IEEE arithmetic, no contraction into FMAs (the device code uses explicit _rn intrinsics)
HOST_FLAGS = ("-O2", "-std=c++17", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-x", "c++",
              "-DGPUPRUNE_HOST_TEST")

_CTYPES = {"p": ctypes.c_void_p, "q": ctypes.c_longlong, "Q": ctypes.c_ulonglong, "d": ctypes.c_double}


def find_compiler() -> str | None:
    """A C++ compiler: ``$CXX``, else g++, c++ or clang++ on the PATH."""
    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx):
        return cxx
    for name in ("g++", "c++", "clang++"):
        if shutil.which(name):
            return name
    return None


def build_host_library(source: Path | None = None, cache_dir: Path | None = None) -> Path:
    """Compile the host build (cached by content hash) and return the shared library's path."""
    source = find_source() if source is None else Path(source)
    if source is None:
        raise FileNotFoundError("gpuprune_kernels.cu not found")
    cxx = find_compiler()
    if cxx is None:
        raise FileNotFoundError("no C++ compiler found (set CXX)")
    text = source.read_bytes()
    digest = hashlib.sha256(text + " ".join((cxx,) + HOST_FLAGS).encode()).hexdigest()[:16]
    cache_dir = Path(tempfile.gettempdir()) / "gpuprune-host" if cache_dir is None else Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"gpuprune_host_{digest}.so"
    if not out.exists():
        tmp = cache_dir / f".{out.name}.{os.getpid()}"
        subprocess.run([cxx, *HOST_FLAGS, str(source), "-o", str(tmp)], check=True,
                       capture_output=True, text=True)
        os.replace(tmp, out)
    return out


class HostRuntime:
    """Runs ``gp_host_<name>`` for a launch of ``gp_<name>`` (grid and block are ignored)."""

    def __init__(self, library: Path) -> None:
        self.library = Path(library)
        self._lib = ctypes.CDLL(str(library))
        self._functions = {}
        for name, kinds in SIGNATURES.items():
            f = getattr(self._lib, name.replace("gp_", "gp_host_", 1))
            f.argtypes = [_CTYPES[k] for k in kinds]
            f.restype = None
            self._functions[name] = f

    def __repr__(self) -> str:
        return f"HostRuntime({self.library.name})"

    def session(self):
        return nullcontext()

    def launch(self, name: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple) -> None:
        self._functions[name](*args)


def host_ops(library: Path | None = None) -> KernelOps:
    """A :class:`KernelOps` on the CPU backed by the host build (compiled on first use)."""
    return KernelOps(HostRuntime(build_host_library() if library is None else library),
                     torch.device("cpu"), sm_count=1)
