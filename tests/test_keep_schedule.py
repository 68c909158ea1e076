"""Keep schedules: ``Pruner(keep=...)`` as a float, ``(shape, start, end)`` or a callable, and
every epoch's size and step count following from the Schedule (hand-computed below)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

import gpuprune as gp
from gpuprune.schedule import keep_fractions

from conftest import feed

N, BS = 103, 8
#: 6 epochs: epoch 0 warm-up, epochs 1-4 pruned, epoch 5 final full
RUN = dict(num_epochs=6, warmup_epochs=1, final_full_epochs=1)
#: ("linear", 0.8, 0.2) over the 4 pruned epochs: 0.8, 0.6, 0.4, 0.2 of 103 = 82.4, 61.8, 41.2,
#: 20.6 -> rounded half up
LINEAR_SIZES = [103, 82, 62, 41, 21, 103]
#: (world_size, drop_last) -> steps per epoch by hand, batch 8: ceil(ceil(n / W) / 8) or
#: floor(floor(n / W) / 8)
HAND_STEPS = {
    (1, False): [13, 11, 8, 6, 3, 13],     # 103, 82, 62, 41, 21 samples
    (1, True): [12, 10, 7, 5, 2, 12],
    (2, False): [7, 6, 4, 3, 2, 7],        # shards of 52, 41, 31, 21, 11
    (2, True): [6, 5, 3, 2, 1, 6],         # shards of 51, 41, 31, 20, 10
}


@pytest.mark.parametrize("policy", ["uniform", "epsilon_greedy", "ucb"])
@pytest.mark.parametrize("world,drop", sorted(HAND_STEPS))
def test_linear_schedule_sizes_and_steps_hand_computed(policy, world, drop):
    p = gp.Pruner(N, keep=("linear", 0.8, 0.2), policy=policy, seed=0, **RUN)
    assert p.schedule.budgets == tuple(LINEAR_SIZES)
    assert p.k == 82                                   # the first pruned epoch's budget
    assert [p.epoch_size(e) for e in range(6)] == LINEAR_SIZES
    assert p.total_steps(BS, world_size=world, drop_last=drop) == sum(HAND_STEPS[world, drop])
    samplers = [gp.PrunedSampler(p, num_replicas=world, rank=r, drop_last=drop)
                for r in range(world)]
    for epoch in range(6):
        for s in samplers:
            s.set_epoch(epoch)
        loader = DataLoader(range(N), batch_size=BS, sampler=samplers[0], drop_last=drop)
        assert len(loader) == sum(1 for _ in loader) == HAND_STEPS[world, drop][epoch]
        plan = p.plan(epoch)
        assert len(plan) == LINEAR_SIZES[epoch] == plan.indices.unique().numel()
        feed(p, plan)


def test_cosine_and_callable_schedules_and_the_selection_interval():
    # cosine 0.8 -> 0.2 over 4 pruned epochs: 0.2 + 0.6 * (1 + cos(pi t)) / 2 at t = 0, 1/3, 2/3, 1
    # = 0.8, 0.65, 0.35, 0.2 -> 82.4, 66.95, 36.05, 20.6
    p = gp.Pruner(N, keep=("cosine", 0.8, 0.2), policy="ucb", seed=0, **RUN)
    assert [p.epoch_size(e) for e in range(6)] == [103, 82, 67, 36, 21, 103]
    assert p.total_steps(BS) == 13 + 11 + 9 + 5 + 3 + 13
    # a callable, every 2 epochs a selection: epoch 2 reuses epoch 1's (0.6 -> 62), epoch 4
    # reuses epoch 3's (0.4 -> 41); the callable's values in reusing and full epochs are unused
    calls = []

    def keep(epoch):
        calls.append(epoch)
        return {1: 0.6, 2: 0.2, 3: 0.4, 4: 0.9}.get(epoch, 1.0)

    p = gp.Pruner(N, keep=keep, policy="epsilon_greedy", selection_interval=2, seed=0, **RUN)
    assert calls == list(range(6))                     # checked over every epoch at construction
    assert [p.epoch_size(e) for e in range(6)] == [103, 62, 62, 41, 41, 103]
    assert p.total_steps(BS) == 13 + 8 + 8 + 6 + 6 + 13
    sets = []
    for e in range(6):
        plan = p.plan(e)
        sets.append(set(plan.indices.tolist()))
        feed(p, plan)
    assert sets[1] == sets[2] and sets[3] == sets[4] and len(sets[3]) == 41


def test_static_full_and_infobatch_under_a_keep_schedule():
    # static selects once: a constant schedule is fine, a changing one is refused
    p = gp.Pruner(N, keep=("linear", 0.4, 0.4), policy="static", seed=0, **RUN)
    assert [p.epoch_size(e) for e in range(6)] == [103, 41, 41, 41, 41, 103]
    assert p.total_steps(BS) == 13 + 4 * 6 + 13
    with pytest.raises(ValueError, match="selects one subset for the whole run"):
        gp.Pruner(N, keep=("linear", 0.8, 0.2), policy="static", **RUN)
    # InfoBatch's pruned sizes follow the losses: refused, and the message says what to do
    with pytest.raises(ValueError, match=r"loss-dependent number of samples \(InfoBatch"):
        gp.Pruner(N, keep=("linear", 0.8, 0.2), policy="infobatch", num_epochs=6)
    # the full-data baseline trains everything whatever keep says
    p = gp.Pruner(N, keep=("linear", 0.8, 0.2), policy="full", num_epochs=6)
    assert p.total_steps(BS) == 6 * 13


def test_a_constant_schedule_plans_exactly_what_a_float_keep_plans():
    runs = []
    for keep in (0.4, ("linear", 0.4, 0.4), ("cosine", 0.4, 0.4), lambda e: 0.4):
        p = gp.Pruner(N, keep=keep, policy="ucb", seed=3, **RUN)
        plans = []
        for e in range(6):
            plan = p.plan(e)
            plans.append(plan.indices.clone())
            feed(p, plan)
        runs.append(plans)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
    # a float keep's configuration is 0.2's: no budgets in it
    assert "budgets" not in gp.Pruner(N, keep=0.4, policy="ucb", **RUN).config()["schedule"]


def test_keep_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="needs num_epochs"):
        gp.Pruner(N, keep=("linear", 0.8, 0.2))
    with pytest.raises(ValueError, match=r"keep\[0\] \(the schedule's shape\) must be one of"):
        gp.Pruner(N, keep=("step", 0.8, 0.2), num_epochs=4)
    with pytest.raises(ValueError, match=r"keep\[2\] \(end\) must be"):
        gp.Pruner(N, keep=("linear", 0.8, 0.0), num_epochs=4)
    with pytest.raises(ValueError, match=r"\(shape, start, end\)"):
        gp.Pruner(N, keep=("linear", 0.8), num_epochs=4)
    with pytest.raises(ValueError, match=r"keep\(3\) must be"):
        gp.Pruner(N, keep=lambda e: 0.5 if e < 3 else 1.5, num_epochs=4)
    with pytest.raises(TypeError, match=r"keep\(0\) must be a real number"):
        gp.Pruner(N, keep=lambda e: "half", num_epochs=4)
    with pytest.raises(ValueError, match=r"keep\(0\) raised ZeroDivisionError"):
        gp.Pruner(N, keep=lambda e: 1 / 0, num_epochs=4)
    with pytest.raises(ValueError, match="needs num_epochs"):
        keep_fractions(("linear", 0.5, 0.5), gp.Schedule())


def test_a_checkpoint_carries_the_schedule_and_resumes_bit_exactly():
    def run(pruner, epochs):
        out = []
        for e in epochs:
            plan = pruner.plan(e)
            out.append(plan.indices.clone())
            feed(pruner, plan)
        return out

    make = lambda keep=("linear", 0.8, 0.2): gp.Pruner(N, keep=keep, policy="ucb", seed=1, **RUN)
    whole = run(make(), range(6))
    first = make()
    run(first, range(3))
    state = first.state_dict()
    assert state["config"]["keep"] == ["linear", 0.8, 0.2]
    assert state["config"]["schedule"]["budgets"] == LINEAR_SIZES
    second = make()
    second.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(run(second, range(3, 6)), whole[3:]))
    with pytest.raises(ValueError, match="checkpoint was made with keep="):
        make(("linear", 0.8, 0.3)).load_state_dict(state)
    third = make()                       # extend=True to the same length: a plain load
    third.load_state_dict(state, extend=True)
    assert all(torch.equal(a, b) for a, b in zip(run(third, range(3, 6)), whole[3:]))


def test_the_dali_iterator_length_follows_the_schedule():
    pytest.importorskip("nvidia.dali")
    import numpy as np

    from gpuprune.dali import ArraySource, build_iterator
    x, y = np.zeros((N, 2, 2, 1), np.uint8), np.arange(N, dtype=np.int64)
    p = gp.Pruner(N, keep=("linear", 0.8, 0.2), policy="uniform", seed=0, **RUN)
    it = build_iterator(p, ArraySource(x, y), batch_size=BS)
    assert it.total_steps() == p.total_steps(BS) == sum(HAND_STEPS[1, False])
