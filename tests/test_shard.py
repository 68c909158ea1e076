"""EpochShard: one rank's view of the planned epochs (share, length without planning, owned part,
position), over a Pruner and over a planner that is not one."""

from __future__ import annotations

import pytest
import torch

import gpuprune as gp
from gpuprune.plan import shard_indices
from gpuprune.shard import EpochShard, Planner, Position
from gpuprune.sizes import owned_size


class ListPlanner:
    """A minimal Planner that is not a Pruner: epoch e plans ``plans[e]`` (ids in that order)."""

    def __init__(self, num_samples: int, plans: list[list[int]], *, sized: bool = True) -> None:
        self.num_samples, self.plans, self.sized = num_samples, plans, sized
        self.rank, self.world_size = 0, 1
        self.num_epochs, self.device = len(plans), torch.device("cpu")
        self.planned: list[int] = []

    def check_epoch(self, epoch, name="epoch"):
        if not 0 <= epoch < len(self.plans):
            raise ValueError(f"{name} must be <= {len(self.plans) - 1}, got {name}={epoch}")
        return epoch

    def epoch_size(self, epoch):
        return len(self.plans[epoch]) if self.sized or epoch in self.planned else None

    def plan(self, epoch):
        self.planned.append(epoch)
        ids = torch.tensor(self.plans[epoch], dtype=torch.int32)
        return gp.Plan(epoch, ids, False, self.num_samples)



def test_a_pruner_and_a_plain_object_are_planners_and_anything_else_is_refused():
    assert isinstance(gp.Pruner(10), Planner) and isinstance(ListPlanner(5, [[1]]), Planner)
    with pytest.raises(TypeError, match="pruner must be a gpuprune.Pruner or another Planner"):
        EpochShard(object())


def test_share_pads_by_wrap_around_or_cuts_and_every_rank_gets_the_same_count():
    planner = ListPlanner(20, [[9, 3, 7, 1, 5, 0, 2, 8, 4, 6]])        # 10 ids over 3 ranks
    padded = [EpochShard(planner, 3, r).set_epoch(0).indices.tolist() for r in range(3)]
    assert padded == [[9, 1, 2, 6], [3, 5, 8, 9], [7, 0, 4, 3]]    # ranks 1, 2 wrap around
    cut = [EpochShard(planner, 3, r, drop_last=True).set_epoch(0).indices.tolist() for r in range(3)]
    assert cut == [[9, 1, 2], [3, 5, 8], [7, 0, 4]]                 # id 6 is skipped this epoch
    # the owned part drops exactly the padding: over all ranks, each planned id once
    owned = [EpochShard(planner, 3, r) for r in range(3)]
    parts = [v.owned().tolist() for v in owned]
    assert parts == [[9, 1, 2, 6], [3, 5, 8], [7, 0, 4]]
    assert sorted(sum(parts, [])) == sorted(planner.plans[0])


def test_shuffle_false_serves_the_plan_in_increasing_id_order_then_shards():
    planner = ListPlanner(20, [[9, 3, 7, 1, 5, 0, 2, 8, 4, 6]])
    assert EpochShard(planner, shuffle=False).set_epoch(0).indices.tolist() == list(range(10))
    assert EpochShard(planner, 2, 1, shuffle=False).set_epoch(0).indices.tolist() == [1, 3, 5, 7, 9]
    p = gp.Pruner(12, keep=0.5, policy="full")
    full = gp.PrunedSampler(p, shuffle=False)
    full.set_epoch(0)
    assert list(full) == list(range(12))
    pruned = gp.Pruner(50, keep=0.3, policy="uniform", seed=2)
    s = gp.PrunedSampler(pruned, shuffle=False)
    s.set_epoch(0)
    assert list(s) == sorted(pruned.plan(0).indices.tolist())     # the same set, sorted


