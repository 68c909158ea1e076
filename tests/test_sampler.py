"""gpuprune.sampler: PrunedSampler (DistributedSampler's counterpart) and IndexedDataset in a real
DataLoader loop; len() that never plans; the resume position through the sampler."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import gpuprune as gp

from conftest import POLICY_NAMES, feed, make


def test_sampler_len_matches_plan_and_yields_it():
    p = make("ucb")
    s = gp.PrunedSampler(p)
    for epoch in range(3):
        s.set_epoch(epoch)
        plan = p.plan(epoch)
        assert len(s) == len(plan)
        assert list(s) == plan.indices.tolist()
        feed(p, plan)
    shards = [gp.PrunedSampler(p, num_replicas=2, rank=r) for r in range(2)]
    for sh in shards:
        sh.set_epoch(3)
    got = list(shards[0]) + list(shards[1])
    assert sorted(got) == sorted(p.plan(3).indices.tolist())


@pytest.mark.slow
def test_indexed_dataset_and_three_line_loop_on_digits():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    ds = TensorDataset(torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y))
    assert gp.IndexedDataset(ds)[5][2] == 5
    assert gp.IndexedDataset([10, 20])[1] == (20, 1)
    with pytest.raises(TypeError, match="map-style dataset"):
        gp.IndexedDataset(5)
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.1, 0.1, generator=g)
    # lr 0.1: at 0.5 the final accuracy swung from 0.42 to 0.95 with the plan order alone
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = gp.Pruner(len(ds), keep=0.5, policy="ucb", seed=0)
    loader = DataLoader(gp.IndexedDataset(ds), batch_size=64, sampler=gp.PrunedSampler(pruner))
    seen = 0
    for epoch in range(6):
        loader.sampler.set_epoch(epoch)
        for xb, yb, idx in loader:
            loss = pruner.observe(idx, torch.nn.functional.cross_entropy(model(xb), yb,
                                                                         reduction="none"))
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(idx)
    assert seen == 6 * gp.budget(0.5, len(ds)) == 6 * 899
    acc = (model(ds.tensors[0]).argmax(1) == ds.tensors[1]).float().mean().item()
    assert acc > 0.8
    assert int(pruner.stats.seen.sum()) == len(ds)   # every sample visited (unseen = +inf)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_len_only_reads(policy):
    p = make(policy)
    s = gp.PrunedSampler(p)
    s.set_epoch(0)
    feed(p, p.plan(0))
    before = p.state_dict()
    s.epoch = 1                                  # a loop's bookkeeping before set_epoch(1)
    if policy == "infobatch":
        with pytest.raises(RuntimeError, match="known once it is planned"):
            len(s)
    else:
        assert len(s) == (500 if policy == "full" else 150)
    assert p.state_dict()["checksum"] == before["checksum"]
    assert p.current_plan.epoch == 0 and len(p.history) == 1
    s.set_epoch(1)
    assert len(s) == len(p.plan(1)) and p.rounds == (0 if policy == "full" else 2)


# ---------------------------------------------------------------- sampler state semantics
def fed_pruner(n: int = 50, policy: str = "uniform") -> gp.Pruner:
    p = gp.Pruner(n, keep=0.6, policy=policy, seed=5)
    return p


def test_sampler_state_skips_trained_samples_until_the_epoch_changes():
    p = fed_pruner()
    s = gp.PrunedSampler(p)
    with pytest.warns(gp.CoverageWarning, match="the first epoch planned is epoch 1"):
        s.set_epoch(1)
    full = list(s)
    assert len(full) == 30
    state = s.state_dict(consumed=12)
    assert state == {"epoch": 1, "consumed": 12, "num_replicas": 1, "drop_last": False}

    t = gp.PrunedSampler(p)
    t.load_state_dict(state)
    assert t.epoch == 1 and len(t) == 18
    t.set_epoch(1)                                   # same epoch: the offset stays
    assert list(t) == full[12:]
    # a second checkpoint during the resumed pass counts from the start of that pass
    assert t.state_dict(consumed=5)["consumed"] == 17
    t.set_epoch(2)                                   # next epoch: from the start
    assert len(t) == 30 and list(t) == p.plan(2).indices.tolist()
    assert t.state_dict(consumed=0)["consumed"] == 0


def test_sampler_state_at_epoch_end_and_len_of_loader():
    p = fed_pruner()
    s = gp.PrunedSampler(p)
    s.set_epoch(0)
    n = len(s)
    t = gp.PrunedSampler(p)
    t.load_state_dict(s.state_dict(consumed=n))
    assert len(t) == 0 and list(t) == []
    loader = DataLoader(gp.IndexedDataset(list(range(50))), batch_size=4, sampler=t)
    assert len(loader) == 0
    t.load_state_dict(s.state_dict(consumed=8))
    assert len(loader) == 6                          # ceil(22 / 4)


def test_sharded_samplers_resume_from_one_ranks_state():
    p = fed_pruner(n=41)                             # 25 planned: shards of 13, padded by wrap-around
    ranks = [gp.PrunedSampler(p, num_replicas=2, rank=r) for r in range(2)]
    for s in ranks:
        s.set_epoch(0)
    before = [list(s) for s in ranks]
    state = ranks[0].state_dict(consumed=6)          # every rank trained 6 samples
    resumed = [gp.PrunedSampler(p, num_replicas=2, rank=r) for r in range(2)]
    for s in resumed:
        s.load_state_dict(state)
    assert [list(s) for s in resumed] == [b[6:] for b in before]
    single = gp.PrunedSampler(p)
    with pytest.raises(ValueError, match="num_replicas=2, drop_last=False cannot resume"):
        single.load_state_dict(state)
    single.load_state_dict(ranks[0].state_dict(consumed=0))   # epoch boundary: any world size
    assert list(single) == p.plan(0).indices.tolist()


def test_sampler_state_errors_leave_it_unchanged():
    p = fed_pruner()
    s = gp.PrunedSampler(p)
    s.set_epoch(0)
    list(s)
    with pytest.raises(ValueError, match="consumed=31 is more than the 30 samples"):
        s.state_dict(consumed=31)
    with pytest.raises(ValueError, match="consumed must be >= 0"):
        s.state_dict(consumed=-1)
    with pytest.raises(TypeError, match="consumed must be an int"):
        s.state_dict(consumed=2.0)
    s.set_epoch(3)                                   # set_epoch plans: the next epoch is known
    assert s.state_dict(consumed=1) == {"epoch": 3, "consumed": 1, "num_replicas": 1,
                                        "drop_last": False}
    t = gp.PrunedSampler(p)
    t.load_state_dict({"epoch": 0, "consumed": 4, "num_replicas": 1, "drop_last": False})
    for bad, exc in [({"epoch": 0}, ValueError), ([0, 4], TypeError),
                     ({"epoch": -1, "consumed": 0, "num_replicas": 1, "drop_last": False}, ValueError),
                     ({"epoch": 0, "consumed": 1.5, "num_replicas": 1, "drop_last": False}, TypeError)]:
        with pytest.raises(exc):
            t.load_state_dict(bad)
        assert (t.epoch, len(t)) == (0, 26)
    # a position beyond the share is refused when it is loaded, as the DALI iterator refuses it
    with pytest.raises(ValueError, match=r"state_dict\['consumed'\]=99 is more than the 30 samples "
                                         r"this rank's share of epoch 0 holds"):
        t.load_state_dict({"epoch": 0, "consumed": 99, "num_replicas": 1, "drop_last": False})
    assert (t.epoch, len(t)) == (0, 26)


# ---------------------------------------------------------------- the DistributedSampler counterpart
@pytest.mark.parametrize("n, world", [(10, 3), (12, 4), (2, 5), (7, 1)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_padding_and_drop_last_follow_distributed_sampler(n, world, drop_last):
    """Over a full plan in id order the shares are DistributedSampler's, padding (several wraps
    when n < W) and drop_last included: the documented "same rule"."""
    from torch.utils.data import DistributedSampler
    p = gp.Pruner(n, policy="full")
    for rank in range(world):
        ours = gp.PrunedSampler(p, world, rank, drop_last=drop_last, shuffle=False)
        ours.set_epoch(0)
        theirs = DistributedSampler(range(n), world, rank, shuffle=False, drop_last=drop_last)
        assert list(ours) == list(theirs) and len(ours) == len(theirs), rank
        assert (ours.num_samples, ours.total_size) == (theirs.num_samples, theirs.total_size)


def test_num_samples_is_the_whole_share_after_a_resume_and_refuses_an_unknown_size():
    """num_samples counts the whole padded share (12 of a 23-sample plan over 2 ranks), len() what
    a resumed pass still yields; before InfoBatch plans a pruned epoch neither is known."""
    p = gp.Pruner(46, keep=0.5, policy="uniform", seed=1, num_epochs=3)
    s = p.sampler(num_replicas=2, rank=1)
    assert (s.num_samples, s.total_size) == (12, 24)           # predicted: 23 planned, padded
    s.set_epoch(0)
    s.load_state_dict(s.state_dict(consumed=5))
    assert (s.num_samples, s.total_size, len(s)) == (12, 24, 7)
    ib = gp.Pruner(40, policy="infobatch", num_epochs=4, seed=0).sampler()
    ib.epoch = 1
    with pytest.raises(RuntimeError, match="known once it is planned"):
        ib.num_samples


def test_the_pruner_s_factory_and_the_arguments_of_the_counterpart():
    p = gp.Pruner(50, keep=0.4, policy="uniform", seed=3)
    s = p.sampler(num_replicas=2, rank=1, drop_last=True, shuffle=False)
    assert isinstance(s, gp.PrunedSampler) and s.pruner is p
    assert (s.num_replicas, s.rank, s.drop_last, s.shuffle, s.epoch) == (2, 1, True, False, 0)
    t = gp.PrunedSampler(p, 2, 1, True, False)                     # the positional order
    s.set_epoch(0)
    t.set_epoch(0)
    assert list(s) == list(t) == sorted(p.plan(0).indices.tolist())[1::2]


def test_assigning_epoch_moves_without_planning_and_set_epoch_plans():
    p = gp.Pruner(50, keep=0.4, policy="uniform", num_epochs=4, seed=3)
    s = gp.PrunedSampler(p)
    s.epoch = 2                                    # as DistributedSampler.epoch: a plain move
    assert p.current_plan is None and s.epoch == 2 and len(s) == 20
    with pytest.raises(ValueError, match=r"epoch must be <= 3 \(epochs count from 0"):
        s.epoch = 4
    with pytest.warns(gp.CoverageWarning, match="so epochs 0 to 1 are never trained"):
        s.set_epoch(2)
    assert p.current_plan.epoch == 2 and list(s) == p.plan(2).indices.tolist()
