"""gpuprune.static_scores: EL2N scores and forgetting counts for the static baselines."""

from __future__ import annotations

import math

import pytest
import torch

import gpuprune as gp


def test_el2n_scores_hand_computed():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x            # logits are the inputs
    x = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    y = torch.tensor([0, 1])
    loader = [(x, y, torch.tensor([1, 0]))]
    s = gp.el2n_scores(Fixed(), loader, 2)
    # sample 1: p = (.5, .5), y = 0 -> ||(-.5, .5)|| = sqrt(.5); sample 0: p = (.75, .25), y = 1
    assert s[1].item() == pytest.approx(math.sqrt(0.5))
    assert s[0].item() == pytest.approx(math.sqrt(0.75**2 + 0.75**2))
    with pytest.raises(ValueError, match="1 of 3 samples"):
        gp.el2n_scores(Fixed(), loader, 3)


def test_forgetting_tracker_counts_transitions():
    t = gp.ForgettingTracker(3)
    seq = [[True, False, False], [False, True, False], [True, False, False], [False, True, False]]
    for row in seq:
        t.update(torch.arange(3), torch.tensor(row))
    # sample 0: T F T F -> 2 forgets; sample 1: F T F T -> 1; sample 2 never learned -> inf
    assert t.counts().tolist() == [2.0, 1.0, float("inf")]
    with pytest.raises(TypeError, match="correct must be a bool"):
        t.update(torch.arange(3), torch.ones(3))
