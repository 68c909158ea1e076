"""DALI integration on real pipelines (CPU, device_id=None) and real data (Fashion-MNIST).

Every test runs actual DALI pipelines: in-memory arrays and PNG files written from the same images,
serial and parallel external sources, PARTIAL and DROP, early exits, shards (in one process and
in a real 2-rank gloo group), restarts, bad files. The issue-14 findings are tested one by one
(``test_finding_N_...``); DALI's own iterator contract is checked against the stock iterator in
``test_dali_contract.py``, epoch boundaries in ``test_dali_epochs.py``, the GPU paths (marked
``gpu``, skipped without CUDA) in ``test_dali_gpu.py``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, pipeline_def, types  # noqa: E402

import gpuprune as gp  # noqa: E402
from gpuprune.dali import (ArraySource, BadSampleError, CallbackSource, FileSource,  # noqa: E402
                           LastBatchPolicy, PlanSource, PrunedDALIIterator, build_iterator,
                           build_pipeline)
from gpuprune.policies import Policy, Selection  # noqa: E402
from gpuprune.rng import draw_seeds  # noqa: E402
from gpuprune.sampler import Position  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
N = 3000          # samples used from the training set
N_FILES = 600     # of which this many are written as PNG files
PARTIAL, DROP = LastBatchPolicy.PARTIAL, LastBatchPolicy.DROP


# ---------------------------------------------------------------- data
def _read_idx(name: str, header: int) -> np.ndarray:
    with gzip.open(FMNIST / name) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


@pytest.fixture(scope="module")
def fmnist():
    """The first N Fashion-MNIST training images (N, 28, 28, 1) uint8 and labels (N,) int64."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {FMNIST} (Debian package dataset-fashion-mnist)")
    x = _read_idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1)[:N].copy()
    y = _read_idx("train-labels-idx1-ubyte.gz", 8)[:N].astype(np.int64)
    return x, y


@pytest.fixture(scope="module")
def png_files(fmnist, tmp_path_factory):
    """The first N_FILES images written as (lossless) PNG files."""
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path_factory.mktemp("fmnist_png")
    paths = []
    for i in range(N_FILES):
        p = root / f"{i:05d}.png"
        Image.fromarray(fmnist[0][i, :, :, 0]).save(p)
        paths.append(str(p))
    return paths


class ScheduledSizes(Policy):
    """A random subset whose size follows a per-epoch schedule (0 and odd sizes included)."""

    name = "scheduled_sizes"
    exact_k = False

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = list(sizes)

    def settings(self) -> dict:
        return {"sizes": self.sizes}

    def select(self, stats, k, *, epoch, generator, backend) -> Selection:
        (seed,) = draw_seeds(generator, 1)
        return Selection(backend.top_k(None, stats.num_samples, self.sizes[epoch], seed))


def scheduled_pruner(sizes, num_samples=N, seed=3) -> gp.Pruner:
    return gp.Pruner(num_samples, policy=ScheduledSizes(sizes), seed=seed)


def normalize_graph(images, labels):
    """A real augmentation graph: HWC uint8 -> CHW float32 (mean 0, std 1, so values are exact)."""
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                      mean=[0.0], std=[1.0])
    return images, labels


def run_epoch(it, x, y, *, stop_after=None, check_chw=True):
    """Iterate one pass; check labels and pixels against the arrays; return the batches' ids."""
    batches = []
    for k, (b,) in enumerate(it):
        idx = b["index"].numpy()
        assert b["index"].dtype == torch.int64
        assert np.array_equal(b["label"].numpy().reshape(-1), y[idx])
        want = x[idx].transpose(0, 3, 1, 2) if check_chw else x[idx]
        assert np.array_equal(b["data"].numpy(), want.astype(b["data"].numpy().dtype))
        assert b["weight"].shape == b["index"].shape
        batches.append(idx)
        if stop_after is not None and k + 1 == stop_after:
            break
    return batches


def expected_batches(plan_ids: torch.Tensor, bs: int, drop: bool, start: int = 0) -> list:
    ids = plan_ids.numpy().astype(np.int64)
    n = len(ids)
    if drop:
        n = start + (n - start) // bs * bs
    return [ids[i:min(i + bs, n)] for i in range(start, n, bs)]


def expected_batches_list(ids: list, bs: int) -> list:
    return [ids[i:i + bs] for i in range(0, len(ids), bs)]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


def _loss_of(idx: torch.Tensor, epoch: int) -> torch.Tensor:
    return ((idx * 2654435761 + epoch * 97) % 1000).float() / 100.0


# ---------------------------------------------------------------- array source
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("policy", [PARTIAL, DROP], ids=["partial", "drop"])
def test_array_source_serves_each_planned_sample_once(fmnist, policy, parallel):
    x, y = fmnist
    bs = 64
    sizes = [700, 0, 333, 64, 1]            # 0, a partial batch, an exact batch, a single sample
    pruner = scheduled_pruner(sizes)
    source = ArraySource(x, y, layouts=("HWC", None), parallel=parallel)
    it = build_iterator(pruner, source, normalize_graph, batch_size=bs, last_batch_policy=policy,
                        py_num_workers=2)
    for epoch, size in enumerate(sizes):
        it.set_epoch(epoch)
        want = expected_batches(pruner.plan(epoch).indices, bs, policy == DROP)
        assert len(pruner.plan(epoch)) == size
        assert len(it) == len(want) == (size // bs if policy == DROP else -(-size // bs))
        got = run_epoch(it, x, y)
        assert_same_batches(got, want)                          # planned order, batch boundaries
        flat = np.concatenate(got) if got else np.empty(0, np.int64)
        assert len(np.unique(flat)) == len(flat)                # each sample once
        if policy == PARTIAL:
            assert sorted(flat.tolist()) == sorted(pruner.plan(epoch).indices.tolist())
        assert it.epoch == epoch
    with pytest.raises(StopIteration):                          # stays ended until the next iter()
        next(it)


def test_len_and_size_never_plan(fmnist):
    """Issue 10: len(it) (and it.size) only read; rounds, selected counts and history unchanged."""
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.1, policy="uniform", seed=5)
    it = build_iterator(pruner, ArraySource(x, y), batch_size=128)
    for epoch in range(3):
        before = (pruner.rounds, pruner.stats.selected.clone(), len(pruner.history))
        n = len(it)
        size = it.size
        assert n == -(-pruner.k // 128) and size == pruner.k == 300
        assert pruner.rounds == before[0] and len(pruner.history) == before[2]
        assert torch.equal(pruner.stats.selected, before[1])
        assert pruner.current_plan is None or pruner.current_plan.epoch == epoch - 1
        got = run_epoch(it, x, y, check_chw=False)
        assert it.epoch == epoch and len(got) == n
        assert_same_batches(got, expected_batches(pruner.plan(epoch).indices, 128, False))
    # an InfoBatch epoch's size depends on the losses: len says so instead of planning
    ib = gp.Pruner(N, keep=0.5, policy="infobatch", num_epochs=4, seed=1)
    it = build_iterator(ib, ArraySource(x, y), batch_size=128)
    for (b,) in it:
        ib.observe(b["index"], _loss_of(b["index"], 0))
    with pytest.raises(RuntimeError, match=r"call set_epoch\(1\) first"):
        len(it)
    assert it.size == -1 and it._size == -1 and ib.current_plan.epoch == 0
    it.set_epoch(1)
    assert it.size == len(ib.plan(1)) and len(it) == -(-len(ib.plan(1)) // 128)


def test_next_without_iter_and_auto_reset(fmnist):
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.05, policy="uniform", seed=2)       # 150 samples: 3 batches of 64
    it = build_iterator(pruner, ArraySource(x, y), batch_size=64, auto_reset=True)
    got = [next(it)[0]["index"].numpy() for _ in range(3)]
    with pytest.raises(StopIteration):
        next(it)
    assert_same_batches(got, expected_batches(pruner.plan(0).indices, 64, False))
    nxt = next(it)[0]["index"].numpy()                          # auto_reset: epoch 1 begins
    assert it.epoch == 1 and np.array_equal(nxt, pruner.plan(1).indices[:64].numpy())


def test_finding_4_peeking_keeps_the_epoch(fmnist):
    """next(iter(it)) then a for loop: the loop finishes the same epoch (0.1: one batch of epoch e,
    then all of epoch e+1); the loop after that runs epoch e+1."""
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.05, policy="uniform", seed=6)       # 150 samples: 3 batches
    it = build_iterator(pruner, ArraySource(x, y), batch_size=64)
    for epoch in range(2):
        it.set_epoch(epoch)
        first = next(iter(it))[0]["index"].numpy()              # peek
        rest = run_epoch(it, x, y, check_chw=False)
        assert it.epoch == epoch
        assert_same_batches([first, *rest], expected_batches(pruner.plan(epoch).indices, 64, False))
    with pytest.raises(StopIteration):            # a bare next() after a finished epoch: ended
        next(it)
    assert_same_batches(run_epoch(it, x, y, check_chw=False),    # the next loop: epoch 2
                        expected_batches(pruner.plan(2).indices, 64, False))


