"""Multi-process pruning over real gloo process groups (2 and 4 ranks on localhost).

The ranks run tests/dist_jobs.py's job (once per group size and session, through conftest.py's
``launched``/``job`` fixtures); the tests below compare the ranks with each other and with
single-process references computed in the test process. The re-score pass under a process group
is tested in tests/test_refresh.py over the same job.
"""

from __future__ import annotations

import pytest
import torch

import gpuprune as gp
from gpuprune import distributed as gdist

from dist_jobs import (CKPT_EPOCH, EPOCHS, KEEP, N, POLICY_NAMES, SHORT_TIMEOUT, STATE_KEYS,
                       extreme_batch, loss_of, make_pruner, observe_all)


# ---------------------------------------------------------------- tests over the jobs
def _configs():
    return [(p, d) for p in POLICY_NAMES for d in (False, True)]


def test_world_api(job):
    world, ranks = job
    for r, res in enumerate(ranks):
        assert res["rank_and_world"] == (r, world)
        assert res["rank_and_world_none"] == (0, 1)
        assert res["auto_is_world"] is True
        assert res["local_world"] == (0, 1)
        assert "not synchronised" in res["local_sampler"] and str(world) in res["local_sampler"]
        assert res["explicit_sampler"] == (world, r)
        assert f"num_replicas={world + 1}" in res["disagreeing_sampler"]
        assert f"where num_replicas={world}" in res["disagreeing_sampler"]


def test_plans_and_states_identical_on_all_ranks(job):
    world, ranks = job
    for cfg in _configs():
        recs = [res[cfg] for res in ranks]
        for e in range(EPOCHS):
            for rec in recs[1:]:
                assert torch.equal(rec["plans"][e], recs[0]["plans"][e]), (cfg, e)
                w0, w = recs[0]["weights"][e], rec["weights"][e]
                assert (w is None) == (w0 is None) and (w is None or torch.equal(w, w0)), (cfg, e)
        for rec in recs[1:]:
            for key in STATE_KEYS:
                assert torch.equal(rec["state"][key], recs[0]["state"][key]), (cfg, key)
        # each epoch's observations are merged exactly once (by the next plan or a synchronize())
        assert recs[0]["merges"] == EPOCHS
    # the merged statistics did steer the plans: InfoBatch's kept count moves with them
    info = ranks[0][("infobatch", False)]["plans"]
    assert len({p.numel() for p in info[1:]}) > 1


def test_shards_are_equal_sized_disjoint_and_cover_the_plan(job):
    world, ranks = job
    for policy, drop_last in _configs():
        for e in range(EPOCHS):
            plan = ranks[0][(policy, drop_last)]["plans"][e]
            shards = [res[(policy, drop_last)]["shards"][e] for res in ranks]
            n = plan.numel()
            per = n // world if drop_last else -(-n // world)
            assert all(s.numel() == per for s in shards)
            # position p of the padded (or cut) plan goes to rank p % world
            woven = torch.stack(shards, dim=1).reshape(-1)
            expected = plan.repeat(2)[:per * world] if not drop_last else plan[:per * world]
            assert torch.equal(woven, expected)
            counts = torch.bincount(woven.long(), minlength=N)
            if drop_last:
                assert int(counts.max()) == 1 and per * world > n - world
            else:
                assert set(woven.tolist()) == set(plan.tolist()) and int(counts.max()) <= 2
                assert int((counts == 2).sum()) == per * world - n


def test_merged_statistics_equal_one_observe_of_the_epoch_in_rank_order(job):
    """One process observing each epoch's shards (rank 0's, then rank 1's, ...) in one call at the
    epoch's end plans and ends bit-identically: the merge is exactly that call."""
    world, ranks = job
    for policy in POLICY_NAMES:
        recs = [res[(policy, False)] for res in ranks]
        ref = make_pruner(policy, process_group=None)
        for e in range(EPOCHS):
            plan = ref.plan(e)
            assert torch.equal(plan.indices, recs[0]["plans"][e]), (policy, e)
            stream = torch.cat([rec["shards"][e] for rec in recs])
            ref.observe(stream, loss_of(stream, e))
        ref_state = ref.stats.state_dict()
        for key in STATE_KEYS:
            assert torch.equal(ref_state[key], recs[0]["state"][key]), (policy, key)
    assert int(recs[0]["state"]["nonfinite"]) > 0


