"""gpuprune.keys: the 32-bit mixer and keyed hash, order-preserving score bits, the composite
key every selection ranks by."""

from __future__ import annotations

import torch

from gpuprune.keys import composite_key, fmix32, hash32, orderable

from conftest import top_k_by_score


def test_fmix32_known_values():
    def ref(h):
        h ^= h >> 16; h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13; h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)
    xs = [0, 1, 2, 0xFFFFFFFF, 123456789, 2**31]
    assert fmix32(torch.tensor(xs)).tolist() == [ref(x) for x in xs]
    assert ref(0) == 0


def test_hash32_is_a_bijection_on_a_range():
    h = hash32(torch.arange(1 << 16), seed=12345)
    assert h.unique().numel() == 1 << 16
    assert int(h.min()) >= 0 and int(h.max()) < 2**32


def test_orderable_preserves_float_order_with_nan_lowest_and_signed_zero_equal():
    vals = torch.tensor([float("nan"), float("-inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0,
                         float("inf")])
    o = orderable(vals).tolist()
    assert o[0] == o[1]                    # NaN ranks as -inf
    assert o[4] == o[5]                    # -0 == +0
    assert o[1:5] == sorted(o[1:5]) and o[5:] == sorted(o[5:])
    assert len(set(o[1:5])) == 4 and len(set(o[5:])) == 4
    assert all(-2**31 <= v < 2**31 for v in o)


def test_composite_key_orders_by_score_then_hash():
    score = torch.tensor([1.0, 3.0, 2.0, 3.0])
    key = composite_key(score, seed=7)
    assert key.unique().numel() == 4
    assert int(key[1]) > int(key[2]) > int(key[0]) and int(key[3]) > int(key[2])
    assert top_k_by_score(score, 2, seed=7).sort().values.tolist() == [1, 3]
    assert torch.equal(composite_key(None, 7, 4), hash32(torch.arange(4), 7))