# ---------------------------------------------------------------- leaving early, resuming
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_finding_5_after_a_break_live_and_restored_agree(fmnist, parallel):
    """One rule: after a break the position is (epoch, samples served); continuing live and
    restoring from state_dict() into a new pipeline give the same batches; set_epoch(next) or
    reset() end the epoch on both, and nothing prefetched of it leaks into the next one."""
    x, y = fmnist
    bs, sizes = 32, [300, 500, 200, 250]
    source_kw = {"parallel": parallel, "prefetch_queue_depth": 3}

    def make():
        pruner = scheduled_pruner(sizes, seed=11)
        return pruner, build_iterator(pruner, ArraySource(x, y, **source_kw), batch_size=bs,
                                      prefetch_queue_depth=3, py_num_workers=2)

    def train(pruner, it, epochs, record, stop=None):
        for epoch in epochs:
            it.set_epoch(epoch)
            for (b,) in it:
                pruner.observe(b["index"], _loss_of(b["index"], epoch))
                record.append((epoch, b["index"].numpy()))
                if stop is not None and (epoch, len(record)) == stop:
                    return

    live_p, live = make()
    got: list = []
    train(live_p, live, [0], got, stop=(0, 3))                  # break after 3 batches
    state = {"pruner": live_p.state_dict(), "it": live.state_dict()}
    assert state["it"] == Position.make(0, 3 * bs, 1, False)
    assert live.state_dict() == state["it"] and live.size == 300 and len(live) == 10
    plan0 = live_p.plan(0).indices
    train(live_p, live, [0, 1], got)                              # set_epoch(0) keeps the place
    rest_live = got[3:]

    rest_p, rest = make()
    rest_p.load_state_dict(state["pruner"])
    rest.load_state_dict(state["it"])
    assert rest.epoch == 0 and len(rest) == 10 - 3 and rest.size == 300 - 96
    restored: list = []
    train(rest_p, rest, [0, 1], restored)
    assert [e for e, _ in restored] == [e for e, _ in rest_live]
    assert_same_batches([b for _, b in restored], [b for _, b in rest_live])
    assert_same_batches([b for e, b in rest_live if e == 0],
                        expected_batches(plan0, bs, False, start=96))

    # a plain for loop after a break continues the epoch, live and restored alike
    for it, p in ((live, live_p), (rest, rest_p)):
        it.set_epoch(2)
        head = run_epoch(it, x, y, stop_after=2, check_chw=False)
        tail = run_epoch(it, x, y, check_chw=False)
        assert_same_batches(head + tail, expected_batches(p.plan(2).indices, bs, False))
        # set_epoch(another epoch) and reset() after a break end the epoch: epoch 3 starts clean
        it.set_epoch(3)
        run_epoch(it, x, y, stop_after=1, check_chw=False)
        it.reset()
        assert it.state_dict() == Position.make(4, 0, 1, False)


def test_state_dict_resumes_mid_epoch_exactly(fmnist):
    x, y = fmnist
    bs, epochs = 50, 4

    def make():
        pruner = gp.Pruner(N, keep=0.2, policy="ucb", seed=9)
        return pruner, build_iterator(pruner, ArraySource(x, y), batch_size=bs)

    def train(pruner, it, record, until=None):
        for epoch in range(it.epoch, epochs):
            it.set_epoch(epoch)
            for (b,) in it:
                pruner.observe(b["index"], _loss_of(b["index"], epoch))
                record.append((epoch, b["index"].numpy()))
                if until == (epoch, it.state_dict()["consumed"]):
                    return

    ref_pruner, ref_it = make()
    ref = []
    train(ref_pruner, ref_it, ref)

    pruner, it = make()
    got = []
    train(pruner, it, got, until=(1, 4 * bs))                # interrupt after 4 batches of epoch 1
    state = {"pruner": pruner.state_dict(), "it": it.state_dict()}
    assert state["it"] == {"epoch": 1, "consumed": 200, "num_replicas": 1, "drop_last": False}
    Position.check(state["it"], 1, False, "test")              # the sampler's format, checked alike
    del pruner, it
    pruner, it = make()                       # a fresh pipeline, as after a restart
    pruner.load_state_dict(state["pruner"])
    it.load_state_dict(state["it"])
    assert it.epoch == 1 and len(it) == -(-len(pruner.plan(1)) // bs) - 4
    train(pruner, it, got)
    assert [e for e, _ in got] == [e for e, _ in ref]
    for (_, g), (_, r) in zip(got, ref):
        assert np.array_equal(g, r)


def test_sampler_and_iterator_positions_are_interchangeable(fmnist):
    """Issue 10: the same format and resume rule as PrunedSampler, so a position saved by one
    restores into the other and both continue with the same samples."""
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.1, policy="uniform", seed=4)
    plan = pruner.plan(0)
    sampler = gp.PrunedSampler(pruner)
    sampler.set_epoch(0)
    state = sampler.state_dict(consumed=70)                    # not a multiple of the batch size
    it = build_iterator(pruner, ArraySource(x, y), batch_size=64)
    it.load_state_dict(state)
    assert len(it) == -(-(300 - 70) // 64) and it.size == 230
    got = np.concatenate(run_epoch(it, x, y, check_chw=False))
    assert np.array_equal(got, plan.indices[70:].numpy())
    resumed = gp.PrunedSampler(pruner)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    assert list(resumed) == plan.indices[70:].tolist()
    # and back: the iterator's mid-epoch state into a sampler
    it.set_epoch(1)
    run_epoch(it, x, y, stop_after=2, check_chw=False)
    resumed = gp.PrunedSampler(pruner)
    resumed.load_state_dict(it.state_dict())
    resumed.set_epoch(1)
    assert list(resumed) == pruner.plan(1).indices[128:].tolist()
    # a bad position is refused before anything changes
    with pytest.raises(ValueError, match="missing"):
        it.load_state_dict({"epoch": 1, "batch": 2})
    with pytest.raises(ValueError, match="consumed"):
        it.load_state_dict(Position.make(1, 301, 1, False))
    with pytest.raises(ValueError, match="num_replicas=2"):
        it.load_state_dict(Position.make(1, 5, 2, False))
    assert it.state_dict() == Position.make(1, 128, 1, False)


def test_state_at_an_epoch_boundary_points_at_the_next_epoch(fmnist):
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.05, policy="uniform", seed=1)
    it = build_iterator(pruner, ArraySource(x, y), batch_size=64)
    run_epoch(it, x, y, check_chw=False)
    assert it.state_dict() == Position.make(1, 0, 1, False)
    it2 = build_iterator(pruner, ArraySource(x, y), batch_size=32)    # batch size may differ
    it2.load_state_dict(it.state_dict())
    assert_same_batches(run_epoch(it2, x, y, check_chw=False),
                        expected_batches(pruner.plan(1).indices, 32, False))


