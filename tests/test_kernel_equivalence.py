"""The backends agree bit for bit: one suite, run for every backend.

``backend`` is parametrised over

* ``torch``: :class:`gpuprune.backend.TorchBackend` on the CPU (the reference implementation, with
  its numpy paths);
* ``torch-generic``: the same without the numpy paths: the torch operations a GPU runs;
* ``harness``: :class:`gpuprune.backend.KernelBackend` over the real kernel source in the
  concurrency harness (``tests/kernel_harness``): every CUDA thread an OS thread, four blocks at a
  time, gp_plan with 1024 samples per block (so N >= 2048 runs on several blocks that meet at grid
  barriers), with schedule perturbation;
* ``harness-serial``: the same, one block at a time (N <= 4096: other geometries are swept by
  ``test_plans_across_grid_shapes``);
* ``cuda``: the kernels on a GPU through CuPy (skipped without one; the GPU check runs it).

Every result is compared with a reference computed independently on the CPU: for selections, a full
sort of the unique keys of :mod:`gpuprune.keys`; for plans, that sort plus the permutation of
:func:`gpuprune.keys.permute_ranks`, and the torch backend's plan; for the statistics,
:func:`gpuprune.update.observe_groups`; for Pruner runs, a Pruner on the torch backend. Inputs
include ties, NaN, +-inf, +-0, denormals, huge values and duplicate ids of any multiplicity.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gpuprune as gp
from gpuprune.backend import KernelBackend, TorchBackend
from gpuprune.keys import (BelowMeanScore, GivenScore, MeanScore, Pick, UCBScore, composite_key,
                           permute_ranks)
from gpuprune.stats import LossStats
from gpuprune.update import observe_distinct_cpu, observe_groups, observe_torch, prepare_losses

import kernel_harness as kh

DENORMALS = [1e-45, -1e-45, 1e-40, -2.5e-39, 1.1e-38]
SPECIAL = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 3.5, 3e38, -3e38,
           *DENORMALS]
HARNESS_GEOMETRY = {"harness": dict(slots=4, chaos=10, keys_per_block=1024),
                    "harness-serial": dict(slots=1, chaos=0)}


@pytest.fixture(scope="module", params=["torch", "torch-generic", "harness", "harness-serial",
                                        pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request):
    name = request.param
    if name == "torch":
        return TorchBackend(torch.device("cpu"))
    if name == "torch-generic":
        return TorchBackend(torch.device("cpu"), cpu_fast_paths=False)
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        pytest.importorskip("cupy")
        from gpuprune import kernels
        return KernelBackend(kernels.get_ops(torch.device("cuda", torch.cuda.current_device())))
    if kh.find_compiler() is None:
        pytest.skip("the harness needs g++")
    return KernelBackend(kh.harness_ops(**HARNESS_GEOMETRY[name]))


def _is_harness(backend) -> bool:
    return isinstance(backend, KernelBackend) and backend.device.type == "cpu"


def _is_serial(backend) -> bool:
    return _is_harness(backend) and backend.ops.runtime.slots == 1


def _skip_large_serial(backend, n: int) -> None:
    if _is_serial(backend) and n > 4096:
        pytest.skip("large N runs on the concurrent harness geometry")


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.cpu()
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_same_state(ref: LossStats, got: LossStats, where) -> None:
    for name in ("mean", "var", "last_epoch", "nonfinite", "invalid_batches"):
        a, b = getattr(ref, name), getattr(got, name)
        assert torch.equal(_bits(a), _bits(b)), (where, name, a, b)


def _losses(b: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(b, generator=g) * torch.exp(2 * torch.randn(b, generator=g))
    pick = torch.randint(0, len(SPECIAL) * 3, (b,), generator=g)
    return torch.where(pick < len(SPECIAL), torch.tensor(SPECIAL)[pick % len(SPECIAL)], x)


def _reference_top_k(score: torch.Tensor | None, n: int, k: int, seed: int) -> torch.Tensor:
    """The k largest unique keys by a full (stable) sort: independent of every top-k algorithm."""
    key = composite_key(None if score is None else score.cpu(), seed, n, "cpu")
    return torch.sort(torch.argsort(key, descending=True, stable=True)[:k]).values


def _as_set(ids: torch.Tensor) -> torch.Tensor:
    return torch.sort(ids.cpu().long()).values


# ---------------------------------------------------------------- observe
def test_observe_hand_computed(backend):
    dev = backend.device
    stats = LossStats(3, dev)
    backend.observe_(stats.tensors(), torch.tensor([0, 0, 1], device=dev),
                     torch.tensor([1.0, 3.0, 2.0], device=dev), 0.5, 0)
    # sample 0: first visit, a group of two: mean 2, within-group variance 1
    assert stats.mean.tolist() == [2.0, 2.0, 0.0] and stats.var.tolist() == [1.0, 0.0, 0.0]
    backend.observe_(stats.tensors(), torch.tensor([0, 2], device=dev),
                     torch.tensor([4.0, float("nan")], device=dev), 0.5, 4)
    # a = 1 - 0.5 = 0.5: mean 2 + 0.5 * 2 = 3, var 0.5 * 1 + 0.25 * 2**2 = 1.5; the NaN is skipped
    assert stats.mean.tolist() == [3.0, 2.0, 0.0] and stats.var.tolist() == [1.5, 0.0, 0.0]
    assert stats.last_epoch.tolist() == [4, 0, -1] and int(stats.nonfinite) == 1


def _batches(n: int):
    """(size, kind) of a sequence of batches: both observe kernels, the sort-free unique path and
    the duplicate path, one id many times."""
    out = [(1, "any"), (2, "any"), (5, "any"), (64, "one"), (300, "unique"), (1000, "any"),
           (3, "any")]
    if n >= 1000:
        out += [(4096, "any"), (4097, "any"), (n, "unique"), (2500, "unique"), (4500, "any")]
    return out


@pytest.mark.parametrize("decay", [0.9, 0.5, 0.0])
def test_observe_matches_reference(backend, decay):
    dev = backend.device
    g = torch.Generator().manual_seed(int(decay * 100) + 1)
    for n in (1, 37, 3000):
        ref, got = LossStats(n), LossStats(n, dev)
        for step, (b, kind) in enumerate(_batches(n)):
            if kind == "unique":
                b = min(b, n)
                idx = torch.randperm(n, generator=g)[:b]
            else:
                idx = torch.randint(0, n, (b,), generator=g)
                if kind == "one":
                    idx[:] = idx[0]
            x = _losses(b, g)
            if step == 5:
                x = x.double()
                x[::7] = 1e300                                    # saturates to +-3.4e38
            observe_groups(ref.tensors(), idx, prepare_losses(x), decay, step)
            ids = idx.to(torch.int32) if step % 2 else idx
            backend.observe_(got.tensors(), ids.to(dev), x.to(dev), decay, step)
            _assert_same_state(ref, got, (n, step, b, kind))
        assert int(got.nonfinite) > 0
        assert torch.isfinite(got.mean).all() and torch.isfinite(got.var).all()


@pytest.mark.parametrize("decay", [0.9, 0.5, 0.0, 0.999])
def test_cpu_fast_path_for_distinct_ids_equals_the_general_update(decay):
    """The torch backend's CPU path for distinct ids (no sort, no segment sums, no decay ** c)
    gives the bits of the general update: losses -0.0 on a mean of +0.0, NaN/inf skipped,
    denormals, 3e38 and huge float64 losses, first and later visits, int32/int64/uint8 ids."""
    g = torch.Generator().manual_seed(int(decay * 1000) + 7)
    n = 300
    fast, slow = LossStats(n), LossStats(n)
    for step in range(12):
        b = [1, 2, 40, 255, 256, 300][step % 6]
        idx = torch.randperm(n, generator=g)[:b]
        x = _losses(b, g)
        x[::5] = -0.0
        if step == 3:
            x = x.double()
            x[::4] = -1e300
        if step % 3 == 1:
            idx = idx.to(torch.int32)
        losses = prepare_losses(x)
        assert observe_distinct_cpu(fast.tensors(), idx, losses, decay, step)
        observe_groups(slow.tensors(), idx, losses, decay, step)
        _assert_same_state(slow, fast, (decay, step, b))
    small = torch.tensor([7, 0, 250], dtype=torch.uint8)
    assert observe_distinct_cpu(fast.tensors(), small, torch.tensor([1.0, -0.0, 2.5]), decay, 20)
    observe_groups(slow.tensors(), small, torch.tensor([1.0, -0.0, 2.5]), decay, 20)
    _assert_same_state(slow, fast, "uint8 ids")
    assert int(fast.nonfinite) > 0 and (fast.mean.abs() > 1e37).any()
    assert (fast.var > 0).any() == (decay > 0)               # decay 0 keeps the last loss only
    # a repeated id: the fast path declines and changes nothing; observe_torch takes the general one
    before = fast.clone()
    dup = torch.tensor([5, 9, 5])
    assert not observe_distinct_cpu(fast.tensors(), dup, torch.tensor([1.0, 2.0, 3.0]), decay, 21)
    _assert_same_state(before, fast, "declined")
    observe_torch(fast.tensors(), dup, torch.tensor([1.0, 2.0, 3.0]), decay, 21)
    observe_groups(slow.tensors(), dup, torch.tensor([1.0, 2.0, 3.0]), decay, 21)
    _assert_same_state(slow, fast, "duplicates")


def test_observe_keeps_denormals(backend):
    """Denormal losses, means and variances are not flushed to zero (the NVRTC -ftz=true hazard)."""
    dev = backend.device
    n = 8
    ref = LossStats(n)
    ref.mean.copy_(torch.tensor([1e-40, -3e-39, 2e-45, 0.0, 1e-38, -1e-45, 5e-39, 1.0]))
    ref.var.copy_(torch.tensor([1e-41, 2e-39, 1e-45, 3e-40, 0.0, 1e-45, 1e-39, 1e-44]))
    ref.last_epoch.copy_(torch.tensor([0, 0, 0, -1, 0, 0, 0, 0], dtype=torch.int32))
    got = LossStats(n, dev)
    for name in ("mean", "var", "last_epoch"):
        getattr(got, name).copy_(getattr(ref, name))
    for step, (ids, x) in enumerate([
            ([0, 1, 2, 3, 4, 5, 6, 7], [3e-40, -1e-39, 1e-45, 7e-39, 2e-38, 1e-45, -5e-39, 1e-40]),
            ([0, 0, 2, 2, 2, 6], [1e-40, 2e-40, -1e-45, 1e-45, 3e-45, 1e-39])]):
        idx, loss = torch.tensor(ids), torch.tensor(x)
        observe_groups(ref.tensors(), idx, loss, 0.5, step + 1)
        backend.observe_(got.tensors(), idx.to(dev), loss.to(dev), 0.5, step + 1)
        _assert_same_state(ref, got, step)
    tiny = got.mean.cpu().abs()
    assert ((tiny > 0) & (tiny < 1.1754944e-38)).sum() >= 4        # denormal results survive
    # hand-computed: sample 3, first visit with 7e-39: the mean is the loss itself
    assert got.mean.cpu()[3].item() == torch.tensor(7e-39).item()


def test_invalid_batch_is_ignored_whole_and_counted(backend):
    if backend.device.type == "cpu" and not isinstance(backend, KernelBackend):
        pytest.skip("the CPU torch path relies on the caller's range check (Pruner.observe)")
    dev = backend.device
    for b in (3, 3000, 5000):                     # small unique, small duplicate, sorted paths
        stats = LossStats(10, dev)
        idx = torch.arange(b) % 10
        idx[b // 2] = 10 if b == 3 else -1
        x = torch.ones(b)
        x[0] = float("nan")
        backend.observe_(stats.tensors(), idx.to(dev), x.to(dev), 0.9, 1)
        assert int(stats.invalid_batches) == 1 and int(stats.nonfinite) == 0
        assert int((stats.last_epoch >= 0).sum()) == 0 and float(stats.mean.abs().sum()) == 0.0


# ---------------------------------------------------------------- selection
def _scores(n: int, kind: str, g: torch.Generator) -> torch.Tensor | None:
    if kind == "random":
        return torch.randn(n, generator=g)
    if kind == "equal":
        return torch.full((n,), 0.25)
    if kind == "special":
        return torch.tensor(SPECIAL)[torch.randint(0, len(SPECIAL), (n,), generator=g)]
    if kind == "denormal":
        return torch.tensor(DENORMALS + [0.0, -0.0])[torch.randint(0, 7, (n,), generator=g)]
    if kind == "hash":
        return None
    return torch.randint(0, 3, (n,), generator=g).float()          # heavy ties


@pytest.mark.parametrize("n", [1, 2, 3, 100, 4095, 4096, 4097, 20000])
def test_top_k_matches_reference(backend, n):
    _skip_large_serial(backend, n)
    dev = backend.device
    g = torch.Generator().manual_seed(n)
    big = n >= 4095
    kinds = ("random", "ties", "hash") if big else ("random", "equal", "special", "denormal",
                                                     "ties", "hash")
    ks = sorted({1, n // 2, n - 1} - {0}) if big else sorted({0, 1, n // 2, n - 1, n})
    seeds = (0, 2**64 - 1, 5)
    for i, kind in enumerate(kinds):
        s = _scores(n, kind, g)
        for j, k in enumerate(ks):
            if n > 4097 and j != i:                 # N = 20000: one k per kind
                continue
            for seed in (seeds[(i + j) % 3],):      # every seed, spread over the cases
                got = backend.top_k(None if s is None else s.to(dev), n, k, seed)
                assert got.dtype == torch.int32 and got.device.type == dev.type
                assert torch.equal(_as_set(got), _reference_top_k(s, n, k, seed)), (kind, k, seed)
                if _is_harness(backend) and 0 < k < n:
                    assert backend.ops.last_total() == k


def _random_stats(n: int, g: torch.Generator) -> LossStats:
    """Statistics as after some epochs, with ties, specials and unseen samples."""
    st = LossStats(n)
    f32max = torch.finfo(torch.float32).max
    mean = torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))
    pick = torch.randint(0, 10, (n,), generator=g)
    mean = torch.where(pick < 3, torch.randint(0, 3, (n,), generator=g).float(), mean)   # ties
    specials = torch.tensor([0.0, -0.0, 1e-45, -3e-39, 3e38, -f32max, 7.5])
    mean = torch.where(pick == 3, specials[torch.randint(0, 7, (n,), generator=g)], mean)
    var = torch.rand(n, generator=g) ** 4 * torch.exp(6 * torch.randn(n, generator=g)).clamp(max=1e30)
    var = torch.where(pick == 4, torch.tensor([0.0, f32max, 1e-45, -0.0])[torch.randint(
        0, 4, (n,), generator=g)], var)
    st.mean.copy_(mean)
    st.var.copy_(var)
    st.last_epoch.copy_(torch.randint(-1, 5, (n,), generator=g).int())
    st.selected.copy_(torch.randint(0, 6, (n,), generator=g).int())
    return st


def _reference_plan(stats: LossStats, seed: int, pick=None, ids=None, full=False, previous=None):
    """A plan by the definitions alone: full sorts of the unique keys, the permutation of ranks."""
    n = stats.num_samples
    rescaled = None
    if full:
        members = torch.arange(n)
    elif ids is not None:
        members = torch.sort(ids.long()).values
    else:
        score = None if pick.score is None else pick.score.torch(stats.mean, stats.var,
                                                                 stats.last_epoch)
        k = pick.k
        if pick.below_share is not None:
            below = score == 0
            k = n - int(below.sum()) + math.floor(pick.below_share * int(below.sum()))
            rescaled = torch.from_numpy(np.packbits(below.numpy(), bitorder="little"))
        members = _reference_top_k(score, n, k - pick.explore, pick.seed)
        if pick.explore:
            rest = torch.zeros(n)
            rest[members] = float("-inf")
            members = torch.sort(torch.cat([members, _reference_top_k(
                rest, n, pick.explore, pick.explore_seed)])).values
    order = torch.empty_like(members)
    order[permute_ranks(members.numel(), seed)] = members
    taken = torch.zeros(n, dtype=torch.int32)
    taken[members] = 1
    selected = stats.selected if full else stats.selected + taken
    overlap = None
    if previous is not None:
        prev_ids, prev_size = previous
        inter = (float(min(prev_size, members.numel())) if prev_ids is None or full
                 else float(taken[prev_ids.long()].sum()))
        overlap = torch.tensor(inter, dtype=torch.float64) / (prev_size + members.numel() - inter)
    return order.int(), selected, overlap, rescaled


def _plan_cases(n: int, g: torch.Generator) -> list[dict]:
    k = max(n // 3, 1)
    given = _scores(n, "special", g)
    cases = [dict(pick=Pick(None, k, 1)), dict(pick=Pick(MeanScore(), k, 2, explore=k // 4,
                                                         explore_seed=3)),
             dict(pick=Pick(UCBScore(1.5, "std", 1.0, 5), k, 4)),
             dict(pick=Pick(UCBScore(0.5, "var", 0.0, 5), n - 1 if n > 1 else 1, 5)),
             dict(pick=Pick(BelowMeanScore(), 0, 6, below_share=0.3)),
             dict(pick=Pick(GivenScore(given), k, 2**64 - 1)),
             dict(ids=torch.randperm(n, generator=g)[:k].int()), dict(full=True)]
    return cases


@pytest.mark.parametrize("n", [1, 2, 37, 3000, 20000])
def test_plan_matches_reference(backend, n):
    """Backend.plan (on the kernels: one gp_plan launch) against the definitions: every kind of
    rule, given ids, full plans; no previous plan, a pruned one and a full one."""
    _skip_large_serial(backend, n)
    dev = backend.device
    g = torch.Generator().manual_seed(n + 1)
    stats = _random_stats(n, g)
    on_dev = LossStats(n, dev)
    for name in ("mean", "var", "last_epoch", "selected"):
        getattr(on_dev, name).copy_(getattr(stats, name))
    prev_ids = torch.randperm(n, generator=g)[:max(n // 2, 1)].int()
    previous = [None, (prev_ids, prev_ids.numel()), (None, n)]
    for c, case in enumerate(_plan_cases(n, g)):
        prev = previous[c % 3]
        want = _reference_plan(stats, 100 + c, previous=prev, **case)
        kw = {key: (v.to(dev) if isinstance(v, torch.Tensor) else v) for key, v in case.items()}
        got = backend.plan(on_dev, shuffle_seed=100 + c, previous=None if prev is None else (
            None if prev[0] is None else prev[0].to(dev), prev[1]), **kw)
        where = (n, c, case)
        assert got.indices.dtype == torch.int32
        assert torch.equal(got.indices.cpu(), want[0]), where
        assert torch.equal(got.selected.cpu(), want[1]), where
        if prev is None:
            assert got.overlap is None
        else:
            assert torch.equal(got.overlap.cpu(), want[2]), (where, got.overlap, want[2])
        if want[3] is None:
            assert got.rescaled is None
        else:
            assert torch.equal(got.rescaled.cpu(), want[3]), where
        if _is_harness(backend):
            assert backend.ops.last_total() == want[0].numel()


def test_plans_across_grid_shapes(backend):
    """Same plan for any grid and any number of blocks at once (honest launch geometry)."""
    if not _is_harness(backend) or _is_serial(backend):
        pytest.skip("launch geometry is a harness parameter (swept once, here)")
    g = torch.Generator().manual_seed(9)
    n = 9000
    stats = _random_stats(n, g)
    rules = [Pick(UCBScore(1.0, "std", 1.0, 3), n // 2, 3), Pick(None, 777, 4),
             Pick(MeanScore(), 4000, 5, explore=1000, explore_seed=6)]
    ref = TorchBackend(torch.device("cpu"))
    for c, (slots, per_block) in enumerate(((1, 1024), (2, 512), (4, 256), (3, 16384))):
        ops = kh.harness_ops(slots=slots, keys_per_block=per_block)
        for pick in (rules[c % 3], rules[(c + 1) % 3]):
            want = ref.plan(stats, shuffle_seed=c, pick=pick)
            got = KernelBackend(ops).plan(stats, shuffle_seed=c, pick=pick)
            assert torch.equal(got.indices, want.indices), (slots, per_block, pick)
            assert torch.equal(got.selected, want.selected)
            assert ops.last_total() == pick.k
        grids = {grid for name, grid, _ in ops.runtime.log if name == "gp_plan"}
        assert grids == {min(slots, -(-n // per_block))}, grids


def test_shuffle_matches_reference(backend):
    dev = backend.device
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 7, 1000, 5000):
        ids = torch.randperm(50000, generator=g)[:n]
        for seed in (99, 2**64 - 7):
            srt = torch.sort(ids).values
            want = torch.empty_like(ids)
            want[permute_ranks(n, seed)] = srt
            assert torch.equal(backend.shuffle(ids.to(dev), seed).cpu(), want), (n, seed)


# ---------------------------------------------------------------- policies through the backend
POLICIES = {
    "uniform": lambda n, g: "uniform",
    "epsilon_greedy": lambda n, g: gp.EpsilonGreedy(epsilon=0.3),
    "ucb": lambda n, g: gp.UCB(c=1.0),
    "ucb-var": lambda n, g: gp.UCB(c=0.5, uncertainty="var"),
    "infobatch": lambda n, g: gp.InfoBatch(),
    "static-scores": lambda n, g: gp.Static(torch.randn(n, generator=g)),
    "static": lambda n, g: gp.Static(),
    "full": lambda n, g: "full",
}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policy_plans_match_reference(backend, policy):
    dev = backend.device
    n, epochs = 3000, 5
    g = torch.Generator().manual_seed(5)
    kw = dict(keep=0.3, seed=17, num_epochs=epochs, selection_interval=2 if policy == "ucb" else 1)
    ref = gp.Pruner(n, policy=POLICIES[policy](n, torch.Generator().manual_seed(1)), **kw)
    got = gp.Pruner(n, policy=POLICIES[policy](n, torch.Generator().manual_seed(1)), device=dev, **kw)
    got.backend = backend
    losses = torch.rand(n, generator=g) * 3
    losses[::97] = float("nan")
    losses[5::101] = 1e-40                        # denormal losses
    for epoch in range(epochs):
        p_ref, p_got = ref.plan(epoch), got.plan(epoch)
        assert torch.equal(p_ref.indices, p_got.indices.cpu()), epoch
        assert p_ref.weight == p_got.weight
        for i in range(0, len(p_ref), 700):
            idx = p_ref.indices[i:i + 700]
            loss = losses[idx.long()] * (1 + epoch)
            r, k = ref.observe(idx, loss), got.observe(idx.to(dev), loss.to(dev))
            assert torch.equal(_bits(r), _bits(k))
        _assert_same_state(ref.stats, got.stats, epoch)
    assert torch.equal(ref.stats.selected, got.stats.selected.cpu())


def test_large_ucb_selection_sequence(backend):
    """A UCB run at N = 20000 over several epochs: scores from real statistics, with ties."""
    n = 20000
    _skip_large_serial(backend, n)
    dev = backend.device
    ref = gp.Pruner(n, policy=gp.UCB(c=1.0), keep=0.5, seed=3, num_epochs=3)
    got = gp.Pruner(n, policy=gp.UCB(c=1.0), keep=0.5, seed=3, num_epochs=3, device=dev)
    got.backend = backend
    g = torch.Generator().manual_seed(8)
    for epoch in range(2):
        p_ref, p_got = ref.plan(epoch), got.plan(epoch)
        assert torch.equal(p_ref.indices, p_got.indices.cpu()), epoch
        idx = p_ref.indices[:4096]
        loss = torch.randint(0, 4, (idx.numel(),), generator=g).float()   # ties
        ref.observe(idx, loss)
        got.observe(idx.to(dev), loss.to(dev))
        _assert_same_state(ref.stats, got.stats, epoch)
