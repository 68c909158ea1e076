"""Find, load and memoise the CUDA kernels (which backend runs is decided in gpuprune.backend).

Loading order for a device (the first that works wins; every failure is kept for the error message):

1. ``gpuprune/kernels/gpuprune_kernels-<hash>.fatbin``, built by ``setup.py`` with plain nvcc (SASS
   for sm_80 and sm_90, which sm_86/89 run, plus compute_90 PTX for newer GPUs), loaded with
   ``cupy.RawModule(path=...)``. ``<hash>`` names the source it was built from: only the fatbin of
   the source found below is taken, so a stale build is never loaded. A fatbin from a newer CUDA than
   the driver supports fails to load (the PTX of nvcc 13 needs an R580+ driver); then
2. the source, compiled at run time by NVRTC: ``cupy.RawModule(code=..., options=NVRTC_OPTIONS)``
   (CuPy caches the binary on disk). The source is looked up next to this file (installed copy) and
   in ``csrc/`` of a source checkout.

``GPUPRUNE_KERNELS=source`` skips the fatbin; ``GPUPRUNE_KERNELS=fatbin`` skips the source.

CuPy is imported only inside :func:`get_ops`, so ``import gpuprune`` never needs it. Results are
memoised per device index, failures included (call :func:`clear_cache` to retry).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .._checks import check_choice
from ._spec import KERNEL_NAMES, SIGNATURES
from .ops import KernelOps

__all__ = [
    "KernelsUnavailable", "CupyMissing", "SOURCE_NAME", "FATBIN_NAME", "NVRTC_OPTIONS", "find_source",
    "fatbin_name", "find_fatbin", "module_candidates", "load_module", "get_ops", "available", "unavailable_reason",
    "clear_cache", "CupyRuntime",
]

SOURCE_NAME = "gpuprune_kernels.cu"
#: prefix of the fatbin's name; the rest is the source's hash (see :func:`fatbin_name`)
FATBIN_NAME = "gpuprune_kernels-"
#: NVRTC options of the run-time build. CuPy appends -ftz=true, the device's -arch and
#: --device-as-default-execution-space; no -use_fast_math. The exact parts do not depend on -fmad or
#: -ftz: round-to-nearest double intrinsics and float<->double conversions in inline PTX.
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)
_ENV = "GPUPRUNE_KERNELS"

_PKG_DIR = Path(__file__).resolve().parent


class KernelsUnavailable(RuntimeError):
    """The CUDA kernels cannot run here (no CUDA device, no CuPy, or neither binary loads)."""


class CupyMissing(KernelsUnavailable):
    """CuPy cannot be imported, so the kernels cannot be launched.

    Its own type because ``backend="auto"`` treats it as an expected setup (torch, no warning),
    unlike a kernel build or load failure, which it reports.
    """


def _search_dirs() -> list[Path]:
    return [_PKG_DIR, _PKG_DIR.parent.parent / "csrc"]


def find_source(dirs: list[Path] | None = None) -> Path | None:
    """The kernel source: the copy installed in the package, else ``csrc/`` of a checkout."""
    for d in _search_dirs() if dirs is None else dirs:
        p = Path(d) / SOURCE_NAME
        if p.is_file():
            return p
    return None


def fatbin_name(source: Path) -> str:
    """``gpuprune_kernels-<first 16 hex digits of the source's sha256>.fatbin`` (as setup.py names it)."""
    return f"{FATBIN_NAME}{hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16]}.fatbin"


def find_fatbin(dirs: list[Path] | None = None, source: Path | None = None) -> Path | None:
    """The prebuilt fatbin of ``source`` (default: :func:`find_source`) in the package, if any."""
    source = find_source() if source is None else source
    if source is None:
        return None
    name = fatbin_name(source)
    for d in [_PKG_DIR] if dirs is None else dirs:
        p = Path(d) / name
        if p.is_file():
            return p
    return None


