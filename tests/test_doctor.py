"""`gpuprune doctor` and scripts/gpu_check.sh: they pass where everything agrees, and fail loudly,
naming what disagreed, when a reference or a backend is made wrong."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpuprune import cli, doctor
from gpuprune.backend import TorchBackend
from gpuprune.doctor import (BackendImplementation, FatbinEntry, diagnose_backend, parse_fatbin,
                             ptx_min_cuda, run_doctor, sass_runs_on)

from numpy_reference import NumpyReference

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(**kw) -> tuple[int, list[str]]:
    lines: list[str] = []
    rc = run_doctor("cpu", dali=False, out=lines.append, **kw)
    return rc, lines


# ---------------------------------------------------------------- the doctor passes on the CPU
def test_doctor_passes_on_the_cpu_and_names_the_torch_backend(tmp_path, capsys):
    rc = cli.main(["doctor", "--device", "cpu", "--no-dali", "--json", str(tmp_path / "d.json")])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0, out[-1]
    assert out[-1].startswith("gpuprune doctor: OK: torch backend (cpu)")
    assert any("auto -> torch on cpu" in line for line in out)
    rep = json.loads((tmp_path / "d.json").read_text())
    assert rep["result"] == "ok" and rep["reason"] is None
    assert rep["backend"]["backend"] == "torch" and rep["backend"]["get_backend"] == "torch"
    assert rep["candidates"] == ["torch backend (cpu)"]
    assert rep["references"] == ["torch reference (cpu)"]          # the operations a GPU runs
    checks = {c["name"]: c for c in rep["checks"]}
    assert set(checks) == {"observe", "top_k", "shuffle", "plans"}
    assert all(c["ok"] and c["comparisons"] > 10 for c in checks.values())


def test_python_m_gpuprune_doctor_with_dali_when_installed(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "gpuprune", "doctor", "--device", "cpu"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[-1].startswith("gpuprune doctor: OK")
    dali = [line for line in lines if line.strip().startswith(("ok   dali", "FAIL dali"))]
    if importlib.util.find_spec("nvidia.dali") is not None:
        assert dali and "each planned sample exactly once" in dali[0]


def test_import_gpuprune_and_the_doctor_import_neither_cupy_nor_dali():
    code = ("import sys, gpuprune, gpuprune.doctor, gpuprune.cli; gpuprune.cli.build_parser(); "
            "print([m for m in ('cupy', 'nvidia.dali') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ---------------------------------------------------------------- ... and fails loudly
class _WrongTopK(NumpyReference):
    name = "wrong-top-k reference"

    def top_k_np(self, score, n, k, seed):
        ids = super().top_k_np(score, n, k, seed)
        if 0 < k < n and n >= 100:                 # swap one chosen id for an unchosen one
            out = np.setdiff1d(np.arange(n), ids)[0]
            ids = np.sort(np.concatenate([ids[1:], [out]]))
        return ids


class _WrongShuffle(NumpyReference):
    name = "wrong-shuffle reference"

    def shuffle_np(self, ids, seed):
        order = super().shuffle_np(ids, seed).copy()
        if order.size >= 5:
            order[[0, 1]] = order[[1, 0]]
        return order


class _WrongObserve(NumpyReference):
    name = "wrong-observe reference"

    def observe(self, state, ids, losses, decay, epoch):
        super().observe(state, ids, losses, decay, epoch)
        if ids.numel() >= 7:                        # one ulp off in one sample's mean
            i = int(ids[0])
            state["mean"][i] = np.nextafter(state["mean"][i], np.float32(np.inf))


class _WrongWeights(NumpyReference):
    name = "wrong-weight reference"

    def start(self, spec):
        run = super().start(spec)
        plan = run.plan

        def wrong(epoch):
            order, w = plan(epoch)
            return order, np.where(w != 1.0, w * np.float32(2.0), w).astype(np.float32)
        run.plan = wrong
        return run


@pytest.mark.parametrize("ref, check, words", [
    (_WrongTopK(), "top_k", ["sets differ", "1 of"]),
    (_WrongShuffle(), "shuffle", ["orders differ", "2 of"]),
    (_WrongObserve(), "observe", ["mean differs at 1 of", "batch"]),
    (_WrongWeights(), "plans", ["loss weights differ", "infobatch"]),
], ids=["top_k", "shuffle", "observe", "infobatch-weights"])
def test_a_wrong_reference_fails_the_doctor_naming_what_disagreed(ref, check, words):
    rc, lines = _run(references=[ref])
    assert rc == 1
    last = lines[-1]
    assert last.startswith(f"gpuprune doctor: FAIL: {check}: torch backend (cpu) vs {ref.name}")
    assert all(w in last for w in words), last
    assert "\n" not in last
    bad = [line for line in lines if line.lstrip().startswith("FAIL")]
    assert bad and bad[0].split()[1] == check


class _FaultyKernels(TorchBackend):
    """Stands in for a kernel with a bug: one wrong id in large selections, or one ulp in a var."""

    name = "cuda"

    def __init__(self, fault: str) -> None:
        super().__init__(CPU)
        self.fault = fault

    def _top_k(self, score, n, k, seed):
        ids = super()._top_k(score, n, k, seed)
        if self.fault == "top_k" and n >= 1000:
            chosen = torch.zeros(n, dtype=torch.bool)
            chosen[ids.long()] = True
            ids = ids.clone()
            ids[0] = int(torch.nonzero(~chosen)[0])
        return ids

    def _observe(self, t, ids, losses, decay, epoch, exact):
        super()._observe(t, ids, losses, decay, epoch, exact)
        if self.fault == "observe" and ids.numel() >= 64:
            i = int(ids[-1])
            t.var[i] = torch.nextafter(t.var[i], torch.tensor(float("inf")))


@pytest.mark.parametrize("fault, check", [("top_k", "top_k"), ("observe", "observe")])
def test_a_wrong_kernel_result_fails_the_doctor(fault, check):
    cand = BackendImplementation(_FaultyKernels(fault), name="faulty kernels")
    rc, lines = _run(candidates=[cand])
    assert rc == 1
    assert lines[-1].startswith(f"gpuprune doctor: FAIL: {check}: faulty kernels vs torch reference")


def test_an_implementation_that_raises_is_a_failed_check_not_a_crash():
    class Raising(BackendImplementation):
        def shuffle(self, ids, seed):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    rc, lines = _run(candidates=[Raising(TorchBackend(CPU), name="raising kernels")])
    assert rc == 1
    assert lines[-1] == ("gpuprune doctor: FAIL: shuffle: raised RuntimeError: CUDA error: an illegal "
                         "memory access was encountered")
    assert any(line.lstrip().startswith("ok   plans") for line in lines)     # the next checks ran


def test_require_kernels_fails_on_the_cpu():
    rc, lines = _run(require_kernels=True)
    assert rc == 1
    assert lines[-1].startswith("gpuprune doctor: FAIL: --require-kernels")


def test_the_dali_check_sees_a_source_serving_the_wrong_data(monkeypatch):
    pytest.importorskip("nvidia.dali")
    import gpuprune.dali as gdali
    assert doctor.check_dali().ok

    class Shifted(gdali.ArraySource):
        def __init__(self, *arrays, **kw):
            super().__init__(*(np.roll(a, 1, axis=0) for a in arrays), **kw)
    monkeypatch.setattr(gdali, "ArraySource", Shifted)
    res = doctor.check_dali()
    assert not res.ok and "not those of its ids" in res.detail


# ---------------------------------------------------------------- the reference itself
def test_numpy_reference_hand_computed_updates():
    ref = NumpyReference()
    st = ref.new_state(3)
    ref.observe(st, torch.tensor([0]), torch.tensor([2.0]), 0.5, 0)        # first visit: take it
    assert st["mean"][0] == 2.0 and st["var"][0] == 0.0 and st["last_epoch"][0] == 0
    ref.observe(st, torch.tensor([0]), torch.tensor([4.0]), 0.5, 1)        # a = 0.5, d = 2
    assert st["mean"][0] == 3.0 and st["var"][0] == 1.0                    # 0.5 * (0 + 0.5 * 4)
    ref.observe(st, torch.tensor([1, 1, 2]), torch.tensor([2.0, 4.0, float("nan")]), 0.5, 2)
    assert st["mean"][1] == 3.0 and st["var"][1] == 1.0                    # group mean 3, spread 1
    assert st["last_epoch"][2] == -1 and int(st["nonfinite"]) == 1         # NaN skipped, counted
    ref.observe(st, torch.tensor([0, 5]), torch.ones(2), 0.5, 3)           # out of range: ignored
    assert int(st["invalid_batches"]) == 1 and st["mean"][0] == 3.0


def test_numpy_reference_keys_order_floats_and_hash_by_murmur3():
    ref = NumpyReference()
    x = np.array([np.nan, -np.inf, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, np.inf], np.float32)
    w = ref.order_word(x).astype(np.int64)
    assert w[0] == w[1] and w[4] == w[5]                                   # NaN as -inf, -0 as +0
    assert all(a < b for a, b in zip(w[1:4], w[2:5])) and all(a < b for a, b in zip(w[5:], w[6:]))

    def fmix(h):                                        # MurmurHash3's finaliser, in Python ints
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)
    seed = (7 << 32) | 12345                            # words: lo = 12345, hi = 7
    ids = [0, 1, 2, 3, 4_000_000_000]
    want = [fmix(fmix(i ^ 12345) ^ 7) for i in ids]
    assert ref.hash32(np.array(ids, np.uint64), seed).tolist() == want
    top2 = sorted(sorted(range(4), key=want.__getitem__)[2:])              # 2 largest hashes of 0..3
    assert ref.top_k_np(None, 4, 2, seed).tolist() == top2


# ---------------------------------------------------------------- fatbin and backend diagnosis
def _fatbin(entries, pad: int = 0) -> bytes:
    """A fatbin container holding (kind, arch, major, minor, compressed) entries, payload 8 bytes."""
    body = b""
    for kind, arch, major, minor, compressed in entries:
        payload = b"\x11" * 8
        head = struct.pack("<HHIQ", kind, 0x0101, 64, len(payload))
        head += struct.pack("<IIHHI", 5 if compressed else 0, 0, minor, major, arch)
        head += b"\0" * (64 - len(head))
        body += head + payload
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body + b"\0" * pad


def test_parse_fatbin_reads_kinds_archs_and_versions():
    data = _fatbin([(2, 80, 1, 8, False), (2, 90, 1, 8, False), (1, 90, 9, 0, True)], pad=16)
    got = parse_fatbin(data)
    assert got == [FatbinEntry("sass", 80, (1, 8), False), FatbinEntry("sass", 90, (1, 8), False),
                   FatbinEntry("ptx", 90, (9, 0), True)]
    assert doctor.describe_fatbin(got) == ("sm_80 sm_90 SASS + compute_90 PTX (ISA 9.0, needs a CUDA "
                                           ">= 13.0 driver)")
    assert parse_fatbin(data + data) == got + got                      # two containers
    with pytest.raises(ValueError, match="not a CUDA fatbin"):
        parse_fatbin(b"\x7fELF" + data[4:])
    with pytest.raises(ValueError, match="truncated"):
        parse_fatbin(data[:100])


def test_a_real_fatbin_holds_what_setup_py_asks_for(tmp_path):
    """The parser against nvcc's own output (compressed PTX included): the fatbin of this source,
    installed or carried, else one built into tmp_path with setup.py's command."""
    from gpuprune import kernels
    spec = importlib.util.spec_from_file_location("gp_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    name = kernels.fatbin_name(kernels.find_source())
    found = [p for p in (kernels.find_fatbin(), ROOT / ".gpu_check" / "fatbin" / name) if p and p.is_file()]
    if found:
        path = found[0]
    elif setup.find_nvcc() is not None:
        path = setup.build_fatbin(tmp_path)
        assert path is not None and path.name == name
    else:
        pytest.skip("no fatbin here and no nvcc to build one")
    e = doctor.read_fatbin(path)
    assert {x.arch for x in e if x.kind == "sass"} == {int(a) for a in setup.SASS_ARCHS}
    assert {x.arch for x in e if x.kind == "ptx"} == {int(setup.PTX_ARCH)}


def test_ptx_versions_map_to_driver_versions_and_sass_compatibility():
    assert ptx_min_cuda((8, 5)) == 12050 and ptx_min_cuda((8, 6)) == 12070
    assert ptx_min_cuda((8, 8)) == 12090 and ptx_min_cuda((9, 0)) == 13000
    assert ptx_min_cuda((9, 2)) == 13020 and ptx_min_cuda((6, 5)) is None
    assert sass_runs_on(80, (8, 6)) and sass_runs_on(80, (8, 9)) and sass_runs_on(90, (9, 0))
    assert not sass_runs_on(86, (8, 0)) and not sass_runs_on(90, (10, 0))


FAT = [FatbinEntry("sass", a, (1, 8), False) for a in (80, 86, 89, 90)] + [
    FatbinEntry("ptx", 90, (9, 0), True)]
GPU = dict(device_type="cuda", cuda_available=True, nvrtc="13.0", has_fatbin=True,
           fatbin_entries=FAT, driver=13000)


@pytest.mark.parametrize("facts, backend, build, words", [
    (dict(device_type="cpu", cuda_available=False), "torch", None, ["the device is the CPU"]),
    (dict(device_type="cuda", cuda_available=False, cuda_reason="this torch was built without CUDA"),
     "torch", None, ["no CUDA device", "built without CUDA"]),
    ({**GPU, "capability": (9, 0), "cupy_error": "ModuleNotFoundError: No module named 'cupy'"},
     "torch", None, ["CuPy is not importable", "cupy-cuda13x"]),
    ({**GPU, "capability": (9, 0)}, "cuda", "fatbin", ["sm_90 SASS", "sm_90 device"]),
    ({**GPU, "capability": (8, 6)}, "cuda", "fatbin", ["sm_86 SASS"]),
    ({**GPU, "capability": (9, 0), "nvrtc": None, "nvrtc_error": "libnvrtc.so.13 not found"},
     "cuda", "fatbin", ["sm_90 SASS"]),
    ({**GPU, "capability": (7, 5)}, "cuda", "source", ["fatbin arch mismatch", "sm_75"]),
    ({**GPU, "capability": (7, 5), "nvrtc": None, "nvrtc_error": "libnvrtc.so.13 not found"},
     "torch", None, ["fatbin arch mismatch", "NVRTC missing"]),
    ({**GPU, "capability": (10, 0), "driver": 12080}, "cuda", "source",
     ["driver too old for the fatbin's PTX", "CUDA >= 13.0", "supports CUDA 12.8"]),
    ({**GPU, "capability": (10, 0), "driver": 12080, "nvrtc": None, "nvrtc_error": "missing"},
     "torch", None, ["driver too old", "NVRTC missing"]),
    ({**GPU, "capability": (12, 0), "driver": 13000}, "cuda", "fatbin",
     ["compiles the fatbin's compute_90 PTX"]),
    ({**GPU, "capability": (9, 0), "has_fatbin": False, "fatbin_entries": None}, "cuda", "source",
     ["no prebuilt fatbin"]),
    ({**GPU, "capability": (9, 0), "has_fatbin": False, "fatbin_entries": None,
      "stale_fatbins": ["gpuprune_kernels-0123.fatbin"]}, "cuda", "source",
     ["no fatbin built from this kernel source", "gpuprune_kernels-0123.fatbin"]),
    ({**GPU, "capability": (9, 0), "prefer": "source"}, "cuda", "source", ["GPUPRUNE_KERNELS=source"]),
    ({**GPU, "capability": (9, 0), "loaded": "source",
      "load_errors": {"fatbin": "CUDA_ERROR_INVALID_SOURCE"}}, "cuda", "source",
     ["failed to load", "CUDA_ERROR_INVALID_SOURCE"]),
    ({**GPU, "capability": (9, 0), "load_errors": {"fatbin": "E1", "source": "E2"}}, "torch", None,
     ["failed to load", "E1", "E2"]),
], ids=["cpu", "no-cuda", "no-cupy", "sm90", "sm86", "no-nvrtc-but-fatbin", "arch-mismatch",
        "arch-mismatch-no-nvrtc", "driver-too-old", "driver-too-old-no-nvrtc", "ptx-jit",
        "no-fatbin", "stale-fatbin", "prefer-source", "seen-fatbin-failure", "seen-both-fail"])
def test_diagnose_backend_tells_the_reasons_apart(facts, backend, build, words):
    d = diagnose_backend(**facts)
    assert (d.backend, d.build) == (backend, build), d.reason
    text = f"{d.reason} | {d.fatbin.why} | {d.source.why}"
    assert all(w in text for w in words), text
    assert d.observed == ("loaded" in facts or "load_errors" in facts)


# ---------------------------------------------------------------- the GPU-check scripts
def test_stress_harness_agrees_and_catches_wrong_references():
    stress = _load_script("gpu_check_stress")
    cand = BackendImplementation(TorchBackend(CPU))
    ref = BackendImplementation(TorchBackend(CPU, cpu_fast_paths=False), name="torch reference")
    kw = dict(seconds=0.2, max_n=3000, min_selections=60, log=lambda line: None)
    good = stress.run_stress(cand, [ref], [NumpyReference()], **kw)
    assert good["ok"] and good["selections"] >= 60 and good["observe_batches"] > 0
    assert good["plans"] >= 6

    class WrongPlan(BackendImplementation):
        def plan(self, arrays, shuffle_seed, **kw):
            out = super().plan(arrays, shuffle_seed, **kw)
            out["indices"] = out["indices"][::-1].copy()            # the right set, wrong order
            return out

    bad = stress.run_stress(WrongPlan(TorchBackend(CPU)), [_WrongTopK()], [_WrongObserve()],
                            plan_seconds=0.05, **kw)
    bad_plans = stress.run_plans(WrongPlan(TorchBackend(CPU)), [ref], seconds=0.05, max_n=3000,
                                 min_cases=5, log=lambda line: None)
    assert not bad["ok"]
    assert bad["selection_mismatches"] > 0 and bad["observe_mismatches"] > 0
    assert any("sets differ" in x for x in bad["first"])
    assert bad_plans["plan_mismatches"] > 0 and "indices differ" in bad_plans["first"][0]


def test_stress_plans_of_the_kernels_in_the_harness_agree():
    """The plan series of the stress, run on the real kernels in the concurrency harness (several
    blocks per plan) against the torch backend."""
    kh = pytest.importorskip("kernel_harness")
    if kh.find_compiler() is None:
        pytest.skip("the harness needs g++")
    stress = _load_script("gpu_check_stress")
    from gpuprune.backend import KernelBackend
    cand = BackendImplementation(KernelBackend(kh.harness_ops(slots=4, keys_per_block=512)))
    res = stress.run_plans(cand, [BackendImplementation(TorchBackend(CPU))], seconds=3,
                           max_n=5000, min_cases=16, log=lambda line: None)
    assert res["plan_mismatches"] == 0, res["first"]
    assert res["plans"] >= 16 and len(res["by_kind"]) >= 4


def test_report_reads_the_benchmark_table_and_judges_the_targets(tmp_path):
    report = _load_script("gpu_check_report")
    (tmp_path / "selection.log").write_text(
        "GPU selection, k = N/2\n\n"
        "       N   kernels    k+host    plan() plan wall      topk      sort  cupy.argp  topk/k\n"
        "--------------------------------------------------------------------------------------\n"
        "   1e+06      20.0      30.0      40.0      90.0     120.0     150.0      200.0    6.00\n"
        "   1e+08    1400.0    1450.0    1600.0    1700.0    2800.0    9000.0     9500.0    2.00\n\n"
        "  batch   kernels     torch  torch/k   host k   host t\n"
        "------------------------------------------------------\n"
        "    256      3.00     40.00    13.33     12.0     90.0\n"
        "   4096      6.50     60.00     9.23     12.0     95.0\n"
        "  65536     30.00    300.00    10.00     12.0     99.0\n")
    (tmp_path / "steps.tsv").write_text("6\tbench\tok\t0\t80\t110\n7a\tbench MLP\ttimed out\t124\t75\t75\n")
    rep = report.build_report(tmp_path)
    t = {r["target"]: r for r in rep["selection"]["targets"]}
    assert t["plan() at N = 1e6"]["figure"] == 40.0 and t["plan() at N = 1e6"]["met"] is True
    assert t["plan() at N = 1e8"]["met"] is False                          # 1600 > 1500
    assert t["torch.topk / plan() at N = 1e6"]["figure"] == 3.0            # 120 / 40
    assert t["torch.topk / plan() at N = 1e8"]["met"] is False             # 2800 / 1600 < 2
    assert t["observe() GPU time, batches <= 4096"]["figure"] == 6.5       # max of 3.0, 6.5
    md = report.render_markdown(rep)
    assert "| 7a | bench MLP | timed out | 124 |" in md and "no results (step 7 failed)" in md


def test_report_overhead_share_from_a_bench_run():
    report = _load_script("gpu_check_report")
    rows = report.e2e_rows({"runs": [
        {"method": "ucb", "steps": 1000, "train_s": 9.0, "select_s": 1.0, "total_s": 10.0},
        {"method": "uniform", "steps": 1000, "train_s": 9.5, "select_s": 0.5, "total_s": 10.0}]}, 100.0)
    assert rows[0]["ms_per_step"] == pytest.approx(10.0)
    assert rows[0]["overhead_share_est"] == pytest.approx((1.0 + 1000 * 100e-6) / 10.0)
    assert rows[1]["overhead_share_est"] == pytest.approx(0.05)           # uniform: no observe()


def _dry_run(tmp_path, *args, **env):
    e = {**os.environ, "TMPDIR": str(tmp_path), **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", *args],
                          capture_output=True, text=True, timeout=600, env=e)


def test_gpu_check_dry_run_passes_and_prints_the_device_call(tmp_path):
    """The dry run (what CI can check of the one-call GPU check): its own code runs on the CPU, the
    full kernel equivalence suite is among the GPU steps with its cuda backend and its time cap,
    and the calls fit the device time: the whole check, and --quick."""
    r = _dry_run(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    out = r.stdout
    assert "gpu_check --dry-run: OK" in out and "  FAIL  " not in out
    calls = [json.loads(line) for line in out.splitlines() if line.strip().startswith('{"command"')]
    assert calls[0] == {"command": "bash scripts/gpu_check.sh", "timeout_s": 240,
                        "carry": [".gpu_check"]}
    assert calls[1] == {"command": "bash scripts/gpu_check.sh --quick", "timeout_s": 85,
                        "carry": [".gpu_check"]}
    for step in ("gpuprune doctor on the CPU", "stress --dry", "sync --dry", "the report builds",
                 "benchmarks/selection.py --smoke --sections 1", "the kernel equivalence suite collects"):
        assert f"PASS  {step}" in out, step
    collected = re.search(r"equivalence suite collects (\d+) tests: (\d+) with the cuda backend", out)
    assert collected and int(collected.group(2)) >= 25 and int(collected.group(1)) > 100
    full = out.split("GPU steps of the call (budget 200 s, timeout_s 240):")[1].split("GPU steps of")[0]
    steps = dict(re.findall(r"^    (\w+)\s+(\d+) s  ", full, flags=re.M))
    assert steps["3"] and steps["3b"] and "pytest tests/test_kernel_equivalence.py -k cuda" in full
    assert "the other backends" in full and sum(map(int, steps.values())) < 300
    quick = out.split("GPU steps of --quick (budget 60 s, timeout_s 85):")[1]
    assert "kernel equivalence suite, cuda backend" in quick
    left = [p.name for p in tmp_path.iterdir()       # it cleaned up after itself (caches may stay:
            if not p.name.startswith(("gpuprune-harness-", "torchinductor_"))]   # the harness build)
    assert left == []


def test_gpu_check_dry_run_strict_fails_without_the_data(tmp_path):
    r = _dry_run(tmp_path, "--strict", "--files-only", GPU_CHECK_DATA=str(tmp_path / "nothing"))
    assert r.returncode == 1
    assert f"FAIL  data: {tmp_path / 'nothing'} lacks train-images-idx3-ubyte.gz" in r.stdout
    assert "gpu_check --dry-run: FAIL" in r.stdout


# ---------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_doctor_on_a_gpu_runs_the_kernels_and_agrees(tmp_path):
    pytest.importorskip("cupy")
    lines: list[str] = []
    rc = run_doctor("cuda", dali=False, require_kernels=True, out=lines.append,
                    json_path=tmp_path / "d.json")
    assert rc == 0, "\n".join(lines)
    rep = json.loads((tmp_path / "d.json").read_text())
    assert rep["backend"]["backend"] == "cuda" and "CUDA kernels (cuda)" in rep["candidates"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_doctor_on_a_gpu_fails_with_a_wrong_kernel_result():
    pytest.importorskip("cupy")
    from gpuprune.backend import get_backend
    dev = torch.device("cuda", torch.cuda.current_device())
    kernels = get_backend("cuda", dev, 1000)

    class Wrong(type(kernels)):
        def _top_k(self, score, n, k, seed):
            ids = super()._top_k(score, n, k, seed)
            return torch.where(ids == ids.max(), (ids.max() + 1) % n, ids) if n >= 1000 else ids
    cand = BackendImplementation(Wrong(kernels.ops), name="wrong kernels")
    lines: list[str] = []
    rc = run_doctor("cuda", dali=False, candidates=[cand], out=lines.append)
    assert rc == 1 and lines[-1].startswith("gpuprune doctor: FAIL: top_k: wrong kernels vs")


@pytest.mark.parametrize("where", ["missing-dir/d.json", "adir"])
def test_a_json_path_that_cannot_be_written_is_a_usage_error_before_the_self_test(tmp_path, capsys,
                                                                                   where):
    (tmp_path / "adir").mkdir()
    rc = cli.main(["doctor", "--device", "cpu", "--no-dali", "--json", str(tmp_path / where)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""                                    # nothing ran
    assert ("does not exist" if "missing" in where else "names a directory") in err
    assert "Traceback" not in err
