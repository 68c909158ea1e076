"""DALI's iterator contract: the stock iterator and PrunedDALIIterator side by side.

Each scenario drives DALI 2.4's own ``DALIGenericIterator`` (over a plain batch-mode external
source that serves the samples in id order, ``size=-1``) and ``PrunedDALIIterator`` with
``policy="full", shuffle=False`` (every sample, in id order) through the same calls, and asserts
that both produce the same transcript: the same batches (data, labels, dtypes, shapes) and the
same ``StopIteration`` points. The behaviours come from DALI's documentation and its iterator
tests (``test_fw_iterators.py``: stop iteration with and without ``auto_reset``, explicit
``reset()``, ``prepare_first_batch``, partial batches, the wrapper-subclass check, failing
constructions). ``fn.readers.file`` is compared with ``FileSource(file_root=...)`` the same way,
and a per-sample external source with its ``CallbackSource`` port.

DALI's own iterator tests are ported (our versions) and run on both iterators: its
``check_autoreset_iter`` (``itr = iter(it); for i in range(len(itr)): next(itr)``, epoch after
epoch, never seeing ``StopIteration``, over a reader with ``pad_last_batch=True`` vs ``FileSource``)
for every last-batch policy and ``auto_reset``; the epoch ended by ``next()`` alone; and the error
types of bad ``auto_reset`` and ``last_batch_policy`` values (issue 22, items 5 and 6).

The deliberate differences (docs/dali.md, "Differences from DALIGenericIterator") are asserted
in ``test_documented_differences``, each against the stock behaviour; the table's rows and the
checks are matched one to one, so neither can go stale.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from nvidia.dali import fn, types  # noqa: E402
from nvidia.dali.pipeline import Pipeline  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIClassificationIterator, DALIGenericIterator  # noqa: E402

import gpuprune as gp  # noqa: E402
from gpuprune.dali import (ArraySource, BadSampleError, CallbackSource, FileSource,  # noqa: E402
                           LastBatchPolicy, PrunedDALIIterator, build_pipeline)

N, BS = 203, 16            # 12 full batches and a partial one of 11
PARTIAL, DROP = LastBatchPolicy.PARTIAL, LastBatchPolicy.DROP


@pytest.fixture(scope="module")
def images(fmnist_images):
    return fmnist_images(N)


@pytest.fixture(autouse=True)
def quiet_dali_warnings(caplog):
    caplog.set_level(logging.ERROR)       # DALI logs "does not support resetting..." on purpose


def graph(images, labels):
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                      mean=[10.0], std=[2.0])
    return images, labels


class InOrder:
    """The plain batch-mode external source a DALI user writes: batch i of the arrays, then
    StopIteration (dali.md §1)."""

    def __init__(self, *arrays, bs=BS) -> None:
        self.arrays, self.bs = arrays, bs

    def __call__(self, info):
        lo = info.iteration * self.bs
        if lo >= len(self.arrays[0]):
            raise StopIteration
        return tuple(a[lo:lo + self.bs] for a in self.arrays)


def stock_iterator(x, *, cls=DALIGenericIterator, bs=BS, **kwargs):
    ids = np.arange(len(x), dtype=np.int64)
    pipe = Pipeline(batch_size=bs, num_threads=2, device_id=None, seed=1)
    with pipe:
        data, labels = fn.external_source(InOrder(x, ids, bs=bs), num_outputs=2, batch=True,
                                          batch_info=True, dtype=[types.UINT8, types.INT64],
                                          ndim=[3, 0], layout=["HWC", None])
        pipe.set_outputs(*graph(data, labels))
    return cls(pipe, ["data", "label"], size=-1, **kwargs)


def pruned_iterator(x, *, cls=PrunedDALIIterator, bs=BS, **kwargs):
    ids = np.arange(len(x), dtype=np.int64)
    source = ArraySource(x, ids, layouts=("HWC", None))
    pipe = build_pipeline(source, graph, batch_size=bs, seed=1)
    pruner = gp.Pruner(len(x), policy="full", seed=0)
    return cls(pipe, ["data", "label"], pruner=pruner, source=source, shuffle=False, **kwargs)


class Transcript:
    """What a sequence of calls on an iterator produced."""

    def __init__(self) -> None:
        self.events: list = []
        self.arrays: list = []

    def batch(self, out) -> None:
        assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], dict)
        b = out[0]
        self.events.append(("batch", b["label"].tolist(), tuple(b["data"].shape),
                            b["data"].dtype, b["label"].dtype, b["data"].device.type))
        self.arrays.append(b["data"].clone())

    def stop(self) -> None:
        self.events.append(("stop",))

    def next(self, it) -> None:
        try:
            self.batch(next(it))
        except StopIteration:
            self.stop()

    def loop(self, it, limit=None) -> None:
        for k, out in enumerate(it):
            self.batch(out)
            if limit is not None and k + 1 == limit:
                return
        self.stop()


def assert_same(stock: Transcript, pruned: Transcript) -> None:
    assert pruned.events == stock.events
    assert len(pruned.arrays) == len(stock.arrays)
    for a, b in zip(stock.arrays, pruned.arrays):
        assert torch.equal(a, b)


def in_order(epochs=1, bs=BS):
    """The labels of the batches of `epochs` passes over all N samples, in id order."""
    one = [list(range(lo, min(lo + bs, N))) for lo in range(0, N, bs)]
    return [b for _ in range(epochs) for b in one]


# ---------------------------------------------------------------- scenarios
def loops_with_reset(it, t):
    for _ in range(3):
        t.loop(it)
        it.reset()


def loops_without_reset(it, t):
    for _ in range(3):
        t.loop(it)


def next_after_the_end(it, t):
    for _ in range(len(in_order()) + 2):      # the last two raise StopIteration, again and again
        t.next(it)
    it.reset()
    t.next(it)
    t.loop(it)


def auto_reset_next(it, t):                   # with auto_reset=True
    for _ in range(2 * len(in_order()) + 3):
        t.next(it)


def peek_then_loop(it, t):
    t.batch(next(iter(it)))
    t.loop(it)
    t.loop(it)


def break_then_loop(it, t):
    t.loop(it, limit=3)
    t.loop(it)                                # stock: iter()'s reset is ignored mid-epoch
    t.loop(it)


def next_before_any_loop(it, t):
    t.next(it)
    t.next(it)
    t.loop(it)
    it.reset()
    t.loop(it)


def all_by_next_then_loop(it, t):             # the epoch ends without StopIteration
    for _ in range(len(in_order())):
        t.next(it)
    t.loop(it)                                # stock: iter() resets: the next epoch
    t.loop(it)


def break_on_the_last_batch_then_loop(it, t):
    t.loop(it, limit=len(in_order()))
    t.loop(it)                                # a whole epoch, not an empty one
    t.next(it)                                # ended: StopIteration again


def all_by_next_then_iter_next(it, t):
    for _ in range(len(in_order())):
        t.next(it)
    t.next(it.__iter__())                     # iter() then next(): the next epoch's first batch
    t.loop(it)


SCENARIOS = {
    "loops_with_reset": ({}, loops_with_reset),
    "loops_with_reset_no_prepare": ({"prepare_first_batch": False}, loops_with_reset),
    "loops_without_reset": ({}, loops_without_reset),
    "auto_reset_loops": ({"auto_reset": True}, loops_without_reset),
    "auto_reset_yes_next": ({"auto_reset": "yes"}, auto_reset_next),
    "next_after_the_end": ({}, next_after_the_end),
    "peek_then_loop": ({}, peek_then_loop),
    "break_then_loop": ({}, break_then_loop),
    "next_before_any_loop": ({"prepare_first_batch": False}, next_before_any_loop),
    "all_by_next_then_loop": ({}, all_by_next_then_loop),
    "all_by_next_then_loop_auto_reset": ({"auto_reset": True}, all_by_next_then_loop),
    "break_on_the_last_batch_then_loop": ({}, break_on_the_last_batch_then_loop),
    "all_by_next_then_iter_next": ({}, all_by_next_then_iter_next),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_transcript_as_the_stock_iterator(images, name):
    kwargs, scenario = SCENARIOS[name]
    stock, pruned = Transcript(), Transcript()
    scenario(stock_iterator(images, **kwargs), stock)
    scenario(pruned_iterator(images, **kwargs), pruned)
    assert_same(stock, pruned)
    # the transcript itself is right, not just equal: every batch in id order, partial last batch
    batches = [e[1] for e in stock.events if e[0] == "batch"]
    assert batches == in_order(len(batches) // len(in_order()) + 1)[:len(batches)]


def test_the_comparison_can_fail(images):
    """The harness notices a difference: a stock iterator over shifted data, or one batch more."""
    stock, shifted = Transcript(), Transcript()
    loops_with_reset(stock_iterator(images), stock)
    loops_with_reset(stock_iterator(np.roll(images, 1, axis=0)), shifted)
    with pytest.raises(AssertionError):
        assert_same(stock, shifted)
    longer = Transcript()
    next_after_the_end(pruned_iterator(images), longer)
    longer.events.insert(3, longer.events[2])
    with pytest.raises(AssertionError):
        assert_same(stock, longer)


def test_classification_iterator_shape_of_the_api(images):
    """DALIClassificationIterator's signature (no output_map) works on both sides."""
    class PrunedClassification(PrunedDALIIterator):     # what a user's drop-in subclass looks like
        def __init__(self, pipelines, **kwargs):
            super().__init__(pipelines, ["data", "label"], **kwargs)

    stock, pruned = Transcript(), Transcript()
    ids = np.arange(N, dtype=np.int64)
    pipe = Pipeline(batch_size=BS, num_threads=2, device_id=None, seed=1)
    with pipe:
        pipe.set_outputs(*graph(*fn.external_source(InOrder(images, ids), num_outputs=2, batch=True,
                                                    batch_info=True, dtype=[types.UINT8, types.INT64],
                                                    ndim=[3, 0], layout=["HWC", None])))
    loops_with_reset(DALIClassificationIterator(pipe, size=-1), stock)
    source = ArraySource(images, ids, layouts=("HWC", None))
    loops_with_reset(PrunedClassification(build_pipeline(source, graph, batch_size=BS, seed=1),
                                          pruner=gp.Pruner(N, policy="full"), source=source,
                                          shuffle=False), pruned)
    assert_same(stock, pruned)


