"""Multi-process pruning over real gloo process groups (2 and 4 ranks on localhost).

Starting processes is the slow part on a small machine, so each group size is one job: W copies of
this file run as workers (``python tests/test_distributed.py --worker RANK WORLD STORE OUT``), meet
through a ``FileStore``, run every check, and save what they saw. The tests below compare the ranks
with each other and with single-process references computed in the test process.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gpuprune as gp
from gpuprune import distributed as gdist
from gpuprune.keys import hash32

REPO = Path(__file__).resolve().parents[1]
N = 997                 # prime: k = 299 is not a multiple of 2 or 4, so padding happens
KEEP = 0.3
EPOCHS = 5
CKPT_EPOCH = 2          # rank 0 checkpoints at the end of this epoch
BATCH = 16
SHORT_TIMEOUT = 3.0     # seconds, process groups of the dead/stalled-rank checks
POLICY_NAMES = ["uniform", "epsilon_greedy", "ucb", "infobatch", "static", "full"]
STATE_KEYS = ("mean", "var", "last_epoch", "selected", "nonfinite", "invalid_batches")


# ---------------------------------------------------------------- shared by workers and tests
def loss_of(idx: torch.Tensor, epoch: int) -> torch.Tensor:
    """A deterministic loss per (sample, epoch); some are NaN in odd epochs."""
    u = hash32(idx, 1000 + epoch).double() / 2.0**32
    x = (u * (1 + (idx + epoch) % 7)).float()          # rotating scale: the UCB subset moves
    nan = (idx % 89 == 3) & (epoch % 2 == 1)
    return torch.where(nan, torch.full_like(x, float("nan")), x)


def make_pruner(policy: str, **kw) -> gp.Pruner:
    extra = {}
    if policy == "static":
        policy = gp.Static((torch.arange(N) * 7919 % 101).float())
    if policy == "ucb":
        extra["warmup_epochs"] = 1
    return gp.Pruner(N, keep=KEEP, policy=policy, num_epochs=EPOCHS, seed=11, **extra, **kw)


def observe_all(pruner: gp.Pruner, ids: torch.Tensor, epoch: int) -> None:
    for i in range(0, ids.numel(), BATCH):
        b = ids[i:i + BATCH]
        pruner.observe(b, loss_of(b, epoch))


def stats_state(pruner: gp.Pruner) -> dict:
    return pruner.stats.state_dict()


# ---------------------------------------------------------------- worker side
def _train(pruner, sampler, epochs, rank, rec, ckpt=None):
    import torch.distributed as dist
    for e in epochs:
        sampler.set_epoch(e)
        shard = torch.tensor(list(sampler), dtype=torch.long)
        assert len(sampler) == shard.numel()
        assert sampler.plan().indices.dtype == torch.int32
        plan = pruner.plan(e)
        rec["plans"].append(plan.indices.clone())
        rec["weights"].append(None if plan.weights is None else plan.weights.clone())
        rec["shards"].append(shard)
        observe_all(pruner, shard, e)
        if ckpt is not None and e == CKPT_EPOCH:
            try:
                pruner.state_dict()
                rec["unmerged_save"] = "no error"
            except gdist.DistributedError as err:
                rec["unmerged_save"] = str(err)
            pruner.synchronize()
            if rank == 0:
                gp.save_checkpoint(pruner.state_dict(), ckpt)
            dist.barrier()
    pruner.synchronize()
    rec["state"] = stats_state(pruner)


def _worker(rank: int, world: int, store_path: str, out: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    res: dict = {"rank": rank}
    out_dir = Path(out)

    # API of an initialised world
    res["rank_and_world"] = gdist.rank_and_world()
    res["rank_and_world_none"] = gdist.rank_and_world(None)
    auto = make_pruner("uniform")
    res["auto_is_world"] = auto.process_group is dist.group.WORLD and auto.world_size == world
    local = make_pruner("uniform", process_group=None)
    res["local_world"] = (local.rank, local.world_size)
    try:
        gp.PrunedSampler(local)
        res["local_sampler"] = "no error"
    except ValueError as err:
        res["local_sampler"] = str(err)
    explicit = gp.PrunedSampler(local, num_replicas=world, rank=rank)
    res["explicit_sampler"] = (explicit.num_replicas, explicit.rank)
    try:
        gp.PrunedSampler(auto, num_replicas=world + 1)
        res["disagreeing_sampler"] = "no error"
    except ValueError as err:
        res["disagreeing_sampler"] = str(err)

    # every policy, padded and cut shards, several epochs; padded runs also resume from rank 0's
    # checkpoint in fresh Pruners
    for policy in POLICY_NAMES:
        for drop_last in (False, True):
            rec = {"plans": [], "weights": [], "shards": []}
            pruner = make_pruner(policy)
            ckpt = None if drop_last else str(out_dir / f"ckpt_{policy}.pt")
            _train(pruner, gp.PrunedSampler(pruner, drop_last=drop_last), range(EPOCHS), rank, rec,
                   ckpt)
            rec["merges"] = pruner._sync.merges
            if ckpt is not None:
                resumed = make_pruner(policy)
                resumed.load_state_dict(gp.load_checkpoint(ckpt))
                rec["resumed"] = {"plans": [], "weights": [], "shards": []}
                _train(resumed, gp.PrunedSampler(resumed), range(CKPT_EPOCH + 1, EPOCHS), rank,
                       rec["resumed"])
            res[(policy, drop_last)] = rec

    # ranks configured differently must all stop with PlanMismatchError naming the setting,
    # before any collective whose size depends on it (a size mismatch would abort gloo)
    mismatches = {
        "seed": lambda: gp.Pruner(N, keep=KEEP, policy="uniform", seed=rank),
        "num_samples": lambda: gp.Pruner(N + rank, keep=KEEP, policy="uniform"),
        "decay": lambda: gp.Pruner(N, keep=KEEP, policy="ucb", decay=0.5 + 0.1 * rank),
        "policy.c": lambda: gp.Pruner(N, keep=KEEP, policy=gp.UCB(c=1.0 + rank)),
    }
    for name, build in mismatches.items():
        t0 = time.monotonic()
        try:
            build().plan(0)
            res[("mismatch", name)] = ("no error", 0.0)
        except gdist.PlanMismatchError as err:
            res[("mismatch", name)] = (str(err), time.monotonic() - t0)
    # the same Pruner everywhere, but the ranks call different collectives: one synchronize()s
    # while the others plan the next epoch
    p = make_pruner("uniform")
    sampler = p.sampler()
    sampler.set_epoch(0)
    observe_all(p, torch.tensor(list(sampler), dtype=torch.long), 0)
    try:
        if rank == 0:
            p.synchronize()
        else:
            p.plan(1)
        res["one_sided_sync"] = "no error"
    except gdist.PlanMismatchError as err:
        res["one_sided_sync"] = str(err)
    # len() only reads: rank 0 asks for the next epoch's size while the others go on; then all
    # meet in a barrier (with 0.1 planning here, the ranks deadlocked)
    p = make_pruner("ucb")
    sampler = p.sampler()
    sampler.set_epoch(0)
    before = (p.rounds, p.stats.selected.clone(), len(p.history))
    sampler.epoch = 1                               # what a fresh loop's bookkeeping would do
    if rank == 0:
        res["len_next"] = len(sampler)
    res["len_changed_nothing"] = (before[0] == p.rounds and torch.equal(before[1], p.stats.selected)
                                  and before[2] == len(p.history))
    dist.barrier()
    res["len_barrier"] = "passed"

    if world < 4:
        torch.save(res, out_dir / f"rank{rank}.pt")
        dist.destroy_process_group()
        return

    # a stalled rank, then a dead one: the others must raise within the short timeout
    short = datetime.timedelta(seconds=SHORT_TIMEOUT)
    stall_g = dist.new_group(backend="gloo", timeout=short)
    dead_g = dist.new_group(backend="gloo", timeout=short)
    for g in (stall_g, dead_g):
        dist.all_reduce(torch.zeros(1), group=g)     # gloo connects lazily: connect now
    last = world - 1
    for name, group in (("stall", stall_g), ("dead", dead_g)):
        p = gp.Pruner(N, keep=KEEP, policy="ucb", process_group=group, seed=3)
        sampler = p.sampler()
        sampler.set_epoch(0)
        observe_all(p, torch.tensor(list(sampler), dtype=torch.long), 0)
        if rank == last:
            if name == "dead":
                torch.save(res, out_dir / f"rank{rank}.pt")
                os._exit(0)           # dies before epoch 1's collective
        else:
            t0 = time.monotonic()
            try:
                p.plan(1)
                res[name] = ("no error", time.monotonic() - t0)
            except gdist.DistributedError as err:
                res[name] = (str(err), time.monotonic() - t0)
        if name == "stall":
            dist.barrier()            # default group: the stalled rank waits here meanwhile
    torch.save(res, out_dir / f"rank{rank}.pt")
    os._exit(0)                       # the broken groups must not be torn down politely


# ---------------------------------------------------------------- launcher
def _launch(world: int, tmp: Path, limit: float = 150.0) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = tmp / "store"
    logs = [open(tmp / f"log{r}.txt", "w+") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world), str(store),
                               str(tmp)], env=env, cwd=REPO, stdout=logs[r],
                              stderr=subprocess.STDOUT) for r in range(world)]
    deadline = time.monotonic() + limit
    failed = None
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs):
            failed = "a worker failed"
            break
        if time.monotonic() > deadline:
            failed = f"workers still running after {limit} s"
            break
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    if failed is None and any(p.returncode != 0 for p in procs):
        failed = "a worker failed"
    if failed is not None:
        text = []
        for r, f in enumerate(logs):
            f.seek(0)
            text.append(f"--- rank {r} (exit {procs[r].returncode}) ---\n{f.read()[-3000:]}")
        pytest.fail(failed + "\n" + "\n".join(text))
    for f in logs:
        f.close()
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """world -> the ranks' results; each job runs once per module, when first needed."""
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            cache[world] = _launch(world, tmp_path_factory.mktemp(f"dist{world}"))
        return cache[world]
    return get


