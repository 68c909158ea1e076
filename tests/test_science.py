"""Science: InfoBatch's official semantics, UCB lock-in, the overlap metric, the re-score pass.

Expectations are hand-computed on small loss streams (the numbers are in the comments), or checked
against a line-by-line transcription of the official InfoBatch rule (NUS-HPC-AI-Lab/InfoBatch,
``infobatch/infobatch.py``: ``prune()`` and ``IBSampler.reset()``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gpuprune as gp
from gpuprune.bench.runner import lock_in_runs, selection_overlaps
from gpuprune.plan import mask_lookup
from gpuprune.policies import Policy, Selection
from gpuprune.policies.infobatch import kept_share
from gpuprune.refresh import Refresher, refresh_due, refresh_scores, refresh_targets


def ids(*xs) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int64)


def plan_set(plan) -> set[int]:
    return set(plan.indices.tolist())


def rescaled_set(plan) -> set[int]:
    if plan.rescaled is None:
        return set()
    n = plan.num_samples
    return set(torch.nonzero(mask_lookup(plan.rescaled, torch.arange(n))).flatten().tolist())


# ================================================================================ InfoBatch
def test_infobatch_scores_the_latest_loss_by_default_and_ema_is_an_option():
    assert gp.InfoBatch.default_decay == 0.0
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


# ================================================================================ re-score pass
class Net(torch.nn.Module):
    """Linear model with dropout, so eval-mode losses differ from train-mode ones."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = torch.nn.Linear(6, 3)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3, 6, generator=g))
            self.lin.bias.zero_()
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.lin(self.drop(x))


def dataset(n=40):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def eval_losses(model, x, y, which):
    model.eval()
    with torch.no_grad():
        out = F.cross_entropy(model(x[which]), y[which], reduction="none")
    model.train()
    return out


def trained_pruner(n=40, keep=0.5, policy=None, **kw) -> gp.Pruner:
    p = gp.Pruner(n, keep=keep, policy=policy if policy is not None else gp.UCB(), seed=4, **kw)
    plan = p.plan(0)
    p.observe(plan.indices.long(), torch.linspace(0.5, 1.5, len(plan)))
    return p


def counters(p: gp.Pruner):
    return (p.rounds, p.stats.selected.clone(), p.history, p.current_plan,
            int(p.stats.nonfinite), int(p.stats.invalid_batches))


def assert_counters_equal(a, b):
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2] and a[3] is b[3]
    assert a[4:] == b[4:]


def test_refresh_updates_exactly_the_unselected_and_no_training_counter():
    x, y = dataset()
    model = Net().train()
    p = trained_pruner()
    before = (p.stats.mean.clone(), p.stats.var.clone(), p.stats.last_epoch.clone())
    c0 = counters(p)
    planned = plan_set(p.current_plan)
    res = refresh_scores(model, (x, y), p, 1)
    unselected = sorted(set(range(40)) - planned)
    assert res.requested == res.scored == 20
    changed = ((p.stats.mean != before[0]) | (p.stats.last_epoch != before[2])).nonzero()
    assert sorted(changed.flatten().tolist()) == unselected
    u = torch.tensor(unselected)
    # never-trained samples take the eval-mode loss as is (first observation), stamped epoch 0
    assert torch.allclose(p.stats.mean[u], eval_losses(model, x, y, u))
    assert p.stats.last_epoch[u].tolist() == [0] * 20
    t = torch.tensor(sorted(planned))
    assert torch.equal(p.stats.mean[t], before[0][t]) and torch.equal(p.stats.var[t], before[1][t])
    assert_counters_equal(counters(p), c0)
    assert model.training                                             # training flag restored


def test_refresh_all_updates_every_sample_once_with_the_ema():
    x, y = dataset()
    model = Net()
    p = trained_pruner()
    old = p.stats.mean.clone()
    planned = torch.tensor(sorted(plan_set(p.current_plan)))
    res = refresh_scores(model, (x, y), p, 1, which="all")
    assert res.scored == 40
    fresh = eval_losses(model, x, y, planned)
    # seen samples: mean += (1 - 0.9) * (loss - mean), once
    assert torch.allclose(p.stats.mean[planned], old[planned] + 0.1 * (fresh - old[planned]))


def test_refresh_random_share_is_seeded_and_inside_the_unselected():
    p = trained_pruner()
    unselected = set(range(40)) - plan_set(p.current_plan)
    a = refresh_targets(p, 1, share=0.25)
    assert a.numel() == 5 and set(a.tolist()) <= unselected           # floor(0.25 * 20 + 0.5)
    assert torch.equal(a, refresh_targets(p, 1, share=0.25))
    other = [refresh_targets(p, 1, share=0.25, seed=s) for s in range(1, 6)]
    assert any(set(o.tolist()) != set(a.tolist()) for o in other)
    b = refresh_targets(p, 1, which="all", share=0.1)
    assert b.numel() == 4 and len(set(b.tolist())) == 4
    assert refresh_targets(p, 1, share=0.001).numel() == 1            # at least one
    state = torch.random.get_rng_state()
    refresh_targets(p, 2, share=0.5)
    assert torch.equal(torch.random.get_rng_state(), state)           # no global RNG
    x, y = dataset()
    before = p.stats.mean.clone()
    res = Refresher(p, share=0.25).run(Net(), (x, y), 1)
    assert res.scored == 5
    assert sorted((p.stats.mean != before).nonzero().flatten().tolist()) == sorted(a.tolist())