# ---------------------------------------------------------------- shards
@pytest.mark.parametrize("policy", [PARTIAL, DROP], ids=["partial", "drop"])
def test_two_shards_split_the_same_plan(fmnist, policy):
    x, y = fmnist
    bs, world = 32, 2
    pruner = scheduled_pruner([301, 64, 0, 97])
    its = [build_iterator(pruner, ArraySource(x, y), batch_size=bs, last_batch_policy=policy,
                          shard_id=r, num_shards=world) for r in range(world)]
    for epoch in range(4):
        plan = pruner.plan(epoch)
        per_rank, steps = [], []
        for r, it in enumerate(its):
            it.set_epoch(epoch)
            shard = plan.shard(r, world, drop_last=policy == DROP)
            want = expected_batches(shard.indices, bs, policy == DROP)
            steps.append(len(it))
            assert steps[-1] == len(want)
            got = run_epoch(it, x, y, check_chw=False)
            assert_same_batches(got, want)
            per_rank.append(np.concatenate(got) if got else np.empty(0, np.int64))
        assert steps[0] == steps[1]                             # equal step counts on every rank
        both = np.concatenate(per_rank)
        if policy == PARTIAL:                                   # full cover, < world duplicates
            assert set(both.tolist()) == set(plan.indices.tolist())
            assert len(both) - len(plan) == (-len(plan)) % world
        else:
            assert len(np.unique(both)) == len(both)