@pytest.fixture(params=[2, 4], ids=["2ranks", "4ranks"])
def job(request, launched):
    return request.param, launched(request.param)


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


def test_plan_fingerprint_sees_order_ids_weights_and_epoch():
    from gpuprune.plan import pack_mask
    idx = torch.tensor([4, 1, 7, 3], dtype=torch.int32)
    bits = pack_mask(torch.arange(10) % 2 == 1)          # ids 1, 3, 7 rescaled
    base = gdist.plan_fingerprint(gp.Plan(3, idx, False, 10, 2.0, bits))
    assert base.dtype == torch.int64 and base[1:].tolist() == [4, 3, 0]
    assert torch.equal(base, gdist.plan_fingerprint(gp.Plan(3, idx.clone(), False, 10, 2.0,
                                                            bits.clone())))
    variants = [gp.Plan(3, idx[[1, 0, 2, 3]], False, 10, 2.0, bits),      # order
                gp.Plan(3, torch.tensor([4, 1, 7, 5]), False, 10, 2.0, bits),  # one id
                gp.Plan(3, idx, False, 10, 3.0, bits),                     # weights
                gp.Plan(3, idx, False, 10, 2.0, pack_mask(torch.arange(10) < 5)),
                gp.Plan(3, idx, False, 10),
                gp.Plan(4, idx, False, 10, 2.0, bits)]                    # epoch
    for v in variants:
        assert not torch.equal(gdist.plan_fingerprint(v), base)


def test_synchronize_on_single_process_pruners_does_nothing():
    p = make_pruner("ucb", process_group=None)
    plan = p.plan(0)
    observe_all(p, plan.indices, 0)
    before = p.state_dict()
    p.synchronize()                                      # per-step updates: nothing to merge
    assert p.state_dict()["checksum"] == before["checksum"]

if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
