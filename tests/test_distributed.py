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
from gpuprune.select import hash32

REPO = Path(__file__).resolve().parents[1]
N = 997                 # prime: k = 299 is not a multiple of 2 or 4, so padding happens
KEEP = 0.3
EPOCHS = 5
CKPT_EPOCH = 2          # rank 0 checkpoints at the end of this epoch
BATCH = 16
SHORT_TIMEOUT = 3.0     # seconds, process groups of the dead/stalled-rank checks
POLICY_NAMES = ["uniform", "epsilon_greedy", "ucb", "infobatch", "static", "full"]
STATE_KEYS = ("mean", "var", "count", "last_epoch", "selected", "nonfinite", "invalid_batches")


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
        extra["static_scores"] = (torch.arange(N) * 7919 % 101).float()
    if policy == "ucb":
        extra["warmup_epochs"] = 1
    return gp.Pruner(N, keep=KEEP, policy=policy, num_epochs=EPOCHS, seed=11, **extra, **kw)


def observe_all(pruner: gp.Pruner, ids: torch.Tensor, epoch: int) -> None:
    for i in range(0, ids.numel(), BATCH):
        b = ids[i:i + BATCH]
        pruner.observe(b, loss_of(b, epoch))


def bank_state(pruner: gp.Pruner) -> dict:
    return {k: getattr(pruner.bank, k).clone() for k in STATE_KEYS}


# ---------------------------------------------------------------- worker side
def _train(pruner, sampler, epochs, rank, rec, ckpt=None):
    import torch.distributed as dist
    for e in epochs:
        sampler.set_epoch(e)
        shard = torch.tensor(list(sampler), dtype=torch.long)
        assert len(sampler) == shard.numel()
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
            gdist.synchronize(pruner)
            if rank == 0:
                torch.save(pruner.state_dict(), ckpt)
            dist.barrier()
    gdist.synchronize(pruner)
    rec["state"] = bank_state(pruner)


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
    res["auto_is_world"] = auto.process_group is dist.group.WORLD and auto.bank.deferred
    local = make_pruner("uniform", process_group=None)
    res["local_deferred"] = local.bank.deferred
    try:
        gp.PrunedSampler(local)
        res["local_sampler"] = "no error"
    except ValueError as err:
        res["local_sampler"] = str(err)
    explicit = gp.PrunedSampler(local, num_replicas=world, rank=rank)
    res["explicit_sampler"] = (explicit.num_replicas, explicit.rank)

    # every policy, padded and cut shards, several epochs; padded runs also resume from rank 0's
    # checkpoint in fresh Pruners
    for policy in POLICY_NAMES:
        for drop_last in (False, True):
            rec = {"plans": [], "weights": [], "shards": []}
            pruner = make_pruner(policy)
            ckpt = None if drop_last else str(out_dir / f"ckpt_{policy}.pt")
            _train(pruner, gp.PrunedSampler(pruner, drop_last=drop_last), range(EPOCHS), rank, rec,
                   ckpt)
            rec["merges"] = pruner.dist_sync.merges
            if ckpt is not None:
                resumed = make_pruner(policy)
                resumed.load_state_dict(torch.load(ckpt))
                rec["resumed"] = {"plans": [], "weights": [], "shards": []}
                _train(resumed, gp.PrunedSampler(resumed), range(CKPT_EPOCH + 1, EPOCHS), rank,
                       rec["resumed"])
            res[(policy, drop_last)] = rec

    # ranks configured differently (seed) must all stop with PlanMismatchError
    try:
        gp.Pruner(N, keep=KEEP, policy="uniform", seed=rank).plan(0)
        res["mismatch"] = "no error"
    except gdist.PlanMismatchError as err:
        res["mismatch"] = str(err)

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
        assert res["local_deferred"] is False
        assert "not synchronised" in res["local_sampler"] and str(world) in res["local_sampler"]
        assert res["explicit_sampler"] == (world, r)


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
        # one merge per plan, plus the synchronize() calls (checkpoint epoch, end of run)
        assert recs[0]["merges"] == EPOCHS + (1 if cfg[1] else 2)
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
            counts = torch.bincount(woven, minlength=N)
            if drop_last:
                assert int(counts.max()) == 1 and per * world > n - world
            else:
                assert set(woven.tolist()) == set(plan.tolist()) and int(counts.max()) <= 2
                assert int((counts == 2).sum()) == per * world - n


