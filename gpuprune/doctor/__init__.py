"""``gpuprune doctor``: what this machine will run, and a few-second proof that it runs it right.

``gpuprune doctor`` (also ``python -m gpuprune doctor``) prints, in this order:

1. **versions**: python, gpuprune, torch (and the CUDA it was built for), numpy, CuPy (its CUDA
   runtime and NVRTC), DALI and the CUDA driver; then the device (name, compute capability, memory).
2. **backend**: which backend ``backend="auto"`` picks on that device, and why. The reasons it tells
   apart: the device is the CPU, or torch sees no CUDA device; CuPy is not importable; NVRTC (the
   run-time compiler CuPy loads) is missing; the prebuilt fatbin holds neither machine code (SASS)
   the device runs nor PTX it can compile (an arch mismatch); the driver is older than the CUDA that
   wrote the fatbin's PTX. The fatbin's contents are read from the file itself
   (:func:`parse_fatbin`, no cuobjdump needed); on a GPU each build (fatbin, NVRTC) is also loaded
   for real and its error, if any, shown.
3. **self-test** on random data with ties, NaN, +-inf, +-0, denormals and duplicate ids: the observe
   update, exact-k top-k sets, the shuffle order, and whole plans of every built-in policy over
   several epochs, compared bit for bit between each implementation under test and each reference:
   what can differ on a user's machine against the torch reference (the torch backend without its
   numpy paths, on the CPU). On the CPU that is the torch backend's numpy paths (they depend on the
   installed numpy and torch); on a GPU the CUDA kernels (CuPy, NVRTC or the fatbin, the driver),
   also against the torch backend on the same GPU, and the torch backend on the GPU. Then, when DALI
   is installed, :class:`~gpuprune.dali.PrunedDALIIterator` on a tiny CPU pipeline. (The test suite
   holds the torch reference to an independent numpy oracle, ``tests/numpy_reference.py``.)

Exit status: 0 when everything it could test agrees; 1 with a one-line reason (the last line)
otherwise; 2 for a usage error. ``--json PATH`` writes every fact and check.

The comparison machinery is injectable (:func:`run_doctor`'s ``candidates`` and ``references``), so a
test can feed a wrong reference or a wrong backend and see the doctor fail. ``import gpuprune`` does
not import this module; this module imports CuPy and DALI only inside the functions that probe them.
"""

from .environment import (FATBIN_MAGIC, BackendDiagnosis, BuildVerdict, Environment, FatbinEntry,
                          collect_environment, describe_fatbin, diagnose_backend, parse_fatbin,
                          ptx_min_cuda, read_fatbin, sass_runs_on)
from .reference import BackendImplementation, Disagreement, Implementation, RunSpec
from .selftest import CheckResult, SelfTest, add_arguments, check_dali, main, run_doctor, run_from_args

__all__ = [
    "Environment", "collect_environment", "FatbinEntry", "FATBIN_MAGIC", "parse_fatbin",
    "read_fatbin", "ptx_min_cuda", "sass_runs_on", "describe_fatbin", "BuildVerdict",
    "BackendDiagnosis", "diagnose_backend", "Disagreement", "Implementation",
    "BackendImplementation", "RunSpec", "CheckResult", "SelfTest",
    "check_dali", "run_doctor", "add_arguments", "run_from_args", "main",
]
