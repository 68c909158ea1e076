"""Epoch boundaries of PrunedDALIIterator on real CPU pipelines: each epoch one DALI epoch.

* every epoch serves exactly its plan, in order, each batch's data gathered *for that epoch* (the
  source tags every sample with the epoch it was gathered for: a sample of one epoch reaching
  another would show), for every policy, PARTIAL, DROP and FILL with padding;
* an epoch whose batches were all taken with ``next()`` is finished, whether ``StopIteration`` was
  seen or not (DALI's ``check_autoreset_iter`` pattern, a ``break`` on the last batch);
* a ``break`` followed by ``set_epoch`` of another epoch, ``reset()`` or ``load_state_dict`` drops
  the rest of the epoch: nothing DALI had prefetched of it leaks into the next one;
* the DALI epoch the source is told (the iterator counts the pipeline's resets) is DALI's own;
* a file that cannot be read fails in the epoch that reads it, naming it (issue 22, item 7);
* the published window maps DALI iterations to plan entries as hand-computed, and a reader never
  uses a window that is being rewritten.
"""

from __future__ import annotations

import os
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
PARTIAL, DROP, FILL = LastBatchPolicy.PARTIAL, LastBatchPolicy.DROP, LastBatchPolicy.FILL


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


def planned(plan_ids, bs, policy=PARTIAL, start=0):
    """The batches of a plan from ``start``: short last batch (PARTIAL), dropped (DROP) or
    filled with the last id (FILL)."""
    ids = plan_ids.numpy().astype(np.int64)
    n = len(ids)
    if policy == DROP:
        n = start + (n - start) // bs * bs
    out = [ids[i:min(i + bs, n)] for i in range(start, n, bs)]
    if policy == FILL and out and len(out[-1]) < bs:
        out[-1] = np.concatenate([out[-1], np.full(bs - len(out[-1]), ids[-1])])
    return out


def same(got, want):
    assert len(got) == len(want)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


def losses(idx, epoch):
    return ((idx * 2654435761 + epoch * 97) % 1000).float() / 100.0


def dali_epoch(it) -> int:
    """DALI's own epoch counter (a private field of DALI's Pipeline, read by the test only)."""
    return it._feed.pipe._epoch_idx


# ---------------------------------------------------------------- each epoch its plan
CASES = {
    "uniform": dict(policy="uniform"),
    "ucb": dict(policy="ucb"),
    "infobatch-interval-2": dict(policy="infobatch", warmup_epochs=1, selection_interval=2,
                                 final_full_epochs=1),
    "full": dict(policy="full"),
}


