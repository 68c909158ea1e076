"""Launch sequences of the CUDA kernels, tensors in and tensors out.

:class:`KernelOps` offers the primitives of :mod:`gpuprune.backend` as kernel launches on a
*runtime*: the CuPy runtime on a GPU (launches on torch's current stream, see
:mod:`gpuprune.kernels._loader`) or, in the CPU test suite, the concurrency harness that runs the
same source with one OS thread per CUDA thread (``tests/kernel_harness``). Every buffer is a torch
tensor on ``ops.device``; the runtime gets the tensors and passes their ``data_ptr()``. Nothing here
reads device memory from the host (except :meth:`KernelOps.plan`'s size of an InfoBatch plan, when
the caller asks for it), so no call waits for the GPU.

Launches per call (the same on every runtime; :attr:`KernelOps.launches` counts them):

* ``observe_``: one (``gp_observe_small``) for batches of up to 4096; larger batches add a
  ``torch.sort`` of the ids before ``gp_observe_sorted``.
* ``plan`` and ``top_k``: one cooperative launch of ``gp_plan`` (score, exact-k radix selection,
  shuffle, selected counts, overlap: see the kernel's comment). Its grid is sized so that each block
  sees at least :attr:`KernelOps.keys_per_block` samples, and never exceeds the blocks that can be
  resident at once (the kernel's blocks meet at grid barriers). Scratch that must start at zero
  (the control block, the bitmaps) is allocated once per stream and left clean by the kernel, so
  there is no reset launch.

Selection is "the k largest unique 64-bit keys" as in :mod:`gpuprune.keys`, and the plan is the set
in index order moved to the keyed positions of :func:`gpuprune.keys.permute_ranks`: the same plan as
the torch reference, bit for bit.
"""

from __future__ import annotations

from typing import Any, Hashable, NamedTuple, Protocol

import torch

from ..keys import split_seed
from ._spec import CONSTANTS, CTL_BYTES, CTL_OFFSETS, PLAN_ARGS, SIGNATURES

__all__ = ["KernelOps", "Runtime", "PlanOutputs", "MAX_SAMPLES", "KEYS_PER_BLOCK"]

#: largest N the kernels accept (int32 ids, counts and positions)
MAX_SAMPLES = 2**31 - 1
#: samples per block of gp_plan at least (a block's histogram flush and barrier are amortised)
KEYS_PER_BLOCK = 16384

_C = CONSTANTS
_SEL = _C["GP_SEL_THREADS"]


class Runtime(Protocol):
    """Runs a kernel of the source by name (CuPy on a GPU, the concurrency harness in tests).

    ``args`` follow :data:`gpuprune.kernels._spec.SIGNATURES`: a tensor (or None for a null
    pointer) for each pointer, ints and floats for the rest.
    """

    def launch(self, name: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple,
               cooperative: bool = False) -> None:
        """Run a kernel; ``cooperative`` launches need every block resident at once."""

    def max_blocks(self, name: str, block: int) -> int:
        """How many blocks of ``block`` threads of kernel ``name`` can be resident at once."""

    def session(self) -> Any:
        """A context in which launches go to the right device and stream."""

    def stream_key(self) -> Hashable:
        """Identifies the stream launches go to now (scratch buffers are kept per stream)."""


