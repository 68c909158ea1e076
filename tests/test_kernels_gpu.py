"""CUDA kernels on a GPU: bit-for-bit equal to the torch backend, no host sync in observe, one per plan.

Skipped without CUDA. With CUDA but without CuPy the tests skip too; with CuPy installed the
kernels must load (a load failure is a failure, not a skip).
"""

from __future__ import annotations

import copy
import time
import warnings
from types import SimpleNamespace

import pytest
import torch

import gpuprune as gp
from gpuprune import kernels
from gpuprune.kernels import _loader
from gpuprune.policies.epsilon_greedy import epsilon_greedy_select, greedy_score
from gpuprune.policies.infobatch import infobatch_select
from gpuprune.policies.ucb import ucb_score
from gpuprune.select import random_k, shuffle_order, top_k_by_score

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 3.5]
POLICIES = ["uniform", "epsilon_greedy", "ucb", "infobatch", "static", "full"]


@pytest.fixture(scope="module")
def dev() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(scope="module")
def cupy():
    return pytest.importorskip("cupy")


@pytest.fixture(scope="module")
def ops(dev, cupy):
    return kernels.get_ops(dev)          # must load where CuPy is installed


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_banks_equal(ref, ker, where) -> None:
    for name in ("mean", "var", "count", "last_epoch", "nonfinite", "invalid_batches"):
        a, b = getattr(ref, name), getattr(ker, name)
        assert torch.equal(_bits(a), _bits(b)), (where, name)


