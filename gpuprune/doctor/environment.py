"""What this machine has, and which backend ``backend="auto"`` picks there, and why.

The fatbin's contents are read from the file itself (:func:`parse_fatbin`, no cuobjdump needed); the
decision logic is a pure function (:func:`diagnose_backend`) so it is testable without a GPU.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


def _short(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _cuda_version(v: int | None) -> str:
    """13000 -> '13.0' (the encoding of cudaDriverGetVersion / cudaRuntimeGetVersion)."""
    return "-" if not v else f"{v // 1000}.{v % 1000 // 10}"


# ================================================================================== environment
@dataclass
class Environment:
    """Versions and the device, as found (None: absent; ``*_error``: why)."""

    python: str
    platform: str
    gpuprune: str
    torch: str
    torch_cuda: str | None
    numpy: str
    device: str
    cuda_available: bool = False
    cuda_reason: str | None = None
    cupy: str | None = None
    cupy_error: str | None = None
    cuda_runtime: int | None = None
    nvrtc: str | None = None
    nvrtc_error: str | None = None
    dali: str | None = None
    dali_error: str | None = None
    driver: int | None = None
    gpu_name: str | None = None
    capability: tuple[int, int] | None = None
    sm_count: int | None = None
    memory_gib: float | None = None


def _driver_version(cupy) -> int | None:
    """The driver's CUDA version (e.g. 13000), from CuPy, else libcuda; None without a driver."""
    if cupy is not None:
        try:
            v = int(cupy.cuda.runtime.driverGetVersion())
            return v or None                       # CuPy reports 0 when no driver is loaded
        except Exception:  # noqa: BLE001 - fall back to libcuda
            pass
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        out = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(out)) == 0 and out.value:
            return int(out.value)
    except (OSError, AttributeError):
        pass
    return None


def collect_environment(device: torch.device) -> Environment:
    """Probe versions, CuPy/NVRTC/DALI and ``device`` (CuPy and DALI are imported here, lazily)."""
    import gpuprune

    env = Environment(python=platform.python_version(),
                      platform=f"{platform.system()} {platform.machine()}",
                      gpuprune=gpuprune.__version__, torch=torch.__version__,
                      torch_cuda=torch.version.cuda, numpy=np.__version__, device=str(device))
    env.cuda_available = torch.cuda.is_available()
    if not env.cuda_available:
        env.cuda_reason = ("this torch was built without CUDA" if torch.version.cuda is None else
                           "torch sees no CUDA device (no GPU visible, or no working driver)")
    cupy = None
    try:
        import cupy  # noqa: F811 - probed on purpose, only here
        env.cupy = cupy.__version__
    except Exception as e:  # noqa: BLE001 - ImportError or a broken CUDA library underneath
        env.cupy_error = _short(e)
    if cupy is not None:
        try:
            env.cuda_runtime = int(cupy.cuda.runtime.runtimeGetVersion())
        except Exception:  # noqa: BLE001 - reported as unknown
            pass
        try:
            major, minor = cupy.cuda.nvrtc.getVersion()
            env.nvrtc = f"{major}.{minor}"
        except Exception as e:  # noqa: BLE001 - libnvrtc missing or unloadable
            env.nvrtc_error = _short(e)
    try:
        import nvidia.dali as dali
        env.dali = dali.__version__
    except Exception as e:  # noqa: BLE001
        env.dali_error = _short(e)
    env.driver = _driver_version(cupy)
    if device.type == "cuda" and env.cuda_available:
        p = torch.cuda.get_device_properties(device)
        env.gpu_name, env.capability = p.name, (int(p.major), int(p.minor))
        env.sm_count, env.memory_gib = int(p.multi_processor_count), p.total_memory / 2**30
    return env


# ================================================================================== fatbin
#: first four bytes of a CUDA fatbin container (little-endian 0xBA55ED50)
FATBIN_MAGIC = 0xBA55ED50
_ENTRY_KINDS = {1: "ptx", 2: "sass"}


