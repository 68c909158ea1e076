"""An independent, slow rendering of gpuprune's documented formulas in numpy and plain Python: the
oracle the test suite holds the torch reference to (the doctor, on a user's machine, compares the
kernels and the CPU paths with the torch reference instead)."""

from __future__ import annotations

import math

import numpy as np
import torch

from gpuprune.doctor.reference import Implementation, RunSpec, _policy_object

__all__ = ["NumpyReference"]

_F32_MAX = float(np.finfo(np.float32).max)
_M32 = 0xFFFFFFFF


def _tree_sum(x: np.ndarray) -> float:
    """Pairwise sum in the documented fixed order: pad to a power of two, add halves."""
    n = len(x)
    size = 1 << max(n - 1, 0).bit_length()
    x = np.concatenate([x, np.zeros(size - n)]) if size != n else x
    while len(x) > 1:
        x = x[0::2] + x[1::2]
    return float(x[0]) if len(x) else 0.0


def _winsorised_scale(var: np.ndarray, seen: np.ndarray) -> float:
    """UCB's drift scale as documented: the seen variances rounded down to 4 significant bits
    (the low 20 bits of the float32 cleared), each capped at the value of rank ceil(0.9 m) among
    them, averaged with the products count x value summed over the 2048 possible values in
    increasing order as a pairwise tree."""
    q = (np.abs(var[seen]).astype(np.float32).view(np.uint32) & np.uint32(0xFFF00000)).view(np.float32)
    m = q.size
    if m == 0:
        return 0.0
    cap = np.sort(q)[(9 * m + 9) // 10 - 1]
    values, counts = np.unique(q, return_counts=True)           # one value per bucket
    per_bucket = np.zeros(2048)
    per_bucket[values.view(np.uint32) >> 20] = counts * np.minimum(values, cap).astype(np.float64)
    return _tree_sum(per_bucket) / m


def _int_pow(base: float, n: int) -> float:
    """``base ** n`` by binary exponentiation (squarings from the lowest bit), in Python floats."""
    r = 1.0
    while n:
        if n & 1:
            r *= base
        base *= base
        n >>= 1
    return r


class NumpyReference(Implementation):
    """An independent, slow rendering of the documented formulas in numpy and plain Python.

    * keys: ``hash32(i, seed) = fmix32(fmix32(i ^ lo) ^ hi)`` (MurmurHash3's finaliser, in uint64
      arithmetic with masks) and a float order word built the classic radix way (flip all bits of a
      negative float, set the sign bit of a positive one; NaN counted as -inf, -0 as +0), unlike the
      library's signed-int form; top-k is a full ``argsort`` of the 64-bit keys;
    * shuffle: ids in index order moved to keyed positions (:meth:`positions`);
    * observe: a Python loop per sample with the merge formulas of :mod:`gpuprune.update` in float64
      (sums in batch order, ``a = 1 - decay ** c`` with ``decay ** c`` by binary exponentiation,
      as documented in :func:`gpuprune.update.int_pow`), rounded to float32 once;
    * plans: each policy's documented rule, written out again (UCB's score in float32 arithmetic,
      means over the seen samples summed as a pairwise tree, as :func:`gpuprune.stats.tree_sum`
      documents). Only the host-side seed draws are shared with the
      library (:mod:`gpuprune.rng`): they involve no backend.
    """

    name = "numpy reference"
    ignores_bad_batches = True

    # ---------------------------------------------------------------- keys
    @staticmethod
    def fmix32(h: np.ndarray) -> np.ndarray:
        h = h.astype(np.uint64) & np.uint64(_M32)
        h ^= h >> np.uint64(16)
        h = (h * np.uint64(0x85EBCA6B)) & np.uint64(_M32)
        h ^= h >> np.uint64(13)
        h = (h * np.uint64(0xC2B2AE35)) & np.uint64(_M32)
        return h ^ (h >> np.uint64(16))

    def hash32(self, ids: np.ndarray, seed: int) -> np.ndarray:
        seed = int(seed) & 0xFFFFFFFFFFFFFFFF
        lo, hi = np.uint64(seed & _M32), np.uint64(seed >> 32)
        return self.fmix32(self.fmix32(ids.astype(np.uint64) ^ lo) ^ hi)

    @staticmethod
    def order_word(score: np.ndarray) -> np.ndarray:
        s = np.array(score, dtype=np.float32)
        s[np.isnan(s)] = -np.inf
        s[s == 0] = 0.0                                  # -0 counts as +0
        u = s.view(np.uint32).astype(np.uint64)
        neg = (u & np.uint64(0x80000000)) != 0
        return np.where(neg, ~u & np.uint64(_M32), u | np.uint64(0x80000000))

    def keys(self, score: np.ndarray | None, n: int, seed: int) -> np.ndarray:
        h = self.hash32(np.arange(n, dtype=np.uint64), seed)
        return h if score is None else (self.order_word(score) << np.uint64(32)) | h

    def top_k_np(self, score: np.ndarray | None, n: int, k: int, seed: int) -> np.ndarray:
        if k == 0:
            return np.empty(0, dtype=np.int64)
        order = np.argsort(self.keys(score, n, seed), kind="stable")
        return np.sort(order[n - k:]).astype(np.int64)

    def positions(self, k: int, seed: int) -> np.ndarray:
        """The documented keyed bijection of ``[0, k)``: on words of ``b`` bits (``2**b`` the
        smallest power of two >= k), four rounds of ``x ^= key_r; x = x * M_r mod 2**b;
        x ^= x >> ceil(b / 2)`` with ``key_r = hash32(r, seed) mod 2**b``, repeated on a value
        until it falls below k (uint64 arithmetic, one rank at a time per loop pass)."""
        if k <= 1:
            return np.zeros(k, dtype=np.int64)
        b = (k - 1).bit_length()
        mask = np.uint64((1 << b) - 1)
        keys = self.hash32(np.arange(4, dtype=np.uint64), seed) & mask
        mults = [0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F]

        def rounds(x: np.ndarray) -> np.ndarray:
            for key, mult in zip(keys, mults):
                x = ((x ^ key) * np.uint64(mult)) & mask     # < 2**32 * 2**32: no uint64 overflow
                x = x ^ (x >> np.uint64((b + 1) // 2))
            return x

        out = rounds(np.arange(k, dtype=np.uint64))
        todo = out >= k
        while todo.any():
            out[todo] = rounds(out[todo])
            todo = out >= k
        return out.astype(np.int64)

    def shuffle_np(self, ids: np.ndarray, seed: int) -> np.ndarray:
        ids = np.sort(np.asarray(ids, dtype=np.int64))
        out = np.empty_like(ids)
        out[self.positions(ids.size, seed)] = ids
        return out

    def top_k(self, score, n, k, seed):
        return self.top_k_np(None if score is None else score.numpy(), n, k, seed)

    def shuffle(self, ids, seed):
        return self.shuffle_np(ids.numpy(), seed)

    # ---------------------------------------------------------------- observe
    def new_state(self, n):
        return {"mean": np.zeros(n, np.float32), "var": np.zeros(n, np.float32),
                "last_epoch": np.full(n, -1, np.int32), "nonfinite": np.zeros((), np.int64),
                "invalid_batches": np.zeros((), np.int64)}

    @staticmethod
    def prepare(losses: torch.Tensor) -> np.ndarray:
        """float32 losses: float64 finite values saturate at +-FLT_MAX, the rest are exact."""
        if losses.dtype == torch.float64:
            x = losses.numpy()
            with np.errstate(invalid="ignore"):
                x = np.where(np.isfinite(x), np.clip(x, -_F32_MAX, _F32_MAX), x)
            return x.astype(np.float32)
        return losses.float().numpy()                   # fp16/bf16 widen exactly

    def observe(self, state, ids, losses, decay, epoch):
        n = state["mean"].size
        idx = ids.long().numpy()
        if idx.size == 0:
            return
        if idx.min() < 0 or idx.max() >= n:
            state["invalid_batches"] += 1                 # the GPU contract: the batch is ignored
            return
        groups: dict[int, list[float]] = {}
        for i, v in zip(idx.tolist(), self.prepare(losses).tolist()):
            if math.isfinite(v):
                groups.setdefault(i, []).append(v)
            else:
                state["nonfinite"] += 1
        mean, var, last = state["mean"], state["var"], state["last_epoch"]
        for i, xs in groups.items():
            mu, v0, c = float(mean[i]), float(var[i]), len(xs)
            s1 = s2 = 0.0
            for x in xs:
                d = x - mu
                s1 += d
                s2 += d * d
            dm = s1 / c
            within = max(s2 / c - dm * dm, 0.0)
            a = 1.0 - _int_pow(decay, c) if last[i] >= 0 else 1.0
            mean[i] = np.float32(mu + a * dm)
            var[i] = np.float32(min((1.0 - a) * v0 + a * within + a * (1.0 - a) * dm * dm, _F32_MAX))
            last[i] = epoch

    def arrays(self, state):
        return {k: np.array(v) for k, v in state.items()}

    def start(self, spec):
        return _NumpyRun(self, spec)


class _NumpyRun:
    """The Pruner's documented behaviour for one run, written out with :class:`NumpyReference`."""

    def __init__(self, ref: NumpyReference, spec: RunSpec) -> None:
        self.ref, self.spec = ref, spec
        n, e = spec.num_samples, spec.num_epochs
        # settings made concrete by the policy object (defaults from the budget), its default
        # decay and its full-data epochs at the end: schedule facts, the same on every backend
        from gpuprune.schedule import Schedule
        rule = _policy_object(spec).rule(spec.keep, n, Schedule(e), spec.decay)
        self.settings = {**rule.policy.settings(), **spec.settings_dict()}
        self.k = n if spec.policy == "full" else max(1, math.floor(spec.keep * n + 0.5))
        self.final_full = rule.schedule.final
        self.decay = rule.decay
        self.state = ref.new_state(n)
        self.current: tuple[np.ndarray, np.ndarray, bool] | None = None   # ids, weight map, full
        self.epoch = 0

    def _full(self, e: int) -> bool:
        s = self.spec
        return s.policy == "full" or e < s.warmup_epochs or e >= s.num_epochs - self.final_full

    def _select(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        from gpuprune.rng import draw_seeds, epoch_generator
        ref, s, st, n, k = self.ref, self.spec, self.state, self.spec.num_samples, self.k
        mean, var, seen = st["mean"], st["var"], st["last_epoch"] >= 0
        gen = epoch_generator(s.seed, 0 if s.policy == "static" else e)
        ones = np.ones(n, np.float32)
        if s.policy == "uniform":
            (seed,) = draw_seeds(gen, 1)
            return ref.top_k_np(None, n, k, seed), ones
        if s.policy == "epsilon_greedy":
            s0, s1 = draw_seeds(gen, 2)
            score = np.where(seen, mean, np.float32(np.inf)).astype(np.float32)
            m = math.floor(self.settings.get("epsilon", 0.1) * k)
            exploit = ref.top_k_np(score, n, k - m, s0)
            if m == 0:
                return exploit, ones
            rest = np.zeros(n, np.float32)
            rest[exploit] = -np.inf
            return np.concatenate([exploit, ref.top_k_np(rest, n, m, s1)]), ones
        if s.policy == "ucb":
            (seed,) = draw_seeds(gen, 1)
            v = np.maximum(var.astype(np.float64), 0.0)
            drift = float(self.settings.get("drift", 0.0))
            if drift > 0.0:                    # var + drift * robust seen var * epochs unobserved
                age = np.maximum(e - st["last_epoch"].astype(np.float64), 0.0)
                v = v + (drift * _winsorised_scale(var, seen)) * age
            v = np.minimum(v, _F32_MAX)
            spread = np.sqrt(v) if self.settings.get("uncertainty", "std") == "std" else v
            score = mean.astype(np.float64) + float(self.settings.get("c", 1.0)) * spread
            score = np.clip(score, -_F32_MAX, _F32_MAX).astype(np.float32)   # one rounding
            score = np.where(seen, score, np.float32(np.inf)).astype(np.float32)
            return ref.top_k_np(score, n, k, seed), ones
        if s.policy == "infobatch":
            (seed,) = draw_seeds(gen, 1)
            ratio = self.settings["ratio"]
            q = min(1.0, max(self.settings.get("min_keep", 0.0), 1.0 - ratio))   # kept share
            s64 = mean.astype(np.float64)
            m = _tree_sum(np.where(seen, s64, 0.0)) / max(int(seen.sum()), 1)
            below = seen & (s64 < m)
            n_below = int(below.sum())
            kept = n - n_below + math.floor(q * n_below)
            rank = np.where(below, np.float32(0), np.float32(1)).astype(np.float32)
            wmap = np.where(below, np.float32(1.0 / q), np.float32(1)).astype(np.float32)
            return ref.top_k_np(rank, n, kept, seed), wmap
        if s.policy == "static":
            (seed,) = draw_seeds(gen, 1)
            scores = self.settings.get("scores")
            scores = None if scores is None else np.asarray(scores, dtype=np.float32)
            return ref.top_k_np(scores, n, k, seed), ones
        raise ValueError(f"the numpy reference does not know policy {s.policy!r}")

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        from gpuprune.rng import SHUFFLE_STREAM as _SHUFFLE_STREAM
        from gpuprune.rng import draw_seeds, epoch_generator
        n = self.spec.num_samples
        full = self._full(epoch)
        cur = self.current
        if full:
            ids, wmap = np.arange(n, dtype=np.int64), np.ones(n, np.float32)
        elif cur is None or cur[2] or self.spec.policy != "static":
            ids, wmap = self._select(epoch)
        else:
            ids, wmap = cur[0], cur[1]
        (shuffle_seed,) = draw_seeds(epoch_generator(self.spec.seed, epoch, _SHUFFLE_STREAM), 1)
        order = self.ref.shuffle_np(ids, shuffle_seed)
        self.current, self.epoch = (ids, wmap, full), epoch
        return order, wmap[order]

    def observe(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        self.ref.observe(self.state, ids, losses, self.decay, self.epoch)

    def arrays(self) -> dict[str, np.ndarray]:
        return self.ref.arrays(self.state)
