"""The torch reference of the selection keys that the kernels match: the keyed shuffle of
:mod:`gpuprune.keys` (a bijection, keyed, well mixed, the same on the CPU path and the device path).

The kernels are held to these by ``tests/test_kernel_equivalence.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gpuprune.keys import (PERM_MULTIPLIERS, perm_params, permute_ranks, permute_ranks_doubling,
                           shuffle_sorted)


def _walk(k: int, seed: int) -> list[int]:
    """Plain-Python cycle walking, one rank at a time (the definition)."""
    bits, shift, keys = perm_params(k, seed)
    mask = (1 << bits) - 1

    def rounds(x: int) -> int:
        for key, mult in zip(keys, PERM_MULTIPLIERS):
            x = ((x ^ key) * mult) & mask
            x ^= x >> shift
        return x

    out = []
    for r in range(k):
        x = rounds(r)
        while x >= k:
            x = rounds(x)
        out.append(x)
    return out


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 64, 65, 1000, 4097])
def test_permutation_is_a_bijection_and_follows_its_definition(k):
    for seed in (0, 1, 2**64 - 1, 123456789):
        p = permute_ranks(k, seed)
        assert p.dtype == torch.int64 and p.numel() == k
        assert sorted(p.tolist()) == list(range(k))
        assert p.tolist() == _walk(k, seed)
        assert torch.equal(permute_ranks_doubling(k, seed, "cpu"), p)


def test_permutation_at_larger_sizes_on_both_paths():
    for k in (2**20, 2**20 + 1, 3_000_001):
        p = permute_ranks(k, 77)
        assert torch.equal(torch.sort(p).values, torch.arange(k))
        if k < 2**21:
            assert torch.equal(permute_ranks_doubling(k, 77, "cpu"), p)


def test_round_parameters():
    assert perm_params(1, 5)[:2] == (0, 0)
    assert perm_params(2, 5)[:2] == (1, 1)
    assert perm_params(1000, 5)[:2] == (10, 5)
    assert perm_params(1024, 5)[:2] == (10, 5)
    assert perm_params(1025, 5)[:2] == (11, 6)
    bits, _, keys = perm_params(2**31, 9)
    assert bits == 31 and len(keys) == 4 and all(0 <= key < 2**31 for key in keys)
    assert all(m % 2 == 1 for m in PERM_MULTIPLIERS)


def test_permutation_is_keyed():
    k = 5000
    a, b = permute_ranks(k, 1), permute_ranks(k, 2)
    assert torch.equal(a, permute_ranks(k, 1))
    assert (a == b).float().mean() < 0.01             # about 1/k agree by chance


def test_permutation_mixes_well():
    """A plan of class-sorted ids (the common dataset layout) must come out mixed: no correlation
    of position with rank, neighbours sent far apart, every batch holding each class about equally."""
    k = 100_000
    p = permute_ranks(k, 2024).double()
    r = torch.arange(k, dtype=torch.float64)
    corr = float(torch.corrcoef(torch.stack([r, p]))[0, 1])
    assert abs(corr) < 0.01, corr
    gap = (p[1:] - p[:-1]).abs()
    assert float((gap < k / 100).double().mean()) < 0.03          # ~2% expected at random
    classes = torch.empty(k, dtype=torch.int64)
    classes[p.long()] = torch.arange(k) // (k // 10)                # class of the id at each position
    batches = classes[: (k // 250) * 250].view(-1, 250)
    counts = torch.stack([(batches == c).sum(1) for c in range(10)], 1).double()
    chi2 = ((counts - 25.0) ** 2 / 25.0).sum(1)                     # 9 degrees of freedom
    assert 7.5 < float(chi2.mean()) < 10.5, float(chi2.mean())
    assert float(chi2.max()) < 45


def test_shuffle_sorted_moves_rank_r_to_its_position():
    ids = torch.tensor([3, 8, 20, 21, 40], dtype=torch.int32)
    out = shuffle_sorted(ids, 11)
    pos = permute_ranks(5, 11)
    assert out.dtype == torch.int32
    assert [int(out[int(pos[r])]) for r in range(5)] == ids.tolist()
    assert np.array_equal(np.sort(out.numpy()), ids.numpy())


# ---------------------------------------------------------------- UCB: one extreme sample
def _extreme_run(extreme_ids: list[int], policy=None) -> tuple[set[int], set[int]]:
    """Issue 22 item 4: N = 100, keep 0.12 (k = 12); every sample observed once, ten of them at
    loss 1000 and the rest at 0.1; then two samples observed at +1e38 and -1e38. Returns the next
    plan's set and the ten high-loss ids."""
    import gpuprune as gp
    p = gp.Pruner(100, keep=0.12, policy=policy or gp.UCB(), seed=0)
    p.plan(0)
    high = set(range(0, 100, 10))
    ids = torch.arange(100)
    p.observe(ids, torch.where(ids % 10 == 0, 1000.0, 0.1))
    p.observe(torch.tensor(extreme_ids), torch.tensor([1e38, -1e38]))
    return set(p.plan(1).indices.tolist()), high