def test_subclass_next_is_not_called_by_the_constructor(images):
    """DALI's check_iterator_wrapper_first_iteration: the base class must not call a subclass'
    __next__ while constructing (prepare_first_batch)."""
    def wrapped(base):
        class Wrapper(base):
            def __init__(self, *args, **kwargs):
                self._allow_next = False
                super().__init__(*args, **kwargs)

            def __next__(self):
                assert self._allow_next
                return super().__next__()
        return Wrapper

    for make in (stock_iterator, pruned_iterator):
        it = make(images, cls=wrapped(PrunedDALIIterator if make is pruned_iterator
                                      else DALIGenericIterator))
        it._allow_next = True
        assert sum(1 for k, _ in zip(range(3), it)) == 3


def test_failing_constructions_fail_on_both(images):
    """DALI's check_stop_iter_fail_single/multi: size=0 and two pipelines with size=-1 fail."""
    ids = np.arange(N, dtype=np.int64)

    def stock_pipe():
        pipe = Pipeline(batch_size=BS, num_threads=1, device_id=None)
        with pipe:
            pipe.set_outputs(*fn.external_source(InOrder(images, ids), num_outputs=2, batch=True,
                                                 batch_info=True))
        return pipe

    with pytest.raises(AssertionError):
        DALIGenericIterator(stock_pipe(), ["data", "label"], size=0)
    with pytest.raises(AssertionError):
        DALIGenericIterator([stock_pipe(), stock_pipe()], ["data", "label"], size=-1)
    source = ArraySource(images, ids)
    pipe = build_pipeline(source, batch_size=BS)
    pruner = gp.Pruner(N, policy="full")
    with pytest.raises(ValueError, match="size=0"):
        PrunedDALIIterator(pipe, ["data", "label"], size=0, pruner=pruner, source=source)
    with pytest.raises(ValueError, match="one pipeline"):
        PrunedDALIIterator([pipe, pipe], ["data", "label"], pruner=pruner, source=source)