def module_candidates(fatbin_dirs: list[Path] | None = None, source_dirs: list[Path] | None = None,
                      prefer: str | None = None) -> list[tuple[str, Path]]:
    """What :func:`load_module` tries, in order: ``("fatbin", path)`` then ``("source", path)``.

    Args:
        fatbin_dirs, source_dirs: where to look (default: the package, and ``csrc/`` for the source).
        prefer: ``"auto"`` (both), ``"fatbin"`` or ``"source"`` (only that one). Default: the
            ``GPUPRUNE_KERNELS`` environment variable, else ``"auto"``.
    """
    prefer = os.environ.get(_ENV, "auto") if prefer is None else prefer
    check_choice(_ENV, prefer, {"auto", "fatbin", "source"})
    out: list[tuple[str, Path]] = []
    source = find_source(source_dirs)
    fatbin = find_fatbin(fatbin_dirs, source)
    if fatbin is not None and prefer in ("auto", "fatbin"):
        out.append(("fatbin", fatbin))
    if source is not None and prefer in ("auto", "source"):
        out.append(("source", source))
    return out


def load_module(cupy, device_index: int, candidates: list[tuple[str, Path]] | None = None):
    """Load every kernel on a device from the first candidate that works.

    Returns:
        ``(functions, kind, path)``: a dict name -> ``cupy.RawKernel`` (already loaded), and which
        candidate gave them.

    Raises:
        KernelsUnavailable: listing each candidate's error.
    """
    candidates = module_candidates() if candidates is None else candidates
    errors = []
    for kind, path in candidates:
        try:
            with cupy.cuda.Device(device_index):
                if kind == "fatbin":
                    module = cupy.RawModule(path=str(path))
                else:
                    module = cupy.RawModule(code=Path(path).read_text(), options=NVRTC_OPTIONS)
                functions = {name: module.get_function(name) for name in KERNEL_NAMES}
                for f in functions.values():
                    f.attributes            # forces the load (or compilation) now, on this device
            return functions, kind, Path(path)
        except Exception as e:  # noqa: BLE001 - any failure means "try the next one"
            errors.append(f"{kind} {path}: {type(e).__name__}: {e}")
    if not errors:
        errors.append(f"neither {FATBIN_NAME} nor {SOURCE_NAME} was found")
    raise KernelsUnavailable("could not load the gpuprune CUDA kernels: " + "; ".join(errors))


class _StreamHandle:
    """A raw CUDA stream handle with the CUDA stream protocol (for ``cupy.cuda.Stream.from_external``)."""

    __slots__ = ("handle",)

    def __init__(self, handle: int) -> None:
        self.handle = int(handle)

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


class CupyRuntime:
    """Launches the loaded kernels on torch's current stream of one device.

    A cooperative launch (gp_plan, whose blocks meet at grid barriers) goes through the driver's
    ``cuLaunchCooperativeKernel``, which refuses a grid whose blocks cannot all be resident;
    :meth:`max_blocks` is the occupancy calculator's answer times the SM count.
    """

    def __init__(self, cupy, functions: dict, device_index: int, kind: str, path: Path,
                 sm_count: int = 1) -> None:
        self._cupy = cupy
        self._functions = functions
        self.device_index = device_index
        self.kind, self.path = kind, path
        self.sm_count = max(int(sm_count), 1)
        self._streams: dict[int, object] = {}
        self._resident: dict[tuple[str, int], int] = {}

    def __repr__(self) -> str:
        return f"CupyRuntime(device={self.device_index}, {self.kind}={str(self.path)!r})"

    def _stream(self, handle: int):
        s = self._streams.get(handle)
        if s is None:
            cupy = self._cupy
            if hasattr(cupy.cuda.Stream, "from_external"):
                s = cupy.cuda.Stream.from_external(_StreamHandle(handle))
            else:  # CuPy < 14
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    s = cupy.cuda.ExternalStream(handle, self.device_index)
            self._streams[handle] = s
        return s

    @contextmanager
    def session(self):
        """Make this device and torch's current stream on it CuPy's current ones."""
        handle = torch.cuda.current_stream(torch.device("cuda", self.device_index)).cuda_stream
        with self._cupy.cuda.Device(self.device_index), self._stream(handle):
            yield

    def stream_key(self) -> int:
        """torch's current stream on this device (launches go there)."""
        return torch.cuda.current_stream(torch.device("cuda", self.device_index)).cuda_stream

    def max_blocks(self, name: str, block: int) -> int:
        """Blocks of ``block`` threads of kernel ``name`` that fit on the device at once."""
        key = (name, int(block))
        if key not in self._resident:
            from cupy_backends.cuda.api import driver
            with self._cupy.cuda.Device(self.device_index):
                per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(
                    self._functions[name].kernel.ptr, int(block), 0)
            self._resident[key] = max(int(per_sm), 1) * self.sm_count
        return self._resident[key]

    def launch(self, name: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple,
               cooperative: bool = False) -> None:
        raw = tuple(0 if a is None else a.data_ptr() if isinstance(a, torch.Tensor) else a
                    for a in args)
        if not cooperative:
            self._functions[name](grid, block, raw)
            return
        from cupy_backends.cuda.api import driver
        # every argument of these kernels is 8 bytes: a pointer, a long long or a double
        values = [ctypes.c_double(v) if kind == "d" else ctypes.c_uint64(int(v) & 0xFFFFFFFFFFFFFFFF)
                  for kind, v in zip(SIGNATURES[name], raw)]
        params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        driver.launchCooperativeKernel(self._functions[name].kernel.ptr, int(grid[0]), 1, 1,
                                       int(block[0]), 1, 1, 0, self.stream_key(),
                                       ctypes.addressof(params))


