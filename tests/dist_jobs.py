"""The multi-process job the distributed tests inspect: W copies of this file run as workers
(``python tests/dist_jobs.py --worker RANK WORLD STORE OUT``), meet through a ``FileStore``, run
every check over a real gloo process group, and save what they saw.

Starting processes is the slow part on a small machine, so each group size is one job, launched
once per test session by conftest.py's ``launched``/``job`` fixtures and shared by
tests/test_distributed.py and tests/test_refresh.py.
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
        dist.barrier()            # every rank past its last collective before teardown
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
def launch(world: int, tmp: Path, limit: float = 150.0) -> list[dict]:
    """Run the job on ``world`` ranks in ``tmp``; the ranks' results (fails the test on a crash
    or a timeout, with the ranks' logs)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = tmp / "store"
    logs = [open(tmp / f"log{r}.txt", "w+") for r in range(world)]
    launcher = str(Path(__file__).with_name("run_then_exit.py"))   # skips finalisation: see there
    procs = [subprocess.Popen([sys.executable, launcher, __file__, "--worker", str(r), str(world),
                               str(store), str(tmp)], env=env, cwd=REPO, stdout=logs[r],
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


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
