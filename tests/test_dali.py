"""DALI integration on real pipelines (CPU, device_id=None) and real data (Fashion-MNIST).

Every test runs actual DALI pipelines: in-memory arrays and PNG files written from the same images,
serial and parallel external sources, PARTIAL and DROP, early exits, shards, restarts, bad files.
GPU variants are marked ``gpu`` and skip without CUDA.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, types  # noqa: E402

import gpuprune as gp  # noqa: E402
from gpuprune.dali import (ArraySource, BadSampleError, FileSource, LastBatchPolicy,  # noqa: E402
                           PrunedDALIIterator, build_iterator, build_pipeline)
from gpuprune.policies import Policy, Selection  # noqa: E402
from gpuprune.rng import draw_seeds, epoch_generator  # noqa: E402
from gpuprune.select import random_k  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")
N = 3000          # samples used from the training set
N_FILES = 600     # of which this many are written as PNG files
PARTIAL, DROP = LastBatchPolicy.PARTIAL, LastBatchPolicy.DROP
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
    """A random subset whose size follows a per-epoch schedule (0 and odd sizes included).

    The size is looked up from the first draw of the (seed, epoch) generator, so the schedule is a
    pure function of the epoch and survives a checkpoint like any built-in policy.
    """

    name = "scheduled_sizes"
    exact_k = False

    def __init__(self, seed: int, sizes: list[int]) -> None:
        self.sizes = list(sizes)
        self._by_draw = {draw_seeds(epoch_generator(seed, e), 1)[0]: s for e, s in enumerate(sizes)}

    def select(self, bank, k, generator):
        (draw,) = draw_seeds(generator, 1)
        return Selection(random_k(bank.num_samples, self._by_draw[draw], draw ^ 0x5EED, bank.device))


def scheduled_pruner(sizes, num_samples=N, seed=3) -> gp.Pruner:
    return gp.Pruner(num_samples, policy=ScheduledSizes(seed, sizes), seed=seed)


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
        assert np.array_equal(b["label"].numpy(), y[idx])
        want = x[idx].transpose(0, 3, 1, 2) if check_chw else x[idx]
        assert np.array_equal(b["data"].numpy(), want.astype(b["data"].numpy().dtype))
        assert b["weight"].shape == b["index"].shape
        batches.append(idx)
        if stop_after is not None and k + 1 == stop_after:
            break
    return batches


def expected_batches(plan_ids: torch.Tensor, bs: int, drop: bool) -> list[np.ndarray]:
    ids = plan_ids.numpy()
    n = (len(ids) // bs) * bs if drop else len(ids)
    return [ids[i:min(i + bs, n)] for i in range(0, n, bs)]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert np.array_equal(g, w)


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


def test_epochs_count_up_without_set_epoch_and_len_plans_ahead(fmnist):
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.1, policy="uniform", seed=5)
    it = build_iterator(pruner, ArraySource(x, y), batch_size=128)
    assert it.epoch == 0
    for epoch in range(3):
        n = len(it)                                             # plans the coming epoch
        assert n == -(-pruner.k // 128)
        got = run_epoch(it, x, y, check_chw=False)
        assert it.epoch == epoch and len(got) == n
        assert_same_batches(got, expected_batches(pruner.plan(epoch).indices, 128, False))
    it.set_epoch(5)                                             # epochs may skip ahead
    assert_same_batches(run_epoch(it, x, y, check_chw=False),
                        expected_batches(pruner.plan(5).indices, 128, False))


def test_next_without_iter_and_auto_reset(fmnist):
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.05, policy="uniform", seed=2)       # 150 samples: 3 batches of 64
    it = build_iterator(pruner, ArraySource(x, y), batch_size=64, auto_reset=True)
    got = []
    for _ in range(3):
        got.append(next(it)[0]["index"].numpy())
    with pytest.raises(StopIteration):
        next(it)
    assert_same_batches(got, expected_batches(pruner.plan(0).indices, 64, False))
    nxt = next(it)[0]["index"].numpy()                          # auto_reset: epoch 1 begins
    assert it.epoch == 1 and np.array_equal(nxt, pruner.plan(1).indices[:64].numpy())


def test_a_peeked_batch_belongs_to_the_epoch_its_loop_finishes(fmnist):
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.05, policy="uniform", seed=6)       # 150 samples: 3 batches
    it = build_iterator(pruner, ArraySource(x, y), batch_size=64)
    first = next(it)[0]["index"].numpy()                        # peek, then loop over the rest
    rest = run_epoch(it, x, y, check_chw=False)
    assert it.epoch == 0
    assert_same_batches([first, *rest], expected_batches(pruner.plan(0).indices, 64, False))
    assert_same_batches(run_epoch(it, x, y, check_chw=False),     # the next loop: epoch 1
                        expected_batches(pruner.plan(1).indices, 64, False))


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_leaving_an_epoch_early_leaks_nothing_into_the_next(fmnist, parallel):
    x, y = fmnist
    bs = 32
    pruner = scheduled_pruner([900, 500, 300, 200, 100], seed=11)
    source = ArraySource(x, y, parallel=parallel, prefetch_queue_depth=3)
    it = build_iterator(pruner, source, batch_size=bs, prefetch_queue_depth=3, py_num_workers=2)
    # epoch 0: break after 2 batches; the plain for loop of epoch 1 must start clean
    got = run_epoch(it, x, y, stop_after=2, check_chw=False)
    assert_same_batches(got, expected_batches(pruner.plan(0).indices, bs, False)[:2])
    assert len(it) == -(-900 // bs)    # the left pass is still the current one until iter()
    got = run_epoch(it, x, y, check_chw=False)
    assert it.epoch == 1
    assert_same_batches(got, expected_batches(pruner.plan(1).indices, bs, False))
    # epoch 2: leave after 1 batch, then set_epoch(3); epoch 3 via reset() after 0 batches consumed
    run_epoch(it, x, y, stop_after=1, check_chw=False)
    it.set_epoch(3)
    assert len(it) == -(-200 // bs)
    iter(it)
    it.reset()                   # an epoch started and left before any batch
    got = run_epoch(it, x, y, check_chw=False)
    assert it.epoch == 4
    assert_same_batches(got, expected_batches(pruner.plan(4).indices, bs, False))


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
import json, sys
import numpy as np, torch, torch.distributed as dist
import gpuprune as gp
from gpuprune.dali import ArraySource, build_iterator
rank, world, port, data, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
x, y = np.load(data + "_x.npy"), np.load(data + "_y.npy")
pruner = gp.Pruner(len(x), keep=0.3, policy="ucb", seed=7)          # synchronised over the group
it = build_iterator(pruner, ArraySource(x, y), batch_size=32, shard_id=rank, num_shards=world)
record = []
for epoch in range(3):
    it.set_epoch(epoch)
    steps, got = len(it), []
    for (b,) in it:
        assert np.array_equal(b["label"].numpy(), y[b["index"].numpy()])
        loss = ((b["index"] * 2654435761 + epoch * 97) % 1000).float() / 100.0
        pruner.observe(b["index"], loss)
        got.append(b["index"].tolist())
    record.append({"plan": pruner.plan(epoch).indices.tolist(), "steps": steps, "batches": got})
json.dump(record, open(out, "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_ranks_of_a_gloo_group_split_each_plan(fmnist, tmp_path):
    """Two real processes (torch.distributed, gloo): same plans, equal steps, shards cover the plan."""
    import socket
    x, y = fmnist[0][:1000], fmnist[1][:1000]
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
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", str(port),
                               str(tmp_path / "d"), str(tmp_path / f"r{r}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    ranks = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    for epoch in range(3):
        plan = ranks[0][epoch]["plan"]
        assert ranks[1][epoch]["plan"] == plan                   # every rank planned alike
        assert ranks[0][epoch]["steps"] == ranks[1][epoch]["steps"]
        for r in range(2):
            shard = gp.Plan(epoch, torch.tensor(plan), None, False, 1000).shard(r, 2).indices
            flat = [i for batch in ranks[r][epoch]["batches"] for i in batch]
            assert flat == shard.tolist()
            assert len(ranks[r][epoch]["batches"]) == ranks[r][epoch]["steps"]
        both = [i for r in range(2) for batch in ranks[r][epoch]["batches"] for i in batch]
        assert set(both) == set(plan) and len(both) == len(plan)   # 300 = 2 * 150: no padding


def test_weight_output_is_the_plans_loss_weight(fmnist):
    x, y = fmnist
    pruner = gp.Pruner(N, prune_ratio=0.5, policy="infobatch", num_epochs=8, seed=4)
    it = build_iterator(pruner, ArraySource(x, y), batch_size=100)
    losses = torch.from_numpy((np.arange(N) % 7).astype(np.float32))
    for epoch in range(2):
        plan = pruner.plan(epoch)
        table = torch.ones(N)
        if plan.weights is not None:
            table[plan.indices] = plan.weights
        for (b,) in it:
            idx = b["index"]
            assert torch.equal(b["weight"], table[idx])
            loss = pruner.observe(idx, losses[idx])
            assert torch.allclose(loss, (losses[idx] * b["weight"]).mean())
    assert plan.weights is not None and (plan.weights == 2.0).any()   # epoch 1 rescales


# ---------------------------------------------------------------- restart
def _loss_of(idx: torch.Tensor, epoch: int) -> torch.Tensor:
    return ((idx * 2654435761 + epoch * 97) % 1000).float() / 100.0


def test_state_dict_resumes_mid_epoch_exactly(fmnist):
    x, y = fmnist
    bs, epochs, stop = 50, 4, (1, 4)          # interrupt after 4 batches of epoch 1

    def make():
        pruner = gp.Pruner(N, keep=0.2, policy="ucb", seed=9)
        return pruner, build_iterator(pruner, ArraySource(x, y), batch_size=bs)

    def train(pruner, it, record, until=None):
        for epoch in range(it.epoch, epochs):
            it.set_epoch(epoch)
            for (b,) in it:
                pruner.observe(b["index"], _loss_of(b["index"], epoch))
                record.append((epoch, b["index"].numpy()))
                if until == (epoch, it.state_dict()["batch"]):
                    return

    ref_pruner, ref_it = make()
    ref = []
    train(ref_pruner, ref_it, ref)

    pruner, it = make()
    got = []
    train(pruner, it, got, until=stop)
    state = {"pruner": pruner.state_dict(), "it": it.state_dict()}
    assert state["it"]["epoch"] == 1 and state["it"]["batch"] == 4
    del pruner, it
    pruner, it = make()                       # a fresh pipeline, as after a restart
    pruner.load_state_dict(state["pruner"])
    it.load_state_dict(state["it"])
    assert it.epoch == 1 and len(it) == -(-len(pruner.plan(1)) // bs) - 4
    train(pruner, it, got)
    assert [e for e, _ in got] == [e for e, _ in ref]
    for (_, g), (_, r) in zip(got, ref):
        assert np.array_equal(g, r)


def test_state_at_an_epoch_boundary_points_at_the_next_epoch(fmnist):
    x, y = fmnist
    pruner = gp.Pruner(N, keep=0.05, policy="uniform", seed=1)
    it = build_iterator(pruner, ArraySource(x, y), batch_size=64)
    run_epoch(it, x, y, check_chw=False)
    assert it.state_dict()["epoch"] == 1 and it.state_dict()["batch"] == 0
    with pytest.raises(ValueError, match="batch_size"):
        it.load_state_dict({**it.state_dict(), "batch_size": 32})
    it2 = build_iterator(pruner, ArraySource(x, y), batch_size=64)
    it2.load_state_dict(it.state_dict())
    assert_same_batches(run_epoch(it2, x, y, check_chw=False),
                        expected_batches(pruner.plan(1).indices, 64, False))


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


def test_spawned_workers_see_each_new_plan(fmnist, png_files):
    # spawn pickles the source into the workers; the plan must reach them through shared memory
    y = fmnist[1][:N_FILES]
    sizes = [200, 0, 75]
    pruner = scheduled_pruner(sizes, num_samples=N_FILES)
    source = FileSource(png_files, y, output_type=types.GRAY, parallel=True)
    it = build_iterator(pruner, source, batch_size=32, py_num_workers=1, py_start_method="spawn")
    for epoch in range(len(sizes)):
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
        want = expected_batches(pruner.plan(epoch).indices, bs, False)
        assert len(it) == len(want)
        got = run_epoch(it, x, y)
        assert len(got) == len(want)                            # boundaries kept, batches shrink
        for g, w in zip(got, want):
            assert np.array_equal(g, np.array([i for i in w if i not in bad], np.int64))
        assert {i: r for i, (_, r) in it.bad_samples.items()} == bad
        assert all(it.bad_samples[i][0] == paths[i] for i in bad)


def test_skip_mode_rejects_a_batch_with_no_good_sample(fmnist, png_files, tmp_path):
    y = fmnist[1][:8]
    paths = _files_with_bad(png_files[:8], tmp_path, missing=range(8))
    pruner = gp.Pruner(8, policy="full")
    it = build_iterator(pruner, FileSource(paths, y, on_error="skip"), batch_size=4)
    with pytest.raises(BadSampleError, match="every sample of a batch is bad"):
        next(it)


# ---------------------------------------------------------------- user-built pipelines, checks
def test_user_pipeline_with_pipeline_def(fmnist):
    from nvidia.dali import pipeline_def
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
    with pytest.raises(ValueError, match="last_batch_policy"):
        build_iterator(pruner, ArraySource(x, y), batch_size=8, last_batch_policy=LastBatchPolicy.FILL)
    with pytest.raises(ValueError, match="3000 samples.*holds 600|plans 3000"):
        build_iterator(pruner, FileSource(png_files), batch_size=8, output_map=["data"])
    with pytest.raises(ValueError, match="outputs but output_map"):
        build_iterator(pruner, ArraySource(x, y), batch_size=8, output_map=["data"])
    with pytest.raises(ValueError, match="shard_id must be <= 1"):
        build_iterator(pruner, ArraySource(x, y), batch_size=8, shard_id=2, num_shards=2)
    with pytest.raises(ValueError, match="first dimension"):
        ArraySource(x, y[:10])
    with pytest.raises(ValueError, match="layout 'HW'"):
        ArraySource(x, y, layouts=("HW", None))
    with pytest.raises(ValueError, match="on_error"):
        FileSource(png_files, on_error="ignore")
    with pytest.raises(TypeError, match="single path"):
        FileSource(png_files[0])
    source = ArraySource(x, y)
    pipe = build_pipeline(source, batch_size=8)
    with pytest.raises(ValueError, match="index_name='index' is added by the iterator"):
        PrunedDALIIterator(pipe, ["data", "index"], pruner=pruner, source=source)
    with pytest.raises(RuntimeError, match="already feeds a pipeline"):
        build_pipeline(source, batch_size=8)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        PrunedDALIIterator(pipe, ["data", "label"], pruner=pruner, source=source).set_epoch(-1)


def test_pipeline_run_directly_without_the_iterator_explains_itself(fmnist):
    x, y = fmnist
    pipe = build_pipeline(ArraySource(x, y), batch_size=8)
    with pytest.raises(Exception, match="PrunedDALIIterator"):
        pipe.run()


# ---------------------------------------------------------------- GPU (not run on CPU machines)
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", ["torch", "cupy"])
def test_gpu_array_source_gathers_on_the_device(fmnist, kind):
    x, y = fmnist
    if kind == "cupy":
        cp = pytest.importorskip("cupy")
        xs, ys = cp.asarray(x), cp.asarray(y)
    else:
        xs, ys = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
    pruner = gp.Pruner(N, keep=0.3, policy="ucb", seed=0, device="cuda")
    source = ArraySource(xs, ys, layouts=("HWC", None))
    assert source.device == "gpu"
    it = build_iterator(pruner, source, normalize_graph, batch_size=64, device_id=0,
                        last_batch_policy=PARTIAL)
    for epoch in range(3):
        it.set_epoch(epoch)
        got = []
        for (b,) in it:
            assert b["data"].is_cuda and b["index"].is_cuda and b["weight"].is_cuda
            assert b["data"].device.index == 0
            idx = b["index"].cpu().numpy()
            assert np.array_equal(b["label"].cpu().numpy(), y[idx])
            assert np.array_equal(b["data"].cpu().numpy(), x[idx].transpose(0, 3, 1, 2).astype(np.float32))
            pruner.observe(b["index"], _loss_of(b["index"], epoch).cuda())
            got.append(idx)
            if epoch == 1 and len(got) == 2:
                break
        want = expected_batches(pruner.plan(epoch).indices.cpu(), 64, False)
        assert_same_batches(got, want[:2] if epoch == 1 else want)


@pytest.mark.gpu
@cuda
def test_gpu_file_source_decodes_with_mixed_backend(fmnist, png_files):
    x, y = fmnist[0][:N_FILES], fmnist[1][:N_FILES]
    pruner = gp.Pruner(N_FILES, keep=0.5, policy="uniform", seed=0, device="cuda")
    source = FileSource(png_files, y, output_type=types.GRAY)
    it = build_iterator(pruner, source, batch_size=32, device_id=0)
    for epoch in range(2):
        got = []
        for (b,) in it:
            assert b["data"].is_cuda and b["index"].is_cuda       # ids on the pruner's device
            idx = b["index"].cpu().numpy()
            assert np.array_equal(b["data"].cpu().numpy(), x[idx])
            got.append(idx)
        assert_same_batches(got, expected_batches(pruner.plan(epoch).indices.cpu(), 32, False))