_LOCK = threading.Lock()
_OPS: dict[int, KernelOps] = {}
#: the failure of each device index, as (exception type, message): a re-raise keeps the type
_FAILED: dict[int, tuple[type[KernelsUnavailable], str]] = {}


def _device_index(device) -> int:
    dev = torch.device(device)
    if dev.type != "cuda":
        raise KernelsUnavailable(f"the CUDA kernels need a CUDA device, got device={dev}")
    if not torch.cuda.is_available():
        raise KernelsUnavailable("torch reports no usable CUDA device (torch.cuda.is_available() is "
                                 "False)")
    return torch.cuda.current_device() if dev.index is None else dev.index


def _build(index: int) -> KernelOps:
    try:
        import cupy
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken CUDA library underneath
        raise CupyMissing(f"CuPy is not importable ({type(e).__name__}: {e}); install "
                          f"cupy-cuda12x or cupy-cuda13x to use the CUDA kernels") from e
    functions, kind, path = load_module(cupy, index)
    sm = torch.cuda.get_device_properties(index).multi_processor_count
    return KernelOps(CupyRuntime(cupy, functions, index, kind, path, sm), torch.device("cuda", index),
                     sm)


def get_ops(device) -> KernelOps:
    """The kernel backend of a CUDA device (loaded on first use, then memoised).

    Raises:
        KernelsUnavailable: with the reason (no CUDA, no CuPy, no loadable binary); the subclass
            :class:`CupyMissing` when CuPy cannot be imported. A remembered failure is raised
            again with the same type and message.
    """
    index = _device_index(device)
    with _LOCK:
        ops = _OPS.get(index)
        if ops is not None:
            return ops
        if index in _FAILED:
            kind, message = _FAILED[index]
            raise kind(message)
        try:
            ops = _build(index)
        except KernelsUnavailable as e:
            _FAILED[index] = (type(e), str(e))
            raise
        _OPS[index] = ops
        return ops


def unavailable_reason(device=None) -> str | None:
    """Why the kernels cannot run on ``device`` (default: the current CUDA device), or None if they can."""
    try:
        get_ops("cuda" if device is None else device)
    except KernelsUnavailable as e:
        return str(e)
    return None


def available(device=None) -> bool:
    """Whether the kernels can run on ``device`` (default: the current CUDA device)."""
    return unavailable_reason(device) is None


def clear_cache() -> None:
    """Forget loaded kernels and remembered failures (the next use loads again)."""
    with _LOCK:
        _OPS.clear()
        _FAILED.clear()