def test_errors_raised_in_the_source_reach_the_caller_alike(images):
    """An exception in the user's loading code comes out of next() as itself, on both sides."""
    def gather(lo_ids):
        if lo_ids[0] >= 3 * BS:
            raise KeyError(f"missing sample {lo_ids[0]}")
        return images[lo_ids], lo_ids

    class Failing(InOrder):
        def __call__(self, info):
            lo = info.iteration * BS
            return gather(np.arange(lo, min(lo + BS, N)))

    pipe = Pipeline(batch_size=BS, num_threads=1, device_id=None)
    with pipe:
        pipe.set_outputs(*fn.external_source(Failing(), num_outputs=2, batch=True, batch_info=True))
    stock = DALIGenericIterator(pipe, ["data", "label"], size=-1)
    source = CallbackSource(lambda i, epoch: gather(i), N, dtype=[np.uint8, np.int64], ndim=[3, 0])
    pruned = PrunedDALIIterator(build_pipeline(source, batch_size=BS), ["data", "label"],
                                pruner=gp.Pruner(N, policy="full"), source=source, shuffle=False)
    for it in (stock, pruned):
        seen = []
        with pytest.raises(KeyError, match="missing sample 48"):
            for (b,) in it:
                seen.append(b["label"].tolist())
        # DALI asks for batch 3 while prefetching, i.e. before batch 1 is handed out
        assert seen == in_order()[:len(seen)] and len(seen) <= 3


