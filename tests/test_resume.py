"""Crash-safe resume: a run stopped mid-epoch and restored from a checkpoint file continues exactly.

The training loop is a real one (digits, a small MLP, SGD with momentum, a DataLoader over
IndexedDataset whose workers prefetch). The interrupted run saves pruner, sampler, model and
optimizer state with ``save_checkpoint`` (``torch.save`` underneath), drops every object, builds new
ones, loads the file and carries on. Everything after the checkpoint must be bit-identical to a run
that was never interrupted: the remaining batches, later plans, LossStats tensors and weights.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import gpuprune as gp

POLICIES = ["ucb", "epsilon_greedy", "uniform", "infobatch"]
N = 360           # samples of digits used
EPOCHS = 5
BATCH = 24
BANK_TENSORS = ("mean", "var", "last_epoch", "selected", "nonfinite", "invalid_batches")


@functools.lru_cache(maxsize=1)
def digits() -> TensorDataset:
    sklearn = pytest.importorskip("sklearn.datasets")
    x, y = sklearn.load_digits(return_X_y=True)
    return TensorDataset(torch.tensor(x[:N], dtype=torch.float32) / 16, torch.tensor(y[:N]))


class CountingSampler(gp.PrunedSampler):
    """A PrunedSampler that counts the indices the DataLoader has drawn from it."""

    drawn = 0

    def __iter__(self):
        for i in super().__iter__():
            self.drawn += 1
            yield i


def build(policy: str, init_seed: int):
    ds = digits()
    pruner = gp.Pruner(len(ds), keep=0.5, policy=policy, num_epochs=EPOCHS, warmup_epochs=1,
                       seed=3)
    sampler = CountingSampler(pruner)
    g = torch.Generator().manual_seed(init_seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    return pruner, sampler, model, opt


def run(policy: str, *, workers: int, stop=None, ckpt=None, resume=False) -> dict:
    """Train; with ``stop=(epoch, steps)`` checkpoint after that many steps of that epoch and quit.

    Returns the batches trained (epoch, sample ids), each epoch's full plan, and the final state.
    """
    pruner, sampler, model, opt = build(policy, init_seed=99 if resume else 0)
    if resume:
        state = gp.load_checkpoint(ckpt)          # weights_only=True: all of it is plain state
        pruner.load_state_dict(state["pruner"])
        sampler.load_state_dict(state["sampler"])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    loader = DataLoader(gp.IndexedDataset(digits()), batch_size=BATCH, sampler=sampler,
                        num_workers=workers, **({"prefetch_factor": 2} if workers else {}))
    out = {"batches": [], "plans": {}, "drawn_at_stop": None, "trained_at_stop": None}
    for epoch in range(sampler.epoch, EPOCHS):
        sampler.set_epoch(epoch)
        plan = pruner.plan(epoch)
        out["plans"][epoch] = (plan.indices.clone(), None if plan.weights is None
                               else plan.weights.clone())
        trained = 0
        sampler.drawn = 0
        for step, (x, y, idx) in enumerate(loader):
            loss = pruner.observe(idx, F.cross_entropy(model(x), y, reduction="none"))
            opt.zero_grad()
            loss.backward()
            opt.step()
            trained += len(idx)
            out["batches"].append((epoch, idx.tolist()))
            if stop == (epoch, step + 1):
                gp.save_checkpoint({"pruner": pruner.state_dict(),
                                    "sampler": sampler.state_dict(consumed=trained),
                                    "model": model.state_dict(), "optimizer": opt.state_dict()},
                                   ckpt)
                out["drawn_at_stop"], out["trained_at_stop"] = sampler.drawn, trained
                return out                        # the "crash": every object is dropped
    out["bank"] = {name: getattr(pruner.stats, name).clone() for name in BANK_TENSORS}
    out["params"] = [p.detach().clone() for p in model.parameters()]
    return out


@functools.lru_cache(maxsize=None)
def uninterrupted(policy: str) -> dict:
    return run(policy, workers=0)


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("stop", [(0, 4), (2, 3)], ids=["warmup-epoch", "pruned-epoch"])
def test_resume_mid_epoch_is_bit_identical(policy, stop, tmp_path):
    ref = uninterrupted(policy)
    ckpt = tmp_path / "ckpt.pt"
    first = run(policy, workers=2, stop=stop, ckpt=ckpt)
    # the workers had fetched ahead: counting drawn indices would skip untrained samples
    assert first["drawn_at_stop"] > first["trained_at_stop"] == stop[1] * BATCH
    second = run(policy, workers=2, ckpt=ckpt, resume=True)

    assert first["batches"] + second["batches"] == ref["batches"]
    assert second["batches"][0][0] == stop[0]                 # resumed inside the stopped epoch
    for epoch, (idx, w) in second["plans"].items():
        ref_idx, ref_w = ref["plans"][epoch]
        assert torch.equal(idx, ref_idx), epoch
        assert (w is None) == (ref_w is None)
        if w is not None:
            assert torch.equal(w, ref_w)
    assert sorted(second["plans"]) == list(range(stop[0], EPOCHS))
    for name in BANK_TENSORS:
        assert torch.equal(second["bank"][name], ref["bank"][name]), name
    for a, b in zip(second["params"], ref["params"]):
        assert torch.equal(a, b)
    if policy == "infobatch":                                 # the rescaled loss was exercised
        assert any(w is not None and bool((w > 1).any()) for _, w in ref["plans"].values())


@pytest.mark.slow
def test_uninterrupted_runs_are_reproducible_and_policies_differ():
    """Guards the resume test against passing vacuously (e.g. every plan being the same)."""
    a = uninterrupted("ucb")
    b = run("ucb", workers=0)
    assert a["batches"] == b["batches"]
    other = uninterrupted("uniform")
    assert a["plans"][2][0].tolist() != other["plans"][2][0].tolist()
    assert a["plans"][2][0].tolist() != a["plans"][3][0].tolist()
