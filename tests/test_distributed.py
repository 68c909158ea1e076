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
import traceback
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


def extreme_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch of float64 losses: beyond the float32 range, finite and not."""
    return (torch.arange(4 * rank, 4 * rank + 4),
            torch.tensor([1e300, -1e300, 2.5, float("inf")], dtype=torch.float64))


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


# the re-score pass (gpuprune.refresh) under a process group
RN = 203                # k = 102, so 101 samples are unselected: not a multiple of 2 or 4 ranks
R_KEEP = 0.5
R_EPOCHS = 4
R_BATCH = 16            # the ranks score in batches of 16; the reference in one batch of 101
R_FEEDS = ("tensors", "loader")


def refresh_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in {-3, ..., 3} and labels: with refresh_model's dyadic weights every logit is exact
    in float32, so a sample's loss does not depend on the batch it is computed in."""
    g = torch.Generator().manual_seed(21)
    return (torch.randint(-3, 4, (RN, 4), generator=g).float(),
            torch.randint(0, 3, (RN,), generator=g))


def refresh_model(epoch: int) -> torch.nn.Module:
    """The model the pass before ``epoch`` scores with (another one each epoch, as training would
    leave it): weights multiples of 1/4, biases of 1/8, and a dropout that only eval() turns off."""
    g = torch.Generator().manual_seed(100 + epoch)
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.randint(-4, 5, (3, 4), generator=g) / 4)
        lin.bias.copy_(torch.randint(-4, 5, (3,), generator=g) / 8)
    return torch.nn.Sequential(lin, torch.nn.Dropout(0.5)).train()


def make_refresh_pruner(**kw) -> gp.Pruner:
    return gp.Pruner(RN, keep=R_KEEP, policy="ucb", num_epochs=R_EPOCHS, seed=7, **kw)


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


def _refresh_job(feed: str) -> dict:
    """Train R_EPOCHS epochs with a Refresher(which="unselected") pass before each plan, fed the
    in-memory tensors or a DataLoader over refresher.sampler(); record what each pass logged."""
    from torch.utils.data import DataLoader, TensorDataset

    from gpuprune.refresh import Refresher
    x, y = refresh_data()
    pruner = make_refresh_pruner()
    refresher = Refresher(pruner, which="unselected")
    data, rsampler = (x, y), None
    if feed == "loader":
        rsampler = refresher.sampler()
        data = DataLoader(gp.IndexedDataset(TensorDataset(x, y)), batch_size=R_BATCH,
                          sampler=rsampler)
    sampler = gp.PrunedSampler(pruner, drop_last=True)        # every trained sample once per epoch
    log = pruner._sync
    rec: dict = {key: [] for key in ("due", "results", "refreshed", "losses", "feed_shards",
                                     "untouched", "plans", "shards")}
    for e in range(R_EPOCHS):
        due = refresher.due(e)
        before = (pruner.rounds, pruner.stats.selected.clone(), pruner.history,
                  pruner.current_plan, stats_state(pruner), log.pending)
        model = refresh_model(e)
        res = refresher.run(model, data, e, batch_size=R_BATCH)
        rec["due"].append(due)
        rec["results"].append((res.epoch, res.requested, res.scored))
        # what this rank logged for the next merge: exactly the pass's observations
        rec["refreshed"].append(log._ids[before[5]:log.pending].long().clone())
        rec["losses"].append(log._losses[before[5]:log.pending].clone())
        rec["feed_shards"].append(torch.tensor(list(rsampler), dtype=torch.long)
                                  if rsampler is not None and due else None)
        after = stats_state(pruner)
        rec["untouched"].append(
            before[0] == pruner.rounds and torch.equal(before[1], pruner.stats.selected)
            and before[2] == pruner.history and before[3] is pruner.current_plan
            and all(torch.equal(before[4][key], after[key]) for key in STATE_KEYS)
            and model.training)
        sampler.set_epoch(e)                        # plan(e): merges the pass's observations
        shard = torch.tensor(list(sampler), dtype=torch.long)
        rec["plans"].append(pruner.current_plan.indices.clone())
        rec["shards"].append(shard)
        observe_all(pruner, shard, e)
    pruner.synchronize()
    rec["state"] = stats_state(pruner)
    rec["rounds"], rec["history"] = pruner.rounds, pruner.history
    return rec


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
    sampler = gp.PrunedSampler(p)
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
    sampler = gp.PrunedSampler(p)
    sampler.set_epoch(0)
    before = (p.rounds, p.stats.selected.clone(), len(p.history))
    sampler.epoch = 1                               # what a fresh loop's bookkeeping would do
    if rank == 0:
        res["len_next"] = len(sampler)
    res["len_changed_nothing"] = (before[0] == p.rounds and torch.equal(before[1], p.stats.selected)
                                  and before[2] == len(p.history))
    dist.barrier()
    res["len_barrier"] = "passed"

    # the single-process input rules hold under a process group: float64 losses beyond float32
    # saturate (not inf, hence not dropped), and an int64 id out of range is refused, never
    # narrowed to the log's int32 (2**32 + 5 would become sample 5)
    p = make_pruner("uniform")
    p.plan(0)
    ids, losses = extreme_batch(rank)
    p.observe(ids, losses)
    pending = p._sync.pending
    try:
        p.observe(torch.tensor([3, 2**32 + 5]), torch.tensor([1.0, 2.0], dtype=torch.float64))
        res["bad_id_observe"] = "no error"
    except ValueError as err:
        res["bad_id_observe"] = str(err)
    res["bad_id_not_logged"] = p._sync.pending == pending
    p.synchronize()
    res["extreme_state"] = stats_state(p)
    # a GPU batch's range is not read on the host: the log must flag it itself (on the CPU
    # observe() refuses it first, so the log is called directly here)
    p._sync.record(torch.tensor([2**32 + 5 if rank % 2 == 0 else -2**32 + 7, 1]),
                   torch.tensor([1.0, 2.0]))
    try:
        p.synchronize()
        res["bad_id_logged"] = "no error"
    except ValueError as err:
        res["bad_id_logged"] = str(err)
    res["extreme_state_after"] = stats_state(p)

    # a re-score pass before each selection, each rank refreshing its shard of the unselected
    for feed in R_FEEDS:
        try:
            res[("refresh", feed)] = _refresh_job(feed)
        except Exception:           # reported by the refresh test; the other checks still count
            res[("refresh", feed)] = {"error": traceback.format_exc()}

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
        sampler = gp.PrunedSampler(p)
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

if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