_RANK_SCRIPT = r"""
import json, sys, datetime
import numpy as np, torch, torch.distributed as dist
import gpuprune as gp
from gpuprune.dali import ArraySource, LastBatchPolicy, build_iterator
rank, world, port, data, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=60))
x, y = np.load(data + "_x.npy"), np.load(data + "_y.npy")
pruner = gp.Pruner(len(x), keep=0.3, policy="ucb", seed=7)          # synchronised over the group
record = {"errors": []}
try:                                  # explicit shard arguments that disagree with the group raise
    build_iterator(pruner, ArraySource(x, y), batch_size=32, num_shards=3)
except ValueError as e:
    record["errors"].append(str(e))
its = {"partial": build_iterator(pruner, ArraySource(x, y), batch_size=32),      # no shard args
       "drop": build_iterator(pruner, ArraySource(x, y), batch_size=32,
                              last_batch_policy=LastBatchPolicy.DROP)}
record["shard"] = [its["partial"].shard_id, its["partial"].num_shards]
if rank == 0:                         # a one-sided len()/size before planning: a pure read
    record["len0"] = [len(its["partial"]), its["partial"].size]
dist.barrier()                        # would time out if len() had issued a collective
record["epochs"] = []
for epoch in range(3):
    ep = {}
    for name, it in its.items():
        it.set_epoch(epoch)
        steps, got = len(it), []
        for (b,) in it:
            assert np.array_equal(b["label"].numpy(), y[b["index"].numpy()])
            if name == "partial":
                pruner.observe(b["index"], ((b["index"] * 2654435761 + epoch * 97) % 1000).float() / 100.0)
            got.append(b["index"].tolist())
        ep[name] = {"steps": steps, "batches": got}
    ep["plan"] = pruner.plan(epoch).indices.tolist()
    record["epochs"].append(ep)
json.dump(record, open(out, "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_ranks_of_a_gloo_group_shard_by_themselves(fmnist, tmp_path):
    """Issue 10: under a real 2-rank gloo group the iterator finds its shard from the Pruner (no
    shard arguments): equal-size, disjoint shards covering the plan; every rank plans alike;
    disagreeing explicit shard arguments raise; a one-sided len() does not hang the group."""
    import socket
    x, y = fmnist[0][:1001], fmnist[1][:1001]
    np.save(tmp_path / "d_x.npy", x)
    np.save(tmp_path / "d_y.npy", y)
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    launcher = str(Path(__file__).with_name("run_then_exit.py"))   # skips finalisation: see there
    procs = [subprocess.Popen([sys.executable, launcher, str(script), str(r), "2", str(port),
                               str(tmp_path / "d"), str(tmp_path / f"r{r}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    ranks = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    assert [r["shard"] for r in ranks] == [[0, 2], [1, 2]]
    assert all(r["errors"] == ["PrunedDALIIterator: num_shards=3, but the pruner is synchronised over "
                               "a process group where num_shards=2; leave num_shards unset"]
               for r in ranks)                                  # named as the iterator names them
    k = round(0.3 * 1001)                                        # 300: 150 per rank
    assert ranks[0]["len0"] == [-(-150 // 32), 150]
    for epoch in range(3):
        plan = ranks[0]["epochs"][epoch]["plan"]
        assert ranks[1]["epochs"][epoch]["plan"] == plan and len(plan) == k
        for name in ("partial", "drop"):
            shards = []
            for r in range(2):
                rec = ranks[r]["epochs"][epoch][name]
                shards.append([i for batch in rec["batches"] for i in batch])
                assert len(rec["batches"]) == rec["steps"]
                want = gp.Plan(epoch, torch.tensor(plan, dtype=torch.int32), False, 1001).shard(
                    r, 2, name == "drop").indices.tolist()
                assert shards[-1] == (want if name == "partial" else want[:len(want) // 32 * 32])
            assert ranks[0]["epochs"][epoch][name]["steps"] == ranks[1]["epochs"][epoch][name]["steps"]
            if name == "partial":
                assert len(shards[0]) == len(shards[1]) == 150           # equal sizes
                assert not set(shards[0]) & set(shards[1])               # disjoint
                assert set(shards[0]) | set(shards[1]) == set(plan)      # covering the plan


@pytest.mark.parametrize("policy", [PARTIAL, DROP], ids=["partial", "drop"])
def test_plan_is_the_share_the_epoch_serves(fmnist, policy):
    """it.plan() is this rank's share of its epoch's plan in serving order (what
    PrunedSampler.plan() gives for the same rank), for set_epoch'd and plain-loop epochs, shuffled
    or not; it plans a not-yet-planned epoch and never moves the position."""
    x, y = fmnist
    bs = 64
    pruner = gp.Pruner(N, keep=0.1, policy="uniform", seed=9)      # 300 per epoch: 150 per shard
    its = {(r, shuffle): build_iterator(pruner, ArraySource(x, y), batch_size=bs,
                                        last_batch_policy=policy, shard_id=r, num_shards=2,
                                        shuffle=shuffle, prepare_first_batch=False)
           for r in range(2) for shuffle in (True, False)}
    def same(p, q):
        return p.epoch == q.epoch and torch.equal(p.indices, q.indices)

    it = its[(1, True)]
    assert pruner.current_plan is None
    first = it.plan()                             # before anything: epoch 0, planned now
    assert first.epoch == 0 and pruner.current_plan.epoch == 0
    assert it.epoch == 0 and len(it) == (2 if policy == DROP else 3)
    shares = {}
    for epoch in range(3):
        for key, it in its.items():
            if epoch < 2:
                it.set_epoch(epoch)
                before = it.plan()                # planned, before any batch
            else:                                 # a finished pass keeps its epoch until the
                before = None                     # plain loop below starts the next one
                assert same(it.plan(), shares[key])
            got = run_epoch(it, x, y, stop_after=1, check_chw=False)
            share = it.plan()                     # mid-pass
            assert share.epoch == epoch and it.epoch == epoch
            assert before is None or same(before, share)
            got += run_epoch(it, x, y, check_chw=False)     # the loop continues the epoch
            assert same(it.plan(), share) and it.epoch == epoch
            want = share.indices.numpy().astype(np.int64)
            assert len(want) == 150
            if policy == DROP:
                want = want[:len(want) // bs * bs]
            assert_same_batches(got, expected_batches_list(want, bs))
            shares[key] = share
        plan = pruner.plan(epoch).indices
        for r in range(2):
            sampler = gp.PrunedSampler(pruner, num_replicas=2, rank=r)
            sampler.set_epoch(epoch)
            assert torch.equal(shares[(r, True)].indices, sampler.plan().indices)
            unshuffled = gp.Plan(epoch, plan.sort().values, False, N).shard(r, 2).indices
            assert torch.equal(shares[(r, False)].indices, unshuffled)
        for shuffle in (True, False):             # the two shards split the epoch's plan
            a, b = (set(shares[(r, shuffle)].indices.tolist()) for r in range(2))
            assert not a & b and a | b == set(plan.tolist())
        if epoch == 0:                            # what plan() gave before anything ran
            assert torch.equal(first.indices, shares[(1, True)].indices)


def test_weight_output_is_the_plans_loss_weight(fmnist):
    x, y = fmnist
    pruner = gp.Pruner(N, prune_ratio=0.5, policy="infobatch", num_epochs=8, seed=4)
    it = build_iterator(pruner, ArraySource(x, y), batch_size=100)
    losses = torch.from_numpy((np.arange(N) % 7).astype(np.float32))
    for epoch in range(2):
        it.set_epoch(epoch)
        plan = pruner.plan(epoch)
        table = torch.ones(N)
        if plan.weights is not None:
            table[plan.indices.long()] = plan.weights
        for (b,) in it:
            idx = b["index"]
            assert torch.equal(b["weight"], table[idx])
            loss = pruner.observe(idx, losses[idx])
            assert torch.allclose(loss, (losses[idx] * b["weight"]).mean())
    assert plan.weights is not None and (plan.weights == 2.0).any()   # epoch 1 rescales


# ---------------------------------------------------------------- findings 1-3, 6, 8, 9
def test_finding_1_dali_checkpoints_are_refused_pointing_at_state_dict(fmnist):
    """0.1 accepted enable_checkpointing and, restored from it.checkpoints()[0], paired data with
    the wrong sample ids. Now: a clear error at construction, naming state_dict."""
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.1, policy="uniform")
    with pytest.raises(ValueError, match=r"enable_checkpointing=True.*it\.state_dict\(\)"):
        build_iterator(pruner, ArraySource(x, y), batch_size=32, enable_checkpointing=True)
    # a pipeline restored from a DALI checkpoint (of the same graph) is refused too
    saved = build_pipeline(ArraySource(x, y), batch_size=32, enable_checkpointing=True)
    saved.build()
    src = ArraySource(x, y)
    restored = build_pipeline(src, batch_size=32, checkpoint=saved.checkpoint(),
                              enable_checkpointing=True)
    with pytest.raises(ValueError, match=r"restored from a DALI checkpoint.*pruner\.state_dict"):
        PrunedDALIIterator(restored, ["data", "label"], pruner=pruner, source=src)
    it = build_iterator(pruner, ArraySource(x, y), batch_size=32)
    with pytest.raises(ValueError, match=r"checkpoints\(\) is not supported.*state_dict"):
        it.checkpoints()


def test_finding_2_stock_constructor_arguments(fmnist):
    """Each DALIGenericIterator argument is accepted with its meaning or explained."""
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.05, policy="uniform", seed=3)

    def make(*args, **kwargs):
        source = ArraySource(x, y)
        pipe = build_pipeline(source, batch_size=64)
        return PrunedDALIIterator(pipe, ["data", "label"], *args, pruner=pruner, source=source,
                                  **kwargs)

    want = expected_batches(pruner.plan(0).indices, 64, False)
    ok = [make(-1), make(size=-1), make(reader_name=None), make(dynamic_shape=True),
          make(last_batch_padded=False), make(last_batch_padded=True),   # PARTIAL trims it
          make(prepare_first_batch=False),
          make(-1, None, False, None, False, False, PARTIAL, True)]   # stock positional order
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok.append(make(fill_last_batch=False))                    # DALI's old name for PARTIAL
    assert any("fill_last_batch" in str(w.message) for w in caught)
    for it in ok:
        it.set_epoch(0)
        assert_same_batches(run_epoch(it, x, y, check_chw=False), want)
    for kwargs, match in [({"size": 150}, "size=150 does not apply.*leave size=-1"),
                          ({"size": 0}, "size=0 does not apply"),
                          ({"reader_name": "Reader"}, "reader_name='Reader'.*FileSource"),
                          ({"last_batch_policy": LastBatchPolicy.FILL}, "FILL.*did not choose")]:
        with pytest.raises(ValueError, match=match):
            make(**kwargs)
    with pytest.raises(ValueError, match="FILL.*PARTIAL"), pytest.warns(Warning,
                                                                     match="fill_last_batch"):
        make(fill_last_batch=True)
    with pytest.raises(ValueError, match="size=150 does not apply"):
        make(150)                                                 # positional size too
    with pytest.raises(TypeError, match="prepare_first_batch must be a bool"):
        make(prepare_first_batch="yes")
    # through build_iterator the iterator's message comes back, not a Pipeline TypeError
    with pytest.raises(ValueError, match="size=150 does not apply"):
        build_iterator(pruner, ArraySource(x, y), batch_size=64, size=150)
    with pytest.raises(ValueError, match="reader_name"):
        build_iterator(pruner, ArraySource(x, y), batch_size=64, reader_name="Reader")
    it = build_iterator(pruner, ArraySource(x, y), batch_size=64, dynamic_shape=False,
                        last_batch_padded=False)
    assert_same_batches(run_epoch(it, x, y, check_chw=False), want)


def test_finding_2_prepare_first_batch_starts_the_pipeline_in_set_epoch(fmnist):
    x, y = fmnist
    for prepare in (True, False):
        calls = []

        def gather(ids, epoch, calls=calls):
            calls.append(epoch)
            return x[ids], y[ids]

        pruner = gp.Pruner(N, keep=0.1, policy="uniform", seed=2)
        source = CallbackSource(gather, N, dtype=[np.uint8, np.int64], ndim=[3, 0])
        it = build_iterator(pruner, source, batch_size=64, prepare_first_batch=prepare)
        assert calls == []                          # the constructor cannot plan: nothing runs
        it.set_epoch(0)
        assert len(calls) == (2 if prepare else 0)  # DALI's prefetch_queue_depth batches
        assert_same_batches(run_epoch(it, x, y, check_chw=False),
                            expected_batches(pruner.plan(0).indices, 64, False))


def test_finding_3_size_reports_the_planned_shard(fmnist):
    """0.1: it._size was -1, so NVIDIA's ceil(loader._size / batch_size) gave 0 steps."""
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.1, policy="uniform", seed=8)
    for policy in (PARTIAL, DROP):
        for rank in range(2):
            it = build_iterator(pruner, ArraySource(x, y), batch_size=64, last_batch_policy=policy,
                                shard_id=rank, num_shards=2)
            assert it.size == it._size == 150                   # 300 planned, half per rank
            steps = math.ceil(it._size / it.batch_size) if policy == PARTIAL else it._size // 64
            it.set_epoch(0)
            assert steps == len(it) == len(run_epoch(it, x, y, check_chw=False))


