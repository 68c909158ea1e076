"""The one place that chooses who computes: the CUDA kernels or torch.

A :class:`Backend` offers the three primitives everything else is built from, with the same
signature and the same results on both implementations:

* :meth:`Backend.observe_`: apply a batch of (id, loss) observations to the statistics;
* :meth:`Backend.top_k`: the k largest unique keys ``orderable(score) << 32 | hash32(id, seed)``
  (:mod:`gpuprune.keys`), i.e. the k highest scores with ties broken at random;
* :meth:`Backend.shuffle`: ids in a keyed pseudo-random order that depends only on the set (index
  order, then the keyed positions of :func:`gpuprune.keys.permute_ranks`: no sort of keys).

Policies compute their scores with plain torch ops (the same on both backends) and call these;
nothing else in gpuprune looks at which backend runs. ``backend="auto"`` takes the kernels on a CUDA
device where CuPy loads them, else torch; ``"cuda"`` insists (and says why it cannot); ``"torch"``
never uses them. The torch backend is the reference that the kernels match bit for bit.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod

import numpy as np
import torch

from ._checks import check_choice
from .keys import composite_key, shuffle_sorted
from .sizes import index_dtype
from .stats import StatsTensors
from .update import observe_torch, prepare_losses

__all__ = ["Backend", "TorchBackend", "KernelBackend", "get_backend", "BACKENDS"]

BACKENDS = ("auto", "torch", "cuda")


class Backend(ABC):
    """The primitives of one device. Both implementations share the argument handling here."""

    #: ``"torch"`` or ``"cuda"``
    name: str = ""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device})"

    def observe_(self, t: StatsTensors, ids: torch.Tensor, losses: torch.Tensor, decay: float,
                 epoch: int, *, exact: bool = False) -> None:
        """Record a batch of losses in ``t`` in place (no host synchronisation unless ``exact``).

        ``ids``/``losses`` are 1-D, the same length, on ``t``'s device (the caller checks that, and
        on the CPU the id range). Duplicate ids are merged exactly as one group; NaN/inf losses are
        skipped and counted. ``exact=True`` makes CUDA sums of 3+ copies of an id deterministic at
        the cost of a host read (the torch backend; the kernels always are).
        """
        if ids.numel():
            self._observe(t, ids, prepare_losses(losses), float(decay), int(epoch), exact)

    def top_k(self, score: torch.Tensor | None, n: int, k: int, seed: int) -> torch.Tensor:
        """Ids of the k highest ``score`` (ties and ``score=None`` broken by ``hash32(id, seed)``).

        Returns an unordered set of ``index_dtype(n)`` ids on this device; NaN ranks lowest, -0
        equals +0. The set is the same on every backend and device.
        """
        if not 0 <= k <= n:
            raise ValueError(f"k must be in [0, {n}], got k={k}")
        if k == n:
            return torch.arange(n, dtype=index_dtype(n), device=self.device)
        if k == 0:
            return torch.empty(0, dtype=index_dtype(n), device=self.device)
        return self._top_k(score, n, k, seed).to(index_dtype(n))

    def shuffle(self, ids: torch.Tensor, seed: int) -> torch.Tensor:
        """Unique ``ids`` in the epoch order of their set: sorted, then the id of rank r moved to
        position ``permute_ranks(len, seed)[r]`` (:func:`gpuprune.keys.shuffle_sorted`). The order
        depends only on the set and the seed, so an unordered top-k result gives the same epoch
        order on every backend."""
        return shuffle_sorted(torch.sort(ids).values, seed)

    @abstractmethod
    def _observe(self, t, ids, losses, decay, epoch, exact) -> None: ...

    @abstractmethod
    def _top_k(self, score, n, k, seed) -> torch.Tensor: ...


class TorchBackend(Backend):
    """The reference: torch ops (numpy's argpartition for the CPU top-k, about 3x faster there)."""

    name = "torch"

    def _observe(self, t, ids, losses, decay, epoch, exact) -> None:
        observe_torch(t, ids, losses, decay, epoch, exact=exact)

    def _top_k(self, score, n, k, seed) -> torch.Tensor:
        key = composite_key(score, seed, n, self.device)
        if self.device.type == "cpu":
            a = key.numpy()
            return torch.from_numpy(np.argpartition(a, n - k)[n - k:])
        return torch.topk(key, k, sorted=False).indices



class KernelBackend(Backend):
    """The CUDA kernels of :mod:`gpuprune.kernels` (any object with their methods)."""

    name = "cuda"

    def __init__(self, ops) -> None:
        super().__init__(ops.device)
        self.ops = ops

    def _observe(self, t, ids, losses, decay, epoch, exact) -> None:
        self.ops.observe_(t, ids, losses, decay, epoch)

    def _top_k(self, score, n, k, seed) -> torch.Tensor:
        return self.ops.top_k(score, n, k, seed)



def get_backend(backend: str, device: torch.device, num_samples: int) -> Backend:
    """The backend for a state of ``num_samples`` on ``device``.

    Args:
        backend: ``"torch"``: always torch. ``"cuda"``: the kernels, or an error saying why not.
            ``"auto"``: the kernels on a CUDA device where they load, else torch (with a warning
            saying why when CuPy is installed but the kernels fail to load).
        device: a normalised device (see :func:`gpuprune._checks.resolve_device`).
        num_samples: N; the kernels take N <= 2**31 - 1.
    """
    from . import kernels

    check_choice("backend", backend, BACKENDS)
    device = torch.device(device)
    if backend == "torch":
        return TorchBackend(device)
    if device.type != "cuda":
        if backend == "cuda":
            raise ValueError(f"backend='cuda' needs a CUDA device, got device={device}")
        return TorchBackend(device)
    if num_samples > kernels.MAX_SAMPLES:
        if backend == "cuda":
            raise ValueError(f"backend='cuda' supports num_samples <= {kernels.MAX_SAMPLES}, got "
                             f"num_samples={num_samples}")
        return TorchBackend(device)
    try:
        return KernelBackend(kernels.get_ops(device))
    except kernels.KernelsUnavailable as e:
        if backend == "cuda":
            raise kernels.KernelsUnavailable(f"backend='cuda' was requested but {e}") from e
        if not isinstance(e, kernels.CupyMissing):     # no CuPy is a setup, not a failure
            warnings.warn(f"gpuprune: using the torch backend on {device}: {e}", RuntimeWarning,
                          stacklevel=3)
        return TorchBackend(device)
