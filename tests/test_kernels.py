"""CUDA kernels without a GPU: the source builds (nvcc, NVRTC where present), the loader falls back
cleanly, and the kernels' launch sequences and arithmetic match the torch reference bit for bit.

The equivalence tests run the real source compiled for the host (``-DGPUPRUNE_HOST_TEST``: every
kernel as a serial host function built from the same helpers) under the real
:class:`gpuprune.kernels.KernelOps`. The kernels' parallel mechanics are covered by
``tests/test_kernels_gpu.py``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpuprune as gp
from gpuprune import kernels
from gpuprune.kernels import _loader
from gpuprune.kernels._spec import CONSTANTS, CTL_BYTES, KERNEL_NAMES, SIGNATURES
from gpuprune.plan import shard_indices
from gpuprune.policies.epsilon_greedy import epsilon_greedy_select, greedy_score
from gpuprune.policies.infobatch import infobatch_select
from gpuprune.policies.ucb import ucb_score
from gpuprune.select import random_k, shuffle, shuffle_order, top_k_by_score

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "gpuprune_kernels.cu"
NVCC = shutil.which("nvcc")
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")
SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 3.5]


def _load_setup():
    spec = importlib.util.spec_from_file_location("gpuprune_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)        # setup() itself runs only as __main__
    return module


# ---------------------------------------------------------------- the source
def _source() -> str:
    return SOURCE.read_text()


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
    device_part = text.split("#ifdef GPUPRUNE_HOST_TEST")[0]
    # NVRTC has no standard headers: the only include is the host-only <math.h> fallback
    includes = re.findall(r"^\s*#\s*include\s*<([^>]+)>", device_part, flags=re.M)
    assert includes == ["math.h"]
    assert re.search(r"#else\s*\n#include <math.h>", device_part)
    kernels_in_source = re.findall(r'extern "C" __global__ void(?: __launch_bounds__\(\w+\))?\s+(\w+)\(',
                                   text)
    assert sorted(kernels_in_source) == sorted(KERNEL_NAMES)
    assert "template" not in device_part        # extern "C" entry points only: no name mangling
    for name, kinds in SIGNATURES.items():
        assert _params(text, name) == kinds, name
        assert _params(text, name.replace("gp_", "gp_host_", 1)) == kinds, name
    defines = dict(re.findall(r"^#define (GP_\w+) (\d+)\b", text, flags=re.M))
    for name, value in CONSTANTS.items():
        assert int(defines[name]) == value, name
    assert CTL_BYTES == 32 + 4 * CONSTANTS["GP_MAX_BINS"]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_nvcc_builds_a_sm90_fatbin_and_ptx_with_every_kernel(tmp_path):
    setup_module = _load_setup()
    fatbin = tmp_path / "k.fatbin"
    cmd = setup_module.nvcc_command(NVCC, SOURCE, fatbin, archs=("90",), ptx_arch="90")
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    data = fatbin.read_bytes()
    assert len(data) > 1000 and data[:4] == bytes.fromhex("50ed55ba")   # fatbin magic 0xBA55ED50
    ptx = tmp_path / "k.ptx"
    subprocess.run([NVCC, "-ptx", "-arch=sm_90", "-std=c++17", "-o", str(ptx), str(SOURCE)],
                   check=True, capture_output=True, text=True, timeout=600)
    entries = re.findall(r"\.visible \.entry (\w+)\(", ptx.read_text())
    assert sorted(entries) == sorted(KERNEL_NAMES)


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


@pytest.mark.skipif(_find_nvrtc() is None, reason="libnvrtc not found")
def test_nvrtc_compiles_the_source_with_the_loader_options():
    nvrtc = ctypes.CDLL(_find_nvrtc())
    prog = ctypes.c_void_p()
    src = _source().encode()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, b"gpuprune_kernels.cu", 0, None, None) == 0
    opts = [o.encode() for o in (*kernels.NVRTC_OPTIONS, "--gpu-architecture=compute_90")]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    assert rc == 0, log.value.decode(errors="replace")


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
    assert not (tmp_path / "b" / setup_module.FATBIN_NAME).exists()


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


# ---------------------------------------------------------------- loader and backend choice
def test_import_gpuprune_works_without_cupy_and_auto_picks_torch():
    code = (
        "import sys; sys.modules['cupy'] = None\n"           # makes `import cupy` fail
        "import gpuprune, torch\n"
        "from gpuprune.kernels import _loader\n"
        "assert gpuprune.ScoreBank(8).backend == 'torch'\n"
        "assert gpuprune.Pruner(8, policy='ucb').bank.backend == 'torch'\n"
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
    assert gp.ScoreBank(4, backend="torch").backend == "torch"
    assert gp.ScoreBank(4, backend="auto").backend == "torch"          # CPU device
    assert gp.Pruner(10, backend="torch").bank.kernels is None
    with pytest.raises(ValueError, match=r"backend='cuda' needs a CUDA device, got device=cpu"):
        gp.ScoreBank(4, backend="cuda")
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
    assert kernels.resolve_backend("auto", torch.device("cpu"), 10) is None


def test_candidates_prefer_the_fatbin_and_fall_back_to_the_source(tmp_path, monkeypatch):
    monkeypatch.delenv("GPUPRUNE_KERNELS", raising=False)
    fat, src = tmp_path / "fat", tmp_path / "src"
    fat.mkdir()
    src.mkdir()
    (src / kernels.SOURCE_NAME).write_text("// source")
    assert kernels.module_candidates([fat], [src]) == [("source", src / kernels.SOURCE_NAME)]
    (fat / kernels.FATBIN_NAME).write_bytes(b"\0")
    both = [("fatbin", fat / kernels.FATBIN_NAME), ("source", src / kernels.SOURCE_NAME)]
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
    bad = tmp_path / kernels.FATBIN_NAME
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
    kernels.clear_cache()
    try:
        for _ in range(3):
            assert kernels.unavailable_reason("cuda:0") == "no kernels on 0"
        assert calls == [0]
        with pytest.warns(RuntimeWarning, match="using the torch backend on cuda:0: no kernels"):
            assert kernels.resolve_backend("auto", torch.device("cuda", 0), 10) is None
        with pytest.raises(kernels.KernelsUnavailable, match="backend='cuda' was requested but no "
                                                             "kernels on 0"):
            kernels.resolve_backend("cuda", torch.device("cuda", 0), 10)
    finally:
        kernels.clear_cache()


def test_host_counts_reads_once_and_serves_the_next_invalid_check():
    bank = gp.ScoreBank(4)
    bank.invalid_batches.fill_(2)
    assert bank.host_counts(torch.tensor(7), torch.tensor([3], dtype=torch.int32)) == [7, 3]
    bank.invalid_batches.zero_()           # not read again: the value read with the counts is used
    with pytest.raises(ValueError, match=r"in 2 batch\(es\)"):
        bank.raise_if_invalid()
    bank.raise_if_invalid()                # one use only; the device counter (0) is read now
    bank.invalid_batches.fill_(1)
    bank.host_counts()
    bank.observe(torch.tensor([0]), torch.tensor([1.0]))   # a new batch makes the snapshot stale
    bank.invalid_batches.fill_(3)
    with pytest.raises(ValueError, match=r"in 3 batch\(es\)"):
        bank.raise_if_invalid()


# ---------------------------------------------------------------- the host build == torch reference
@pytest.fixture(scope="module")
def ops():
    if CXX is None:
        pytest.skip("no C++ compiler for the host build")
    from gpuprune.kernels._host import host_ops
    return host_ops()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_banks_equal(ref: gp.ScoreBank, ker: gp.ScoreBank, where) -> None:
    for name in ("mean", "var", "count", "last_epoch", "nonfinite", "invalid_batches"):
        a, b = getattr(ref, name), getattr(ker, name)
        assert torch.equal(_bits(a), _bits(b)), (where, name)


def _pair(n: int, decay: float, ops):
    ref, ker = gp.ScoreBank(n, decay=decay), gp.ScoreBank(n, decay=decay)
    ker.kernels = ops
    return ref, ker


def _same_set(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() == b.numel() and torch.equal(torch.sort(a).values, torch.sort(b).values)


def test_observe_hand_computed(ops):
    bank = gp.ScoreBank(3, decay=0.5)
    bank.kernels = ops
    bank.observe(torch.tensor([0, 0, 1]), torch.tensor([1.0, 3.0, 2.0]))
    # sample 0: first visit, group of two: mean 2, within-group variance 1
    assert bank.mean.tolist() == [2.0, 2.0, 0.0] and bank.var.tolist() == [1.0, 0.0, 0.0]
    bank.epoch = 4
    bank.observe(torch.tensor([0, 2]), torch.tensor([4.0, float("nan")]))
    # a = 1 - 0.5 = 0.5: mean 2 + 0.5 * 2 = 3, var 0.5 * 1 + 0.25 * 2**2 = 1.5; the NaN is skipped
    assert bank.mean.tolist() == [3.0, 2.0, 0.0] and bank.var.tolist() == [1.5, 0.0, 0.0]
    assert bank.count.tolist() == [3, 1, 0] and bank.last_epoch.tolist() == [4, 0, -1]
    assert int(bank.nonfinite) == 1


@pytest.mark.parametrize("decay", [0.9, 0.5, 0.75, 0.0])
def test_observe_matches_torch_bit_for_bit(ops, decay):
    g = torch.Generator().manual_seed(int(decay * 100))
    for n in (1, 2, 37, 3000):
        ref, ker = _pair(n, decay, ops)
        # batch sizes on both sides of the single-block limit (2048), duplicates of any multiplicity
        for step, b in enumerate((1, 2, 5, 64, 2047, 2048, 2049, 4000, 300, 1)):
            idx = torch.randint(0, n, (b,), generator=g)
            if step == 3:
                idx[:] = idx[0]                                # one id, 64 times
            x = torch.randn(b, generator=g) * torch.exp(2 * torch.randn(b, generator=g))
            pick = torch.randint(0, len(SPECIAL) * 4, (b,), generator=g)
            x = torch.where(pick < len(SPECIAL), torch.tensor(SPECIAL)[pick % len(SPECIAL)], x)
            ref.epoch = ker.epoch = step
            ref.observe(idx, x)
            ker.observe(idx.to(torch.int32) if step % 2 else idx, x.double() if step == 5 else x)
            _assert_banks_equal(ref, ker, (n, step))
        assert int(ker.nonfinite) > 0


def test_observe_extreme_losses_saturate_like_torch(ops):
    ref, ker = _pair(4, 0.9, ops)
    idx = torch.tensor([0, 0, 1, 1, 2])
    x = torch.tensor([-3e38, 3e38, 1e-45, -1e-45, 3e38])
    for bank in (ref, ker):
        bank.observe(idx, x)
        bank.observe(idx.flip(0), x)
    _assert_banks_equal(ref, ker, "extreme")
    assert torch.isfinite(ker.var).all()


def test_invalid_batch_is_ignored_whole_and_counted(ops):
    # the CPU bank rejects bad ids before any kernel; call the kernel path directly, as on a GPU
    for b in (3, 3000):                                       # single-block and sorted paths
        bank = gp.ScoreBank(10)
        before = {k: v.clone() for k, v in bank.state_dict().items() if isinstance(v, torch.Tensor)}
        idx = torch.arange(b) % 10
        idx[b // 2] = 10 if b == 3 else -1
        x = torch.ones(b)
        x[0] = float("nan")
        ops.observe(bank, idx, x)
        assert int(bank.invalid_batches) == 1 and int(bank.nonfinite) == 0
        for name in ("mean", "var", "count", "last_epoch"):
            assert torch.equal(getattr(bank, name), before[name])
        with pytest.raises(ValueError, match=r"indices outside \[0, 10\) in 1 batch"):
            bank.raise_if_invalid()


def _scores(n: int, kind: str, g: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.randn(n, generator=g)
    if kind == "equal":
        return torch.full((n,), 0.25)
    if kind == "special":
        return torch.tensor(SPECIAL)[torch.randint(0, len(SPECIAL), (n,), generator=g)]
    return torch.randint(0, 3, (n,), generator=g).float()          # heavy ties


@pytest.mark.parametrize("n", [1, 2, 3, 100, 4095, 4096, 4097, 20000])
def test_selection_matches_torch(ops, n):
    g = torch.Generator().manual_seed(n)
    for kind in ("random", "equal", "special", "ties"):
        s = _scores(n, kind, g)
        for k in sorted({0, 1, n // 2, n - 1, n} - {-1}):
            for seed in (0, 2**64 - 1):
                assert _same_set(ops.top_k_scores(s, k, seed), top_k_by_score(s, k, seed)), (kind, k)
                assert _same_set(ops.top_k_scores(s.double(), k, seed), top_k_by_score(s.double(), k, seed))
        for k in sorted({0, 1, n // 3, n}):
            assert _same_set(ops.random_k(n, k, 7), random_k(n, k, 7))


def _random_bank(n: int, g: torch.Generator, kind: str) -> gp.ScoreBank:
    bank = gp.ScoreBank(n)
    bank.mean.copy_(_scores(n, kind, g).abs())
    bank.var.copy_(_scores(n, kind, g))                   # negative and NaN variances included
    bank.count.copy_(torch.randint(0, 3, (n,), generator=g, dtype=torch.int32))
    return bank


@pytest.mark.parametrize("n", [1, 5, 1000, 9000])
def test_policy_selections_match_torch(ops, n):
    g = torch.Generator().manual_seed(1000 + n)
    for kind in ("random", "equal", "special", "ties"):
        bank = _random_bank(n, g, kind)
        for k in sorted({1, n // 2, max(n - 1, 1), n}):
            for c, unc in ((1.0, "std"), (0.3, "var"), (0.0, "std"), (1e30, "std")):
                want = top_k_by_score(ucb_score(bank.mean, bank.var, bank.seen, c, unc), k, 11)
                assert _same_set(ops.ucb(bank, k, 11, c, unc), want), (kind, k, c, unc)
            for eps in (0.0, 0.1, 0.5, 1.0):
                want = epsilon_greedy_select(greedy_score(bank), k, eps, (3, 2**63 + 5))
                assert _same_set(ops.epsilon_greedy(bank, k, eps, (3, 2**63 + 5)), want), (kind, k, eps)
        for ratio in (0.0, 0.3, 0.5, 0.999):
            idx, w = ops.infobatch(bank, ratio, 5)
            ref_idx, ref_w = infobatch_select(bank.mean, bank.seen, ratio, 5)
            a, b = torch.argsort(idx), torch.argsort(ref_idx)
            assert torch.equal(idx[a], ref_idx[b]) and torch.equal(w[a], ref_w[b]), (kind, ratio)
            assert torch.equal(idx, torch.sort(idx).values)            # ordered compaction


def test_shuffle_and_shards_match_torch(ops):
    g = torch.Generator().manual_seed(3)
    for n in (0, 1, 7, 1000):
        ids = torch.randperm(5000, generator=g)[:n]
        w = torch.rand(n, generator=g)
        assert torch.equal(ops.shuffle_order(ids, 99), shuffle_order(ids, 99))
        for world in (1, 3, 8):
            for rank in range(world):
                for drop_last in (False, True):
                    got, got_w = ops.shuffle_shard(ids, w, 99, rank, world, drop_last)
                    order = shuffle_order(ids, 99)
                    assert torch.equal(got, shard_indices(shuffle(ids, 99), rank, world, drop_last))
                    assert torch.equal(got_w, shard_indices(w[order], rank, world, drop_last))


@pytest.mark.parametrize("policy", ["uniform", "epsilon_greedy", "ucb", "infobatch", "static", "full"])
def test_pruner_plans_are_identical_with_the_kernels(ops, policy):
    n, g = 3000, torch.Generator().manual_seed(5)
    kw = dict(keep=0.3, policy=policy, seed=17, num_epochs=8, selection_interval=2 if policy == "ucb"
              else 1)
    if policy == "static":
        kw["static_scores"] = torch.randn(n, generator=g)
    ref, ker = gp.Pruner(n, **kw), gp.Pruner(n, **kw)
    ker.bank.kernels = ops
    assert ker.bank.backend == "cuda" and ref.bank.backend == "torch"
    losses = torch.rand(n, generator=g) * 3
    losses[::97] = float("nan")
    for epoch in range(8):
        p_ref, p_ker = ref.plan(epoch), ker.plan(epoch)
        assert torch.equal(p_ref.indices, p_ker.indices), epoch
        assert (p_ref.weights is None) == (p_ker.weights is None)
        if p_ref.weights is not None:
            assert torch.equal(p_ref.weights, p_ker.weights)
        for i in range(0, len(p_ref), 700):
            idx = p_ref.indices[i:i + 700]
            loss = losses[idx] * (1 + epoch)
            assert torch.equal(_bits(ref.observe(idx, loss)), _bits(ker.observe(idx, loss)))
        _assert_banks_equal(ref.bank, ker.bank, epoch)
    assert torch.equal(ref.bank.selected, ker.bank.selected)
