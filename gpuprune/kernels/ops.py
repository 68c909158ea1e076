"""Launch sequences of the CUDA kernels, tensors in and tensors out.

:class:`KernelOps` offers the three primitives of :mod:`gpuprune.backend` as kernel launches on a
*runtime*: the CuPy runtime on a GPU (launches on torch's current stream, see
:mod:`gpuprune.kernels._loader`) or, in the CPU test suite, the concurrency harness that runs the
same source with one OS thread per CUDA thread (``tests/kernel_harness``). Every buffer is a torch
tensor on ``ops.device``; the runtime gets the tensors and passes their ``data_ptr()``. Nothing here
reads device memory from the host, so no call waits for the GPU.

Launches per call (the same on every runtime; :attr:`KernelOps.launches` counts them):

* ``observe_``: one (``gp_observe_small``) for batches of up to 4096; larger batches add a
  ``torch.sort`` of the ids before ``gp_observe_sorted``.
* ``top_k``: six ``gp_radix_pass`` (three for a hash-only key) and one ``gp_compact``. A pass exits
  at once when the set is already known. Scratch (the control block and the compaction's tile
  states) is allocated once per stream and left clean by the kernels, so there is no reset launch.
* ``hash_ids``: one.

Selection is "the k largest unique 64-bit keys" as in :mod:`gpuprune.keys`: a radix select over six
digits finds the threshold, then an ordered compaction writes the chosen ids in index order. The
*set* equals the torch reference's; the order differs (the torch path returns ``argpartition``/
``topk`` order), which does not matter because every plan is ordered by
:meth:`gpuprune.backend.Backend.shuffle`, a function of the set alone.
"""

from __future__ import annotations

from typing import Any, Hashable, Protocol

import torch

from ..keys import split_seed
from ..stats import StatsTensors
from ._spec import CONSTANTS, CTL_BYTES, CTL_OFFSETS, PASSES, SIGNATURES

__all__ = ["KernelOps", "Runtime", "MAX_SAMPLES"]

#: largest N the kernels accept (int32 ids, counts and positions)
MAX_SAMPLES = 2**31 - 1

_C = CONSTANTS
_SEL = _C["GP_SEL_THREADS"]
_TILE = _C["GP_TILE"]
_FIRST_PASS_HASH = 3            # a hash-only key starts at the hash word's top digit


class Runtime(Protocol):
    """Runs a kernel of the source by name (CuPy on a GPU, the concurrency harness in tests).

    ``args`` follow :data:`gpuprune.kernels._spec.SIGNATURES`: a tensor (or None for a null
    pointer) for each pointer, ints and floats for the rest.
    """

    def launch(self, name: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple) -> None: ...

    def session(self) -> Any:
        """A context in which launches go to the right device and stream."""

    def stream_key(self) -> Hashable:
        """Identifies the stream launches go to now (scratch buffers are kept per stream)."""