@pytest.mark.parametrize("policy_name", ["full", "uniform"])
def test_finding_6_unshuffled_mode_serves_ids_in_order(fmnist, policy_name):
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.1, policy=policy_name, seed=5)
    it = build_iterator(pruner, ArraySource(x, y), batch_size=128, shuffle=False)
    for epoch in range(2):
        it.set_epoch(epoch)
        got = np.concatenate(run_epoch(it, x, y, check_chw=False))
        assert np.array_equal(got, np.sort(pruner.plan(epoch).indices.numpy()))
        if policy_name == "full":
            assert np.array_equal(got, np.arange(N))
        else:
            assert len(got) == 300 and not np.array_equal(pruner.plan(epoch).indices.numpy(), got)
    shuffled = build_iterator(gp.Pruner(N, policy="full", seed=5), ArraySource(x, y),
                              batch_size=128)
    assert not np.array_equal(np.concatenate(run_epoch(shuffled, x, y, check_chw=False)),
                              np.arange(N))           # the default still shuffles, even for "full"


def test_finding_8_callback_sources_get_ids_and_epoch(fmnist):
    """A public source API: the user's per-sample or batch code gets planned ids and the epoch."""
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.05, policy="uniform", seed=12)

    def per_sample(i, epoch):                # e.g. a ported per-sample external_source callable
        assert isinstance(i, int) and isinstance(epoch, int)
        return x[i], np.array(y[i]), np.array([epoch, i], np.int64)

    its = {"sample": build_iterator(pruner, CallbackSource(per_sample, N,
                                                           dtype=[types.UINT8, np.int64, np.int64],
                                                           ndim=[3, 0, 1], per_sample=True,
                                                           layout=["HWC", None, None]),
                                    normalize_graph_3, batch_size=40,
                                    output_map=["data", "label", "tag"]),
           "batch": build_iterator(pruner, CallbackSource(
               lambda ids, epoch: (x[ids], y[ids], np.stack([np.full(len(ids), epoch), ids], 1)),
               N, dtype=[np.uint8, np.int64, np.int64], ndim=[3, 0, 1], layout=["HWC", None, None]),
               normalize_graph_3, batch_size=40, output_map=["data", "label", "tag"])}
    for epoch in range(2):
        for it in its.values():
            it.set_epoch(epoch)
            got = []
            for (b,) in it:
                idx = b["index"].numpy()
                assert np.array_equal(b["tag"].numpy(), np.stack([np.full(len(idx), epoch), idx], 1))
                assert np.array_equal(b["data"].numpy(), x[idx].transpose(0, 3, 1, 2))
                assert np.array_equal(b["label"].numpy(), y[idx])
                got.append(idx)
            assert_same_batches(got, expected_batches(pruner.plan(epoch).indices, 40, False))

    class Gray(PlanSource):                   # a source written against the public base class
        def outputs(self):
            (img,) = self.external_source(dtype=[np.uint8], ndim=[3], layout=["HWC"])
            return (img, fn.cast(fn.reductions.sum(img), dtype=types.INT64))

        def gather(self, ids, epoch):
            return (x[ids],)

    it = build_iterator(pruner, Gray(N), batch_size=64)
    it.set_epoch(2)
    for (b,) in it:
        idx = b["index"].numpy()
        assert np.array_equal(b["label"].numpy(), x[idx].reshape(len(idx), -1).sum(1))
    with pytest.raises(TypeError, match="callback must be callable"):
        CallbackSource(3, N, dtype=np.uint8, ndim=3)
    with pytest.raises(ValueError, match="one entry per output"):
        CallbackSource(lambda i, e: i, N, dtype=[np.uint8, np.int64], ndim=[3])


def test_array_source_batches_go_through_gather(fmnist):
    """The CPU ArraySource serves through PlanSource's path (ids -> gather), so a subclass that
    overrides gather (here: per-epoch label noise) is what DALI gets, and a gather that breaks
    the contract is caught as in every other source."""
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.05, policy="uniform", seed=5)

    class Tagged(ArraySource):
        def gather(self, ids, epoch):
            images, labels = super().gather(ids, epoch)
            return images, labels + 100 * (epoch + 1)

    source = Tagged(x, y, layouts=("HWC", None))
    assert source.gather(np.array([3, 0, 3]), 0)[0].tolist() == x[[3, 0, 3]].tolist()
    it = build_iterator(pruner, source, normalize_graph, batch_size=50)
    for epoch in range(2):
        it.set_epoch(epoch)
        got = []
        for (b,) in it:
            idx = b["index"].numpy()
            assert np.array_equal(b["label"].numpy(), y[idx] + 100 * (epoch + 1))
            assert np.array_equal(b["data"].numpy(), x[idx].transpose(0, 3, 1, 2))
            got.append(idx)
        assert_same_batches(got, expected_batches(pruner.plan(epoch).indices, 50, False))

    class Broken(ArraySource):
        def gather(self, ids, epoch):
            return list(super().gather(ids, epoch))          # a list, not a tuple

    it = build_iterator(gp.Pruner(N, keep=0.05, policy="uniform", seed=5), Broken(x, y),
                        batch_size=50)
    with pytest.raises(TypeError, match="Broken.gather must return a tuple .* got list"):
        it.set_epoch(0)                                       # which runs the first batch


