"""External-source callables that feed a DALI pipeline only the planned samples.

A source sits at the start of the user's DALI graph. :meth:`PlanSource.outputs` creates the
``fn.external_source`` node (batch mode, ``batch_info=True``) and returns its data nodes. Before each
DALI epoch, :class:`~gpuprune.dali.PrunedDALIIterator` publishes this rank's share of the epoch's plan
to the source; DALI then calls the source with ``BatchInfo(iteration, epoch_idx)`` and the source
returns batch ``iteration`` of the share, raising ``StopIteration`` past the last one.

The sample ids do not travel through DALI: an external source hands out iteration ``i``'s data as
the pipeline's output ``i`` (a FIFO), so the iterator knows that its ``j``-th batch of an epoch is
the ``j``-th planned batch and attaches ids and loss weights from the plan itself (an extra pipeline
output would only add work to every batch).

Sources here: :class:`ArraySource` (numpy arrays, gathered by fancy indexing, optionally in DALI's
parallel workers) and :class:`CallbackSource` (your own loading code, per batch or per sample).
Elsewhere: :class:`~gpuprune.dali.GpuArraySource` (arrays on the GPU, :mod:`gpuprune.dali.gpu`) and
:class:`~gpuprune.dali.FileSource` (one file per sample, :mod:`gpuprune.dali.files`).

Writing a source: subclass :class:`PlanSource`, implement :meth:`PlanSource.gather` (one batch for
an array of sample ids and the epoch) and :meth:`PlanSource.outputs` (call
:meth:`PlanSource.external_source` with the outputs' types).

The share and the published window of a CPU source live in shared memory
(:class:`~gpuprune.dali._shared.SharedArray`, :class:`~gpuprune.dali._window.Window`), so parallel
workers see each new epoch's plan without being restarted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

from .._checks import check_bool, check_int
from ..sizes import index_dtype
from ._shared import SharedArray
from ._window import Window

__all__ = ["PlanSource", "ArraySource", "CallbackSource", "BadSampleError"]


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


def layouts_of(layouts, count: int) -> list[str | None]:
    """One DALI layout (or None) per output, or TypeError/ValueError naming ``layouts``."""
    if layouts is None:
        return [None] * count
    if isinstance(layouts, str):
        layouts = [layouts]
    if not isinstance(layouts, (list, tuple)):
        raise TypeError(f"layouts must be a str, a list of str/None or None, got "
                        f"{type(layouts).__name__} {layouts!r}")
    layouts = list(layouts)
    if len(layouts) != count:
        raise ValueError(f"layouts must have one entry per output ({count}), got layouts={layouts!r}")
    for lay in layouts:
        if lay is not None and not isinstance(lay, str):
            raise TypeError(f"layouts entries must be str or None, got {lay!r}")
    return layouts


def dali_type(d) -> types.DALIDataType:
    """``d`` as a DALI type (from a DALI type or anything ``np.dtype`` takes); TypeError if not."""
    if isinstance(d, types.DALIDataType):
        return d
    try:
        return types.to_dali_type(np.dtype(d))
    except (TypeError, ValueError, KeyError) as e:
        raise TypeError(f"dtype must be a DALI type or a numpy dtype (one per output), got "
                        f"{d!r}") from e


def is_gpu_array(a) -> bool:
    """A torch CUDA tensor or any ``__cuda_array_interface__`` object (CuPy, ...)."""
    if isinstance(a, torch.Tensor):
        return a.is_cuda
    return hasattr(a, "__cuda_array_interface__")


def host_array(name: str, a) -> np.ndarray:
    """``a`` as a numeric numpy array with a sample dimension (torch CPU tensors are viewed)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().numpy()          # CPU torch tensors from callbacks fail on CPU-only torch
    a = np.asarray(a)
    if a.ndim == 0:
        raise ValueError(f"{name} must have a first (sample) dimension, got a scalar")
    if a.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got dtype=object")
    return a