# ---------------------------------------------------------------- readers.file and per-sample ES
@pytest.fixture(scope="module")
def image_folder(images, tmp_path_factory):
    """A readers.file-style folder: three class subdirectories of PNG files."""
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path_factory.mktemp("classes")
    for i in range(70):
        cls = root / f"class_{i % 3}"
        cls.mkdir(exist_ok=True)
        Image.fromarray(images[i, :, :, 0]).save(cls / f"img_{i:03d}.png")
    return root


def test_readers_file_and_file_source_agree(image_folder):
    """fn.readers.file(file_root) + DALIClassificationIterator(reader_name=...) vs
    FileSource(file_root) + PrunedDALIIterator(policy="full", shuffle=False): same images, same
    labels with the reader's dtype and shape (int32, (B, 1)), same order, over epochs."""
    def decode(jpegs):
        return fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY)

    pipe = Pipeline(batch_size=BS, num_threads=2, device_id=None)
    with pipe:
        jpegs, labels = fn.readers.file(file_root=str(image_folder), random_shuffle=False,
                                        pad_last_batch=True, name="Reader")
        pipe.set_outputs(decode(jpegs), labels)
    stock = DALIClassificationIterator(pipe, reader_name="Reader", last_batch_policy=PARTIAL)

    source = FileSource(file_root=image_folder, decoder=None)        # raw bytes, like the reader
    ppipe = Pipeline(batch_size=BS, num_threads=2, device_id=None)
    with ppipe:
        jpegs, labels = source.outputs()
        ppipe.set_outputs(decode(jpegs), labels)
    pruned = PrunedDALIIterator(ppipe, ["data", "label"], pruner=gp.Pruner(70, policy="full"),
                                source=source, shuffle=False, last_batch_policy=PARTIAL)
    assert len(pruned) == len(stock) == 5
    ts, tp = Transcript(), Transcript()
    for _ in range(2):
        ts.loop(stock)
        stock.reset()
        tp.loop(pruned)
        pruned.reset()
    assert_same(ts, tp)
    first = ts.events[0]
    assert first[4] == torch.int32 and first[1][0] == [0]          # labels (B, 1) int32
    labels = [lab[0] for e in ts.events if e[0] == "batch" for lab in e[1]]
    assert len(labels) == 140 and labels[:70] == labels[70:]        # 70 per epoch, no padding
    assert labels[:70] == [0] * 24 + [1] * 23 + [2] * 23             # class folders in order