def test_ucb_keeps_its_ranking_when_one_sample_is_extreme():
    # the two extreme losses on low-loss samples: the ten high-loss ones must all stay
    got, high = _extreme_run([5, 7])
    assert high <= got, sorted(high - got)
    assert 5 in got and 7 not in got          # +1e38 now has the highest mean, -1e38 the lowest
    # on two high-loss samples: the one observed at -1e38 justifiably drops, the other nine stay
    got, high = _extreme_run([10, 20])
    assert high - {20} <= got and 20 not in got, sorted(high - got)


def test_drift_scale_hand_computed():
    from gpuprune.keys import drift_scale
    f32max = torch.finfo(torch.float32).max
    all_seen = torch.ones(100, dtype=torch.bool)
    extreme = torch.cat([torch.zeros(98), torch.full((2,), f32max)])
    assert float(drift_scale(extreme, all_seen)) == 0.0          # 2% extreme: ignored
    assert float(extreme.double().mean()) > 6e36                  # (the plain mean is ~7e36)
    ten = torch.arange(1, 11, dtype=torch.float32)                # rank ceil(0.9 * 10) = 9: cap 9
    assert float(drift_scale(ten, torch.ones(10, dtype=torch.bool))) == (45 + 9) / 10
    # rounded down to 4 significant bits: 1.3 -> 1.25, 1000 -> 960; unseen samples do not count
    v = torch.tensor([1.3, 1000.0, 5e30, -0.0])
    seen = torch.tensor([True, True, False, True])
    assert float(drift_scale(v, seen)) == (1.25 + 960.0 + 0.0) / 3
    assert float(drift_scale(v, torch.zeros(4, dtype=torch.bool))) == 0.0


def test_drift_scale_and_score_match_the_independent_numpy_rendering():
    from numpy_reference import _winsorised_scale
    from gpuprune.keys import drift_scale
    g = torch.Generator().manual_seed(5)
    for n in (1, 10, 1000, 50_000):
        var = (torch.rand(n, generator=g) * 10) ** torch.randint(0, 40, (n,), generator=g).float()
        var[torch.rand(n, generator=g) < 0.3] = 0.0
        var = var.clamp(max=torch.finfo(torch.float32).max)
        seen = torch.rand(n, generator=g) < 0.8
        want = _winsorised_scale(var.numpy(), seen.numpy())
        assert float(drift_scale(var, seen)) == want, n


def test_upper_bound_score_rounds_once_and_saturates():
    from gpuprune.keys import upper_bound_score
    f32max = torch.finfo(torch.float32).max
    mean = torch.tensor([1000.0, 0.1, f32max, -3e38, 7.0])
    var = torch.tensor([4.0, 4.0, f32max, 0.0, 1.0])
    seen = torch.tensor([True, True, True, True, False])
    s = upper_bound_score(mean, var, seen, 2.0)
    assert s.dtype == torch.float32
    assert s.tolist()[:2] == [1004.0, float(torch.tensor(4.1, dtype=torch.float64).float())]
    assert s[2] == f32max and s[3] == -3e38 and s[4] == float("inf")   # saturated, not +inf
    v = upper_bound_score(mean, var, seen, 0.5, "var")
    assert v.tolist()[:2] == [1002.0, float(torch.tensor(2.1, dtype=torch.float64).float())]
    # drift: var + drift * scale * age, in float64 (scale here: all variances 4 -> 4)
    age = torch.tensor([0, 3, 0, 0, 0])
    d = upper_bound_score(mean, torch.full((5,), 4.0), seen, 1.0, age=age, drift=0.5)
    assert d[1] == float(torch.tensor(0.1 + (4.0 + 0.5 * 4.0 * 3) ** 0.5, dtype=torch.float64).float())


