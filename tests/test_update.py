"""gpuprune.update: the statistics update (EMA mean and variance, duplicate ids merged exactly,
non-finite losses skipped and counted, float64 saturation, exact powers)."""

from __future__ import annotations

import pytest
import torch
from conftest import Stats


def test_update_hand_computed_single_updates():
    bank = Stats(3, decay=0.5)
    bank.observe(torch.tensor([0]), torch.tensor([2.0]))          # first visit: mean = x, var = 0
    assert bank.mean.tolist() == [2.0, 0.0, 0.0] and bank.var.tolist() == [0.0, 0.0, 0.0]
    bank.observe(torch.tensor([0]), torch.tensor([4.0]))          # d = 2, a = .5
    # mean = 2 + .5 * 2 = 3 ; var = .5 * (0 + .5 * 4) = 1
    assert bank.mean[0].item() == 3.0 and bank.var[0].item() == 1.0
    assert bank.seen.tolist() == [True, False, False]
    assert bank.last_epoch.tolist() == [0, -1, -1]
    bank.observe(torch.tensor([1]), torch.tensor([1.0]), epoch=4)
    assert bank.last_epoch.tolist() == [0, 4, -1]


def test_update_duplicates_merge_exactly_not_last_writer():
    bank = Stats(2, decay=0.5)
    bank.observe(torch.tensor([1]), torch.tensor([1.0]))
    bank.observe(torch.tensor([1, 0, 1]), torch.tensor([2.0, 5.0, 4.0]))
    # sample 1: old (mean 1, var 0); group {2, 4}: m = 3, w = 1, a = 1 - .5**2 = .75
    # mean = 1 + .75 * 2 = 2.5; var = .25 * 0 + .75 * 1 + .75 * .25 * 4 = 1.5
    assert bank.mean.tolist() == [5.0, 2.5]
    assert bank.var.tolist() == [0.0, 1.5]


def test_update_group_of_one_equals_finch_update_and_order_free():
    a = Stats(1, decay=0.8)
    for x in [1.0, 3.0, 2.0, 7.0]:
        a.observe(torch.tensor([0]), torch.tensor([x]))
    mu, var, alpha = 1.0, 0.0, 0.2
    for x in [3.0, 2.0, 7.0]:
        d = x - mu
        mu += alpha * d
        var = (1 - alpha) * (var + alpha * d * d)
    assert a.mean.item() == pytest.approx(mu, rel=1e-6) and a.var.item() == pytest.approx(var, rel=1e-6)
    b1, b2 = Stats(1), Stats(1)
    b1.observe(torch.tensor([0, 0, 0]), torch.tensor([1.0, 2.0, 6.0]))
    b2.observe(torch.tensor([0, 0, 0]), torch.tensor([6.0, 1.0, 2.0]))
    assert torch.equal(b1.mean, b2.mean) and torch.equal(b1.var, b2.var)


def test_update_skips_and_counts_nonfinite():
    bank = Stats(3, decay=0.5)
    bank.observe(torch.tensor([0, 1, 2, 2]),
                 torch.tensor([float("nan"), float("inf"), 1.0, float("-inf")]))
    assert bank.seen.tolist() == [False, False, True]
    assert bank.mean.tolist() == [0.0, 0.0, 1.0]
    assert torch.isfinite(bank.var).all()
    assert int(bank.nonfinite) == 3
    assert bank.last_epoch.tolist() == [-1, -1, 0]


def test_float64_losses_beyond_float32_saturate_and_are_recorded():
    bank = Stats(3, decay=0.5)
    bank.observe(torch.tensor([0, 1, 2]), torch.tensor([1e300, -1e300, float("nan")],
                                                        dtype=torch.float64))
    f32max = torch.finfo(torch.float32).max
    assert bank.mean.tolist() == [f32max, -f32max, 0.0]
    assert bank.seen.tolist() == [True, True, False]
    assert int(bank.nonfinite) == 1


def test_exact_segment_sums_equal_the_sequential_ones():
    # the distributed merge sums duplicates one rank of occurrence at a time (deterministic on
    # CUDA); it must give the bits of the sequential per-id sums
    from gpuprune.update import _segment_sums
    seg = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2])
    vals = torch.tensor([0.1, 1e16, -1e16, 3.0, 1e-8, 1.0, -1.0, 7.0], dtype=torch.float64)
    expected = [((0.1 + 1e16) - 1e16)] * 3 + [3.0] + [((1e-8 + 1.0) - 1.0) + 7.0] * 4
    assert _segment_sums(seg, [vals], exact=False)[0].tolist() == expected
    first = torch.ones(8, dtype=torch.bool)
    first[1:] = seg[1:] != seg[:-1]
    pos = torch.arange(8)
    occurrence = pos - torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
    out = torch.zeros(8, dtype=torch.float64)
    for r in range(int(occurrence.max()) + 1):
        out.index_add_(0, seg, torch.where(occurrence == r, vals, torch.zeros_like(vals)))
    assert out[seg].tolist() == expected


def test_int_pow_is_binary_exponentiation_with_exact_powers_of_two():
    from gpuprune.update import int_pow
    n = torch.arange(0, 200, dtype=torch.float64)
    assert int_pow(0.5, n, 199).tolist() == [2.0 ** -i for i in range(200)]
    def ref(base, e):                     # squarings from the lowest bit, as the kernel does
        r = 1.0
        while e:
            if e & 1:
                r *= base
            base *= base
            e >>= 1
        return r
    for decay in (0.9, 0.99, 0.3, 0.0):
        assert int_pow(decay, n, 199).tolist() == [ref(decay, i) for i in range(200)]