@dataclass(frozen=True)
class FatbinEntry:
    """One code object in a fatbin.

    Attributes:
        kind: ``"sass"`` (machine code for one architecture), ``"ptx"`` (virtual code the driver
            compiles for the device at load time) or ``"other"``.
        arch: architecture number: 90 for sm_90 SASS or compute_90 PTX.
        version: for PTX, the PTX ISA version (major, minor), which fixes the oldest driver able to
            compile it (:func:`ptx_min_cuda`); for SASS, the cubin format version.
        compressed: whether the payload is compressed (nvcc does this for large entries).
    """

    kind: str
    arch: int
    version: tuple[int, int]
    compressed: bool

    @property
    def name(self) -> str:
        return f"{'compute' if self.kind == 'ptx' else 'sm'}_{self.arch}"


def parse_fatbin(data: bytes) -> list[FatbinEntry]:
    """The code objects of a fatbin file (one or several containers back to back).

    Layout read: a 16-byte container header (``<IHHQ``: magic, version, header size, body size),
    then entries, each a header (``<HHIQ`` kind, flags, header size, payload size; at offset 16
    ``<IIHHI`` compressed size, a reserved word, minor, major, arch) and its payload.

    Raises:
        ValueError: not a fatbin, or truncated.
    """
    entries: list[FatbinEntry] = []
    off = 0
    if len(data) < 16:
        raise ValueError(f"not a CUDA fatbin: {len(data)} bytes, shorter than its 16-byte header")
    while off + 16 <= len(data):
        magic, _, header, body = struct.unpack_from("<IHHQ", data, off)
        if magic != FATBIN_MAGIC:
            rest = data[off:]
            skip = len(rest) - len(rest.lstrip(b"\0"))
            if entries and skip == len(rest):       # zero padding after the last container
                break
            if entries and skip:                    # zero padding between containers
                off += skip
                continue
            raise ValueError(f"not a CUDA fatbin: magic {magic:#010x} at byte {off}, expected "
                             f"{FATBIN_MAGIC:#010x}")
        pos, end = off + header, off + header + body
        if end > len(data):
            raise ValueError(f"truncated fatbin: the container at byte {off} needs {end} bytes, "
                             f"the file has {len(data)}")
        while pos < end:
            if pos + 32 > end:
                raise ValueError(f"truncated fatbin entry header at byte {pos}")
            kind, _, eh, size = struct.unpack_from("<HHIQ", data, pos)
            csize, _, minor, major, arch = struct.unpack_from("<IIHHI", data, pos + 16)
            if eh < 32 or pos + eh + size > end:
                raise ValueError(f"corrupt fatbin entry at byte {pos}: header {eh} B, payload {size} B")
            entries.append(FatbinEntry(_ENTRY_KINDS.get(kind, "other"), int(arch),
                                       (int(major), int(minor)), csize != 0))
            pos += eh + size
        off = end
    return entries


def read_fatbin(path: str | Path) -> list[FatbinEntry]:
    """:func:`parse_fatbin` of a file."""
    return parse_fatbin(Path(path).read_bytes())


#: PTX ISA version -> first CUDA version (driver) that loads it (NVIDIA's PTX release history)
_PTX_CUDA = {(7, 0): 11000, (7, 1): 11010, (7, 2): 11020, (7, 3): 11030, (7, 4): 11040,
             (7, 5): 11050, (7, 6): 11060, (7, 7): 11070, (7, 8): 11080, (8, 0): 12000,
             (8, 1): 12010, (8, 2): 12020, (8, 3): 12030, (8, 4): 12040, (8, 5): 12050,
             (8, 6): 12070, (8, 7): 12080, (8, 8): 12090}


