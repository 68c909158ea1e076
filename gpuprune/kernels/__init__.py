"""CUDA kernels for the score update and exact-k selection, run through CuPy.

The kernels live in one NVRTC-clean source, ``csrc/gpuprune_kernels.cu`` (installed next to this
file). ``setup.py`` prebuilds it into ``gpuprune_kernels-<hash>.fatbin`` when nvcc is present;
otherwise, or when the fatbin does not load, NVRTC compiles the source at first use. The CPU test
suite runs the same source in a concurrency harness (``csrc/harness/``, ``tests/kernel_harness``). Kernels launch on torch's
current stream with torch-allocated buffers: ``observe`` never waits for the GPU.

Which backend runs (these kernels or torch) is decided in one place, :mod:`gpuprune.backend`
(``Pruner(..., backend="auto" | "cuda" | "torch")``). Both give the same state and the same
selections. CuPy is imported lazily, by :func:`get_ops`; ``import gpuprune`` works without it.
"""

from ._loader import (
    FATBIN_NAME,
    NVRTC_OPTIONS,
    SOURCE_NAME,
    CupyMissing,
    KernelsUnavailable,
    available,
    clear_cache,
    fatbin_name,
    find_fatbin,
    find_source,
    get_ops,
    load_module,
    module_candidates,
    unavailable_reason,
)
from ._spec import CONSTANTS, KERNEL_NAMES
from .ops import MAX_SAMPLES, KernelOps

__all__ = [
    "KernelOps", "KernelsUnavailable", "CupyMissing", "get_ops", "available", "unavailable_reason", "clear_cache",
    "find_source", "fatbin_name", "find_fatbin", "module_candidates", "load_module", "KERNEL_NAMES", "SOURCE_NAME",
    "FATBIN_NAME", "NVRTC_OPTIONS", "MAX_SAMPLES", "CONSTANTS",
]
