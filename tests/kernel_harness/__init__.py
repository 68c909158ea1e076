"""The concurrency harness: the real kernel source run on the CPU with one OS thread per CUDA thread.

``csrc/harness/`` holds the C++ side (``gp_shim.h`` models CUDA, ``gp_harness.cpp`` runs launches,
``gp_slot.cpp`` compiles the kernels once per slot, ``gp_replay.cpp`` replays traces). This module
builds it with g++ (cached by content hash in a temporary directory), and offers

* :func:`harness_ops`: a :class:`gpuprune.kernels.KernelOps` whose runtime is the harness, so the
  very launch sequences of ``gpuprune/kernels/ops.py`` run through the real kernels, with honest
  grid and block sizes and several blocks at once;
* :class:`RecordingRuntime`: records each launch with its buffers before and after, into a trace that
  ``gp_replay`` (built with ThreadSanitizer or AddressSanitizer, :func:`build_replay`) replays
  and checks bit for bit. A sanitizer cannot be loaded into Python, hence the replay.

Everything is written under ``tempfile.gettempdir()``; nothing is written into the checkout.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

from gpuprune.kernels import KernelOps
from gpuprune.kernels._spec import CONSTANTS, SIGNATURES

__all__ = ["ROOT", "SOURCE", "HARNESS_DIR", "SLOTS", "HarnessError", "find_compiler", "build_library",
           "build_replay", "HarnessRuntime", "RecordingRuntime", "harness_ops", "launch_bounds",
           "replace_function", "replay", "sanitizer_available", "tsan_runtime_available",
           "RACY_PICK_BUCKET", "racy_source"]

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "csrc" / "gpuprune_kernels.cu"
HARNESS_DIR = ROOT / "csrc" / "harness"
#: slots compiled in (blocks that can run at once); a launch may use fewer
SLOTS = 4

_COMMON = ("-std=c++20", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-fast-math",
           "-fno-strict-aliasing", "-Wall", "-Wno-unused-function", "-Wno-unused-variable")
_OPT = ("-O2",)
_TSAN = ("-O1", "-g", "-fsanitize=thread")
_ASAN = ("-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer")
_SANITIZERS = {"thread": _TSAN, "address": _ASAN}


class HarnessError(RuntimeError):
    """A launch broke a rule of the CUDA model (or deadlocked) in the harness."""


def find_compiler() -> str | None:
    """g++ (the harness needs GNU section symbols and C++20 std::atomic_ref): ``$CXX`` or g++."""
    for cand in (os.environ.get("CXX"), "g++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cache_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"gpuprune-harness-{os.getuid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _harness_files() -> list[Path]:
    return sorted(HARNESS_DIR.glob("*.h")) + sorted(HARNESS_DIR.glob("*.cpp"))


def _compile_all(jobs: list[list[str]]) -> None:
    """Run compiler commands, two at a time (the CI machine has two cores)."""
    running: list[tuple[subprocess.Popen, list[str]]] = []
    errors = []
    for cmd in jobs + [None]:
        while running and (cmd is None or len(running) >= max(os.cpu_count() or 1, 1)):
            proc, c = running.pop(0)
            out, err = proc.communicate()
            if proc.returncode:
                errors.append(f"{' '.join(c)}\n{err}")
        if cmd is not None:
            running.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True), cmd))
    if errors:
        raise RuntimeError("harness build failed:\n" + "\n".join(errors)[:20000])


def _build(source_text: str, sanitizer: str | None, slots: int, with_main: bool,
           signatures: dict[str, str] | None = None) -> Path:
    signatures = SIGNATURES if signatures is None else signatures
    cxx = find_compiler()
    if cxx is None:
        raise FileNotFoundError("the harness needs g++ (set CXX)")
    flags = _COMMON + (_SANITIZERS[sanitizer] if sanitizer else _OPT)
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    digest = _digest(source_text, version, " ".join(flags), str(slots), str(with_main),
                     *[p.read_bytes() for p in _harness_files()], repr(sorted(signatures.items())))
    cache = _cache_dir()
    tag = {"thread": "-tsan", "address": "-asan"}.get(sanitizer or "", "")
    name = f"{'replay' if with_main else 'lib'}{tag}-{digest}"
    target = cache / (name if with_main else name + ".so")
    if target.exists():
        return target
    work = Path(tempfile.mkdtemp(prefix=name + ".", dir=cache))
    src = work / "kernels.cu"
    src.write_text(source_text)
    kernels = " ".join(f"X({k})" for k in signatures)
    jobs, objs = [], []
    for s in range(slots):
        obj = work / f"slot{s}.o"
        cmd = [cxx, *flags, f"-I{HARNESS_DIR}", f"-DGPH_SLOT={s}",
               f'-DGPH_SHARED_SECTION="gph_sh{s}"', f"-DGPH_START=__start_gph_sh{s}",
               f"-DGPH_STOP=__stop_gph_sh{s}", f'-DGPH_SOURCE="{src}"', f"-DGPH_KERNELS={kernels}",
               *[f"-D{k}={k}__s{s}" for k in signatures], "-c", str(HARNESS_DIR / "gp_slot.cpp"),
               "-o", str(obj)]
        jobs.append(cmd)
        objs.append(obj)
    units = ["gp_harness.cpp"] + (["gp_replay.cpp"] if with_main else [])
    for unit in units:
        obj = work / (Path(unit).stem + ".o")
        jobs.append([cxx, *flags, f"-I{HARNESS_DIR}", '-DGPH_SHARED_SECTION="gph_unused"', "-c",
                     str(HARNESS_DIR / unit), "-o", str(obj)])
        objs.append(obj)
    _compile_all(jobs)
    out = work / target.name
    link = [cxx, *flags, *map(str, objs), "-o", str(out), "-pthread"]
    if not with_main:
        link.insert(1, "-shared")
    proc = subprocess.run(link, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"harness link failed:\n{proc.stderr[:20000]}")
    os.replace(out, target)
    shutil.rmtree(work, ignore_errors=True)
    return target


def build_library(source_text: str | None = None, *, slots: int = SLOTS,
                  signatures: dict[str, str] | None = None) -> Path:
    """The harness as a shared library for ctypes (cached): ``source_text`` defaults to the real
    kernel source, ``signatures`` to its kernels (tests pass others: the racy fixture, rule breakers)."""
    return _build(SOURCE.read_text() if source_text is None else source_text, None, slots, False,
                  signatures)


def build_replay(source_text: str | None = None, *, sanitizer: str | None = "thread",
                 slots: int = SLOTS) -> Path:
    """The trace replayer (``gp_replay``), with ``sanitizer`` ``"thread"`` (default),
    ``"address"`` or None (cached)."""
    return _build(SOURCE.read_text() if source_text is None else source_text, sanitizer, slots, True)


def sanitizer_available(sanitizer: str) -> bool:
    """Whether g++ can build and run a program with ``sanitizer`` (``"thread"``: libtsan,
    ``"address"``: libasan)."""
    cxx = find_compiler()
    if cxx is None:
        return False
    lib = {"thread": "libtsan.so", "address": "libasan.so"}[sanitizer]
    out = subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
    return bool(out) and os.path.sep in out and Path(out).exists()


def tsan_runtime_available() -> bool:
    """Whether g++ can build and run a ThreadSanitizer program here (libtsan installed)."""
    return sanitizer_available("thread")


def launch_bounds(source_text: str) -> dict[str, int]:
    """kernel name -> its ``__launch_bounds__`` (threads per block), from the source."""
    defines = {k: int(v) for k, v in re.findall(r"^#define (GP_\w+) (\d+)\b", source_text, flags=re.M)}
    out = {}
    for bound, name in re.findall(r"__launch_bounds__\((\w+)\)\s*(\w+)\s*\(", source_text):
        out[name] = int(bound) if bound.isdigit() else defines[bound]
    return out


def replace_function(source_text: str, name: str, replacement: str) -> str:
    """``source_text`` with the kernel or device function ``name`` (from its ``extern "C"`` or
    ``GP_HD`` line to its closing brace) replaced by ``replacement``."""
    m = re.search(r'(?:extern "C" __global__[^\n]*\n?\s*|GP_HD \w+ )' + re.escape(name) + r"\(",
                  source_text)
    if not m:
        raise ValueError(f"{name} not found")
    depth, i = 0, source_text.index("{", m.end())
    for j in range(i, len(source_text)):
        if source_text[j] == "{":
            depth += 1
        elif source_text[j] == "}":
            depth -= 1
            if depth == 0:
                return source_text[:m.start()] + replacement.strip() + source_text[j + 1:]
    raise ValueError(f"unbalanced braces in {name}")


_APPLIED: dict[str, tuple] = {}


def _word(kind: str, value) -> int:
    if kind == "d":
        return struct.unpack("<Q", struct.pack("<d", float(value)))[0]
    return int(value) & 0xFFFFFFFFFFFFFFFF


class HarnessRuntime:
    """A :class:`gpuprune.kernels.ops.Runtime` that runs launches through the harness library.

    Args:
        library: from :func:`build_library`.
        source_text: the source it was built from (for the launch bounds check).
        slots: blocks run at once (<= the slots compiled in).
        timeout_s: a launch still running after this is aborted as a deadlock.
        chaos: schedule perturbation, in 1000 synchronisation points (0: none).
    """

    def __init__(self, library: Path, source_text: str | None = None, slots: int = SLOTS,
                 timeout_s: float = 120.0, chaos: int = 0, chaos_seed: int = 1,
                 signatures: dict[str, str] | None = None) -> None:
        self.signatures = SIGNATURES if signatures is None else signatures
        self.library = Path(library)
        self._lib = ctypes.CDLL(str(library))
        self._lib.gph_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint,
                                         ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_int, ctypes.c_int]
        self._lib.gph_launch.restype = ctypes.c_int
        self._lib.gph_error.restype = ctypes.c_char_p
        self._lib.gph_kernel_arity.argtypes = [ctypes.c_char_p]
        self._lib.gph_configure.argtypes = [ctypes.c_double, ctypes.c_uint, ctypes.c_ulonglong]
        self._config = (float(timeout_s), int(chaos), int(chaos_seed))
        compiled = self._lib.gph_slots()
        if not 1 <= slots <= compiled:
            raise ValueError(f"slots must be in [1, {compiled}], got {slots}")
        self.slots = slots
        self.bounds = launch_bounds(SOURCE.read_text() if source_text is None else source_text)
        self.log: list[tuple[str, int, int]] = []

    def __repr__(self) -> str:
        return f"HarnessRuntime({self.library.name}, slots={self.slots})"

    def session(self):
        return nullcontext()

    def stream_key(self) -> int:
        return 0

    def configure(self, timeout_s: float = 120.0, chaos: int = 0, chaos_seed: int = 1) -> None:
        """Change the deadlock timeout and the schedule perturbation of this runtime's launches."""
        self._config = (float(timeout_s), int(chaos), int(chaos_seed))

    def _apply_config(self) -> None:
        # runtimes over the same library share its (process-wide) settings: apply ours if needed
        if _APPLIED.get(str(self.library)) != self._config:
            self._lib.gph_configure(*self._config)
            _APPLIED[str(self.library)] = self._config

    def max_blocks(self, name: str, block: int) -> int:
        """Blocks resident at once: the slots (what a cooperative launch may use)."""
        return self.slots

    def launch(self, name: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple,
               cooperative: bool = False) -> None:
        kinds = self.signatures[name]
        if len(grid) != 1 or len(block) != 1:
            raise HarnessError("the harness models 1-D grids and blocks")
        if cooperative and grid[0] > self.slots:
            raise HarnessError(f"cooperative launch of {name} with {grid[0]} blocks, more than the "
                               f"{self.slots} that can be resident (a GPU refuses that launch)")
        bound = self.bounds.get(name)
        if bound is not None and block[0] > bound:
            raise HarnessError(f"{name} launched with {block[0]} threads per block, above its "
                               f"__launch_bounds__({bound}) (a GPU refuses that launch)")
        if self._lib.gph_kernel_arity(name.encode()) != len(kinds):
            raise HarnessError(f"{name}: the harness build and the Python spec disagree on arguments")
        words = (ctypes.c_ulonglong * max(len(args), 1))()
        for j, (kind, a) in enumerate(zip(kinds, args)):
            if kind == "p":
                if a is not None and a.device.type != "cpu":
                    raise HarnessError(f"{name}: the harness runs on CPU tensors, got {a.device}")
                words[j] = 0 if a is None else a.data_ptr()
            else:
                words[j] = _word(kind, a)
        self.log.append((name, grid[0], block[0]))
        self._apply_config()
        rc = self._lib.gph_launch(name.encode(), grid[0], block[0], words, len(args), self.slots)
        if rc != 0:
            raise HarnessError(f"{name} (grid {grid[0]}, block {block[0]}): "
                               f"{self._lib.gph_error().decode(errors='replace')}")


