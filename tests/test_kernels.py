"""CUDA kernels without a GPU: the source and the Python spec agree, nvcc builds the fatbin with the
promised architectures, the exact arithmetic is immune to CuPy's -ftz=true (checked on the PTX that
nvcc and NVRTC emit with CuPy's real option list), setup.py's optional build, and the loader's
fallbacks. The kernels' results are checked by ``tests/test_kernel_equivalence.py`` (the
concurrency harness) and the harness itself by ``tests/test_kernel_harness.py``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import inspect
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import gpuprune as gp
from gpuprune import kernels
from gpuprune.backend import TorchBackend, get_backend
from gpuprune.kernels import _loader
from gpuprune.kernels._spec import (CONSTANTS, CTL_BYTES, CTL_OFFSETS, KERNEL_NAMES, PLAN_ARGS,
                                    SIGNATURES)
from gpuprune.keys import PERM_MULTIPLIERS

import kernel_harness as kh

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "gpuprune_kernels.cu"
NVCC = shutil.which("nvcc")


def _load_setup():
    spec = importlib.util.spec_from_file_location("gpuprune_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)        # setup() itself runs only as __main__
    return module


def _source() -> str:
    return SOURCE.read_text()


# ---------------------------------------------------------------- the source and the spec
def _params(text: str, name: str) -> str:
    m = re.search(rf"\b{name}\s*\(([^)]*)\)\s*\{{", text)
    assert m, f"{name} not found in the source"
    kinds = []
    for param in m.group(1).split(","):
        param = " ".join(param.split())
        if "*" in param:
            kinds.append("p")
        elif param.startswith("unsigned long long"):
            kinds.append("Q")
        elif param.startswith("long long"):
            kinds.append("q")
        elif param.startswith("double"):
            kinds.append("d")
        else:
            raise AssertionError(f"{name}: unexpected parameter {param!r} (CuPy passes only "
                                 f"pointers, int64, uint64 and double)")
    return "".join(kinds)


def test_source_is_nvrtc_clean_and_matches_the_python_spec():
    text = _source()
    assert not re.search(r"^\s*#\s*include", text, flags=re.M)      # NVRTC has no std headers
    assert "template" not in text                 # extern "C" entry points only: no name mangling
    names = re.findall(r'extern "C" __global__ void(?: __launch_bounds__\(\w+\))?\s+(\w+)\(', text)
    assert sorted(names) == sorted(KERNEL_NAMES)
    for name, kinds in SIGNATURES.items():
        assert _params(text, name) == kinds, name
    defines = dict(re.findall(r"^#define (GP_\w+) (\d+)\b", text, flags=re.M))
    for name, value in CONSTANTS.items():
        assert int(defines[name]) == value, name
    # struct GpPlanCtl: the fields in the order and at the offsets ops.py uses
    body = re.search(r"struct GpPlanCtl \{(.*?)\};", text, flags=re.S).group(1)
    fields = re.findall(r"^\s*(u64|u32) (\w+)(?:\[(\w+)\])?;", body, flags=re.M)
    offset, layout = 0, {}
    for ctype, name, count in fields:
        layout[name] = offset
        n = 1 if not count else int(count) if count.isdigit() else CONSTANTS[count]
        offset += (8 if ctype == "u64" else 4) * n
    assert {k: layout[k] for k in CTL_OFFSETS} == CTL_OFFSETS and offset == CTL_BYTES
    # gp_plan's arguments by name, and the shuffle's multipliers
    plan_params = re.search(r"\bgp_plan\s*\(([^)]*)\)\s*\{", text).group(1)
    names = [p.strip().split()[-1].lstrip("*") for p in plan_params.split(",")]
    assert names == [name for name, _ in PLAN_ARGS]
    mults = [int(v, 16) for v in re.findall(r"#define GP_PERM_M\d (0x[0-9A-F]+)u", text)]
    assert tuple(mults) == PERM_MULTIPLIERS
    # every launch of ops.py stays within the kernel's __launch_bounds__ (checked per launch by the
    # harness too); the bounds themselves:
    assert kh.launch_bounds(text) == {"gp_observe_small": 1024, "gp_observe_sorted": 256,
                                      "gp_plan": 256}


def test_one_kernel_source_of_truth():
    """No serial rewrites of the kernels remain: the harness compiles the source itself."""
    text = _source()
    assert "gp_host_" not in text and "GPUPRUNE_HOST_TEST" not in text
    assert not (ROOT / "gpuprune" / "kernels" / "_host.py").exists()
    slot = (ROOT / "csrc" / "harness" / "gp_slot.cpp").read_text()
    assert "#include GPH_SOURCE" in slot


# ---------------------------------------------------------------- nvcc: fatbin and PTX
def _fatbin_entries(data: bytes) -> list[tuple[str, int]]:
    """(kind, sm) of each entry of a fatbin: 'sass' (ELF) or 'ptx'."""
    magic, _version, header, size = struct.unpack_from("<IHHQ", data, 0)
    assert magic == 0xBA55ED50
    out, off = [], header
    while off < header + size:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, off)
        arch = struct.unpack_from("<I", data, off + 28)[0]
        out.append(({1: "ptx", 2: "sass"}[kind], arch))
        off += entry_header + payload
    return sorted(out)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_setup_builds_a_fatbin_with_sm80_sm90_sass_and_ptx(tmp_path):
    setup_module = _load_setup()
    out = setup_module.build_fatbin(tmp_path, SOURCE)
    assert out is not None and out.name == kernels.fatbin_name(SOURCE)
    assert _fatbin_entries(out.read_bytes()) == [("ptx", 90), ("sass", 80), ("sass", 90)]
    # the loader takes exactly this fatbin for this source, and none for another source
    assert kernels.find_fatbin([tmp_path], SOURCE) == out
    other = tmp_path / "other.cu"
    other.write_text(_source() + "\n// edited\n")
    assert kernels.find_fatbin([tmp_path], other) is None


def _ptx_functions(ptx: str) -> dict[str, str]:
    """PTX function name -> its body (a function starts at its .entry/.func line with "name(")."""
    out: dict[str, list[str]] = {}
    current = None
    for line in ptx.splitlines():
        m = (re.match(r"^\.visible \.entry (\w+)\(", line)
             or re.match(r"^\.(?:visible |weak )?\.?func\s+(?:\([^)]*\)\s*)?(\w+)\($", line))
        if m:
            current = m.group(1)
            out.setdefault(current, [])
        if current is not None:
            out[current].append(line)
    return {name: "\n".join(lines) for name, lines in out.items()}


def _check_no_flush(ptx: str) -> None:
    """Our kernels carry no .ftz instruction: every float<->double conversion is cvt.f64.f32 or
    cvt.rn.f32.f64, and no library function (such as libdevice's pow) is called."""
    funcs = _ptx_functions(ptx)
    for name in KERNEL_NAMES:
        body = funcs[name]
        assert ".ftz" not in body, (name, [l for l in body.splitlines() if ".ftz" in l][:5])
    assert set(funcs) == set(KERNEL_NAMES), sorted(set(funcs) - set(KERNEL_NAMES))
    for name in ("gp_observe_small", "gp_plan"):      # the inline-PTX conversions are there
        assert "cvt.f64.f32" in funcs[name] and "cvt.rn.f32.f64" in funcs[name], name
    assert "sqrt.rn.f64" in funcs["gp_plan"]          # UCB's correctly rounded square root


def _plain_conversions(text: str) -> str:
    """The source with the inline-PTX conversions replaced by plain casts (the pre-fix code)."""
    text = text.replace('asm("cvt.f64.f32 %0, %1;" : "=d"(r) : "f"(a));', "r = (double)a;")
    text = text.replace('asm("cvt.rn.f32.f64 %0, %1;" : "=f"(r) : "d"(a));', "r = (float)a;")
    assert "asm(" not in text
    return text


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_nvcc_ftz_true_leaves_the_exact_ops_unflushed(tmp_path):
    def ptx_of(text: str) -> str:
        src, ptx = tmp_path / "k.cu", tmp_path / "k.ptx"
        src.write_text(text)
        subprocess.run([NVCC, "-ptx", "-arch=compute_90", "-std=c++17", "-ftz=true", "-o", str(ptx),
                        str(src)], check=True, capture_output=True, text=True, timeout=600)
        return ptx.read_text()

    ptx = ptx_of(_source())
    assert sorted(re.findall(r"\.visible \.entry (\w+)\(", ptx)) == sorted(KERNEL_NAMES)
    _check_no_flush(ptx)
    # the check can fail: plain casts under -ftz=true are flushing conversions
    with pytest.raises(AssertionError, match="cvt.ftz"):
        _check_no_flush(ptx_of(_plain_conversions(_source())))


# ---------------------------------------------------------------- NVRTC with CuPy's options
def _find_nvrtc() -> str | None:
    """libnvrtc: $GPUPRUNE_TEST_NVRTC (a path), else where cuda-pathfinder or ldconfig finds it."""
    if os.environ.get("GPUPRUNE_TEST_NVRTC"):
        return os.environ["GPUPRUNE_TEST_NVRTC"]
    try:
        from cuda import pathfinder
        path = pathfinder.load_nvidia_dynamic_lib("nvrtc").abs_path
        if path:
            return path
    except Exception:  # noqa: BLE001 - not installed or not found
        pass
    return ctypes.util.find_library("nvrtc")


def _cupy_appended_options() -> tuple[str, ...]:
    """What CuPy's RawModule(code=...) appends to the loader's options, read from the installed
    CuPy's compiler (so a change there shows up here): -ftz=true, then the arch option and
    --device-as-default-execution-space."""
    compiler = pytest.importorskip("cupy.cuda.compiler")
    cache = inspect.getsource(compiler._compile_with_cache_cuda)
    nvrtc = inspect.getsource(compiler._compile_using_nvrtc_no_warning)
    appended = re.findall(r"options \+= \('([^']+)',\)", cache)
    assert "-ftz=true" in appended, appended
    assert "--device-as-default-execution-space" in nvrtc
    # arch: CuPy passes -arch=sm_XX (cubin); the PTX wanted here comes from -arch=compute_90
    return ("-ftz=true", "-arch=compute_90", "--device-as-default-execution-space")


def _nvrtc_ptx(lib: str, text: str, options: tuple[str, ...]) -> str:
    for builtins in sorted(Path(lib).parent.glob("libnvrtc-builtins.so*")):   # found by dlopen
        ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        break
    nvrtc = ctypes.CDLL(lib)
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), b"gpuprune_kernels.cu", 0,
                                    None, None) == 0
    opts = [o.encode() for o in options]
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode(errors="replace")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetPTX(prog, ptx)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode()


