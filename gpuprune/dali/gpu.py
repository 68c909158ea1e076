"""A source over arrays already on the GPU: each planned batch is gathered there, no host copy.

DALI-side facts this relies on (DALI 2.4, ``nvidia/dali/pipeline.py`` ``_feed_input`` and
``types._raw_cuda_stream``): the ``cuda_stream`` given to ``fn.external_source`` is used for every
batch the source returns, torch tensors included (its ``cuda_stream`` attribute is read when a
batch is fed, not when the graph is defined), and DALI copies each batch into its own buffer on
that stream (``no_copy=False``). The gather runs on the same stream, so DALI's copy is ordered after
it without a host synchronisation, and the gathered tensor may be freed as soon as the callback
returns: torch's caching allocator reuses its memory only for work on that same stream.

Without an explicit stream DALI would take ``torch.cuda.current_stream()`` of the *current* device,
which is the wrong device when the pipeline's ``device_id`` is not the current one.
"""

from __future__ import annotations

from typing import Sequence

import torch
from nvidia.dali.pipeline import Pipeline

from ._window import Window
from .sources import PlanSource, is_gpu_array, layouts_of

__all__ = ["GpuArraySource"]


class _Stream:
    """The source's CUDA stream, created on first use: defining the graph makes no CUDA call.

    DALI reads ``cuda_stream`` (the raw handle) each time it feeds a batch.
    """

    def __init__(self, device: torch.device) -> None:
        self.device, self._stream = device, None

    @property
    def stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return self._stream

    @property
    def cuda_stream(self) -> int:
        return self.stream.cuda_stream


class GpuArraySource(PlanSource):
    """Arrays on one GPU indexed by sample id (first dimension), gathered on that GPU per batch.

    Like :class:`~gpuprune.dali.ArraySource` (one output per array, the array's dtype and sample
    shape), but the arrays stay on the GPU: the share of each epoch's plan is copied to the GPU once
    per epoch (an int64 tensor), and each batch is ``index_select``-ed there on the source's own CUDA
    stream, which DALI uses for its copy (see the module docstring): no host copy and no host
    synchronisation per batch. The pipeline's ``device_id`` must be the arrays' GPU. Serial only:
    DALI's parallel workers cannot return GPU data.

    Each batch is made by :meth:`gather`, which a subclass may override; it gets the batch's ids as
    a CUDA int64 tensor and runs on the source's stream.

    The arrays initialise CUDA in this process before any pipeline is defined, so DALI refuses to
    fork parallel workers for another source of the same process: use ``py_start_method="spawn"``
    there.

    Args:
        *arrays: torch CUDA tensors or CuPy arrays (any ``__cuda_array_interface__`` object, viewed
            as a torch tensor without a copy), all on one GPU, with the same first dimension N.
        layouts: DALI layout per array (e.g. ``("HWC", None)``), or None.
    """

    device = "gpu"

    def __init__(self, *arrays, layouts: Sequence[str | None] | str | None = None) -> None:
        if not arrays:
            raise ValueError("GpuArraySource needs at least one array")
        host = [i for i, a in enumerate(arrays) if not is_gpu_array(a)]
        if host:
            raise TypeError(f"GpuArraySource needs arrays on the GPU, but arrays {host} are on the "
                            f"host: move them once with torch.as_tensor(a, device='cuda'), or use "
                            f"gpuprune.dali.ArraySource")
        tensors = [a if isinstance(a, torch.Tensor) else torch.as_tensor(a) for a in arrays]
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            raise ValueError(f"all arrays must be on one GPU, got {sorted(map(str, devices))}")
        n = {int(t.shape[0]) for t in tensors}
        if len(n) != 1:
            raise ValueError(f"arrays must share their first dimension, got lengths {sorted(n)}")
        super().__init__(n.pop())
        self._arrays = tensors
        self.layouts = layouts_of(layouts, len(tensors))
        for lay, t in zip(self.layouts, tensors):
            if lay is not None and len(lay) != t.dim() - 1:
                raise ValueError(f"layout {lay!r} does not match samples of shape "
                                 f"{tuple(t.shape[1:])}")
        self._stream = _Stream(devices.pop())
        self._dev_ids: torch.Tensor | None = None

    @property
    def cuda_device(self) -> torch.device:
        """The GPU the arrays live on."""
        return self._stream.device

    def outputs(self) -> tuple:
        pipe = Pipeline.current()
        dev = self.cuda_device
        device_id = None if pipe is None else pipe.device_id
        if pipe is not None and (device_id is None or int(device_id) != dev.index):
            raise ValueError(f"the arrays are on {dev} but the pipeline has device_id={device_id}; "
                             f"build it with device_id={dev.index}")
        dtypes = [torch.empty(0, dtype=t.dtype).numpy().dtype for t in self._arrays]
        return tuple(self.external_source(dtype=dtypes, ndim=[t.dim() - 1 for t in self._arrays],
                                          layout=self.layouts, cuda_stream=self._stream))

    def _allocate(self) -> None:
        # serial: the window lives in this process only, the share on the GPU
        self._window = Window(self.batch_size, shared=False)

    def _store(self, ids: torch.Tensor) -> None:
        ids = ids.to(device=self.cuda_device, dtype=torch.int64)
        stream = self._stream.stream
        # the share was written on the current stream; the gathers read it on the source's stream
        stream.wait_stream(torch.cuda.current_stream(self.cuda_device))
        ids.record_stream(stream)
        self._dev_ids = ids

    def __call__(self, info) -> tuple:
        lo, hi, epoch = self._window.locate(info, type(self).__name__)
        with torch.cuda.stream(self._stream.stream):
            return self._serve(self._dev_ids[lo:hi], epoch)

    def gather(self, ids: torch.Tensor, epoch: int) -> tuple:
        """The rows ``ids`` (a CUDA int64 tensor) of every array, gathered on the source's stream
        (a tuple even for one array; ``epoch`` is not used)."""
        return tuple(a.index_select(0, ids) for a in self._arrays)