class RecordingRuntime:
    """Wraps a runtime and records every launch with the bytes of its buffers before and after,
    for :func:`replay`. Buffers are told apart by (address, size); a tensor seen again keeps its id."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self._ids: dict[tuple[int, int], int] = {}
        self._sizes: list[int] = []
        self.launches: list[tuple] = []

    def session(self):
        return self.inner.session()

    def stream_key(self):
        return self.inner.stream_key()

    def max_blocks(self, name: str, block: int) -> int:
        return self.inner.max_blocks(name, block)

    def _buffer(self, t: torch.Tensor) -> int:
        key = (t.data_ptr(), t.numel() * t.element_size())
        if key not in self._ids:
            self._ids[key] = len(self._sizes)
            self._sizes.append(key[1])
        return self._ids[key]

    @staticmethod
    def _bytes(t: torch.Tensor) -> bytes:
        return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""

    def launch(self, name, grid, block, args, cooperative: bool = False) -> None:
        kinds = SIGNATURES[name]
        tensors = {}
        words = []
        for kind, a in zip(kinds, args):
            if kind == "p":
                if a is None:
                    words.append(("p", 0xFFFFFFFFFFFFFFFF))
                else:
                    bid = self._buffer(a)
                    tensors[bid] = a
                    words.append(("p", bid))
            else:
                words.append(("w", _word(kind, a)))
        pre = {bid: self._bytes(t) for bid, t in tensors.items()}
        self.inner.launch(name, grid, block, args, cooperative=cooperative)
        post = {bid: self._bytes(t) for bid, t in tensors.items()}
        self.launches.append((name, grid[0], block[0], words, pre, post))

    def write(self, path: Path) -> Path:
        """Write the trace (format: csrc/harness/gp_replay.cpp)."""
        with open(path, "wb") as f:
            f.write(b"GPHTRC01")
            f.write(struct.pack("<I", len(self._sizes)))
            for size in self._sizes:
                f.write(struct.pack("<Q", size))
            f.write(struct.pack("<I", len(self.launches)))
            for name, grid, block, words, pre, post in self.launches:
                f.write(struct.pack("<H", len(name)) + name.encode())
                f.write(struct.pack("<III", grid, block, len(words)))
                for kind, value in words:
                    f.write(struct.pack("<BQ", ord(kind), value))
                for part in (pre, post):
                    f.write(struct.pack("<I", len(part)))
                    for bid, data in part.items():
                        f.write(struct.pack("<I", bid) + data)
        return Path(path)


def replay(executable: Path, trace: Path, *, slots: int = SLOTS, timeout_s: float = 300.0,
           chaos: int = 0, halt_on_error: bool = False, run_timeout_s: float = 900.0
           ) -> subprocess.CompletedProcess:
    """Run ``gp_replay`` on a trace. The sanitizers' reports are in ``stderr``; a TSan build exits
    with 66 when it reported something, an ASan build with 67 (``TSAN_OPTIONS`` and
    ``ASAN_OPTIONS`` are set here, overriding the environment's; ASan's leak check is off: the
    harness keeps its worker threads for the process's life)."""
    env = dict(os.environ)
    env["TSAN_OPTIONS"] = (f"halt_on_error={int(halt_on_error)} exitcode=66 report_signal_unsafe=0 "
                           f"history_size=4 second_deadlock_stack=1")
    env["ASAN_OPTIONS"] = "exitcode=67 detect_leaks=0 abort_on_error=0"
    return subprocess.run([str(executable), str(trace), str(slots), str(timeout_s), str(chaos)],
                          capture_output=True, text=True, env=env, timeout=run_timeout_s)


def harness_ops(*, slots: int = SLOTS, sm_count: int = 1, source_text: str | None = None,
                timeout_s: float = 120.0, chaos: int = 0, chaos_seed: int = 1,
                build_slots: int = SLOTS, keys_per_block: int | None = None) -> KernelOps:
    """A :class:`KernelOps` on the CPU whose launches run the kernels in the harness.

    ``slots`` is how many blocks run at once (<= ``build_slots``, the slots compiled in): a
    cooperative launch (gp_plan) gets at most that many. ``keys_per_block`` (default the library's,
    16384) lowers the samples per gp_plan block, so small inputs run on several blocks.
    """
    lib = build_library(source_text, slots=build_slots)
    runtime = HarnessRuntime(lib, source_text, slots=slots, timeout_s=timeout_s, chaos=chaos,
                             chaos_seed=chaos_seed)
    kw = {} if keys_per_block is None else {"keys_per_block": keys_per_block}
    return KernelOps(runtime, torch.device("cpu"), sm_count=sm_count, **kw)


assert CONSTANTS["GP_SEL_THREADS"] % 32 == 0


#: the pre-fix bucket scan (the race of issue 12), a fixture that the harness must catch
RACY_PICK_BUCKET = Path(__file__).resolve().parent / "racy_pick_bucket.cu"


def racy_source() -> str:
    """The kernel source with pick_bucket replaced by the pre-fix, racy version."""
    return replace_function(SOURCE.read_text(), "pick_bucket",
                            RACY_PICK_BUCKET.read_text().split("*/", 1)[1])
