"""gpuprune.refresh: the re-score pass (fresh losses for unselected samples before a selection),
its feed (a Planner over the samples due), and its all-or-nothing rule. The pass under a process
group (2 and 4 gloo ranks) is tested in tests/test_distributed.py's launched job."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gpuprune as gp
from gpuprune.refresh import Refresher, refresh_due, refresh_scores, refresh_targets
from gpuprune.shard import Planner

from dist_jobs import (R_EPOCHS, R_FEEDS, R_KEEP, RN, STATE_KEYS, make_refresh_pruner,
                       observe_all, refresh_data, refresh_model)

from conftest import plan_set


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
                              sampler=gp.PrunedSampler(p))
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


# ---------------------------------------------------------------- all or nothing (issue 22, item 2)
def state_of(p: gp.Pruner) -> dict:
    """Everything a pass could record: the statistics and the counters, by value."""
    return {**{k: v.clone() for k, v in p.stats.state_dict().items()}, "rounds": p.rounds,
            "history": p.history}


def assert_state(p: gp.Pruner, before: dict) -> None:
    after = state_of(p)
    for key, value in before.items():
        same = torch.equal(value, after[key]) if isinstance(value, torch.Tensor) else \
            value == after[key]
        assert same, key


def unselected_batches(p: gp.Pruner, x, y, size: int = 5) -> list:
    ids = torch.tensor(sorted(set(range(40)) - plan_set(p.current_plan)))
    return [(x[b], y[b], b) for b in ids.split(size)]


class SecondBatchScalar:
    """A loss_fn that reduces on its second call: a bug the first batch does not show."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, out, target):
        self.calls += 1
        return F.cross_entropy(out, target, reduction="none" if self.calls == 1 else "mean")


@pytest.mark.parametrize("feed", ["tensors", "batches"])
def test_a_bad_loss_fn_output_on_the_second_batch_records_nothing(feed):
    x, y = dataset()
    p = trained_pruner()
    before = state_of(p)
    data = (x, y) if feed == "tensors" else unselected_batches(p, x, y)
    loss_fn = SecondBatchScalar()
    with pytest.raises(ValueError, match=r"loss_fn must return one loss per sample "
                                         r"\(shape \(5,\)\), got torch.Size\(\[\]\)"):
        Refresher(p).run(Net(), data, 1, loss_fn=loss_fn, batch_size=5)
    assert loss_fn.calls == 2
    assert_state(p, before)


@pytest.mark.parametrize("bad, shown", [(40, 40), (-1, -1), (2**40, 2**40)])
def test_an_id_outside_the_dataset_in_a_later_batch_is_named_and_records_nothing(bad, shown):
    x, y = dataset()
    p = trained_pruner()
    before = state_of(p)
    batches = unselected_batches(p, x, y)
    xs, ys, ids = batches[2]
    batches[2] = (xs, ys, torch.cat([ids[:-1], torch.tensor([bad])]))
    with pytest.raises(ValueError, match=rf"data yielded sample id {shown} in batch 2, outside "
                                         rf"\[0, 40\); nothing was recorded"):
        Refresher(p).run(Net(), batches, 1)
    assert_state(p, before)


@pytest.mark.parametrize("ids, exc, msg", [
    (torch.tensor([1.0, 2.0]), TypeError, "data must yield 1-D integer sample ids, got a "
                                          "torch.float32 tensor of shape (2,) in batch 1"),
    ([3, 5], TypeError, "got a list in batch 1"),
    (torch.tensor([[3, 5]]), TypeError, "of shape (1, 2) in batch 1"),
])
def test_ids_that_are_not_integer_tensors_are_refused_and_record_nothing(ids, exc, msg):
    x, y = dataset()
    p = trained_pruner()
    before = state_of(p)
    batches = unselected_batches(p, x, y)
    batches[1] = (x[:2], y[:2], ids)
    with pytest.raises(exc) as info:
        Refresher(p).run(Net(), batches, 1)
    assert msg in str(info.value)
    assert_state(p, before)


