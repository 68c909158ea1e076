"""Launch sequences of the CUDA kernels, tensors in and tensors out.

:class:`KernelOps` offers the three primitives of :mod:`gpuprune.backend` as kernel launches on a
*runtime*: the CuPy runtime (launches on torch's current stream, see :mod:`gpuprune.kernels._loader`)
or, in tests, a host build of the same source. Every buffer is a torch tensor on ``ops.device``;
kernels get their ``data_ptr()``. Nothing here reads device memory from the host.

Selection is "the k largest unique 64-bit keys" as in :mod:`gpuprune.keys`: a radix select over six
digits (three for the score word, three for the tie-break hash; a pass exits at once when the set is
already known) finds the threshold, then an ordered compaction writes the chosen ids in index order.
The *set* equals the torch reference's; the order differs (the torch path returns
``argpartition``/``topk`` order), which does not matter because every plan is ordered by
:meth:`gpuprune.backend.Backend.shuffle`, a function of the set alone.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..keys import split_seed
from ..stats import StatsTensors
from ._spec import CONSTANTS, CTL_BYTES, PASSES, SIGNATURES

__all__ = ["KernelOps", "Runtime", "MAX_SAMPLES"]

#: largest N the kernels accept (int32 ids, counts and positions)
MAX_SAMPLES = 2**31 - 1

_C = CONSTANTS
_SEL = _C["GP_SEL_THREADS"]
_TILE = _C["GP_TILE"]
_FIRST_PASS_SCORE = 0           # start at the score word's top digit
_FIRST_PASS_HASH = 3            # start at the hash word (the high word is fixed by the init)


class Runtime(Protocol):
    """Something that runs a kernel of the source by name (CuPy on a GPU, a host build in tests)."""

    def launch(self, name: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple) -> None: ...

    def session(self) -> Any:
        """A context in which launches go to the right device and stream."""


def _reload(device: str) -> "KernelOps":
    from ._loader import get_ops
    return get_ops(device)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KernelOps:
    """The kernel backend of one device.

    Args:
        runtime: runs the kernels (see :class:`Runtime`).
        device: where the buffers live; the runtime's device.
        sm_count: streaming multiprocessors, to size grid-stride launches (any value >= 1 is correct).
    """

    def __init__(self, runtime: Runtime, device: torch.device, sm_count: int = 1) -> None:
        self.runtime = runtime
        self.device = torch.device(device)
        self.sm_count = max(int(sm_count), 1)

    def __repr__(self) -> str:
        return f"KernelOps(device={self.device}, runtime={self.runtime!r})"

    def __reduce__(self):
        # pickling or deep-copying a Pruner keeps the per-device kernels: reload them by device
        if self.device.type != "cuda":
            raise TypeError("KernelOps of the host test build cannot be pickled")
        return (_reload, (str(self.device),))

    # ------------------------------------------------------------------ plumbing
    def _launch(self, name: str, grid: int, block: int, *args) -> None:
        kinds = SIGNATURES[name]
        if len(args) != len(kinds):
            raise TypeError(f"{name} takes {len(kinds)} arguments, got {len(args)}")
        conv = tuple(float(a) if k == "d" else int(a) for k, a in zip(kinds, args))
        self.runtime.launch(name, (max(int(grid), 1),), (int(block),), conv)

    def _stride_grid(self, n: int, per_thread: int = 8, per_sm: int = 4) -> int:
        return max(1, min(_cdiv(n, _SEL * per_thread), self.sm_count * per_sm))

    def _check(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
        if t.device != self.device or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor on {self.device}, got "
                             f"{t.dtype} on {t.device}")

    # ------------------------------------------------------------------ observe
    def observe_(self, t: StatsTensors, ids: torch.Tensor, losses: torch.Tensor, decay: float,
                 epoch: int) -> None:
        """:func:`gpuprune.update.observe_torch` in one kernel (batches <= 2048) or a stable sort
        plus one kernel. ``losses`` are float32 (:func:`gpuprune.update.prepare_losses`).

        Out-of-range ids are handled on the device (the batch is ignored and counted in
        ``t.invalid_batches``), so nothing waits for the GPU.
        """
        idx = ids.long().contiguous()
        x = losses.contiguous()
        b, n = idx.numel(), t.mean.numel()
        if b == 0:
            return
        self._check("losses", x, torch.float32)
        for name in ("mean", "var"):
            self._check(name, getattr(t, name), torch.float32)
        self._check("last_epoch", t.last_epoch, torch.int32)
        tail = (_ptr(t.mean), _ptr(t.var), _ptr(t.last_epoch), _ptr(t.nonfinite),
                _ptr(t.invalid_batches), float(decay), int(epoch))
        with self.runtime.session():
            if b <= _C["GP_OBS_SMALL_MAX"]:
                self._launch("gp_observe_small", 1, _C["GP_OBS_SMALL_THREADS"], _ptr(idx), _ptr(x),
                             b, n, *tail)
            else:
                sidx, perm = torch.sort(idx, stable=True)
                self._launch("gp_observe_sorted", _cdiv(b, _C["GP_OBS_THREADS"]), _C["GP_OBS_THREADS"],
                             _ptr(sidx), _ptr(perm), _ptr(x), b, n, *tail)

    # ------------------------------------------------------------------ selection
    def top_k(self, score: torch.Tensor | None, n: int, k: int, seed: int) -> torch.Tensor:
        """int32 ids of the k largest keys ``orderable(score[i]) << 32 | hash32(i, seed)``
        (``hash32`` alone when ``score`` is None), in index order. ``0 < k < n``."""
        ctl = torch.empty(CTL_BYTES // 8, dtype=torch.int64, device=self.device)
        lo, hi_seed = split_seed(seed)
        with self.runtime.session():
            if score is None:
                hi, mode, first = None, _C["GP_MODE_HASH"], _FIRST_PASS_HASH
                self._launch("gp_select_init", 1, _SEL, _ptr(ctl), 0, 32, k, 0, 0)
            else:
                raw = score.float().contiguous()
                hi = torch.empty(n, dtype=torch.int32, device=self.device)   # uint32 bits
                self._launch("gp_score", self._stride_grid(n, 4, 8), _SEL, _ptr(raw), n, _ptr(hi))
                mode, first = _C["GP_MODE_HI"], _FIRST_PASS_SCORE
                self._launch("gp_select_init", 1, _SEL, _ptr(ctl), 0, 0, k, 0, 0)
            keys = (_ptr(hi), mode, n, lo, hi_seed)
            grid = self._stride_grid(n)
            for shift, width in PASSES[first:]:
                self._launch("gp_radix_pass", grid, _SEL, *keys, _ptr(ctl), shift, width)
            out = torch.empty(k, dtype=torch.int32, device=self.device)
            g = _cdiv(n, _TILE)
            counts = torch.empty(g, dtype=torch.int32, device=self.device)
            self._launch("gp_compact_count", g, _SEL, *keys, _ptr(ctl), _ptr(counts))
            self._launch("gp_scan_counts", 1, _C["GP_SCAN_THREADS"], _ptr(counts), g)
            self._launch("gp_compact_write", g, _SEL, *keys, _ptr(ctl), _ptr(counts), _ptr(out))
        return out

    def hash_ids(self, ids: torch.Tensor, seed: int) -> torch.Tensor:
        """int64 ``hash32(ids, seed)`` (:func:`gpuprune.keys.hash32`), the shuffle key."""
        ids = ids.long().contiguous()
        out = torch.empty_like(ids)
        lo, hi = split_seed(seed)
        if ids.numel():
            with self.runtime.session():
                self._launch("gp_hash_index", self._stride_grid(ids.numel(), 4, 8), _SEL, _ptr(ids),
                             ids.numel(), lo, hi, _ptr(out))
        return out