def test_refresh_due_only_before_a_loss_based_selection():
    x, y = dataset()
    fresh = gp.Pruner(40, keep=0.5, policy=gp.UCB(), seed=0)
    assert not refresh_due(fresh, 0)                                  # nothing trained yet
    p = trained_pruner(num_epochs=6, final_full_epochs=1, selection_interval=2)
    assert refresh_due(p, 2) and not refresh_due(p, 1)                # epoch 1 reuses the subset
    assert not refresh_due(p, 0)                                      # already planned
    assert not refresh_due(p, 5)                                      # full data: no selection
    before = p.stats.mean.clone()
    assert refresh_scores(Net(), (x, y), p, 1).scored == 0
    assert torch.equal(p.stats.mean, before)
    assert refresh_scores(Net(), (x, y), p, 1, force=True).scored == 20
    u = trained_pruner(policy="uniform")
    assert not refresh_due(u, 1)                                      # the losses are not read
    w = gp.Pruner(40, keep=0.5, policy=gp.UCB(), warmup_epochs=1, seed=0)
    w.plan(0)
    assert refresh_due(w, 1) and refresh_targets(w, 1).numel() == 0   # after a full epoch: none


def test_refresh_through_a_dataloader_equals_tensors():
    from torch.utils.data import DataLoader, TensorDataset
    x, y = dataset()
    model = Net()
    a, b, c = trained_pruner(), trained_pruner(), trained_pruner()
    ra = Refresher(a).run(model, (x, y), 1, batch_size=8)
    rb = Refresher(b)
    loader = DataLoader(gp.IndexedDataset(TensorDataset(x, y)), batch_size=8, sampler=rb.sampler())
    res = rb.run(model, loader, 1)
    assert res.scored == ra.scored == 20
    assert torch.equal(a.stats.mean, b.stats.mean) and torch.equal(a.stats.var, b.stats.var)
    # any loader over all samples: the samples not due are skipped before the forward
    everything = DataLoader(gp.IndexedDataset(TensorDataset(x, y)), batch_size=16)
    assert Refresher(c).run(model, everything, 1).scored == 20
    assert torch.allclose(c.stats.mean, a.stats.mean)
    assert torch.equal(c.stats.last_epoch, a.stats.last_epoch)


def test_refresh_refuses_the_training_loader_and_warns_about_missing_samples():
    from torch.utils.data import DataLoader, TensorDataset
    x, y = dataset()
    p = trained_pruner()
    train_loader = DataLoader(gp.IndexedDataset(TensorDataset(x, y)), batch_size=8,
                              sampler=p.sampler())
    before = p.stats.mean.clone()
    with pytest.raises(ValueError, match="training Pruner's own plans"):
        refresh_scores(Net(), train_loader, p, 1)
    assert torch.equal(p.stats.mean, before) and p.current_plan.epoch == 0
    part = [(x[:10], y[:10], torch.arange(10))]                       # only ids 0..9
    due_there = len(set(range(10)) - plan_set(p.current_plan))
    with pytest.warns(RuntimeWarning, match=f"delivered {due_there} of the 20 samples due"):
        res = refresh_scores(Net(), part, p, 1)
    assert res.scored == due_there


def test_refresh_bad_arguments():
    x, y = dataset()
    p = trained_pruner()
    with pytest.raises(ValueError, match="which must be one of"):
        Refresher(p, which="some")
    with pytest.raises(ValueError, match="share must be > 0.0, got share=0.0"):
        Refresher(p, share=0.0)
    with pytest.raises(TypeError, match="pruner must be a gpuprune.Pruner"):
        Refresher("p")
    with pytest.raises(TypeError, match="data must be a pair"):
        refresh_scores(Net(), 3, p, 1)
    with pytest.raises(ValueError, match="data tensors must hold all num_samples=40"):
        refresh_scores(Net(), (x[:5], y[:5]), p, 1)
    with pytest.raises(ValueError, match="one loss per sample"):
        refresh_scores(Net(), (x, y), p, 1, loss_fn=lambda o, t: F.cross_entropy(o, t))
    assert p.stats.last_epoch.tolist().count(-1) == 20                # nothing recorded


def test_refresh_through_dali_equals_tensors():
    pytest.importorskip("nvidia.dali")
    from gpuprune.dali import ArraySource, build_iterator
    x, y = dataset()
    model = Net()
    a, b = trained_pruner(), trained_pruner()
    Refresher(a).run(model, (x, y), 1, batch_size=8)
    rb = Refresher(b)
    it = build_iterator(rb.feed, ArraySource(x.numpy(), y.numpy()), batch_size=8,
                        output_map=("data", "label"), num_threads=1, device_id=None)
    res = rb.run(model, it, 1)
    assert res.scored == 20
    assert torch.equal(a.stats.mean, b.stats.mean) and torch.equal(a.stats.var, b.stats.var)
