"""The one place that chooses who computes: the CUDA kernels or torch.

A :class:`Backend` offers the primitives everything else is built from, with the same signature and
the same results on both implementations:

* :meth:`Backend.observe_`: apply a batch of (id, loss) observations to the statistics;
* :meth:`Backend.plan`: an epoch's plan in one call: select (a :class:`~gpuprune.keys.Pick`, given
  ids or every sample), shuffle, count the planned samples and the overlap with the previous plan;
* :meth:`Backend.top_k`: the k largest unique keys ``orderable(score) << 32 | hash32(id, seed)``
  (:mod:`gpuprune.keys`), i.e. the k highest scores with ties broken at random;
* :meth:`Backend.shuffle`: ids in a keyed pseudo-random order that depends only on the set (index
  order, then the keyed positions of :func:`gpuprune.keys.permute_ranks`: no sort of keys).

Policies describe their selection (:class:`~gpuprune.keys.Pick`, with a
:class:`~gpuprune.keys.Score`) instead of computing it, so they never look at which backend runs:
the torch backend computes the score with the description's torch method (the reference), the CUDA
kernels compute the same operations inside one launch that also selects, shuffles and counts.
``backend="auto"`` takes the kernels on a CUDA device where CuPy loads them, else torch; ``"cuda"``
insists (and says why it cannot); ``"torch"`` never uses them. The torch backend is the reference
that the kernels match bit for bit.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import NamedTuple

import numpy as np
import torch

from ._checks import check_choice
from .keys import (BUILTIN_SCORES, BelowMeanScore, GivenScore, MeanScore, Pick, UCBScore,
                   composite_key, explore_mask, pack_bits, permute_ranks_doubling, shuffle_into_np,
                   select_mask, shuffle_sorted)
from .sizes import index_dtype
from .stats import StatsTensors
from .update import observe_groups, observe_torch, prepare_losses

__all__ = ["Backend", "TorchBackend", "KernelBackend", "PlanParts", "get_backend", "BACKENDS"]

BACKENDS = ("auto", "torch", "cuda")


class PlanParts(NamedTuple):
    """What :meth:`Backend.plan` returns.

    Attributes:
        indices: the plan: sample ids in training order (``index_dtype(N)``).
        selected: the statistics' ``selected`` counts plus one for each planned id (a new tensor),
            or the old tensor itself for a full plan; None when not asked for.
        overlap: 0-d float64 Jaccard overlap of the plan's set with the previous plan's, or None.
        rescaled: packed bits (:func:`gpuprune.keys.pack_bits`) of the rank-0 samples of an
            InfoBatch pick, else None.
    """

    indices: torch.Tensor
    selected: torch.Tensor | None
    overlap: torch.Tensor | None
    rescaled: torch.Tensor | None


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

    def plan(self, stats, *, shuffle_seed: int, pick: Pick | None = None,
             ids: torch.Tensor | None = None, full: bool = False,
             previous: tuple[torch.Tensor | None, int] | None = None, count: bool = True
             ) -> PlanParts:
        """An epoch's plan from the statistics, in one call.

        Args:
            stats: the statistics (``mean``, ``var``, ``last_epoch``, ``selected`` of N samples,
                read only).
            shuffle_seed: seed of the keyed order (:func:`gpuprune.keys.shuffle_sorted`).
            pick, ids, full: what to plan, exactly one: a selection (a :class:`~gpuprune.keys.Pick`); given unique ids (a reused
                selection, or a policy's own choice); or every sample.
            previous: ``(ids, size)`` of the previous plan (``ids=None`` for a full one) for the
                overlap, or None.
            count: return ``selected`` (plus one for each planned id; full plans count nothing).

        The plan is the selected set in index order, the id of rank r moved to position
        ``permute_ranks(size, shuffle_seed)[r]``; the same on every backend. At most one host
        synchronisation: an InfoBatch pick's size.
        """
        if (pick is not None) + (ids is not None) + bool(full) != 1:
            raise ValueError("plan() takes exactly one of pick=, ids= and full=True")
        return self._plan(stats, int(shuffle_seed), pick, ids, bool(full), previous, bool(count))

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
    def _plan(self, stats, shuffle_seed, pick, ids, full, previous, count) -> PlanParts: ...

    @abstractmethod
    def _top_k(self, score, n, k, seed) -> torch.Tensor: ...


class TorchBackend(Backend):
    """The reference: torch operations, with numpy on the CPU where it is faster.

    Args:
        device: where the statistics live.
        cpu_fast_paths: on the CPU, use the numpy paths (observe of distinct ids, threshold
            selection, cycle-walk shuffle). False runs the operations a GPU would run, on the CPU
            (the cost model counts those). Default True. Results are identical either way.
    """

    name = "torch"

    def __init__(self, device: torch.device, cpu_fast_paths: bool = True) -> None:
        super().__init__(device)
        self.fast = bool(cpu_fast_paths) and self.device.type == "cpu"

    def _observe(self, t, ids, losses, decay, epoch, exact) -> None:
        if self.fast:
            observe_torch(t, ids, losses, decay, epoch, exact=exact)
        else:
            observe_groups(t, ids, losses, decay, epoch, exact=exact)

    def _top_k(self, score, n, k, seed) -> torch.Tensor:
        if self.fast:                                      # plan()'s threshold selection
            mask = select_mask(score, n, k, seed, self.device, numpy=True)
            return torch.from_numpy(np.flatnonzero(mask.numpy()))
        return torch.topk(composite_key(score, seed, n, self.device), k, sorted=False).indices

    def shuffle(self, ids: torch.Tensor, seed: int) -> torch.Tensor:
        srt = torch.sort(ids).values
        if self.fast:
            return shuffle_sorted(srt, seed)
        out = torch.empty_like(srt)
        out[permute_ranks_doubling(srt.numel(), seed, self.device)] = srt
        return out

    def _plan(self, stats, shuffle_seed, pick, ids, full, previous, count) -> PlanParts:
        n, dev, fast = stats.mean.numel(), self.device, self.fast
        rescaled = selected = None
        if full:
            mask, size = None, n
        elif ids is not None:
            mask = torch.zeros(n, dtype=torch.bool, device=dev)
            mask[ids.long()] = True
            size = ids.numel()
        else:
            score = None
            if pick.score is not None:
                kw = {"numpy": fast} if isinstance(pick.score, BUILTIN_SCORES) else {}
                score = pick.score.torch(stats.mean, stats.var, stats.last_epoch, **kw)
            size = pick.k
            if pick.below_share is not None:
                below = score == 0
                n_below = int(below.sum())                      # the one host read
                size = n - n_below + math.floor(pick.below_share * n_below)
                rescaled = pack_bits(below)
            mask = select_mask(score, n, size - pick.explore, pick.seed, dev, numpy=fast)
            if pick.explore:
                mask |= explore_mask(mask, pick.explore, pick.explore_seed, numpy=fast)
        prev_ids, prev_size = previous if previous is not None else (None, 0)
        inter = None
        if fast:                                           # numpy, in place where it can
            m = None if mask is None else mask.numpy()
            srt = np.arange(n) if m is None else np.flatnonzero(m)
            if m is not None and srt.size != size:
                raise ValueError(f"plan(ids=...) needs distinct ids, got {size} ids holding "
                                 f"{srt.size} distinct ones")
            srt = srt.astype(np.int32 if index_dtype(n) == torch.int32 else np.int64, copy=False)
            order = torch.from_numpy(shuffle_into_np(np.empty_like(srt), srt, shuffle_seed))
            if count and m is not None:
                selected = torch.from_numpy(stats.selected.numpy() + m)
            if previous is not None and prev_ids is not None and m is not None:
                inter = float(np.count_nonzero(np.take(m, prev_ids.numpy())))  # (take: 2x [])
        else:
            srt = (torch.arange(n, device=dev) if mask is None
                   else torch.nonzero_static(mask, size=size).view(-1)).to(index_dtype(n))
            order = torch.empty_like(srt)
            order[permute_ranks_doubling(size, shuffle_seed, dev)] = srt
            if count and mask is not None:
                selected = stats.selected + mask.to(torch.int32)
        if count and mask is None:
            selected = stats.selected
        overlap = None
        if previous is not None:
            if prev_ids is None or mask is None:
                inter = float(min(prev_size, size))
            if inter is not None:                          # a fill, not a host-to-device copy
                both = torch.full((), inter, dtype=torch.float64, device=dev)
            else:
                both = mask[prev_ids.long()].sum().double()
            overlap = both / (prev_size + size - both)
        return PlanParts(order, selected, overlap, rescaled)


class KernelBackend(Backend):
    """The CUDA kernels of :mod:`gpuprune.kernels` (any object with their methods)."""

    name = "cuda"

    def __init__(self, ops) -> None:
        super().__init__(ops.device)
        self.ops = ops

    def _observe(self, t, ids, losses, decay, epoch, exact) -> None:
        self.ops.observe_(t.mean, t.var, t.last_epoch, t.nonfinite, t.invalid_batches, ids, losses,
                          decay, epoch)

    def _top_k(self, score, n, k, seed) -> torch.Tensor:
        return self.ops.top_k(score, n, k, seed)

    def _score_args(self, score, stats) -> dict:
        """The kernel form of a :class:`~gpuprune.keys.Score`: its mode, settings and inputs. A
        score the kernels do not know is computed by its torch method and passed as given."""
        from .kernels import CONSTANTS as C
        inputs = {"mean": stats.mean, "var": stats.var, "last_epoch": stats.last_epoch}
        if score is None:
            return {"mode": C["GP_SCORE_HASH"]}
        if isinstance(score, MeanScore):
            return {"mode": C["GP_SCORE_MEAN"], **inputs}
        if isinstance(score, UCBScore):
            mode = C["GP_SCORE_UCB_STD"] if score.uncertainty == "std" else C["GP_SCORE_UCB_VAR"]
            return {"mode": mode, "params": (score.c, score.drift, float(score.epoch)), **inputs}
        if isinstance(score, BelowMeanScore):
            return {"mode": C["GP_SCORE_BELOW_MEAN"], **inputs}
        values = score.values if isinstance(score, GivenScore) else score.torch(
            stats.mean, stats.var, stats.last_epoch)
        return {"mode": C["GP_SCORE_GIVEN"], "given": values.detach().to(torch.float32).contiguous()}

    def _plan(self, stats, shuffle_seed, pick, ids, full, previous, count) -> PlanParts:
        n = stats.mean.numel()
        kw: dict = {"full": full, "ids": ids, "shuffle_seed": shuffle_seed}
        if pick is not None:
            kw.update(self._score_args(pick.score, stats), k=pick.k, seed=pick.seed,
                      explore=pick.explore, explore_seed=pick.explore_seed,
                      below_share=pick.below_share)
        if count and not full:
            kw["selected"] = stats.selected
        if previous is not None:
            kw["prev"], kw["prev_size"] = previous
        res = self.ops.plan(n, **kw)
        out = res.out
        if pick is not None and pick.below_share is not None:
            out = out[:int(res.total)]                     # the one host read
        selected = res.selected if not full else (stats.selected if count else None)
        return PlanParts(out, selected, res.overlap, res.rescaled)



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
