"""Science: InfoBatch's official semantics, UCB lock-in, the overlap metric (the re-score pass:
tests/test_refresh.py).

Expectations are hand-computed on small loss streams (the numbers are in the comments), or checked
against a line-by-line transcription of the official InfoBatch rule (NUS-HPC-AI-Lab/InfoBatch,
``infobatch/infobatch.py``: ``prune()`` and ``IBSampler.reset()``).
"""

from __future__ import annotations

import math

import pytest
import torch

import gpuprune as gp
from gpuprune.bench.runner import lock_in_runs, selection_overlaps
from gpuprune.plan import mask_lookup
from gpuprune.policies import Policy, Selection
from gpuprune.policies.infobatch import kept_share

from conftest import plan_set


def ids(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int64)


def rescaled_set(plan) -> set[int]:
    if plan.rescaled is None:
        return set()
    n = plan.num_samples
    return set(torch.nonzero(mask_lookup(plan.rescaled, torch.arange(n))).flatten().tolist())


# ================================================================================ InfoBatch
def test_infobatch_scores_the_latest_loss_by_default_and_ema_is_an_option():
    assert gp.InfoBatch().rule(0.5, 4, gp.Schedule(10)).decay == 0.0      # the policy's default
    p = gp.Pruner(4, prune_ratio=0.5, policy="infobatch", num_epochs=10)
    assert p.decay == 0.0
    p.plan(0)
    p.observe(ids(0, 1, 2, 3), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    p.observe(ids(0, 1), torch.tensor([5.0, 0.5]))
    assert p.stats.mean.tolist() == [5.0, 0.5, 3.0, 4.0]          # the last loss, nothing else
    q = gp.Pruner(4, prune_ratio=0.5, policy="infobatch", num_epochs=10, decay=0.9)
    q.plan(0)
    q.observe(ids(0, 1, 2, 3), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    q.observe(ids(0, 1), torch.tensor([5.0, 0.5]))
    assert q.stats.mean.tolist() == pytest.approx([1.4, 1.85, 3.0, 4.0])   # 0.9 * old + 0.1 * new


def test_infobatch_below_mean_rule_kept_count_and_weights_by_hand():
    p = gp.Pruner(10, prune_ratio=0.5, policy="infobatch", num_epochs=10, seed=5)
    plan = p.plan(0)
    assert len(plan) == 10 and rescaled_set(plan) == set()        # nothing seen: all, weight 1
    losses = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    p.observe(torch.arange(10), torch.tensor(losses))
    # epoch 1: mean 0.55; well learned {0..4}; keep 5 - 5 + ... = 5 above + floor(0.5 * 5) = 2
    plan = p.plan(1)
    chosen = plan_set(plan)
    assert len(plan) == 7 and {5, 6, 7, 8, 9} <= chosen
    below_kept = chosen & {0, 1, 2, 3, 4}
    assert len(below_kept) == 2
    assert plan.weight == 2.0 and rescaled_set(plan) == {0, 1, 2, 3, 4}
    # the weight mask is the well-learned set (the pruned ones are simply not trained)
    assert plan.weights_of(torch.arange(10)).tolist() == [2.0] * 5 + [1.0] * 5
    # the loss to backpropagate: mean(w * loss); a kept well-learned sample counts twice
    a = min(below_kept)
    out = p.observe(ids(a, 6), torch.tensor([losses[a], 2.0]))
    assert out.item() == pytest.approx((2.0 * losses[a] + 2.0) / 2)
    # epoch 1 trains the plan: the two well-learned ones keep their loss; 5..9 get new ones
    b = max(below_kept)
    p.observe(ids(b), torch.tensor([losses[b]]))
    p.observe(ids(5, 6, 7, 8, 9), torch.tensor([0.05, 2.0, 2.0, 2.0, 0.15]))
    # stored (raw, stale for the pruned): [.1 .2 .3 .4 .5 | .05 2 2 2 .15], sum 7.7, mean 0.77
    # well learned: {0,1,2,3,4,5,9} (7): kept 3 + floor(0.5 * 7) = 6, rescaled those 7
    plan = p.plan(2)
    assert len(plan) == 6 and {6, 7, 8} <= plan_set(plan)
    assert rescaled_set(plan) == {0, 1, 2, 3, 4, 5, 9}


def test_infobatch_ema_option_changes_the_below_mean_set_by_hand():
    """The same stream scored by an EMA (decay 0.9): 5..9 move a tenth of the way."""
    p = gp.Pruner(10, prune_ratio=0.5, policy="infobatch", num_epochs=10, decay=0.9, seed=5)
    p.plan(0)
    losses = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    p.observe(torch.arange(10), torch.tensor(losses))
    plan = p.plan(1)
    for i in plan_set(plan) & {0, 1, 2, 3, 4}:
        p.observe(ids(i), torch.tensor([losses[i]]))               # unchanged
    p.observe(ids(5, 6, 7, 8, 9), torch.tensor([0.05, 2.0, 2.0, 2.0, 0.15]))
    # scores 5..9: .545 .83 .92 1.01 .915; sum 1.5 + 4.22 = 5.72, mean .572
    # well learned {0..4, 5} (6): kept 4 + 3 = 7
    plan = p.plan(2)
    assert len(plan) == 7 and rescaled_set(plan) == {0, 1, 2, 3, 4, 5}


@pytest.mark.parametrize("ratio,kept_below,weight", [
    (0.95, 1, 10.0),      # official clamp: keep max(0.1, 0.05) = 0.1 of 10 -> 1, weight 10
    (0.999, 1, 10.0),
    (0.9, 1, 10.0),       # 1 - 0.9 = 0.0999... < 0.1 -> 0.1
    (0.5, 5, 2.0),
    (0.0, 10, 1.0),
])
def test_infobatch_kept_share_clamp_by_hand(ratio, kept_below, weight):
    p = gp.Pruner(20, prune_ratio=ratio, policy="infobatch", num_epochs=10, seed=1)
    p.plan(0)
    p.observe(torch.arange(20), torch.arange(20, dtype=torch.float32))   # mean 9.5: 0..9 below
    plan = p.plan(1)
    assert len(plan) == 10 + kept_below
    assert plan.weight == weight
    assert len(plan_set(plan) & set(range(10))) == kept_below
    assert float(plan.weights_of(torch.arange(20)).max()) == (weight if kept_below else 1.0)


def test_infobatch_min_keep_setting():
    assert kept_share(0.95) == 0.1 and kept_share(0.3) == pytest.approx(0.7)
    assert kept_share(0.95, min_keep=0.05) == pytest.approx(0.05)
    p = gp.Pruner(20, prune_ratio=0.95, policy=gp.InfoBatch(min_keep=0.25), num_epochs=10)
    p.plan(0)
    p.observe(torch.arange(20), torch.arange(20, dtype=torch.float32))
    plan = p.plan(1)
    assert len(plan) == 10 + 2 and plan.weight == 4.0                  # floor(0.25 * 10) = 2
    with pytest.raises(ValueError, match="min_keep must be > 0.0, got min_keep=0.0"):
        gp.InfoBatch(min_keep=0.0)
    with pytest.raises(ValueError, match="min_keep must be <= 1.0"):
        gp.InfoBatch(min_keep=1.5)
    assert p.config()["policy"] == {"name": "infobatch", "ratio": 0.95, "delta": 0.875,
                                    "min_keep": 0.25}


def official_full_epochs(num_epochs: int, delta: float) -> list[int]:
    """IBSampler: constructed once (reset at iteration 0), then reset at each epoch's __iter__, so
    epoch e runs at iteration e + 1 and is full data when ``iteration > num_epochs * delta``."""
    stop_prune = num_epochs * delta
    return [e for e in range(num_epochs) if e + 1 > stop_prune]


@pytest.mark.parametrize("num_epochs,delta,full", [
    (10, 0.875, [8, 9]),          # floor(8.75) = 8
    (3, 0.875, [2]),              # floor(2.625) = 2
    (8, 0.875, [7]),              # 7.0 exactly
    (5, 0.5, [2, 3, 4]),
    (4, 0.0, [0, 1, 2, 3]),
    (6, 1.0, []),
])
def test_infobatch_annealing_starts_at_floor_delta_e(num_epochs, delta, full):
    p = gp.Pruner(10, prune_ratio=0.5, policy=gp.InfoBatch(delta=delta), num_epochs=num_epochs)
    assert [e for e in range(num_epochs) if p.is_full_epoch(e)] == full
    assert official_full_epochs(num_epochs, delta) == full
    assert p.schedule.final_full_epochs == len(full)


def test_infobatch_full_epochs_reset_weights():
    """The official code keeps x2 weights through annealing when delta * E is fractional; here a
    full epoch right after a rescaled one has weight 1 everywhere."""
    p = gp.Pruner(10, prune_ratio=0.5, policy="infobatch", num_epochs=3, seed=2)
    p.plan(0)
    p.observe(torch.arange(10), torch.linspace(0.1, 1.0, 10))
    assert p.plan(1).weight == 2.0 and rescaled_set(p.current_plan)
    full = p.plan(2)                                   # floor(0.875 * 3) = 2
    assert full.full and full.rescaled is None and full.weight == 1.0
    assert p.observe(ids(0, 1), torch.tensor([1.0, 3.0])).item() == 2.0


def test_infobatch_mean_ignores_never_seen_and_nan():
    p = gp.Pruner(6, prune_ratio=0.5, policy="infobatch", num_epochs=10, seed=0)
    p.plan(0)
    p.observe(ids(0, 1, 2, 3), torch.tensor([1.0, 2.0, 3.0, 4.0]))    # 4, 5 never seen
    # mean over the seen: 2.5 -> below {0, 1}; unseen never "well learned": 6 - 2 + 1 = 5
    plan = p.plan(1)
    assert len(plan) == 5 and {2, 3, 4, 5} <= plan_set(plan) and rescaled_set(plan) == {0, 1}
    p.observe(ids(2), torch.tensor([float("nan")]))                    # kept at 3.0, counted
    assert int(p.stats.nonfinite) == 1
    plan = p.plan(2)
    assert len(plan) == 5 and rescaled_set(plan) == {0, 1}


def official_prune_mask(scores: torch.Tensor) -> torch.Tensor:
    """``well_learned_mask = (self.scores < self.scores.mean())`` (float32, all N)."""
    return scores < scores.mean()


def test_infobatch_matches_the_official_rule_in_lockstep():
    """Same loss stream, epoch by epoch: the official scores (raw last loss of every trained
    sample) give the same well-learned set, kept count and weights as gpuprune's. The random draw of
    the kept well-learned samples is gpuprune's (the official one reseeds numpy's global RNG), and
    both sides train that plan."""
    n, ratio, epochs, delta = 300, 0.7, 12, 0.875
    gen = torch.Generator().manual_seed(0)
    p = gp.Pruner(n, prune_ratio=ratio, policy="infobatch", num_epochs=epochs, seed=11)
    official = torch.full((n,), 3.0)                                   # the official initial score
    keep = min(1.0, max(1e-1, 1.0 - ratio))
    full_epochs = official_full_epochs(epochs, delta)
    difficulty = torch.rand(n, generator=gen) * 3
    for e in range(epochs):
        plan = p.plan(e)
        if e in full_epochs:
            assert plan.full and len(plan) == n
        else:
            mask = official_prune_mask(official)
            n_below = int(mask.sum())
            assert len(plan) == n - n_below + int(keep * n_below)
            assert rescaled_set(plan) == set(torch.nonzero(mask).flatten().tolist())
            assert plan.weight == pytest.approx(1 / keep)
            assert set(torch.nonzero(~mask).flatten().tolist()) <= plan_set(plan)  # all above
        chosen = plan.indices.long()
        losses = (difficulty[chosen] * math.exp(-0.3 * e)
                  + 0.05 * torch.rand(chosen.numel(), generator=gen))
        p.observe(chosen, losses)
        official[chosen] = losses                                      # __setscore__ / update()
    assert torch.equal(p.stats.mean, official)                        # raw last loss, bit for bit


# ================================================================================ overlap metric
class Scripted(Policy):
    """Returns a fixed id set per epoch."""

    name = "scripted"

    def __init__(self, sets: dict[int, list[int]]) -> None:
        self.sets = sets

    def select(self, stats, k, *, epoch, generator, backend) -> Selection:
        return Selection(torch.tensor(self.sets[epoch], dtype=torch.int32))


def test_overlap_in_history_by_hand():
    sets = {1: [0, 1, 2, 3], 2: [2, 3, 4, 5], 3: [2, 3, 4, 6]}
    p = gp.Pruner(10, keep=0.4, policy=Scripted(sets), num_epochs=5, warmup_epochs=1,
                  final_full_epochs=1)
    for e in range(5):
        p.plan(e)
    ov = [r["overlap"] for r in p.history]
    # e0 full: no previous; e1 vs full: 4/10; e2: |{2,3}| / |{0..5}| = 2/6;
    # e3: |{2,3,4}| / |{2,3,4,5,6}| = 3/5; e4 full vs 4: 4/10
    assert ov[0] is None
    assert ov[1:] == pytest.approx([0.4, 2 / 6, 3 / 5, 0.4])
    assert [r["reselected"] for r in p.history] == [False, True, True, True, False]
    assert [r["size"] for r in p.history] == [10, 4, 4, 4, 10]
    # the lock-in detector's view: only new selections right after a pruned plan
    got = selection_overlaps(p.history)
    assert [e for e, _ in got] == [2, 3] and [o for _, o in got] == pytest.approx([2 / 6, 3 / 5])


def test_overlap_of_a_reused_selection_is_one_and_not_a_selection():
    sets = {0: [0, 1, 2], 2: [0, 1, 3], 4: [0, 1, 3]}
    p = gp.Pruner(6, keep=0.5, policy=Scripted(sets), num_epochs=6, selection_interval=2)
    for e in range(6):
        p.plan(e)
    h = p.history
    assert [r["reselected"] for r in h] == [True, False, True, False, True, False]
    assert [r["overlap"] for r in h][1:] == pytest.approx([1.0, 0.5, 1.0, 1.0, 1.0])
    got = selection_overlaps(h)
    assert [e for e, _ in got] == [2, 4] and [o for _, o in got] == pytest.approx([0.5, 1.0])


def record(epoch, overlap, reselected=True, full=False):
    return {"epoch": epoch, "size": 5, "full": full, "reselected": reselected, "overlap": overlap}


def test_lock_in_runs_by_hand():
    h = [record(0, None), record(1, 0.5), record(2, 0.96), record(3, 0.97), record(4, 0.99),
         record(5, 0.5), record(6, 0.96), record(7, 0.96)]
    assert lock_in_runs(h) == [(2, 4)]                   # the run of two at the end is too short
    assert lock_in_runs(h, length=2) == [(2, 4), (6, 7)]
    assert lock_in_runs([record(0, None)] + [record(e, 0.95) for e in range(1, 6)]) == []  # strict
    assert lock_in_runs([record(0, None)] + [record(e, 1.0) for e in range(1, 4)]) == [(1, 3)]
    # reused subsets (overlap 1 by design) are skipped, not counted; full epochs break nothing
    h = [record(0, None), record(1, 1.0, reselected=False), record(2, 0.99),
         record(3, 1.0, reselected=False), record(4, 0.99), record(5, 1.0, reselected=False),
         record(6, 0.99), record(7, 0.4, reselected=False, full=True)]
    assert selection_overlaps(h) == [(2, 0.99), (4, 0.99), (6, 0.99)]
    assert lock_in_runs(h) == [(2, 6)]


# ================================================================================ UCB lock-in
def drive(policy, n=400, keep=0.25, epochs=14):
    """Trained samples' losses fall (so their statistics move); the others stay frozen."""
    gen = torch.Generator().manual_seed(3)
    base = torch.rand(n, generator=gen) + 0.5
    p = gp.Pruner(n, keep=keep, policy=policy, seed=0)
    for e in range(epochs):
        chosen = p.plan(e).indices.long()
        noise = 0.3 * torch.rand(chosen.numel(), generator=gen)
        p.observe(chosen, base[chosen] * math.exp(-0.15 * e) + noise)
    return p


def test_ucb_without_drift_locks_in_and_the_default_does_not():
    locked = drive(gp.UCB(drift=0.0))
    runs = lock_in_runs(locked.history)            # the same 100 samples, epochs 5-10 here
    assert runs and runs[0][1] - runs[0][0] >= 4, [r["overlap"] for r in locked.history]
    default = drive(gp.UCB())
    assert default.policy.drift > 0.0
    assert lock_in_runs(default.history) == [], [r["overlap"] for r in default.history]
    assert max(ov for _, ov in selection_overlaps(default.history)[4:]) < 0.95


def drive_with_rescoring(policy, rescore: bool, n=400, keep=0.25, epochs=14):
    """A learning curve where hard samples are learnt slowly: sample i's loss is
    ``base_i * exp(-rate_i * times_trained_i)`` plus noise, ``rate_i = 0.4 (1.6 - base_i)``. With
    ``rescore``, before each new selection the unselected samples are observed with their current
    loss (``trained=False``, what a re-score pass records), so every sample's statistics are fresh."""
    gen = torch.Generator().manual_seed(3)
    base = torch.rand(n, generator=gen) + 0.5
    rate, trained = 0.4 * (1.6 - base), torch.zeros(n)
    p = gp.Pruner(n, keep=keep, policy=policy, seed=0)

    def loss(ids):
        return base[ids] * torch.exp(-rate[ids] * trained[ids]) + 0.3 * torch.rand(
            ids.numel(), generator=gen)
    for e in range(epochs):
        if rescore and e > 0 and p.will_select(e):
            rest = torch.ones(n, dtype=torch.bool).index_fill(0, p.current_plan.indices.long(), False)
            rest = torch.nonzero(rest).flatten()
            p.observe(rest, loss(rest), trained=False)
        chosen = p.plan(e).indices.long()
        trained[chosen] += 1
        p.observe(chosen, loss(chosen))
    return p


def test_the_rescoring_pass_brings_ucbs_lock_in_back_as_documented():
    """The caveat in README and docs/results.md §3, on a simulated curve: with fresh losses for
    every sample UCB keeps choosing the same hard subset (overlap > 0.95 for 5 selections from epoch
    2), longer than without the pass; epsilon-greedy's random share keeps it below the threshold."""
    with_pass = lock_in_runs(drive_with_rescoring(gp.UCB(), True).history)
    without = lock_in_runs(drive_with_rescoring(gp.UCB(), False).history)
    assert with_pass == [(2, 6)], with_pass
    assert all(b - a < 6 - 2 for a, b in without), without
    eps = drive_with_rescoring(gp.EpsilonGreedy(), True).history
    assert lock_in_runs(eps) == [] and max(o for _, o in selection_overlaps(eps)) < 0.9


def test_ucb_lock_in_mechanism_only_trained_variances_grow():
    """After every sample is seen (epochs 0-3 at keep 0.25), drift=0: the variance of the samples
    not trained since stays exactly what it was; only trained samples' variances change."""
    p = drive(gp.UCB(drift=0.0), epochs=4)
    var4, mean4 = p.stats.var.clone(), p.stats.mean.clone()
    chosen = p.plan(4).indices.long()
    p.observe(chosen, torch.zeros(chosen.numel()))
    rest = torch.ones(400, dtype=torch.bool)
    rest[chosen] = False
    assert torch.equal(p.stats.var[rest], var4[rest]) and torch.equal(p.stats.mean[rest], mean4[rest])
    assert bool((p.stats.var[chosen] > var4[chosen]).all())       # each change feeds the variance