def test_an_exception_in_a_later_forward_records_nothing():
    x, y = dataset()
    p = trained_pruner()
    before = state_of(p)
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return F.cross_entropy(out, target, reduction="none")

    with pytest.raises(RuntimeError, match="out of memory"):
        Refresher(p).run(Net(), (x, y), 1, loss_fn=loss_fn, batch_size=5)
    assert_state(p, before)
    assert Refresher(p).run(Net(), (x, y), 1, batch_size=5).scored == 20    # then a clean pass


def test_the_staged_pass_records_exactly_what_one_observe_per_batch_records():
    """Staging changes when, not what: a twin that observes each batch as it comes ends with
    bit-identical statistics (every sample is observed at most once per pass)."""
    x, y = dataset()
    model = Net()
    a, b = trained_pruner(), trained_pruner()
    Refresher(a).run(model, (x, y), 1, batch_size=5)
    ids = Refresher(b).targets(1)
    from gpuprune.shard import EpochShard
    view = EpochShard(Refresher(b).feed)
    view.set_epoch(1)
    for batch in view.owned().split(5):
        b.observe(batch.long(), eval_losses(model, x, y, batch.long()))
    assert sorted(view.owned().tolist()) == ids.tolist()
    for key, value in a.stats.state_dict().items():
        assert torch.equal(value, b.stats.state_dict()[key]), key


def test_nonfinite_losses_of_a_pass_are_counted_not_errors():
    x, y = dataset()
    p = trained_pruner()
    nan_first = lambda out, t: torch.where(torch.arange(len(t)) == 0, float("nan"),  # noqa: E731
                                           F.cross_entropy(out, t, reduction="none"))
    res = Refresher(p).run(Net(), (x, y), 1, loss_fn=nan_first, batch_size=5)
    assert res.scored == 20 and int(p.stats.nonfinite) == 4              # one per batch of 5


# ---------------------------------------------------------------- the feed: a Planner
def test_the_feed_is_a_planner_of_exactly_the_targets_in_the_pruners_order():
    p = trained_pruner(num_epochs=6)
    r = Refresher(p)
    assert isinstance(r.feed, Planner) and (r.feed.rank, r.feed.world_size) == (0, 1)
    targets = r.targets(1)
    assert r.feed.epoch_size(1) == targets.numel() == 20             # a read: no plan made
    plan = r.feed.plan(1)
    assert plan is r.feed.plan(1) and sorted(plan.indices.tolist()) == targets.tolist()
    assert plan.indices.dtype == torch.int32 and not plan.full
    # the order is the seed's shuffle of the set (gpuprune.rng.shuffle_seed), as for a plan
    from gpuprune.rng import shuffle_seed
    assert torch.equal(plan.indices, p.backend.shuffle(targets.int(), shuffle_seed(p.seed, 1)))
    with pytest.raises(ValueError, match="epoch must be <= 5"):
        r.feed.plan(6)
    # no second Pruner: no statistics of its own
    assert not any(isinstance(v, (gp.Pruner, gp.LossStats)) for v in vars(r.feed).values())
    s = r.sampler(shuffle=False)
    assert len(s) == 20 and list(s) == targets.tolist()


# ---------------------------------------------------------------- under a process group
def _eval_losses(epoch: int, ids: torch.Tensor) -> torch.Tensor:
    """The losses of refresh_model(epoch) in eval mode (no dropout), all ``ids`` in one batch."""
    x, y = refresh_data()
    model = refresh_model(epoch).eval()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x[ids]), y[ids], reduction="none")


def _counters(p: gp.Pruner) -> tuple:
    return p.rounds, p.stats.selected.clone(), p.history, p.current_plan