def test_merged_statistics_equal_per_step_updates_when_each_sample_is_seen_once(job):
    world, ranks = job
    for policy in POLICY_NAMES:
        recs = [res[(policy, True)] for res in ranks]
        ref = make_pruner(policy, process_group=None)      # the normal per-step mode
        for e in range(EPOCHS):
            ref.plan(e)
            stream = torch.cat([rec["shards"][e] for rec in recs])
            assert stream.unique().numel() == stream.numel()
            for i in range(0, stream.numel(), 64):
                b = stream[i:i + 64]
                ref.observe(b, loss_of(b, e))
        got, want = recs[0]["state"], ref.stats.state_dict()
        torch.testing.assert_close(got["mean"], want["mean"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["var"], want["var"], rtol=1e-5, atol=1e-7)
        for key in ("last_epoch", "selected", "nonfinite"):
            assert torch.equal(got[key], want[key]), (policy, key)


def test_resume_from_rank0_checkpoint_continues_identically(job):
    world, ranks = job
    for policy in POLICY_NAMES:
        for res in ranks:
            rec = res[(policy, False)]
            assert "not merged" in rec["unmerged_save"] and "synchronize" in rec["unmerged_save"]
            resumed = rec["resumed"]
            for i, e in enumerate(range(CKPT_EPOCH + 1, EPOCHS)):
                assert torch.equal(resumed["plans"][i], rec["plans"][e]), (policy, e)
                assert torch.equal(resumed["shards"][i], rec["shards"][e]), (policy, e)
            for key in STATE_KEYS:
                assert torch.equal(resumed["state"][key], rec["state"][key]), (policy, key)


def test_ranks_with_different_settings_all_raise_plan_mismatch_naming_it(job):
    world, ranks = job
    for res in ranks:
        for name in ("seed", "num_samples", "decay", "policy.c"):
            msg, seconds = res[("mismatch", name)]
            assert "configured differently" in msg and f"{name}: rank 0: " in msg, (name, msg)
            assert seconds < 30, name                  # no wait for a timeout
        msg = res["one_sided_sync"]
        assert "different gpuprune collectives" in msg, msg
        assert "rank 0: synchronize of epoch 0" in msg and "rank 1: plan of epoch 1" in msg


def test_len_is_a_pure_read_on_one_rank(job):
    world, ranks = job
    assert ranks[0]["len_next"] == gp.budget(KEEP, N) // world + (gp.budget(KEEP, N) % world > 0)
    for res in ranks:
        assert res["len_barrier"] == "passed" and res["len_changed_nothing"] is True


def test_observe_under_a_process_group_follows_the_single_process_input_rules(job):
    """Float64 losses of +-1e300 saturate at +-3.4e38 as in one process (they were cast to inf and
    dropped), and a batch with an int64 id outside [0, N) is refused as in one process: by
    observe() on the CPU, and when it reaches the log (a GPU batch) by the next merge, on every
    rank, without recording anything (2**32 + 5 was narrowed to sample 5)."""
    world, ranks = job
    f32_max = float(torch.finfo(torch.float32).max)
    ref = make_pruner("uniform", process_group=None)
    ref.plan(0)
    for r in range(world):
        ref.observe(*extreme_batch(r))
    with pytest.raises(ValueError) as single:
        ref.observe(torch.tensor([3, 2**32 + 5]), torch.tensor([1.0, 2.0], dtype=torch.float64))
    want = ref.stats.state_dict()
    assert want["mean"][:4].tolist() == [f32_max, -f32_max, 2.5, 0.0]
    assert int(want["nonfinite"]) == world and want["last_epoch"][:4].tolist() == [0, 0, 0, -1]
    for res in ranks:
        assert res["bad_id_observe"] == str(single.value)
        assert "indices must lie in [0, 997), got an index 4294967301" in res["bad_id_observe"]
        assert res["bad_id_not_logged"] is True
        for key in STATE_KEYS:
            assert torch.equal(res["extreme_state"][key], want[key]), key
        assert res["bad_id_logged"] == (
            f"observe() received indices outside [0, 997) in {world} batch(es) (per rank: "
            f"{dict.fromkeys(range(world), 1)}); those batches were not recorded")
        for key in STATE_KEYS:
            assert torch.equal(res["extreme_state_after"][key], want[key]), key


def test_a_dead_or_stalled_rank_makes_the_others_fail_within_the_timeout(launched):
    world = 4
    ranks = launched(world)
    for res in ranks[:-1]:
        for name in ("stall", "dead"):
            msg, seconds = res[name]
            assert msg.startswith("gpuprune: the plan exchange of epoch 1 failed"), msg
            assert f"of {world}" in msg and "init_process_group(timeout=" in msg
            assert seconds < SHORT_TIMEOUT + 20, (name, seconds)
        assert res["stall"][1] >= SHORT_TIMEOUT * 0.5     # it did wait for the stalled rank


# ---------------------------------------------------------------- single-process tests
def test_process_group_argument_is_checked_without_an_initialised_group():
    with pytest.raises(ValueError, match="process_group"):
        gp.Pruner(10, process_group="world")
    with pytest.raises(TypeError, match="process_group"):
        gp.Pruner(10, process_group=3)
    p = gp.Pruner(10)                                   # "auto" without torch.distributed
    assert p.process_group is None and p.world_size == 1 and p.rank == 0
    assert gdist.rank_and_world() == (0, 1) and gdist.rank_and_world(None) == (0, 1)


def plan_fingerprint(plan: gp.Plan) -> torch.Tensor:
    return plan.fingerprint()


def test_plan_fingerprint_sees_order_ids_weights_and_epoch():
    from gpuprune.plan import pack_mask
    idx = torch.tensor([4, 1, 7, 3], dtype=torch.int32)
    bits = pack_mask(torch.arange(10) % 2 == 1)          # ids 1, 3, 7 rescaled
    base = plan_fingerprint(gp.Plan(3, idx, False, 10, 2.0, bits))
    assert base.dtype == torch.int64 and base[1:].tolist() == [4, 3, 0]
    assert torch.equal(base, plan_fingerprint(gp.Plan(3, idx.clone(), False, 10, 2.0,
                                                            bits.clone())))
    variants = [gp.Plan(3, idx[[1, 0, 2, 3]], False, 10, 2.0, bits),      # order
                gp.Plan(3, torch.tensor([4, 1, 7, 5]), False, 10, 2.0, bits),  # one id
                gp.Plan(3, idx, False, 10, 3.0, bits),                     # weights
                gp.Plan(3, idx, False, 10, 2.0, pack_mask(torch.arange(10) < 5)),
                gp.Plan(3, idx, False, 10),
                gp.Plan(4, idx, False, 10, 2.0, bits)]                    # epoch
    for v in variants:
        assert not torch.equal(plan_fingerprint(v), base)


def test_synchronize_on_single_process_pruners_does_nothing():
    p = make_pruner("ucb", process_group=None)
    plan = p.plan(0)
    observe_all(p, plan.indices, 0)
    before = p.state_dict()
    p.synchronize()                                      # per-step updates: nothing to merge
    assert p.state_dict()["checksum"] == before["checksum"]
