"""gpuprune.stats: the fixed-order sums and the one mean over seen samples."""

from __future__ import annotations

import torch
from conftest import Stats


def test_tree_sum_has_a_fixed_order_and_seen_mean_ignores_unseen():
    from gpuprune.stats import tree_sum
    x = torch.tensor([1e16, 1.0, -1e16, 1.0, 3.0], dtype=torch.float64)
    # ((1e16 + 1) + (-1e16 + 1)) + (3 + 0): pairs first, then their sums
    assert tree_sum(x).item() == ((1e16 + 1.0) + (-1e16 + 1.0)) + (3.0 + 0.0)
    assert tree_sum(torch.empty(0, dtype=torch.float64)).item() == 0.0
    perm = torch.tensor([4, 2, 0, 3, 1])
    assert tree_sum(x[perm]).item() == ((3.0 + -1e16) + (1e16 + 1.0)) + (1.0 + 0.0)
    s = Stats(4)
    s.observe(torch.tensor([1, 3]), torch.tensor([2.0, 4.0]))
    assert s.seen_mean(torch.tensor([100.0, 2.0, 100.0, 4.0])).item() == 3.0
    assert Stats(3).seen_mean(torch.ones(3)).item() == 0.0


def test_masked_mean_sums_the_masked_values_in_the_fixed_tree_order():
    """The one mean over seen samples (LossStats.seen_mean, UCB's drift scale, InfoBatch's
    threshold): masked entries count as 0 in the tree and not in the count."""
    from gpuprune.stats import masked_mean
    x = torch.tensor([1e16, 100.0, -1e16, 1.0, 3.0], dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, True])
    # tree over [1e16, 0, -1e16, 1, 3, 0, 0, 0]: ((1e16 + 0) + (-1e16 + 1)) + ((3 + 0) + 0) = 3
    # (-1e16 + 1 rounds to -1e16), over 4 masked entries; a left-to-right sum would give 1.0
    m = masked_mean(x, mask)
    assert m.dtype == torch.float64 and m.shape == () and m.item() == 0.75
    assert masked_mean(x, torch.zeros(5, dtype=torch.bool)).item() == 0.0
    s = Stats(5)
    s.observe(torch.tensor([0, 2, 3, 4]), torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert torch.equal(s.seen_mean(x), m)
