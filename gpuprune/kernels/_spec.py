"""What the Python side knows about ``csrc/gpuprune_kernels.cu``: names, signatures, constants.

A test parses the source and checks every entry here against it, so the two cannot drift apart.
"""

from __future__ import annotations

__all__ = ["SIGNATURES", "KERNEL_NAMES", "CONSTANTS", "PASSES", "CTL_BYTES"]

#: kernel name -> argument kinds: ``p`` pointer, ``q`` long long, ``Q`` unsigned long long, ``d`` double
SIGNATURES: dict[str, str] = {
    "gp_observe_small": "ppqqpppppdq",
    "gp_observe_sorted": "pppqqpppppdq",
    "gp_score": "pqp",
    "gp_select_init": "pQqqqQ",
    "gp_radix_pass": "pqqqqpqq",
    "gp_compact_count": "pqqqqpp",
    "gp_scan_counts": "pq",
    "gp_compact_write": "pqqqqppp",
    "gp_hash_index": "pqqqp",
}

KERNEL_NAMES: tuple[str, ...] = tuple(SIGNATURES)

#: the ``#define``s of the source that the launch code relies on
CONSTANTS: dict[str, int] = {
    "GP_SEL_THREADS": 256,
    "GP_MAX_BINS": 2048,
    "GP_TILE_ITEMS": 16,
    "GP_TILE": 4096,
    "GP_SCAN_THREADS": 1024,
    "GP_OBS_THREADS": 256,
    "GP_OBS_SMALL_MAX": 2048,
    "GP_OBS_SMALL_THREADS": 1024,
    "GP_MODE_HI": 0,
    "GP_MODE_HASH": 1,
}

#: the six radix digits of a 64-bit key, most significant first: (shift, width)
PASSES: tuple[tuple[int, int], ...] = ((53, 11), (42, 11), (32, 10), (21, 11), (10, 11), (0, 10))

#: size of ``struct GpSelectCtl``: two u64, four u32 and the 2048-bucket histogram
CTL_BYTES = 8 + 8 + 4 * 4 + 4 * CONSTANTS["GP_MAX_BINS"]
