"""Read-ahead across epoch boundaries in PrunedDALIIterator, on real CPU pipelines.

When the next epoch's plan is determined before the current epoch's last losses arrive
(``Pruner.peek``: full-data epochs, the uniform/static/full policies, reused selections), the
iterator feeds DALI that epoch's first batches right after the current epoch's last ones, in the
same DALI epoch, so the pipeline never drains and refills between the two. These tests check that:

* read-ahead happens exactly at the boundaries whose plan is determined, and never for
  loss-dependent plans (UCB, InfoBatch's pruned epochs);
* with and without it, every epoch serves exactly its plan, in order, each batch's data being its
  ids' data and produced for that epoch (the source tags every sample with the epoch it was
  gathered for: a read-ahead sample reaching the wrong epoch would show);
* a ``break``, ``set_epoch`` of another epoch, ``reset``, ``load_state_dict`` or a plan that
  differs from the one read ahead fall back to the epoch-by-epoch behaviour, dropping the
  read-ahead (no sample of it leaks);
* short epochs (fewer batches than DALI prefetches), DROP, parallel workers, shards, files that
  cannot be read and skip mode keep working.

The 2-rank gloo group with read-ahead is in ``test_dali.py::test_ranks_of_a_gloo_group_shard_by_
themselves`` (it shares that test's processes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from nvidia.dali import types  # noqa: E402

import gpuprune as gp  # noqa: E402
from gpuprune.dali import (BadSampleError, CallbackSource, FileSource,  # noqa: E402
                           LastBatchPolicy, build_iterator)
from gpuprune.sampler import Position  # noqa: E402

N = 600
PARTIAL, DROP = LastBatchPolicy.PARTIAL, LastBatchPolicy.DROP


@pytest.fixture(scope="module")
def images(fmnist_images):
    return fmnist_images(N)


class Recorder:
    """A batch source over the images that tags each sample with the epoch it was gathered for and
    logs every call (the epoch asked for, in call order)."""

    def __init__(self, x) -> None:
        self.x, self.calls = x, []

    def __call__(self, ids, epoch):
        self.calls.append(epoch)
        return self.x[ids], ids.astype(np.int64), np.full(len(ids), epoch, np.int64)

    def source(self, **kwargs) -> CallbackSource:
        return CallbackSource(self, len(self.x), dtype=[types.UINT8, types.INT64, types.INT64],
                              ndim=[3, 0, 0], layout=["HWC", None, None], **kwargs)


def make(x, pruner, bs=32, **kwargs):
    rec = Recorder(x)
    source_kw = {k: kwargs.pop(k) for k in ("parallel", "prefetch_queue_depth") if k in kwargs}
    it = build_iterator(pruner, rec.source(**source_kw), batch_size=bs, num_threads=1,
                        output_map=["data", "id", "tag"], **kwargs)
    return rec, it


def take(it, x, epoch, limit=None):
    """Iterate (the rest of) a pass: every batch's data is its ids' data, tagged with ``epoch``;
    returns the batches' ids."""
    got = []
    for k, (b,) in enumerate(it):
        idx = b["index"].numpy()
        assert np.array_equal(b["id"].numpy(), idx)
        assert np.array_equal(b["data"].numpy(), x[idx])
        assert (b["tag"].numpy() == epoch).all(), f"a batch of epoch {set(b['tag'].tolist())} " \
                                                  f"reached epoch {epoch}"
        got.append(idx)
        if limit is not None and k + 1 == limit:
            break
    return got


def planned(plan_ids, bs, drop=False, start=0):
    ids = plan_ids.numpy().astype(np.int64)
    n = start + (len(ids) - start) // bs * bs if drop else len(ids)
    return [ids[i:min(i + bs, n)] for i in range(start, n, bs)]


def same(got, want):
    assert len(got) == len(want)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


def losses(idx, epoch):
    return ((idx * 2654435761 + epoch * 97) % 1000).float() / 100.0


def dali_epoch(it) -> int:
    """The DALI pipeline's epoch counter: it moves when the pipeline refills."""
    return it._pipes[0]._epoch_idx