def test_plan_storage_takes_the_plans_id_type(fmnist, monkeypatch):
    """The sources store plans in gpuprune.plan.index_dtype(N): int32 here; the int64 storage of
    N > 2**31 (forced for a small N: a real one needs a multi-GiB sparse file) serves alike."""
    import gpuprune.dali.sources as sources
    x, y = fmnist
    source = ArraySource(x, y)
    build_pipeline(source, batch_size=8)
    assert source._ids.array.dtype == np.int32
    monkeypatch.setattr(sources, "index_dtype", lambda n: torch.int64)
    pruner = gp.Pruner(N, keep=0.05, policy="uniform", seed=2)
    source = ArraySource(x, y)
    it = build_iterator(pruner, source, batch_size=64)
    assert source._ids.array.dtype == np.int64
    it.set_epoch(0)
    got = run_epoch(it, x, y, check_chw=False)
    assert_same_batches(got, expected_batches(pruner.plan(0).indices, 64, False))


def normalize_graph_3(images, labels, tags):
    return (*normalize_graph(images, labels), tags)


@pytest.mark.parametrize("policy", [PARTIAL, DROP], ids=["partial", "drop"])
def test_finding_9_total_steps_sizes_one_cycle_lr(fmnist, policy):
    """OneCycleLR sized from len() at the start raised ("Tried to step...") once later epochs
    were longer; it.total_steps() counts every optimizer step of the run on this rank."""
    x, y = fmnist
    bs, epochs = 100, 4
    for rank in range(2):
        pruner = gp.Pruner(N, keep=0.3, policy="uniform", num_epochs=epochs, final_full_epochs=1,
                           seed=1)
        it = build_iterator(pruner, ArraySource(x, y), batch_size=bs, last_batch_policy=policy,
                            shard_id=rank, num_shards=2)
        total = it.total_steps()
        assert total == pruner.schedule.total_steps(N, pruner.k, bs, world_size=2,
                                                    drop_last=policy == DROP)
        per_epoch = [450 // bs if policy == DROP else 5] * 3 + [15]   # 900/2 pruned, 3000/2 full
        assert total == sum(per_epoch)
        naive = len(it) * epochs                         # what 0.1 users computed at the start
        assert naive < total
        model = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total)
        naive_sched = torch.optim.lr_scheduler.OneCycleLR(
            torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1), max_lr=0.1,
            total_steps=naive)
        steps, naive_error = 0, None
        for epoch in range(epochs):
            it.set_epoch(epoch)
            for (b,) in it:
                opt.step()
                sched.step()
                steps += 1
                try:
                    naive_sched.optimizer.step()
                    naive_sched.step()
                except ValueError as e:
                    naive_error = naive_error or e
        assert steps == total
        assert naive_error is not None and "Tried to step" in str(naive_error)


# ---------------------------------------------------------------- file source
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_file_source_decodes_exactly_the_planned_files(fmnist, png_files, parallel):
    x, y = fmnist[0][:N_FILES], fmnist[1][:N_FILES]
    bs = 32
    sizes = [0, 250, 101, 32]                 # an empty first epoch too
    pruner = scheduled_pruner(sizes, num_samples=N_FILES)
    source = FileSource(png_files, y, output_type=types.GRAY, parallel=parallel)
    it = build_iterator(pruner, source, normalize_graph, batch_size=bs, py_num_workers=2)
    for epoch in range(len(sizes)):
        it.set_epoch(epoch)
        want = expected_batches(pruner.plan(epoch).indices, bs, False)
        assert len(it) == len(want)
        got = run_epoch(it, x, y, stop_after=1 if epoch == 1 and parallel else None)
        if epoch == 1 and parallel:            # an early exit through parallel workers
            assert_same_batches(got, want[:1])
        else:
            assert_same_batches(got, want)


def test_finding_7_file_labels_look_like_the_readers(fmnist, png_files):
    """fn.readers.file gives int32 labels of shape (B, 1); FileSource does too by default, so
    label.squeeze(-1) code keeps working; reader_labels=False keeps the array as given."""
    y = fmnist[1][:N_FILES]
    pruner = gp.Pruner(N_FILES, keep=0.1, policy="uniform", seed=2)
    for reader_labels, dtype, shape in ((True, torch.int32, (32, 1)), (False, torch.int64, (32,))):
        it = build_iterator(pruner, FileSource(png_files, y, output_type=types.GRAY,
                                               reader_labels=reader_labels), batch_size=32)
        it.set_epoch(0)
        (b,) = next(it)
        assert b["label"].dtype == dtype and tuple(b["label"].shape) == shape
        assert np.array_equal(b["label"].reshape(-1).numpy(), y[b["index"].numpy()])
    with pytest.raises(ValueError, match="outside int32"):
        FileSource(png_files, np.full(N_FILES, 2**40))


def test_file_source_reads_paths_of_any_length_and_encoding(tmp_path):
    """FileSource feeds each batch's paths as one NUL-padded byte matrix: short and long paths,
    non-ASCII and nested names in one batch still read exactly their own file."""
    names = ["a.png", "x" * 200 + ".png", "é-ü-中.png", "d/e/f/g.png", "b c.png"]
    paths = []
    for k, name in enumerate(names * 3):
        p = tmp_path / f"{k}" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes([k]) * 48)              # equal lengths: the raw batch is dense
        paths.append(str(p))
    pruner = gp.Pruner(len(paths), policy="full", seed=1)
    for read_kwargs in (None, {"dont_use_mmap": False}):    # plain reads (default), mapped files
        source = FileSource(paths, decoder=None, read_kwargs=read_kwargs)
        assert source.read_kwargs["dont_use_mmap"] is (read_kwargs is None)
        it = build_iterator(pruner, source, batch_size=6, output_map=["data"])
        seen = []
        for (b,) in it:
            want = np.repeat(b["index"].numpy().astype(np.uint8)[:, None], 48, axis=1)
            assert np.array_equal(b["data"].numpy(), want)
            seen += b["index"].tolist()
        assert sorted(seen) == list(range(len(paths)))
    with pytest.raises(TypeError, match="read_kwargs must be a dict"):
        FileSource(paths, read_kwargs="dont_use_mmap")


def test_spawned_workers_see_each_new_plan(fmnist, png_files):
    # spawn pickles the source into the workers; the plan must reach them through shared memory
    y = fmnist[1][:N_FILES]
    sizes = [200, 0, 75]
    pruner = scheduled_pruner(sizes, num_samples=N_FILES)
    source = FileSource(png_files, y, output_type=types.GRAY, parallel=True)
    it = build_iterator(pruner, source, batch_size=32, py_num_workers=1, py_start_method="spawn")
    for epoch in range(len(sizes)):
        it.set_epoch(epoch)
        got = [b["index"].numpy() for (b,) in it]
        assert_same_batches(got, expected_batches(pruner.plan(epoch).indices, 32, False))


def _files_with_bad(png_files, tmp_path, missing=(), corrupt=(), empty=()):
    paths = list(png_files)
    for i in missing:
        paths[i] = str(tmp_path / f"missing_{i}.png")
    for i in corrupt:
        p = tmp_path / f"corrupt_{i}.png"
        p.write_bytes(Path(png_files[i]).read_bytes()[:40])         # a truncated PNG
        paths[i] = str(p)
    for i in empty:
        p = tmp_path / f"empty_{i}.png"
        p.write_bytes(b"")
        paths[i] = str(p)
    return paths