def test_cpu_numpy_paths_equal_the_torch_operations():
    """The numpy paths the CPU takes (UCB's score and drift scale, the threshold selection, the
    explore share) give the bits of the torch operations a GPU runs."""
    from gpuprune.keys import drift_scale, explore_mask, select_mask, upper_bound_score
    g = torch.Generator().manual_seed(11)
    f32max = torch.finfo(torch.float32).max
    n = 20_000
    mean = torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))
    mean[::17] = torch.tensor([0.0, -0.0, 3e38, -f32max, 1e-45])[torch.randint(0, 5, (n // 17 + 1,),
                                                                               generator=g)]
    var = torch.rand(n, generator=g) * torch.exp(8 * torch.randn(n, generator=g)).clamp(max=1e35)
    var[::13] = torch.tensor([0.0, -0.0, f32max])[torch.randint(0, 3, (n // 13 + 1,), generator=g)]
    seen = torch.rand(n, generator=g) < 0.9
    age = torch.randint(-1, 6, (n,), generator=g)
    for c, unc, drift in ((1.0, "std", 1.0), (2.5, "var", 0.3), (0.0, "std", 0.0)):
        a = upper_bound_score(mean, var, seen, c, unc, age, drift, numpy=True)
        b = upper_bound_score(mean, var, seen, c, unc, age, drift, numpy=False)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (c, unc, drift)
    assert torch.equal(drift_scale(var, seen, numpy=True), drift_scale(var, seen, numpy=False))
    score = torch.randint(0, 5, (n,), generator=g).float()
    score[::7] = float("nan")
    for k in (1, 777, n // 2, n - 1):
        m1 = select_mask(score, n, k, k, numpy=True)
        m2 = select_mask(score, n, k, k, numpy=False)
        assert torch.equal(m1, m2) and int(m1.sum()) == k
        e1 = explore_mask(m1, min(k, n - k), 99, numpy=True)
        assert torch.equal(e1, explore_mask(m1, min(k, n - k), 99, numpy=False))
        assert not (e1 & m1).any() and int(e1.sum()) == min(k, n - k)


# ------------------------------------------------------------------ the CPU fast paths, block by block
@pytest.mark.parametrize("k", [2, 3, 1000, 32767, 32768, 32769, 3 * 32768 + 5])
def test_blocked_shuffle_equals_the_scatter_by_the_device_permutation(k):
    from gpuprune.keys import CPU_BLOCK, shuffle_into_np
    assert CPU_BLOCK == 32768                        # (the sizes above straddle its blocks)
    ids = np.sort(np.random.default_rng(k).choice(10 * k, k, replace=False))
    for seed, dtype in ((0, np.int32), (2**64 - 1, np.int64), (12345, np.int32)):
        want = np.empty(k, dtype=np.int64)
        want[permute_ranks_doubling(k, seed, "cpu").numpy()] = ids
        got = shuffle_into_np(np.empty(k, dtype=dtype), ids.astype(dtype), seed)
        assert got.dtype == dtype and np.array_equal(got, want), (k, seed)


def test_blocked_shuffle_refuses_an_out_of_another_length():
    from gpuprune.keys import shuffle_into_np
    out = np.zeros(4, dtype=np.int64)
    with pytest.raises(ValueError, match=r"out of their length.*\(5,\).*\(4,\)"):
        shuffle_into_np(out, np.arange(5), 1)
    assert not out.any()                             # left as it was


def test_inverse_rounds_undo_the_rounds_on_every_word():
    from gpuprune.keys import _inverse_rounds_np, _rounds_np
    for k in (2, 3, 5, 100, 4097, 70_000):
        bits, shift, keys = perm_params(k, 77)
        words = np.arange(1 << bits, dtype=np.uint32)
        x = words.copy()
        _rounds_np(x, (1 << bits) - 1, shift, keys)
        assert bits < 3 or not np.array_equal(x, words)
        _inverse_rounds_np(x, (1 << bits) - 1, shift, keys)
        assert np.array_equal(x, words), k


def _ucb_stats(n: int, epoch: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g))
    mean[::11] = -0.0
    var = torch.rand(n, generator=g) * torch.exp(6 * torch.randn(n, generator=g))
    var[::7] = 0.0
    last = torch.randint(0, epoch + 1, (n,), generator=g, dtype=torch.int32)
    return mean, var, last


def _bits(score: torch.Tensor) -> torch.Tensor:
    return score.view(torch.int32)


def test_ucb_cpu_score_skips_only_clamps_that_change_nothing():
    """The CPU UCB score skips a clamp when the drift histogram shows it changes nothing. Each
    case below needs one clamp: the scores must still equal the torch operations' bits, and the
    same case run with that clamp forced off must differ from them (so each case tests it)."""
    import gpuprune.keys as K
    f32max = torch.finfo(torch.float32).max
    n, epoch = 5000, 9

    def run(mean, var, last, score):
        le = last.numpy()
        first, top = int(le.min()), int(le.max())
        unseen = le < 0 if first < 0 else None
        signed = K._signed_counts(var, None if unseen is None else torch.from_numpy(unseen))
        step = score.drift * float(K._scale_of_counts(K._fold_sign(signed)))
        return K._clamps_needed(signed, step, first, top, epoch), step, unseen

    def forced(mean, var, last, score, step, unseen, clamps):
        return torch.from_numpy(K._upper_bound_np(
            mean.numpy(), var.numpy(), unseen, score.c, score.uncertainty, step,
            lambda lo, hi, out: np.subtract(float(epoch), last.numpy()[lo:hi], out=out), **clamps))

    cases = {"none": lambda m, v, le: None,
             "clamp_var": lambda m, v, le: v.__setitem__(17, -2.5),
             "clamp_age": lambda m, v, le: le.__setitem__(23, epoch + 4),
             "cap": lambda m, v, le: (v.__setitem__(31, f32max), le.__setitem__(31, 0))}
    for unc, c in (("std", 1.0), ("var", 0.5)):
        for name, plant in cases.items():
            # past the float32 maximum by more than half its ulp (~2e22) takes a large drift
            score = K.UCBScore(c=c, uncertainty=unc, drift=1e30 if name == "cap" else 2.0,
                               epoch=epoch)
            mean, var, last = _ucb_stats(n, epoch)
            plant(mean, var, last)
            want = score.torch(mean, var, last, numpy=False)
            assert torch.equal(_bits(score.torch(mean, var, last, numpy=True)), _bits(want)), name
            clamps, step, unseen = run(mean, var, last, score)
            assert {k for k, on in clamps.items() if on} == (set() if name == "none" else {name})
            if name != "none":
                off = dict(clamps, **{name: False})
                assert not torch.equal(_bits(forced(mean, var, last, score, step, unseen, off)),
                                       _bits(want)), name


def test_ucb_cpu_score_equals_the_torch_operations_on_unseen_and_edge_sizes():
    from gpuprune.keys import UCBScore
    f32max = torch.finfo(torch.float32).max
    epoch = 5
    for drift in (0.0, 1.5):
        score = UCBScore(c=1.0, uncertainty="std", drift=drift, epoch=epoch)
        mean, var, last = _ucb_stats(3000, epoch, seed=8)
        last[::5] = -1                                  # unseen, with values no seen one has
        var[::10] = torch.tensor([-7.0, f32max, float("inf"), -0.0])[torch.arange(300) % 4]
        cases = [(mean, var, last), (mean[:1], var[:1], last[:1]), (mean[:0], var[:0], last[:0]),
                 (mean, var, torch.full_like(last, -1))]
        for m, v, le in cases:
            want = score.torch(m, v, le, numpy=False)
            assert torch.equal(_bits(score.torch(m, v, le, numpy=True)), _bits(want))


def test_drift_scale_cpu_path_counts_what_the_torch_path_counts():
    """Negative and NaN-pattern variances (bucket 2047 included) count in both paths alike."""
    from gpuprune.keys import drift_scale
    v = torch.tensor([1.0, -3.0, 2.0, 0.5, 7.0, -0.0, 1e-42])
    nan_2047 = torch.tensor([0x7FF00001], dtype=torch.int32).view(torch.float32)
    var = torch.cat([v, nan_2047, v])
    for seen in (torch.ones(15, dtype=torch.bool), torch.arange(15) % 3 != 0):
        assert torch.equal(drift_scale(var, seen, numpy=True), drift_scale(var, seen, numpy=False))
