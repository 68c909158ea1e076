"""External-source callables that feed a DALI pipeline only the planned samples.

A source sits at the start of the user's DALI graph. :meth:`PlanSource.outputs` creates the
``fn.external_source`` node (batch mode, ``batch_info=True``) and returns its data nodes. Each epoch,
:class:`~gpuprune.dali.PrunedDALIIterator` publishes this rank's plan to the source; DALI then calls
the source with ``BatchInfo(iteration, epoch_idx)`` and the source returns batch ``iteration`` of the
plan, raising ``StopIteration`` past the last one. When the iterator reads ahead, it appends the next
training epoch's plan before DALI gets there: one DALI epoch then reads several training epochs'
batches back to back (each batch belongs to one training epoch, which ``gather`` receives).

The sample ids do not travel through DALI: an external source hands out iteration ``i``'s data as
the pipeline's output ``i`` (a FIFO), so the iterator knows that its ``j``-th batch of a pass is the
``j``-th planned batch and attaches ids and loss weights from the plan itself (an extra pipeline
output would only add work to every batch).

Sources:

* :class:`ArraySource`: in-memory arrays. numpy on the CPU (gathered by fancy indexing, optionally
  in parallel workers), or torch/CuPy arrays already on the GPU with ``device="gpu"`` (gathered on
  the GPU with ``index_select``; no host copy).
* :class:`FileSource`: one file per sample. The source emits paths; ``fn.io.file.read`` reads them in
  DALI's thread pool and ``fn.decoders.image`` decodes them (``device="mixed"`` on a GPU pipeline).
  ``FileSource(file_root=...)`` finds the files and labels the way ``fn.readers.file`` does.
* :class:`CallbackSource`: your own loading code, called with the planned sample ids and the epoch
  (per batch, or per sample like a per-sample ``external_source`` callable).

Writing a source: subclass :class:`PlanSource`, implement :meth:`PlanSource.gather` (one batch for
a list of sample ids and the epoch) and :meth:`PlanSource.outputs` (call
:meth:`PlanSource.external_source` with the outputs' types).

The plan of a CPU source is kept in shared memory (:class:`~gpuprune.dali._shared.SharedArray`), so
parallel workers see each new epoch's plan without being restarted.
"""

from __future__ import annotations

import fnmatch
import os
from abc import ABC, abstractmethod
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

from .._checks import check_bool, check_choice, check_int
from ..sizes import index_dtype
from ._shared import SharedArray

__all__ = ["PlanSource", "ArraySource", "FileSource", "CallbackSource", "BadSampleError",
           "discover_files", "READER_FILE_FILTERS"]

# The published schedule, an int64 header: the DALI epoch (pipeline epoch counter) it is for, the
# batch size, a limit on DALI iterations (cut), then one block per plan slot. A DALI epoch reads one
# segment (a pass over one training epoch's plan) or, when the iterator reads ahead, several back
# to back, each in the other slot: DALI iteration i of the epoch is batch i - first of the segment
# with first <= i < first + num_batches. A slot's block is written under a sequence number (odd
# while it changes) so a parallel worker never uses a half-written block.
_TAG, _BS, _LIMIT = range(3)
_GLOBAL = 3
_S_SEQ, _S_TAG, _S_EPOCH, _S_START, _S_END, _S_NBATCH, _S_FIRST = range(7)
_SLOT_FIELDS = 7
_SLOTS = 2
_HEADER = _GLOBAL + _SLOTS * _SLOT_FIELDS
_NO_PLAN = -1
_NO_LIMIT = 2**62

# FileSource sample status (uint8, shared with workers)
_UNKNOWN, _GOOD, _UNREADABLE, _UNDECODABLE = 0, 1, 2, 3
_REASONS = {_UNREADABLE: "unreadable", _UNDECODABLE: "undecodable"}

#: ``fn.readers.file``'s default ``file_filters`` (DALI 2.4), matched case-insensitively by default
READER_FILE_FILTERS = ("*.jpg", "*.jpeg", "*.png", "*.bmp", "*.tif", "*.tiff", "*.pnm", "*.ppm",
                       "*.pgm", "*.pbm", "*.jp2", "*.webp", "*.flac", "*.ogg", "*.wav")