class PlanSource(ABC):
    """Base of the external sources driven by :class:`~gpuprune.dali.PrunedDALIIterator`.

    A subclass implements two methods:

    * :meth:`outputs` (the graph side): call :meth:`external_source` with the outputs' dtypes and
      dimensions inside the pipeline definition and return the data nodes (optionally followed by
      operators, as :class:`~gpuprune.dali.FileSource` does with ``fn.io.file.read``);
    * :meth:`gather` (the data side): one batch of data for an array of planned sample ids and the
      epoch they are planned for.

    Before each DALI epoch the iterator publishes this rank's share of the plan (:meth:`publish`);
    it ends a DALI epoch early with :meth:`cut`.

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
        self._window: Window | None = None
        self._ids: SharedArray | None = None     # this rank's share, as published

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
        dtypes = [dali_type(d) for d in dtype]
        ndims = [check_int("ndim", d, minimum=0) for d in ndim]
        if len(ndims) != len(dtypes):
            raise ValueError(f"dtype and ndim must have one entry per output, got {len(dtypes)} "
                             f"and {len(ndims)}")
        layouts = layouts_of(layout, len(dtypes))
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
        self._allocate()
        return pipe

    def _allocate(self) -> None:
        """The shared storage, made before the pipeline is built, so forked workers inherit it."""
        self._window = Window(self.batch_size, shared=True)
        # this rank's share (padded by at most a batch with FILL), in the plans' id type (4 bytes
        # per id while ids fit int32); a sparse file: only the entries written take memory
        dtype = torch.empty(0, dtype=index_dtype(self.num_samples)).numpy().dtype
        self._ids = SharedArray((self.num_samples + self.batch_size,), dtype)

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

    def __call__(self, info) -> tuple:
        lo, hi, epoch = self._window.locate(info, type(self).__name__)
        return self._serve(self._ids.array[lo:hi].astype(np.int64), epoch)   # a private copy

    def _serve(self, ids: np.ndarray, epoch: int) -> tuple:
        out = self.gather(ids, epoch)
        if not isinstance(out, tuple):
            raise TypeError(f"{type(self).__name__}.gather must return a tuple with one batch per "
                            f"output, got {type(out).__name__}")
        return out

    # ------------------------------------------------------------------ iterator side
    def publish(self, tag: int, epoch: int, ids: torch.Tensor, start: int, end: int) -> None:
        """Make DALI epoch ``tag`` serve entries ``[start, end)`` of ``ids``, for ``epoch``.

        Args:
            tag: the DALI epoch (``BatchInfo.epoch_idx``) the window is for.
            epoch: the training epoch (passed on to :meth:`gather`).
            ids: this rank's share of the plan in serving order (a torch tensor on any device:
                one copy to the host per epoch for a CPU source).
            start: first entry served (non-zero when resuming mid-epoch).
            end: one past the last entry served; DALI iteration ``i`` gets entries
                ``start + i * batch_size`` onwards.
        """
        if self.batch_size is None:
            raise RuntimeError(f"{type(self).__name__} is not part of a pipeline yet; build the "
                               "pipeline with source.outputs() first")
        if end > self.num_samples + self.batch_size:
            raise ValueError(f"a share of {end} entries does not fit this source of "
                             f"{self.num_samples} samples")
        self._store(ids[:end])
        self._window.publish(tag, epoch, start, end)

    def _store(self, ids: torch.Tensor) -> None:
        self._ids.array[:len(ids)] = ids.detach().cpu().numpy()

    def cut(self) -> None:
        """End the current DALI epoch early: every later call raises ``StopIteration``."""
        if self._window is not None:
            self._window.cut()

    def kept(self, lo: int, hi: int) -> np.ndarray | None:
        """Which of the published entries ``[lo, hi)`` the source delivered (a bool mask), None
        for all. Only a source that skips bad samples drops any; the iterator asks after DALI has
        produced the batch."""
        return None

    def find_bad(self, first: int, last: int) -> tuple[int, str, str, str] | None:
        """The first sample among the published entries ``[first, last)`` that cannot be loaded:
        ``(index, path, what, detail)`` with ``what`` in ``("read", "decode")``, or None. Used by
        the iterator after a pipeline error; sources without files return None."""
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
            dali_type(d)                    # checked here, not when the pipeline is built
        self.ndims = [check_int("ndim", d, minimum=0)
                      for d in (list(ndim) if isinstance(ndim, (list, tuple)) else [ndim])]
        if len(self.ndims) != len(self.dtypes):
            raise ValueError(f"dtype and ndim must have one entry per output, got dtype={dtype!r}, "
                             f"ndim={ndim!r}")
        self.layouts = layouts_of(layout, len(self.dtypes))
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
    """Host arrays indexed by sample id (first dimension), fed one planned batch at a time.

    The graph gets one data node per array, in order; e.g. ``ArraySource(images, labels)`` gives
    ``(images, labels)`` to ``define_graph``. Each output has the array's dtype and a sample's shape
    (``labels`` of shape ``(N,)`` give batches of shape ``(B,)``). Each batch is made by
    :meth:`gather`, so a subclass may override it (e.g. for per-epoch augmentation). Arrays already
    on the GPU: :class:`~gpuprune.dali.GpuArraySource`.

    Args:
        *arrays: numpy arrays (torch CPU tensors are viewed as numpy) with the same first
            dimension N.
        layouts: DALI layout per array (e.g. ``("HWC", None)``), or None. Default None. Operators
            such as ``crop_mirror_normalize`` need the image layout.
        parallel, prefetch_queue_depth: see :class:`PlanSource`.
    """

    def __init__(self, *arrays, layouts: Sequence[str | None] | str | None = None,
                 parallel: bool = False, prefetch_queue_depth: int = 2) -> None:
        if not arrays:
            raise ValueError("ArraySource needs at least one array")
        on_gpu = [i for i, a in enumerate(arrays) if is_gpu_array(a)]
        if on_gpu:
            raise TypeError(f"ArraySource holds host arrays, but arrays {on_gpu} are on a GPU: use "
                            "gpuprune.dali.GpuArraySource for arrays on the GPU")
        self._arrays = [host_array(f"arrays[{i}]", a) for i, a in enumerate(arrays)]
        n = {int(a.shape[0]) for a in self._arrays}
        if len(n) != 1:
            raise ValueError(f"arrays must share their first dimension, got lengths {sorted(n)}")
        super().__init__(n.pop(), parallel=parallel, prefetch_queue_depth=prefetch_queue_depth)
        self.layouts = layouts_of(layouts, len(arrays))
        for lay, a in zip(self.layouts, self._arrays):
            if lay is not None and len(lay) != a.ndim - 1:
                raise ValueError(f"layout {lay!r} does not match samples of shape {a.shape[1:]}")

    def outputs(self) -> tuple:
        return tuple(self.external_source(dtype=[a.dtype for a in self._arrays],
                                          ndim=[a.ndim - 1 for a in self._arrays],
                                          layout=self.layouts))

    def gather(self, ids: np.ndarray, epoch: int) -> tuple:
        """The rows ``ids`` of every array (a tuple even for one array; ``epoch`` is not used)."""
        return tuple(a[ids] for a in self._arrays)