# ---------------------------------------------------------------- when, and that nothing changes
CASES = {     # pruner settings, read-ahead expected into epochs 1, 2, ...
    "uniform": (dict(policy="uniform"), [True] * 4),
    "static": (dict(policy="static"), [True] * 4),
    "full": (dict(policy="full"), [True] * 4),
    "uniform-drop": (dict(policy="uniform"), [True] * 4),
    "ucb": (dict(policy="ucb"), [False] * 4),
    # warm-up, selection, reuse, selection, reuse... then InfoBatch's final full epochs
    "infobatch-interval-2": (dict(policy="infobatch", warmup_epochs=1, selection_interval=2,
                                  final_full_epochs=1), [False, True, False, True]),
    "ucb-warmup-final": (dict(policy="ucb", warmup_epochs=1, final_full_epochs=1),
                         [False, False, False, True]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reads_ahead_exactly_when_the_plan_is_determined_and_serves_the_same_batches(images, case):
    settings, expected = CASES[case]
    epochs, bs = 5, 32
    drop = case.endswith("drop")
    runs = {}
    for read_ahead in (True, False):
        pruner = gp.Pruner(N, keep=0.3, num_epochs=epochs, seed=3, **settings)
        rec, it = make(images, pruner, bs, read_ahead=read_ahead,
                       last_batch_policy=DROP if drop else PARTIAL)
        batches, ahead, refills, rescaled = [], [], [], []
        for epoch in range(epochs):
            before = dali_epoch(it)
            it.set_epoch(epoch)
            if epoch:
                refills.append(dali_epoch(it) != before)
            plan = pruner.plan(epoch)
            table = torch.ones(N)
            if plan.weights is not None:
                table[plan.indices.long()] = plan.weights
            got = []
            for (b,) in it:
                idx = b["index"]
                assert np.array_equal(b["data"].numpy(), images[idx.numpy()])
                assert (b["tag"].numpy() == epoch).all()
                assert torch.equal(b["weight"], table[idx])     # a read-ahead plan's weights too
                if (b["weight"] != 1).any():
                    rescaled.append(epoch)
                pruner.observe(idx, losses(idx, epoch))
                got.append(idx.numpy())
            same(got, planned(plan.indices, bs, drop))
            batches.append(got)
            if epoch + 1 < epochs:      # did DALI get the next epoch's batches before this ended?
                ahead.append(epoch + 1 in rec.calls)
            assert it.state_dict() == Position.make(epoch + 1, 0, 1, drop)
        assert epochs not in rec.calls                    # never past the last epoch
        runs[read_ahead] = (batches, ahead, refills, rescaled)
    batches, ahead, refills, rescaled = runs[True]
    assert ahead == expected
    assert refills == [not a for a in expected]           # the pipeline refilled only without it
    assert runs[False][1] == [False] * (epochs - 1)       # read_ahead=False never does
    for a, b in zip(batches, runs[False][0]):             # and serves the same batches
        same(a, b)
    if case.startswith("infobatch"):                      # epoch 2 reuses 1's rescaled selection,
        assert 2 in rescaled and ahead[1]                 # read ahead with its loss weights


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("keep, policy", [(0.07, PARTIAL), (0.07, DROP), (0.03, DROP)],
                         ids=["2-batches", "1-batch-drop", "0-batches-drop"])
def test_short_epochs_fewer_batches_than_dali_prefetches(images, keep, policy, parallel):
    """Epochs of 2, 1 and 0 batches (42 or 18 samples, batch 32): no longer than DALI's prefetch
    (2 batches, +2 in parallel workers), so DALI may ask past a read-ahead before its plan can be
    made (peek looks one epoch past the last plan); the iterator then lets the DALI epoch end
    after the read-ahead, and the epoch after it refills. Every epoch still gets its plan."""
    epochs, bs = 6, 32
    pruner = gp.Pruner(N, keep=keep, policy="uniform", num_epochs=epochs, seed=5)
    rec, it = make(images, pruner, bs, last_batch_policy=policy, parallel=parallel,
                   py_num_workers=1)
    drop = policy == DROP
    refills = []
    for epoch in range(epochs):
        before = dali_epoch(it)
        it.set_epoch(epoch)
        if epoch:
            refills.append(dali_epoch(it) != before)
        same(take(it, images, epoch), planned(pruner.plan(epoch).indices, bs, drop))
    if keep == 0.03:
        assert refills == [True] * 5                      # nothing to read ahead
    elif parallel or drop:                                # every other boundary
        assert refills == [False, True, False, True, False]
    else:
        assert refills == [False] * 5                     # 2 batches: time to peek each time


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_empty_passes_then_one_batch_epochs(images, parallel):
    """40 samples, batch 32, DROP: four pruned epochs of 20 samples (0 batches), then two full
    epochs of 1 batch. The empty pass of epoch 3 reads epoch 4 ahead before DALI starts; DALI
    then ends its epoch after that one batch, and epoch 5 must not be appended to it."""
    x = images[:40]
    pruner = gp.Pruner(40, keep=0.5, policy="uniform", num_epochs=6, final_full_epochs=2,
                       seed=1)
    rec, it = make(x, pruner, 32, last_batch_policy=DROP, parallel=parallel, py_num_workers=1)
    sizes = []
    for epoch in range(6):
        it.set_epoch(epoch)
        got = take(it, x, epoch)
        same(got, planned(pruner.plan(epoch).indices, 32, drop=True))
        sizes.append(len(got))
    assert sizes == [0, 0, 0, 0, 1, 1]


# ---------------------------------------------------------------- falling back
def _near_the_end(images, bs=32, **kwargs):
    """A uniform pruner (300 of 600 per epoch: 10 batches) and an iterator that has read epoch 1
    ahead: 9 of epoch 0's batches taken."""
    pruner = gp.Pruner(N, keep=0.5, policy="uniform", num_epochs=6, seed=7, **kwargs)
    rec, it = make(images, pruner, bs)
    it.set_epoch(0)
    head = take(it, images, 0, limit=9)
    assert 1 in rec.calls                                 # epoch 1 is in flight
    return pruner, rec, it, head


def test_break_then_continue_keeps_the_read_ahead(images):
    pruner, _, it, head = _near_the_end(images)
    rest = take(it, images, 0)                            # the loop after a break continues
    same(head + rest, planned(pruner.plan(0).indices, 32))
    before = dali_epoch(it)
    it.set_epoch(1)
    same(take(it, images, 1), planned(pruner.plan(1).indices, 32))
    assert dali_epoch(it) == before                       # no refill


def test_break_then_set_epoch_drops_the_rest_and_the_read_ahead(images):
    for nxt in (1, 3):
        pruner, _, it, _ = _near_the_end(images)
        before = dali_epoch(it)
        it.set_epoch(nxt)                                 # take tags: nothing of 0 or 1 leaks
        same(take(it, images, nxt), planned(pruner.plan(nxt).indices, 32))
        assert dali_epoch(it) == before + 1               # drained, refilled


def test_finished_epoch_then_another_epoch_drops_the_read_ahead(images):
    pruner, _, it, _ = _near_the_end(images)
    take(it, images, 0)
    it.set_epoch(3)                                       # skip ahead: epoch 1's batches dropped
    same(take(it, images, 3), planned(pruner.plan(3).indices, 32))
    it.set_epoch(4)
    same(take(it, images, 4), planned(pruner.plan(4).indices, 32))


def test_reset_after_a_finished_epoch_keeps_the_read_ahead_and_mid_epoch_drops_it(images):
    pruner, _, it, _ = _near_the_end(images)
    take(it, images, 0)
    before = dali_epoch(it)
    it.reset()                                            # DALI's loop-then-reset pattern
    same(take(it, images, 1), planned(pruner.plan(1).indices, 32))
    assert dali_epoch(it) == before
    head = take(it, images, 2, limit=9)                   # epoch 3 now read ahead
    it.reset()                                            # mid-epoch: ends epoch 2
    assert it.state_dict() == Position.make(3, 0, 1, False)
    same(take(it, images, 3), planned(pruner.plan(3).indices, 32))
    assert len(head) == 9


def test_load_state_dict_drops_the_read_ahead(images):
    pruner, _, it, _ = _near_the_end(images)
    take(it, images, 0)
    state = it.state_dict()
    assert state == Position.make(1, 0, 1, False)         # the read-ahead is not a position
    it.load_state_dict(Position.make(1, 64, 1, False))    # resume epoch 1 after 64 samples
    same(take(it, images, 1), planned(pruner.plan(1).indices, 32, start=64))
    # and a saved boundary position restores into a fresh iterator with the same batches
    twin = gp.Pruner(N, keep=0.5, policy="uniform", num_epochs=6, seed=7)
    twin.load_state_dict(pruner.state_dict())
    _, fresh = make(images, twin)
    fresh.load_state_dict(Position.make(2, 0, 1, False))
    it.set_epoch(2)
    same(take(fresh, images, 2), take(it, images, 2))


def test_a_plan_that_differs_from_the_read_ahead_is_served_instead(images):
    """UCB with a full warm-up epoch and selection_interval=2: epoch 2 reuses epoch 1's
    selection, so it is read ahead during epoch 1. Restoring the Pruner from another run (other
    losses, other selection) before set_epoch(2) changes plan(2): the iterator serves the new plan
    and drops what it read ahead. Restoring its own state gives an equal plan (another object):
    the read-ahead is used."""
    def pruner():
        return gp.Pruner(N, keep=0.3, policy="ucb", selection_interval=2, warmup_epochs=1,
                         num_epochs=4, seed=2)

    other = pruner()
    for epoch in range(2):
        p = other.plan(epoch)
        other.observe(p.indices.long(), losses(p.indices.long(), epoch + 100))
    other.synchronize()
    for restore, refill in (("other", True), ("own", False)):
        main = pruner()
        rec, it = make(images, main)
        for epoch in range(2):
            it.set_epoch(epoch)
            for (b,) in it:
                main.observe(b["index"], losses(b["index"], epoch))
        peeked = main.peek(2)
        assert peeked is not None and 2 in rec.calls      # read ahead
        main.load_state_dict(other.state_dict() if restore == "other" else main.state_dict())
        before = dali_epoch(it)
        it.set_epoch(2)
        plan = main.plan(2)
        assert plan is not peeked
        assert torch.equal(plan.indices, peeked.indices) == (restore == "own")
        same(take(it, images, 2), planned(plan.indices, 32))
        assert (dali_epoch(it) != before) == refill


def test_two_shards_in_one_process_read_ahead_their_own_share(images):
    """Two iterators (ranks 0 and 1) over one Pruner: each reads ahead its own shard of the
    next plan (301 samples: PARTIAL pads one sample by wrap-around)."""
    pruner = gp.Pruner(N, keep=0.501, policy="uniform", num_epochs=4, seed=9)
    its = [make(images, pruner, 32, shard_id=r, num_shards=2) for r in range(2)]
    for epoch in range(4):
        shards = []
        for r, (rec, it) in enumerate(its):
            before = dali_epoch(it)
            it.set_epoch(epoch)
            plan = pruner.plan(epoch)
            got = take(it, images, epoch)
            same(got, planned(plan.shard(r, 2).indices, 32))
            shards.append(np.concatenate(got))
            if epoch:
                assert dali_epoch(it) == before           # read ahead on both ranks
        assert len(shards[0]) == len(shards[1]) == 151
        assert set(shards[0]) | set(shards[1]) == set(plan.indices.tolist())


# ---------------------------------------------------------------- files
@pytest.fixture(scope="module")
def png_files(images, tmp_path_factory):
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path_factory.mktemp("readahead_png")
    paths = []
    for i in range(200):
        paths.append(str(root / f"{i:05d}.png"))
        Image.fromarray(images[i, :, :, 0]).save(paths[-1])
    return paths


def test_an_unreadable_file_in_the_read_ahead_is_named_with_its_epoch(images, png_files, tmp_path):
    """A file planned only in epoch 1, in its first batch, is missing. DALI reads it ahead while
    epoch 0 runs and reports the failure when that batch is taken: the error names the file and
    epoch 1 (the iterator searches the read-ahead batches too)."""
    n, bs = 200, 32
    twin = gp.Pruner(n, keep=0.5, policy="uniform", num_epochs=3, seed=4)
    plan0, plan1 = twin.plan(0).indices.tolist(), twin.plan(1).indices.tolist()
    bad = next(i for i in plan1[:bs] if i not in plan0)
    paths = list(png_files)
    paths[bad] = str(tmp_path / "missing.png")
    pruner = gp.Pruner(n, keep=0.5, policy="uniform", num_epochs=3, seed=4)
    it = build_iterator(pruner, FileSource(paths, output_type=types.GRAY), batch_size=bs,
                        output_map=["data"])
    seen = []
    with pytest.raises(BadSampleError) as info:
        for epoch in range(2):
            it.set_epoch(epoch)
            for (b,) in it:
                assert np.array_equal(b["data"].numpy(), images[b["index"].numpy()])
                seen.append((epoch, b["index"].numpy()))
    assert info.value.index == bad and info.value.path == paths[bad]
    assert "epoch 1" in str(info.value)
    same([g for e, g in seen if e == 0], planned(torch.tensor(plan0), bs))
    assert not [g for e, g in seen if e == 1]             # its first batch failed


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_skip_mode_across_a_read_ahead_boundary(images, png_files, tmp_path, parallel):
    """Bad files skipped in the read-ahead batches too (their verdicts are kept per plan slot)."""
    n, bs = 200, 32
    bad = {3: "unreadable", 150: "undecodable"}
    paths = list(png_files)
    paths[3] = str(tmp_path / "gone.png")
    Path(tmp_path / "broken.png").write_bytes(Path(png_files[150]).read_bytes()[:40])
    paths[150] = str(tmp_path / "broken.png")
    pruner = gp.Pruner(n, policy="full", num_epochs=3, seed=1)
    source = FileSource(paths, output_type=types.GRAY, on_error="skip", parallel=parallel)
    it = build_iterator(pruner, source, batch_size=bs, output_map=["data"], py_num_workers=1)
    for epoch in range(3):
        before = dali_epoch(it)
        it.set_epoch(epoch)
        assert epoch == 0 or dali_epoch(it) == before
        got = []
        for (b,) in it:
            idx = b["index"].numpy()
            assert np.array_equal(b["data"].numpy(), images[idx])
            got.append(idx)
        want = planned(pruner.plan(epoch).indices, bs)
        same(got, [w[~np.isin(w, list(bad))] for w in want])
    assert {i: r for i, (_, r) in it.bad_samples.items()} == bad


def test_the_published_schedule_maps_dali_iterations_to_segments():
    """The source's header, hand-computed: DALI iterations 0-2 are epoch 3's batches (entries
    10..99 of slot 0, batch 32), 3-4 epoch 4's (entries 0..49 of slot 1); past them, for a stale
    DALI epoch, after a cut, or in a slot being rewritten: StopIteration."""
    from types import SimpleNamespace as Info

    from gpuprune.dali import sources as S
    h = np.zeros(S._HEADER, np.int64)
    S._clear_header(h)
    h[S._TAG], h[S._BS], h[S._LIMIT] = 7, 32, S._NO_LIMIT
    S._write_slot(h, 0, 7, 3, 10, 100, 3, 0)
    S._write_slot(h, 1, 7, 4, 0, 50, 2, 3)

    def at(it, epoch_idx=7):
        return S._locate(h, Info(iteration=it, epoch_idx=epoch_idx), False, "test")

    assert [at(i) for i in range(5)] == [(0, 10, 42, 3), (0, 42, 74, 3), (0, 74, 100, 3),
                                         (1, 0, 32, 4), (1, 32, 50, 4)]
    for stop in (lambda: at(5), lambda: at(0, epoch_idx=6)):
        with pytest.raises(StopIteration):
            stop()
    with pytest.raises(RuntimeError, match="epoch 8"):
        at(0, epoch_idx=8)
    h[S._slot_at(1) + S._S_SEQ] += 1               # slot 1 half-written
    with pytest.raises(StopIteration):
        at(3)
    assert at(1) == (0, 42, 74, 3)                              # the other slot is unaffected
    h[S._slot_at(1) + S._S_SEQ] += 1
    assert at(4) == (1, 32, 50, 4)
    h[S._LIMIT] = 0                                             # cut
    with pytest.raises(StopIteration):
        at(0)
