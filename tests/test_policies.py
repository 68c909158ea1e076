"""gpuprune.policies: each policy's whole rule (the one hook, Policy.rule) and its pure
``<name>_select`` function; the Pruner follows the Rule and reads nothing else of a policy."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import gpuprune as gp
from gpuprune.backend import TorchBackend
from gpuprune.policies import FULL_DATA, Policy, Rule, Selection
from gpuprune.policies.epsilon_greedy import epsilon_greedy_select, greedy_score
from gpuprune.policies.full import full_select
from gpuprune.policies.infobatch import infobatch_select
from gpuprune.policies.static import static_select
from gpuprune.policies.ucb import ucb_score, ucb_select
from gpuprune.policies.uniform import uniform_select
from gpuprune.rng import draw_seeds, epoch_generator

N = 40


# ---------------------------------------------------------------- the hook
def kind(rule: Rule) -> tuple:
    s = rule.schedule
    return (s.final_full_epochs, s.all_full, s.select_once, s.exact_size, s.reads_losses, rule.k,
            rule.decay)


@pytest.mark.parametrize("policy, want", [
    # final, all_full, select_once, exact_size, reads_losses, k, decay
    ("uniform", (0, False, False, True, False, 12, 0.9)),
    ("epsilon_greedy", (0, False, False, True, True, 12, 0.9)),
    ("ucb", (0, False, False, True, True, 12, 0.9)),
    ("static", (0, False, True, True, False, 12, 0.9)),
    ("full", (0, True, False, True, True, 40, 0.9)),
    ("infobatch", (2, False, False, False, True, 12, 0.0)),      # 10 - floor(0.875 * 10)
])
def test_each_policy_states_its_whole_rule_through_the_hook(policy, want):
    rule = gp.POLICIES[policy]().rule(0.3, N, gp.Schedule(10))
    assert kind(rule) == want
    assert rule.schedule.num_epochs == 10 and rule.schedule.selection_interval == 1


def test_the_hook_takes_the_users_choices_over_the_policys_defaults():
    ib = gp.InfoBatch().rule(0.3, N, gp.Schedule(10, final_full_epochs=0), decay=0.5)
    assert ib.schedule.final_full_epochs == 0 and ib.decay == 0.5
    assert ib.policy.ratio == pytest.approx(0.7) and gp.InfoBatch(0.2).rule(
        0.3, N, gp.Schedule(10)).policy.ratio == 0.2                 # ratio from keep unless set
    with pytest.raises(ValueError, match="policy='infobatch' needs num_epochs"):
        gp.InfoBatch().rule(0.3, N, gp.Schedule())
    with pytest.raises(ValueError, match="static scores must have one score per sample"):
        gp.Static(torch.rand(3)).rule(0.3, N, gp.Schedule())


class EveryOther(gp.Uniform):
    """A custom rule through the hook alone: select once, every epoch but the first full."""

    name = "every_other"

    def rule(self, keep, num_samples, schedule, decay=None):
        rule = super().rule(keep, num_samples, schedule, decay)
        return replace(rule, schedule=replace(rule.schedule, select_once=True, warmup_epochs=1))


def test_the_pruner_follows_the_rule_a_policy_returns():
    p = gp.Pruner(N, keep=0.25, policy=EveryOther(), num_epochs=5, seed=2)
    assert p.schedule.select_once and p.schedule.warmup_epochs == 1
    plans = [p.plan(e) for e in range(5)]
    assert [pl.full for pl in plans] == [True, False, False, False, False]
    assert len({frozenset(pl.indices.tolist()) for pl in plans[1:]}) == 1   # selected once
    assert [r["reselected"] for r in p.history] == [False, True, False, False, False]


def test_every_full_epoch_is_fulldata_s_selection(monkeypatch):
    calls = []
    real = gp.FullData.select

    def counted(self, stats, k, **kw):
        calls.append(kw["epoch"])
        return real(self, stats, k, **kw)

    monkeypatch.setattr(gp.FullData, "select", counted)
    p = gp.Pruner(N, keep=0.5, policy="ucb", num_epochs=4, warmup_epochs=1, final_full_epochs=1)
    for e in range(4):
        p.plan(e)
    assert calls == [0, 3]
    q = gp.Pruner(N, policy="full")
    for e in range(3):
        assert sorted(q.plan(e).indices.tolist()) == list(range(N))
    assert calls == [0, 3, 0, 1, 2]


class Legacy(Policy):
    """A custom policy written for 0.2: its kind set by class attributes and methods."""

    name = "legacy"
    exact_k = False
    fixed_subset = True
    reads_losses = False
    default_decay = 0.25

    def final_full_epochs(self, num_epochs):
        return 1

    def select(self, stats, k, *, epoch, generator, backend):
        (seed,) = draw_seeds(generator, 1)
        return Selection(backend.top_k(None, stats.num_samples, 7, seed))


def test_a_custom_policy_of_0_2_keeps_its_kind_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="Legacy sets exact_k, fixed_subset, reads_losses, "
                                                "default_decay, final_full_epochs"):
        p = gp.Pruner(N, keep=0.5, policy=Legacy(), num_epochs=4)
    s = p.schedule
    assert (s.final_full_epochs, s.select_once, s.exact_size, s.reads_losses, p.decay) == \
        (1, True, False, False, 0.25)
    sets = [frozenset(p.plan(e).indices.tolist()) for e in range(3)]
    assert len(sets[0]) == 7 and sets[0] == sets[1] == sets[2]          # not k = 20: exact_k False
    assert p.plan(3).full


# ---------------------------------------------------------------- pure <name>_select functions
def stats_after_one_epoch() -> gp.LossStats:
    s = gp.LossStats(N)
    TorchBackend("cpu").observe_(s.tensors(), torch.arange(0, N, 2),
                                 torch.linspace(0.1, 3.0, N // 2), 0.9, 0)
    return s


@pytest.mark.parametrize("name", ["full", "uniform", "epsilon_greedy", "ucb", "infobatch",
                                  "static"])
def test_each_policy_selects_through_its_pure_function(name):
    """``Policy.select`` is its module's ``<name>_select`` on the statistics' tensors: the same
    Selection, and calling the function twice gives the same answer (no hidden state)."""
    stats, backend, k = stats_after_one_epoch(), TorchBackend("cpu"), 10
    rule = gp.POLICIES[name]().rule(0.25, N, gp.Schedule(10))
    policy = rule.policy
    got = policy.select(stats, k, epoch=3, generator=epoch_generator(5, 3), backend=backend)
    (seed,) = draw_seeds(epoch_generator(5, 3), 1)        # what a one-seed policy draws
    seeds = draw_seeds(epoch_generator(5, 3), 2)           # what epsilon-greedy draws
    pure = {
        "full": lambda: full_select(N, stats.device),
        "uniform": lambda: uniform_select(N, k, seed, backend),
        "epsilon_greedy": lambda: epsilon_greedy_select(greedy_score(stats.mean, stats.seen), k,
                                                        policy.epsilon, (seeds[0], seeds[1]),
                                                        backend),
        "ucb": lambda: ucb_select(ucb_score(stats.mean, stats.var, stats.seen, policy.c,
                                            policy.uncertainty, 3 - stats.last_epoch,
                                            policy.drift), k, seed, backend),
        "infobatch": lambda: infobatch_select(stats.mean, stats.seen, policy.ratio, seed,
                                              backend, policy.min_keep),
        "static": lambda: static_select(None, N, k, seed, backend),
    }[name]
    for want in (pure(), pure()):
        assert isinstance(want, Selection)
        assert torch.equal(got.indices, want.indices) and got.weight == want.weight
        assert (got.rescaled is None) == (want.rescaled is None)
        if got.rescaled is not None:
            assert torch.equal(got.rescaled, want.rescaled)


def test_fulldata_is_the_policy_of_full_epochs():
    assert isinstance(FULL_DATA, gp.FullData)
    sel = full_select(5, torch.device("cpu"))
    assert sel.indices.tolist() == [0, 1, 2, 3, 4] and sel.indices.dtype == torch.int32
