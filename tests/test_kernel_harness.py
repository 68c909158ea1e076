"""The concurrency harness itself: it runs blocks at once, enforces the CUDA rules it claims to, finds
the race of the pre-fix bucket scan, and a ThreadSanitizer replay of the real kernels is clean.

The equivalence of the kernels with torch is ``tests/test_kernel_equivalence.py``; this file proves
that the harness behind it can fail.
"""

from __future__ import annotations

import re

import pytest
import torch

from gpuprune.backend import TorchBackend
from gpuprune.kernels import KernelOps
from gpuprune.kernels._spec import CONSTANTS, CTL_OFFSETS, PLAN_ARGS, SIGNATURES
from gpuprune.stats import LossStats

import kernel_harness as kh

pytestmark = pytest.mark.skipif(kh.find_compiler() is None, reason="the harness needs g++")

RULES = kh.RACY_PICK_BUCKET.parent / "rule_breakers.cu"
RULE_KERNELS = {"k_barrier_divergence": "p", "k_exited_lane": "p", "k_shfl_outside_mask": "p",
                "k_not_in_mask": "p", "k_dropout": "p", "k_shared_uninit": "p",
                "k_all_blocks_meet": "pp", "k_warp_sum": "pp"}


@pytest.fixture(scope="module")
def rules():
    text = RULES.read_text()
    lib = kh.build_library(text, slots=3, signatures=RULE_KERNELS)
    return kh.HarnessRuntime(lib, text, slots=3, timeout_s=120.0, signatures=RULE_KERNELS)


def _run(rt, name, grid, block, *args):
    rt.launch(name, (grid,), (block,), args)


# ---------------------------------------------------------------- the model's rules are enforced
@pytest.mark.parametrize("kernel, message", [
    ("k_barrier_divergence", r"barrier divergence: .* line \d+ while others wait at line \d+"),
    # lane 5 exits before the others vote, or while they wait for it: either way it is named
    ("k_exited_lane", r"__ballot_sync mask 0xffffffff names lanes that have exited \(0x00000020\)|"
                      r"lane 5 exited while lanes 0x[0-9a-f]+ wait for it in __ballot_sync"),
    ("k_shfl_outside_mask", r"__shfl_sync: lane \d+ reads lane 20, outside the mask 0x0000ffff"),
    ("k_not_in_mask", r"__ballot_sync with mask 0x00000002 not naming the calling lane"),
])
def test_rule_violations_are_reported(rules, kernel, message):
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(kh.HarnessError, match=message):
        _run(rules, kernel, 1, 64, out)
    _run(rules, "k_dropout", 1, 64, out)                   # the harness is usable afterwards


def test_exited_threads_drop_out_of_barriers(rules):
    out = torch.zeros(3, dtype=torch.int32)
    _run(rules, "k_dropout", 3, 96, out)                    # 16 of 96 threads reach the barrier
    assert out.tolist() == [16, 16, 16]


def test_shared_memory_is_per_block_and_uninitialised(rules):
    out = torch.zeros(6 * 64, dtype=torch.int32)
    _run(rules, "k_shared_uninit", 6, 64, out)              # 6 blocks on 3 slots: slots are reused
    assert (out.view(torch.int64) == int.from_bytes(b"\xa5" * 8, "little", signed=True)).all()


def test_blocks_run_at_once_up_to_the_slots(rules):
    counter, out = torch.zeros(1, dtype=torch.int32), torch.zeros(3, dtype=torch.int32)
    _run(rules, "k_all_blocks_meet", 3, 32, counter, out)   # 3 blocks, 3 slots: they meet
    assert out.tolist() == [1, 1, 1]
    counter.zero_()
    rules2 = kh.HarnessRuntime(rules.library, RULES.read_text(), slots=2, timeout_s=2.0,
                               signatures=RULE_KERNELS)
    with pytest.raises(kh.HarnessError, match="did not finish within 2 s"):   # 3 blocks, 2 slots
        _run(rules2, "k_all_blocks_meet", 3, 32, counter, out)


def test_warp_shuffle_of_64_bit_values(rules):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2**62, (128,), generator=g)
    out = torch.zeros(4, dtype=torch.int64)
    _run(rules, "k_warp_sum", 2, 64, x, out)
    assert out.tolist() == [int(v) for v in x.view(4, 32).sum(1)]