def ptx_min_cuda(version: tuple[int, int]) -> int | None:
    """The oldest driver CUDA version (e.g. 13000) that compiles PTX of ISA ``version``; PTX ISA
    9.m came with CUDA 13.m. None for versions before 7.0 (not built by supported toolkits)."""
    if version in _PTX_CUDA:
        return _PTX_CUDA[version]
    major, minor = version
    if major >= 9:
        return (major + 4) * 1000 + 10 * minor
    return None


def sass_runs_on(arch: int, capability: tuple[int, int]) -> bool:
    """Whether sm_``arch`` machine code runs on a device of ``capability``: same major version,
    minor at least the code's (sm_80 runs on 8.6 and 8.9; sm_90 does not run on 10.0)."""
    return arch // 10 == capability[0] and arch % 10 <= capability[1]


def describe_fatbin(entries: Sequence[FatbinEntry]) -> str:
    """One line: ``sm_80 sm_90 SASS + compute_90 PTX (ISA 9.0, needs a CUDA >= 13.0 driver)``."""
    sass = sorted({e.arch for e in entries if e.kind == "sass"})
    ptx = sorted({(e.arch, e.version) for e in entries if e.kind == "ptx"})
    parts = []
    if sass:
        parts.append(" ".join(f"sm_{a}" for a in sass) + " SASS")
    for arch, v in ptx:
        need = ptx_min_cuda(v)
        parts.append(f"compute_{arch} PTX (ISA {v[0]}.{v[1]}"
                     + (f", needs a CUDA >= {_cuda_version(need)} driver)" if need else ")"))
    return " + ".join(parts) if parts else "no code objects"


# ================================================================================== backend choice
@dataclass
class BuildVerdict:
    """Whether one build of the kernels can run: ``ok`` None when unknown (no device to judge by)."""

    ok: bool | None
    why: str


@dataclass
class BackendDiagnosis:
    """What ``backend="auto"`` runs and why.

    Attributes:
        backend: ``"cuda"`` (the kernels) or ``"torch"``.
        build: ``"fatbin"`` or ``"source"`` (NVRTC) when the kernels run, else None.
        reason: one line saying why.
        fatbin, source: the verdict on each build.
        observed: True when the outcome was seen (the kernels loaded or failed on this GPU), False
            when it is a prediction from the facts.
    """

    backend: str
    build: str | None
    reason: str
    fatbin: BuildVerdict
    source: BuildVerdict
    observed: bool = False


def _fatbin_verdict(has_fatbin: bool, entries: Sequence[FatbinEntry] | None, fatbin_error: str | None,
                    capability: tuple[int, int] | None, driver: int | None,
                    stale: Sequence[str] = ()) -> BuildVerdict:
    if not has_fatbin and stale:
        return BuildVerdict(False, f"no fatbin built from this kernel source (ignored: "
                                   f"{', '.join(stale)}, built from another version of it)")
    if not has_fatbin:
        return BuildVerdict(False, "no prebuilt fatbin (setup.py builds one when nvcc is present)")
    if fatbin_error is not None or entries is None:
        return BuildVerdict(False, f"the fatbin cannot be read: {fatbin_error}")
    desc = describe_fatbin(entries)
    if capability is None:
        return BuildVerdict(None, f"fatbin holds {desc}")
    dev = capability[0] * 10 + capability[1]
    runs = sorted(e.arch for e in entries if e.kind == "sass" and sass_runs_on(e.arch, capability))
    if runs:
        return BuildVerdict(True, f"fatbin has sm_{runs[-1]} SASS, which runs on this sm_{dev} device")
    ptx = sorted((e for e in entries if e.kind == "ptx" and e.arch <= dev), key=lambda e: e.arch)
    if not ptx:
        return BuildVerdict(False, f"fatbin arch mismatch: it holds {desc}; this device is sm_{dev}: "
                                   f"no SASS it runs and no PTX for an architecture <= {dev}")
    p = ptx[-1]
    need = ptx_min_cuda(p.version)
    if need is not None and driver is not None and driver < need:
        return BuildVerdict(False, f"driver too old for the fatbin's PTX: no SASS for sm_{dev}, and "
                                   f"its {p.name} PTX (ISA {p.version[0]}.{p.version[1]}) needs a "
                                   f"driver for CUDA >= {_cuda_version(need)}; this driver supports "
                                   f"CUDA {_cuda_version(driver)}")
    return BuildVerdict(True, f"no SASS for sm_{dev}: the driver compiles the fatbin's {p.name} PTX "
                              f"at the first load")