class PlanOutputs(NamedTuple):
    """The tensors :meth:`KernelOps.plan` fills (all on the ops' device)."""

    out: torch.Tensor                   #: int32 ids (training order); an InfoBatch plan: its first `total`
    selected: torch.Tensor | None       #: int32 selected counts (with ``count``)
    overlap: torch.Tensor | None        #: 0-d float64 (with ``prev_size``)
    rescaled: torch.Tensor | None       #: uint8 packed bits of the rank-0 samples (with ``below_share``)
    total: torch.Tensor                 #: 0-d int32 view of the planned count in the control block


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
        sm_count: streaming multiprocessors (kept for reports; grids come from the runtime).
        keys_per_block: samples per gp_plan block at least. Default :data:`KEYS_PER_BLOCK`; tests
            lower it to run several blocks on small inputs.

    Attributes:
        launches: kernel launches made so far (for the cost model's launches-per-call figures).
    """

    def __init__(self, runtime: Runtime, device: torch.device, sm_count: int = 1,
                 keys_per_block: int = KEYS_PER_BLOCK) -> None:
        self.runtime = runtime
        self.device = torch.device(device)
        self.sm_count = max(int(sm_count), 1)
        self.keys_per_block = max(int(keys_per_block), 1)
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
    def _launch(self, name: str, grid: int, block: int, *args, cooperative: bool = False) -> None:
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
        self.runtime.launch(name, (max(int(grid), 1),), (int(block),), tuple(conv),
                            cooperative=cooperative)
        self.launches += 1

    def _check(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
        if t.device != self.device or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor on {self.device}, got "
                             f"{t.dtype} on {t.device}")

    def plan_grid(self, n: int) -> int:
        """Blocks of a gp_plan launch over n samples: each sees >= ``keys_per_block`` samples, and
        all are resident at once."""
        resident = self.runtime.max_blocks("gp_plan", _SEL)
        return max(1, min(_cdiv(n, self.keys_per_block), resident, _C["GP_MAX_GRID"]))

    def _scratch_for(self, n: int) -> tuple[Hashable, torch.Tensor, torch.Tensor]:
        """The control block and the two bitmaps of the current stream (zeroed once; gp_plan
        leaves them zero)."""
        key = self.runtime.stream_key()
        ctl, marks = self._scratch.get(key, (None, None))
        if ctl is None:
            ctl = torch.zeros(CTL_BYTES // 8, dtype=torch.int64, device=self.device)
        words = 2 * _cdiv(n, 32)
        if marks is None or marks.numel() < words:
            marks = torch.zeros(max(words, 64), dtype=torch.int32, device=self.device)
        self._scratch[key] = (ctl, marks)
        return key, ctl, marks

    def last_total(self) -> int:
        """Ids the last plan on the current stream planned (k unless something is wrong).

        Reads device memory: a host sync, for tests and diagnostics only.
        """
        ctl, _ = self._scratch.get(self.runtime.stream_key(), (None, None))
        if ctl is None:
            raise RuntimeError("no plan has run on this stream")
        return int(ctl.view(torch.int32)[CTL_OFFSETS["total"] // 4].item()) & 0xFFFFFFFF

    # ------------------------------------------------------------------ observe
    def observe_(self, mean: torch.Tensor, var: torch.Tensor, last_epoch: torch.Tensor,
                 nonfinite: torch.Tensor, invalid_batches: torch.Tensor, ids: torch.Tensor,
                 losses: torch.Tensor, decay: float, epoch: int) -> None:
        """:func:`gpuprune.update.observe_groups` in one kernel (batches <= 4096, int32 or int64
        ids) or a stable sort plus one kernel. ``losses`` are float32
        (:func:`gpuprune.update.prepare_losses`).

        Out-of-range ids are handled on the device (the batch is ignored and counted in
        ``invalid_batches``), so nothing waits for the GPU.
        """
        x = losses.contiguous()
        b, n = ids.numel(), mean.numel()
        if b == 0:
            return
        self._check("losses", x, torch.float32)
        self._check("mean", mean, torch.float32)
        self._check("var", var, torch.float32)
        self._check("last_epoch", last_epoch, torch.int32)
        tail = (mean, var, last_epoch, nonfinite, invalid_batches, float(decay), int(epoch))
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
                if ids.dtype not in (torch.int32, torch.int64):
                    ids = ids.long()
                sidx, perm = torch.sort(ids.contiguous(), stable=True)
                s64, s32 = (None, sidx) if sidx.dtype == torch.int32 else (sidx, None)
                self._launch("gp_observe_sorted", _cdiv(b, _C["GP_OBS_THREADS"]),
                             _C["GP_OBS_THREADS"], s64, s32, perm, x, b, n, *tail)

    # ------------------------------------------------------------------ plan
    def plan(self, n: int, *, mode: int = _C["GP_SCORE_HASH"], k: int = 0, seed: int = 0,
             explore: int = 0, explore_seed: int = 0, params: tuple[float, float, float] = (0, 0, 0),
             mean: torch.Tensor | None = None, var: torch.Tensor | None = None,
             last_epoch: torch.Tensor | None = None, given: torch.Tensor | None = None,
             ids: torch.Tensor | None = None, full: bool = False, below_share: float | None = None,
             shuffle_seed: int | None = None, selected: torch.Tensor | None = None,
             prev: torch.Tensor | None = None, prev_size: int | None = None) -> PlanOutputs:
        """One launch of gp_plan over samples ``0 .. n-1``.

        Args:
            n: N (<= :data:`MAX_SAMPLES`).
            mode, params: how samples are scored (``GP_SCORE_*``; params ``(p0, p1, p2)``: UCB's
                ``(c, drift, epoch)``, InfoBatch's ``(kept share, 0, 0)``), from ``mean``, ``var``,
                ``last_epoch`` (float32, float32, int32) or ``given`` (float32).
            k, seed: the budget and the tie-break hash seed; ``explore``/``explore_seed``:
                epsilon-greedy's hash-only share of k.
            ids: plan these (distinct, int32) instead of selecting; ``full``: plan every sample.
            below_share: InfoBatch: k is ``n - n_below + floor(share * n_below)`` for the rank-0
                samples, and their packed bits are returned.
            shuffle_seed: write the keyed order (None: index order).
            selected: also return ``selected + 1`` for each planned id (int32, a new tensor).
            prev, prev_size: the previous plan's ids (int32; None with ``prev_size``: it held every
                sample) for the overlap.
        """
        n, k = int(n), int(k)
        if not 0 < n <= MAX_SAMPLES:
            raise ValueError(f"plan needs 0 < n <= {MAX_SAMPLES}, got n={n}")
        flags = 0
        if full:
            flags |= _C["GP_PLAN_FULL"]
        if ids is not None:
            flags |= _C["GP_PLAN_IDS"]
            ids = ids.to(torch.int32).contiguous()
            self._check("ids", ids, torch.int32)
        if shuffle_seed is not None:
            flags |= _C["GP_PLAN_SHUFFLE"]
        if selected is not None:
            self._check("selected", selected, torch.int32)
            flags |= _C["GP_PLAN_COUNT"]
        if prev_size is not None:
            flags |= _C["GP_PLAN_PREV"] | (_C["GP_PLAN_PREV_FULL"] if prev is None else 0)
            if prev is not None:
                prev = prev.to(torch.int32).contiguous()
        if below_share is not None:
            flags |= _C["GP_PLAN_BELOW"]
            params = (float(below_share), 0.0, 0.0)
        select = not full and ids is None
        if select:
            if not (below_share is not None or 0 <= explore <= k <= n):
                raise ValueError(f"plan needs 0 <= explore <= k <= n, got explore={explore}, k={k}, "
                                 f"n={n}")
            if mode != _C["GP_SCORE_HASH"]:
                tensors = {"given": (given, torch.float32)} if mode == _C["GP_SCORE_GIVEN"] else {
                    "mean": (mean, torch.float32), "var": (var, torch.float32),
                    "last_epoch": (last_epoch, torch.int32)}
                for name, (t, dtype) in tensors.items():
                    if t is None or t.numel() != n:
                        raise ValueError(f"{name} must have n={n} entries")
                    self._check(name, t, dtype)
        size = n if full or below_share is not None else ids.numel() if ids is not None else k
        k = size if not select or below_share is not None else k     # the kernel's bound on out
        key, ctl, marks = self._scratch_for(n)
        out = torch.empty(size, dtype=torch.int32, device=self.device)
        sel_out = torch.empty(n, dtype=torch.int32, device=self.device) if selected is not None else None
        words = _cdiv(n, 32)
        rescaled = (torch.empty(words, dtype=torch.int32, device=self.device)
                    if below_share is not None else None)
        overlap = torch.empty((), dtype=torch.float64, device=self.device) if prev_size is not None else None
        scored = select and mode != _C["GP_SCORE_HASH"]
        hi = torch.empty(n if scored else 1, dtype=torch.int32, device=self.device)
        cand = torch.empty(n if select else 1, dtype=torch.int32, device=self.device)
        s1, s2 = split_seed(seed), split_seed(explore_seed)
        ps = split_seed(shuffle_seed or 0)
        values = {
            "mean": mean, "var": var, "last": last_epoch, "given": given, "ids": ids,
            "nids": 0 if ids is None else ids.numel(), "prev": prev,
            "prev_size": 0 if prev_size is None else int(prev_size), "sel_in": selected,
            "sel_out": sel_out, "out": out, "rescaled": rescaled, "overlap": overlap, "hi": hi,
            "cand": cand, "marks": marks, "ctl": ctl, "n": n, "k": k, "mode": int(mode),
            "flags": flags, "s1lo": s1[0], "s1hi": s1[1], "explore": int(explore), "s2lo": s2[0],
            "s2hi": s2[1], "plo": ps[0], "phi": ps[1], "p0": params[0], "p1": params[1],
            "p2": params[2],
        }
        try:
            with self.runtime.session():
                self._launch("gp_plan", self.plan_grid(n), _SEL,
                             *(values[name] for name, _ in PLAN_ARGS), cooperative=True)
        except BaseException:
            self._scratch.pop(key, None)      # a launch failed half-way: never reuse its scratch
            raise
        total = ctl.view(torch.int32)[CTL_OFFSETS["total"] // 4]
        packed = None if rescaled is None else rescaled.view(torch.uint8)[:_cdiv(n, 8)]
        return PlanOutputs(out, sel_out, overlap, packed, total)

    def top_k(self, score: torch.Tensor | None, n: int, k: int, seed: int) -> torch.Tensor:
        """int32 ids of the k largest keys ``orderable(score) << 32 | hash32(i, seed)``
        (``hash32`` alone when ``score`` is None), in index order. ``0 < k < n <= MAX_SAMPLES``."""
        n, k = int(n), int(k)
        if not 0 < k < n <= MAX_SAMPLES:
            raise ValueError(f"top_k needs 0 < k < n <= {MAX_SAMPLES}, got k={k}, n={n}")
        if score is None:
            return self.plan(n, k=k, seed=seed).out
        if score.numel() != n:
            raise ValueError(f"score must have n={n} entries, got {score.numel()}")
        raw = score.detach().float().contiguous()
        return self.plan(n, mode=_C["GP_SCORE_GIVEN"], given=raw, k=k, seed=seed).out
