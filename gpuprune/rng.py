"""Randomness from (seed, epoch), never from global state.

Each epoch gets its own CPU ``torch.Generator`` seeded from a SplitMix64 mix of (seed, epoch). Policies
draw a few 64-bit words from it and turn them into per-sample values with the keyed hash of
:mod:`gpuprune.keys`. The generator lives on the host and only a handful of words are drawn, so
no device work or host synchronisation is involved, and the plan is the same on CPU and on any GPU.
"""

from __future__ import annotations

import torch

__all__ = ["mix_seed", "epoch_generator", "draw_seeds", "shuffle_seed", "SHUFFLE_STREAM"]

_M64 = 0xFFFFFFFFFFFFFFFF
#: the generator stream of a plan's training order (stream 0 draws the selection)
SHUFFLE_STREAM = 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def mix_seed(*words: int) -> int:
    """Fold integers into one well-mixed 64-bit seed (order matters)."""
    h = 0
    for w in words:
        h = _splitmix64(h ^ (int(w) & _M64))
    return h


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A fresh CPU generator for (seed, epoch, stream); the same triple always gives the same draws."""
    g = torch.Generator(device="cpu")
    g.manual_seed(mix_seed(seed, epoch, stream))
    return g


def draw_seeds(generator: torch.Generator, n: int) -> list[int]:
    """Draw n 64-bit hash seeds from a (CPU) generator."""
    hi = torch.randint(0, 2**32, (n,), generator=generator, dtype=torch.int64)
    lo = torch.randint(0, 2**32, (n,), generator=generator, dtype=torch.int64)
    return [(int(h) << 32) | int(l) for h, l in zip(hi.tolist(), lo.tolist())]


def shuffle_seed(seed: int, epoch: int) -> int:
    """The hash seed of ``epoch``'s training order (:meth:`gpuprune.backend.Backend.shuffle`): one
    word from stream :data:`SHUFFLE_STREAM` of (seed, epoch), so the order does not depend on how
    many words the selection drew."""
    return draw_seeds(epoch_generator(seed, epoch, SHUFFLE_STREAM), 1)[0]
