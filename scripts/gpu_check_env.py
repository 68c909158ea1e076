"""Step 1 of scripts/gpu_check.sh: the machine, the versions, and which kernel build loads.

    python scripts/gpu_check_env.py --json env.json

Prints and records: ``nvidia-smi``'s view of the GPU (name, driver, memory, clocks), python, torch
and its CUDA, CuPy with its CUDA runtime and NVRTC, the driver's CUDA version, the device's compute
capability; the carried fatbin (``.gpu_check/fatbin/``, built by ``scripts/gpu_check.sh --prepare``)
and whether it was built from the kernel source of this tree. Its name holds the start of the
source's sha256 (``gpuprune.kernels.fatbin_name``) and the loader takes only the fatbin of the
source it finds: a *stale* one (built from another version of the source) is ignored, and NVRTC
compiles the source instead. Last, it loads each build on its own: the fatbin (when one is there)
and the source through NVRTC, with the time and the error of each. A fatbin that cannot load (a
driver older than the CUDA that built its PTX, an architecture it lacks) is reported as such, and
the check goes on with the NVRTC build: the step writes ``GPUPRUNE_KERNELS=source`` to
``--kernels-env`` for the later steps, and fails only when no build loads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

__all__ = ["CARRIED", "expected_fatbin_name", "fatbin_freshness", "main"]

#: where ``scripts/gpu_check.sh --prepare`` puts the fatbin that travels with the call
CARRIED = ROOT / ".gpu_check" / "fatbin"
SOURCE = ROOT / "csrc" / "gpuprune_kernels.cu"


def expected_fatbin_name(source: Path = SOURCE) -> str:
    """The name the loader looks for: :func:`gpuprune.kernels.fatbin_name` of ``source`` (the
    fixed ``gpuprune_kernels.fatbin`` for a loader without source-named fatbins)."""
    from gpuprune import kernels
    name = getattr(kernels, "fatbin_name", None)
    return name(source) if name is not None else "gpuprune_kernels.fatbin"


def fatbin_freshness(carried: Path = CARRIED, source: Path = SOURCE) -> tuple[str, str]:
    """(``"fresh"`` | ``"stale"`` | ``"missing"``, why) of the carried fatbin."""
    have = sorted(Path(carried).glob("*.fatbin"))
    if not have:
        return "missing", f"no fatbin in {carried}"
    want = expected_fatbin_name(source)
    if (Path(carried) / want).is_file():
        return "fresh", f"{want} was built from this tree's {Path(source).name}"
    return "stale", (f"{', '.join(p.name for p in have)} was built from another version of "
                     f"{Path(source).name} (this one needs {want}): the loader ignores it")


def _nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not on the PATH"}
    fields = ["name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.mem",
              "temperature.gpu", "power.draw", "pstate"]
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": str(e)}
    first = out.strip().splitlines()[0] if out.strip() else ""
    return dict(zip(fields, (v.strip() for v in first.split(","))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kernels-env", type=Path, default=None,
                    help="write GPUPRUNE_KERNELS=source here when the fatbin does not load")
    args = ap.parse_args(argv)

    import torch

    from gpuprune import doctor, kernels
    from gpuprune.doctor.environment import _cuda_version
    res: dict = {"nvidia_smi": _nvidia_smi()}
    freshness, why = fatbin_freshness()
    res["fatbin_freshness"], res["fatbin_freshness_why"] = freshness, why
    cuda = torch.cuda.is_available()
    dev = torch.device(args.device if cuda else "cpu")
    if cuda and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    env = doctor.collect_environment(dev)
    res["environment"] = asdict(env)
    installed = kernels.find_fatbin()
    res["fatbin_installed"] = str(installed) if installed else None
    if installed is not None:
        try:
            res["fatbin"] = doctor.describe_fatbin(doctor.read_fatbin(installed))
        except (OSError, ValueError) as e:
            res["fatbin"] = f"unreadable: {e}"
    builds: dict = {}
    if cuda:
        try:
            import cupy
        except Exception as e:  # noqa: BLE001
            cupy, builds["error"] = None, f"CuPy is not importable: {type(e).__name__}: {e}"
        for kind in ("fatbin", "source"):
            cands = kernels.module_candidates(prefer=kind) if cupy is not None else []
            if not cands:
                builds[kind] = {"tried": False, "why": f"no {kind} here"}
                continue
            t0 = time.perf_counter()
            try:
                kernels.load_module(cupy, dev.index, cands)
                builds[kind] = {"tried": True, "ok": True, "path": str(cands[0][1]),
                                "load_s": time.perf_counter() - t0}
            except kernels.KernelsUnavailable as e:
                builds[kind] = {"tried": True, "ok": False, "path": str(cands[0][1]),
                                "error": str(e), "load_s": time.perf_counter() - t0}
        fb = builds.get("fatbin", {})
        if fb.get("tried") and not fb.get("ok") and args.kernels_env is not None:
            args.kernels_env.write_text("source\n")     # the later steps use the NVRTC build
        t0 = time.perf_counter()
        try:
            ops = kernels.get_ops(dev)
            res["kernels_loaded"] = {"build": ops.runtime.kind, "path": str(ops.runtime.path),
                                     "load_s": time.perf_counter() - t0}
        except kernels.KernelsUnavailable as e:
            res["kernels_loaded"] = {"error": str(e), "load_s": time.perf_counter() - t0}
    res["builds"] = builds
    smi = res["nvidia_smi"]
    print(f"GPU: {smi.get('name', env.gpu_name)} | driver {smi.get('driver_version', '?')} (CUDA "
          f"{_cuda_version(env.driver)}) | {smi.get('memory.total', '?')} | SM clock "
          f"{smi.get('clocks.sm', '?')} of {smi.get('clocks.max.sm', '?')} | {smi.get('pstate', '')}")
    print(f"python {env.python} | torch {env.torch} (CUDA {env.torch_cuda}) | CuPy {env.cupy or 'missing'}"
          f" (runtime {_cuda_version(env.cuda_runtime)}, NVRTC {env.nvrtc or 'missing'}) | "
          f"capability {env.capability} | {env.sm_count} SMs")
    print(f"carried fatbin: {freshness}: {why}")
    print(f"fatbin the loader takes: {installed or 'none'}" + (f": {res['fatbin']}" if installed else ""))
    for kind in ("fatbin", "source"):
        b = builds.get(kind)
        if b is None:
            continue
        label = "fatbin" if kind == "fatbin" else "NVRTC (source)"
        if not b["tried"]:
            print(f"{label}: not tried ({b['why']})")
        elif b["ok"]:
            print(f"{label}: loads ({b['path']}, {b['load_s']:.1f} s)")
        else:
            print(f"{label}: CANNOT LOAD ({b['error'][:300]})"
                  + ("; the check goes on with the NVRTC build" if kind == "fatbin" else ""))
    kl = res.get("kernels_loaded")
    if kl:
        print("kernels (backend='auto'): " + (f"{kl['build']} build from {kl['path']} in "
                                              f"{kl['load_s']:.1f} s" if "build" in kl
                                              else f"FAILED to load: {kl['error']}"))
    ok = cuda and kl is not None and "build" in kl
    res["ok"] = bool(ok)
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