def _same_set(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.numel() == b.numel() and torch.equal(torch.sort(a).values, torch.sort(b).values)


def _banks(n: int, dev, decay: float = 0.9):
    ref = gp.ScoreBank(n, device=dev, decay=decay, backend="torch")
    ker = gp.ScoreBank(n, device=dev, decay=decay, backend="cuda")
    assert ref.backend == "torch" and ker.backend == "cuda"
    return ref, ker


# ---------------------------------------------------------------- loading
def test_auto_picks_the_kernels_on_a_gpu(dev, ops):
    assert gp.ScoreBank(10, device=dev).backend == "cuda"
    assert gp.Pruner(10, device=dev).bank.kernels is ops          # memoised per device
    assert kernels.available(dev) and kernels.unavailable_reason(dev) is None
    clone = copy.deepcopy(gp.ScoreBank(10, device=dev))       # pickling keeps the device's kernels
    assert clone.kernels is ops and clone.backend == "cuda"


def test_fatbin_and_nvrtc_builds_give_the_same_results(dev, cupy):
    fat = kernels.module_candidates(prefer="fatbin")
    if not fat:
        pytest.skip("no prebuilt fatbin in the package (setup.py without nvcc)")
    index = dev.index
    sm = torch.cuda.get_device_properties(index).multi_processor_count
    built = []
    for prefer in ("fatbin", "source"):
        functions, kind, path = kernels.load_module(cupy, index, kernels.module_candidates(prefer=prefer))
        assert kind == prefer
        built.append(kernels.KernelOps(_loader.CupyRuntime(cupy, functions, index, kind, path), dev, sm))
    g = torch.Generator(device=dev).manual_seed(0)
    n = 100_003
    scores = torch.randn(n, device=dev, generator=g)
    a, b = (o.top_k_scores(scores, n // 2, 5) for o in built)
    assert torch.equal(a, b)                 # ordered compaction: identical, not just the same set
    banks = []
    for o in built:
        bank = gp.ScoreBank(n, device=dev, backend="torch")
        bank.kernels = o
        idx = torch.randint(0, n, (50_000,), device=dev, generator=torch.Generator(device=dev).manual_seed(1))
        bank.observe(idx, torch.ones(50_000, device=dev))
        banks.append(bank)
    _assert_banks_equal(*banks, "fatbin vs nvrtc")


# ---------------------------------------------------------------- observe
def _losses(b: int, g: torch.Generator, dev, dyadic: bool = False) -> torch.Tensor:
    if dyadic:   # sums of these are exact in float64, so atomics' order cannot matter
        return torch.randint(0, 64, (b,), device=dev, generator=g).float() / 8
    x = torch.randn(b, device=dev, generator=g) * torch.exp(2 * torch.randn(b, device=dev, generator=g))
    pick = torch.randint(0, len(SPECIAL) * 4, (b,), device=dev, generator=g)
    special = torch.tensor(SPECIAL, device=dev)
    return torch.where(pick < len(SPECIAL), special[pick % len(SPECIAL)], x)


@pytest.mark.parametrize("n", [1000, 100_000, 10_000_000])
def test_observe_matches_torch_cuda_bit_for_bit(dev, ops, n):
    # torch's CUDA path sums duplicates with atomics, exact (order-free) for up to two copies of an
    # id: here every id appears at most twice, with random, NaN, +-inf and +-0 losses
    g = torch.Generator(device=dev).manual_seed(n)
    for decay in (0.9, 0.0):
        ref, ker = _banks(n, dev, decay)
        for step, b in enumerate((1, 2, 255, 2048, 2049, 8192, 65536, 3)):
            if b > 2 * n:
                continue
            half = torch.randperm(n, device=dev, generator=g)[:(b + 1) // 2]
            idx = torch.cat([half, half])[:b]
            idx = idx[torch.randperm(b, device=dev, generator=g)]
            x = _losses(b, g, dev)
            ref.epoch = ker.epoch = step
            for bank in (ref, ker):
                bank.observe(idx if step % 2 else idx.int(), x)
            _assert_banks_equal(ref, ker, (n, decay, step))
    torch.cuda.synchronize()


@pytest.mark.parametrize("n", [1, 2, 1000, 100_000, 10_000_000])
def test_observe_duplicates_match_torch_cpu_bit_for_bit(dev, ops, n):
    # any multiplicity: the CPU reference sums in batch order, like the kernel; with decay 0.5 or 0
    # the weight 1 - decay**c is exact in every pow, so the results must agree to the bit
    g = torch.Generator(device=dev).manual_seed(n + 1)
    for decay in (0.5, 0.0):
        ref = gp.ScoreBank(n, device="cpu", decay=decay)
        ker = gp.ScoreBank(n, device=dev, decay=decay, backend="cuda")
        for step, b in enumerate((1, 2, 256, 2048, 2049, 8192, 65536, 3)):
            many = torch.randint(0, max(n // 50, 1), (b,), device=dev, generator=g)
            one = torch.full((b,), n - 1, device=dev)
            ref.epoch = ker.epoch = step
            for idx in (many, one):
                x = _losses(b, g, dev)
                ref.observe(idx.cpu(), x.cpu())
                ker.observe(idx, x)
                _assert_banks_equal(ref, _cpu(ker), (n, decay, step))


def _cpu(bank) -> SimpleNamespace:
    names = ("mean", "var", "count", "last_epoch", "nonfinite", "invalid_batches")
    return SimpleNamespace(**{name: getattr(bank, name).cpu() for name in names})


def test_observe_random_duplicates_close_to_torch(dev, ops):
    # many copies of random losses: torch's atomic sums may differ in the last float64 bits
    n, g = 500, torch.Generator(device=dev).manual_seed(3)
    ref, ker = _banks(n, dev)
    for _ in range(20):
        idx = torch.randint(0, n, (4096,), device=dev, generator=g)
        x = torch.rand(4096, device=dev, generator=g) * 10
        for bank in (ref, ker):
            bank.observe(idx, x)
    torch.testing.assert_close(ker.mean, ref.mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(ker.var, ref.var, rtol=1e-5, atol=1e-6)
    assert torch.equal(ker.count, ref.count)


def test_invalid_batch_is_ignored_whole_counted_and_raised_at_plan(dev, ops):
    for b in (5, 5000):
        ref = gp.Pruner(100, policy="uniform", device=dev, backend="torch")
        ker = gp.Pruner(100, policy="uniform", device=dev, backend="cuda")
        idx = torch.arange(b, device=dev) % 100
        idx[b // 2] = 100 if b == 5 else -7
        x = torch.ones(b, device=dev)
        x[0] = float("nan")
        for p in (ref, ker):
            p.observe(idx, x)                           # no error here: that would need a sync
        _assert_banks_equal(ref.bank, ker.bank, b)
        assert int(ker.bank.invalid_batches) == 1 and int(ker.bank.nonfinite) == 0
        assert int(ker.bank.count.sum()) == 0
        for p in (ref, ker):
            with pytest.raises(ValueError, match=r"outside \[0, 100\) in 1 batch"):
                p.plan(1)
            assert p.plan(1).epoch == 1                 # the counter was reset


def test_observe_never_waits_for_the_gpu(dev, ops):
    pruner = gp.Pruner(1_000_000, policy="ucb", device=dev, backend="cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    batches = [(torch.randint(0, 1_000_000, (b,), device=dev, generator=g),
                torch.rand(b, device=dev, generator=g)) for b in (256, 2048, 65536)]
    for idx, x in batches:                              # warm up (first launches, allocator)
        pruner.observe(idx, x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for idx, x in batches:
            pruner.observe(idx, x)
            pruner.bank.observe(idx.int(), x.half())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # set_sync_debug_mode sees torch's syncs only: also check the host returns while the GPU is busy
    stream = torch.cuda.current_stream(dev)
    torch.cuda._sleep(2_000_000_000)                    # ~1 s of GPU time at 2 GHz
    t0 = time.perf_counter()
    for idx, x in batches:
        pruner.observe(idx, x)
    host_s = time.perf_counter() - t0
    busy = not stream.query()
    torch.cuda.synchronize()
    assert busy, "the GPU went idle before observe() returned: something waited for it"
    assert host_s < 0.2, f"observe took {host_s:.3f} s on the host while the GPU slept"


def test_kernels_launch_on_torchs_current_stream(dev, ops):
    bank = gp.ScoreBank(10, device=dev, backend="cuda")
    idx = torch.tensor([1, 2, 2, 3], device=dev)         # (a host copy: made before the sleep)
    side = torch.cuda.Stream(dev)                        # non-blocking: no implicit ordering
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        x = torch.ones(4, device=dev)
        torch.cuda._sleep(200_000_000)                 # the fill below waits for this on `side`
        x.fill_(5.0)
        bank.observe(idx, x)                           # on `side`, so after the fill
    side.synchronize()
    assert bank.mean.tolist()[:4] == [0.0, 5.0, 5.0, 5.0]


# ---------------------------------------------------------------- selection
def _scores(n: int, kind: str, g: torch.Generator, dev) -> torch.Tensor:
    if kind == "random":
        return torch.randn(n, device=dev, generator=g)
    if kind == "equal":
        return torch.full((n,), 0.25, device=dev)
    if kind == "special":
        return torch.tensor(SPECIAL, device=dev)[torch.randint(0, len(SPECIAL), (n,), device=dev,
                                                               generator=g)]
    return torch.randint(0, 3, (n,), device=dev, generator=g).float()


@pytest.mark.parametrize("n", [1, 2, 3, 1000, 4097, 100_000, 1_000_000, 10_000_000])
def test_top_k_and_random_k_match_torch(dev, ops, n):
    g = torch.Generator(device=dev).manual_seed(n)
    ks = sorted({0, 1, n // 2, n - 1, n} - {-1}) if n <= 100_000 else [n // 2, n - 1]
    for kind in ("random", "equal", "special", "ties"):
        s = _scores(n, kind, g, dev)
        for k in ks:
            for seed in (0, 2**64 - 1):
                assert _same_set(ops.top_k_scores(s, k, seed), top_k_by_score(s, k, seed)), (kind, k)
    for k in ks:
        assert _same_set(ops.random_k(n, k, 9), random_k(n, k, 9, dev)), k


def _random_bank(n: int, g: torch.Generator, kind: str, dev) -> gp.ScoreBank:
    bank = gp.ScoreBank(n, device=dev, backend="cuda")
    bank.mean.copy_(_scores(n, kind, g, dev).abs())
    bank.var.copy_(_scores(n, kind, g, dev))
    bank.count.copy_(torch.randint(0, 3, (n,), device=dev, generator=g, dtype=torch.int32))
    return bank


@pytest.mark.parametrize("n", [1, 5, 1000, 100_000, 1_000_000])
def test_policy_selections_match_torch(dev, ops, n):
    g = torch.Generator(device=dev).manual_seed(7 + n)
    for kind in ("random", "equal", "special", "ties"):
        bank = _random_bank(n, g, kind, dev)
        for k in sorted({1, n // 2, max(n - 1, 1), n}):
            for c, unc in ((1.0, "std"), (0.3, "var"), (0.0, "std")):
                want = top_k_by_score(ucb_score(bank.mean, bank.var, bank.seen, c, unc), k, 11)
                assert _same_set(ops.ucb(bank, k, 11, c, unc), want), (kind, k, c, unc)
            for eps in (0.0, 0.1, 1.0):
                want = epsilon_greedy_select(greedy_score(bank), k, eps, (3, 2**63 + 5))
                assert _same_set(ops.epsilon_greedy(bank, k, eps, (3, 2**63 + 5)), want), (kind, k, eps)
        for ratio in (0.0, 0.5, 0.999):
            idx, w = ops.infobatch(bank, ratio, 5)
            ref_idx, ref_w = infobatch_select(bank.mean, bank.seen, ratio, 5)
            a, b = torch.argsort(idx), torch.argsort(ref_idx)
            assert torch.equal(idx[a], ref_idx[b]) and torch.equal(w[a], ref_w[b]), (kind, ratio)


def test_shuffle_matches_torch(dev, ops):
    ids = torch.randperm(2_000_000, device=dev)[:700_001]
    assert torch.equal(ops.shuffle_order(ids, 123), shuffle_order(ids, 123))


@pytest.mark.parametrize("policy", POLICIES)
def test_pruner_plans_are_identical_on_both_backends(dev, ops, policy):
    n = 200_000
    g = torch.Generator(device=dev).manual_seed(11)
    kw = dict(keep=0.3, policy=policy, seed=5, num_epochs=6, device=dev)
    if policy == "static":
        kw["static_scores"] = torch.randn(n, device=dev, generator=g)
    ref, ker = gp.Pruner(n, backend="torch", **kw), gp.Pruner(n, backend="cuda", **kw)
    losses = torch.rand(n, device=dev, generator=g) * 3
    losses[::97] = float("nan")
    for epoch in range(6):
        p_ref, p_ker = ref.plan(epoch), ker.plan(epoch)
        assert torch.equal(p_ref.indices, p_ker.indices), epoch
        assert (p_ref.weights is None) == (p_ker.weights is None)
        if p_ref.weights is not None:
            assert torch.equal(p_ref.weights, p_ker.weights)
        for i in range(0, len(p_ref), 4096):
            idx = p_ref.indices[i:i + 4096]
            for p in (ref, ker):
                p.observe(idx, losses[idx] * (1 + epoch))
        _assert_banks_equal(ref.bank, ker.bank, epoch)


@pytest.mark.parametrize("policy", POLICIES)
def test_plan_syncs_at_most_once(dev, ops, policy):
    n = 100_000
    kw = dict(keep=0.5, policy=policy, seed=1, num_epochs=10, device=dev, backend="cuda")
    if policy == "static":
        kw["static_scores"] = torch.rand(n, device=dev)
    pruner = gp.Pruner(n, **kw)
    idx = torch.arange(n, device=dev)
    pruner.plan(0)                                     # warm-up
    pruner.observe(idx, torch.rand(n, device=dev))
    torch.cuda.synchronize()
    for epoch in (1, 2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                pruner.plan(epoch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) <= 1, [str(w.message) for w in syncs]
