"""gpuprune.pruner: planning (cached, never backwards, all or nothing), observing, the
history, and the constructor's argument checks."""

from __future__ import annotations

import pytest
import torch

import gpuprune as gp

from conftest import feed, make


def test_plan_is_cached_and_cannot_go_back():
    p = make("ucb")
    with pytest.warns(gp.CoverageWarning, match="the first epoch planned is epoch 3"):
        assert p.plan(3) is p.plan(3)
    with pytest.raises(ValueError, match="must not go back"):
        p.plan(2)


def test_overlap_history_is_the_jaccard_index_of_consecutive_plans():
    p = gp.Pruner(100, keep=0.3, policy="uniform", num_epochs=6, warmup_epochs=1,
                  final_full_epochs=1, seed=4)
    sets = []
    for epoch in range(6):
        sets.append(set(p.plan(epoch).indices.tolist()))
    hist = p.history
    assert hist[0]["overlap"] is None
    for e in range(1, 6):
        a, b = sets[e - 1], sets[e]
        assert hist[e]["overlap"] == pytest.approx(len(a & b) / len(a | b))
    assert hist[1]["overlap"] == pytest.approx(0.3)       # full -> pruned: 30 of 100
    assert [r["size"] for r in hist] == [100, 30, 30, 30, 30, 100]
    # float64 Jaccard of whole counts: exactly Python's division, read as Python floats
    for e in range(1, 6):
        a, b = sets[e - 1], sets[e]
        assert type(hist[e]["overlap"]) is float and hist[e]["overlap"] == len(a & b) / len(a | b)
    # a restored history (floats) continued by new plans (device scalars) reads the same
    q = gp.Pruner(100, keep=0.3, policy="uniform", num_epochs=6, warmup_epochs=1,
                  final_full_epochs=1, seed=4)
    r = gp.Pruner(100, keep=0.3, policy="uniform", num_epochs=6, warmup_epochs=1,
                  final_full_epochs=1, seed=4)
    for epoch in range(3):
        q.plan(epoch)
    r.load_state_dict(q.state_dict())
    for epoch in range(3, 6):
        r.plan(epoch)
    assert r.history == hist


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(keep=0.0), ValueError, "keep must be > 0.0"),
    (dict(keep=1.5), ValueError, "keep must be <= 1.0"),
    (dict(keep=-0.1), ValueError, "keep must be > 0.0"),
    (dict(keep="half"), TypeError, "keep must be a real number"),
    (dict(prune_ratio=1.0), ValueError, "prune_ratio must be < 1.0"),
    (dict(keep=0.5, prune_ratio=0.5), ValueError, "not both"),
    (dict(policy="greedy"), ValueError, "policy must be one of"),
    (dict(policy=3), TypeError, "policy must be a name or a Policy"),
    (dict(policy=gp.UCB), TypeError, "write policy=UCB()"),
    (dict(epsilon=0.5, policy="epsilon_greedy"), TypeError,
     r"unexpected keyword argument 'epsilon'; .*policy=gpuprune.EpsilonGreedy\(epsilon=...\)"),
    (dict(c=-1.0), TypeError, r"policy=gpuprune.UCB\(c=...\)"),
    (dict(warmup_epochs=-1), ValueError, "warmup_epochs must be >= 0"),
    (dict(selection_interval=0), ValueError, "selection_interval must be >= 1"),
    (dict(final_full_epochs=2), ValueError, "needs num_epochs"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(decay=1.0), ValueError, "decay must be < 1.0"),
    (dict(device="meta"), ValueError, "device must be a cpu or cuda device"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])


def test_pruner_constructor_errors(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        gp.Pruner(100, **kwargs)


def test_pruner_zero_samples_rejected():
    with pytest.raises(ValueError, match="num_samples must be >= 1, got num_samples=0"):
        gp.Pruner(0)


def test_cpu_device_specs_are_normalised():
    p = gp.Pruner(10, policy="ucb", device="cpu:0")
    assert p.device == torch.device("cpu")
    plan = p.plan(0)
    p.observe(plan.indices, torch.ones(len(plan)))
    assert p.plan(1).indices.device == torch.device("cpu")


def test_observe_returns_plain_mean_without_weights():
    p = make("ucb")
    p.plan(0)
    loss = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    out = p.observe(torch.tensor([0, 1, 2]), loss)
    assert out.item() == 3.0
    assert p.observe(torch.empty(0, dtype=torch.long), torch.empty(0)).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy", ["ucb", "infobatch"])
def test_observe_of_half_precision_losses_does_not_overflow(dtype, policy):
    p = gp.Pruner(4096, keep=0.5, policy=policy, num_epochs=4, seed=0)
    p.plan(0)
    p.observe(torch.arange(4096), torch.cat([torch.full((2048,), 0.5), torch.full((2048,), 5.0)]))
    plan = p.plan(1)
    ids = plan.indices
    loss = torch.full((len(ids),), 20.0, dtype=dtype, requires_grad=True)
    out = p.observe(ids, loss)
    assert out.dtype == dtype and torch.isfinite(out)
    w = (plan.weights if plan.weights is not None else torch.ones(len(ids)))
    assert out.float().item() == pytest.approx(float((20.0 * w).mean()), rel=1e-2)


@pytest.mark.parametrize("error", [RuntimeError("disk gone"), KeyboardInterrupt()])
@pytest.mark.parametrize("policy", ["ucb", "infobatch"])
def test_an_interrupted_plan_changes_nothing_and_a_retry_counts_once(policy, error, monkeypatch):
    def run(interrupt: bool) -> gp.Pruner:
        p = make(policy)
        for epoch in range(2):
            feed(p, p.plan(epoch))
        if interrupt:
            before = p.state_dict()
            real = type(p.backend).plan
            calls = {"n": 0}

            def plan(self, *args, **kwargs):       # fails once, after the policy has selected
                calls["n"] += 1
                if calls["n"] == 1:
                    raise error
                return real(self, *args, **kwargs)
            monkeypatch.setattr(type(p.backend), "plan", plan)
            with pytest.raises(type(error)):
                p.plan(2)
            after = p.state_dict()
            assert after["checksum"] == before["checksum"]
            assert p.current_plan.epoch == 1
        p.plan(2)
        monkeypatch.undo()
        return p
    retried, clean = run(True), run(False)
    assert retried.rounds == clean.rounds == 3
    assert retried.state_dict()["checksum"] == clean.state_dict()["checksum"]