def test_lengths_never_plan_and_follow_the_prediction_then_the_plan():
    planner = ListPlanner(20, [[1, 2, 3, 4, 5], [6, 7, 8]])
    v = EpochShard(planner, 2, 0)
    assert (len(v), v.shard_size(1), v.num_batches(2), v.num_batches(2, True)) == (3, 2, 2, 1)
    assert planner.planned == []                                   # no read planned
    unsized = EpochShard(ListPlanner(20, [[1, 2, 3]], sized=False))
    assert unsized.shard_size(0) is None
    with pytest.raises(RuntimeError, match="known once it is planned"):
        len(unsized)
    unsized.set_epoch(0)
    assert len(unsized) == 3 and unsized.shard_size(0) == 3


def test_the_position_moves_saves_restores_and_counts_batches():
    planner = ListPlanner(40, [list(range(30)), list(range(10, 20))])
    v = EpochShard(planner)
    v.set_epoch(0)
    assert v.state_dict(7) == {"epoch": 0, "consumed": 7, "num_replicas": 1, "drop_last": False}
    w = EpochShard(planner)
    w.load_state_dict(v.state_dict(7))
    assert (w.epoch, w.start, len(w)) == (0, 7, 23) and planner.planned == [0]
    assert w.ids().tolist() == list(range(7, 30)) and w.host_ids().tolist() == list(range(7, 30))
    # batches of 10 from entry 7: [7, 17), [17, 27), [27, 30)
    assert (w.num_batches(10), w.end(10), w.num_batches(10, True), w.end(10, True)) == (3, 30, 2, 27)
    assert [w.consumed_after(k, 10) for k in range(4)] == [7, 17, 27, 30]
    assert [w.consumed_after(k, 10, True) for k in range(4)] == [7, 17, 27, 27]
    w.set_epoch(0)                                 # the restored epoch keeps its position
    assert w.start == 7
    w.set_epoch(1)                                 # another epoch starts at its first entry
    assert (w.epoch, w.start, len(w)) == (1, 0, 10)
    w.seek(0, 5)                                   # a pure move: no planning
    assert (w.epoch, w.start, planner.planned) == (0, 5, [0, 0, 0, 1])   # reads never planned


def test_position_checks_refuse_before_changing_anything():
    planner = ListPlanner(40, [list(range(30)), list(range(5))])
    v = EpochShard(planner, drop_last=False)
    v.load_state_dict(Position.make(0, 4, 1, False))
    for bad, exc, msg in [
        ([0, 4], TypeError, "state must be a dict from PrunedSampler.state_dict()"),
        ({"epoch": 0}, ValueError, "missing ['consumed', 'num_replicas', 'drop_last']"),
        (Position.make(3, 0, 1, False), ValueError, "state_dict['epoch'] must be <= 1"),
        (Position.make(2, 1, 1, False), ValueError, "state_dict['epoch'] must be <= 1"),
        (Position.make(1, 6, 1, False), ValueError,
         "state_dict['consumed']=6 is more than the 5 samples this rank's share of epoch 1 holds"),
        (Position.make(0, 3, 2, False), ValueError, "a mid-epoch state saved with num_replicas=2"),
    ]:
        with pytest.raises(exc) as info:
            v.load_state_dict(bad)
        assert msg in str(info.value)
        assert (v.epoch, v.start, len(v)) == (0, 4, 26)
    with pytest.raises(ValueError, match="more than the 5 samples"):
        v.seek(1, 6)
    with pytest.raises(ValueError, match="consumed=27 is more than the 26 samples this pass"):
        v.state_dict(27)
    assert (v.epoch, v.start) == (0, 4)
    v.load_state_dict(Position.make(1, 0, 3, True))    # an epoch boundary: any world size
    # (num_epochs, 0) is where a loader stands after the run's last epoch: nothing left, no plan
    v.load_state_dict(Position.make(2, 0, 1, False))
    assert (v.epoch, v.start, len(v), v.shard_size()) == (2, 0, 0, 0)
    assert planner.planned == []
    v.seek(1)
    v.seek(2)
    assert len(v) == 0


