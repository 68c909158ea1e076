"""Exact-k selection with a reproducible random tie-break.

Every selection in gpuprune is "the k largest of a 64-bit key", where the key is unique per sample::

    key[i] = orderable(score[i]) << 32 | hash32(i, seed)

The high word orders samples by score (NaN sorted as -inf, -0 equal to +0); the low word is a keyed
bijection of the index, so equal scores fall in a pseudo-random order that depends on the seed and not
on the position in the dataset. Because the keys are unique, exactly k samples satisfy ``key >= T`` for
the k-th largest key ``T``: the selected *set* is a pure function of (scores, seed), whatever the
device, the top-k algorithm or the launch configuration.

The hash is the MurmurHash3 32-bit finaliser (``fmix32``), applied twice with two seed words. Each
step is a bijection of uint32, so for N < 2**32 the keys never collide. All arithmetic is done in
int64 with explicit masks, which gives the same bits on CPU and CUDA.

These functions are the reference ("torch") implementation; the CUDA kernels of
:mod:`gpuprune.kernels` must match them bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "MASK32",
    "fmix32",
    "hash32",
    "orderable",
    "composite_key",
    "top_k",
    "trivial_top_k",
    "top_k_by_score",
    "random_k",
    "hash_uniform",
    "shuffle",
    "shuffle_order",
    "split_seed",
]

MASK32 = 0xFFFFFFFF
_C1 = 0x85EBCA6B
_C2 = 0xC2B2AE35


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 finaliser on uint32 values held in an int64 tensor (a bijection of [0, 2**32))."""
    h = h & MASK32
    h = h ^ (h >> 16)
    h = (h * _C1) & MASK32
    h = h ^ (h >> 13)
    h = (h * _C2) & MASK32
    return h ^ (h >> 16)


def split_seed(seed: int) -> tuple[int, int]:
    """Split a 64-bit seed into the two 32-bit words used by :func:`hash32`."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed & MASK32, (seed >> 32) & MASK32


def _fmix32_np(h: np.ndarray) -> np.ndarray:
    """fmix32 on a uint32 numpy array, in place (uint32 products wrap mod 2**32, as required)."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(_C1)
    h ^= h >> np.uint32(13)
    h *= np.uint32(_C2)
    h ^= h >> np.uint32(16)
    return h


def hash32(index: torch.Tensor, seed: int) -> torch.Tensor:
    """Keyed bijection of uint32 indices: ``fmix32(fmix32(i ^ s_lo) ^ s_hi)`` (int64 tensor in, int64 out).

    On CPU the same bits are computed in native uint32 numpy arithmetic, about 10x faster than the
    masked int64 torch ops (which are kept for other devices and as the reference).
    """
    lo, hi = split_seed(seed)
    if index.device.type == "cpu":
        h = index.numpy().astype(np.uint32)          # ids are < 2**32: the low word is the id
        h ^= np.uint32(lo)
        h = _fmix32_np(h)
        h ^= np.uint32(hi)
        return torch.from_numpy(_fmix32_np(h).astype(np.int64))
    return fmix32(fmix32(index.long() ^ lo) ^ hi)


def orderable(score: torch.Tensor) -> torch.Tensor:
    """Map float32 scores to int64 values with the same order; NaN -> -inf, -0 -> +0.

    The result lies in [-2**31, 2**31) so it fits the high word of a 64-bit key.
    """
    if score.device.type == "cpu":  # same bits in numpy, without torch's int64 temporaries
        a = score.detach().numpy().astype(np.float32)           # a copy we may modify
        a[np.isnan(a)] = -np.inf
        a += np.float32(0.0)                                     # -0 + 0 = +0
        b = a.view(np.int32)
        np.bitwise_xor(b, np.int32(0x7FFFFFFF), out=b, where=b < 0)
        return torch.from_numpy(b.astype(np.int64))
    s = score.float()
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s) + 0.0  # + 0.0 turns -0 into +0
    b = s.view(torch.int32).long()
    return torch.where(b >= 0, b, b ^ 0x7FFFFFFF)


def composite_key(score: torch.Tensor, seed: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """Unique 64-bit keys: score order first, then a keyed hash of the sample index.

    Args:
        score: 1-D float scores (higher = more wanted).
        seed: 64-bit seed of the tie-break.
        index: sample ids of the entries (default ``arange(len(score))``).
    """
    if index is None:
        index = torch.arange(score.numel(), device=score.device)
    return (orderable(score) << 32) | hash32(index, seed)


def trivial_top_k(n: int, k: int, device: torch.device | str) -> torch.Tensor | None:
    """Check ``0 <= k <= n``; return the answer when it needs no keys (k = 0 or k = n), else None."""
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got k={k}")
    if k == n:
        return torch.arange(n, device=device)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    return None


def top_k(key: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest entries of a 1-D int64 key with unique values (unordered).

    On CPU this uses ``numpy.argpartition`` (about 3x faster than ``torch.topk`` on 2 cores); on a GPU
    ``torch.topk(sorted=False)``, which needs no host synchronisation.
    """
    n = key.numel()
    trivial = trivial_top_k(n, k, key.device)
    if trivial is not None:
        return trivial
    if key.device.type == "cpu":
        a = key.numpy()
        return torch.from_numpy(np.argpartition(a, n - k)[n - k:].astype(np.int64))
    return torch.topk(key, k, sorted=False).indices


def top_k_by_score(score: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Indices of the k highest scores, ties broken by a keyed hash; NaN ranks lowest."""
    return top_k(composite_key(score, seed), k)


def random_k(n: int, k: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A uniformly spread random k-subset of ``range(n)`` (the k largest keyed hashes), unordered."""
    return top_k(hash32(torch.arange(n, device=device), seed), k)


def hash_uniform(index: torch.Tensor, seed: int) -> torch.Tensor:
    """A float64 value in [0, 1) per index, from the keyed hash: a counter-based uniform draw."""
    return hash32(index, seed).double() / 4294967296.0


def shuffle_order(indices: torch.Tensor, seed: int) -> torch.Tensor:
    """Positions that shuffle unique sample ids: the argsort of their keyed hashes.

    The resulting order of ids depends only on the *set* of ids and the seed, not on the order they
    come in, so an unordered top-k result gives the same epoch order on every device. The hashes
    of unique ids are unique, so the sort has no ties and any sort algorithm gives the same answer.
    """
    return torch.argsort(hash32(indices, seed))


def shuffle(indices: torch.Tensor, seed: int) -> torch.Tensor:
    """Shuffle unique sample ids (see :func:`shuffle_order`)."""
    return indices[shuffle_order(indices, seed)]