def test_a_per_sample_external_source_ports_to_callback_source(images):
    """DALI users' per-sample callables (SampleInfo in, one sample out) map onto CallbackSource
    (sample id and epoch in, one sample out); with policy="full", shuffle=False the data agree."""
    n = 12 * BS                                # per-sample mode drops partial batches (dali.md §2.6)

    def load(i):
        return images[i], np.array(i, np.int64)

    def stock_source(sample_info):            # the user's original callable
        if sample_info.idx_in_epoch >= n:
            raise StopIteration
        return load(sample_info.idx_in_epoch)

    pipe = Pipeline(batch_size=BS, num_threads=2, device_id=None, seed=1)
    with pipe:
        data, labels = fn.external_source(stock_source, num_outputs=2, batch=False,
                                          dtype=[types.UINT8, types.INT64], ndim=[3, 0],
                                          layout=["HWC", None])
        pipe.set_outputs(*graph(data, labels))
    stock = DALIGenericIterator(pipe, ["data", "label"], size=-1)
    source = CallbackSource(lambda i, epoch: load(i), n, dtype=[types.UINT8, types.INT64],
                            ndim=[3, 0], layout=["HWC", None], per_sample=True)
    pruned = PrunedDALIIterator(build_pipeline(source, graph, batch_size=BS, seed=1),
                                ["data", "label"], pruner=gp.Pruner(n, policy="full"),
                                source=source, shuffle=False)
    ts, tp = Transcript(), Transcript()
    loops_with_reset(stock, ts)
    loops_with_reset(pruned, tp)
    assert_same(ts, tp)


# ---------------------------------------------------------------- ported: check_autoreset_iter
def _labels_pipeline(bs):
    return Pipeline(batch_size=bs, num_threads=1, device_id=None)


def reader_labels(path, n, bs, **kwargs):
    """DALI's check_autoreset_iter shape: fn.readers.file over one file n times, labels 0..n-1,
    pad_last_batch=True, and DALIGenericIterator(reader_name=...)."""
    pipe = _labels_pipeline(bs)
    with pipe:
        _, labels = fn.readers.file(files=[str(path)] * n, labels=list(range(n)),
                                    stick_to_shard=True, pad_last_batch=True, name="reader")
        pipe.set_outputs(labels)
    return DALIGenericIterator(pipe, ["label"], reader_name="reader", **kwargs)


def file_source_labels(path, n, bs, **kwargs):
    """The same with FileSource and PrunedDALIIterator (policy "full", unshuffled); the reader's
    pad_last_batch=True is last_batch_padded=True."""
    source = FileSource([str(path)] * n, np.arange(n), decoder=None)
    pipe = _labels_pipeline(bs)
    with pipe:
        _, labels = source.outputs()
        pipe.set_outputs(labels)
    return PrunedDALIIterator(pipe, ["label"], pruner=gp.Pruner(n, policy="full"), source=source,
                              shuffle=False, last_batch_padded=True, **kwargs)


def autoreset_pattern(it, epochs=3) -> list:
    """``itr = iter(it); for i in range(len(itr)): next(itr)``, epoch after epoch."""
    out = []
    for _ in range(epochs):
        itr = iter(it)
        out.append([next(itr)[0]["label"].reshape(-1).tolist() for _ in range(len(itr))])
    return out


@pytest.mark.parametrize("policy", [PARTIAL, DROP, LastBatchPolicy.FILL],
                         ids=["partial", "drop", "fill"])
@pytest.mark.parametrize("auto_reset", ["yes", "no"])
def test_check_autoreset_iter_on_both(tmp_path, auto_reset, policy):
    """DALI's check_autoreset_iter, ported: 11 samples at batch 2 (the last batch: [10], dropped,
    or padded [10, 10]), three epochs, each ended by next() alone. 0.2 diverged from the second
    epoch on (it continued the first epoch, with 0 batches)."""
    path = tmp_path / "sample.bin"
    path.write_bytes(b"x" * 16)
    stock = autoreset_pattern(reader_labels(path, 11, 2, auto_reset=auto_reset,
                                            last_batch_policy=policy))
    pruned = autoreset_pattern(file_source_labels(path, 11, 2, auto_reset=auto_reset,
                                                  last_batch_policy=policy))
    one = [[2 * i, 2 * i + 1] for i in range(5)] + {PARTIAL: [[10]], DROP: []}.get(policy,
                                                                                [[10, 10]])
    assert stock == pruned == [one] * 3


