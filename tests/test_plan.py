"""gpuprune.plan: the Plan value (weights from packed bits, overlap, fingerprint)."""

from __future__ import annotations

import torch

import gpuprune as gp


def test_mask_lookup_keeps_out_of_range_ids_in_range():
    """An out-of-range id (a GPU batch the observe path flags as invalid) must neither index out of
    bounds (a device-side assert on a GPU) nor wrap: -1 read the last sample's bit."""
    from gpuprune.plan import mask_lookup, pack_mask
    bits = pack_mask(torch.arange(16) == 15)             # only id 15 marked, 2 bytes
    assert mask_lookup(bits, torch.tensor([15, 14, 0])).tolist() == [True, False, False]
    assert mask_lookup(bits, torch.tensor([-1, -9, -2**40])).tolist() == [False] * 3
    assert mask_lookup(bits, torch.tensor([16, 10**6, 2**40])).tolist() == [True] * 3   # -> 15
    plan = gp.Plan(1, torch.tensor([15, 3], dtype=torch.int32), False, 16, 4.0, bits)
    assert plan.weights_of(torch.tensor([15, 3, -1], dtype=torch.int16)).tolist() == [4.0, 1.0, 1.0]
    assert plan.weights_of(torch.tensor([15, 3])).dtype == torch.float32
