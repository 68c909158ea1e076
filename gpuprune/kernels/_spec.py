"""What the Python side knows about ``csrc/gpuprune_kernels.cu``: names, signatures, constants.

A test parses the source and checks every entry here against it, so the two cannot drift apart.
"""

from __future__ import annotations

__all__ = ["SIGNATURES", "KERNEL_NAMES", "CONSTANTS", "PASSES", "CTL_BYTES", "CTL_OFFSETS"]

#: kernel name -> argument kinds: ``p`` pointer, ``q`` long long, ``Q`` unsigned long long, ``d`` double
SIGNATURES: dict[str, str] = {
    "gp_observe_small": "pppqqpppppdqq",
    "gp_observe_sorted": "pppqqpppppdq",
    "gp_radix_pass": "ppqqqqpqqqq",
    "gp_compact": "pqqqqpppq",
    "gp_hash_index": "pqqqp",
}

KERNEL_NAMES: tuple[str, ...] = tuple(SIGNATURES)

#: the ``#define``s of the source that the launch code relies on
CONSTANTS: dict[str, int] = {
    "GP_SEL_THREADS": 256,
    "GP_MAX_BINS": 2048,
    "GP_TILE_ITEMS": 16,
    "GP_TILE": 4096,
    "GP_OBS_THREADS": 256,
    "GP_OBS_SMALL_MAX": 4096,
    "GP_OBS_SMALL_THREADS": 1024,
    "GP_OBS_TABLE": 8192,
    "GP_MODE_HI": 0,
    "GP_MODE_HASH": 1,
}

#: the six radix digits of a 64-bit key, most significant first: (shift, width). Passes 0-2 cover
#: the score word, 3-5 the tie-break hash (where a hash-only selection starts).
PASSES: tuple[tuple[int, int], ...] = ((53, 11), (42, 11), (32, 10), (21, 11), (10, 11), (0, 10))

#: byte offsets of the fields of ``struct GpSelectCtl`` (two u64, eight u32, the histogram)
CTL_OFFSETS: dict[str, int] = {
    "prefix": 0, "thresh": 8, "bits": 16, "need": 20, "done": 24, "arrivals": 28, "tiles": 32,
    "tiles_done": 36, "total": 40, "hist": 48,
}

#: size of ``struct GpSelectCtl``
CTL_BYTES = CTL_OFFSETS["hist"] + 4 * CONSTANTS["GP_MAX_BINS"]
