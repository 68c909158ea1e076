"""External-source callables that feed a DALI pipeline only the planned samples.

A source sits at the start of the user's DALI graph. :meth:`PlanSource.outputs` creates the
``fn.external_source`` node (batch mode, ``batch_info=True``) and returns its data nodes. Each epoch,
:class:`~gpuprune.dali.PrunedDALIIterator` publishes this rank's plan to the source; DALI then calls
the source with ``BatchInfo(iteration, epoch_idx)`` and the source returns batch ``iteration`` of the
plan, raising ``StopIteration`` past the last one (dali.md §1).

The sample ids do not travel through DALI: an external source hands out iteration ``i``'s data as
the pipeline's output ``i`` (a FIFO), so the iterator knows that its ``j``-th batch of a pass is plan
batch ``start + j`` and attaches ids and loss weights from the plan itself. An extra pipeline output
would cost DALI 2.4 about 0.1 ms per batch on the CPU (measured), about 7% of a cheap pipeline.

Sources:

* :class:`ArraySource`: in-memory arrays. numpy on the CPU (gathered by fancy indexing, optionally
  in parallel workers), or torch/CuPy arrays already on the GPU with ``device="gpu"`` (gathered on
  the GPU with ``index_select``; no host copy).
* :class:`FileSource`: one file per sample. The source emits paths; ``fn.io.file.read`` reads them in
  DALI's thread pool and ``fn.decoders.image`` decodes them (``device="mixed"`` on a GPU pipeline).

The plan of a CPU source is kept in shared memory (:class:`~gpuprune.dali._shared.SharedArray`), so
parallel workers see each new epoch's plan without being restarted.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

from .._checks import check_choice, check_int
from ._shared import SharedArray

__all__ = ["PlanSource", "ArraySource", "FileSource", "BadSampleError"]

# header slots of the published plan (int64)
_TAG, _START, _NBATCH, _LEN, _BS = range(5)
_NO_PLAN = -1

# FileSource sample status (uint8, shared with workers in skip mode)
_UNKNOWN, _GOOD, _UNREADABLE, _UNDECODABLE = 0, 1, 2, 3
_REASONS = {_UNREADABLE: "unreadable", _UNDECODABLE: "undecodable"}


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
        raise ValueError(f"layouts must have one entry per array ({count}), got layouts={layouts!r}")
    for lay in layouts:
        if lay is not None and not isinstance(lay, str):
            raise TypeError(f"layouts entries must be str or None, got {lay!r}")
    return layouts


def _is_gpu_array(a) -> bool:
    if isinstance(a, torch.Tensor):
        return a.is_cuda
    return hasattr(a, "__cuda_array_interface__")


def _host_array(name: str, a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().numpy()          # DALI callbacks must return numpy (dali.md §2.11)
    a = np.asarray(a)
    if a.ndim == 0:
        raise ValueError(f"{name} must have a first (sample) dimension, got a scalar")
    if a.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got dtype=object")
    return a


class PlanSource(ABC):
    """Base of the external sources driven by :class:`~gpuprune.dali.PrunedDALIIterator`.

    Subclasses implement :meth:`outputs` (the graph side) and :meth:`_gather` (one batch of data for
    a list of sample ids). The iterator calls :meth:`publish` before each epoch and :meth:`cut` to
    end an epoch early.

    Args:
        num_samples: N, the dataset size; a plan's ids must lie in ``[0, N)``.
        parallel: run the callback in DALI's Python worker processes (``fn.external_source(...,
            parallel=True)``; set ``py_num_workers`` / ``py_start_method`` on the pipeline). Pays off
            when the callback does real Python work; for cheap in-memory gathers the serial mode is
            faster (dali.md §3). Default ``False``.
        prefetch_queue_depth: batches each worker prepares ahead in parallel mode. Default ``2``.
    """

    #: "cpu" or "gpu": where the external source's outputs live
    device: str = "cpu"

    def __init__(self, num_samples: int, *, parallel: bool = False, prefetch_queue_depth: int = 2
                 ) -> None:
        self.num_samples = check_int("num_samples", num_samples, minimum=1)
        if not isinstance(parallel, bool):
            raise TypeError(f"parallel must be a bool, got {parallel!r}")
        self.parallel = parallel
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
        self._header = SharedArray((5,), np.int64, fill=0)
        self._header.array[_TAG] = _NO_PLAN
        # this rank's plan: 4 bytes per id while ids fit int32
        self._plan = SharedArray((self.num_samples,),
                                 np.int32 if self.num_samples <= 2**31 else np.int64)

    def _external_source(self, dtypes: Sequence, ndims: Sequence[int], layouts: Sequence,
                         **kwargs) -> list:
        return fn.external_source(
            source=self, num_outputs=len(dtypes), batch=True, batch_info=True,
            parallel=self.parallel,
            **({"prefetch_queue_depth": self.prefetch_queue_depth} if self.parallel else {}),
            dtype=list(dtypes), ndim=list(ndims), layout=list(layouts), device=self.device, **kwargs)

    # ------------------------------------------------------------------ iterator side
    def publish(self, tag: int, indices, start_batch: int, num_batches: int) -> None:
        """Make ``indices`` the plan that DALI epoch ``tag`` reads.

        Args:
            tag: the pipeline's epoch counter (``BatchInfo.epoch_idx``) the plan is for.
            indices: this rank's sample ids in order (a torch tensor or array).
            start_batch: first batch of the plan to serve (non-zero when resuming mid-epoch).
            num_batches: batches to serve from ``start_batch``; DALI iteration ``i`` gets plan batch
                ``start_batch + i`` and iteration ``num_batches`` raises ``StopIteration``.
        """
        if self.batch_size is None:
            raise RuntimeError(f"{type(self).__name__} is not part of a pipeline yet; build the "
                               "pipeline with source.outputs() first")
        n = self._check_indices(indices)
        h = self._header.array
        h[_TAG] = _NO_PLAN                     # workers treat the plan as absent while it changes
        self._store(indices)
        h[_START], h[_NBATCH], h[_LEN], h[_BS] = start_batch, num_batches, n, self.batch_size
        h[_TAG] = tag

    def _check_indices(self, indices) -> int:
        n = len(indices)
        if n > self.num_samples:
            raise ValueError(f"a plan of {n} entries does not fit this source of "
                             f"{self.num_samples} samples")
        return n

    def _store(self, indices) -> None:
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()     # one copy per epoch for a GPU plan
        self._plan.array[:len(indices)] = indices

    def cut(self) -> None:
        """End the current epoch early: every later call raises ``StopIteration``."""
        if self._header is not None:
            self._header.array[_NBATCH] = 0

    def _planned(self, info) -> np.ndarray:
        """The sample ids of DALI iteration ``info.iteration``, or ``StopIteration``."""
        h = self._header.array
        tag = int(h[_TAG])
        if info.epoch_idx != tag:
            if info.epoch_idx < tag or (self.parallel and tag == _NO_PLAN):
                raise StopIteration      # a stale prefetch of an epoch that has ended
            raise RuntimeError(
                f"DALI asked {type(self).__name__} for epoch {info.epoch_idx}, but the published plan "
                f"is for epoch {tag} (-1: none); drive the pipeline with PrunedDALIIterator")
        if info.iteration >= int(h[_NBATCH]):
            raise StopIteration
        bs = int(h[_BS])
        lo = (int(h[_START]) + info.iteration) * bs
        return np.array(self._plan.array[lo:min(lo + bs, int(h[_LEN]))])   # a private copy

    def __call__(self, info) -> tuple:
        return self._gather(self._planned(info))

    @abstractmethod
    def _gather(self, idx: np.ndarray) -> tuple:
        """The callback's return value for sample ids ``idx``: one batch per output."""

    def kept(self, lo: int, hi: int) -> np.ndarray | None:
        """Which of plan entries ``[lo, hi)`` the source delivered (a bool mask), None for all.

        Only a source that skips bad samples drops any; the iterator calls this after DALI has
        produced the batch, when the source's verdicts for it are final.
        """
        return None

    # ------------------------------------------------------------------ errors
    def find_bad(self, first_batch: int, last_batch: int) -> tuple[int, str, str, str] | None:
        """The first sample in plan batches ``[first_batch, last_batch)`` that cannot be loaded.

        Used by the iterator after a pipeline error. Returns ``(index, path, what, detail)`` with
        ``what`` in ``("read", "decode")``, or None. Sources without files return None.
        """
        return None

    @property
    def bad_samples(self) -> dict[int, tuple[str, str]]:
        """Samples skipped so far: ``{index: (path, "unreadable" | "undecodable")}``."""
        return {}


