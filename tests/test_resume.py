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


def test_uninterrupted_runs_are_reproducible_and_policies_differ():
    """Guards the resume test against passing vacuously (e.g. every plan being the same)."""
    a = uninterrupted("ucb")
    b = run("ucb", workers=0)
    assert a["batches"] == b["batches"]
    other = uninterrupted("uniform")
    assert a["plans"][2][0].tolist() != other["plans"][2][0].tolist()
    assert a["plans"][2][0].tolist() != a["plans"][3][0].tolist()


# ---------------------------------------------------------------- sampler state semantics
def fed_pruner(n: int = 50, policy: str = "uniform") -> gp.Pruner:
    p = gp.Pruner(n, keep=0.6, policy=policy, seed=5)
    return p


def test_sampler_state_skips_trained_samples_until_the_epoch_changes():
    p = fed_pruner()
    s = gp.PrunedSampler(p)
    s.set_epoch(1)
    full = list(s)
    assert len(full) == 30
    state = s.state_dict(consumed=12)
    assert state == {"epoch": 1, "consumed": 12, "num_replicas": 1, "drop_last": False}

    t = gp.PrunedSampler(p)
    t.load_state_dict(state)
    assert t.epoch == 1 and len(t) == 18
    t.set_epoch(1)                                   # same epoch: the offset stays
    assert list(t) == full[12:]
    # a second checkpoint during the resumed pass counts from the start of that pass
    assert t.state_dict(consumed=5)["consumed"] == 17
    t.set_epoch(2)                                   # next epoch: from the start
    assert len(t) == 30 and list(t) == p.plan(2).indices.tolist()
    assert t.state_dict(consumed=0)["consumed"] == 0


def test_sampler_state_at_epoch_end_and_len_of_loader():
    p = fed_pruner()
    s = gp.PrunedSampler(p)
    s.set_epoch(0)
    n = len(s)
    t = gp.PrunedSampler(p)
    t.load_state_dict(s.state_dict(consumed=n))
    assert len(t) == 0 and list(t) == []
    loader = DataLoader(gp.IndexedDataset(list(range(50))), batch_size=4, sampler=t)
    assert len(loader) == 0
    t.load_state_dict(s.state_dict(consumed=8))
    assert len(loader) == 6                          # ceil(22 / 4)


def test_sharded_samplers_resume_from_one_ranks_state():
    p = fed_pruner(n=41)                             # 25 planned: shards of 13, padded by wrap-around
    ranks = [gp.PrunedSampler(p, num_replicas=2, rank=r) for r in range(2)]
    for s in ranks:
        s.set_epoch(0)
    before = [list(s) for s in ranks]
    state = ranks[0].state_dict(consumed=6)          # every rank trained 6 samples
    resumed = [gp.PrunedSampler(p, num_replicas=2, rank=r) for r in range(2)]
    for s in resumed:
        s.load_state_dict(state)
    assert [list(s) for s in resumed] == [b[6:] for b in before]
    single = gp.PrunedSampler(p)
    with pytest.raises(ValueError, match="num_replicas=2, drop_last=False cannot resume"):
        single.load_state_dict(state)
    single.load_state_dict(ranks[0].state_dict(consumed=0))   # epoch boundary: any world size
    assert list(single) == p.plan(0).indices.tolist()


def test_sampler_state_errors_leave_it_unchanged():
    p = fed_pruner()
    s = gp.PrunedSampler(p)
    s.set_epoch(0)
    list(s)
    with pytest.raises(ValueError, match="consumed=31 is more than the 30 samples"):
        s.state_dict(consumed=31)
    with pytest.raises(ValueError, match="consumed must be >= 0"):
        s.state_dict(consumed=-1)
    with pytest.raises(TypeError, match="consumed must be an int"):
        s.state_dict(consumed=2.0)
    s.set_epoch(3)                                   # set_epoch plans: the next epoch is known
    assert s.state_dict(consumed=1) == {"epoch": 3, "consumed": 1, "num_replicas": 1,
                                        "drop_last": False}
    t = gp.PrunedSampler(p)
    t.load_state_dict({"epoch": 0, "consumed": 4, "num_replicas": 1, "drop_last": False})
    for bad, exc in [({"epoch": 0}, ValueError), ([0, 4], TypeError),
                     ({"epoch": -1, "consumed": 0, "num_replicas": 1, "drop_last": False}, ValueError),
                     ({"epoch": 0, "consumed": 1.5, "num_replicas": 1, "drop_last": False}, TypeError)]:
        with pytest.raises(exc):
            t.load_state_dict(bad)
        assert (t.epoch, len(t)) == (0, 26)
    # a position beyond the share is refused when it is loaded, as the DALI iterator refuses it
    with pytest.raises(ValueError, match=r"state_dict\['consumed'\]=99 is more than the 30 samples "
                                         r"this rank's share of epoch 0 holds"):
        t.load_state_dict({"epoch": 0, "consumed": 99, "num_replicas": 1, "drop_last": False})
    assert (t.epoch, len(t)) == (0, 26)