def test_merged_statistics_equal_a_single_process_deferred_run(job):
    """One process fed the union of all shards, merging once per epoch, plans and ends alike."""
    world, ranks = job
    for policy in POLICY_NAMES:
        recs = [res[(policy, False)] for res in ranks]
        ref = make_pruner(policy, process_group=None)
        ref.bank.deferred = True
        ref.before_plan.append(lambda p: p.bank.commit())
        for e in range(EPOCHS):
            plan = ref.plan(e)
            assert torch.equal(plan.indices, recs[0]["plans"][e]), (policy, e)
            stream = torch.cat([rec["shards"][e] for rec in recs])
            observe_all(ref, stream, e)
        ref.bank.commit()
        # at most two observations of a sample per epoch: their float64 sum does not depend on the
        # order, so the merged state is bit-identical
        for key in STATE_KEYS:
            assert torch.equal(getattr(ref.bank, key), recs[0]["state"][key]), (policy, key)
    assert int(recs[0]["state"]["nonfinite"]) > 0


def test_merged_statistics_equal_per_step_updates_when_each_sample_is_seen_once(job):
    world, ranks = job
    for policy in POLICY_NAMES:
        recs = [res[(policy, True)] for res in ranks]
        bank = gp.ScoreBank(N, decay=0.9)                  # the normal per-step mode
        for e in range(EPOCHS):
            bank.epoch = e
            stream = torch.cat([rec["shards"][e] for rec in recs])
            assert stream.unique().numel() == stream.numel()
            for i in range(0, stream.numel(), 64):
                b = stream[i:i + 64]
                bank.observe(b, loss_of(b, e))
        got = recs[0]["state"]
        torch.testing.assert_close(got["mean"], bank.mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got["var"], bank.var, rtol=1e-5, atol=1e-7)
        for key in ("count", "last_epoch", "nonfinite"):
            assert torch.equal(got[key], getattr(bank, key)), (policy, key)


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


def test_ranks_with_different_settings_all_raise_plan_mismatch(job):
    world, ranks = job
    for res in ranks:
        assert "different plans for epoch 0" in res["mismatch"]


def test_a_dead_or_stalled_rank_makes_the_others_fail_within_the_timeout(launched):
    world = 4
    ranks = launched(world)
    for res in ranks[:-1]:
        for name in ("stall", "dead"):
            msg, seconds = res[name]
            assert msg.startswith("gpuprune: merging the loss statistics of epoch 0 failed"), msg
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
    assert p.process_group is None and p.dist_sync is None and not p.bank.deferred
    assert gdist.rank_and_world() == (0, 1) and gdist.rank_and_world(None) == (0, 1)


def test_plan_fingerprint_sees_order_ids_weights_and_epoch():
    idx = torch.tensor([4, 1, 7, 3])
    w = torch.tensor([1.0, 2.0, 1.0, 2.0])
    base = gdist.plan_fingerprint(gp.Plan(3, idx, w, False, 10))
    assert base.dtype == torch.int64 and base[1:].tolist() == [4, 3, 0]
    assert torch.equal(base, gdist.plan_fingerprint(gp.Plan(3, idx.clone(), w.clone(), False, 10)))
    variants = [gp.Plan(3, idx[[1, 0, 2, 3]], w, False, 10),      # order
                gp.Plan(3, torch.tensor([4, 1, 7, 5]), w, False, 10),  # one id
                gp.Plan(3, idx, w.flip(0), False, 10),            # weights
                gp.Plan(3, idx, None, False, 10),
                gp.Plan(4, idx, w, False, 10)]                    # epoch
    for v in variants:
        assert not torch.equal(gdist.plan_fingerprint(v), base)


def test_synchronize_on_single_process_pruners():
    p = make_pruner("ucb", process_group=None)
    plan = p.plan(0)
    observe_all(p, plan.indices, 0)
    before = p.bank.mean.clone()
    gdist.synchronize(p)                                 # per-step bank: nothing to do
    assert torch.equal(p.bank.mean, before)
    q = make_pruner("ucb", process_group=None)
    q.bank.deferred = True
    q.plan(0)
    observe_all(q, plan.indices, 0)
    assert int(q.bank.count.sum()) == 0                  # deferred: nothing merged yet
    gdist.synchronize(q)
    assert torch.equal(q.bank.mean, before) and torch.equal(q.bank.count, p.bank.count)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
