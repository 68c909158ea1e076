"""gpuprune.schedule: the kind of every epoch (warm-up, final full epochs, selection interval) and
the one step-count formula the sampler, the Pruner and the DALI iterator agree on."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader

import gpuprune as gp

from conftest import feed


def test_warmup_and_final_full_epochs_and_selection_interval():
    p = gp.Pruner(200, keep=0.25, policy="uniform", num_epochs=10, warmup_epochs=2,
                  final_full_epochs=3, selection_interval=2, seed=0)
    sizes, sets = [], []
    for epoch in range(10):
        plan = p.plan(epoch)
        sizes.append(len(plan))
        sets.append(frozenset(plan.indices.tolist()))
        feed(p, plan)
    assert sizes == [200, 200, 50, 50, 50, 50, 50, 200, 200, 200]
    assert sets[2] == sets[3] and sets[4] == sets[5]     # reused between selections
    assert sets[3] != sets[4]
    assert p.rounds == 5
    assert [r["reselected"] for r in p.history] == [False, False, True, False, True, False, True,
                                                    False, False, False]
    stats = p.selection_stats()
    assert stats["rounds"] == 5
    assert stats["always"] + stats["never"] + stats["sometimes"] == pytest.approx(1.0)
    assert float(stats["frequency"].sum()) == pytest.approx(50 * 5 / 5)
    with pytest.raises(ValueError, match=r"epoch must be <= 9 \(epochs count from 0; the schedule "
                                         r"has num_epochs=10\), got epoch=10"):
        p.plan(10)


def test_schedule_steps_match_what_the_sampler_yields():
    s = gp.Schedule(num_epochs=6, warmup_epochs=1, final_full_epochs=1)
    for world, drop in ((1, False), (2, False), (3, True)):
        p = gp.Pruner(103, keep=0.4, policy="uniform", num_epochs=6, warmup_epochs=1,
                      final_full_epochs=1, seed=0)
        assert p.schedule.config() == s.config()
        samplers = [gp.PrunedSampler(p, num_replicas=world, rank=r, drop_last=drop)
                    for r in range(world)]
        steps = 0
        for epoch in range(6):
            for smp in samplers:
                smp.set_epoch(epoch)
            loader = DataLoader(range(103), batch_size=8, sampler=samplers[0], drop_last=drop)
            got = sum(1 for _ in loader)
            assert got == s.steps(epoch, 103, p.k, 8, world_size=world, drop_last=drop)
            steps += got
        assert steps == s.total_steps(103, p.k, 8, world_size=world, drop_last=drop)
    # 6 epochs: 2 full (103 samples -> 13 batches), 4 pruned (41 -> 6 batches)
    assert s.total_steps(103, 41, 8) == 2 * 13 + 4 * 6
    with pytest.raises(ValueError, match="needs a schedule with num_epochs"):
        gp.Schedule().total_steps(10, 5, 2)
    with pytest.raises(ValueError, match="final_full_epochs=2 needs num_epochs"):
        gp.Schedule(final_full_epochs=2)


def test_total_steps_is_one_answer_for_the_pruner_and_the_dali_iterator():
    """Pruner.total_steps and PrunedDALIIterator.total_steps give the same count for every shard
    count and drop policy, the Schedule's formula; for InfoBatch both raise unless upper_bound=True,
    and then both give the bound that counts every pruned epoch full."""
    pytest.importorskip("nvidia.dali")
    import numpy as np

    from gpuprune.dali import ArraySource, LastBatchPolicy, build_iterator
    n, bs = 103, 8
    x, y = np.zeros((n, 2, 2, 1), np.uint8), np.arange(n, dtype=np.int64)
    hand = {("uniform", 1, False): 13 + 5 * 6,        # 1 warm-up epoch of 103, 5 pruned of k=41
            ("infobatch", 1, False): 6 * 13}          # the bound: every epoch counted with 103
    for policy in ("uniform", "infobatch"):
        for world, drop in ((1, False), (2, False), (3, True)):
            p = gp.Pruner(n, keep=0.4, policy=policy, num_epochs=6, warmup_epochs=1, seed=0)
            it = build_iterator(p, ArraySource(x, y), batch_size=bs, shard_id=world - 1,
                                num_shards=world,
                                last_batch_policy=LastBatchPolicy.DROP if drop else
                                LastBatchPolicy.PARTIAL)
            want = p.schedule.total_steps(n, p.k, bs, world_size=world, drop_last=drop,
                                          upper_bound=True)
            assert want == hand.get((policy, world, drop), want)
            bound = p.total_steps(bs, world_size=world, drop_last=drop, upper_bound=True)
            assert bound == it.total_steps(upper_bound=True) == want, (policy, world, drop)
            if p.schedule.exact_size:
                assert p.total_steps(bs, world_size=world, drop_last=drop) == it.total_steps()
                continue
            for call in (lambda: p.total_steps(bs, world_size=world, drop_last=drop),
                         it.total_steps):
                with pytest.raises(ValueError, match="not known in advance; pass upper_bound=True"):
                    call()
    # world_size defaults to the Pruner's (1 without a process group)
    p = gp.Pruner(n, keep=0.4, policy="uniform", num_epochs=6, warmup_epochs=1)
    assert p.total_steps(bs) == p.total_steps(bs, world_size=1) == 43
    assert p.total_steps(bs, world_size=2) == 7 + 5 * 3


def test_a_one_based_loop_is_told_that_epochs_count_from_0():
    """``for epoch in range(1, num_epochs + 1)`` (pytorch/examples' habit) fails at its last epoch;
    the message says why, as issue 19 asks, wherever an epoch is checked."""
    p = gp.Pruner(20, keep=0.5, policy="uniform", num_epochs=3)
    want = "epoch must be <= 2 (epochs count from 0; the schedule has num_epochs=3), got epoch=3"
    for call in (p.plan, p.check_epoch, p.epoch_size, p.is_full_epoch,
                 gp.PrunedSampler(p).set_epoch, gp.Schedule(3).is_full):
        with pytest.raises(ValueError) as info:
            call(3)
        assert str(info.value) == want
    with pytest.raises(ValueError, match=r"epoch must be >= 0, got epoch=-1"):
        p.plan(-1)


def test_framework_step_counts_hand_computed():
    """What the framework glue asks (issue 19): a loader that drops its last batch over padded
    shards, gradient accumulation (a last, incomplete group steps), fewer epochs than the run.
    N = 1001, k = 500, 2 ranks, batches of 167: epoch 0 (warm-up) shares 501 per rank (500 cut),
    pruned epochs 250."""
    s = gp.Schedule(num_epochs=3, warmup_epochs=1)
    count = lambda **kw: s.total_steps(1001, 500, 167, world_size=2, **kw)   # noqa: E731
    assert count() == 3 + 2 + 2                                  # ceil(501 / 167), ceil(250 / 167)
    assert count(drop_last_batch=True) == 3 + 1 + 1              # 501 // 167, 250 // 167
    assert count(drop_last=True) == 2 + 1 + 1                    # 500 // 167
    assert count(drop_last=True, drop_last_batch=False) == 3 + 2 + 2
    assert count(accumulate=2) == 2 + 1 + 1                      # ceil(3 / 2), ceil(2 / 2)
    assert count(epochs=2) == 3 + 2 and count(epochs=0) == 0
    assert s.steps(0, 1001, 500, 167, world_size=2, accumulate=2) == 2
    with pytest.raises(ValueError, match=r"accumulate must be >= 1, got accumulate=0"):
        count(accumulate=0)
    with pytest.raises(ValueError, match=r"epochs must be <= 3, got epochs=4"):
        count(epochs=4)
    with pytest.raises(TypeError, match=r"drop_last_batch must be a bool"):
        count(drop_last_batch="yes")