def _source_verdict(has_source: bool, nvrtc_error: str | None, nvrtc: str | None) -> BuildVerdict:
    if not has_source:
        return BuildVerdict(False, "the kernel source gpuprune_kernels.cu was not found")
    if nvrtc_error is not None:
        return BuildVerdict(False, f"NVRTC missing: CuPy cannot load libnvrtc ({nvrtc_error})")
    if nvrtc is None:
        return BuildVerdict(None, "NVRTC not probed")
    return BuildVerdict(True, f"NVRTC {nvrtc} compiles the source at first use (CuPy caches it)")


def diagnose_backend(*, device_type: str, cuda_available: bool, cuda_reason: str | None = None,
                     cupy_error: str | None = None, nvrtc: str | None = None,
                     nvrtc_error: str | None = None, capability: tuple[int, int] | None = None,
                     driver: int | None = None, has_fatbin: bool = False,
                     fatbin_entries: Sequence[FatbinEntry] | None = None,
                     fatbin_error: str | None = None, stale_fatbins: Sequence[str] = (),
                     has_source: bool = True, prefer: str = "auto", loaded: str | None = None,
                     load_errors: dict[str, str] | None = None) -> BackendDiagnosis:
    """Which backend ``backend="auto"`` runs, from the facts (a pure function, testable anywhere).

    Args:
        device_type: ``"cpu"`` or ``"cuda"``.
        cuda_available, cuda_reason: whether torch sees a CUDA device, and why not.
        cupy_error: why CuPy does not import (None: it does).
        nvrtc, nvrtc_error: NVRTC's version, or why it does not load.
        capability, driver: the device's compute capability and the driver's CUDA version (13000).
        has_fatbin, fatbin_entries, fatbin_error: the prebuilt fatbin of this source, its
            contents, or why it could not be read.
        stale_fatbins: names of fatbins found that were built from another version of the source
            (the loader ignores them).
        has_source: whether the kernel source is there for NVRTC.
        prefer: the ``GPUPRUNE_KERNELS`` setting (``"auto"``, ``"fatbin"``, ``"source"``).
        loaded: on a GPU, the build that actually loaded (``"fatbin"``/``"source"``), if any.
        load_errors: on a GPU, build -> the error it raised when loaded on its own.
    """
    fat = _fatbin_verdict(has_fatbin, fatbin_entries, fatbin_error, capability, driver,
                          stale_fatbins)
    src = _source_verdict(has_source, nvrtc_error, nvrtc)
    if prefer == "source":
        fat = BuildVerdict(False, f"skipped: GPUPRUNE_KERNELS=source ({fat.why})")
    elif prefer == "fatbin":
        src = BuildVerdict(False, f"skipped: GPUPRUNE_KERNELS=fatbin ({src.why})")
    load_errors = dict(load_errors or {})
    if "fatbin" in load_errors and fat.ok is not False:
        fat = BuildVerdict(False, f"the fatbin failed to load: {load_errors['fatbin']} ({fat.why})")
    if "source" in load_errors and src.ok is not False:
        src = BuildVerdict(False, f"the NVRTC build failed: {load_errors['source']}")

    def torch_because(why: str, observed: bool = False) -> BackendDiagnosis:
        return BackendDiagnosis("torch", None, why, fat, src, observed)

    if device_type != "cuda":
        return torch_because("the device is the CPU: the CUDA kernels run only on a CUDA device")
    if not cuda_available:
        return torch_because(f"no CUDA device: {cuda_reason or 'torch.cuda.is_available() is False'}")
    if cupy_error is not None:
        return torch_because(f"CuPy is not importable ({cupy_error}); install cupy-cuda12x or "
                             f"cupy-cuda13x to run the CUDA kernels")
    if loaded in ("fatbin", "source"):
        why = fat.why if loaded == "fatbin" else f"{src.why}; the fatbin is not used: {fat.why}"
        return BackendDiagnosis("cuda", loaded, f"CUDA kernels, {loaded} build: {why}", fat, src, True)
    if load_errors:
        return torch_because(f"the CUDA kernels failed to load: fatbin: {fat.why}; NVRTC: {src.why}",
                             True)
    if fat.ok:
        return BackendDiagnosis("cuda", "fatbin", f"CUDA kernels, fatbin build: {fat.why}", fat, src)
    if src.ok is not False:
        return BackendDiagnosis("cuda", "source", f"CUDA kernels, NVRTC build: {src.why}; the fatbin "
                                                  f"is not used: {fat.why}", fat, src)
    return torch_because(f"neither kernel build can run: fatbin: {fat.why}; NVRTC: {src.why}")


