"""Launch sequences of the CUDA kernels: score update, exact-k selection per policy, shuffle, shard.

:class:`KernelOps` turns each operation of the torch reference into kernel launches on a *runtime*:
the CuPy runtime (launches on torch's current stream, see :mod:`gpuprune.kernels._loader`) or, in
tests, a serial host build of the same source (:mod:`gpuprune.kernels._host`). All buffers are torch
tensors on ``ops.device``; kernels get their ``data_ptr()``. Nothing here reads device memory from the
host, except :meth:`KernelOps.infobatch`, whose kept count depends on the data (one read per epoch,
shared with the bank's invalid-batch check).

Selection is "the k largest unique 64-bit keys" as in :mod:`gpuprune.select`: a radix select over
six digits (three for the score word, three for the tie-break hash; a pass exits at once when the set
is already known) finds the threshold, then an ordered compaction writes the chosen ids in index
order. The *set* equals the torch reference's; the order differs (the torch path returns
``argpartition``/``topk`` order), which does not matter because the Pruner orders every plan by
:func:`gpuprune.select.shuffle_order`, a function of the set alone.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from ..select import split_seed, trivial_top_k
from ._spec import CONSTANTS, CTL_BYTES, PASSES, SIGNATURES

__all__ = ["KernelOps", "Runtime", "MAX_SAMPLES"]

#: largest N the kernels accept (int32 counts and positions)
MAX_SAMPLES = 2**31 - 1

_C = CONSTANTS
_SEL = _C["GP_SEL_THREADS"]
_TILE = _C["GP_TILE"]
_FIRST_PASS_SCORE = 0           # start at the score word's top digit
_FIRST_PASS_HASH = 3            # start at the hash word (the high word is fixed by the init)
_HASH_WORD = 1 << 32


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
        # pickling or deep-copying a bank keeps the per-device kernels: reload them by device
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

    def _session(self):
        return self.runtime.session()

    def _stride_grid(self, n: int, per_thread: int = 8, per_sm: int = 4) -> int:
        return max(1, min(_cdiv(n, _SEL * per_thread), self.sm_count * per_sm))

    def _check(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
        if t.device != self.device or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor on {self.device}, got "
                             f"{t.dtype} on {t.device}")

    # ------------------------------------------------------------------ observe
    def observe(self, bank, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """``ScoreBank._update`` in one kernel (batches <= 2048) or a stable sort plus one kernel.

        The caller has validated shapes and devices; out-of-range ids are handled on the device (the
        batch is ignored and counted in ``bank.invalid_batches``), so nothing waits for the GPU.
        """
        idx = indices.long().contiguous()
        x = losses.detach().to(torch.float32).contiguous()
        b, n = idx.numel(), bank.num_samples
        if b == 0:
            return
        for name in ("mean", "var"):
            self._check(name, getattr(bank, name), torch.float32)
        for name in ("count", "last_epoch"):
            self._check(name, getattr(bank, name), torch.int32)
        tail = (_ptr(bank.mean), _ptr(bank.var), _ptr(bank.count), _ptr(bank.last_epoch),
                _ptr(bank.nonfinite), _ptr(bank.invalid_batches), float(bank.decay), int(bank.epoch))
        with self._session():
            if b <= _C["GP_OBS_SMALL_MAX"]:
                self._launch("gp_observe_small", 1, _C["GP_OBS_SMALL_THREADS"], _ptr(idx), _ptr(x),
                             b, n, *tail)
            else:
                sidx, perm = torch.sort(idx, stable=True)
                self._launch("gp_observe_sorted", _cdiv(b, _C["GP_OBS_THREADS"]), _C["GP_OBS_THREADS"],
                             _ptr(sidx), _ptr(perm), _ptr(x), b, n, *tail)

    # ------------------------------------------------------------------ selection building blocks
    def _score(self, mode: int, n: int, *, mean=None, var=None, count=None, raw=None, c: float = 0.0,
               thr: torch.Tensor | None = None, below: torch.Tensor | None = None) -> torch.Tensor:
        hi = torch.empty(n, dtype=torch.int32, device=self.device)   # bits of uint32 words
        self._launch("gp_score", self._stride_grid(n, per_thread=4, per_sm=8), _SEL, _ptr(mean),
                     _ptr(var), _ptr(count), _ptr(raw), n, mode, c, _ptr(thr), _ptr(hi), _ptr(below))
        return hi

    def _ctl(self, count: int = 1) -> torch.Tensor:
        return torch.empty((count, CTL_BYTES // 8), dtype=torch.int64, device=self.device)

    def _init(self, ctl: int, *, prefix: int = 0, bits: int = 0, need: int = 0,
              thresh: int | None = None) -> None:
        """Start a selection, or (``thresh`` given) state its answer ``{key >= thresh}`` directly."""
        done = thresh is not None
        self._launch("gp_select_init", 1, _SEL, ctl, prefix, bits, need, int(done),
                     thresh if done else 0)

    def _select(self, keys: tuple, n: int, ctl: int, ctl1: int, first_pass: int) -> None:
        grid = self._stride_grid(n)
        for shift, width in PASSES[first_pass:]:
            self._launch("gp_radix_pass", grid, _SEL, *keys[:2], n, *keys[2:], ctl1, ctl, shift, width)

    def _compact(self, keys: tuple, n: int, ctl: int, ctl1: int, total: int,
                 w_below: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = torch.empty(total, dtype=torch.int64, device=self.device)
        weights = None if w_below is None else torch.empty(total, dtype=torch.float32, device=self.device)
        if total == 0:
            return out, weights
        g = _cdiv(n, _TILE)
        counts = torch.empty(g, dtype=torch.int32, device=self.device)
        self._launch("gp_compact_count", g, _SEL, *keys[:2], n, *keys[2:], ctl1, ctl, _ptr(counts))
        self._launch("gp_scan_counts", 1, _C["GP_SCAN_THREADS"], _ptr(counts), g)
        self._launch("gp_compact_write", g, _SEL, *keys[:2], n, *keys[2:], ctl1, ctl, _ptr(counts),
                     _ptr(out), _ptr(weights), 0.0 if w_below is None else w_below)
        return out, weights

    @staticmethod
    def _keys(hi: torch.Tensor | None, mode: int, seed1: int, seed2: int = 0) -> tuple:
        s1lo, s1hi = split_seed(seed1)
        s2lo, s2hi = split_seed(seed2)
        return (_ptr(hi), mode, s1lo, s1hi, s2lo, s2hi)

    def _top_k_words(self, hi: torch.Tensor, n: int, k: int, seed: int) -> torch.Tensor:
        """The k largest ``hi[i] << 32 | hash32(i, seed)`` (hi = score words already written)."""
        ctl = self._ctl()
        keys = self._keys(hi, _C["GP_MODE_HI"], seed)
        self._init(_ptr(ctl), need=k)
        self._select(keys, n, _ptr(ctl), 0, _FIRST_PASS_SCORE)
        return self._compact(keys, n, _ptr(ctl), 0, k)[0]

    def _special(self, n: int, k: int) -> torch.Tensor | None:
        return trivial_top_k(n, k, self.device)

    # ------------------------------------------------------------------ policies
    def top_k_scores(self, scores: torch.Tensor, k: int, seed: int) -> torch.Tensor:
        """:func:`gpuprune.select.top_k_by_score` (ids of the k highest float scores)."""
        n = scores.numel()
        done = self._special(n, k)
        if done is not None:
            return done
        raw = scores.float().contiguous()
        with self._session():
            hi = self._score(_C["GP_SCORE_RAW"], n, raw=raw)
            return self._top_k_words(hi, n, k, seed)

    def ucb(self, bank, k: int, seed: int, c: float, uncertainty: str = "std") -> torch.Tensor:
        """``top_k_by_score(ucb_score(mean, var, seen, c, uncertainty), k, seed)``."""
        n = bank.num_samples
        done = self._special(n, k)
        if done is not None:
            return done
        mode = _C["GP_SCORE_UCB_STD"] if uncertainty == "std" else _C["GP_SCORE_UCB_VAR"]
        with self._session():
            hi = self._score(mode, n, mean=bank.mean, var=bank.var, count=bank.count, c=float(c))
            return self._top_k_words(hi, n, k, seed)

    def greedy(self, bank, k: int, seed: int) -> torch.Tensor:
        """``top_k_by_score(greedy_score(bank), k, seed)``."""
        n = bank.num_samples
        done = self._special(n, k)
        if done is not None:
            return done
        with self._session():
            hi = self._score(_C["GP_SCORE_GREEDY"], n, mean=bank.mean, count=bank.count)
            return self._top_k_words(hi, n, k, seed)

    def random_k(self, n: int, k: int, seed: int) -> torch.Tensor:
        """:func:`gpuprune.select.random_k`: the k largest ``hash32(i, seed)``."""
        done = self._special(n, k)
        if done is not None:
            return done
        ctl = self._ctl()
        keys = self._keys(None, _C["GP_MODE_HASH"], seed)
        with self._session():
            self._init(_ptr(ctl), prefix=0, bits=32, need=k)
            self._select(keys, n, _ptr(ctl), 0, _FIRST_PASS_HASH)
            return self._compact(keys, n, _ptr(ctl), 0, k)[0]

    def epsilon_greedy(self, bank, k: int, epsilon: float, seeds: tuple[int, int]) -> torch.Tensor:
        """:func:`gpuprune.policies.epsilon_greedy.epsilon_greedy_select` on ``greedy_score(bank)``.

        The exploit part is a top-(k - m) select; the explore part a second select over the keys
        ``untaken << 32 | hash32(i, seeds[1])``, which never reaches a taken sample since
        ``m <= N - (k - m)``. One compaction writes the union in index order.
        """
        n = bank.num_samples
        m = math.floor(epsilon * k)
        done = self._special(n, k)
        if done is not None:
            return done
        ctl = self._ctl(2)
        c1, c2 = _ptr(ctl), _ptr(ctl) + CTL_BYTES
        with self._session():
            hi = self._score(_C["GP_SCORE_GREEDY"], n, mean=bank.mean, count=bank.count)
            first = self._keys(hi, _C["GP_MODE_HI"], seeds[0])
            if k - m > 0:
                self._init(c1, need=k - m)
                self._select(first, n, c1, 0, _FIRST_PASS_SCORE)
            else:
                self._init(c1, thresh=2**64 - 1)      # nothing taken: no key reaches 2^64 - 1
            if m == 0:
                return self._compact(first, n, c1, 0, k)[0]
            explore = self._keys(hi, _C["GP_MODE_EXPLORE"], seeds[0], seeds[1])
            self._init(c2, prefix=1, bits=32, need=m)
            self._select(explore, n, c2, c1, _FIRST_PASS_HASH)
            return self._compact(explore, n, c2, c1, k)[0]

    def infobatch(self, bank, ratio: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`gpuprune.policies.infobatch.infobatch_select` on ``(bank.mean, bank.seen)``.

        The mean loss of the seen samples comes from the same torch expression as the reference (same
        bits on the same device). The below-mean count is read with ``bank.host_counts``: the one host
        synchronisation of the epoch, which also serves the bank's invalid-batch check.
        """
        n = bank.num_samples
        score, seen = bank.mean, bank.count > 0
        s64 = score.double()
        mean = torch.where(seen, s64, torch.zeros_like(s64)).sum() / seen.sum().clamp(min=1)
        below = torch.zeros(1, dtype=torch.int64, device=self.device)
        with self._session():
            hi = self._score(_C["GP_SCORE_INFOBATCH"], n, mean=bank.mean, count=bank.count,
                             thr=mean.reshape(1).contiguous(), below=below)
        (n_below,) = bank.host_counts(below)
        kept = n - n_below + math.floor((1.0 - ratio) * n_below)
        need = kept - (n - n_below)                 # below-mean samples kept
        ctl = self._ctl()
        keys = self._keys(hi, _C["GP_MODE_HI"], seed)
        with self._session():
            if need == n_below:
                self._init(_ptr(ctl), thresh=0)               # everything
            elif need == 0:
                self._init(_ptr(ctl), thresh=_HASH_WORD)      # only the samples not below the mean
            else:
                self._init(_ptr(ctl), prefix=0, bits=32, need=need)
                self._select(keys, n, _ptr(ctl), 0, _FIRST_PASS_HASH)
            idx, w = self._compact(keys, n, _ptr(ctl), 0, kept, w_below=1.0 / (1.0 - ratio))
        return idx, w

    # ------------------------------------------------------------------ shuffle and shards
    def shuffle_order(self, ids: torch.Tensor, seed: int) -> torch.Tensor:
        """:func:`gpuprune.select.shuffle_order`: argsort of ``hash32(ids, seed)`` (hashes by kernel)."""
        ids = ids.long().contiguous()
        keys = torch.empty_like(ids)
        lo, hi = split_seed(seed)
        if ids.numel():
            with self._session():
                self._launch("gp_hash_index", self._stride_grid(ids.numel(), 4, 8), _SEL, _ptr(ids),
                             ids.numel(), lo, hi, _ptr(keys))
        return torch.argsort(keys)

    def shuffle_shard(self, ids: torch.Tensor, weights: torch.Tensor | None, seed: int, rank: int,
                      world_size: int, drop_last: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rank ``rank``'s share of the shuffled ids (and weights):
        ``shard_indices(shuffle(ids, seed), rank, world_size, drop_last)`` in one pass over the order."""
        order = self.shuffle_order(ids, seed)
        ids = ids.long().contiguous()
        n = ids.numel()
        per = n // world_size if drop_last else _cdiv(n, world_size)
        shuffled = ids[order]
        sw = None if weights is None else weights.float().contiguous()[order]
        out = torch.empty(per, dtype=torch.int64, device=self.device)
        out_w = None if weights is None else torch.empty(per, dtype=torch.float32, device=self.device)
        if per:
            with self._session():
                self._launch("gp_shard_gather", self._stride_grid(per, 4, 8), _SEL, _ptr(shuffled),
                             _ptr(sw), n, rank, world_size, per, _ptr(out), _ptr(out_w))
        return out, out_w
