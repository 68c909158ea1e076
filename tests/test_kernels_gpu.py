"""CUDA kernels on a GPU: what only a GPU can show. (The kernel/torch equivalence suite,
``tests/test_kernel_equivalence.py``, runs on the GPU too: its ``cuda`` backend, marked gpu.)

Skipped without CUDA. With CUDA but without CuPy the tests skip too; with CuPy installed the
kernels must load (a load failure is a failure, not a skip).
"""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch

import gpuprune as gp
from gpuprune import kernels
from gpuprune.backend import KernelBackend, TorchBackend
from gpuprune.kernels import _loader
from gpuprune.keys import composite_key
from gpuprune.stats import LossStats
from gpuprune.update import observe_torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

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
    t = t.cpu()
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _same_state(a: LossStats, b: LossStats) -> bool:
    return all(torch.equal(_bits(getattr(a, k)), _bits(getattr(b, k)))
               for k in ("mean", "var", "last_epoch", "nonfinite", "invalid_batches"))


def _set(ids: torch.Tensor) -> torch.Tensor:
    return torch.sort(ids.cpu().long()).values


def _all_builds(dev, cupy):
    """KernelOps of every build that loads here: the fatbin (if built) and NVRTC (CuPy adds
    -ftz=true); and the error of each build that is there but does not load (a fatbin whose PTX
    needs a newer driver, for one: reported, and the checks go on with NVRTC)."""
    index = dev.index
    sm = torch.cuda.get_device_properties(index).multi_processor_count
    out, failed = {}, {}
    for prefer in ("fatbin", "source"):
        cands = kernels.module_candidates(prefer=prefer)
        if not cands:
            continue
        try:
            functions, kind, path = kernels.load_module(cupy, index, cands)
        except kernels.KernelsUnavailable as e:
            failed[prefer] = str(e)
            continue
        out[kind] = kernels.KernelOps(_loader.CupyRuntime(cupy, functions, index, kind, path, sm),
                                      dev, sm)
    return out, failed


def _tensors(stats: LossStats) -> tuple:
    return stats.mean, stats.var, stats.last_epoch, stats.nonfinite, stats.invalid_batches


def test_auto_picks_the_kernels_on_a_gpu(dev, ops):
    p = gp.Pruner(10, device=dev)
    assert isinstance(p.backend, KernelBackend) and p.backend.ops is ops      # memoised per device
    assert kernels.available(dev) and kernels.unavailable_reason(dev) is None
    clone = copy.deepcopy(p)                              # pickling keeps the device's kernels
    assert clone.backend.ops is ops


