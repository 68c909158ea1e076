"""gpuprune.policies: each policy's whole rule (the one hook, Policy.rule) and its pure
``<name>_select`` function; the Pruner follows the Rule and reads nothing else of a policy."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import gpuprune as gp
from gpuprune.stats import masked_mean
from gpuprune.backend import TorchBackend
from gpuprune.policies import FULL_DATA, Policy, Rule, Selection
from gpuprune.policies.epsilon_greedy import epsilon_greedy_select, greedy_score
from gpuprune.policies.full import full_select
from gpuprune.policies.infobatch import infobatch_select
from gpuprune.policies.static import static_select
from gpuprune.policies.ucb import ucb_score, ucb_select
from gpuprune.policies.uniform import uniform_select
from gpuprune.rng import draw_seeds, epoch_generator

from conftest import POLICY_NAMES, feed, make

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
    """``Policy.select`` is its module's ``<name>_select``: the same description, twice the same
    (no hidden state); and the backend carries a description out as the documented rule, checked
    here against ``top_k`` of the policy's score function (the set, before the plan's shuffle)."""
    stats, backend, k = stats_after_one_epoch(), TorchBackend("cpu"), 10
    rule = gp.POLICIES[name]().rule(0.25, N, gp.Schedule(10))
    policy = rule.policy
    got = policy.select(stats, k, epoch=3, generator=epoch_generator(5, 3), backend=backend)
    (seed,) = draw_seeds(epoch_generator(5, 3), 1)        # what a one-seed policy draws
    seeds = draw_seeds(epoch_generator(5, 3), 2)           # what epsilon-greedy draws
    pure = {
        "full": lambda: full_select(),
        "uniform": lambda: uniform_select(k, seed),
        "epsilon_greedy": lambda: epsilon_greedy_select(k, policy.epsilon, (seeds[0], seeds[1])),
        "ucb": lambda: ucb_select(k, seed, policy.c, policy.uncertainty, policy.drift, 3),
        "infobatch": lambda: infobatch_select(N, policy.ratio, seed, policy.min_keep),
        "static": lambda: static_select(None, k, seed),
    }[name]
    for want in (pure(), pure()):
        assert isinstance(want, Selection) and got.weight == want.weight
        assert got.everything == want.everything and (got.pick is None) == (want.pick is None)
        if got.pick is not None:
            a, b = got.pick, want.pick
            assert (type(a.score), a.k, a.seed, a.explore, a.explore_seed, a.below_share) == \
                (type(b.score), b.k, b.seed, b.explore, b.explore_seed, b.below_share)
            assert a.score == b.score
    if got.everything:
        return
    parts = backend.plan(stats, shuffle_seed=1, pick=got.pick, count=False)
    chosen = sorted(parts.indices.tolist())
    seen = stats.seen
    if name == "uniform" or name == "static":
        want_ids = backend.top_k(None, N, k, seed)
    elif name == "ucb":
        score = ucb_score(stats.mean, stats.var, seen, policy.c, policy.uncertainty,
                          3 - stats.last_epoch, policy.drift)
        want_ids = backend.top_k(score, N, k, seed)
    elif name == "epsilon_greedy":
        m = math.floor(policy.epsilon * k)
        exploit = backend.top_k(greedy_score(stats.mean, seen), N, k - m, seeds[0])
        rest = torch.zeros(N)
        rest[exploit.long()] = float("-inf")
        want_ids = torch.cat([exploit, backend.top_k(rest, N, m, seeds[1])])
    else:                                                  # infobatch: see its own tests too
        s64 = stats.mean.double()
        below = seen & (s64 < masked_mean(s64, seen))
        q = max(policy.min_keep, 1.0 - policy.ratio)
        kept = N - int(below.sum()) + math.floor(q * int(below.sum()))
        want_ids = backend.top_k(torch.where(below, 0.0, 1.0), N, kept, seed)
    assert chosen == sorted(want_ids.tolist())


def test_fulldata_is_the_policy_of_full_epochs():
    assert isinstance(FULL_DATA, gp.FullData)
    sel = full_select()
    assert sel.everything and sel.pick is None and sel.indices is None
    p = gp.Pruner(5, keep=0.4, policy="ucb", num_epochs=2, warmup_epochs=1)
    assert sorted(p.plan(0).indices.tolist()) == [0, 1, 2, 3, 4] and p.plan(0).full


# ---------------------------------------------------------------- (from test_core.py)
def infobatch_expected_count(stats: gp.LossStats, ratio: float) -> int:
    seen = stats.seen
    s = stats.mean.double()
    mean = s[seen].sum() / max(int(seen.sum()), 1)
    n_below = int((seen & (s < mean)).sum())
    return stats.num_samples - n_below + math.floor((1 - ratio) * n_below)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_plans_are_unique_in_range_and_exactly_k(policy):
    p = make(policy)
    for epoch in range(6):
        expected = None
        if policy == "infobatch" and not p.is_full_epoch(epoch):
            expected = infobatch_expected_count(p.stats, p.policy.ratio)
        plan = p.plan(epoch)
        idx = plan.indices
        assert idx.dtype == torch.int32 and idx.dim() == 1
        assert idx.unique().numel() == idx.numel()
        assert int(idx.min()) >= 0 and int(idx.max()) < 500
        if policy == "full":
            assert len(plan) == 500 and plan.full
        elif policy == "infobatch":
            assert len(plan) == expected
        else:
            assert len(plan) == p.k == 150
        feed(p, plan)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_same_seed_and_epoch_give_same_plan_and_epochs_differ(policy):
    a, b = make(policy), make(policy)
    plans = []
    for epoch in range(4):
        pa, pb = a.plan(epoch), b.plan(epoch)
        assert torch.equal(pa.indices, pb.indices)
        plans.append(pa.indices.clone())
        feed(a, pa)
        feed(b, pb)
    assert not torch.equal(plans[1], plans[2])   # at least the order changes every epoch
    c = gp.Pruner(500, keep=0.3, policy=policy, num_epochs=8, seed=12)
    assert not torch.equal(c.plan(0).indices, plans[0])


def test_uniform_subsets_change_between_epochs():
    p = make("uniform")
    s0 = set(p.plan(0).indices.tolist())
    s1 = set(p.plan(1).indices.tolist())
    assert s0 != s1 and len(s0 & s1) < 100  # ~45 shared expected for 150 of 500


def test_static_subset_is_fixed_and_follows_scores():
    p = make("static")
    s0 = set(p.plan(0).indices.tolist())
    feed(p, p.plan(0))
    assert set(p.plan(1).indices.tolist()) == s0
    scores = torch.arange(500, dtype=torch.float32)
    q = gp.Pruner(500, keep=0.3, policy=gp.Static(scores), seed=1)
    assert sorted(q.plan(0).indices.tolist()) == list(range(350, 500))
    with pytest.raises(ValueError, match="one score per sample: got 500 scores for num_samples=400"):
        gp.Pruner(400, policy=gp.Static(scores))


def test_static_scores_are_hashed_once_at_construction(monkeypatch):
    """config() (read by every plan, checkpoint and cross-rank check) reports the scores by a
    digest computed once, not by rehashing all N scores on each call."""
    import hashlib
    from types import SimpleNamespace

    from gpuprune.policies import static
    scores = torch.arange(500, dtype=torch.float32)
    digest = hashlib.sha256(scores.numpy().tobytes()).hexdigest()[:16]
    policy = gp.Static(scores)
    assert policy.config() == {"name": "static", "scores": f"sha256:{digest}:500"}
    assert gp.Static().config() == {"name": "static", "scores": None}

    def no_hash(*args):
        raise AssertionError("settings() rehashed the scores")
    monkeypatch.setattr(static, "hashlib", SimpleNamespace(sha256=no_hash))   # this module's only
    p = gp.Pruner(500, keep=0.3, policy=policy, seed=1)
    p.plan(0)
    assert p.state_dict()["config"]["policy"]["scores"] == f"sha256:{digest}:500"


def test_ucb_prefers_unseen_then_high_upper_bound():
    p = gp.Pruner(6, keep=0.5, policy=gp.UCB(c=1.0), seed=0)
    p.plan(0)
    # samples 0..3 seen with losses; 4, 5 unseen -> chosen first
    p.observe(torch.tensor([0, 1, 2, 3]), torch.tensor([5.0, 1.0, 0.5, 0.1]))
    assert set(p.plan(1).indices.tolist()) == {4, 5, 0}
    p.observe(torch.tensor([4, 5, 0]), torch.tensor([0.2, 0.3, 0.4]))
    score = p.stats.mean + p.stats.var.sqrt()
    expected = set(torch.topk(score, 3).indices.tolist())
    assert set(p.plan(2).indices.tolist()) == expected


def test_ucb_var_option_and_c_zero_is_greedy_on_mean():
    p = gp.Pruner(4, keep=0.5, policy=gp.UCB(c=0.0), seed=0)
    p.plan(0)
    p.observe(torch.arange(4), torch.tensor([0.1, 0.9, 0.5, 0.7]))
    assert set(p.plan(1).indices.tolist()) == {1, 3}
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        gp.UCB(uncertainty="range")


def test_epsilon_greedy_exploit_and_explore_split():
    n = 1000
    p = gp.Pruner(n, keep=0.2, policy=gp.EpsilonGreedy(epsilon=0.25), seed=5)
    p.plan(0)
    for i in range(0, n, 100):
        idx = torch.arange(i, i + 100)
        p.observe(idx, idx.float())          # loss = index: the top ids are the best exploits
    sel = set(p.plan(1).indices.tolist())
    k, m = 200, math.floor(0.25 * 200)
    top = set(range(n - (k - m), n))
    assert top <= sel                          # all k - m exploits
    explore = sel - top
    assert len(explore) == m and max(explore) < n - (k - m)
    assert min(explore) < 400                  # spread over the rest, not adjacent to the top


def test_infobatch_weights_counts_and_annealing():
    n = 1000
    p = gp.Pruner(n, prune_ratio=0.5, policy=gp.InfoBatch(delta=0.75), num_epochs=8, seed=3)
    assert p.schedule.final_full_epochs == 2  # epochs >= 0.75 * 8 = 6 train on full data
    plan0 = p.plan(0)                        # nothing seen: all kept, every weight 1
    assert len(plan0) == n and bool((plan0.weights == 1).all())
    p.observe(torch.arange(n), torch.arange(n, dtype=torch.float32))  # below the mean: ids < 499.5
    plan1 = p.plan(1)
    assert len(plan1) == 500 + 250
    w = dict(zip(plan1.indices.tolist(), plan1.weights.tolist()))
    assert all(w[i] == 2.0 for i in w if i < 500) and all(w[i] == 1.0 for i in w if i >= 500)
    assert sum(1 for i in w if i < 500) == 250
    # the returned loss is the weighted mean
    idx = torch.tensor([plan1.indices[0].item(), 999])
    loss = torch.tensor([1.0, 1.0], requires_grad=True)
    out = p.observe(idx, loss)
    assert out.item() == pytest.approx((w[idx[0].item()] * 1.0 + 1.0) / 2)
    out.backward()
    assert loss.grad.tolist() == pytest.approx([w[idx[0].item()] / 2, 0.5])
    for epoch in range(2, 8):
        plan = p.plan(epoch)
        if epoch >= 6:
            assert plan.full and len(plan) == n and plan.weights is None
        feed(p, plan)


def test_infobatch_needs_num_epochs():
    with pytest.raises(ValueError, match="needs num_epochs"):
        gp.Pruner(10, policy="infobatch")


@pytest.mark.parametrize("make_policy, exc, msg", [
    (lambda: gp.EpsilonGreedy(epsilon=1.5), ValueError, "epsilon must be <= 1.0"),
    (lambda: gp.UCB(c=-3.0), ValueError, "c must be >= 0.0"),
    (lambda: gp.UCB(drift=-1.0), ValueError, "drift must be >= 0.0"),
    (lambda: gp.InfoBatch(delta=5.0), ValueError, "delta must be <= 1.0"),
    (lambda: gp.InfoBatch(ratio=1.0), ValueError, "ratio must be < 1.0"),
    (lambda: gp.Static(torch.arange(3)), TypeError, "scores must be a floating torch.Tensor"),
])


def test_policy_settings_are_checked_by_their_policy(make_policy, exc, msg):
    with pytest.raises(exc, match=msg):
        make_policy()


def test_ucb_drift_hand_computed_score():
    from gpuprune.policies.ucb import ucb_score
    mean = torch.tensor([1.0, 1.0, 1.0, 2.0])
    var = torch.tensor([0.0, 0.5, 1.0, 9.0])
    seen = torch.tensor([True, True, True, False])
    age = torch.tensor([0, 2, 1, 5])
    # vbar over seen = 0.5; var_eff = var + 1 * 0.5 * age = [0, 1.5, 1.5, -]
    got = ucb_score(mean, var, seen, c=2.0, age=age, drift=1.0)
    assert got[:3].tolist() == pytest.approx([1.0, 1.0 + 2 * 1.5 ** 0.5, 1.0 + 2 * 1.5 ** 0.5])
    assert got[3].item() == float("inf")
    assert torch.equal(ucb_score(mean, var, seen, c=2.0, age=age, drift=0.0),
                       ucb_score(mean, var, seen, c=2.0))


def test_ucb_drift_keeps_scores_finite_and_ordered_under_extreme_losses():
    from gpuprune.policies.ucb import ucb_score
    p = gp.Pruner(6, keep=0.5, policy=gp.UCB(drift=1.0), seed=0)
    p.plan(0)
    p.observe(torch.tensor([0, 0, 1, 2, 3, 4, 5]),
              torch.tensor([1e38, -1e38, 1.0, 2.0, 3.0, 4.0, 5.0]))
    age = 1 - p.stats.last_epoch
    score = ucb_score(p.stats.mean, p.stats.var, p.stats.seen, 1.0, "std", age, 1.0)
    assert torch.isfinite(score).all()
    assert score[1:].tolist() == sorted(score[1:].tolist())     # ordered like the means
    assert len(p.plan(1)) == 3


def test_ucb_without_drift_settles_and_with_drift_rotates():
    def rounds_in_use(drift):
        p = gp.Pruner(400, keep=0.25, policy=gp.UCB(drift=drift), seed=0)
        for epoch in range(16):
            feed(p, p.plan(epoch))
        return int((p.stats.selected >= 3).sum())
    settled, rotating = rounds_in_use(0.0), rounds_in_use(1.0)
    assert settled <= 110          # about the same 100 samples every epoch
    assert rotating >= settled + 25


def test_infobatch_without_rescaling_plans_the_same_samples_at_weight_1():
    """InfoBatch(rescale=False), the ablation: the same ids as the official rule, every loss
    weight 1; its setting appears in the configuration only when off (0.2's otherwise)."""
    from conftest import feed
    runs = {}
    for rescale in (True, False):
        p = gp.Pruner(64, keep=0.5, policy=gp.InfoBatch(rescale=rescale), num_epochs=4, seed=0)
        plans = []
        for e in range(4):
            plan = p.plan(e)
            plans.append(plan)
            feed(p, plan)
        runs[rescale] = (p, plans)
    (on, on_plans), (off, off_plans) = runs[True], runs[False]
    assert [len(a) for a in on_plans] == [len(b) for b in off_plans]
    assert all(torch.equal(a.indices, b.indices) for a, b in zip(on_plans, off_plans))
    assert on_plans[1].weight == 2.0 and off_plans[1].weight == 1.0
    w = off_plans[1].weights
    assert w is None or bool((w == 1.0).all())
    assert "rescale" not in on.config()["policy"]
    assert off.config()["policy"]["rescale"] is False
    again = gp.Pruner(64, keep=0.5, policy=gp.InfoBatch(rescale=False), num_epochs=4, seed=0)
    again.load_state_dict(off.state_dict())
    with pytest.raises(ValueError, match="policy.rescale"):
        on_fresh = gp.Pruner(64, keep=0.5, policy="infobatch", num_epochs=4, seed=0)
        on_fresh.load_state_dict(off.state_dict())
    with pytest.raises(TypeError, match="rescale must be a bool"):
        gp.InfoBatch(rescale=1)