@pytest.mark.skipif(_find_nvrtc() is None, reason="libnvrtc not found (set GPUPRUNE_TEST_NVRTC)")
def test_nvrtc_with_cupys_options_keeps_the_exact_ops_unflushed():
    lib = _find_nvrtc()
    options = (*kernels.NVRTC_OPTIONS, *_cupy_appended_options())
    ptx = _nvrtc_ptx(lib, _source(), options)
    assert sorted(re.findall(r"\.visible \.entry (\w+)\(", ptx)) == sorted(KERNEL_NAMES)
    _check_no_flush(ptx)
    with pytest.raises(AssertionError, match="cvt.ftz"):            # the check can fail
        _check_no_flush(_nvrtc_ptx(lib, _plain_conversions(_source()), options))


# ---------------------------------------------------------------- setup.py
def test_setup_skips_the_fatbin_when_asked_or_without_nvcc(tmp_path, monkeypatch):
    setup_module = _load_setup()
    monkeypatch.setenv("GPUPRUNE_NO_FATBIN", "1")
    assert setup_module.build_fatbin(tmp_path / "a") is None
    assert not (tmp_path / "a").exists()
    monkeypatch.delenv("GPUPRUNE_NO_FATBIN")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))          # no nvcc anywhere
    assert setup_module.find_nvcc() is None
    assert setup_module.build_fatbin(tmp_path / "b") is None
    assert not (tmp_path / "b").exists() or list((tmp_path / "b").iterdir()) == []