# ---------------------------------------------------------------- ported: error types
BAD_VALUES = [("last_batch_policy", "FILL"), ("last_batch_policy", 2), ("last_batch_policy", None),
              ("auto_reset", 1), ("auto_reset", 0), ("auto_reset", np.bool_(True)),
              ("auto_reset", "True"), ("auto_reset", 1.0)]


@pytest.mark.parametrize("name, value", BAD_VALUES,
                         ids=[f"{n}={v!r}" for n, v in BAD_VALUES])
def test_bad_values_raise_what_dali_raises(images, name, value):
    """DALI's iterator refuses an enum given as a string, and any auto_reset but True, False,
    None, "yes", "no" (numpy.bool_ included) with ValueError; so does this one, naming the
    argument (0.2: TypeError, and numpy.bool_ accepted)."""
    with pytest.raises(ValueError):
        stock_iterator(images, **{name: value})
    with pytest.raises(ValueError, match=name):
        pruned_iterator(images, **{name: value})


@pytest.mark.parametrize("value", [True, False, None, "yes", "no"])
def test_auto_reset_values_dali_accepts(images, value):
    stock, pruned = Transcript(), Transcript()
    auto_reset_next(stock_iterator(images, auto_reset=value), stock)
    auto_reset_next(pruned_iterator(images, auto_reset=value), pruned)
    assert_same(stock, pruned)


