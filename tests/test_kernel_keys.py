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
