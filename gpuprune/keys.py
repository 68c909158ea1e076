"""Unique 64-bit selection keys: the torch reference that the CUDA kernels match bit for bit.

Every selection in gpuprune is "the k largest of a 64-bit key", where the key is unique per sample::

    key[i] = orderable(score[i]) << 32 | hash32(i, seed)

The high word orders samples by score (NaN sorted as -inf, -0 equal to +0); the low word is a keyed
bijection of the index, so equal scores fall in a pseudo-random order that depends on the seed and not
on the position in the dataset. Because the keys are unique, exactly k samples satisfy ``key >= T`` for
the k-th largest key ``T``: the selected *set* is a pure function of (scores, seed), whatever the
device, the top-k algorithm or the launch configuration.

The hash is the MurmurHash3 32-bit finaliser (``fmix32``), applied twice with two seed words. Each
step is a bijection of uint32, so for N < 2**32 the keys never collide. The torch forms compute in
int64 with explicit masks (same bits on CPU and CUDA); on the CPU the same bits are computed in native
uint32 numpy arithmetic, about 6x faster.

**Shuffle.** An epoch's plan is its selected ids in index order, moved to keyed pseudo-random
positions: the id of rank r goes to position ``permute(r)``, a keyed bijection of ``[0, k)``
(:func:`permute_ranks`). It needs no sort, so a kernel applies it while it writes the selected ids
(``out[permute(rank)] = id``), and the order depends only on the set and the seed. The bijection works
on ``b``-bit words (``2**b`` the smallest power of two >= k): four rounds of xor with a round key,
multiplication by an odd constant modulo ``2**b`` and a right xorshift by ``ceil(b / 2)`` (each a
bijection of b-bit words, as in MurmurHash3's finaliser), and cycle walking: a value >= k is sent
through the rounds again until it lands in ``[0, k)`` (fewer than two rounds of four on average,
since ``2**b < 2k``).

Nothing here chooses a backend: :mod:`gpuprune.backend` does, and uses these as the torch reference.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from .stats import masked_mean, tree_sum

__all__ = ["MASK32", "fmix32", "split_seed", "hash32", "orderable", "composite_key", "PERM_ROUNDS",
           "PERM_MULTIPLIERS", "perm_params", "permute_ranks", "permute_ranks_np", "permute_ranks_doubling",
           "CPU_BLOCK", "shuffle_into_np", "shuffle_sorted", "F32_MAX",
           "DRIFT_BUCKETS", "drift_scale", "upper_bound_score", "mean_score", "Score", "MeanScore",
           "UCBScore", "BelowMeanScore", "GivenScore", "BUILTIN_SCORES", "Pick", "select_mask",
           "explore_mask", "pack_bits"]

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
    """Keyed bijection of ids < 2**32: ``fmix32(fmix32(i ^ s_lo) ^ s_hi)``, as int64 in [0, 2**32)."""
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

    The result lies in [-2**31, 2**31), so it fits the high word of a 64-bit key.
    """
    if score.device.type == "cpu":  # same bits in numpy, without torch's int64 temporaries
        a = score.detach().numpy().astype(np.float32)           # a copy we may modify
        a[np.isnan(a)] = -np.inf
        a += np.float32(0.0)                                     # -0 + 0 = +0
        b = a.view(np.int32)
        np.bitwise_xor(b, np.int32(0x7FFFFFFF), out=b, where=b < 0)
        return torch.from_numpy(b.astype(np.int64))
    s = score.float()
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s) + 0.0  # -0 + 0 = +0
    b = s.view(torch.int32).long()
    return torch.where(b >= 0, b, b ^ 0x7FFFFFFF)