def _reload(device: str) -> "KernelOps":
    from ._loader import get_ops
    return get_ops(device)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KernelOps:
    """The kernel backend of one device.

    Args:
        runtime: runs the kernels (see :class:`Runtime`).
        device: where the buffers live; the runtime's device.
        sm_count: streaming multiprocessors, to size grid-stride launches (any value >= 1 is correct).

    Attributes:
        launches: kernel launches made so far (for the benchmark's launches-per-call figures).
    """

    def __init__(self, runtime: Runtime, device: torch.device, sm_count: int = 1) -> None:
        self.runtime = runtime
        self.device = torch.device(device)
        self.sm_count = max(int(sm_count), 1)
        self.launches = 0
        self._scratch: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"KernelOps(device={self.device}, runtime={self.runtime!r})"

    def __reduce__(self):
        # pickling or deep-copying a Pruner keeps the per-device kernels: reload them by device
        if self.device.type != "cuda":
            raise TypeError("KernelOps of the CPU test harness cannot be pickled")
        return (_reload, (str(self.device),))

    # ------------------------------------------------------------------ plumbing
    def _launch(self, name: str, grid: int, block: int, *args) -> None:
        kinds = SIGNATURES[name]
        if len(args) != len(kinds):
            raise TypeError(f"{name} takes {len(kinds)} arguments, got {len(args)}")
        conv = []
        for kind, a in zip(kinds, args):
            if kind == "p":
                if a is not None and not isinstance(a, torch.Tensor):
                    raise TypeError(f"{name}: pointer arguments are tensors or None, got {type(a)}")
                conv.append(a)
            else:
                conv.append(float(a) if kind == "d" else int(a))
        self.runtime.launch(name, (max(int(grid), 1),), (int(block),), tuple(conv))
        self.launches += 1

    def _stride_grid(self, n: int, per_thread: int = 8, per_sm: int = 4) -> int:
        return max(1, min(_cdiv(n, _SEL * per_thread), self.sm_count * per_sm))

    def _check(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
        if t.device != self.device or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor on {self.device}, got "
                             f"{t.dtype} on {t.device}")

    def _scratch_for(self, tiles: int) -> tuple[Hashable, torch.Tensor, torch.Tensor]:
        """The control block and >= ``tiles`` tile states of the current stream (zeroed once)."""
        key = self.runtime.stream_key()
        ctl, status = self._scratch.get(key, (None, None))
        if ctl is None:
            ctl = torch.zeros(CTL_BYTES // 8, dtype=torch.int64, device=self.device)
        if status is None or status.numel() < tiles:
            status = torch.zeros(max(tiles, 64), dtype=torch.int64, device=self.device)
        self._scratch[key] = (ctl, status)
        return key, ctl, status

    def last_total(self) -> int:
        """Ids the last compaction on the current stream selected (k unless something is wrong).

        Reads device memory: a host sync, for tests and diagnostics only.
        """
        ctl, _ = self._scratch.get(self.runtime.stream_key(), (None, None))
        if ctl is None:
            raise RuntimeError("no selection has run on this stream")
        off = CTL_OFFSETS["total"]
        return int(ctl.view(torch.int32)[off // 4].item()) & 0xFFFFFFFF

    # ------------------------------------------------------------------ observe
    def observe_(self, t: StatsTensors, ids: torch.Tensor, losses: torch.Tensor, decay: float,
                 epoch: int) -> None:
        """:func:`gpuprune.update.observe_torch` in one kernel (batches <= 4096, int32 or int64
        ids) or a stable sort plus one kernel. ``losses`` are float32
        (:func:`gpuprune.update.prepare_losses`).

        Out-of-range ids are handled on the device (the batch is ignored and counted in
        ``t.invalid_batches``), so nothing waits for the GPU.
        """
        x = losses.contiguous()
        b, n = ids.numel(), t.mean.numel()
        if b == 0:
            return
        self._check("losses", x, torch.float32)
        for name in ("mean", "var"):
            self._check(name, getattr(t, name), torch.float32)
        self._check("last_epoch", t.last_epoch, torch.int32)
        tail = (t.mean, t.var, t.last_epoch, t.nonfinite, t.invalid_batches, float(decay), int(epoch))
        with self.runtime.session():
            if b <= _C["GP_OBS_SMALL_MAX"]:
                ids = ids.contiguous()
                if ids.dtype == torch.int32:
                    i64, i32 = None, ids
                else:
                    i64, i32 = ids.long(), None
                # about 4 ids per thread: small batches get small blocks (cheaper barriers), and a
                # duplicate table of the next power of two >= 2B slots (at most half full)
                threads = min(_C["GP_OBS_SMALL_THREADS"], max(64, _cdiv(_cdiv(b, 4), 32) * 32))
                slots = max(64, 1 << (2 * b - 1).bit_length())
                self._launch("gp_observe_small", 1, threads, i64, i32, x, b, n, *tail, slots)
            else:
                sidx, perm = torch.sort(ids.long().contiguous(), stable=True)
                self._launch("gp_observe_sorted", _cdiv(b, _C["GP_OBS_THREADS"]),
                             _C["GP_OBS_THREADS"], sidx, perm, x, b, n, *tail)

    # ------------------------------------------------------------------ selection
    def top_k(self, score: torch.Tensor | None, n: int, k: int, seed: int) -> torch.Tensor:
        """int32 ids of the k largest keys ``orderable(score[i]) << 32 | hash32(i, seed)``
        (``hash32`` alone when ``score`` is None), in index order. ``0 < k < n <= MAX_SAMPLES``."""
        n, k = int(n), int(k)
        if not 0 < k < n <= MAX_SAMPLES:
            raise ValueError(f"top_k needs 0 < k < n <= {MAX_SAMPLES}, got k={k}, n={n}")
        lo, hi_seed = split_seed(seed)
        tiles = _cdiv(n, _TILE)
        key, ctl, status = self._scratch_for(tiles)
        out = torch.empty(k, dtype=torch.int32, device=self.device)
        if score is None:
            raw = hi = None
            mode, passes = _C["GP_MODE_HASH"], PASSES[_FIRST_PASS_HASH:]
        else:
            if score.numel() != n:
                raise ValueError(f"score must have n={n} entries, got {score.numel()}")
            raw = score.detach().float().contiguous()
            self._check("score", raw, torch.float32)
            hi = torch.empty(n, dtype=torch.int32, device=self.device)   # uint32 key words
            mode, passes = _C["GP_MODE_HI"], PASSES
        grid = self._stride_grid(n)
        try:
            with self.runtime.session():
                for j, (shift, width) in enumerate(passes):
                    self._launch("gp_radix_pass", grid, _SEL, raw if j == 0 else None, hi, mode, n,
                                 lo, hi_seed, ctl, shift, width, k, 1 if j == 0 else 0)
                self._launch("gp_compact", tiles, _SEL, hi, mode, n, lo, hi_seed, ctl, status, out,
                             k)
        except BaseException:
            self._scratch.pop(key, None)      # a launch failed half-way: never reuse its scratch
            raise
        return out

    def hash_ids(self, ids: torch.Tensor, seed: int) -> torch.Tensor:
        """int64 ``hash32(ids, seed)`` (:func:`gpuprune.keys.hash32`), the shuffle key."""
        ids = ids.long().contiguous()
        out = torch.empty_like(ids)
        lo, hi = split_seed(seed)
        if ids.numel():
            with self.runtime.session():
                self._launch("gp_hash_index", self._stride_grid(ids.numel(), 4, 8), _SEL, ids,
                             ids.numel(), lo, hi, out)
        return out