@pytest.fixture(scope="module")
def npy_files(fmnist, tmp_path_factory):
    """The first 300 images as .npy files (for fn.decoders.numpy)."""
    root = tmp_path_factory.mktemp("fmnist_npy")
    paths = []
    for i in range(300):
        paths.append(str(root / f"{i:05d}.npy"))
        np.save(paths[-1], fmnist[0][i, :, :, 0])
    return paths


def _assert_names_the_sample(err, paths, bad, what):
    assert err.index == bad and err.path == paths[bad]
    assert repr(paths[bad]) in str(err) and f"sample index {bad}" in str(err)
    assert f"cannot {what} file" in str(err)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_unreadable_file_raises_naming_the_file_and_the_sample(fmnist, png_files, tmp_path,
                                                               parallel):
    y = fmnist[1][:N_FILES]
    bad = 123
    paths = _files_with_bad(png_files, tmp_path, missing=[bad])
    pruner = gp.Pruner(N_FILES, policy="full")
    source = FileSource(paths, y, output_type=types.GRAY, parallel=parallel)
    it = build_iterator(pruner, source, batch_size=64, py_num_workers=2)
    with pytest.raises(BadSampleError) as info:       # DALI's read error, traced to the file
        for _ in it:
            pass
    _assert_names_the_sample(info.value, paths, bad, "read")
    assert "epoch 0" in str(info.value)
    with pytest.raises(RuntimeError, match="stopped after an error"):
        next(it)


def test_undecodable_file_found_after_a_dali_decoder_error(fmnist, npy_files, tmp_path):
    x = fmnist[0][:300, :, :, 0]
    bad = 201
    paths = list(npy_files)
    paths[bad] = str(tmp_path / "broken.npy")
    Path(paths[bad]).write_bytes(Path(npy_files[bad]).read_bytes()[:30])     # truncated header
    pruner = gp.Pruner(300, policy="full")
    it = build_iterator(pruner, FileSource(paths, decoder="numpy"), batch_size=32,
                        output_map=["data"])
    with pytest.raises(BadSampleError) as info:
        for (b,) in it:
            assert np.array_equal(b["data"].numpy(), x[b["index"].numpy()])
    _assert_names_the_sample(info.value, paths, bad, "decode")


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_verify_catches_an_undecodable_image_before_dali(fmnist, png_files, tmp_path, parallel):
    y = fmnist[1][:N_FILES]
    bad = 77
    paths = _files_with_bad(png_files, tmp_path, corrupt=[bad])
    pruner = gp.Pruner(N_FILES, policy="full")
    source = FileSource(paths, y, output_type=types.GRAY, verify=True, parallel=parallel)
    it = build_iterator(pruner, source, batch_size=64, py_num_workers=2)
    with pytest.raises(BadSampleError) as info:
        for _ in it:
            pass
    _assert_names_the_sample(info.value, paths, bad, "decode")


_FORK_SCENARIO = """
import json, sys
import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
import gpuprune as gp
from gpuprune.dali import FileSource, build_iterator
paths = json.load(open(sys.argv[1]))
for trial in range(3):
    junk = Pipeline(batch_size=4, num_threads=1, device_id=None)
    with junk:
        junk.set_outputs(fn.random.uniform(range=[0, 1], shape=[2]))
    junk.build()
    junk.run()
    junk.cycle = junk                       # only the cycle collector can free it
    del junk
    pruner = gp.Pruner(len(paths), policy="full", seed=trial)
    source = FileSource(paths, np.zeros(len(paths), np.int64), output_type=types.GRAY,
                        on_error="skip", parallel=True)
    it = build_iterator(pruner, source, batch_size=16, py_num_workers=1)
    for epoch in range(2):
        it.set_epoch(epoch)
        served = sorted(i for (b,) in it for i in b["index"].tolist())
        assert served == list(range(len(paths))), served
    print("trial", trial, "ok", flush=True)
"""


def test_forked_workers_do_not_inherit_pipelines_awaiting_collection(png_files, tmp_path):
    """A pipeline in a reference cycle, unreachable but not yet collected when the iterator forks
    DALI's Python workers, used to be collected inside a worker, whose finaliser then shut down a
    pipeline the worker does not own: the worker died (a segfault in DALI 2.4), and the training
    process failed with "Worker data receiving interrupted" or hung (4 of 5 trials before the fix).
    The iterator collects such garbage before it forks. Run in a child process with a time limit,
    so a regression fails instead of hanging the suite."""
    listing = tmp_path / "paths.json"
    listing.write_text(json.dumps(png_files[:64]))
    try:
        r = subprocess.run([sys.executable, "-c", _FORK_SCENARIO, str(listing)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=180,
                           env={**os.environ, "PYTHONPATH": str(Path(gp.__file__).parents[1])})
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the pipeline hung (a forked worker died?): {e.stdout} {e.stderr}")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.split("\n")[:3] == [f"trial {t} ok" for t in range(3)]


def test_a_graph_error_is_reraised_unchanged(fmnist):
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.1, policy="uniform")
    it = build_iterator(pruner, ArraySource(x, y), lambda a, b: (fn.reshape(a, shape=[5]), b),
                        batch_size=32)
    with pytest.raises(RuntimeError, match="reshape") as info:
        next(it)
    assert not isinstance(info.value, BadSampleError)
    with pytest.raises(RuntimeError, match="stopped after an error"):
        it.set_epoch(1)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_skip_mode_drops_bad_samples_from_their_batch(fmnist, png_files, tmp_path, parallel):
    x, y = fmnist[0][:N_FILES], fmnist[1][:N_FILES]
    bs = 40
    paths = _files_with_bad(png_files, tmp_path, missing=[5], corrupt=[77, 78], empty=[400])
    bad = {5: "unreadable", 77: "undecodable", 78: "undecodable", 400: "undecodable"}
    pruner = gp.Pruner(N_FILES, policy="full")
    source = FileSource(paths, y, output_type=types.GRAY, on_error="skip", parallel=parallel)
    it = build_iterator(pruner, source, normalize_graph, batch_size=bs, py_num_workers=2)
    for epoch in range(2):
        it.set_epoch(epoch)
        want = expected_batches(pruner.plan(epoch).indices, bs, False)
        assert len(it) == len(want)
        got = run_epoch(it, x, y)
        assert len(got) == len(want)                            # boundaries kept, batches shrink
        for g, w in zip(got, want):
            assert np.array_equal(g, np.array([i for i in w if i not in bad], np.int64))
        assert {i: r for i, (_, r) in it.bad_samples.items()} == bad
        assert all(it.bad_samples[i][0] == paths[i] for i in bad)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_issue_11_finding_10_skip_means_skip_in_every_epoch(fmnist, png_files, tmp_path, parallel):
    """A file that read fine in epoch 0 is deleted, another truncated, before epoch 1: epoch 1
    skips both and records them (0.1: BadSampleError from DALI, bad_samples empty); a file
    repaired before epoch 2 is served again."""
    x, y = fmnist[0][:200], fmnist[1][:200]
    paths = []
    for i in range(200):                                   # private copies we may damage
        paths.append(str(tmp_path / f"{i:05d}.png"))
        shutil.copyfile(png_files[i], paths[-1])
    gone, broken = 17, 130
    pruner = gp.Pruner(200, policy="full")
    source = FileSource(paths, y, output_type=types.GRAY, on_error="skip", parallel=parallel)
    it = build_iterator(pruner, source, normalize_graph, batch_size=32, py_num_workers=2)
    it.set_epoch(0)
    assert sum(len(b) for b in run_epoch(it, x, y)) == 200 and it.bad_samples == {}
    good_bytes = Path(paths[broken]).read_bytes()
    os.remove(paths[gone])
    Path(paths[broken]).write_bytes(good_bytes[:50])
    for epoch, bad in ((1, {gone: "unreadable", broken: "undecodable"}), (2, {gone: "unreadable"})):
        if epoch == 2:
            Path(paths[broken]).write_bytes(good_bytes)           # repaired
        it.set_epoch(epoch)
        got = run_epoch(it, x, y)
        want = expected_batches(pruner.plan(epoch).indices, 32, False)
        assert_same_batches(got, [w[~np.isin(w, list(bad))] for w in want])
        assert {i: r for i, (_, r) in it.bad_samples.items()} == bad