class BadSampleError(RuntimeError):
    """A sample's file could not be read or decoded.

    Attributes:
        index: the sample id (position in the dataset), or None.
        path: the file, or None.
    """

    def __init__(self, message: str, index: int | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.index, self.path = index, path

    def __reduce__(self):   # survives the trip back from a parallel worker
        return type(self), (str(self), self.index, self.path)


def _layouts(layouts, count: int) -> list[str | None]:
    if layouts is None:
        return [None] * count
    if isinstance(layouts, str):
        layouts = [layouts]
    layouts = list(layouts)
    if len(layouts) != count:
        raise ValueError(f"layouts must have one entry per output ({count}), got layouts={layouts!r}")
    for lay in layouts:
        if lay is not None and not isinstance(lay, str):
            raise TypeError(f"layouts entries must be str or None, got {lay!r}")
    return layouts


def _dali_type(d) -> types.DALIDataType:
    """``d`` as a DALI type (from a DALI type or anything ``np.dtype`` takes); TypeError if not."""
    if isinstance(d, types.DALIDataType):
        return d
    try:
        return types.to_dali_type(np.dtype(d))
    except (TypeError, ValueError, KeyError) as e:
        raise TypeError(f"dtype must be a DALI type or a numpy dtype (one per output), got "
                        f"{d!r}") from e


def _is_gpu_array(a) -> bool:
    if isinstance(a, torch.Tensor):
        return a.is_cuda
    return hasattr(a, "__cuda_array_interface__")


def _host_array(name: str, a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().numpy()          # CPU torch tensors from callbacks fail on CPU-only torch
    a = np.asarray(a)
    if a.ndim == 0:
        raise ValueError(f"{name} must have a first (sample) dimension, got a scalar")
    if a.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got dtype=object")
    return a


def _slot_at(s: int) -> int:
    return _GLOBAL + s * _SLOT_FIELDS


def _clear_header(h: np.ndarray) -> None:
    h[:] = 0
    h[_TAG] = _NO_PLAN
    for s in range(_SLOTS):
        h[_slot_at(s) + _S_TAG] = _NO_PLAN


def _write_slot(h: np.ndarray, s: int, tag: int, epoch: int, start: int, end: int,
                num_batches: int, first: int) -> None:
    """Write one slot's block under its sequence number (odd while the block changes)."""
    o = _slot_at(s)
    h[o + _S_SEQ] += 1
    h[o + _S_TAG], h[o + _S_EPOCH], h[o + _S_START] = tag, epoch, start
    h[o + _S_END], h[o + _S_NBATCH], h[o + _S_FIRST] = end, num_batches, first
    h[o + _S_SEQ] += 1


def _locate(h: np.ndarray, info, parallel: bool, name: str) -> tuple[int, int, int, int]:
    """``(slot, first entry, one past the last entry, training epoch)`` of DALI iteration ``info``
    under header ``h``; StopIteration past the published batches or for a stale DALI epoch."""
    v = h.tolist()                   # one read of every field (a few microseconds per batch)
    tag = v[_TAG]
    if info.epoch_idx != tag:
        if info.epoch_idx < tag or (parallel and tag == _NO_PLAN):
            raise StopIteration      # a stale prefetch of an epoch that has ended
        raise RuntimeError(
            f"DALI asked {name} for epoch {info.epoch_idx}, but the published plan is for epoch "
            f"{tag} (-1: none); drive the pipeline with PrunedDALIIterator")
    it = info.iteration
    if it >= v[_LIMIT]:
        raise StopIteration
    for s in range(_SLOTS):
        o = _slot_at(s)
        seq = v[o + _S_SEQ]
        stag, epoch, start, end, nb, first = v[o + 1:o + _SLOT_FIELDS]
        if seq & 1 or stag != tag or not first <= it < first + nb:
            continue
        if int(h[o + _S_SEQ]) != seq:
            continue                 # rewritten while read: never the slot a requested batch is in
        lo = start + (it - first) * v[_BS]
        return s, lo, min(lo + v[_BS], end), epoch
    raise StopIteration


class PlanSource(ABC):
    """Base of the external sources driven by :class:`~gpuprune.dali.PrunedDALIIterator`.

    A subclass implements two methods:

    * :meth:`outputs` (the graph side): call :meth:`external_source` with the outputs' dtypes and
      dimensions inside the pipeline definition and return the data nodes (optionally followed by
      operators, as :class:`FileSource` does with ``fn.io.file.read``);
    * :meth:`gather` (the data side): one batch of data for an array of planned sample ids and the
      epoch they are planned for.

    The iterator publishes each epoch's plan (this rank's shard) before DALI asks for data, appends
    the next epoch's plan when it reads ahead (:meth:`append`), and ends a DALI epoch early with
    :meth:`cut`.

    Args:
        num_samples: N, the dataset size; a plan's ids lie in ``[0, N)``.
        parallel: run the callback in DALI's Python worker processes (``fn.external_source(...,
            parallel=True)``; set ``py_num_workers`` / ``py_start_method`` on the pipeline). Pays off
            when the callback does real Python work; for cheap in-memory gathers the serial mode is
            faster (the shared-memory transfer costs more than it saves). Default ``False``.
        prefetch_queue_depth: batches each worker prepares ahead in parallel mode. Default ``2``.
    """

    #: "cpu" or "gpu": where the external source's outputs live
    device: str = "cpu"

    def __init__(self, num_samples: int, *, parallel: bool = False, prefetch_queue_depth: int = 2
                 ) -> None:
        self.num_samples = check_int("num_samples", num_samples, minimum=1)
        self.parallel = check_bool("parallel", parallel)
        self.prefetch_queue_depth = check_int("prefetch_queue_depth", prefetch_queue_depth, minimum=1)
        self.batch_size: int | None = None
        self._header: SharedArray | None = None
        self._plan: SharedArray | None = None

    # ------------------------------------------------------------------ graph side
    @abstractmethod
    def outputs(self) -> tuple:
        """Create the source's nodes; call inside a pipeline definition.

        Returns:
            The data nodes to build the rest of the graph from (a tuple).
        """

    def external_source(self, *, dtype: Sequence, ndim: Sequence[int],
                        layout: Sequence[str | None] | None = None, **kwargs) -> list:
        """The ``fn.external_source`` node fed by this source; call it from :meth:`outputs`.

        Binds the source to the pipeline being defined (one source per pipeline) and creates a
        batch-mode external source with one output per entry of ``dtype``.

        Args:
            dtype: DALI type (``types.UINT8``, ...) or numpy dtype of each output.
            ndim: sample dimensions of each output (without the batch dimension).
            layout: DALI layout of each output (e.g. ``"HWC"``) or None.
            **kwargs: more ``fn.external_source`` arguments (e.g. ``cuda_stream``).

        Returns:
            The list of data nodes, one per output.
        """
        dtypes = [_dali_type(d) for d in dtype]
        ndims = [check_int("ndim", d, minimum=0) for d in ndim]
        if len(ndims) != len(dtypes):
            raise ValueError(f"dtype and ndim must have one entry per output, got {len(dtypes)} "
                             f"and {len(ndims)}")
        layouts = _layouts(layout, len(dtypes))
        self._bind()
        return fn.external_source(
            source=self, num_outputs=len(dtypes), batch=True, batch_info=True,
            parallel=self.parallel,
            **({"prefetch_queue_depth": self.prefetch_queue_depth} if self.parallel else {}),
            dtype=dtypes, ndim=ndims, layout=layouts, device=self.device, **kwargs)

    def _bind(self) -> Pipeline:
        pipe = Pipeline.current()
        if pipe is None:
            raise RuntimeError(f"{type(self).__name__}.outputs() must be called inside a DALI pipeline "
                               "definition (a @pipeline_def function or `with pipe:`)")
        if self.batch_size is not None:
            raise RuntimeError(f"this {type(self).__name__} already feeds a pipeline; make one source "
                               "per pipeline")
        self.batch_size = int(pipe.max_batch_size)
        self._setup_plan_storage()
        return pipe

    def _setup_plan_storage(self) -> None:
        # created before the pipeline is built, so forked workers inherit the mapping
        self._header = SharedArray((_HEADER,), np.int64, fill=0)
        _clear_header(self._header.array)
        # this rank's plans, one slot of N entries each (the file is sparse: only the entries
        # written take memory), in the plans' own id type (4 bytes per id while ids fit int32)
        dtype = torch.empty(0, dtype=index_dtype(self.num_samples)).numpy().dtype
        self._plan = SharedArray((_SLOTS * self.num_samples,), dtype)
        self._last_slot = 0

    # ------------------------------------------------------------------ data side
    @abstractmethod
    def gather(self, ids: np.ndarray, epoch: int) -> tuple:
        """One batch: the data of the planned sample ids ``ids`` in this order.

        Args:
            ids: 1-D int64 numpy array of sample ids (at most ``batch_size`` of them, at least 1).
            epoch: the training epoch they are planned for (the Pruner's epoch, not DALI's
                counter), e.g. to seed per-epoch augmentation.

        Returns:
            A tuple with one batch per output: a numpy array whose first dimension is
            ``len(ids)``, or a list of per-sample arrays (ragged data). numpy, not torch CPU tensors
            (DALI asks torch for a CUDA stream for every torch tensor: that fails on CPU-only
            torch).
        """

    # ------------------------------------------------------------------ iterator side
    def publish(self, tag: int, epoch: int, indices, start: int, end: int,
                num_batches: int) -> int:
        """Start DALI epoch ``tag`` with entries ``[start, end)`` of ``indices`` as its batches.

        Args:
            tag: the pipeline's epoch counter (``BatchInfo.epoch_idx``) the plan is for.
            epoch: the training epoch (passed on to :meth:`gather`).
            indices: this rank's sample ids in training order (a torch tensor or array).
            start: first entry served (non-zero when resuming mid-epoch).
            end: one past the last entry served.
            num_batches: batches in ``[start, end)``; DALI iteration ``i`` gets entries
                ``start + i * batch_size`` onwards, and iteration ``num_batches`` raises
                ``StopIteration`` unless :meth:`append` adds the next epoch's batches.

        Returns:
            The position of entry 0 of ``indices`` in the source's plan storage (the offset that
            :meth:`kept` and :meth:`find_bad` positions add to plan entries).
        """
        self._check_bound()
        self._check_indices(indices)
        h = self._header.array
        h[_TAG] = _NO_PLAN                     # workers treat the plan as absent while it changes
        for s in range(_SLOTS):
            _write_slot(h, s, _NO_PLAN, 0, 0, 0, 0, 0)
        self._store(0, indices)
        _write_slot(h, 0, tag, epoch, start, end, num_batches, 0)
        h[_BS], h[_LIMIT] = self.batch_size, _NO_LIMIT
        h[_TAG] = tag
        self._last_slot = 0
        return 0

    def append(self, epoch: int, indices, start: int, end: int, num_batches: int,
               first: int) -> int:
        """Read ahead: make DALI iterations ``first, first + 1, ...`` of the running DALI epoch the
        batches of entries ``[start, end)`` of the next training epoch's ``indices``.

        The caller guarantees that DALI has not asked for iteration ``first`` yet (else it has
        already been told that the epoch ended) and that the batches of the slot this overwrites
        (the one before the last) have all been delivered. Returns the storage offset, as
        :meth:`publish` does.
        """
        self._check_bound()
        self._check_indices(indices)
        h = self._header.array
        tag = int(h[_TAG])
        if tag == _NO_PLAN:
            raise RuntimeError("append() needs a published DALI epoch to extend")
        s = (self._last_slot + 1) % _SLOTS
        _write_slot(h, s, _NO_PLAN, 0, 0, 0, 0, 0)
        self._store(s, indices)
        _write_slot(h, s, tag, epoch, start, end, num_batches, first)
        self._last_slot = s
        return s * self.num_samples

    def _check_bound(self) -> None:
        if self.batch_size is None:
            raise RuntimeError(f"{type(self).__name__} is not part of a pipeline yet; build the "
                               "pipeline with source.outputs() first")

    def _check_indices(self, indices) -> None:
        n = len(indices)
        if n > self.num_samples:
            raise ValueError(f"a plan of {n} entries does not fit this source of "
                             f"{self.num_samples} samples")

    def _store(self, slot: int, indices) -> None:
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()     # one copy per epoch for a GPU plan
        base = slot * self.num_samples
        self._plan.array[base:base + len(indices)] = indices

    def cut(self) -> None:
        """End the current DALI epoch early: every later call raises ``StopIteration``."""
        if self._header is not None:
            self._header.array[_LIMIT] = 0

    def _locate(self, info) -> tuple[int, int, int, int]:
        """``(slot, first entry, one past the last entry, training epoch)`` of DALI iteration
        ``info``, or StopIteration past the published batches."""
        return _locate(self._header.array, info, self.parallel, type(self).__name__)

    def _batch(self, info) -> tuple[int, np.ndarray, int]:
        """``(storage position, sample ids, epoch)`` of DALI iteration ``info``, or StopIteration."""
        slot, lo, hi, epoch = self._locate(info)
        pos = slot * self.num_samples + lo
        ids = self._plan.array[pos:pos + (hi - lo)].astype(np.int64)   # a private copy
        return pos, ids, epoch

    def __call__(self, info) -> tuple:
        lo, ids, epoch = self._batch(info)
        return self._serve(lo, ids, epoch)

    def _serve(self, pos: int, ids: np.ndarray, epoch: int) -> tuple:
        out = self.gather(ids, epoch)
        if not isinstance(out, tuple):
            raise TypeError(f"{type(self).__name__}.gather must return a tuple with one batch per "
                            f"output, got {type(out).__name__}")
        return out

    def kept(self, lo: int, hi: int) -> np.ndarray | None:
        """Which of the plan entries at storage positions ``[lo, hi)`` the source delivered (a
        bool mask), None for all. A position is the offset :meth:`publish`/:meth:`append` returned
        plus the entry's index in the plan.

        Only a source that skips bad samples drops any; the iterator calls this after DALI has
        produced the batch, when the source's verdicts for it are final.
        """
        return None

    # ------------------------------------------------------------------ errors
    def find_bad(self, first: int, last: int) -> tuple[int, str, str, str] | None:
        """The first sample at plan storage positions ``[first, last)`` (see :meth:`kept`) that
        cannot be loaded.

        Used by the iterator after a pipeline error. Returns ``(index, path, what, detail)`` with
        ``what`` in ``("read", "decode")``, or None. Sources without files return None.
        """
        return None

    @property
    def bad_samples(self) -> dict[int, tuple[str, str]]:
        """Samples found bad so far: ``{index: (path, "unreadable" | "undecodable")}``."""
        return {}


class CallbackSource(PlanSource):
    """Your own loading code behind the plan: ``callback`` gets the planned sample ids and the epoch.

    This is how an existing ``fn.external_source`` callable is ported: where it mapped DALI's
    ``SampleInfo``/``BatchInfo`` to samples itself, it now receives the sample ids the Pruner planned
    (in training order) and the training epoch::

        # before: fn.external_source(MySource(), batch=False, num_outputs=2, ...)
        #         where MySource.__call__(sample_info) loads sample perm[sample_info.idx_in_epoch]
        source = CallbackSource(lambda i, epoch: load(i), N, dtype=[types.UINT8, types.INT64],
                                ndim=[3, 0], layout=["HWC", None], per_sample=True)

    Args:
        callback: ``callback(sample_id: int, epoch: int)`` with ``per_sample=True``, returning one
            sample per output (a tuple; a single array for one output); or
            ``callback(ids: np.ndarray, epoch: int)`` (batch mode, the default), returning one batch
            per output (a tuple; a single batch for one output), each a numpy array with
            ``len(ids)`` rows or a list of ``len(ids)`` per-sample arrays.
        num_samples: N, the dataset size.
        dtype: DALI or numpy type of each output (a list), or one type for a single output.
        ndim: sample dimensions of each output (a list), or one int for a single output.
        layout: DALI layout of each output, or None.
        per_sample: call ``callback`` once per sample (like ``external_source(batch=False)``) and
            assemble the batch here. Default ``False``.
        parallel, prefetch_queue_depth: see :class:`PlanSource` (with ``parallel=True`` the
            callback runs in DALI's worker processes: it must be picklable under
            ``py_start_method="spawn"``).
    """

    def __init__(self, callback: Callable, num_samples: int, *, dtype, ndim,
                 layout: Sequence[str | None] | str | None = None, per_sample: bool = False,
                 parallel: bool = False, prefetch_queue_depth: int = 2) -> None:
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        super().__init__(num_samples, parallel=parallel, prefetch_queue_depth=prefetch_queue_depth)
        self.single = not isinstance(dtype, (list, tuple))
        self.dtypes = [dtype] if self.single else list(dtype)
        for d in self.dtypes:
            _dali_type(d)                   # checked here, not when the pipeline is built
        self.ndims = [check_int("ndim", d, minimum=0)
                      for d in (list(ndim) if isinstance(ndim, (list, tuple)) else [ndim])]
        if len(self.ndims) != len(self.dtypes):
            raise ValueError(f"dtype and ndim must have one entry per output, got dtype={dtype!r}, "
                             f"ndim={ndim!r}")
        self.layouts = _layouts(layout, len(self.dtypes))
        for lay, nd in zip(self.layouts, self.ndims):
            if lay and len(lay) != nd:
                raise ValueError(f"layout {lay!r} does not match ndim={nd}")
        self.callback = callback
        self.per_sample = check_bool("per_sample", per_sample)

    def outputs(self) -> tuple:
        return tuple(self.external_source(dtype=self.dtypes, ndim=self.ndims, layout=self.layouts))

    def gather(self, ids: np.ndarray, epoch: int) -> tuple:
        k = len(self.dtypes)
        if self.per_sample:
            samples = [self.callback(int(i), epoch) for i in ids]
            if self.single:
                return ([np.asarray(s) for s in samples],)
            bad = next((s for s in samples if not isinstance(s, (tuple, list)) or len(s) != k), None)
            if bad is not None:
                raise TypeError(f"callback must return a tuple of {k} per-sample arrays, got {bad!r}")
            return tuple([np.asarray(s[j]) for s in samples] for j in range(k))
        out = self.callback(ids, epoch)
        if self.single:
            return (out,)
        if not isinstance(out, (tuple, list)) or len(out) != k:
            raise TypeError(f"callback must return a tuple of {k} batches, got "
                            f"{type(out).__name__}")
        return tuple(out)


class ArraySource(PlanSource):
    """Arrays indexed by sample id (first dimension), fed one planned batch at a time.

    The graph gets one data node per array, in order; e.g. ``ArraySource(images, labels)`` gives
    ``(images, labels)`` to ``define_graph``. Each output has the array's dtype and a sample's shape
    (``labels`` of shape ``(N,)`` give batches of shape ``(B,)``).

    Args:
        *arrays: arrays with the same first dimension N. On the CPU: numpy arrays (torch CPU tensors
            are viewed as numpy). On the GPU: torch CUDA tensors or CuPy arrays (any
            ``__cuda_array_interface__`` object, viewed as a torch tensor without a copy), all on the
            pipeline's ``device_id``.
        layouts: DALI layout per array (e.g. ``("HWC", None)``), or None. Default None. Operators
            such as ``crop_mirror_normalize`` need the image layout.
        device: ``"cpu"`` or ``"gpu"``; default: ``"gpu"`` when the arrays are on a GPU.
        parallel, prefetch_queue_depth: see :class:`PlanSource` (CPU only; parallel workers cannot
            return GPU data).

    GPU mode (``device="gpu"``): the plan is held as a CUDA int64 tensor and each batch is gathered
    with ``index_select`` on a side stream owned by the source; that stream is passed to
    ``fn.external_source(cuda_stream=...)``, so DALI's copy out of the gathered tensors is ordered
    after the gather and no host synchronisation happens per batch.
    """

    def __init__(self, *arrays, layouts: Sequence[str | None] | str | None = None,
                 device: str | None = None, parallel: bool = False,
                 prefetch_queue_depth: int = 2) -> None:
        if not arrays:
            raise ValueError("ArraySource needs at least one array")
        gpu = [_is_gpu_array(a) for a in arrays]
        if device is None:
            device = "gpu" if any(gpu) else "cpu"
        check_choice("device", device, ("cpu", "gpu"))
        if device == "gpu":
            if not all(gpu):
                bad = [i for i, g in enumerate(gpu) if not g]
                raise ValueError(f"device='gpu' needs every array on the GPU; arrays {bad} are on the "
                                 "host (move them once with torch.as_tensor(a, device='cuda'))")
            if parallel:
                raise ValueError("parallel=True cannot carry GPU data; use the serial GPU source")
            # CuPy & co. are viewed through __cuda_array_interface__ (no copy, same device)
            tensors = [a if isinstance(a, torch.Tensor) else torch.as_tensor(a) for a in arrays]
            devs = {t.device for t in tensors}
            if len(devs) != 1:
                raise ValueError(f"all arrays must be on one GPU, got {sorted(map(str, devs))}")
            self._arrays = tensors
        else:
            if any(gpu):
                raise ValueError("device='cpu' was given but some arrays are on the GPU")
            self._arrays = [_host_array(f"arrays[{i}]", a) for i, a in enumerate(arrays)]
        n = {int(a.shape[0]) for a in self._arrays}
        if len(n) != 1:
            raise ValueError(f"arrays must share their first dimension, got lengths {sorted(n)}")
        super().__init__(n.pop(), parallel=parallel, prefetch_queue_depth=prefetch_queue_depth)
        self.device = device
        self.layouts = _layouts(layouts, len(arrays))
        for lay, a in zip(self.layouts, self._arrays):
            if lay is not None and len(lay) != len(a.shape) - 1:
                raise ValueError(f"layout {lay!r} does not match samples of shape {tuple(a.shape[1:])}")
        # GPU state (serial only, lives in the main process): one CUDA plan tensor per slot
        self._stream = None
        self._dev_plans: list[torch.Tensor | None] = [None] * _SLOTS

    # ------------------------------------------------------------------ graph side
    def outputs(self) -> tuple:
        dtypes = [a.dtype if isinstance(a, np.ndarray)
                  else torch.empty(0, dtype=a.dtype).numpy().dtype for a in self._arrays]
        ndims = [len(a.shape) - 1 for a in self._arrays]
        kwargs: dict[str, Any] = {}
        if self.device == "gpu":
            pipe = Pipeline.current()
            dev = self._arrays[0].device
            if pipe is None or pipe.device_id is None or int(pipe.device_id) != dev.index:
                raise ValueError(f"the arrays are on {dev} but the pipeline has "
                                 f"device_id={None if pipe is None else pipe.device_id}")
            self._stream = torch.cuda.Stream(device=dev)
            kwargs["cuda_stream"] = self._stream
        return tuple(self.external_source(dtype=dtypes, ndim=ndims, layout=self.layouts, **kwargs))

    def _setup_plan_storage(self) -> None:
        if self.device == "cpu":
            return super()._setup_plan_storage()
        # the same header, in this process only (the serial GPU source has no workers)
        self._header = SimpleNamespace(array=np.zeros(_HEADER, np.int64))
        _clear_header(self._header.array)
        self._last_slot = 0

    # ------------------------------------------------------------------ iterator side
    def _store(self, slot: int, indices) -> None:
        if self.device == "cpu":
            return super()._store(slot, indices)
        dev = self._arrays[0].device
        plan = torch.as_tensor(indices).to(device=dev, dtype=torch.int64)
        # the plan was written on the current stream; the gathers run on the source's stream
        self._stream.wait_stream(torch.cuda.current_stream(dev))
        plan.record_stream(self._stream)
        self._dev_plans[slot] = plan

    def __call__(self, info) -> tuple:
        if self.device == "cpu":
            return super().__call__(info)                 # the host plan's ids -> gather
        # GPU: the ids stay on the device (a view of the CUDA plan: no host copy, no sync), and
        # the gather runs on the stream DALI was told about
        slot, lo, hi, _ = self._locate(info)
        idx = self._dev_plans[slot][lo:hi]
        with torch.cuda.stream(self._stream):
            return tuple(a.index_select(0, idx) for a in self._arrays)

    def gather(self, ids: np.ndarray, epoch: int) -> tuple:
        """The rows ``ids`` of every array (a tuple even for one array; ``epoch`` is not used).

        The CPU source serves each batch through here (so a subclass may override it, e.g. for
        per-epoch augmentation). The GPU source does not: it serves each batch from its CUDA copy
        of the plan in ``__call__``, with no host ids.
        """
        return tuple(a[ids] for a in self._arrays)


def _globs(name: str, value) -> list[str]:
    """A str or a sequence of str as a list, or TypeError naming ``name``."""
    if isinstance(value, str):
        return [value]
    try:
        globs = list(value)
    except TypeError:
        globs = None
    if globs is None or not all(isinstance(g, str) for g in globs):
        raise TypeError(f"{name} must be a str or a list of str, got {type(value).__name__} "
                        f"{value!r}")
    return globs


def discover_files(file_root: str | os.PathLike, *,
                   file_filters: Sequence[str] | str = READER_FILE_FILTERS,
                   case_sensitive_filter: bool = False,
                   dir_filters: Sequence[str] | str | None = None) -> tuple[list[str], np.ndarray]:
    """The files and labels ``fn.readers.file(file_root=...)`` reads, in its order.

    DALI 2.4's rule: every subdirectory of ``file_root`` (one level; following symlinks; those
    matching ``dir_filters`` if given) is a class, labelled ``0, 1, ...`` in byte-wise sorted name
    order; its regular files and symlinks whose names match one of ``file_filters`` (``fnmatch``
    globs, case-insensitive unless ``case_sensitive_filter``) are its samples, in byte-wise sorted
    order. Files directly in ``file_root`` are not used.

    Returns:
        ``(paths, labels)``: the paths (``file_root`` joined with the class and file name) and an
        int32 array of labels.
    """
    root = os.fspath(file_root)
    file_filters = _globs("file_filters", file_filters)
    if dir_filters is not None:
        dir_filters = _globs("dir_filters", dir_filters)
    case_sensitive_filter = check_bool("case_sensitive_filter", case_sensitive_filter)

    def matches(name: str, globs) -> bool:
        if case_sensitive_filter:
            return any(fnmatch.fnmatchcase(name, g) for g in globs)
        return any(fnmatch.fnmatchcase(name.lower(), g.lower()) for g in globs)

    if not os.path.isdir(root):
        raise ValueError(f"file_root={root!r} is not a directory")
    with os.scandir(root) as entries:
        classes = sorted((e.name for e in entries if e.is_dir()
                          and (not dir_filters or matches(e.name, dir_filters))), key=os.fsencode)
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        with os.scandir(folder) as entries:
            names = sorted((e.name for e in entries
                            if (e.is_symlink() or e.is_file(follow_symlinks=False))
                            and matches(e.name, file_filters)), key=os.fsencode)
        paths += [os.path.join(folder, name) for name in names]
        labels += [label] * len(names)
    if not paths:
        raise ValueError(f"no files matching {list(file_filters)} in the subdirectories of "
                         f"file_root={root!r}")
    return paths, np.asarray(labels, np.int32)


def _file_signature(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


class FileSource(PlanSource):
    """One file per sample: emits paths, DALI reads (``fn.io.file.read``) and decodes them.

    The graph gets ``(images, *arrays)``: the decoded images (or the raw bytes with
    ``decoder=None``), then one node per extra array, e.g. ``FileSource(paths, labels)`` gives
    ``(images, labels)`` to ``define_graph``. ``FileSource(file_root=root)`` finds the files and
    their labels as ``fn.readers.file(file_root=root)`` does (:func:`discover_files`) and gives the
    same ``(images, labels)``.

    Labels look like ``fn.readers.file``'s: a 1-D integer array (one integer per sample) is emitted
    as int32 samples of shape ``(1,)``, so a batch of labels has shape ``(B, 1)`` as with the reader
    and existing ``label.squeeze(-1)`` code keeps working. ``reader_labels=False`` emits such arrays
    unchanged (e.g. int64 of shape ``(B,)``).

    Args:
        files: one path per sample (str or path-like), in sample-id order. Not with ``file_root``.
        *arrays: per-sample host arrays with first dimension N (labels, ...). Not with
            ``file_root``, which makes the labels.
        file_root: a folder with one subdirectory per class, read like ``fn.readers.file``.
        file_filters, case_sensitive_filter, dir_filters: as for ``fn.readers.file`` (with
            ``file_root`` only).
        reader_labels: emit 1-D integer arrays as the reader emits labels (see above). Default True.
        decoder: ``"image"`` (``fn.decoders.image``, default), ``"numpy"`` (``fn.decoders.numpy``,
            CPU) or None (raw bytes, as ``fn.readers.file`` gives them; decode in ``define_graph``,
            e.g. with ``fn.decoders.image_random_crop``).
        output_type: colour space of decoded images. Default ``types.RGB``.
        decoder_device: ``"mixed"`` (GPU decoding) or ``"cpu"``. Default: ``"mixed"`` when the
            pipeline has a ``device_id``, else ``"cpu"``.
        decoder_kwargs: extra arguments for the decoder (e.g. ``{"hw_decoder_load": 0.65}``).
        read_kwargs: extra arguments for ``fn.io.file.read``. Default ``{"dont_use_mmap": True}``
            (plain reads): mapping each file costs ``fn.io.file.read`` a map and an unmap per
            sample, which made it about half as fast on small files in our measurements
            (docs/dali.md, Cost); pass ``{"dont_use_mmap": False}`` for DALI's default.
        layouts: DALI layout per extra array, or None.
        on_error: what to do with a file that cannot be read or decoded.

            * ``"raise"`` (default): the iterator raises :class:`BadSampleError` naming the file, the
              sample id and the epoch. Without ``verify``, nothing is checked up front: after a
              pipeline error the iterator re-reads and re-decodes (on the CPU) the samples of the
              batches in flight to find the culprit, and re-raises DALI's own error if none is bad.
            * ``"skip"``: a bad sample is dropped **from its batch**, in every epoch: that batch is
              shorter; batch boundaries, ``len()`` and resume points are unchanged, and the sample
              is recorded in :attr:`bad_samples`. A batch whose every sample is bad cannot be
              delivered (DALI rejects empty batches) and raises :class:`BadSampleError`. Skipped
              samples are never observed, so a loss-based policy may keep planning them. Needs
              ``verify``.
        verify: check each planned sample before DALI sees it. The first time, and whenever its
            file changed since (size, modification time or inode, from one ``os.stat`` per sample
            and epoch), the file is read and decoded on the CPU with the same decoder; otherwise the
            cached verdict (in shared memory) is reused. So a file deleted, truncated or rewritten
            between epochs is caught in the epoch it is next planned. Default: True for
            ``on_error="skip"``, False for ``"raise"``. Use it with ``"raise"`` too when the data
            may hold undecodable images and the pipeline decodes on the CPU: DALI 2.4's CPU image
            decoder was seen to crash the process (SIGSEGV in ``ImageDecoder<CPUBackend>``) right
            after reporting a decoding error, before the iterator can name the file. A file that
            changes while DALI reads it, or that is altered without changing its size, time or
            inode, still reaches DALI; the iterator then names it in a :class:`BadSampleError`.
        parallel, prefetch_queue_depth: see :class:`PlanSource`. With ``verify`` the checks run in
            the workers.
    """

    def __init__(self, files: Sequence | None = None, *arrays,
                 file_root: str | os.PathLike | None = None,
                 file_filters: Sequence[str] | str = READER_FILE_FILTERS,
                 case_sensitive_filter: bool = False, dir_filters: Sequence[str] | str | None = None,
                 reader_labels: bool = True, decoder: str | None = "image",
                 output_type=types.RGB, decoder_device: str | None = None,
                 decoder_kwargs: dict | None = None,
                 layouts: Sequence[str | None] | str | None = None, on_error: str = "raise",
                 verify: bool | None = None, read_kwargs: dict | None = None,
                 parallel: bool = False, prefetch_queue_depth: int = 2) -> None:
        if file_root is not None:
            if files is not None or arrays:
                raise ValueError("give files (and arrays) or file_root, not both: file_root finds "
                                 "the files and makes the labels")
            files, labels = discover_files(file_root, file_filters=file_filters,
                                           case_sensitive_filter=case_sensitive_filter,
                                           dir_filters=dir_filters)
            arrays = (labels,)
        elif files is None:
            raise TypeError("FileSource needs files (a sequence of paths) or file_root")
        if isinstance(files, (str, bytes, os.PathLike)):
            raise TypeError("files must be a sequence of paths, got a single path")
        files = [os.fspath(f) if isinstance(f, os.PathLike) else f for f in files]
        if not files:
            raise ValueError("files must not be empty")
        wrong = [f for f in files if not isinstance(f, str)]     # (None is an entry too)
        if wrong:
            raise TypeError(f"files must hold str paths, got {type(wrong[0]).__name__} "
                            f"{wrong[0]!r}")
        super().__init__(len(files), parallel=parallel, prefetch_queue_depth=prefetch_queue_depth)
        check_choice("decoder", decoder, ("image", "numpy", None))
        check_choice("on_error", on_error, ("raise", "skip"))
        self.reader_labels = check_bool("reader_labels", reader_labels)
        if verify is None:
            verify = on_error == "skip"
        if not isinstance(verify, bool):
            raise TypeError(f"verify must be a bool or None, got {verify!r}")
        if on_error == "skip" and not verify:
            raise ValueError("on_error='skip' needs verify=True: a bad file must be caught before "
                             "DALI reads it")
        if decoder_device is not None:
            check_choice("decoder_device", decoder_device, ("cpu", "mixed"))
            if decoder == "numpy" and decoder_device != "cpu":
                raise ValueError("decoder='numpy' runs on the CPU only (decoder_device='cpu')")
        if decoder_kwargs is not None and not isinstance(decoder_kwargs, dict):
            raise TypeError(f"decoder_kwargs must be a dict, got {type(decoder_kwargs).__name__}")
        if read_kwargs is not None and not isinstance(read_kwargs, dict):
            raise TypeError(f"read_kwargs must be a dict, got {type(read_kwargs).__name__}")
        self.read_kwargs = {"dont_use_mmap": True, **(read_kwargs or {})}
        self.files = files
        encoded = [os.fsencode(f) for f in files]
        self._offsets = np.zeros(len(files) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        # one buffer (cheap to pickle), a NUL at its end so an empty batch of paths still indexes it
        self._path_bytes = np.frombuffer(b"".join(encoded) + b"\0", np.uint8)
        if any(_is_gpu_array(a) for a in arrays):
            raise ValueError("FileSource arrays must be host arrays (numpy)")
        self._arrays = []
        for i, a in enumerate(arrays):
            a = _host_array(f"arrays[{i}]", a)
            if a.shape[0] != len(files):
                raise ValueError(f"arrays[{i}] has {a.shape[0]} entries for {len(files)} files")
            if self.reader_labels and a.ndim == 1 and a.dtype.kind in "iub":
                if a.size and (a.min() < -2**31 or a.max() >= 2**31):
                    raise ValueError(f"arrays[{i}] holds values outside int32, which labels like "
                                     f"fn.readers.file's cannot carry; pass reader_labels=False")
                a = a.astype(np.int32).reshape(-1, 1)    # the reader's (1,)-shaped int32 labels
            self._arrays.append(a)
        self.layouts = _layouts(layouts, len(arrays))
        self.decoder = decoder
        self.output_type = output_type
        self.decoder_device = decoder_device
        self.decoder_kwargs = dict(decoder_kwargs or {})
        self.on_error = on_error
        self.verify = verify
        self._status: SharedArray | None = None
        self._signature: SharedArray | None = None
        self._delivered: SharedArray | None = None

    # ------------------------------------------------------------------ graph side
    def outputs(self) -> tuple:
        pipe = Pipeline.current()
        dtypes = [types.UINT8] + [types.to_dali_type(a.dtype) for a in self._arrays]
        ndims = [1] + [a.ndim - 1 for a in self._arrays]
        paths, *rest = self.external_source(dtype=dtypes, ndim=ndims, layout=[None] + self.layouts)
        data = fn.io.file.read(paths, **self.read_kwargs)
        if self.decoder == "image":
            device = self.decoder_device or ("mixed" if pipe.device_id is not None else "cpu")
            data = fn.decoders.image(data, device=device, output_type=self.output_type,
                                     **self.decoder_kwargs)
        elif self.decoder == "numpy":
            data = fn.decoders.numpy(data, **self.decoder_kwargs)
        return (data, *rest)

    def _setup_plan_storage(self) -> None:
        super()._setup_plan_storage()
        if self.verify:
            self._status = SharedArray((self.num_samples,), np.uint8, fill=_UNKNOWN)
            self._signature = SharedArray((self.num_samples, 3), np.int64, fill=-1)
        if self.on_error == "skip":
            # per plan storage position: 1 if the sample was delivered in the current epoch
            self._delivered = SharedArray((_SLOTS * self.num_samples,), np.uint8, fill=1)

    def _paths(self, ids: np.ndarray) -> np.ndarray:
        """The batch's paths as one uint8 matrix, row r = path of ``ids[r]`` padded with NUL bytes
        (at least one). One dense array is fed to DALI in one copy, where a list of per-sample
        arrays costs DALI a Python-level step per sample (about a quarter of the reading
        throughput); ``fn.io.file.read`` opens the path up to its first NUL, as every POSIX call
        does (a path cannot contain NUL)."""
        lo, hi = self._offsets[ids], self._offsets[ids + 1]
        lengths = hi - lo
        width = int(lengths.max(initial=0)) + 1
        cols = np.arange(width, dtype=np.int64)
        inside = cols < lengths[:, None]
        pos = np.where(inside, lo[:, None] + cols, 0)
        return np.where(inside, self._path_bytes[pos], np.uint8(0))

    def _serve(self, pos: int, ids: np.ndarray, epoch: int) -> tuple:
        if self.verify:
            good = self._check_batch(ids, epoch)
            if self._delivered is not None:
                self._delivered.array[pos:pos + len(ids)] = good
                ids = ids[good]
        return self.gather(ids, epoch)

    def gather(self, ids: np.ndarray, epoch: int) -> tuple:
        return (self._paths(ids), *(a[ids] for a in self._arrays))

    # ------------------------------------------------------------------ checks
    def _probe(self, i: int) -> tuple[tuple[int, str] | None, tuple[int, int, int] | None]:
        """``(verdict, signature of the file that was checked)``."""
        try:
            with open(self.files[i], "rb") as f:
                sig = _file_signature(os.fstat(f.fileno()))
                raw = f.read()
        except OSError as e:
            return (_UNREADABLE, str(e)), None
        if self.decoder is None:
            return None, sig
        if not raw:
            return (_UNDECODABLE, "the file is empty"), sig
        try:
            import nvidia.dali.experimental.dynamic as ndd   # eager DALI, same decoders
            buf = ndd.as_tensor(np.frombuffer(raw, np.uint8))
            if self.decoder == "image":
                kw = {k: v for k, v in self.decoder_kwargs.items() if k not in ("hw_decoder_load",)}
                ndd.decoders.image(buf, device="cpu", output_type=self.output_type, **kw)
            else:
                ndd.decoders.numpy(buf, **self.decoder_kwargs)
        except Exception as e:    # any decoder failure marks the sample bad
            return (_UNDECODABLE, str(e)), sig
        return None, sig

    def _check_batch(self, ids: np.ndarray, epoch: int) -> np.ndarray:
        """Which samples of a batch load (bool mask); raise in ``on_error="raise"`` mode.

        A cached verdict is reused while the file's signature (size, mtime, inode) is unchanged.
        """
        status, signature = self._status.array, self._signature.array
        for i in ids:
            try:
                sig = _file_signature(os.stat(self.files[i]))
            except OSError:
                sig = None
            if sig is not None and status[i] != _UNKNOWN and tuple(signature[i]) == sig:
                continue
            if sig is None and status[i] == _UNREADABLE:
                continue
            verdict, sig = self._probe(int(i))
            signature[i] = sig if sig is not None else (-1, -1, -1)
            status[i] = _GOOD if verdict is None else verdict[0]
            if verdict is not None and self.on_error == "raise":
                what = "read" if verdict[0] == _UNREADABLE else "decode"
                raise BadSampleError(f"cannot {what} file {self.files[i]!r} (sample index {i}, epoch "
                                     f"{epoch}): {verdict[1]}", index=int(i), path=self.files[i])
        good = status[ids] == _GOOD
        if self.on_error == "raise" and not good.all():   # found bad in an earlier epoch
            i = int(ids[~good][0])
            raise BadSampleError(f"file {self.files[i]!r} (sample index {i}, epoch {epoch}) is "
                                 f"{_REASONS[int(status[i])]}", index=i, path=self.files[i])
        if not good.any():
            i = int(ids[0])
            raise BadSampleError(
                f"every sample of a batch is bad (sample ids {ids.tolist()}, e.g. {self.files[i]!r}, "
                f"epoch {epoch}); on_error='skip' drops bad samples from their batch but DALI cannot "
                "take an empty batch", index=i, path=self.files[i])
        return good

    def kept(self, lo: int, hi: int) -> np.ndarray | None:
        if self._delivered is None:
            return None
        mask = self._delivered.array[lo:hi].astype(bool)
        return None if mask.all() else mask

    def find_bad(self, first: int, last: int) -> tuple[int, str, str, str] | None:
        ids = self._plan.array[max(0, first):min(last, len(self._plan.array))]
        seen: set[int] = set()
        for i in ids.tolist():
            if i in seen:
                continue
            seen.add(i)
            verdict, sig = self._probe(i)
            if verdict is not None:
                if self._status is not None:          # remember it: skip mode skips it from now on
                    self._status.array[i] = verdict[0]
                    self._signature.array[i] = sig if sig is not None else (-1, -1, -1)
                what = "read" if verdict[0] == _UNREADABLE else "decode"
                return i, self.files[i], what, verdict[1]
        return None

    @property
    def bad_samples(self) -> dict[int, tuple[str, str]]:
        if self._status is None:
            return {}
        bad = np.flatnonzero(self._status.array >= _UNREADABLE)
        return {int(i): (self.files[i], _REASONS[int(self._status.array[i])]) for i in bad}
