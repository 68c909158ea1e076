"""Record the plans of every policy for fixed (seed, epoch, losses): the reference that
tests/test_plans_recorded.py holds later versions to.

Run from the repository root: ``python tests/data/record_plans.py`` rewrites
``tests/data/plans_v0_2.json``. The file on main was recorded from gpuprune 0.2.0 (commit 5989bfb)
before the 0.3 redesign; rerun it only when a change of plans is intended and said in the notes.
Intended changes since: the keyed sort-free shuffle (every plan's order; the sets unchanged), and
UCB's robust drift scale and float64 score (some UCB sets).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import gpuprune

N = 257
EPOCHS = 6
BATCH = 32

#: name -> (policy, Pruner keywords)
CASES = {
    "uniform": ("uniform", {}),
    "epsilon_greedy": ("epsilon_greedy", {}),
    "epsilon_greedy_0.3": (lambda: gpuprune.EpsilonGreedy(epsilon=0.3), {}),
    "ucb": ("ucb", {}),
    "ucb_var_nodrift": (lambda: gpuprune.UCB(c=2.0, uncertainty="var", drift=0.0), {}),
    "infobatch": ("infobatch", {"num_epochs": EPOCHS}),
    "infobatch_ema": (lambda: gpuprune.InfoBatch(ratio=0.7, delta=0.5), {"num_epochs": EPOCHS,
                                                                          "decay": 0.9}),
    "static_random": ("static", {}),
    "static_scores": (lambda: gpuprune.Static(torch.arange(N, dtype=torch.float32) % 17), {}),
    "full": ("full", {}),
    "ucb_warmup_final": ("ucb", {"num_epochs": EPOCHS, "warmup_epochs": 1, "final_full_epochs": 1}),
    "greedy_interval2": ("epsilon_greedy", {"selection_interval": 2, "warmup_epochs": 1}),
    "uniform_interval3": ("uniform", {"selection_interval": 3}),
}


def loss_of(ids: torch.Tensor, epoch: int) -> torch.Tensor:
    """A deterministic per-sample loss that changes with the epoch (float32)."""
    i = ids.double()
    return ((i * 0.37 + epoch * 1.3).sin().abs() * (1 + (ids % 7).double())
            / (1 + 0.2 * epoch)).float()


def run(case: str) -> list[list[int]]:
    policy, kwargs = CASES[case]
    policy = policy() if callable(policy) else policy
    pruner = gpuprune.Pruner(N, keep=0.4, policy=policy, seed=3, **kwargs)
    orders = []
    for epoch in range(EPOCHS):
        plan = pruner.plan(epoch)
        ids = plan.indices.long()
        orders.append(ids.tolist())
        for lo in range(0, ids.numel(), BATCH):
            b = ids[lo:lo + BATCH]
            pruner.observe(b, loss_of(b, epoch))
    return orders


def main() -> None:
    out = Path(__file__).with_name("plans_v0_2.json")
    data = {"N": N, "epochs": EPOCHS, "batch": BATCH, "keep": 0.4, "seed": 3,
            "version": gpuprune.__version__, "plans": {c: run(c) for c in CASES}}
    out.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
