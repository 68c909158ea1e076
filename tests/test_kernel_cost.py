"""The launch budgets, counted on the CPU: plan() with the kernels issues at most 8 device operations
for every policy (one gp_plan launch and the read of the invalid-id counter; InfoBatch also reads its
size), observe() at most 2 (one kernel and the returned mean). Counted exactly, so that a change
which adds a launch or a torch operation fails here; and the counter itself is shown to count.
"""

from __future__ import annotations

import pytest
import torch

from gpuprune.kernels.cost import (BUDGET_OBSERVE, BUDGET_PLAN, count_ops, h100_estimate,
                                   observe_bytes, plan_bytes)

import kernel_harness as kh
from kernel_harness.cost import (BATCHES, POLICIES, count_observe, count_plan, observe_row,
                                 plan_row)

pytestmark = pytest.mark.skipif(kh.find_compiler() is None, reason="the harness needs g++")

READ = "aten._local_scalar_dense.default"      # a device value read on the host (a GPU sync)
#: plan()'s launch sequence on the kernels, per policy
PLAN_SEQUENCE = {policy: ["gp_plan", READ] for policy in POLICIES}
PLAN_SEQUENCE["infobatch"] = ["gp_plan", READ, READ]      # its size, then the invalid-id counter


@pytest.fixture(scope="module")
def ops():
    return kh.harness_ops(slots=4, keys_per_block=4096)


@pytest.mark.parametrize("policy", POLICIES)
def test_plan_launch_budget(ops, policy):
    c = count_plan(policy, "kernels", ops)
    assert c.sequence() == PLAN_SEQUENCE[policy]
    assert c.device_ops <= BUDGET_PLAN
    assert c.host_reads == (2 if policy == "infobatch" else 1)
    (name, grid, block, args), = c.launches
    assert (name, grid, block) == ("gp_plan", 4, 256)          # 20000 / 4096 -> 5, 4 resident
    row = plan_row(c, 20000)
    assert 30 < row["bytes_per_sample"] < 110                  # see docs/kernels.md's table
    assert row["h100_us_1e6"] < 60


@pytest.mark.parametrize("batch", [b for b in BATCHES if b <= 4096])
def test_observe_launch_budget(ops, batch):
    c = count_observe(batch, "kernels", ops)
    assert c.sequence() == ["gp_observe_small", "aten.mean.default"]
    assert c.device_ops <= BUDGET_OBSERVE and c.host_reads == 0


def test_observe_of_a_batch_over_4096_sorts_first(ops):
    """The documented exception: above 4096 ids (one block's shared memory) the ids are sorted
    by torch before the kernel."""
    c = count_observe(65536, "kernels", ops)
    assert c.sequence() == ["aten.sort.stable", "gp_observe_sorted", "aten.mean.default"]


def test_the_counter_counts_an_added_operation_and_launch(ops):
    """The check can fail: one more torch operation, or one more launch, in plan() is counted."""
    import gpuprune as gp
    from gpuprune.backend import KernelBackend
    p = gp.Pruner(5000, keep=0.3, policy="ucb", seed=0, backend="torch")
    p.backend = KernelBackend(ops)
    p.plan(0)
    base = count_ops(lambda: p.plan(1), "cpu", ops)
    real = KernelBackend.plan

    def heavier(self, stats, **kw):
        stats.mean.sum()                                          # one more torch operation
        self.ops.top_k(None, 5000, 10, 1)                         # one more launch
        return real(self, stats, **kw)

    KernelBackend.plan = heavier
    try:
        more = count_ops(lambda: p.plan(2), "cpu", ops)
    finally:
        KernelBackend.plan = real
    assert more.device_ops == base.device_ops + 2
    assert more.sequence()[:2] == ["aten.sum.default", "gp_plan"]
    # views, allocations and the host seed draws are not device work
    views = count_ops(lambda: (torch.empty(5), torch.zeros(4)[1:3].view(torch.int32)), "cpu")
    assert views.torch_ops == ["aten.zeros.default"]


def test_bytes_and_estimates_from_launch_shapes():
    args = dict(n=1_000_000, k=500_000, mode=2, flags=4 | 8 | 16, explore=0, nids=0,
                prev_size=500_000, prev=object(), p1=1.0)
    # UCB with drift, counted, shuffled, previous plan's ids: see plan_bytes' terms
    assert plan_bytes(args) == pytest.approx(16 + 8 + 16 + 4 + 8 + 0.25 + 8 + 16)
    assert plan_bytes(args, worst=True) > plan_bytes(args)
    assert observe_bytes(256) == 8 + 4 + 6 * 32 and observe_bytes(65536) > observe_bytes(256)
    assert h100_estimate(2, 3e6, 4) == pytest.approx(2 * 4.0 + 4 * 1.5 + 1.0)
    row = observe_row(count_ops(lambda: None, "cpu"), 256)
    assert row["device_ops"] == 0 and row["h100_us"] == 0
