"""``gpuprune doctor``: what this machine will run, and a few-second proof that it runs it right.

``gpuprune doctor`` (also ``python -m gpuprune doctor``) prints, in this order:

1. **versions**: python, gpuprune, torch (and the CUDA it was built for), numpy, CuPy (its CUDA
   runtime and NVRTC), DALI and the CUDA driver; then the device (name, compute capability, memory).
2. **backend**: which backend ``backend="auto"`` picks on that device, and why. The reasons it tells
   apart: the device is the CPU, or torch sees no CUDA device; CuPy is not importable; NVRTC (the
   run-time compiler CuPy loads) is missing; the prebuilt fatbin holds neither machine code (SASS)
   the device runs nor PTX it can compile (an arch mismatch); the driver is older than the CUDA that
   wrote the fatbin's PTX. The fatbin's contents are read from the file itself
   (:func:`parse_fatbin`, no cuobjdump needed); on a GPU each build (fatbin, NVRTC) is also loaded
   for real and its error, if any, shown.
3. **self-test** on random data with ties, NaN, +-inf, +-0, denormals and duplicate ids: the observe
   update, exact-k top-k sets, the shuffle order, and whole plans of every built-in policy over
   several epochs, compared bit for bit between each implementation under test and each reference.
   On the CPU the torch backend is checked against :class:`NumpyReference`, an independent
   numpy/pure-Python rendering of the documented formulas (:mod:`gpuprune.keys`,
   :mod:`gpuprune.update`, the policies). On a GPU the kernels are checked against the torch
   backend on the same GPU, the torch backend on the CPU and the numpy reference, and the torch
   backend on the GPU against the last two. Then, when DALI is installed,
   :class:`~gpuprune.dali.PrunedDALIIterator` on a tiny CPU pipeline.

Exit status: 0 when everything it could test agrees; 1 with a one-line reason (the last line)
otherwise; 2 for a usage error. ``--json PATH`` writes every fact and check.

The comparison machinery is injectable (:func:`run_doctor`'s ``candidates`` and ``references``), so a
test can feed a wrong reference or a wrong backend and see the doctor fail. ``import gpuprune`` does
not import this module; this module imports CuPy and DALI only inside the functions that probe them.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = [
    "Environment", "collect_environment", "FatbinEntry", "FATBIN_MAGIC", "parse_fatbin",
    "read_fatbin", "ptx_min_cuda", "sass_runs_on", "describe_fatbin", "BuildVerdict",
    "BackendDiagnosis", "diagnose_backend", "Disagreement", "Implementation",
    "BackendImplementation", "NumpyReference", "RunSpec", "CheckResult", "SelfTest",
    "check_dali", "run_doctor", "add_arguments", "run_from_args", "main",
]

_F32_MAX = float(np.finfo(np.float32).max)
_M32 = 0xFFFFFFFF


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

    from . import kernels
    from .backend import get_backend

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


# ================================================================================== implementations
class Disagreement(AssertionError):
    """An implementation broke a contract on its own (wrong dtype, wrong count)."""


@dataclass(frozen=True)
class RunSpec:
    """One Pruner run of the plan check: every setting that fixes its plans."""

    policy: str
    num_samples: int = 300
    keep: float = 0.5
    num_epochs: int = 6
    warmup_epochs: int = 0
    seed: int = 0
    decay: float | None = None
    settings: tuple[tuple[str, Any], ...] = ()

    def settings_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def label(self) -> str:
        extra = ", ".join(f"{k}={'<scores>' if k == 'scores' else v}" for k, v in self.settings)
        return (f"{self.policy}({extra}) N={self.num_samples} keep={self.keep} epochs="
                f"{self.num_epochs} warmup={self.warmup_epochs} seed={self.seed}")


class Implementation:
    """One way to compute the primitives and plans: a backend under test, or a reference.

    Inputs arrive as CPU tensors; results leave as numpy arrays. Subclass to add an implementation
    or to break one on purpose (the doctor's own tests do).

    Attributes:
        name: shown in every line that compares it.
        ignores_bad_batches: True when a batch holding an out-of-range id is ignored and counted in
            ``invalid_batches`` (the GPU contract); False when ids are checked by the caller (CPU).
    """

    name: str = "implementation"
    ignores_bad_batches: bool = False

    def top_k(self, score: torch.Tensor | None, n: int, k: int, seed: int) -> np.ndarray:
        """Sorted int64 ids of the k largest keys (see :mod:`gpuprune.keys`)."""
        raise NotImplementedError

    def shuffle(self, ids: torch.Tensor, seed: int) -> np.ndarray:
        """``ids`` (unique) in shuffle order."""
        raise NotImplementedError

    def new_state(self, n: int) -> Any:
        """Fresh statistics of n samples."""
        raise NotImplementedError

    def observe(self, state: Any, ids: torch.Tensor, losses: torch.Tensor, decay: float,
                epoch: int) -> None:
        """Apply one batch to ``state``."""
        raise NotImplementedError

    def arrays(self, state: Any) -> dict[str, np.ndarray]:
        """``mean``, ``var`` (float32), ``last_epoch`` (int32), ``nonfinite`` and
        ``invalid_batches`` (int64 scalars) of ``state``."""
        raise NotImplementedError

    def start(self, spec: RunSpec) -> Any:
        """A run: an object with ``plan(epoch) -> (ids in order, float32 weight per entry)``,
        ``observe(ids, losses)`` and ``arrays()``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class BackendImplementation(Implementation):
    """A :class:`gpuprune.backend.Backend` (torch or the kernels), and Pruners that use it."""

    def __init__(self, backend, name: str | None = None) -> None:
        self.backend = backend
        self.device = torch.device(backend.device)
        kind = "CUDA kernels" if backend.name == "cuda" else f"{backend.name} backend"
        self.name = name or f"{kind} ({self.device.type})"
        self.ignores_bad_batches = self.device.type == "cuda"

    def top_k(self, score, n, k, seed):
        from .plan import index_dtype
        out = self.backend.top_k(None if score is None else score.to(self.device), n, k, seed)
        if out.dtype != index_dtype(n) or out.dim() != 1 or out.device != self.device:
            raise Disagreement(f"{self.name}: top_k(N={n}, k={k}) returned a {tuple(out.shape)} "
                               f"{out.dtype} tensor on {out.device}, expected 1-D {index_dtype(n)} "
                               f"on {self.device}")
        return np.sort(out.cpu().numpy().astype(np.int64))

    def shuffle(self, ids, seed):
        return self.backend.shuffle(ids.to(self.device), seed).cpu().numpy().astype(np.int64)

    def new_state(self, n):
        from .stats import LossStats
        return LossStats(n, self.device)

    def observe(self, state, ids, losses, decay, epoch):
        # exact=True: the torch backend on CUDA then adds 3+ copies of an id in batch order, as the
        # kernels and the CPU always do (without it CUDA's atomics make the low bits vary)
        self.backend.observe_(state.tensors(), ids.to(self.device), losses.to(self.device), decay,
                              epoch, exact=True)

    def arrays(self, state):
        return {name: getattr(state, name).cpu().numpy() for name in
                ("mean", "var", "last_epoch", "nonfinite", "invalid_batches")}

    def start(self, spec):
        return _PrunerRun(self, spec)


def _policy_object(spec: RunSpec):
    from .policies import POLICIES
    settings = spec.settings_dict()
    if "scores" in settings:
        settings["scores"] = torch.as_tensor(np.asarray(settings["scores"], dtype=np.float32))
    return POLICIES[spec.policy](**settings)


class _PrunerRun:
    """A real :class:`~gpuprune.Pruner` on the implementation's device and backend."""

    def __init__(self, impl: BackendImplementation, spec: RunSpec) -> None:
        from .pruner import Pruner
        self.impl = impl
        self.pruner = Pruner(spec.num_samples, keep=spec.keep, policy=_policy_object(spec),
                             num_epochs=spec.num_epochs, warmup_epochs=spec.warmup_epochs,
                             decay=spec.decay, seed=spec.seed, device=impl.device,
                             process_group=None, backend="torch")
        self.pruner.backend = impl.backend          # the backend under test, whatever it is

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.pruner.plan(epoch)
        return (p.indices.cpu().numpy().astype(np.int64),
                p.weights_of(p.indices).cpu().numpy().astype(np.float32))

    def observe(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        dev = self.impl.device
        self.pruner.observe(ids.to(dev), losses.to(dev))

    def arrays(self) -> dict[str, np.ndarray]:
        return self.impl.arrays(self.pruner.stats)


class NumpyReference(Implementation):
    """An independent, slow rendering of the documented formulas in numpy and plain Python.

    * keys: ``hash32(i, seed) = fmix32(fmix32(i ^ lo) ^ hi)`` (MurmurHash3's finaliser, in uint64
      arithmetic with masks) and a float order word built the classic radix way (flip all bits of a
      negative float, set the sign bit of a positive one; NaN counted as -inf, -0 as +0), unlike the
      library's signed-int form; top-k is a full ``argsort`` of the 64-bit keys;
    * shuffle: ids sorted by their hash;
    * observe: a Python loop per sample with the merge formulas of :mod:`gpuprune.update` in float64
      (sums in batch order, ``a = 1 - decay ** c``), rounded to float32 once;
    * plans: each policy's documented rule, written out again (UCB's score in float32 arithmetic,
      InfoBatch's mean with ``math.fsum``). Only the host-side seed draws are shared with the
      library (:mod:`gpuprune.rng`): they involve no backend.
    """

    name = "numpy reference"
    ignores_bad_batches = True

    # ---------------------------------------------------------------- keys
    @staticmethod
    def fmix32(h: np.ndarray) -> np.ndarray:
        h = h.astype(np.uint64) & np.uint64(_M32)
        h ^= h >> np.uint64(16)
        h = (h * np.uint64(0x85EBCA6B)) & np.uint64(_M32)
        h ^= h >> np.uint64(13)
        h = (h * np.uint64(0xC2B2AE35)) & np.uint64(_M32)
        return h ^ (h >> np.uint64(16))

    def hash32(self, ids: np.ndarray, seed: int) -> np.ndarray:
        seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        lo, hi = np.uint64(seed & _M32), np.uint64(seed >> 32)
        return self.fmix32(self.fmix32(ids.astype(np.uint64) ^ lo) ^ hi)

    @staticmethod
    def order_word(score: np.ndarray) -> np.ndarray:
        s = np.array(score, dtype=np.float32)
        s[np.isnan(s)] = -np.inf
        s[s == 0] = 0.0                                  # -0 counts as +0
        u = s.view(np.uint32).astype(np.uint64)
        neg = (u & np.uint64(0x80000000)) != 0
        return np.where(neg, ~u & np.uint64(_M32), u | np.uint64(0x80000000))

    def keys(self, score: np.ndarray | None, n: int, seed: int) -> np.ndarray:
        h = self.hash32(np.arange(n, dtype=np.uint64), seed)
        return h if score is None else (self.order_word(score) << np.uint64(32)) | h

    def top_k_np(self, score: np.ndarray | None, n: int, k: int, seed: int) -> np.ndarray:
        if k == 0:
            return np.empty(0, dtype=np.int64)
        order = np.argsort(self.keys(score, n, seed), kind="stable")
        return np.sort(order[n - k:]).astype(np.int64)

    def shuffle_np(self, ids: np.ndarray, seed: int) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return ids[np.argsort(self.hash32(ids, seed), kind="stable")]

    def top_k(self, score, n, k, seed):
        return self.top_k_np(None if score is None else score.numpy(), n, k, seed)

    def shuffle(self, ids, seed):
        return self.shuffle_np(ids.numpy(), seed)

    # ---------------------------------------------------------------- observe
    def new_state(self, n):
        return {"mean": np.zeros(n, np.float32), "var": np.zeros(n, np.float32),
                "last_epoch": np.full(n, -1, np.int32), "nonfinite": np.zeros((), np.int64),
                "invalid_batches": np.zeros((), np.int64)}

    @staticmethod
    def prepare(losses: torch.Tensor) -> np.ndarray:
        """float32 losses: float64 finite values saturate at +-FLT_MAX, the rest are exact."""
        if losses.dtype == torch.float64:
            x = losses.numpy()
            with np.errstate(invalid="ignore"):
                x = np.where(np.isfinite(x), np.clip(x, -_F32_MAX, _F32_MAX), x)
            return x.astype(np.float32)
        return losses.float().numpy()                   # fp16/bf16 widen exactly

    def observe(self, state, ids, losses, decay, epoch):
        n = state["mean"].size
        idx = ids.long().numpy()
        if idx.size == 0:
            return
        if idx.min() < 0 or idx.max() >= n:
            state["invalid_batches"] += 1                 # the GPU contract: the batch is ignored
            return
        groups: dict[int, list[float]] = {}
        for i, v in zip(idx.tolist(), self.prepare(losses).tolist()):
            if math.isfinite(v):
                groups.setdefault(i, []).append(v)
            else:
                state["nonfinite"] += 1
        mean, var, last = state["mean"], state["var"], state["last_epoch"]
        for i, xs in groups.items():
            mu, v0, c = float(mean[i]), float(var[i]), len(xs)
            s1 = s2 = 0.0
            for x in xs:
                d = x - mu
                s1 += d
                s2 += d * d
            dm = s1 / c
            within = max(s2 / c - dm * dm, 0.0)
            a = 1.0 - decay ** c if last[i] >= 0 else 1.0
            mean[i] = np.float32(mu + a * dm)
            var[i] = np.float32(min((1.0 - a) * v0 + a * within + a * (1.0 - a) * dm * dm, _F32_MAX))
            last[i] = epoch

    def arrays(self, state):
        return {k: np.array(v) for k, v in state.items()}

    def start(self, spec):
        return _NumpyRun(self, spec)


class _NumpyRun:
    """The Pruner's documented behaviour for one run, written out with :class:`NumpyReference`."""

    def __init__(self, ref: NumpyReference, spec: RunSpec) -> None:
        self.ref, self.spec = ref, spec
        n, e = spec.num_samples, spec.num_epochs
        # settings made concrete by the policy object (defaults from the budget), its default
        # decay and its full-data epochs at the end: schedule facts, the same on every backend
        policy = _policy_object(spec).resolve(spec.keep, n, e)
        self.settings = {**policy.settings(), **spec.settings_dict()}
        self.k = n if spec.policy == "full" else max(1, math.floor(spec.keep * n + 0.5))
        self.final_full = policy.final_full_epochs(e)
        self.decay = policy.default_decay if spec.decay is None else spec.decay
        self.state = ref.new_state(n)
        self.current: tuple[np.ndarray, np.ndarray, bool] | None = None   # ids, weight map, full
        self.epoch = 0

    def _full(self, e: int) -> bool:
        s = self.spec
        return s.policy == "full" or e < s.warmup_epochs or e >= s.num_epochs - self.final_full

    def _select(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        from .rng import draw_seeds, epoch_generator
        ref, s, st, n, k = self.ref, self.spec, self.state, self.spec.num_samples, self.k
        mean, var, seen = st["mean"], st["var"], st["last_epoch"] >= 0
        gen = epoch_generator(s.seed, 0 if s.policy == "static" else e)
        ones = np.ones(n, np.float32)
        if s.policy == "uniform":
            (seed,) = draw_seeds(gen, 1)
            return ref.top_k_np(None, n, k, seed), ones
        if s.policy == "epsilon_greedy":
            s0, s1 = draw_seeds(gen, 2)
            score = np.where(seen, mean, np.float32(np.inf)).astype(np.float32)
            m = math.floor(self.settings.get("epsilon", 0.1) * k)
            exploit = ref.top_k_np(score, n, k - m, s0)
            if m == 0:
                return exploit, ones
            rest = np.zeros(n, np.float32)
            rest[exploit] = -np.inf
            return np.concatenate([exploit, ref.top_k_np(rest, n, m, s1)]), ones
        if s.policy == "ucb":
            (seed,) = draw_seeds(gen, 1)
            v = np.maximum(var, np.float32(0))
            drift = float(self.settings.get("drift", 0.0))
            if drift > 0.0:                    # var + drift * mean seen var * epochs unobserved
                vbar = math.fsum(v[seen].astype(np.float64).tolist()) / max(int(seen.sum()), 1)
                age = np.maximum(e - st["last_epoch"].astype(np.float64), 0.0)
                grown = v.astype(np.float64) + (drift * vbar) * age
                v = np.minimum(grown, _F32_MAX).astype(np.float32)
            spread = np.sqrt(v) if self.settings.get("uncertainty", "std") == "std" else v
            with np.errstate(over="ignore"):             # huge means overflow to +inf, as in torch
                score = (mean + np.float32(self.settings.get("c", 1.0)) * spread).astype(np.float32)
            score = np.where(seen, score, np.float32(np.inf)).astype(np.float32)
            return ref.top_k_np(score, n, k, seed), ones
        if s.policy == "infobatch":
            (seed,) = draw_seeds(gen, 1)
            ratio = self.settings["ratio"]
            q = min(1.0, max(self.settings.get("min_keep", 0.0), 1.0 - ratio))   # kept share
            s64 = mean.astype(np.float64)
            m = math.fsum(s64[seen].tolist()) / max(int(seen.sum()), 1)
            below = seen & (s64 < m)
            n_below = int(below.sum())
            kept = n - n_below + math.floor(q * n_below)
            rank = np.where(below, np.float32(0), np.float32(1)).astype(np.float32)
            wmap = np.where(below, np.float32(1.0 / q), np.float32(1)).astype(np.float32)
            return ref.top_k_np(rank, n, kept, seed), wmap
        if s.policy == "static":
            (seed,) = draw_seeds(gen, 1)
            scores = self.settings.get("scores")
            scores = None if scores is None else np.asarray(scores, dtype=np.float32)
            return ref.top_k_np(scores, n, k, seed), ones
        raise ValueError(f"the numpy reference does not know policy {s.policy!r}")

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        from .pruner import _SHUFFLE_STREAM
        from .rng import draw_seeds, epoch_generator
        n = self.spec.num_samples
        full = self._full(epoch)
        cur = self.current
        if full:
            ids, wmap = np.arange(n, dtype=np.int64), np.ones(n, np.float32)
        elif cur is None or cur[2] or self.spec.policy != "static":
            ids, wmap = self._select(epoch)
        else:
            ids, wmap = cur[0], cur[1]
        (shuffle_seed,) = draw_seeds(epoch_generator(self.spec.seed, epoch, _SHUFFLE_STREAM), 1)
        order = self.ref.shuffle_np(ids, shuffle_seed)
        self.current, self.epoch = (ids, wmap, full), epoch
        return order, wmap[order]

    def observe(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        self.ref.observe(self.state, ids, losses, self.decay, self.epoch)

    def arrays(self) -> dict[str, np.ndarray]:
        return self.ref.arrays(self.state)


# ================================================================================== random data
_SPECIALS = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39,
                      1.1754944e-38, _F32_MAX, -_F32_MAX, 1.0, -1.0], dtype=np.float32)


def _scores(kind: str, n: int, rng: np.random.Generator) -> np.ndarray | None:
    """Scores of one kind: ``none`` (no score: a uniform draw), ``random``, ``ties`` (3 values),
    ``constant``, ``special`` (NaN, +-inf, +-0, denormals, +-FLT_MAX among random values)."""
    if kind == "none":
        return None
    if kind == "random":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "ties":
        return rng.choice(np.array([0.25, 1.5, -2.0], np.float32), n)
    if kind == "constant":
        return np.full(n, 0.75, np.float32)
    s = rng.standard_normal(n).astype(np.float32)
    pick = rng.random(n) < 0.5
    s[pick] = rng.choice(_SPECIALS, int(pick.sum()))
    return s


def _losses(rng: np.random.Generator, b: int, dtype: torch.dtype, huge: bool = True) -> torch.Tensor:
    """Batch losses: mostly in [0, 5), some negative, NaN, +-inf, +-0, denormal, and (``huge``)
    some of magnitude 1e30..3e38 (float64: also 1e300, which saturates)."""
    x = (rng.random(b) * 5.0).astype(np.float64)
    u = rng.random(b)
    x[u < 0.10] = -x[u < 0.10]
    x[(u >= 0.10) & (u < 0.16)] = np.nan
    x[(u >= 0.16) & (u < 0.19)] = np.inf
    x[(u >= 0.19) & (u < 0.21)] = -np.inf
    x[(u >= 0.21) & (u < 0.25)] = rng.choice(np.array([1e-45, -1e-45, 1e-40, 2e-39, 0.0, -0.0]),
                                             int(((u >= 0.21) & (u < 0.25)).sum()))
    if huge:
        x[(u >= 0.25) & (u < 0.27)] = rng.choice(np.array([3e38, -3e38, 1e30]),
                                                 int(((u >= 0.25) & (u < 0.27)).sum()))
    if dtype == torch.float64 and huge:
        x[(u >= 0.27) & (u < 0.30)] = rng.choice(np.array([1e300, -1e300, 3.5e38]),
                                                 int(((u >= 0.27) & (u < 0.30)).sum()))
        return torch.from_numpy(x)
    return torch.from_numpy(x.astype(np.float32)).to(dtype)


def _dup_ids(rng: np.random.Generator, n: int, b: int, max_copies: int) -> torch.Tensor:
    """b ids in [0, n) in random order, about 3 copies of each on average, at most ``max_copies``."""
    distinct = rng.permutation(n)[:max(1, min(n, b // 3))]
    if b > distinct.size * max_copies:
        raise ValueError(f"cannot draw {b} ids from {distinct.size} with at most {max_copies} copies")
    pool = np.repeat(distinct, max_copies)
    return torch.from_numpy(rng.choice(pool, b, replace=False).astype(np.int64))


# ================================================================================== the self-test
@dataclass
class CheckResult:
    """One check of the self-test: its name, whether every comparison agreed, how many were made,
    and the first disagreement (or a summary)."""

    name: str
    ok: bool
    detail: str
    comparisons: int = 0
    seconds: float = 0.0


def _first_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.flatnonzero(a != b)[0])


def _bits_repr(v: np.floating) -> str:
    return f"{float(v)!r} ({np.float32(v).view(np.uint32):#010x})"


def _compare_states(a: dict, b: dict) -> str | None:
    """None when two statistics are bit-identical, else what differs."""
    for name in ("mean", "var"):
        x, y = a[name].view(np.uint32), b[name].view(np.uint32)
        if x.shape != y.shape or not np.array_equal(x, y):
            i = _first_diff(x, y)
            return (f"{name} differs at {int((x != y).sum())} of {x.size} samples; first at id {i}: "
                    f"{_bits_repr(a[name][i])} vs {_bits_repr(b[name][i])}")
    if not np.array_equal(a["last_epoch"], b["last_epoch"]):
        i = _first_diff(a["last_epoch"], b["last_epoch"])
        return f"last_epoch differs at id {i}: {a['last_epoch'][i]} vs {b['last_epoch'][i]}"
    for name in ("nonfinite", "invalid_batches"):
        if int(a[name]) != int(b[name]):
            return f"{name} differs: {int(a[name])} vs {int(b[name])}"
    return None


def _compare_ids(what: str, a: np.ndarray, b: np.ndarray) -> str | None:
    if a.shape == b.shape and np.array_equal(a, b):
        return None
    if a.shape != b.shape:
        return f"{what}: {a.size} ids vs {b.size} ids"
    i = _first_diff(a, b)
    return f"{what}: {int((a != b).sum())} of {a.size} positions differ; first at {i}: {a[i]} vs {b[i]}"


class SelfTest:
    """Compare implementations under test with references on random data, bit for bit.

    Args:
        candidates: the implementations under test (e.g. the CUDA kernels).
        references: what they must agree with (e.g. :class:`NumpyReference`).
        seed: seed of all random data (numpy ``default_rng``; no global RNG).
        scale: ``"small"`` (CPU: N up to ~4e3, a few seconds) or ``"gpu"`` (adds N = 1e5 and 1e6 to
            the top-k cases and a batch past the kernels' 2048-id one-block path).

    Every check stops at its first disagreement and names the two implementations and the case.
    """

    def __init__(self, candidates: Sequence[Implementation], references: Sequence[Implementation],
                 *, seed: int = 0, scale: str = "small") -> None:
        if not candidates or not references:
            raise ValueError("the self-test needs at least one candidate and one reference")
        self.candidates, self.references = list(candidates), list(references)
        self.seed, self.scale = int(seed), scale

    def pairs(self):
        for c in self.candidates:
            for r in self.references:
                if c is not r:
                    yield c, r

    def run(self) -> list[CheckResult]:
        out = []
        for name, fn in (("observe", self.check_observe), ("top_k", self.check_top_k),
                         ("shuffle", self.check_shuffle), ("plans", self.check_plans)):
            t0 = time.perf_counter()
            try:
                ok, detail, count = fn()
            except Exception as e:  # noqa: BLE001 - a crash is a failed check, with its reason
                ok, detail, count = False, f"raised {_short(e)}", 0
            out.append(CheckResult(name, ok, detail, count, time.perf_counter() - t0))
        return out

    # ---------------------------------------------------------------- observe
    def _observe_scenarios(self):
        """(N, decay, batches): each batch (ids, losses, epoch), duplicates up to 8 copies."""
        rng = np.random.default_rng([self.seed, 1])
        plans = [(1, 0.9, (1, 3, 8)), (5, 0.0, (4, 9, 30)), (300, 0.9, (1, 7, 64, 600)),
                 (300, 0.5, (64, 250)), (2000, 0.99, (128, 2500))]
        if self.scale == "gpu":
            plans.append((50_000, 0.9, (4096, 20_000)))
        dtypes = (torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16)
        for n, decay, sizes in plans:
            batches, epoch = [], 0
            for j in range(3 * len(sizes)):
                b = sizes[j % len(sizes)]
                ids = _dup_ids(rng, n, b, max_copies=8)
                batches.append((ids, _losses(rng, b, dtypes[j % len(dtypes)]), epoch))
                epoch += j % 2
            yield n, decay, batches

    def check_observe(self) -> tuple[bool, str, int]:
        count = 0
        for n, decay, batches in self._observe_scenarios():
            for cand, ref in self.pairs():
                sc, sr = cand.new_state(n), ref.new_state(n)
                bad_ids = cand.ignores_bad_batches and ref.ignores_bad_batches
                extra = [(torch.tensor([0, n + 3, 1]), torch.ones(3), 9),
                         (torch.tensor([-1]), torch.ones(1), 9)] if bad_ids else []
                for j, (ids, losses, epoch) in enumerate(batches + extra):
                    cand.observe(sc, ids, losses, decay, epoch)
                    ref.observe(sr, ids, losses, decay, epoch)
                    count += 1
                    diff = _compare_states(cand.arrays(sc), ref.arrays(sr))
                    if diff:
                        return False, (f"{cand} vs {ref}: N={n} decay={decay}, batch {j} (B="
                                       f"{ids.numel()}, {losses.dtype}, epoch {epoch}): {diff}"), count
        return True, f"{count} batches (duplicate ids, NaN/+-inf/+-0/denormal/huge losses) identical", count

    # ---------------------------------------------------------------- top-k
    def _top_k_cases(self):
        rng = np.random.default_rng([self.seed, 2])
        sizes = [1, 2, 3, 17, 256, 1000, 4099]
        kinds = ["none", "random", "ties", "constant", "special"]
        for n in sizes:
            for kind in kinds:
                score = _scores(kind, n, rng)
                ks = sorted({0, 1 % (n + 1), n // 2, max(n - 1, 0), n, int(rng.integers(0, n + 1))})
                for k in ks:
                    yield n, k, kind, score, int(rng.integers(0, 2**63))
        if self.scale == "gpu":
            for n in (100_000, 1_000_000):
                for kind in ("none", "ties", "special"):
                    score = _scores(kind, n, rng)
                    for k in (1, n // 2, n - 1):
                        yield n, k, kind, score, int(rng.integers(0, 2**63))

    def check_top_k(self) -> tuple[bool, str, int]:
        count, largest = 0, 0
        for n, k, kind, score, seed in self._top_k_cases():
            largest = max(largest, n)
            t = None if score is None else torch.from_numpy(score)
            results = {}
            for impl in self.candidates + self.references:
                results[id(impl)] = impl.top_k(t, n, k, seed)
            for cand, ref in self.pairs():
                count += 1
                diff = _compare_ids("sets differ", results[id(cand)], results[id(ref)])
                if diff:
                    return False, f"{cand} vs {ref}: N={n} k={k} scores={kind} seed={seed}: {diff}", count
        return True, (f"{count} exact-k selections (N 1..{largest}, ties, NaN/+-inf/+-0/denormals) "
                      f"identical"), count

    # ---------------------------------------------------------------- shuffle
    def check_shuffle(self) -> tuple[bool, str, int]:
        rng = np.random.default_rng([self.seed, 3])
        count = 0
        for n in (1, 2, 5, 100, 4097):
            for _ in range(3):
                ids = rng.permutation(n * 3)[:n].astype(np.int64)
                seed = int(rng.integers(0, 2**63))
                other = torch.from_numpy(rng.permutation(ids))       # same set, other order
                for cand, ref in self.pairs():
                    count += 1
                    a = cand.shuffle(torch.from_numpy(ids), seed)
                    b = ref.shuffle(other, seed)
                    diff = _compare_ids("orders differ", a, b)
                    if diff:
                        return False, f"{cand} vs {ref}: {n} ids, seed={seed}: {diff}", count
        return True, f"{count} shuffles identical (the order depends only on the set and the seed)", count

    # ---------------------------------------------------------------- plans
    def _run_specs(self) -> list[RunSpec]:
        rng = np.random.default_rng([self.seed, 4])
        static_scores = tuple(float(v) for v in _scores("special", 300, rng))
        s = self.seed
        return [
            RunSpec("full", 300, 1.0, 3, seed=s + 1),
            RunSpec("uniform", 300, 0.5, 5, warmup_epochs=1, seed=s + 2),
            RunSpec("epsilon_greedy", 300, 0.3, 5, seed=s + 3, settings=(("epsilon", 0.25),)),
            RunSpec("ucb", 300, 0.5, 5, seed=s + 4),
            RunSpec("ucb", 1000, 0.5, 4, seed=s + 5, decay=0.5,
                    settings=(("c", 2.0), ("uncertainty", "var"))),
            RunSpec("ucb", 300, 0.5, 5, seed=s + 9, settings=(("drift", 0.5),)),
            RunSpec("infobatch", 300, 0.5, 8, seed=s + 6),
            RunSpec("infobatch", 300, 0.05, 4, seed=s + 10, decay=0.9),
            RunSpec("static", 300, 0.5, 4, warmup_epochs=1, seed=s + 7),
            RunSpec("static", 300, 0.4, 3, seed=s + 8, settings=(("scores", static_scores),)),
        ]

    def check_plans(self) -> tuple[bool, str, int]:
        count = 0
        specs = self._run_specs()
        for spec in specs:
            for cand, ref in self.pairs():
                rc, rr = cand.start(spec), ref.start(spec)
                rng = np.random.default_rng([self.seed, 5, spec.seed])
                for epoch in range(spec.num_epochs):
                    (oc, wc), (orr, wr) = rc.plan(epoch), rr.plan(epoch)
                    count += 1
                    where = f"{cand} vs {ref}: {spec.label()}, epoch {epoch}"
                    diff = _compare_ids("plans differ", oc, orr)
                    if diff:
                        return False, f"{where}: {diff}", count
                    if not np.array_equal(wc.view(np.uint32), wr.view(np.uint32)):
                        i = _first_diff(wc, wr)
                        return False, (f"{where}: loss weights differ at plan entry {i} (id {oc[i]}): "
                                       f"{wc[i]} vs {wr[i]}"), count
                    for s in range(0, oc.size, 64):           # the epoch's batches, losses random
                        ids = torch.from_numpy(oc[s:s + 64].copy())
                        if s == 0 and ids.numel() > 1:
                            ids = torch.cat([ids, ids[:1]])     # one id twice in a batch
                        # no huge losses here: a float64 sum over values of +-3e38 and of 1 keeps
                        # only rounding error, so InfoBatch's mean would depend on summation order
                        losses = _losses(rng, ids.numel(), torch.float32, huge=False)
                        rc.observe(ids, losses)
                        rr.observe(ids, losses)
                diff = _compare_states(rc.arrays(), rr.arrays())
                if diff:
                    return False, f"{cand} vs {ref}: {spec.label()}, statistics after the run: {diff}", count
        policies = sorted({s.policy for s in specs})
        return True, f"{count} plans of {', '.join(policies)} identical (order and loss weights)", count


# ================================================================================== DALI
def check_dali(seed: int = 0) -> CheckResult:
    """:class:`~gpuprune.dali.PrunedDALIIterator` on a tiny CPU pipeline: for two epochs of two
    policies, the batches cover the plan exactly once, in plan order, and each sample's data and
    label are those of its id."""
    t0 = time.perf_counter()
    try:
        import gpuprune as gp
        from .dali import ArraySource, build_iterator
    except Exception as e:  # noqa: BLE001
        return CheckResult("dali", True, f"skipped: DALI is not usable ({_short(e, 120)})", 0,
                           time.perf_counter() - t0)
    n, bs = 203, 16
    x = (np.arange(n, dtype=np.int32)[:, None] * np.array([1, -3], np.int32))   # sample i: [i, -3i]
    y = (np.arange(n, dtype=np.int64) * 7 + 1)
    count = 0
    try:
        for policy in ("uniform", "ucb"):
            pruner = gp.Pruner(n, keep=0.3, policy=policy, seed=seed, process_group=None)
            it = build_iterator(pruner, ArraySource(x, y), batch_size=bs, num_threads=1)
            for epoch in range(2):
                it.set_epoch(epoch)
                got, data, labels = [], [], []
                for (b,) in it:
                    got.append(b["index"].numpy().astype(np.int64))
                    data.append(b["data"].numpy())
                    labels.append(b["label"].numpy().reshape(-1))
                    if policy == "ucb":
                        pruner.observe(b["index"], torch.from_numpy(labels[-1] % 5).float())
                ids = np.concatenate(got)
                plan = pruner.plan(epoch).indices.numpy().astype(np.int64)
                count += 1
                where = f"{policy} epoch {epoch}"
                if not np.array_equal(ids, plan):
                    return CheckResult("dali", False, f"{where}: the iterator served {ids.size} ids, "
                                       f"not the plan's {plan.size} in order "
                                       f"({np.setdiff1d(plan, ids).size} planned ids missing)",
                                       count, time.perf_counter() - t0)
                if not (np.array_equal(np.concatenate(data), x[ids])
                        and np.array_equal(np.concatenate(labels), y[ids])):
                    return CheckResult("dali", False, f"{where}: a batch's data or labels are not "
                                       "those of its ids", count, time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        return CheckResult("dali", False, f"raised {_short(e)}", count, time.perf_counter() - t0)
    return CheckResult("dali", True, f"PrunedDALIIterator on a CPU pipeline: {count} epochs, each "
                       "planned sample exactly once, in plan order, with its own data and label",
                       count, time.perf_counter() - t0)


# ================================================================================== the command
def _default_candidates(device: torch.device, diagnosis: BackendDiagnosis) -> list[Implementation]:
    from .backend import TorchBackend, get_backend
    if device.type != "cuda":
        return [BackendImplementation(TorchBackend(device))]
    out: list[Implementation] = []
    if diagnosis.backend == "cuda":
        out.append(BackendImplementation(get_backend("cuda", device, 1000)))
    out.append(BackendImplementation(TorchBackend(device)))
    return out


def _default_references(device: torch.device, candidates: Sequence[Implementation]
                        ) -> list[Implementation]:
    """CPU: the numpy reference. GPU: the torch backend on the same GPU (the very object under test
    as a candidate too, so the kernels are compared with it directly and it is not compared with
    itself), the torch backend on the CPU and the numpy reference."""
    from .backend import TorchBackend
    refs: list[Implementation] = [NumpyReference()]
    if device.type == "cuda":
        refs.insert(0, BackendImplementation(TorchBackend(torch.device("cpu"))))
        same = [c for c in candidates if isinstance(c, BackendImplementation)
                and c.backend.name == "torch" and c.device == device]
        refs[:0] = same[:1]
    return refs


def _resolve(device: str) -> torch.device:
    from ._checks import resolve_device
    if device == "auto":
        return resolve_device("cuda" if torch.cuda.is_available() else "cpu")
    return resolve_device(device)


def run_doctor(device: str = "auto", *, seed: int = 0, dali: bool = True,
               require_kernels: bool = False, json_path: str | Path | None = None,
               candidates: Sequence[Implementation] | None = None,
               references: Sequence[Implementation] | None = None,
               out: Callable[[str], None] | None = None) -> int:
    """Run the doctor; return its exit status (0 all agree, 1 otherwise).

    Args:
        device: ``"auto"`` (CUDA when torch sees it, else the CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``.
        seed: seed of the random test data.
        dali: run the DALI check when DALI is installed.
        require_kernels: fail unless ``backend="auto"`` runs the CUDA kernels (for GPU machines).
        json_path: write every fact and check there as JSON.
        candidates, references: replace the implementations compared (default: the backend(s) of
            the device under test, and the references described in the module docstring).
        out: where lines go (default: print to stdout).
    """
    say = out if out is not None else (lambda line: print(line, flush=True))
    t_start = time.perf_counter()
    report: dict[str, Any] = {"result": "fail", "reason": None}
    try:
        reason = _examine(report, say, device, seed=seed, dali=dali,
                          require_kernels=require_kernels, candidates=candidates,
                          references=references)
    except Exception as e:  # noqa: BLE001 - the doctor's own failure is a failed check too
        reason = f"the doctor could not finish: {_short(e)}"
    seconds = time.perf_counter() - t_start
    report["seconds"] = seconds
    if reason is None:
        report["result"] = "ok"
        n = sum(c["comparisons"] for c in report["checks"])
        say(f"gpuprune doctor: OK: {', '.join(report['candidates'])} bit-identical to "
            f"{', '.join(report['references'])} ({n} comparisons, {seconds:.1f} s)")
    else:
        report["reason"] = reason
        say(f"gpuprune doctor: FAIL: {reason}")
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if reason is None else 1


def _examine(report: dict, say: Callable[[str], None], device: str, *, seed: int, dali: bool,
             require_kernels: bool, candidates: Sequence[Implementation] | None,
             references: Sequence[Implementation] | None) -> str | None:
    """Everything :func:`run_doctor` prints before its verdict; fills ``report``; returns the
    reason of the first failure, or None."""
    reason = None
    try:
        dev = _resolve(device)
    except ValueError as e:
        return str(e)
    env = collect_environment(dev)
    report["environment"] = asdict(env)
    say(f"gpuprune doctor {env.gpuprune}")
    say(f"  python   {env.python} ({env.platform}) | torch {env.torch} (CUDA "
        f"{env.torch_cuda or 'none'}) | numpy {env.numpy}")
    cupy = (f"CuPy {env.cupy} (CUDA runtime {_cuda_version(env.cuda_runtime)}, NVRTC "
            f"{env.nvrtc or 'missing'})" if env.cupy else f"CuPy missing ({env.cupy_error})")
    dali_v = f"DALI {env.dali}" if env.dali else "DALI not installed"
    say(f"  cuda     {cupy} | {dali_v} | driver "
        f"{'CUDA ' + _cuda_version(env.driver) if env.driver else 'none found'}")
    if dev.type == "cuda":
        say(f"  device   {dev}: {env.gpu_name}, compute capability {env.capability[0]}."
            f"{env.capability[1]}, {env.sm_count} SMs, {env.memory_gib:.0f} GiB")
    else:
        say(f"  device   cpu ({'CUDA available but not asked for' if env.cuda_available else env.cuda_reason})")
    diagnosis, actual, facts = _probe_backend(env, dev)
    report["backend"] = {**asdict(diagnosis), "get_backend": actual, **facts}
    if facts["fatbin"]:
        say(f"  fatbin   {facts['fatbin']}: "
            + (describe_fatbin([FatbinEntry(**e) for e in facts["fatbin_entries"]])
               if facts["fatbin_error"] is None else f"unreadable ({facts['fatbin_error']})"))
    say(f"  backend  auto -> {'CUDA kernels' if diagnosis.backend == 'cuda' else 'torch'} on {dev}"
        f" ({'seen' if diagnosis.observed else 'predicted'}): {diagnosis.reason}")
    if diagnosis.backend == "torch" and dev.type == "cuda" or diagnosis.backend == "cuda":
        say(f"           fatbin: {diagnosis.fatbin.why}; NVRTC: {diagnosis.source.why}")
    expected = "cuda" if diagnosis.backend == "cuda" else "torch"
    if actual != expected:
        reason = (f"backend='auto' returned the {actual} backend but the diagnosis says {expected}: "
                  f"{diagnosis.reason}")
    elif require_kernels and diagnosis.backend != "cuda":
        reason = f"--require-kernels: backend='auto' does not run the CUDA kernels: {diagnosis.reason}"

    cands = list(candidates) if candidates is not None else _default_candidates(dev, diagnosis)
    refs = list(references) if references is not None else _default_references(dev, cands)
    say(f"self-test: {', '.join(map(str, cands))} vs {', '.join(map(str, refs))}")
    scale = "gpu" if dev.type == "cuda" else "small"
    checks = SelfTest(cands, refs, seed=seed, scale=scale).run()
    if dali:
        checks.append(check_dali(seed))
    for c in checks:
        say(f"  {'ok  ' if c.ok else 'FAIL'} {c.name:<8} {c.detail} [{c.seconds:.1f} s]")
    report["checks"] = [asdict(c) for c in checks]
    failed = [c for c in checks if not c.ok]
    if failed and reason is None:
        reason = f"{failed[0].name}: {failed[0].detail}"
    report.update(candidates=[str(c) for c in cands], references=[str(r) for r in refs])
    return reason


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The doctor's options (shared by ``gpuprune doctor`` and ``python -m gpuprune.doctor``)."""
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when torch sees a GPU, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random test data")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write every fact and check to this JSON file")
    parser.add_argument("--require-kernels", action="store_true",
                        help="fail unless backend='auto' runs the CUDA kernels (for GPU machines)")
    parser.add_argument("--no-dali", action="store_true", help="skip the DALI iterator check")


def run_from_args(args: argparse.Namespace) -> int:
    """Run with parsed :func:`add_arguments` options."""
    return run_doctor(args.device, seed=args.seed, dali=not args.no_dali,
                      require_kernels=args.require_kernels, json_path=args.json)


def main(argv: list[str] | None = None) -> int:
    """``python -m gpuprune.doctor [options]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="gpuprune doctor", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