def test_every_build_keeps_denormals_and_matches_torch(dev, cupy):
    """NVRTC through CuPy (with its -ftz=true) and the fatbin: denormals survive, bit for bit."""
    builds, failed = _all_builds(dev, cupy)
    assert "source" in builds, failed
    if failed:
        warnings.warn(f"a build is there but does not load: {failed}")
    g = torch.Generator().manual_seed(0)
    n = 50_000
    ids = torch.randint(0, n, (3000,), generator=g)
    x = torch.tensor([1e-45, -3e-40, 2e-39, 1.1e-38, 0.5])[torch.randint(0, 5, (3000,), generator=g)]
    ref = LossStats(n)
    observe_torch(ref.tensors(), ids, x, 0.5, 1)
    observe_torch(ref.tensors(), ids.flip(0), x, 0.5, 2)
    results = []
    for kind, o in builds.items():
        got = LossStats(n, dev)
        o.observe_(*_tensors(got), ids.to(dev), x.to(dev), 0.5, 1)
        o.observe_(*_tensors(got), ids.flip(0).to(dev), x.to(dev), 0.5, 2)
        assert _same_state(ref, got), kind
        s = torch.randn(n, device=dev)
        results.append(o.top_k(s, n, n // 2, 5).cpu())
        assert o.last_total() == n // 2
    assert all(torch.equal(results[0], r) for r in results)   # ordered compaction: identical


@pytest.mark.parametrize("n", [1_000_000, 10_000_000])
def test_large_selections_match_the_reference(dev, ops, n):
    g = torch.Generator(device=dev).manual_seed(n)
    for s in (torch.randn(n, device=dev, generator=g), torch.randint(0, 3, (n,), device=dev, generator=g).float(),
              None):
        k = n // 2
        got = ops.top_k(s, n, k, 7)
        key = composite_key(s, 7, n, dev)
        want = torch.topk(key, k, sorted=False).indices
        assert torch.equal(_set(got), _set(want))
        assert ops.last_total() == k


def test_observe_is_one_launch_and_never_waits_for_the_gpu(dev, ops):
    n = 1_000_000
    stats = LossStats(n, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    batches = [(torch.randperm(n, device=dev, generator=g)[:b].int(), torch.rand(b, device=dev, generator=g))
               for b in (256, 2048, 4096)]
    for idx, x in batches:                              # warm up (first launches, allocator)
        ops.observe_(*_tensors(stats), idx, x, 0.9, 0)
    before = ops.launches
    for idx, x in batches:
        ops.observe_(*_tensors(stats), idx, x, 0.9, 1)
    assert ops.launches - before == len(batches)        # one launch per batch of <= 4096
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for idx, x in batches:
            ops.observe_(*_tensors(stats), idx, x, 0.9, 2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream = torch.cuda.current_stream(dev)
    torch.cuda._sleep(2_000_000_000)                    # ~1 s of GPU time at 2 GHz
    t0 = time.perf_counter()
    for idx, x in batches:
        ops.observe_(*_tensors(stats), idx, x, 0.9, 3)
    host_s = time.perf_counter() - t0
    busy = not stream.query()
    torch.cuda.synchronize()
    assert busy, "the GPU went idle before observe() returned: something waited for it"
    assert host_s < 0.2, f"observe took {host_s:.3f} s on the host while the GPU slept"


def test_kernels_launch_on_torchs_current_stream(dev, ops):
    stats = LossStats(10, dev)
    idx = torch.tensor([1, 2, 2, 3], device=dev)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        x = torch.ones(4, device=dev)
        torch.cuda._sleep(200_000_000)                 # the fill below waits for this on `side`
        x.fill_(5.0)
        ops.observe_(*_tensors(stats), idx, x, 0.9, 0)   # on `side`, so after the fill
        sel = ops.top_k(torch.arange(10, device=dev).float(), 10, 3, 1)
    side.synchronize()
    assert stats.mean.tolist()[:4] == [0.0, 5.0, 5.0, 5.0]
    assert sorted(sel.tolist()) == [7, 8, 9]


@pytest.mark.parametrize("policy", POLICIES)
def test_plan_syncs_at_most_once(dev, ops, policy):
    n = 100_000
    kw = dict(keep=0.5, policy=policy, seed=1, num_epochs=10, device=dev, backend="cuda")
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


def test_plan_is_one_cooperative_launch_of_resident_blocks(dev, ops):
    """gp_plan's grid never exceeds the blocks that fit at once (the driver would refuse the
    cooperative launch), and a plan over many blocks equals the torch backend's."""
    resident = ops.runtime.max_blocks("gp_plan", 256)
    assert resident >= torch.cuda.get_device_properties(dev).multi_processor_count
    n = 20_000_000
    assert ops.plan_grid(n) == min(resident, -(-n // ops.keys_per_block), 1024)
    from gpuprune.backend import TorchBackend
    from gpuprune.keys import Pick, UCBScore
    stats = LossStats(n, dev)
    g = torch.Generator(device=dev).manual_seed(3)
    stats.mean.copy_(torch.rand(n, generator=g, device=dev))
    stats.var.copy_(torch.rand(n, generator=g, device=dev))
    stats.last_epoch.copy_(torch.randint(-1, 4, (n,), generator=g, device=dev).int())
    pick = Pick(UCBScore(1.0, "std", 1.0, 5), n // 3, 11)
    before = ops.launches
    got = KernelBackend(ops).plan(stats, shuffle_seed=5, pick=pick)
    assert ops.launches - before == 1 and ops.last_total() == n // 3
    want = TorchBackend(dev).plan(stats, shuffle_seed=5, pick=pick)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.selected, want.selected)


def test_pruner_plans_identical_on_both_backends_at_scale(dev, ops):
    n = 2_000_000
    g = torch.Generator(device=dev).manual_seed(11)
    ref = gp.Pruner(n, policy="ucb", keep=0.3, seed=5, num_epochs=4, device=dev, backend="torch")
    ker = gp.Pruner(n, policy="ucb", keep=0.3, seed=5, num_epochs=4, device=dev, backend="cuda")
    assert isinstance(ref.backend, TorchBackend)
    for epoch in range(4):
        a, b = ref.plan(epoch), ker.plan(epoch)
        assert torch.equal(a.indices, b.indices), epoch
        for i in range(0, len(a), 4096 * 16):
            idx = a.indices[i:i + 4096]          # unique ids: atomics in torch's CUDA path are exact
            loss = torch.rand(idx.numel(), device=dev, generator=g)
            ref.observe(idx, loss)
            ker.observe(idx, loss)
        assert _same_state(ref.stats, ker.stats), epoch