def test_skip_mode_rejects_a_batch_with_no_good_sample(fmnist, png_files, tmp_path):
    y = fmnist[1][:8]
    paths = _files_with_bad(png_files[:8], tmp_path, missing=range(8))
    pruner = gp.Pruner(8, policy="full")
    it = build_iterator(pruner, FileSource(paths, y, on_error="skip"), batch_size=4)
    with pytest.raises(BadSampleError, match="every sample of a batch is bad"):
        next(it)


def test_file_root_finds_files_and_labels_like_the_reader(fmnist, png_files, tmp_path):
    """FileSource(file_root=...) applies fn.readers.file's discovery rule: sorted class folders
    (labels 0, 1, ...), sorted files matching the default filters (case-insensitive)."""
    from gpuprune.dali import discover_files
    root = tmp_path / "root"
    layout = {"b_cls": ["z.png", "A.PNG", "m.Png"], "a_cls": ["2.png", "10.png"],
              "c_cls": ["skip.txt"], "d_cls": ["x.jpeg"]}
    for cls, names in layout.items():
        (root / cls).mkdir(parents=True)
        for k, name in enumerate(names):
            shutil.copyfile(png_files[k], root / cls / name)
    (root / "top.png").write_bytes(b"")                       # files in the root are not read
    paths, labels = discover_files(root)
    rel = [os.path.relpath(p, root) for p in paths]
    assert rel == ["a_cls/10.png", "a_cls/2.png", "b_cls/A.PNG", "b_cls/m.Png", "b_cls/z.png",
                   "d_cls/x.jpeg"]
    assert labels.tolist() == [0, 0, 1, 1, 1, 3] and labels.dtype == np.int32
    assert discover_files(root, case_sensitive_filter=True)[0][2:4] == [str(root / "b_cls/z.png"),
                                                                        str(root / "d_cls/x.jpeg")]
    source = FileSource(file_root=root, decoder=None)
    assert source.files == paths
    with pytest.raises(ValueError, match="not both"):
        FileSource(paths, file_root=root)
    with pytest.raises(ValueError, match="not a directory"):
        FileSource(file_root=tmp_path / "nope")


# ---------------------------------------------------------------- user-built pipelines, checks
def test_user_pipeline_with_pipeline_def(fmnist):
    x, y = fmnist
    source = ArraySource(x, y, layouts=("HWC", None))

    @pipeline_def(batch_size=100, num_threads=2, device_id=None)
    def pipe():
        images, labels = source.outputs()
        return fn.flip(images, horizontal=1), labels

    pruner = gp.Pruner(N, keep=0.1, policy="uniform", seed=8)
    it = PrunedDALIIterator(pipe(), ["data", "label"], pruner=pruner, source=source)
    for (b,) in it:
        idx = b["index"].numpy()
        assert np.array_equal(b["data"].numpy(), x[idx][:, :, ::-1])
        assert np.array_equal(b["label"].numpy(), y[idx])


def test_bad_arguments_are_rejected(fmnist, png_files):
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.5)
    with pytest.raises(ValueError, match="3000 samples.*holds 600|plans 3000"):
        build_iterator(pruner, FileSource(png_files), batch_size=8, output_map=["data"])
    with pytest.raises(ValueError, match="outputs but output_map"):
        build_iterator(pruner, ArraySource(x, y), batch_size=8, output_map=["data"])
    with pytest.raises(ValueError, match=r"^shard_id must be <= 1, got shard_id=2$"):
        build_iterator(pruner, ArraySource(x, y), batch_size=8, shard_id=2, num_shards=2)
    with pytest.raises(ValueError, match=r"^shard_id must be <= 0, got shard_id=1$"):   # 1 shard
        build_iterator(pruner, ArraySource(x, y), batch_size=8, shard_id=1)
    with pytest.raises(TypeError, match=r"^num_shards must be an int, got str '2'$"):
        build_iterator(pruner, ArraySource(x, y), batch_size=8, num_shards="2")
    with pytest.raises(TypeError, match="shuffle must be a bool"):
        build_iterator(pruner, ArraySource(x, y), batch_size=8, shuffle="no")
    with pytest.raises(ValueError, match="first dimension"):
        ArraySource(x, y[:10])
    with pytest.raises(ValueError, match="layout 'HW'"):
        ArraySource(x, y, layouts=("HW", None))
    with pytest.raises(ValueError, match="on_error"):
        FileSource(png_files, on_error="ignore")
    with pytest.raises(TypeError, match="single path"):
        FileSource(png_files[0])
    with pytest.raises(TypeError, match="files .* or file_root"):
        FileSource()
    source = ArraySource(x, y)
    pipe = build_pipeline(source, batch_size=8)
    with pytest.raises(ValueError, match="index_name='index' is added by the iterator"):
        PrunedDALIIterator(pipe, ["data", "index"], pruner=pruner, source=source)
    with pytest.raises(ValueError, match="takes one pipeline"):
        PrunedDALIIterator([pipe, pipe], ["data", "label"], pruner=pruner, source=source)
    with pytest.raises(RuntimeError, match="already feeds a pipeline"):
        build_pipeline(source, batch_size=8)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        PrunedDALIIterator(pipe, ["data", "label"], pruner=pruner, source=source).set_epoch(-1)


def test_pipeline_run_directly_without_the_iterator_explains_itself(fmnist):
    x, y = fmnist
    pipe = build_pipeline(ArraySource(x, y), batch_size=8)
    with pytest.raises(Exception, match="PrunedDALIIterator"):
        pipe.run()


def test_verify_with_mixed_decoding_in_parallel_workers_is_refused(png_files):
    """verify decodes with the pipeline's decoder on its device; DALI's parallel workers cannot use
    the GPU decoder, so the combination is refused when the graph is defined (the GPU paths
    themselves are in test_dali_gpu.py)."""
    source = FileSource(png_files, verify=True, parallel=True, decoder_device="mixed")
    with pytest.raises(ValueError, match="verify with decoder_device='mixed'.*parallel=False"):
        build_pipeline(source, batch_size=8)
    cpu = FileSource(png_files, verify=True, parallel=True, decoder_device="cpu")
    assert build_pipeline(cpu, batch_size=8).max_batch_size == 8       # the CPU decoder is fine