def test_an_overrun_position_of_an_epoch_of_unknown_size_is_refused_once_the_plan_is_known():
    """A loss-dependent epoch's size is unknown when the position is loaded: the check runs when
    its plan is taken (the position stays, so the user can load a correct one)."""
    planner = ListPlanner(40, [list(range(10))], sized=False)
    v = EpochShard(planner)
    v.load_state_dict(Position.make(0, 12, 1, False))
    with pytest.raises(ValueError, match="consumed'\\]=12 is more than the 10 samples"):
        v.set_epoch(0)
    assert (v.epoch, v.start) == (0, 12)
    with pytest.raises(ValueError, match="consumed'\\]=12 is more than the 10 samples"):
        len(v)                                    # now that a plan exists: the same check


def test_set_epoch_takes_a_plan_the_planner_replaced():
    """A Pruner restored from a checkpoint returns another plan for the same epoch: set_epoch
    takes it (plan() keeps the one taken, it never asks the planner again)."""
    a = gp.Pruner(30, keep=0.5, policy="uniform", seed=1)
    v = EpochShard(a)
    first = v.set_epoch(0).indices.tolist()
    a.load_state_dict(gp.Pruner(30, keep=0.5, policy="uniform", seed=1).state_dict())
    other = gp.Pruner(30, keep=0.5, policy="uniform", seed=1)
    other.plan(0)
    assert v.plan().indices.tolist() == first
    a.load_state_dict(other.state_dict())
    assert v.set_epoch(0).indices.tolist() == other.plan(0).indices.tolist() == first


def test_a_share_of_any_plan_is_pure():
    p = gp.Pruner(40, keep=0.5, policy="uniform", seed=3)
    v = EpochShard(p, 2, 1)
    v.set_epoch(0)
    other = gp.Pruner(40, keep=0.5, policy="uniform", seed=3)
    other.plan(0)
    ahead = other.plan(1)                    # epoch 1 planned elsewhere: p is still at epoch 0
    share = v.share(ahead)
    assert (v.epoch, p.current_plan.epoch) == (0, 0)
    assert share.indices.tolist() == ahead.indices[1::2].tolist()
    assert torch.equal(v.set_epoch(1).indices, share.indices)


def test_the_pruner_world_and_explicit_values_are_checked():
    p = gp.Pruner(10)
    for kwargs, exc, msg in [({"num_replicas": 0}, ValueError, "num_replicas must be >= 1"),
                             ({"num_replicas": 2, "rank": 2}, ValueError, "rank must be <= 1"),
                             ({"drop_last": "no"}, TypeError, "drop_last must be a bool"),
                             ({"shuffle": 1}, TypeError, "shuffle must be a bool")]:
        with pytest.raises(exc, match=msg):
            EpochShard(p, **kwargs)
    named = EpochShard(p, 4, 3, names=("num_shards", "shard_id"), owner="X")
    assert (named.rank, named.num_replicas) == (3, 4)
    with pytest.raises(ValueError, match="shard_id must be <= 1, got shard_id=2"):
        EpochShard(p, 2, 2, names=("num_shards", "shard_id"))


# ---------------------------------------------------------------- (from test_core.py)
def test_shard_indices_equal_sizes_and_cover():
    idx = torch.arange(10)
    shards = [shard_indices(idx, r, 3) for r in range(3)]
    assert [s.numel() for s in shards] == [4, 4, 4]
    allv = torch.cat(shards).tolist()
    assert set(allv) == set(range(10)) and len(allv) - 10 == 2   # 2 padded duplicates
    dropped = [shard_indices(idx, r, 3, drop_last=True) for r in range(3)]
    assert [s.numel() for s in dropped] == [3, 3, 3]
    assert sorted(torch.cat(dropped).tolist()) == list(range(9))
    assert shard_indices(torch.arange(0), 0, 2).numel() == 0
    with pytest.raises(ValueError, match="rank must be <= 2"):
        shard_indices(idx, 3, 3)
    # owned_size: the leading entries of a shard that are not wrap-around padding (10 over 3 ranks:
    # rank 0 owns positions 0, 3, 6, 9; ranks 1 and 2 own 3 and pad one)
    assert [owned_size(10, r, 3) for r in range(3)] == [4, 3, 3]
    assert [shards[r][owned_size(10, r, 3):].tolist() for r in range(3)] == [[], [0], [1]]
    assert torch.cat([shards[r][:owned_size(10, r, 3)] for r in range(3)]).sort().values.tolist() \
        == list(range(10))