def test_setup_survives_a_failing_nvcc(tmp_path, monkeypatch):
    setup_module = _load_setup()
    fake = tmp_path / "bin" / "nvcc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'nvcc: simulated failure' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.delenv("GPUPRUNE_NO_FATBIN", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert setup_module.find_nvcc() == str(fake)
    assert setup_module.build_fatbin(tmp_path / "out") is None
    assert list((tmp_path / "out").iterdir()) == []      # no partial file left behind


def test_setup_and_loader_name_the_fatbin_alike():
    setup_module = _load_setup()
    assert setup_module.fatbin_name(SOURCE) == kernels.fatbin_name(SOURCE)
    assert setup_module.SASS_ARCHS == ("80", "90") and setup_module.PTX_ARCH == "90"


# ---------------------------------------------------------------- loader and backend choice
def test_import_gpuprune_works_without_cupy_and_auto_picks_torch():
    code = (
        "import sys; sys.modules['cupy'] = None\n"           # makes `import cupy` fail
        "import gpuprune, torch\n"
        "from gpuprune.kernels import _loader\n"
        "assert gpuprune.Pruner(8, policy='ucb').backend.name == 'torch'\n"
        "try:\n"
        "    _loader._build(0)\n"
        "except gpuprune.kernels.KernelsUnavailable as e:\n"
        "    assert 'CuPy is not importable' in str(e), e\n"
        "    print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    # and with CuPy installed, a CPU run never imports it
    lazy = ("import sys, gpuprune\n"
            "gpuprune.Pruner(8, policy='ucb').plan(0)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cupy'))\n")
    out = subprocess.run([sys.executable, "-c", lazy], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_backend_argument_is_checked_and_cuda_without_cuda_is_a_clear_error():
    assert isinstance(get_backend("torch", torch.device("cpu"), 4), TorchBackend)
    assert isinstance(get_backend("auto", torch.device("cpu"), 4), TorchBackend)
    assert gp.Pruner(10, backend="torch").backend.name == "torch"
    with pytest.raises(ValueError, match=r"backend='cuda' needs a CUDA device, got device=cpu"):
        get_backend("cuda", torch.device("cpu"), 4)
    with pytest.raises(ValueError, match=r"backend='cuda' needs a CUDA device"):
        gp.Pruner(10, policy="uniform", backend="cuda")
    with pytest.raises(ValueError, match=r"backend must be one of .*got backend='gpu'"):
        gp.Pruner(10, backend="gpu")
    with pytest.raises(kernels.KernelsUnavailable, match="CUDA device"):
        kernels.get_ops("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_no_cuda_means_kernels_unavailable_with_a_reason():
    assert not kernels.available()
    assert "CUDA" in kernels.unavailable_reason()


def test_candidates_prefer_the_fatbin_and_fall_back_to_the_source(tmp_path, monkeypatch):
    monkeypatch.delenv("GPUPRUNE_KERNELS", raising=False)
    fat, src = tmp_path / "fat", tmp_path / "src"
    fat.mkdir()
    src.mkdir()
    source = src / kernels.SOURCE_NAME
    source.write_text("// source")
    assert kernels.module_candidates([fat], [src]) == [("source", source)]
    (fat / "gpuprune_kernels-0000000000000000.fatbin").write_bytes(b"\0")     # another source's
    assert kernels.module_candidates([fat], [src]) == [("source", source)]
    fatbin = fat / kernels.fatbin_name(source)
    fatbin.write_bytes(b"\0")
    both = [("fatbin", fatbin), ("source", source)]
    assert kernels.module_candidates([fat], [src]) == both
    assert kernels.module_candidates([fat], [src], prefer="source") == both[1:]
    assert kernels.module_candidates([fat], [src], prefer="fatbin") == both[:1]
    monkeypatch.setenv("GPUPRUNE_KERNELS", "source")
    assert kernels.module_candidates([fat], [src]) == both[1:]
    monkeypatch.setenv("GPUPRUNE_KERNELS", "ptx")
    with pytest.raises(ValueError, match="GPUPRUNE_KERNELS must be one of"):
        kernels.module_candidates([fat], [src])
    # in a checkout the source is found in csrc/ (installed: next to the loader)
    assert kernels.find_source() is not None and kernels.find_source().read_text() == _source()


def test_load_module_tries_each_candidate_and_reports_every_failure(tmp_path):
    cupy = pytest.importorskip("cupy")
    if torch.cuda.is_available():
        pytest.skip("checks the failure path; the GPU tests load for real")
    bad = tmp_path / kernels.fatbin_name(SOURCE)
    bad.write_bytes(b"not a fatbin")
    with pytest.raises(kernels.KernelsUnavailable) as err:
        kernels.load_module(cupy, 0, [("fatbin", bad), ("source", SOURCE)])
    msg = str(err.value)
    assert msg.index(f"fatbin {bad}") < msg.index(f"source {SOURCE}")    # fatbin first, then NVRTC
    with pytest.raises(kernels.KernelsUnavailable, match="neither .* nor .* was found"):
        kernels.load_module(cupy, 0, [])


def test_get_ops_memoises_failures_per_device(monkeypatch):
    calls = []

    def failing_build(index):
        calls.append(index)
        raise kernels.KernelsUnavailable(f"no kernels on {index}")

    monkeypatch.setattr(_loader, "_device_index", lambda device: 0)
    monkeypatch.setattr(_loader, "_build", failing_build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kernels.clear_cache()
    try:
        for _ in range(3):
            assert kernels.unavailable_reason("cuda:0") == "no kernels on 0"
        assert calls == [0]
        with pytest.warns(RuntimeWarning, match="using the torch backend on cuda:0: no kernels"):
            assert isinstance(get_backend("auto", torch.device("cuda", 0), 10), TorchBackend)
        with pytest.raises(kernels.KernelsUnavailable, match="backend='cuda' was requested but no "
                                                             "kernels on 0"):
            get_backend("cuda", torch.device("cuda", 0), 10)
    finally:
        kernels.clear_cache()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure paths; the GPU tests load")
def test_auto_is_quiet_without_cupy_and_warns_when_the_kernels_fail_to_build(monkeypatch):
    # the device index is the only fake: past it, _build runs for real (the import of CuPy, then
    # load_module over the real fatbin/source candidates, which fail on a machine with no GPU)
    monkeypatch.setattr(_loader, "_device_index", lambda device: 0)
    cuda0 = torch.device("cuda", 0)
    kernels.clear_cache()
    try:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "cupy", None)            # makes `import cupy` fail
            for _ in range(2):                              # the second answer is the memoised one
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    assert isinstance(get_backend("auto", cuda0, 10), TorchBackend)
                assert [str(w.message) for w in caught] == []
                with pytest.raises(kernels.CupyMissing, match="CuPy is not importable"):
                    kernels.get_ops(cuda0)
        kernels.clear_cache()
        pytest.importorskip("cupy")
        for _ in range(2):
            with pytest.warns(RuntimeWarning, match="using the torch backend on cuda:0: could not "
                                                    "load the gpuprune CUDA kernels"):
                assert isinstance(get_backend("auto", cuda0, 10), TorchBackend)
            with pytest.raises(kernels.KernelsUnavailable) as err:
                kernels.get_ops(cuda0)
            assert type(err.value) is kernels.KernelsUnavailable      # not CupyMissing
    finally:
        kernels.clear_cache()


def test_kernel_ops_checks_its_arguments():
    ops = kh.harness_ops(slots=1)
    for n, k in ((10, 0), (10, 10), (10, 11), (0, 0)):
        with pytest.raises(ValueError, match=rf"top_k needs 0 < k < n .*got k={k}, n={n}"):
            ops.top_k(None, n, k, 1)
    with pytest.raises(ValueError, match="score must have n=10 entries, got 9"):
        ops.top_k(torch.zeros(9), 10, 3, 1)
    with pytest.raises(TypeError, match="gp_observe_sorted takes 13 arguments, got 4"):
        ops._launch("gp_observe_sorted", 1, 32, None, 0, 0, 0)
    with pytest.raises(ValueError, match="plan needs 0 <= explore <= k <= n, got explore=4, k=3"):
        ops.plan(10, k=3, explore=4)
    with pytest.raises(ValueError, match="mean must have n=10 entries"):
        ops.plan(10, mode=CONSTANTS["GP_SCORE_MEAN"], k=3)
    before = ops.launches
    ops.top_k(torch.zeros(10), 10, 3, 1)
    ops.top_k(None, 10, 3, 1)
    assert ops.launches - before == 2                         # one launch per call, as documented
    with pytest.raises(TypeError, match="cannot be pickled"):
        import pickle
        pickle.dumps(ops)
