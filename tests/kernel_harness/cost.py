"""The cost model of a Pruner's plan() and observe(), counted on the CPU (tests and
``benchmarks/selection.py`` share it).

``kernels``: the CUDA kernels run by the concurrency harness (the launches a GPU would get);
``torch``: the torch backend's device path (``cpu_fast_paths=False``: the torch operations a GPU
runs). Counted as on a GPU: ``Pruner.observe``'s id range check, which a CPU run makes on the host
(two reductions and two host reads) and a GPU makes inside the kernel, is left out.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

import gpuprune as gp
from gpuprune import pruner as _pruner
from gpuprune.backend import KernelBackend, TorchBackend
from gpuprune.kernels.cost import (OpCount, count_ops, h100_estimate, observe_bytes, plan_barriers,
                                   plan_bytes)

__all__ = ["POLICIES", "BATCHES", "backend_for", "count_plan", "count_observe", "plan_row",
           "observe_row"]

POLICIES = ("uniform", "epsilon_greedy", "ucb", "infobatch", "static", "full")
BATCHES = (256, 4096, 65536)


def backend_for(which: str, ops=None, device: str = "cpu"):
    """``"kernels"`` (``ops``: the harness's KernelOps, or a GPU's) or ``"torch"`` (the device
    path: on the CPU without the numpy paths)."""
    return KernelBackend(ops) if which == "kernels" else TorchBackend(torch.device(device),
                                                                       cpu_fast_paths=False)


@contextmanager
def _as_on_a_gpu():
    """Pruner.observe without the CPU-only id range check (a GPU checks ids in the kernel)."""
    real = _pruner.check_batch
    _pruner.check_batch = lambda indices, losses, device, num_samples, **kw: real(
        indices, losses, device, num_samples, **kw) if device.type != "cpu" else None
    try:
        yield
    finally:
        _pruner.check_batch = real


def count_plan(policy: str, which: str, ops=None, n: int = 20000, keep: float = 0.5,
               device: str = "cpu") -> OpCount:
    """What ``plan(2)`` issues, after a plan, a full epoch of losses and another plan (so the
    previous plan, the statistics and the scratch all exist)."""
    p = gp.Pruner(n, keep=keep, policy=policy, seed=0, num_epochs=100, process_group=None,
                  backend="torch", device=device)
    p.backend = backend_for(which, ops, device)
    p.plan(0)
    g = torch.Generator().manual_seed(1)
    p.observe(torch.arange(n, device=device), torch.rand(n, generator=g).to(device))
    p.plan(1)
    return count_ops(lambda: p.plan(2), device, ops if which == "kernels" else None)


def count_observe(batch: int, which: str, ops=None, n: int = 100_000, device: str = "cpu"
                  ) -> OpCount:
    """What one ``observe()`` of ``batch`` distinct ids issues (after one as a warm-up)."""
    n = max(n, batch)
    p = gp.Pruner(n, keep=0.5, policy="ucb", seed=0, process_group=None, backend="torch",
                  device=device)
    p.backend = backend_for(which, ops, device)
    g = torch.Generator().manual_seed(2)
    ids = torch.randperm(n, generator=g)[:batch].int().to(device)
    x = torch.rand(batch, generator=g).to(device)
    with _as_on_a_gpu():
        p.observe(ids, x)
        return count_ops(lambda: p.observe(ids, x), device, ops if which == "kernels" else None)


def plan_row(c: OpCount, n: int) -> dict:
    """Device operations, host reads, bytes per sample and the H100 *estimates* (us) of a counted
    plan() at N = 1e6 and 1e8 (typical case: distinct scores)."""
    kernel_b = sum(plan_bytes(a) for name, _, _, a in c.launches if name == "gp_plan")
    barriers = sum(plan_barriers(a) for name, _, _, a in c.launches if name == "gp_plan")
    per_sample = c.torch_bytes / n + kernel_b
    return {"device_ops": c.device_ops, "torch_ops": len(c.torch_ops), "launches": len(c.launches),
            "host_reads": c.host_reads, "bytes_per_sample": per_sample, "sequence": c.sequence(),
            "h100_us_1e6": h100_estimate(c.device_ops, per_sample * 1e6, barriers),
            "h100_us_1e8": h100_estimate(c.device_ops, per_sample * 1e8, barriers)}


def observe_row(c: OpCount, batch: int) -> dict:
    """Device operations, host reads, bytes per batch element and the H100 *estimate* (us)."""
    kernel_b = sum(observe_bytes(batch) for name, *_ in c.launches if name.startswith("gp_observe"))
    per_elem = c.torch_bytes / batch + kernel_b
    return {"device_ops": c.device_ops, "torch_ops": len(c.torch_ops), "launches": len(c.launches),
            "host_reads": c.host_reads, "bytes_per_element": per_elem, "sequence": c.sequence(),
            "h100_us": h100_estimate(c.device_ops, per_elem * batch)}