@pytest.mark.parametrize("policy", [PARTIAL, DROP, FILL], ids=["partial", "drop", "fill"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_epoch_serves_its_plan_with_its_weights(images, case, policy):
    """Every epoch's batches are its plan's, gathered for it, with its loss weights; the DALI
    epoch the source is told is DALI's own counter, one reset per epoch."""
    epochs, bs = 5, 32
    pruner = gp.Pruner(N, keep=0.3, num_epochs=epochs, seed=3, **CASES[case])
    rec, it = make(images, pruner, bs, last_batch_policy=policy,
                   last_batch_padded=policy == FILL)
    rescaled = []
    for epoch in range(epochs):
        it.set_epoch(epoch)
        assert it._feed.dali_epoch == dali_epoch(it) == epoch + 1   # DALI epoch 0 was empty
        plan = pruner.plan(epoch)
        table = torch.ones(N)
        if plan.weights is not None:
            table[plan.indices.long()] = plan.weights
        got = []
        for (b,) in it:
            idx = b["index"]
            assert np.array_equal(b["data"].numpy(), images[idx.numpy()])
            assert (b["tag"].numpy() == epoch).all()
            assert torch.equal(b["weight"], table[idx])
            if policy == FILL:
                assert len(idx) == bs                                # every batch full
            if (b["weight"] != 1).any():
                rescaled.append(epoch)
            pruner.observe(idx, losses(idx, epoch))
            got.append(idx.numpy())
        same(got, planned(plan.indices, bs, policy))
        assert it.state_dict() == Position.make(epoch + 1, 0, 1, policy == DROP)
    assert epochs not in rec.calls                        # never past the last epoch
    if case.startswith("infobatch"):
        assert 2 in rescaled                              # epoch 2 reuses 1's rescaled selection


def test_fill_pads_the_last_batch_with_the_last_planned_sample(images):
    """FILL with last_batch_padded (a reader's pad_last_batch): 203 samples at batch 32 give 7
    full batches, the last one 11 planned samples then 21 repeats of the 11th; len, size and the
    position count the plan's samples, not the padding."""
    pruner = gp.Pruner(N, policy="full", seed=1)
    _, it = make(images[:203], gp.Pruner(203, policy="full", seed=1), 32, last_batch_policy=FILL,
                 last_batch_padded=True, shuffle=False)
    assert len(it) == 7 and it.size == 203
    got = take(it, images, 0, limit=6)
    assert it.state_dict() == Position.make(0, 192, 1, False)
    got += take(it, images, 0)
    assert [len(g) for g in got] == [32] * 7
    assert got[-1].tolist() == list(range(192, 203)) + [202] * 21
    assert it.state_dict() == Position.make(1, 0, 1, False)
    with pytest.raises(ValueError, match="FILL.*last_batch_padded=True"):
        make(images, pruner, last_batch_policy=FILL)


# ---------------------------------------------------------------- finished without StopIteration
@pytest.mark.parametrize("auto_reset", [False, True, "yes", "no"])
@pytest.mark.parametrize("policy", [PARTIAL, DROP], ids=["partial", "drop"])
def test_check_autoreset_iter_pattern_runs_epoch_after_epoch(images, auto_reset, policy):
    """DALI's check_autoreset_iter: ``itr = iter(it); for i in range(len(itr)): next(itr)``,
    epoch after epoch, never seeing StopIteration (0.2: the second epoch gave no batch)."""
    pruner = gp.Pruner(N, keep=0.1, policy="uniform", seed=4)      # 60 samples, batch 16
    _, it = make(images, pruner, 16, auto_reset=auto_reset, last_batch_policy=policy)
    for epoch in range(3):
        itr = iter(it)
        assert itr is it and itr.epoch == epoch
        n = len(itr)
        assert n == (3 if policy == DROP else 4)
        got = [next(itr)[0] for _ in range(n)]
        same([b["index"].numpy() for b in got], planned(pruner.plan(epoch).indices, 16, policy))
        assert all((b["tag"] == epoch).all() for b in got)
        assert it.state_dict() == Position.make(epoch + 1, 0, 1, policy == DROP)


def test_break_on_the_last_batch_then_a_for_loop_runs_the_next_epoch(images):
    """A break right after the last batch: the epoch is finished; the next for loop runs the next
    epoch with as many batches as len(it) said (0.2: an empty loop while len(it) said 3)."""
    pruner = gp.Pruner(N, keep=0.1, policy="uniform", seed=5)      # 60 samples: 3 batches of 20+
    _, it = make(images, pruner, 24)
    for k, (b,) in enumerate(it):
        if k == 2:
            break
    assert k == 2 and it.epoch == 0
    assert len(it) == 3 and it.state_dict() == Position.make(1, 0, 1, False)
    got = take(it, images, 1)
    assert len(got) == 3 and it.epoch == 1
    same(got, planned(pruner.plan(1).indices, 24))
    with pytest.raises(StopIteration):                    # the epoch ended: next() says so
        next(it)


def test_next_after_the_last_batch_raises_once_then_auto_reset_starts_the_next_epoch(images):
    pruner = gp.Pruner(N, keep=0.1, policy="uniform", seed=6)
    _, it = make(images, pruner, 32, auto_reset=True)
    first = [next(it)[0]["index"].numpy() for _ in range(2)]
    same(first, planned(pruner.plan(0).indices, 32))
    with pytest.raises(StopIteration):
        next(it)
    assert (next(it)[0]["tag"] == 1).all()                # auto_reset: epoch 1 begins


# ---------------------------------------------------------------- leaving an epoch early
def _mid_epoch(images, bs=32, **kwargs):
    """A uniform pruner (300 of 600 per epoch: 10 batches) and an iterator 3 batches into epoch 0
    (DALI has prefetched more of it)."""
    pruner = gp.Pruner(N, keep=0.5, policy="uniform", num_epochs=6, seed=7, **kwargs)
    rec, it = make(images, pruner, bs)
    it.set_epoch(0)
    head = take(it, images, 0, limit=3)
    assert len(rec.calls) > 3                             # DALI is ahead of the loop
    return pruner, rec, it, head


def test_break_then_continue_keeps_the_epoch(images):
    pruner, _, it, head = _mid_epoch(images)
    rest = take(it, images, 0)                            # the loop after a break continues
    same(head + rest, planned(pruner.plan(0).indices, 32))


@pytest.mark.parametrize("leave", ["set_epoch-next", "set_epoch-later", "reset", "load"])
def test_leaving_an_epoch_drops_its_prefetched_batches(images, leave):
    pruner, rec, it, _ = _mid_epoch(images)
    before = dali_epoch(it)
    if leave == "reset":
        it.reset()
        assert it.state_dict() == Position.make(1, 0, 1, False)
        nxt, start = 1, 0
    elif leave == "load":
        it.load_state_dict(Position.make(0, 64, 1, False))   # back to sample 64 of epoch 0
        nxt, start = 0, 64
    else:
        nxt, start = (1 if leave == "set_epoch-next" else 3), 0
        it.set_epoch(nxt)
    same(take(it, images, nxt), planned(pruner.plan(nxt).indices, 32, start=start))
    assert dali_epoch(it) == before + 1                   # drained, one new DALI epoch


def test_a_restored_position_serves_the_rest_of_its_epoch(images):
    pruner, _, it, _ = _mid_epoch(images)
    state = {"pruner": pruner.state_dict(), "it": it.state_dict()}
    assert state["it"] == Position.make(0, 96, 1, False)
    twin = gp.Pruner(N, keep=0.5, policy="uniform", num_epochs=6, seed=7)
    twin.load_state_dict(state["pruner"])
    _, fresh = make(images, twin)
    fresh.load_state_dict(state["it"])
    assert len(fresh) == 7 and fresh.size == 300 - 96
    same(take(fresh, images, 0), take(it, images, 0))
    for epoch in (1, 2):
        fresh.set_epoch(epoch)
        it.set_epoch(epoch)
        same(take(fresh, images, epoch), take(it, images, epoch))


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("keep, policy", [(0.07, PARTIAL), (0.03, DROP)],
                         ids=["2-batches", "0-batches-drop"])
def test_short_epochs(images, keep, policy, parallel):
    """Epochs of 2 and 0 batches (42 or 18 samples, batch 32): no longer than DALI's prefetch.
    Every epoch gets its plan; an empty one starts no DALI epoch."""
    epochs, bs = 6, 32
    pruner = gp.Pruner(N, keep=keep, policy="uniform", num_epochs=epochs, seed=5)
    rec, it = make(images, pruner, bs, last_batch_policy=policy, parallel=parallel,
                   py_num_workers=1)
    for epoch in range(epochs):
        it.set_epoch(epoch)
        same(take(it, images, epoch), planned(pruner.plan(epoch).indices, bs, policy))
        assert dali_epoch(it) == (0 if keep == 0.03 else epoch + 1)
    if not parallel:                                      # (workers log in their own copy)
        assert rec.calls == [] if keep == 0.03 else set(rec.calls) == set(range(epochs))


def test_two_shards_in_one_process(images):
    """Two iterators (ranks 0 and 1) over one Pruner: each serves its own share (301 samples:
    PARTIAL pads one sample by wrap-around)."""
    pruner = gp.Pruner(N, keep=0.501, policy="uniform", num_epochs=4, seed=9)
    its = [make(images, pruner, 32, shard_id=r, num_shards=2) for r in range(2)]
    for epoch in range(4):
        shards = []
        for r, (_, it) in enumerate(its):
            it.set_epoch(epoch)
            plan = pruner.plan(epoch)
            got = take(it, images, epoch)
            same(got, planned(plan.shard(r, 2).indices, 32))
            shards.append(np.concatenate(got))
        assert len(shards[0]) == len(shards[1]) == 151
        assert set(shards[0]) | set(shards[1]) == set(plan.indices.tolist())


# ---------------------------------------------------------------- files at the boundary
@pytest.fixture(scope="module")
def png_files(images, tmp_path_factory):
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path_factory.mktemp("epochs_png")
    paths = []
    for i in range(200):
        paths.append(str(root / f"{i:05d}.png"))
        Image.fromarray(images[i, :, :, 0]).save(paths[-1])
    return paths


@pytest.mark.parametrize("verify", [False, True], ids=["dali-error", "verify"])
def test_a_file_deleted_during_an_epoch_fails_in_the_epoch_that_reads_it(images, png_files,
                                                                         tmp_path, verify):
    """Issue 22, item 7: a file of epoch 1's first batch (not planned in epoch 0) is deleted
    during epoch 0. Epoch 0 serves all its batches; the error comes in epoch 1, naming the file
    and epoch 1 (0.2, reading ahead: BadSampleError inside epoch 0's loop, its last batches lost)."""
    n, bs = 200, 32
    twin = gp.Pruner(n, keep=0.5, policy="uniform", num_epochs=3, seed=4)
    plan0, plan1 = twin.plan(0).indices.tolist(), twin.plan(1).indices.tolist()
    bad = next(i for i in plan1[:bs] if i not in plan0)
    paths = []
    for i, p in enumerate(png_files):                      # private copies we may delete
        paths.append(str(tmp_path / f"{i:05d}.png"))
        Path(paths[-1]).write_bytes(Path(p).read_bytes())
    pruner = gp.Pruner(n, keep=0.5, policy="uniform", num_epochs=3, seed=4)
    it = build_iterator(pruner, FileSource(paths, output_type=types.GRAY, verify=verify),
                        batch_size=bs, output_map=["data"])
    seen = []
    with pytest.raises(BadSampleError) as info:
        for epoch in range(2):
            it.set_epoch(epoch)
            for k, (b,) in enumerate(it):
                assert np.array_equal(b["data"].numpy(), images[b["index"].numpy()])
                seen.append((epoch, b["index"].numpy()))
                if epoch == 0 and k == 1:
                    os.remove(paths[bad])                  # during epoch 0
    assert info.value.index == bad and info.value.path == paths[bad]
    assert "epoch 1" in str(info.value)
    same([g for e, g in seen if e == 0], planned(torch.tensor(plan0), bs))    # all of epoch 0
    assert not [g for e, g in seen if e == 1]             # its first batch failed


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_skip_mode_over_epochs(images, png_files, tmp_path, parallel):
    """Bad files skipped in every epoch, whether their batch was prefetched or not."""
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
        it.set_epoch(epoch)
        got = []
        for (b,) in it:
            idx = b["index"].numpy()
            assert np.array_equal(b["data"].numpy(), images[idx])
            got.append(idx)
        want = planned(pruner.plan(epoch).indices, bs)
        same(got, [w[~np.isin(w, list(bad))] for w in want])
    assert {i: r for i, (_, r) in it.bad_samples.items()} == bad


# ---------------------------------------------------------------- the published window
def test_the_window_maps_dali_iterations_to_plan_entries():
    """Hand-computed: DALI epoch 7 serves entries 10..99 at batch 32 for training epoch 3:
    iterations 0-2 are [10, 42), [42, 74), [74, 100); past them, for a stale DALI epoch, after a
    cut, or while the window is rewritten: StopIteration; a later DALI epoch: RuntimeError."""
    from types import SimpleNamespace as Info

    from gpuprune.dali._window import _SEQ, Window
    w = Window(32, shared=False)

    def at(it, epoch_idx=7):
        return w.locate(Info(iteration=it, epoch_idx=epoch_idx), "test")

    with pytest.raises(RuntimeError, match="epoch 0, but the published plan is for epoch -1"):
        at(0, epoch_idx=0)                                 # nothing published: not ours to run
    w.publish(7, 3, 10, 100)
    assert [at(i) for i in range(3)] == [(10, 42, 3), (42, 74, 3), (74, 100, 3)]
    for stop in (lambda: at(3), lambda: at(0, epoch_idx=6)):
        with pytest.raises(StopIteration):
            stop()
    with pytest.raises(RuntimeError, match="epoch 8"):
        at(0, epoch_idx=8)
    w.fields[_SEQ] += 1                                    # a writer is half-way
    with pytest.raises(StopIteration):
        at(0)
    w.fields[_SEQ] += 1
    assert at(1) == (42, 74, 3)
    w.cut()
    with pytest.raises(StopIteration):
        at(0)
    assert w.fields[_SEQ] % 2 == 0


def test_a_window_reader_notices_a_rewrite_during_its_read():
    """The check after the copy: a reader whose copy straddles a rewrite (the sequence number
    moved between its copy and its check) answers StopIteration, and one that does not, reads."""
    from types import SimpleNamespace as Info

    from gpuprune.dali._window import Window

    class Racing(np.ndarray):
        """The window's fields; every tolist() (the reader's copy) lets a writer run after it."""
        writer = None

        def tolist(self):
            copy = np.asarray(self).tolist()
            if Racing.writer is not None:
                Racing.writer()
            return copy

    w = Window(8, shared=False)
    w.fields = w.fields.view(Racing)
    w.publish(1, 0, 0, 64)
    info = Info(iteration=2, epoch_idx=1)
    assert w.locate(info, "test") == (16, 24, 0)
    Racing.writer = lambda: w.publish(1, 5, 0, 8)          # rewritten right after the copy
    with pytest.raises(StopIteration):
        w.locate(info, "test")
    Racing.writer = None
    with pytest.raises(StopIteration):                     # the new window: iteration 2 is past it
        w.locate(info, "test")
    assert w.locate(Info(iteration=0, epoch_idx=1), "test") == (0, 8, 5)


def test_the_first_epoch_of_a_parallel_source_serves_its_own_batches(images, png_files):
    """A stock DALI iterator whose first epoch is started by reset() schedules one run more than
    its prefetch queue when first read; with a parallel source that overwrote a batch still held in
    the workers' shared-memory ring: wrong labels or garbage paths in the first epoch of every
    pipeline but the first (an iterator built before this was fixed failed each trial after the
    first). The iterator runs an empty DALI epoch first, so every epoch starts alike."""
    labels = np.arange(200, dtype=np.int64)
    for trial in range(4):
        pruner = gp.Pruner(200, policy="full", seed=trial)
        source = FileSource(png_files, labels, output_type=types.GRAY, parallel=True)
        it = build_iterator(pruner, source, batch_size=16, py_num_workers=2)
        for (b,) in it:
            idx = b["index"].numpy()
            assert np.array_equal(b["label"].numpy().reshape(-1), idx), f"trial {trial}"
            assert np.array_equal(b["data"].numpy()[..., 0], images[idx, :, :, 0])


def test_a_checkpoint_saved_after_the_last_batch_restores(images):
    """After the run's last batch the position is (num_epochs, 0); it restores (0.2 refused it:
    "epoch must be <= ..."), and the usual epoch loop then runs nothing."""
    pruner = gp.Pruner(N, keep=0.1, policy="uniform", num_epochs=2, seed=3)
    _, it = make(images, pruner)
    for epoch in range(2):
        it.set_epoch(epoch)
        take(it, images, epoch)
    state = {"pruner": pruner.state_dict(), "it": it.state_dict()}
    assert state["it"] == Position.make(2, 0, 1, False)
    twin = gp.Pruner(N, keep=0.1, policy="uniform", num_epochs=2, seed=3)
    twin.load_state_dict(state["pruner"])
    _, fresh = make(images, twin)
    fresh.load_state_dict(state["it"])
    assert fresh.epoch == 2 and list(range(fresh.epoch, 2)) == []
    with pytest.raises(ValueError, match=r"state_dict\['epoch'\] must be <= 1"):
        fresh.load_state_dict(Position.make(2, 5, 1, False))     # mid-"epoch" 2: there is none