def _probe_backend(env: Environment, device: torch.device) -> tuple[BackendDiagnosis, str, dict]:
    """Diagnose ``backend="auto"`` on ``device``; on a GPU load each build for real.

    Returns the diagnosis, the backend :func:`gpuprune.backend.get_backend` actually returned, and
    the facts used (for the JSON report).
    """
    import warnings

    from .. import kernels
    from ..backend import get_backend

    fatbin = kernels.find_fatbin()
    source = kernels.find_source()
    pkg = Path(kernels.__file__).resolve().parent
    stale = [] if fatbin is not None else sorted(p.name for p in pkg.glob("gpuprune_kernels*.fatbin"))
    entries, fatbin_error = None, None
    if fatbin is not None:
        try:
            entries = read_fatbin(fatbin)
        except (OSError, ValueError) as e:
            fatbin_error = _short(e)
    prefer = os.environ.get("GPUPRUNE_KERNELS", "auto")
    loaded, load_errors = None, {}
    facts: dict[str, Any] = {"fatbin": str(fatbin) if fatbin else None,
                             "fatbin_entries": [asdict(e) for e in entries or []],
                             "fatbin_error": fatbin_error, "stale_fatbins": stale,
                             "source": str(source) if source else None,
                             "prefer": prefer}
    if device.type == "cuda" and env.cuda_available and env.cupy is not None:
        import cupy
        idx = device.index if device.index is not None else torch.cuda.current_device()
        for kind, path in kernels.module_candidates(prefer=prefer):
            try:
                kernels.load_module(cupy, idx, [(kind, path)])
            except kernels.KernelsUnavailable as e:
                load_errors[kind] = str(e).split(": ", 1)[-1][:400]
        facts["load_errors"] = load_errors
        try:
            loaded = kernels.get_ops(device).runtime.kind
        except kernels.KernelsUnavailable as e:
            facts["get_ops_error"] = str(e)
    diagnosis = diagnose_backend(
        device_type=device.type, cuda_available=env.cuda_available, cuda_reason=env.cuda_reason,
        cupy_error=env.cupy_error, nvrtc=env.nvrtc, nvrtc_error=env.nvrtc_error,
        capability=env.capability, driver=env.driver, has_fatbin=fatbin is not None,
        fatbin_entries=entries, fatbin_error=fatbin_error, stale_fatbins=stale,
        has_source=source is not None,
        prefer=prefer, loaded=loaded, load_errors=load_errors if device.type == "cuda" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # the diagnosis says why
        actual = get_backend("auto", device, 1000).name
    return diagnosis, actual, facts