def test_launches_above_launch_bounds_and_residency_are_refused():
    ops = kh.harness_ops(slots=2)
    args = [None] * len(SIGNATURES["gp_plan"])
    with pytest.raises(kh.HarnessError, match=r"gp_plan launched with 512 threads per block, "
                                              r"above its __launch_bounds__\(256\)"):
        ops.runtime.launch("gp_plan", (1,), (512,), tuple(args))
    # a cooperative launch needs every block resident: 3 blocks do not fit 2 slots
    with pytest.raises(kh.HarnessError, match=r"cooperative launch of gp_plan with 3 blocks, more "
                                              r"than the 2 that can be resident"):
        ops.runtime.launch("gp_plan", (3,), (256,), tuple(args), cooperative=True)
    assert ops.plan_grid(10**6) == 2 and ops.plan_grid(100) == 1


# ---------------------------------------------------------------- gp_plan's bound guard
def test_plan_never_writes_past_its_capacity():
    """gp_plan writes no position at or past k, whatever the count: a full plan of 9000 samples
    given room for 100 (index order) writes ids 0..99 and leaves a canary after them intact; the
    control block shows the overflow (total 9000) and is left clean."""
    ops = kh.harness_ops(slots=3, keys_per_block=1024)
    n, k = 9000, 100
    key, ctl, marks = ops._scratch_for(n)
    out = torch.full((k + 64,), -7, dtype=torch.int32)   # a canary tail after the k slots
    values = {name: None for name, _ in PLAN_ARGS}
    values.update(n=n, k=k, flags=CONSTANTS["GP_PLAN_FULL"], out=out, ctl=ctl, marks=marks,
                  hi=torch.empty(1, dtype=torch.int32), cand=torch.empty(1, dtype=torch.int32))
    values.update({name: 0 for name, kind in PLAN_ARGS if values[name] is None and kind != "p"})
    ops._launch("gp_plan", 3, CONSTANTS["GP_SEL_THREADS"], *(values[name] for name, _ in PLAN_ARGS),
                cooperative=True)
    assert out[:k].tolist() == list(range(k))            # index order
    assert (out[k:] == -7).all()                         # nothing past k
    assert ops.last_total() == n                         # the overflow is visible
    words = ctl.view(torch.int32)
    hist = CTL_OFFSETS["hist"] // 4
    assert int(words[hist:].abs().sum()) == 0 and int(words[CTL_OFFSETS["bar_count"] // 4]) == 0
    assert int(marks.abs().sum()) == 0


# ---------------------------------------------------------------- the pre-fix race is caught
def test_harness_catches_the_racy_bucket_scan_by_its_wrong_count():
    """The pre-fix bucket scan (tests/kernel_harness/racy_pick_bucket.cu) under real concurrency:
    some selection of k = n/2 at n = 20000 has the wrong count or set (the fixed kernel: never)."""
    ops = kh.harness_ops(source_text=kh.racy_source(), slots=2, build_slots=2, chaos=100,
                         keys_per_block=4096)
    ref = TorchBackend(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    n, k = 20000, 10000
    seen = []
    for trial in range(40):                           # stops at the first wrong selection
        s = torch.randn(n, generator=g)
        got = ops.top_k(s, n, k, trial)
        total = ops.last_total()
        same = total == k and torch.equal(got.long(), torch.sort(ref.top_k(s, n, k, trial)).values)
        seen.append((total, same))
        if not same:
            break
    assert not seen[-1][1], f"40 selections, all right: the race went unseen {seen[:5]}"


@pytest.fixture(scope="module")
def tsan():
    if not kh.tsan_runtime_available():
        pytest.skip("ThreadSanitizer runtime (libtsan) not installed")
    return kh


def _record_selections(n: int = 6000) -> kh.RecordingRuntime:
    rec = kh.RecordingRuntime(kh.HarnessRuntime(kh.build_library(), slots=4))
    ops = KernelOps(rec, torch.device("cpu"), keys_per_block=1024)   # 4 blocks = the slots
    g = torch.Generator().manual_seed(1)
    ops.top_k(torch.randn(n, generator=g), n, n // 2, 5)
    ops.top_k(torch.randint(0, 3, (n,), generator=g).float(), n, 777, 6)   # ties: hash passes
    return rec


def _record_plans(rec: kh.RecordingRuntime, n: int = 5000) -> None:
    """Every phase of gp_plan: drift scale, InfoBatch's mean, both selections, given ids, full
    plans, the previous plan's bits, counts and the rescaled bits."""
    ops = KernelOps(rec, torch.device("cpu"), keys_per_block=1024)
    g = torch.Generator().manual_seed(3)
    st = LossStats(n)
    st.mean.copy_(torch.randint(0, 4, (n,), generator=g).float())
    st.var.copy_(torch.rand(n, generator=g))
    st.last_epoch.copy_(torch.randint(-1, 3, (n,), generator=g).int())
    inputs = dict(mean=st.mean, var=st.var, last_epoch=st.last_epoch)
    prev = torch.randperm(n, generator=g)[:1000].int()
    C = CONSTANTS
    ops.plan(n, mode=C["GP_SCORE_UCB_STD"], params=(1.0, 1.0, 4.0), k=2000, seed=1,
             shuffle_seed=2, selected=st.selected, prev=prev, prev_size=1000, **inputs)
    ops.plan(n, mode=C["GP_SCORE_BELOW_MEAN"], below_share=0.3, seed=3, shuffle_seed=4,
             selected=st.selected, **inputs)
    ops.plan(n, mode=C["GP_SCORE_MEAN"], k=1500, explore=400, seed=5, explore_seed=6,
             shuffle_seed=7, prev_size=n, **inputs)
    ops.plan(n, ids=prev, shuffle_seed=8, selected=st.selected, prev=prev, prev_size=1000)
    ops.plan(n, full=True, shuffle_seed=9, prev=prev, prev_size=1000)


def test_tsan_is_clean_on_the_real_kernels(tsan, tmp_path):
    """ThreadSanitizer replay of launch sequences recorded from ops.py: no report, same bytes."""
    exe = kh.build_replay()
    rec = _record_selections()
    ops = KernelOps(rec, torch.device("cpu"))
    ops.top_k(None, 5000, 1234, 7)
    _record_plans(rec)
    g = torch.Generator().manual_seed(2)
    stats = LossStats(500)
    t = (stats.mean, stats.var, stats.last_epoch, stats.nonfinite, stats.invalid_batches)
    ops.observe_(*t, torch.randint(0, 500, (200,), generator=g), torch.randn(200, generator=g),
                 0.9, 1)                                                      # duplicate path
    ops.observe_(*t, torch.randperm(500, generator=g)[:300].int(), torch.randn(300, generator=g),
                 0.9, 2)                                                      # unique path
    ops.observe_(*t, torch.randint(0, 500, (4500,), generator=g), torch.randn(4500, generator=g),
                 0.9, 3)                                                      # sorted path
    trace = rec.write(tmp_path / "trace.bin")
    assert [name for name, *_ in rec.launches] == ["gp_plan"] * 8 + ["gp_observe_small"] * 2 + [
        "gp_observe_sorted"]
    assert {grid for name, grid, *_ in rec.launches if name == "gp_plan"} == {1, 4}   # 4: the slots
    proc = kh.replay(exe, trace, slots=4)
    assert "ThreadSanitizer" not in proc.stderr, proc.stderr[:6000]
    assert proc.returncode == 0, proc.stdout + proc.stderr[:3000]
    assert f"replayed {len(rec.launches)} launches: 0 buffer mismatches" in proc.stdout


def test_tsan_reports_the_racy_bucket_scan(tsan, tmp_path):
    exe = kh.build_replay(kh.racy_source())
    rec = _record_selections()                        # recorded with the fixed kernels
    trace = rec.write(tmp_path / "trace.bin")
    proc = kh.replay(exe, trace, slots=4)
    assert proc.returncode == 66, proc.stdout + proc.stderr[:3000]
    report = proc.stderr
    assert "WARNING: ThreadSanitizer: data race" in report
    # the write of `need` in ctl_apply races with the late read in the bucket scan
    race = report.split("WARNING: ThreadSanitizer: data race")[1]
    assert re.search(r"#0 (ctl_apply|pick_bucket) .*kernels\.cu", race) and "gp_plan" in race, race[:3000]
    offset = CTL_OFFSETS["need"]
    assert re.search(r"Location is heap block of size \d+ at 0x([0-9a-f]+)", race)
    addr = int(re.search(r"of size 4 at 0x([0-9a-f]+)", race).group(1), 16)
    block = int(re.search(r"heap block of size \d+ at 0x([0-9a-f]+)", race).group(1), 16)
    assert addr - block == offset, (hex(addr), hex(block))


# ---------------------------------------------------------------- AddressSanitizer
@pytest.fixture(scope="module")
def asan():
    if not kh.sanitizer_available("address"):
        pytest.skip("AddressSanitizer runtime (libasan) not installed")
    return kh


def _record_observes(rec) -> None:
    ops = KernelOps(rec, torch.device("cpu"))
    g = torch.Generator().manual_seed(4)
    stats = LossStats(600)
    t = (stats.mean, stats.var, stats.last_epoch, stats.nonfinite, stats.invalid_batches)
    ops.observe_(*t, torch.randint(0, 600, (300,), generator=g), torch.randn(300, generator=g),
                 0.9, 1)                                                      # duplicate path
    ops.observe_(*t, torch.randperm(600, generator=g)[:200].int(), torch.randn(200, generator=g),
                 0.9, 2)                                                      # unique path
    ops.observe_(*t, torch.randint(0, 600, (4500,), generator=g).int(),
                 torch.randn(4500, generator=g), 0.9, 3)                      # sorted path


def test_asan_is_clean_on_the_real_kernels(asan, tmp_path):
    """AddressSanitizer replay of every kernel's launches (every buffer its exact size): no
    report, the same bytes."""
    rec = _record_selections(n=3000)
    _record_plans(rec, n=3000)
    _record_observes(rec)
    trace = rec.write(tmp_path / "trace.bin")
    proc = kh.replay(kh.build_replay(sanitizer="address"), trace, slots=4)
    assert "AddressSanitizer" not in proc.stderr, proc.stderr[:6000]
    assert proc.returncode == 0, proc.stdout + proc.stderr[:3000]
    assert f"replayed {len(rec.launches)} launches: 0 buffer mismatches" in proc.stdout


@pytest.mark.parametrize("mutation", ["sorted_off_by_one", "plan_write_past_out"])
def test_asan_reports_an_out_of_bounds_access(asan, tmp_path, mutation):
    """The check can fail. sorted_off_by_one: gp_observe_sorted's range check reads the sorted id
    one past the batch (the bug that once showed only as a crash); plan_write_past_out: gp_plan's
    bound guard lets one id past `out`. Replayed under ASan with exact buffer sizes, each is reported
    as a heap-buffer-overflow in its kernel."""
    src = kh.SOURCE.read_text()
    if mutation == "sorted_off_by_one":
        bad = src.replace("if (GP_SID(0) < 0 || GP_SID(B - 1) >= N) {",
                          "if (GP_SID(0) < 0 || GP_SID(B) >= N) {")
        kernel = "gp_observe_sorted"
    else:
        bad = src.replace("if (pos < (u64)k) out[pos] = (int)i;", "if (pos <= (u64)k) out[pos] = (int)i;")
        kernel = "gp_plan"
    assert bad != src
    rec = kh.RecordingRuntime(kh.HarnessRuntime(kh.build_library(), slots=4))
    if mutation == "sorted_off_by_one":
        _record_observes(rec)
    else:           # a full plan given room for k = 100 of 300 ids, in index order
        ops = KernelOps(rec, torch.device("cpu"))
        _, ctl, marks = ops._scratch_for(300)
        values = {name: None for name, _ in PLAN_ARGS}
        values.update(n=300, k=100, flags=CONSTANTS["GP_PLAN_FULL"], ctl=ctl, marks=marks,
                      out=torch.empty(100, dtype=torch.int32), hi=torch.empty(1, dtype=torch.int32),
                      cand=torch.empty(1, dtype=torch.int32))
        values.update({name: 0 for name, kind in PLAN_ARGS if values[name] is None and kind != "p"})
        ops._launch("gp_plan", 1, CONSTANTS["GP_SEL_THREADS"],
                    *(values[name] for name, _ in PLAN_ARGS), cooperative=True)
    trace = rec.write(tmp_path / "trace.bin")
    proc = kh.replay(kh.build_replay(bad, sanitizer="address"), trace, slots=4)
    assert proc.returncode == 67, proc.stdout + proc.stderr[:3000]
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in proc.stderr
    frames = proc.stderr.split("heap-buffer-overflow", 1)[1].split("\n\n")[0]
    assert kernel in frames, frames[:3000]