class ArraySource(PlanSource):
    """Arrays indexed by sample id (first dimension), fed one planned batch at a time.

    The graph gets one data node per array, in order; e.g. ``ArraySource(images, labels)`` gives
    ``(images, labels)`` to ``define_graph``.

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
        # GPU state (serial only, lives in the main process)
        self._stream = None
        self._dev_plan: torch.Tensor | None = None
        self._gpu_header = [_NO_PLAN, 0, 0, 0]     # tag, start, num_batches, len

    # ------------------------------------------------------------------ graph side
    def outputs(self) -> tuple:
        pipe = self._bind()
        dtypes = [types.to_dali_type(a.dtype) for a in self._arrays]
        ndims = [len(a.shape) - 1 for a in self._arrays]
        kwargs: dict[str, Any] = {}
        if self.device == "gpu":
            dev = self._arrays[0].device
            if pipe.device_id is None or int(pipe.device_id) != dev.index:
                raise ValueError(f"the arrays are on {dev} but the pipeline has "
                                 f"device_id={pipe.device_id}")
            self._stream = torch.cuda.Stream(device=dev)
            kwargs["cuda_stream"] = self._stream
        return tuple(self._external_source(dtypes, ndims, self.layouts, **kwargs))

    def _setup_plan_storage(self) -> None:
        if self.device == "cpu":
            super()._setup_plan_storage()

    # ------------------------------------------------------------------ iterator side
    def publish(self, tag: int, indices, start_batch: int, num_batches: int) -> None:
        if self.device == "cpu":
            return super().publish(tag, indices, start_batch, num_batches)
        if self.batch_size is None:
            raise RuntimeError("ArraySource is not part of a pipeline yet; build the pipeline with "
                               "source.outputs() first")
        n = self._check_indices(indices)
        dev = self._arrays[0].device
        plan = torch.as_tensor(indices).to(device=dev, dtype=torch.int64)
        # the plan was written on the current stream; the gathers run on the source's stream
        self._stream.wait_stream(torch.cuda.current_stream(dev))
        plan.record_stream(self._stream)
        self._dev_plan = plan
        self._gpu_header = [int(tag), int(start_batch), int(num_batches), n]

    def cut(self) -> None:
        if self.device == "cpu":
            return super().cut()
        self._gpu_header[2] = 0

    def __call__(self, info) -> tuple:
        if self.device == "cpu":
            return self._gather(self._planned(info))
        tag, start, num_batches, n = self._gpu_header
        if info.epoch_idx != tag:
            if info.epoch_idx < tag:
                raise StopIteration
            raise RuntimeError(f"DALI asked ArraySource for epoch {info.epoch_idx}, but the published "
                               f"plan is for epoch {tag} (-1: none)")
        if info.iteration >= num_batches:
            raise StopIteration
        lo = (start + info.iteration) * self.batch_size
        idx = self._dev_plan[lo:min(lo + self.batch_size, n)]     # a view: no copy, no sync
        with torch.cuda.stream(self._stream):
            return tuple(a.index_select(0, idx) for a in self._arrays)

    def _gather(self, idx: np.ndarray) -> tuple:
        return tuple(a[idx] for a in self._arrays)     # a tuple even for one array (§2.10)


class FileSource(PlanSource):
    """One file per sample: emits paths, DALI reads (``fn.io.file.read``) and decodes them.

    The graph gets ``(images, *arrays)``: the decoded images (or the raw bytes with
    ``decoder=None``), then one node per extra array, e.g. ``FileSource(paths, labels)`` gives
    ``(images, labels)`` to ``define_graph``.

    Args:
        files: one path per sample (str or path-like), in sample-id order.
        *arrays: per-sample host arrays with first dimension N (labels, ...).
        decoder: ``"image"`` (``fn.decoders.image``, default), ``"numpy"`` (``fn.decoders.numpy``,
            CPU) or None (raw bytes; decode in ``define_graph``, e.g. with
            ``fn.decoders.image_random_crop``).
        output_type: colour space of decoded images. Default ``types.RGB``.
        decoder_device: ``"mixed"`` (GPU decoding) or ``"cpu"``. Default: ``"mixed"`` when the
            pipeline has a ``device_id``, else ``"cpu"``.
        decoder_kwargs: extra arguments for the decoder (e.g. ``{"hw_decoder_load": 0.65}``).
        layouts: DALI layout per extra array, or None.
        on_error: what to do with a file that cannot be read or decoded.

            * ``"raise"`` (default): the iterator raises :class:`BadSampleError` naming the file, the
              sample id and the epoch. Without ``verify``, nothing is checked up front: after a
              pipeline error the iterator re-reads and re-decodes (on the CPU) the samples of the
              batches in flight to find the culprit, and re-raises DALI's own error if none is bad.
            * ``"skip"``: a bad sample is dropped **from its batch**: that batch is shorter; batch
              boundaries, ``len()`` and resume points are unchanged, and the sample is recorded in
              :attr:`bad_samples`. A batch whose every sample is bad cannot be delivered (DALI
              rejects empty batches) and raises :class:`BadSampleError`. Skipped samples are never
              observed, so a loss-based policy may keep planning them (they are skipped again at no
              extra cost). Needs ``verify``.
        verify: check each sample the first time it is planned, before DALI sees it: read the file
            and decode it on the CPU with the same decoder (about one extra CPU decode per sample,
            once per run; verdicts are cached in shared memory for later epochs). Default: True for
            ``on_error="skip"``, False for ``"raise"``. Use it with ``"raise"`` too when the data
            may hold undecodable images and the pipeline decodes on the CPU: DALI 2.4's CPU image
            decoder was seen to crash the process (SIGSEGV in ``ImageDecoder<CPUBackend>``) right
            after reporting a decoding error, before the iterator can name the file. Unreadable
            files are reported cleanly either way.
        parallel, prefetch_queue_depth: see :class:`PlanSource`. With ``verify`` the checks run in
            the workers.
    """

    def __init__(self, files: Sequence, *arrays, decoder: str | None = "image",
                 output_type=types.RGB, decoder_device: str | None = None,
                 decoder_kwargs: dict | None = None,
                 layouts: Sequence[str | None] | str | None = None, on_error: str = "raise",
                 verify: bool | None = None, parallel: bool = False,
                 prefetch_queue_depth: int = 2) -> None:
        if isinstance(files, (str, bytes, os.PathLike)):
            raise TypeError("files must be a sequence of paths, got a single path")
        files = [os.fspath(f) for f in files]
        if not files:
            raise ValueError("files must not be empty")
        wrong = next((f for f in files if not isinstance(f, str)), None)
        if wrong is not None:
            raise TypeError(f"files must hold str paths, got {type(wrong).__name__} {wrong!r}")
        super().__init__(len(files), parallel=parallel, prefetch_queue_depth=prefetch_queue_depth)
        check_choice("decoder", decoder, ("image", "numpy", None))
        check_choice("on_error", on_error, ("raise", "skip"))
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
        self.files = files
        encoded = [f.encode() for f in files]
        self._offsets = np.zeros(len(files) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._path_bytes = np.frombuffer(b"".join(encoded), np.uint8)   # one buffer: cheap to pickle
        if any(_is_gpu_array(a) for a in arrays):
            raise ValueError("FileSource arrays must be host arrays (numpy)")
        self._arrays = [_host_array(f"arrays[{i}]", a) for i, a in enumerate(arrays)]
        for i, a in enumerate(self._arrays):
            if a.shape[0] != len(files):
                raise ValueError(f"arrays[{i}] has {a.shape[0]} entries for {len(files)} files")
        self.layouts = _layouts(layouts, len(arrays))
        self.decoder = decoder
        self.output_type = output_type
        self.decoder_device = decoder_device
        self.decoder_kwargs = dict(decoder_kwargs or {})
        self.on_error = on_error
        self.verify = verify
        self._status: SharedArray | None = None

    # ------------------------------------------------------------------ graph side
    def outputs(self) -> tuple:
        pipe = self._bind()
        dtypes = [types.UINT8] + [types.to_dali_type(a.dtype) for a in self._arrays]
        ndims = [1] + [a.ndim - 1 for a in self._arrays]
        paths, *rest = self._external_source(dtypes, ndims, [None] + self.layouts)
        data = fn.io.file.read(paths)
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

    def _path(self, i: int) -> np.ndarray:
        return self._path_bytes[self._offsets[i]:self._offsets[i + 1]]

    def _gather(self, idx: np.ndarray) -> tuple:
        if self.verify:
            idx = self._keep_good(idx)
        return ([self._path(i) for i in idx], *(a[idx] for a in self._arrays))

    # ------------------------------------------------------------------ checks
    def check_sample(self, i: int) -> tuple[int, str] | None:
        """Read sample ``i``'s file and decode it on the CPU like the pipeline does.

        Returns None when it loads, else ``(status, detail)``.
        """
        try:
            with open(self.files[i], "rb") as f:
                raw = f.read()
        except OSError as e:
            return _UNREADABLE, str(e)
        if self.decoder is None:
            return None
        if not raw:
            return _UNDECODABLE, "the file is empty"
        try:
            import nvidia.dali.experimental.dynamic as ndd   # eager DALI, same decoders
            buf = ndd.as_tensor(np.frombuffer(raw, np.uint8))
            if self.decoder == "image":
                kw = {k: v for k, v in self.decoder_kwargs.items() if k not in ("hw_decoder_load",)}
                ndd.decoders.image(buf, device="cpu", output_type=self.output_type, **kw)
            else:
                ndd.decoders.numpy(buf, **self.decoder_kwargs)
        except Exception as e:    # any decoder failure marks the sample bad
            return _UNDECODABLE, str(e)
        return None

    def _keep_good(self, idx: np.ndarray) -> np.ndarray:
        """Check the not-yet-checked samples of a batch; raise or drop the bad ones."""
        status = self._status.array
        for i in idx[status[idx] == _UNKNOWN]:
            verdict = self.check_sample(int(i))
            status[i] = _GOOD if verdict is None else verdict[0]
            if verdict is not None and self.on_error == "raise":
                what = "read" if verdict[0] == _UNREADABLE else "decode"
                raise BadSampleError(f"cannot {what} file {self.files[i]!r} (sample index {i}): "
                                     f"{verdict[1]}", index=int(i), path=self.files[i])
        good = status[idx] == _GOOD
        if self.on_error == "raise" and not good.all():   # found bad in an earlier pass
            i = int(idx[~good][0])
            raise BadSampleError(f"file {self.files[i]!r} (sample index {i}) is "
                                 f"{_REASONS[int(status[i])]}", index=i, path=self.files[i])
        keep = idx[good]
        if keep.size == 0:
            i = int(idx[0])
            raise BadSampleError(
                f"every sample of a batch is bad (sample ids {idx.tolist()}, e.g. {self.files[i]!r}); "
                "on_error='skip' drops bad samples from their batch but DALI cannot take an empty "
                "batch", index=i, path=self.files[i])
        return keep

    def kept(self, lo: int, hi: int) -> np.ndarray | None:
        if self.on_error != "skip":
            return None
        mask = self._status.array[self._plan.array[lo:hi]] == _GOOD
        return None if mask.all() else mask

    def find_bad(self, first_batch: int, last_batch: int) -> tuple[int, str, str, str] | None:
        h = self._header.array
        bs, n = int(h[_BS]), int(h[_LEN])
        ids = self._plan.array[max(0, first_batch) * bs:min(n, last_batch * bs)]
        seen: set[int] = set()
        for i in ids.tolist():
            if i in seen:
                continue
            seen.add(i)
            verdict = self.check_sample(i)
            if verdict is not None:
                what = "read" if verdict[0] == _UNREADABLE else "decode"
                return i, self.files[i], what, verdict[1]
        return None

    @property
    def bad_samples(self) -> dict[int, tuple[str, str]]:
        if self._status is None:
            return {}
        bad = np.flatnonzero(self._status.array >= _UNREADABLE)
        return {int(i): (self.files[i], _REASONS[int(self._status.array[i])]) for i in bad}