@pytest.mark.parametrize("feed", R_FEEDS)
def test_refresh_shards_the_unselected_over_ranks_and_merges_like_one_process(job, feed):
    """Refresher(which="unselected") under a process group, fed in-memory tensors or a DataLoader
    over refresher.sampler(): before each selection the ranks refresh disjoint shards whose union
    is the current plan's unselected samples, nothing counts as training, and after the merge every
    rank plans and ends bit-identically to one process that refreshed all of them itself."""
    from gpuprune.refresh import Refresher
    world, ranks = job
    recs = [res[("refresh", feed)] for res in ranks]
    for r, rec in enumerate(recs):
        assert "error" not in rec, f"rank {r}:\n{rec['error']}"
    x, y = refresh_data()
    ref = make_refresh_pruner(process_group=None)       # per-step updates, one whole pass
    refresher = Refresher(ref, which="unselected")
    bare = make_refresh_pruner(process_group=None)       # the same training without the pass
    plans_differ = False
    for e in range(R_EPOCHS):
        expected = (set() if e == 0 else
                    set(range(RN)) - set(recs[0]["plans"][e - 1].tolist()))
        n = len(expected)
        assert n == (0 if e == 0 else RN - gp.budget(R_KEEP, RN))
        got = [rec["refreshed"][e] for rec in recs]
        every = torch.cat(got)
        assert every.unique().numel() == every.numel(), (feed, e)    # disjoint, once each
        assert set(every.tolist()) == expected, (feed, e)            # = the unselected
        # the single-process pass over all of them, and its feed plan (what the ranks shard)
        c0 = _counters(ref)
        out = refresher.run(refresh_model(e), (x, y), e)
        assert (out.epoch, out.requested, out.scored) == (e, n, n)
        c1 = _counters(ref)
        assert c1[0] == c0[0] and torch.equal(c1[1], c0[1]) and c1[2] == c0[2] and c1[3] is c0[3]
        feed_plan = None if e == 0 else refresher.feed.plan(e).indices.long()
        assert feed_plan is None or (len(feed_plan) == n and set(feed_plan.tolist()) == expected)
        for r, rec in enumerate(recs):
            mine = len(range(r, n, world))               # an equal split, no padding
            assert rec["due"][e] is (e > 0)
            assert rec["results"][e] == (e, mine, mine), (feed, e, r)
            assert rec["untouched"][e] is True, (feed, e, r)
            if e == 0:
                continue
            # rank r refreshes positions r, r + W, ... of the feed's plan, in order: with a
            # DataLoader, its sampler's shard (padded by wrap-around) without the padded entry
            assert torch.equal(got[r], feed_plan[r::world]), (feed, e, r)
            if feed == "loader":
                served = feed_plan[(r + world * torch.arange(-(-n // world))) % n]
                assert torch.equal(rec["feed_shards"][e], served), (e, r)
            # each sample's logged loss is the eval-mode loss of that epoch's model
            assert torch.equal(rec["losses"][e], _eval_losses(e, got[r])), (feed, e, r)
        if feed == "loader" and e > 0:
            # the samplers' shards overlap in the wrap-around padding only
            shards = torch.cat([rec["feed_shards"][e] for rec in recs])
            assert set(shards.tolist()) == expected
            assert shards.numel() - n == -(-n // world) * world - n > 0
        plan = ref.plan(e)
        for rec in recs:
            assert torch.equal(rec["plans"][e], plan.indices), (feed, e)
        plans_differ |= not torch.equal(bare.plan(e).indices, plan.indices)
        stream = torch.cat([rec["shards"][e] for rec in recs])
        assert stream.unique().numel() == stream.numel()
        observe_all(ref, stream, e)
        observe_all(bare, stream, e)
    want = ref.stats.state_dict()
    for rec in recs:
        for key in STATE_KEYS:
            assert torch.equal(rec["state"][key], want[key]), (feed, key)
        assert rec["rounds"] == ref.rounds == R_EPOCHS and rec["history"] == ref.history
    # the passes mattered: without them the statistics and some selection differ
    assert not torch.equal(bare.stats.mean, want["mean"]) and plans_differ