# ---------------------------------------------------------------- documented differences
def _differences_table() -> list[list[str]]:
    """docs/dali.md's "Differences from DALIGenericIterator" table: its rows' cells."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "dali.md").read_text()
    section = text.split("## Differences from `DALIGenericIterator`")[1].split("\n### ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def diff_len_and_size(images):
    stock, pruned = stock_iterator(images), pruned_iterator(images)
    assert len(stock) == 0 and stock.size == -1 and stock._size == -1
    assert len(pruned) == 13 and pruned.size == pruned._size == N


def diff_batch_dict(images):
    (s,), (p,) = next(stock_iterator(images)), next(pruned_iterator(images))
    assert set(s) == {"data", "label"} and set(p) == {"data", "label", "index", "weight"}
    assert torch.equal(p["index"], p["label"]) and torch.equal(p["weight"], torch.ones(BS))


def diff_reset_mid_epoch(images):
    stock, pruned = stock_iterator(images), pruned_iterator(images)
    next(stock), next(pruned)
    stock.reset()
    pruned.reset()
    assert next(stock)[0]["label"][0] == BS                   # batch 1 of the same epoch
    assert next(pruned)[0]["label"][0] == 0 and pruned.epoch == 1   # the next epoch


def diff_last_batch_policy(images):
    ts, tp = Transcript(), Transcript()
    ts.loop(stock_iterator(images, last_batch_policy=DROP))   # ignored: the source decides
    tp.loop(pruned_iterator(images, last_batch_policy=DROP))
    assert len(ts.events) == 14 and len(tp.events) == 13 and ts.events[:12] == tp.events[:12]
    stock_default = stock_iterator(images)
    assert stock_default._last_batch_policy == LastBatchPolicy.FILL    # DALI's default
    assert pruned_iterator(images).last_batch_policy == PARTIAL
    with pytest.raises(ValueError, match="FILL"):              # FILL alone would wrap around
        pruned_iterator(images, last_batch_policy=LastBatchPolicy.FILL)


def diff_last_batch_padded(images):
    ts, tp = Transcript(), Transcript()
    ts.loop(stock_iterator(images, last_batch_padded=True,
                           last_batch_policy=LastBatchPolicy.FILL))    # ignored with size=-1
    tp.loop(pruned_iterator(images, last_batch_padded=True, last_batch_policy=LastBatchPolicy.FILL))
    assert ts.events[-2][1] == list(range(192, 203))          # a short batch: the source's
    assert tp.events[-2][1] == list(range(192, 203)) + [202] * 5    # full: the last sample repeated


def diff_prepare_first_batch(images):
    calls, stock_calls = [], []
    ids = np.arange(N, dtype=np.int64)

    def counting(lo_ids, epoch):
        calls.append(epoch)
        return images[lo_ids], lo_ids
    source = CallbackSource(counting, N, dtype=[np.uint8, np.int64], ndim=[3, 0])
    it = PrunedDALIIterator(build_pipeline(source, batch_size=BS), ["data", "label"],
                            pruner=gp.Pruner(N, policy="full"), source=source)
    assert calls == []                                        # nothing gathered yet
    it.set_epoch(0)
    assert calls == [0, 0]                                    # DALI's prefetch queue

    class Counting(InOrder):
        def __call__(self, info):
            stock_calls.append(info.epoch_idx)
            return super().__call__(info)
    pipe = Pipeline(batch_size=BS, num_threads=1, device_id=None)
    with pipe:
        pipe.set_outputs(*fn.external_source(Counting(images, ids), num_outputs=2, batch=True,
                                             batch_info=True))
    DALIGenericIterator(pipe, ["data", "label"], size=-1)
    assert len(stock_calls) >= 2                              # run by the constructor


def diff_dali_checkpoints(images):
    with pytest.raises(ValueError, match="checkpointing disabled"):
        stock_iterator(images).checkpoints()
    with pytest.raises(ValueError, match="state_dict"):
        pruned_iterator(images).checkpoints()


def diff_empty_epoch(images):
    ids = np.arange(N, dtype=np.int64)
    empty = Pipeline(batch_size=BS, num_threads=1, device_id=None)
    with empty:
        empty.set_outputs(*fn.external_source(InOrder(images[:0], ids[:0]), num_outputs=2,
                                              batch=True, batch_info=True))
    with pytest.raises(RuntimeError, match="no data in the pipeline"):
        DALIGenericIterator(empty, ["data", "label"], size=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [e[0] for e in _two_loops_after_empty_epoch(images)] == ["stop", "batch"]


def diff_pipelines(images):
    ids = np.arange(N, dtype=np.int64)
    pipes = []
    for _ in range(2):
        pipe = Pipeline(batch_size=BS, num_threads=1, device_id=None)
        with pipe:
            pipe.set_outputs(*fn.external_source(InOrder(images, ids), num_outputs=2, batch=True,
                                                 batch_info=True))
        pipes.append(pipe)
    DALIGenericIterator(pipes, ["data", "label"], size=2 * N)    # a list, with a size
    source = ArraySource(images, ids)
    with pytest.raises(ValueError, match="takes one pipeline"):
        PrunedDALIIterator([build_pipeline(source, batch_size=BS)] * 2, ["data", "label"],
                           pruner=gp.Pruner(N), source=source)


def diff_size_and_reader_name(images):
    with pytest.raises(ValueError, match="size=150 does not apply"):
        pruned_iterator(images, size=150)
    with pytest.raises(ValueError, match="reader_name='Reader' does not apply"):
        pruned_iterator(images, reader_name="Reader")
    ids = np.arange(N, dtype=np.int64)
    pipe = Pipeline(batch_size=BS, num_threads=1, device_id=None)
    with pipe:
        pipe.set_outputs(*fn.external_source(InOrder(images, ids), num_outputs=2, batch=True,
                                             batch_info=True))
    assert len(DALIGenericIterator(pipe, ["data", "label"], size=150)) == -(-150 // BS)


def diff_bad_constructions(images):
    test_failing_constructions_fail_on_both(images)


def diff_non_bool_flags(images):
    for name in ("prepare_first_batch", "fill_last_batch", "last_batch_padded"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stock_iterator(images, **{name: "no"})                   # truthy: accepted
            with pytest.raises(TypeError, match=f"{name} must be a bool"):
                pruned_iterator(images, **{name: "no"})


def diff_unreadable_file(images, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(images[i, :, :, 0]).save(paths[-1])
    paths[5] = tmp_path / "missing.png"
    pipe = Pipeline(batch_size=4, num_threads=1, device_id=None)
    with pipe:
        raw, _ = fn.readers.file(files=[str(p) for p in paths], labels=list(range(8)), name="r")
        pipe.set_outputs(raw)
    with pytest.raises(RuntimeError) as stock:
        for _ in DALIGenericIterator(pipe, ["data"], reader_name="r"):
            pass
    assert not isinstance(stock.value, BadSampleError)
    source = FileSource([str(p) for p in paths], decoder=None)
    it = PrunedDALIIterator(build_pipeline(source, batch_size=4), ["data"],
                            pruner=gp.Pruner(8, policy="full"), source=source, shuffle=False)
    with pytest.raises(BadSampleError, match="missing.png.*sample index 5, epoch 0"):
        for _ in it:
            pass
    with pytest.raises(RuntimeError, match="stopped after an error"):
        iter(it)


def diff_pipeline_run_directly(images):
    pipe = build_pipeline(ArraySource(images, np.arange(N)), batch_size=BS)
    with pytest.raises(RuntimeError, match="drive the pipeline with PrunedDALIIterator"):
        pipe.run()


#: docs/dali.md's differences table, row by row (first column) -> the check of that row
DIFFERENCES = {
    "`len(it)`, `it.size`, `it._size`": diff_len_and_size,
    "batch dict": diff_batch_dict,
    "`reset()` mid-epoch": diff_reset_mid_epoch,
    "`last_batch_policy`": diff_last_batch_policy,
    "`last_batch_padded=True`": diff_last_batch_padded,
    "`prepare_first_batch=True`": diff_prepare_first_batch,
    "DALI checkpoints": diff_dali_checkpoints,
    "empty epoch": diff_empty_epoch,
    "pipelines": diff_pipelines,
    "`size`, `reader_name`": diff_size_and_reader_name,
    "`size=0`, two pipelines with `size=-1`": diff_bad_constructions,
    "non-bool `prepare_first_batch`, `fill_last_batch`, `last_batch_padded`": diff_non_bool_flags,
    "a file that cannot be read": diff_unreadable_file,
    "`pipe.run()` without the iterator": diff_pipeline_run_directly,
}


def test_the_differences_table_is_the_checked_list():
    """docs/dali.md lists exactly the differences checked below, in this order."""
    assert [row[0] for row in _differences_table()] == list(DIFFERENCES)


@pytest.mark.parametrize("row", list(DIFFERENCES))
def test_documented_differences(images, tmp_path, row):
    """Each deliberate difference (docs/dali.md), asserted against the stock behaviour."""
    check = DIFFERENCES[row]
    check(images, tmp_path) if "tmp_path" in check.__code__.co_varnames else check(images)


def test_the_same_behaviour_table_names_tests_of_this_file():
    """docs/dali.md's "Same as DALIGenericIterator" table: every behaviour names the tests of this
    file that run it on both iterators, and they exist."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "dali.md").read_text()
    section = text.split("### Same as `DALIGenericIterator`")[1].split("\n## ")[0]
    named = re.findall(r"`(test_\w+)`", section)
    assert len(named) >= 8
    for name in named:
        assert callable(globals().get(name)), name


def _two_loops_after_empty_epoch(images):
    from gpuprune.policies import Policy, Selection

    class EmptyFirst(Policy):
        name, exact_k = "empty_first", False

        def select(self, stats, k, *, epoch, generator, backend):
            n = 0 if epoch == 0 else stats.num_samples
            return Selection(torch.arange(n, dtype=torch.int32))

    ids = np.arange(N, dtype=np.int64)
    source = ArraySource(images, ids, layouts=("HWC", None))
    it = PrunedDALIIterator(build_pipeline(source, graph, batch_size=BS), ["data", "label"],
                            pruner=gp.Pruner(N, policy=EmptyFirst()), source=source, shuffle=False)
    t = Transcript()
    t.loop(it)                      # epoch 0: empty
    t.loop(it, limit=1)             # epoch 1
    return t.events
