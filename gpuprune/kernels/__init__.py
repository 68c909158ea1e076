"""CUDA kernels for the score update and exact-k selection, run through CuPy.

The kernels live in one NVRTC-clean source, ``csrc/gpuprune_kernels.cu`` (installed next to this
file). ``setup.py`` prebuilds it into ``gpuprune_kernels.fatbin`` when nvcc is present; otherwise, or
when the fatbin does not load, NVRTC compiles the source at first use. Kernels launch on torch's
current stream with torch-allocated buffers: ``observe`` never waits for the GPU, and a plan reads
the device at most once per epoch.

Use them through the score backend: ``Pruner(..., backend="auto")`` (the default) takes the kernels
on a CUDA device where CuPy loads them and torch otherwise; ``backend="cuda"`` insists (and says why
it cannot), ``backend="torch"`` never uses them. Both backends select the same set for the same
inputs, seed and epoch, so plans are identical.

CuPy is imported lazily, by :func:`get_ops`; ``import gpuprune`` works without it.
"""

from ._loader import (
    BACKENDS,
    FATBIN_NAME,
    NVRTC_OPTIONS,
    SOURCE_NAME,
    KernelsUnavailable,
    available,
    clear_cache,
    find_fatbin,
    find_source,
    get_ops,
    load_module,
    module_candidates,
    resolve_backend,
    unavailable_reason,
)
from ._spec import KERNEL_NAMES
from .ops import MAX_SAMPLES, KernelOps

__all__ = [
    "KernelOps", "KernelsUnavailable", "get_ops", "available", "unavailable_reason", "clear_cache",
    "resolve_backend", "find_source", "find_fatbin", "module_candidates", "load_module", "BACKENDS",
    "KERNEL_NAMES", "SOURCE_NAME", "FATBIN_NAME", "NVRTC_OPTIONS", "MAX_SAMPLES",
]
