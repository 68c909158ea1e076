"""gpuprune.backend on the torch reference: exact-k top_k over unique keys (ties at random, NaN
never preferred), the keyed shuffle, the CPU fast paths. The kernels are checked against it in
tests/test_kernel*.py."""

from __future__ import annotations

import pytest
import torch

from gpuprune.backend import TorchBackend
from gpuprune.keys import composite_key, fmix32, hash32, orderable, split_seed

from conftest import top_k_by_score

B = TorchBackend("cpu")


def random_k(n, k, seed):
    return B.top_k(None, n, k, seed).long()


def test_top_k_exact_with_all_ties_and_nan_never_preferred():
    score = torch.full((100,), 0.5)
    score[:10] = float("nan")
    for k in (0, 1, 50, 90, 100):
        sel = top_k_by_score(score, k, seed=3)
        assert sel.numel() == k and sel.unique().numel() == k
        if 0 < k <= 90:
            assert int(sel.min()) >= 10  # no NaN sample while finite ones remain
    assert B.top_k(score, 100, 50, 3).dtype == torch.int32
    with pytest.raises(ValueError, match="k must be in"):
        B.top_k(None, 5, 6, 0)


def test_top_k_cpu_matches_torch_topk_set():
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 5, (5000,), generator=g).float()  # many ties
    key = composite_key(score, seed=99)
    ours = top_k_by_score(score, 1234, 99).sort().values
    ref = torch.topk(key, 1234).indices.sort().values
    assert torch.equal(ours, ref)


def test_tied_scores_spread_over_whole_index_range():
    # all scores tied: a positional tie-break would pick 0..k-1; ours must be uniform over [0, N)
    n, k = 10_000, 1_000
    sel = top_k_by_score(torch.zeros(n), k, seed=2024)
    counts = torch.bincount(sel // 1000, minlength=10).double()  # 10 bins of 1000 ids, expect 100
    chi2 = float(((counts - 100) ** 2 / 100).sum())
    assert chi2 < 27.9  # 99.9% quantile of chi2 with 9 dof
    other = top_k_by_score(torch.zeros(n), k, seed=2025)
    assert len(set(sel.tolist()) & set(other.tolist())) < 200  # ~100 expected by chance


def test_random_k_is_uniform_and_seed_dependent():
    hits = torch.zeros(200)
    for s in range(400):
        hits[random_k(200, 50, seed=s)] += 1
    # each id picked with probability 1/4: mean 100, binomial sd ~8.7
    assert abs(float(hits.mean()) - 100) < 1e-9
    assert float(hits.min()) > 60 and float(hits.max()) < 140
    # a uniform draw is the top-k of equal scores: the same set as score=None
    assert torch.equal(random_k(200, 50, 9).sort().values,
                       top_k_by_score(torch.zeros(200), 50, 9).sort().values)


def test_shuffle_order_depends_on_the_set_only():
    ids = torch.tensor([5, 1, 9, 3, 7], dtype=torch.int32)
    a = B.shuffle(ids, 42)
    b = B.shuffle(ids.flip(0), 42)
    assert torch.equal(a, b) and sorted(a.tolist()) == [1, 3, 5, 7, 9]
    assert not torch.equal(B.shuffle(torch.arange(50), 1), B.shuffle(torch.arange(50), 2))


def test_cpu_numpy_fast_paths_equal_the_int64_torch_formulas():
    idx = torch.cat([torch.arange(5000), torch.tensor([2**31, 2**32 - 1])])
    for seed in (0, 123, 2**64 - 1, 0xDEADBEEFCAFEBABE):
        lo, hi = split_seed(seed)
        assert torch.equal(hash32(idx, seed), fmix32(fmix32(idx ^ lo) ^ hi))
    x = torch.randn(5000) * 1e3
    x[::7], x[::11], x[::13], x[::17] = float("nan"), -0.0, float("inf"), float("-inf")
    x[::23], x[::29] = 1e-45, -1e-45
    s = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x) + 0.0
    b = s.view(torch.int32).long()
    assert torch.equal(orderable(x), torch.where(b >= 0, b, b ^ 0x7FFFFFFF))