def composite_key(score: torch.Tensor | None, seed: int, n: int = 0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Unique 64-bit keys of samples ``0 .. n-1``: score order first, then the keyed hash of the id.

    Args:
        score: 1-D float scores (higher = more wanted), or None when all samples rank equal (the
            key is then the hash alone: a uniformly random order).
        seed: 64-bit seed of the tie-break.
        n, device: number of samples and their device when ``score`` is None.
    """
    if score is None:
        return hash32(torch.arange(n, device=device), seed)
    h = hash32(torch.arange(score.numel(), device=score.device), seed)
    return (orderable(score) << 32) | h


# ------------------------------------------------------------------------------------ shuffle
#: rounds of the keyed bijection of :func:`permute_ranks`
PERM_ROUNDS = 4
#: the odd multipliers of the rounds (odd, so multiplication is a bijection modulo any 2**b)
PERM_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)


def _fmix32_int(h: int) -> int:
    h &= MASK32
    h ^= h >> 16
    h = (h * _C1) & MASK32
    h ^= h >> 13
    h = (h * _C2) & MASK32
    return h ^ (h >> 16)


def perm_params(k: int, seed: int) -> tuple[int, int, tuple[int, ...]]:
    """``(bits, shift, round keys)`` of the shuffle of k positions: ``2**bits`` is the smallest
    power of two >= k, ``shift = ceil(bits / 2)``, and round key r is ``hash32(r, seed)`` masked to
    ``bits`` bits (the kernels get these three as launch arguments)."""
    bits = max(int(k) - 1, 0).bit_length()
    mask = (1 << bits) - 1
    lo, hi = split_seed(seed)
    keys = tuple(_fmix32_int(_fmix32_int(r ^ lo) ^ hi) & mask for r in range(PERM_ROUNDS))
    return bits, (bits + 1) // 2, keys


def _rounds_np(x: np.ndarray, mask: int, shift: int, keys) -> None:
    """The rounds on a uint32 array, in place (uint32 products wrap modulo 2**32; masking then
    gives the product modulo 2**bits)."""
    m, sh, t = np.uint32(mask), np.uint32(shift), np.empty_like(x)
    for key, mult in zip(keys, PERM_MULTIPLIERS):
        x ^= np.uint32(key)
        x *= np.uint32(mult)
        x &= m
        x ^= np.right_shift(x, sh, out=t)


#: the inverses of :data:`PERM_MULTIPLIERS` modulo 2**32 (so modulo every 2**bits)
_PERM_INVERSES = tuple(pow(mult, -1, 1 << 32) for mult in PERM_MULTIPLIERS)


def _inverse_rounds_np(x: np.ndarray, mask: int, shift: int, keys) -> None:
    """The inverse of :func:`_rounds_np`, in place: the rounds undone last to first. The xorshift
    by ``shift = ceil(bits / 2)`` is its own inverse on b-bit words (``x >> 2 shift`` is 0)."""
    m, sh, t = np.uint32(mask), np.uint32(shift), np.empty_like(x)
    for key, inv in zip(reversed(keys), reversed(_PERM_INVERSES)):
        x ^= np.right_shift(x, sh, out=t)
        x *= np.uint32(inv)
        x &= m
        x ^= np.uint32(key)


def _rounds_torch(x: torch.Tensor, mask: int, shift: int, keys) -> torch.Tensor:
    """The rounds on int64 values < 2**32 (the products wrap modulo 2**64, whose low bits are the
    product modulo 2**bits)."""
    for key, mult in zip(keys, PERM_MULTIPLIERS):
        x = ((x ^ key) * mult) & mask
        x = x ^ (x >> shift)
    return x


def permute_ranks(k: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``permute(r)`` for every rank ``r < k``: a keyed bijection of ``[0, k)`` (int64).

    On the CPU the cycle walk loops over the values still outside ``[0, k)`` (numpy). On another
    device, :func:`permute_ranks_doubling` computes the same bijection without reading values on
    the host.
    """
    k = int(k)
    if k <= 1:
        return torch.zeros(k, dtype=torch.int64, device=device)
    if torch.device(device).type != "cpu":
        return permute_ranks_doubling(k, seed, device)
    return torch.from_numpy(permute_ranks_np(k, seed).astype(np.int64))


#: ranks per block of the CPU shuffle and elements per block of the CPU UCB score: each block's
#: passes then stay in the L2 cache (32768 float64 = 256 KiB) instead of streaming N values
#: through memory once per operation (about 2x faster at N = 1e6)
CPU_BLOCK = 32768


def _walk_np(k: int, params, rounds) -> np.ndarray:
    """``rounds`` applied to ``0 .. k-1`` (block by block, in the cache) and again to every value
    still >= k (the cycle walk, on those few together), as uint32. With :func:`_rounds_np` this is
    ``permute(r)`` of every rank; with :func:`_inverse_rounds_np`, the rank of every position (the
    inverse bijection's walk passes the same values of the same cycle, backwards)."""
    bits, shift, keys = params
    mask = (1 << bits) - 1
    x = np.arange(k, dtype=np.uint32)
    outside = []
    for lo in range(0, k, CPU_BLOCK):
        block = x[lo:lo + CPU_BLOCK]
        rounds(block, mask, shift, keys)
        outside.append(np.flatnonzero(block >= k) + lo)
    out = np.concatenate(outside)
    while out.size:
        y = x[out]
        rounds(y, mask, shift, keys)
        x[out] = y
        out = out[y >= k]
    return x


def permute_ranks_np(k: int, seed: int) -> np.ndarray:
    """:func:`permute_ranks` as a uint32 numpy array (the CPU cycle walk)."""
    k = int(k)
    if k <= 1:
        return np.zeros(k, dtype=np.uint32)
    return _walk_np(k, perm_params(k, seed), _rounds_np)


def shuffle_into_np(out: np.ndarray, ids: np.ndarray, seed: int) -> np.ndarray:
    """``out[permute(r)] = ids[r]`` for every rank r of ``ids`` (numpy; ``out`` as long as ``ids``,
    any integer dtype that holds them), written as ``out[p] = ids[permute^-1(p)]``: a gather whose
    writes are in order, about twice as fast as scattering to permuted positions."""
    k = ids.size
    if out.shape != (k,) or ids.ndim != 1:
        raise ValueError(f"shuffle_into_np needs 1-D ids and an out of their length, got ids of "
                         f"shape {ids.shape} and out of shape {out.shape}")
    if k <= 1:
        out[:k] = ids
        return out
    ranks = _walk_np(k, perm_params(k, seed), _inverse_rounds_np)
    for lo in range(0, k, CPU_BLOCK):                  # (the int64 copy of each block's indices
        hi = min(lo + CPU_BLOCK, k)                    # that take makes stays in the cache)
        np.take(ids, ranks[lo:hi], out=out[lo:hi], mode="clip")   # "raise" would buffer out
    return out


def permute_ranks_doubling(k: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """:func:`permute_ranks` with a fixed number of tensor operations (no host read): the rounds are
    applied to all ``2**bits`` words once, then each chain of values outside ``[0, k)`` is followed
    by pointer doubling. A chain is at most ``2**bits`` long, so ``bits + 1`` doublings suffice."""
    k = int(k)
    if k <= 1:
        return torch.zeros(k, dtype=torch.int64, device=device)
    bits, shift, keys = perm_params(k, seed)
    mask = (1 << bits) - 1
    nxt = _rounds_torch(torch.arange(mask + 1, dtype=torch.int64, device=device), mask, shift, keys)
    for _ in range(bits + 1):
        nxt = torch.where(nxt < k, nxt, nxt[nxt])
    return nxt[:k]


def shuffle_sorted(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """``out[permute(r)] = ids[r]``: ids given in index order (a set), in the epoch's order."""
    if ids.device.type == "cpu":
        a = ids.numpy()
        return torch.from_numpy(shuffle_into_np(np.empty_like(a), a, seed))
    out = torch.empty_like(ids)
    out[permute_ranks(ids.numel(), seed, ids.device)] = ids
    return out


# ------------------------------------------------------------------------------------ UCB score
#: the largest finite float32 (where variances and scores saturate)
F32_MAX = float(np.finfo(np.float32).max)
#: buckets of the variance histogram behind :func:`drift_scale`: the top 11 bits of a non-negative
#: float32 below the sign (8 exponent bits and 3 mantissa bits: 4 significant bits)
DRIFT_BUCKETS = 2048
_BUCKET_SHIFT = 20


@functools.lru_cache(maxsize=8)
def _bucket_edges(device) -> torch.Tensor:
    """float64 lower edge of each variance bucket (the float32 whose low 20 bits are zero); one
    tensor per device, made once (read only)."""
    return (torch.arange(DRIFT_BUCKETS, dtype=torch.int32, device=device) << _BUCKET_SHIFT).view(
        torch.float32).double()


def _signed_counts(var: torch.Tensor, unseen: torch.Tensor | None) -> torch.Tensor:
    """Counts of the top 12 bits of each float32 variance (sign included: buckets 2048 and up hold
    the negative ones), the samples of ``unseen`` (a boolean mask, or None) left out. The CPU fast
    path of :func:`drift_scale`: one bincount, about 1.5x faster than numpy's, and it also tells
    whether a seen variance is negative, and how large the largest is (:func:`_clamps_needed`)."""
    bucket = var.contiguous().view(torch.int32).bitwise_right_shift(_BUCKET_SHIFT)
    bucket.bitwise_and_(2 * DRIFT_BUCKETS - 1)
    if unseen is not None:
        bucket.masked_fill_(unseen, 2 * DRIFT_BUCKETS)      # a bucket of its own, dropped below
    return torch.bincount(bucket, minlength=2 * DRIFT_BUCKETS + 1)[:2 * DRIFT_BUCKETS]


def _fold_sign(signed: torch.Tensor) -> torch.Tensor:
    """The :func:`drift_scale` buckets (of ``|var|``) from :func:`_signed_counts`."""
    return signed[:DRIFT_BUCKETS] + signed[DRIFT_BUCKETS:]


def _scale_of_counts(counts: torch.Tensor) -> torch.Tensor:
    """The winsorised mean of :func:`drift_scale` from its bucket counts (int64, on any device)."""
    m = counts.sum()
    rank = (9 * m + 9) // 10                                   # ceil(0.9 m), exact in integers
    cap = torch.searchsorted(counts.cumsum(0), rank.reshape(1))
    idx = torch.arange(DRIFT_BUCKETS, device=counts.device)
    edges = _bucket_edges(counts.device)
    capped = torch.where(idx < cap, edges, edges[cap.clamp(max=DRIFT_BUCKETS - 1)])
    return tree_sum(counts.double() * capped) / m.clamp(min=1).double()


def drift_scale(var: torch.Tensor, seen: torch.Tensor, *, numpy: bool | None = None) -> torch.Tensor:
    """A robust typical variance of the seen samples (float64, 0-d, on their device): the mean of
    their variances, each rounded down to 4 significant bits and capped at the 90th percentile of
    those rounded values (a winsorised mean). 0 when nothing is seen.

    Why not the plain mean: one sample with a saturated variance (a loss of 1e38) moves the mean of
    100 samples to ~1e36, and a drift term of that size makes every score equal in float32: UCB
    becomes uniform sampling. Here up to 10% of the samples may be extreme without moving the
    scale beyond the 90th percentile of the others. Computed from a histogram of 2048 buckets
    (exact integer counts) and a fixed-order float64 sum of ``count x value`` over the buckets, so
    the bits are the same on every device and in the CUDA kernel (one pass over the variances).

    The cap is the value of bucket c, the first bucket whose cumulative count reaches
    ``ceil(0.9 m)`` for m seen samples (the order statistic of rank ``ceil(0.9 m)``). ``numpy``
    (default: on the CPU) counts the buckets with a bincount instead of an index_add.
    """
    v = var.contiguous()
    if v.device.type == "cpu" and numpy is not False:
        return _scale_of_counts(_fold_sign(_signed_counts(v, None if seen.all() else ~seen)))
    bucket = ((v.view(torch.int32) & 0x7FFFFFFF) >> _BUCKET_SHIFT).long()   # |var|: -0 is 0
    counts = torch.zeros(DRIFT_BUCKETS, dtype=torch.int64, device=v.device).index_add_(
        0, bucket, seen.long())
    return _scale_of_counts(counts)


def _upper_bound_np(mean: np.ndarray, var: np.ndarray, unseen: np.ndarray | None, c: float,
                    uncertainty: str, step: float | None, age_into, *, clamp_var: bool = True,
                    clamp_age: bool = True, cap: bool = True) -> np.ndarray:
    """:func:`upper_bound_score` with numpy, :data:`CPU_BLOCK` samples at a time, in place in two
    float64 blocks. ``age_into(lo, hi, out)`` writes the float64 ages of samples ``lo .. hi-1``
    into ``out`` (read only when ``step`` is not None: the drift's ``drift * drift_scale``).
    ``clamp_var``, ``clamp_age``, ``cap`` False skip the clamp of the variances at 0, of the ages
    at 0 and of ``v`` at the float32 maximum: for a caller that has shown they change nothing."""
    n = mean.size
    score = np.empty(n, dtype=np.float32)
    g = np.empty(min(n, CPU_BLOCK))
    a = np.empty_like(g) if step is not None else None
    # overflow to float32 is clipped below; an unseen sample's v may be anything (its score is
    # +inf whatever it is), so the square root of one left negative is no error either
    with np.errstate(over="ignore", invalid="ignore"):
        for lo in range(0, n, CPU_BLOCK):
            hi = min(lo + CPU_BLOCK, n)
            w = g[:hi - lo]
            w[...] = var[lo:hi]                            # float32 -> float64 is exact
            if clamp_var:                                  # clamp(min=0): -0.0 stays, as in torch
                np.copyto(w, 0.0, where=w < 0.0)
            if step is not None:
                b = a[:hi - lo]
                age_into(lo, hi, b)
                if clamp_age:
                    np.copyto(b, 0.0, where=b < 0.0)
                b *= step
                w += b
            if cap:
                np.minimum(w, F32_MAX, out=w)
            if uncertainty == "std":
                np.sqrt(w, out=w)
            if c != 1.0:                                   # (1.0 * x is x)
                w *= c
            w += mean[lo:hi]
            score[lo:hi] = w                               # the one rounding to float32
    # clamping after the rounding gives the same floats (a value past the float32 maximum
    # rounds to it or to inf) on half the bytes
    np.clip(score, -F32_MAX, F32_MAX, out=score)
    if unseen is not None:
        score[unseen] = np.inf
    return score


def upper_bound_score(mean: torch.Tensor, var: torch.Tensor, seen: torch.Tensor, c: float,
                      uncertainty: str = "std", age: torch.Tensor | None = None,
                      drift: float = 0.0, *, numpy: bool | None = None) -> torch.Tensor:
    """UCB's score, float32: ``mean + c * sqrt(v)`` (``"std"``) or ``mean + c * v`` (``"var"``),
    unseen samples +inf, where ``v = var + drift * drift_scale(var, seen) * age`` with ``age`` the
    epochs since the sample was last observed (clamped at 0).

    Every step is one float64 operation (the sum and square root of the uncertainty, the product
    with c, the addition of the mean), rounded once to float32 at the end: a mean of 1000 next to
    one of 0.1 stays apart whatever else is large. ``v`` saturates at the float32 maximum and the
    score at +-that maximum, so extreme but finite losses keep every seen score finite, below the
    unseen samples' +inf. The CUDA kernel computes the same operations in the same order; on the
    CPU (``numpy``, the default there) numpy does, block by block.
    """
    drifting = drift > 0.0 and age is not None
    step = drift * drift_scale(var, seen, numpy=numpy) if drifting else None
    if mean.device.type == "cpu" and numpy is not False:
        s = seen.numpy()
        ages = age.numpy() if drifting else None

        def age_into(lo, hi, out):
            out[...] = ages[lo:hi]
        return torch.from_numpy(_upper_bound_np(
            mean.numpy(), var.numpy(), None if s.all() else ~s, c, uncertainty,
            float(step) if drifting else None, age_into))
    g = var.double().clamp(min=0.0)
    if drifting:
        g = g + step * age.double().clamp(min=0.0)
    g = g.clamp(max=F32_MAX)
    spread = g.sqrt() if uncertainty == "std" else g
    score = (mean.double() + c * spread).clamp(-F32_MAX, F32_MAX).float()
    return torch.where(seen, score, torch.full_like(score, float("inf")))


def mean_score(mean: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """The EMA loss, with never-seen samples at +inf (so each is visited before exploitation)."""
    return torch.where(seen, mean, torch.full_like(mean, float("inf")))


# ------------------------------------------------------------------------------------ selections
class Score(ABC):
    """How a selection scores each sample from the statistics: the high word of its key.

    A policy describes its score with one of these instead of computing it, so that a backend can
    compute it where it selects: the torch backend calls :meth:`torch` (the reference), the CUDA
    kernels compute the same operations in their first radix pass. A subclass the kernels do not
    know is computed with :meth:`torch` on every backend.
    """

    @abstractmethod
    def torch(self, mean: torch.Tensor, var: torch.Tensor, last_epoch: torch.Tensor) -> torch.Tensor:
        """The float32 score of every sample (higher = more wanted; NaN ranks lowest). The built-in
        scores also take ``numpy=False`` (run torch operations on the CPU too)."""


@dataclass(frozen=True)
class MeanScore(Score):
    """:func:`mean_score`: the EMA loss, unseen samples first (epsilon-greedy's exploitation)."""

    def torch(self, mean, var, last_epoch, *, numpy=None):
        return mean_score(mean, last_epoch >= 0)


@dataclass(frozen=True)
class UCBScore(Score):
    """:func:`upper_bound_score` of the statistics at ``epoch`` (ages ``epoch - last_epoch``)."""

    c: float
    uncertainty: str
    drift: float
    epoch: int

    def torch(self, mean, var, last_epoch, *, numpy=None):
        if last_epoch.device.type == "cpu" and numpy is not False:
            return _ucb_cpu(self, mean, var, last_epoch)
        age = self.epoch - last_epoch.long() if self.drift > 0.0 else None
        return upper_bound_score(mean, var, last_epoch >= 0, self.c, self.uncertainty, age,
                                 self.drift, numpy=numpy)


def _clamps_needed(signed: torch.Tensor, step: float, first: int, last: int, epoch: int
                   ) -> dict[str, bool]:
    """Which clamps of :func:`_upper_bound_np` can change a seen sample's score, from the signed
    variance counts of :func:`_signed_counts`, the drift ``step`` and the range ``[first, last]``
    of the last-seen epochs (an unneeded clamp is skipped: the scores are the same bits):

    * ``clamp_var``: a seen variance is negative (a count in a negative bucket);
    * ``clamp_age``: a sample was last seen after ``epoch`` (a negative age);
    * ``cap``: unless ``e + step * max(epoch - max(first, 0), 0)`` rounds to at most the float32
      maximum, where ``e`` is the upper edge of the highest non-empty bucket. Every seen ``|var|``
      is below ``e`` and every seen age at most ``epoch - max(first, 0)``, and rounding is
      monotonic, so then no seen ``v`` exceeds the maximum (the unseen samples end at +inf
      whatever their ``v``).
    """
    counts = _fold_sign(signed)
    nonempty = torch.nonzero(counts)
    top = int(nonempty.max()) if nonempty.numel() else -1
    edge = float(_bucket_edges("cpu")[top + 1]) if top + 1 < DRIFT_BUCKETS else math.inf
    return {"clamp_var": bool(signed[DRIFT_BUCKETS:].any()), "clamp_age": last > epoch,
            "cap": not edge + step * max(epoch - max(first, 0), 0) <= F32_MAX}


def _ucb_cpu(score: UCBScore, mean: torch.Tensor, var: torch.Tensor, last_epoch: torch.Tensor
             ) -> torch.Tensor:
    """:class:`UCBScore` on the CPU: :func:`_upper_bound_np` with the ages written block by block
    from ``last_epoch`` (never N float64 values), and with drift, without the clamps that
    :func:`_clamps_needed` shows change nothing (the histogram it reads is the drift scale's,
    counted anyway). Without drift every clamp is applied."""
    le = last_epoch.numpy()
    first, last = (int(x) for x in torch.aminmax(last_epoch)) if le.size else (0, 0)
    unseen = le < 0 if first < 0 else None
    epoch = float(score.epoch)
    step, clamps = None, {}
    if score.drift > 0.0:
        signed = _signed_counts(var, None if unseen is None else torch.from_numpy(unseen))
        step = score.drift * float(_scale_of_counts(_fold_sign(signed)))
        clamps = _clamps_needed(signed, step, first, last, score.epoch)

    def age_into(lo, hi, out):
        np.subtract(epoch, le[lo:hi], out=out)
    return torch.from_numpy(_upper_bound_np(mean.numpy(), var.contiguous().numpy(), unseen, score.c,
                                            score.uncertainty, step, age_into, **clamps))


@dataclass(frozen=True)
class BelowMeanScore(Score):
    """InfoBatch's rank: 0 for a seen sample whose mean is strictly below the mean of the seen
    samples' means (:func:`gpuprune.stats.masked_mean`, a fixed-order float64 sum), else 1."""

    def torch(self, mean, var, last_epoch, *, numpy=None):
        seen = last_epoch >= 0
        m64 = mean.double()
        below = seen & (m64 < masked_mean(m64, seen))
        return torch.where(below, torch.zeros_like(mean), torch.ones_like(mean))


@dataclass(frozen=True, eq=False)
class GivenScore(Score):
    """Scores given as a tensor of N values (static scores)."""

    values: torch.Tensor

    def torch(self, mean, var, last_epoch, *, numpy=None):
        return self.values.to(device=mean.device, dtype=torch.float32)


#: the scores the CUDA kernels compute themselves (their torch methods take ``numpy=``)
BUILTIN_SCORES = (MeanScore, UCBScore, BelowMeanScore, GivenScore)


@dataclass(frozen=True, eq=False)
class Pick:
    """A selection described for :meth:`gpuprune.backend.Backend.plan`, which carries it out.

    The selected set is the ``k`` largest keys ``orderable(score) << 32 | hash32(id, seed)``
    (``score=None``: the hash alone, a uniformly random set), with two variants:

    * ``explore = m > 0`` (epsilon-greedy): the ``k - m`` largest keys, plus the ``m`` samples with
      the largest ``hash32(id, explore_seed)`` among the others;
    * ``below_share = q`` (InfoBatch, with :class:`BelowMeanScore`): ``k`` is replaced by
      ``N - n_below + floor(q * n_below)`` for the ``n_below`` samples of rank 0, so every sample
      of rank 1 is kept, and ``floor(q * n_below)`` of the rank-0 ones, by hash; the rank-0 samples
      are the plan's rescaled ones.

    Attributes:
        score: how samples are scored, or None (all equal: the hash decides).
        k: the budget (ignored with ``below_share``).
        seed: 64-bit seed of the tie-break hash.
        explore, explore_seed: epsilon-greedy's uniform share and its hash seed.
        below_share: InfoBatch's kept share of the rank-0 samples, in (0, 1].
    """

    score: Score | None
    k: int
    seed: int
    explore: int = 0
    explore_seed: int = 0
    below_share: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.explore <= self.k:
            raise ValueError(f"explore must lie in [0, k={self.k}], got explore={self.explore}")
        if self.below_share is not None and not isinstance(self.score, BelowMeanScore):
            raise ValueError("below_share needs score=BelowMeanScore()")


# ------------------------------------------------------------------------------------ reference
def _top_by_hash_np(ids: np.ndarray, count: int, seed: int) -> np.ndarray:
    """The ``count`` ids of ``ids`` (int64, distinct) with the largest ``hash32(id, seed)``."""
    if count >= ids.size:
        return ids
    h = hash32(torch.from_numpy(ids), seed).numpy()
    return ids[np.argpartition(h, ids.size - count)[ids.size - count:]]


def select_mask(score: torch.Tensor | None, n: int, k: int, seed: int,
                device: torch.device | str | None = None, *, numpy: bool | None = None
                ) -> torch.Tensor:
    """Boolean mask of the k largest keys ``orderable(score) << 32 | hash32(id, seed)`` of samples
    ``0 .. n-1`` (``score=None``: the hash alone), on the score's device (else ``device``).

    On the CPU (``numpy``, the default there) without building 64-bit keys: the k-th largest score
    T by ``numpy.partition``, every score > T, and of the scores equal to T the ones with the
    largest hash, as many as are still needed (the key order exactly). Elsewhere: ``torch.topk``
    of :func:`composite_key`.
    """
    device = torch.device(device or "cpu") if score is None else score.device
    if numpy is None:
        numpy = device.type == "cpu"
    if k <= 0 or k >= n:
        return torch.full((n,), k >= n and n > 0, dtype=torch.bool, device=device)
    if not numpy:
        key = composite_key(score, seed, n, device)
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        return mask.index_fill_(0, torch.topk(key, k, sorted=False).indices, True)
    if score is None:
        h = hash32(torch.arange(n), seed).numpy()
        return torch.from_numpy(h >= np.partition(h, n - k)[n - k])     # the hashes are unique
    # float order is key order once NaN is -inf (-0 and +0 compare equal, as their keys are)
    s = score.detach().numpy().astype(np.float32, copy=False)
    part = np.fmax(s, np.float32(-np.inf))                 # NaN -> -inf, in a copy to partition
    part.partition(n - k)
    t = part[n - k]
    if t == -np.inf:                                       # NaN must then equal -inf
        s = np.fmax(s, np.float32(-np.inf))
    mask = s >= t
    if np.count_nonzero(mask) == k:                        # no other score equals T: done
        return torch.from_numpy(mask)
    mask = s > t
    ties = np.flatnonzero(s == t)
    mask[_top_by_hash_np(ties, k - int(np.count_nonzero(mask)), seed)] = True
    return torch.from_numpy(mask)


def explore_mask(taken: torch.Tensor, m: int, seed: int, *, numpy: bool | None = None
                 ) -> torch.Tensor:
    """Boolean mask of the m samples not in ``taken`` with the largest ``hash32(id, seed)``
    (epsilon-greedy's uniform share): the m largest keys of a score that is -inf on ``taken``
    and 0 elsewhere."""
    n = taken.numel()
    if numpy is None:
        numpy = taken.device.type == "cpu"
    if not numpy:
        rest = torch.where(taken, float("-inf"), 0.0).to(torch.float32)
        return select_mask(rest, n, m, seed, numpy=False)
    mask = np.zeros(n, dtype=bool)
    mask[_top_by_hash_np(np.flatnonzero(~taken.numpy()), m, seed)] = True
    return torch.from_numpy(mask)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor of N as ceil(N / 8) bytes, bit ``i % 8`` of byte ``i // 8`` (the layout of
    :func:`gpuprune.plan.pack_mask`, which the CUDA kernels write as 32-bit words)."""
    n = mask.numel()
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.numpy(), bitorder="little"))
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask.to(torch.uint8)
    weights = (1 << torch.arange(8, device=mask.device)).to(torch.uint8)   # no host-to-device copy
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)
