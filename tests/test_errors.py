"""Every public entry point rejects bad input with a clear error and leaves its state unchanged.

One table drives the test and docs/errors.md: each case names the entry point, the bad input, the
exception type and a fragment of its message. The test snapshots the object's whole state (every
tensor, counter and flag), makes the bad call, checks the error, and checks the state is unchanged.
``PYTHONPATH=. python tests/test_errors.py`` prints the table for docs/errors.md, and a test keeps the two equal.
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch.utils.data import IterableDataset

import gpuprune as gp
from gpuprune.policies import EpsilonGreedy, InfoBatch, Policy, Selection, Static, UCB

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
N = 20


@dataclass
class Case:
    entry: str                       # the public entry point, as written in docs/errors.md
    bad: str                         # the bad input, in words
    call: Callable[[Any], Any]       # makes the bad call on the subject
    exc: type | tuple
    message: str                     # a fragment of the error message (plain text)
    subject: Callable[[], Any] = lambda: None   # builds the object whose state must not change

    @property
    def exc_name(self) -> str:
        excs = self.exc if isinstance(self.exc, tuple) else (self.exc,)
        return " / ".join(e.__name__ for e in excs)

    def doc_row(self) -> str:
        return f"| `{self.entry}` | {self.bad} | `{self.exc_name}`: `{self.message}` |"


# ---------------------------------------------------------------- subjects
def trained_pruner(policy: str = "infobatch") -> gp.Pruner:
    """A Pruner mid-run: a planned epoch, some losses observed, a loss-weight table."""
    p = gp.Pruner(N, keep=0.5, policy=policy, num_epochs=6, seed=1)
    for epoch in range(2):
        plan = p.plan(epoch)
        p.observe(plan.indices, torch.linspace(0.1, 2.0, len(plan)))
    p.plan(2)
    return p


def bank() -> gp.ScoreBank:
    b = gp.ScoreBank(N, deferred=False)
    b.observe(torch.tensor([1, 2, 2, 7]), torch.tensor([1.0, 2.0, 3.0, float("nan")]))
    return b


def deferred_bank() -> gp.ScoreBank:
    b = gp.ScoreBank(N, deferred=True)
    b.observe(torch.tensor([1, 2, 2]), torch.tensor([1.0, 2.0, 3.0]))
    return b


def sampler() -> gp.PrunedSampler:
    s = trained_pruner("uniform").sampler()
    s.set_epoch(2)
    return s


def resumed_sampler() -> gp.PrunedSampler:
    s = sampler()
    s.load_state_dict(s.state_dict(consumed=4))
    return s


def sampler_at(epoch: int) -> gp.PrunedSampler:
    s = sampler()
    s.set_epoch(epoch)
    return s


def overrun_sampler() -> gp.PrunedSampler:
    """A state claiming more trained samples than the plan has (checked when the plan is known)."""
    s = sampler()
    s.load_state_dict({"epoch": 2, "consumed": 50, "num_replicas": 1, "drop_last": False})
    return s


def tracker() -> gp.ForgettingTracker:
    t = gp.ForgettingTracker(N)
    t.update(torch.tensor([0, 1, 2]), torch.tensor([True, False, True]))
    return t


class Logits(torch.nn.Module):
    """A two-class 'model' whose logits are its inputs (with one parameter, so state exists)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


def model() -> Logits:
    return Logits().train()


def checkpoint_dir(tmp: Path) -> Path:
    gp.save_checkpoint({"pruner": trained_pruner().state_dict(), "step": 7}, tmp / "ckpt.pt")
    (tmp / "truncated.pt").write_bytes((tmp / "ckpt.pt").read_bytes()[:200])
    (tmp / "garbage.pt").write_bytes(b"not a checkpoint" * 8)
    gp.save_checkpoint({"obj": Opaque()}, tmp / "opaque.pt")
    return tmp


class Opaque:
    """Not a tensor or a plain container."""


class WrongCount(Policy):
    name = "wrong_count"

    def select(self, bank, k, generator):
        return Selection(torch.arange(3))


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(3))

    def __len__(self):
        return 3


def state_with(**changes) -> dict:
    """A valid Pruner state dict, with some entries replaced.

    It comes from a pruner trained further than the subjects, so a half-applied load would show.
    """
    other = trained_pruner()
    other.observe(torch.arange(N), torch.full((N,), 5.0))
    other.plan(3)
    s = other.state_dict()
    for path, value in changes.items():
        d = s
        keys = path.split("__")
        for key in keys[:-1]:
            d = d[key]
        if value is KeyError:
            del d[keys[-1]]
        else:
            d[keys[-1]] = value
    return s


def bank_state_with(**changes) -> dict:
    s = bank().state_dict()
    s.update(changes)
    return s


IDX = torch.tensor([0, 1, 2])
LOSS = torch.tensor([1.0, 2.0, 3.0])
P = "Pruner(...)"
SB = "ScoreBank(...)"

# ---------------------------------------------------------------- the table
CASES: list[Case] = [
    # Pruner construction
    Case(P, "`num_samples=0`", lambda _: gp.Pruner(0), ValueError, "num_samples must be >= 1, got num_samples=0"),
    Case(P, "`num_samples=2.5` (not an int)", lambda _: gp.Pruner(2.5), TypeError, "num_samples must be an int, got float 2.5"),
    Case(P, "`num_samples=2**32 + 1` (ids must fit the uint32 tie-break hash)", lambda _: gp.Pruner(2**32 + 1), ValueError, "num_samples must be <= 4294967296"),
    Case(P, "`keep=0`", lambda _: gp.Pruner(N, keep=0), ValueError, "keep must be > 0.0, got keep=0.0"),
    Case(P, "`keep=1.5`", lambda _: gp.Pruner(N, keep=1.5), ValueError, "keep must be <= 1.0, got keep=1.5"),
    Case(P, "`keep=nan`", lambda _: gp.Pruner(N, keep=float("nan")), ValueError, "keep must be finite, got keep=nan"),
    Case(P, "`keep=\"half\"`", lambda _: gp.Pruner(N, keep="half"), TypeError, "keep must be a real number, got str 'half'"),
    Case(P, "`keep=True` (a bool)", lambda _: gp.Pruner(N, keep=True), TypeError, "keep must be a real number, got bool True"),
    Case(P, "both `keep` and `prune_ratio`", lambda _: gp.Pruner(N, keep=0.5, prune_ratio=0.5), ValueError, "give keep or prune_ratio, not both"),
    Case(P, "`prune_ratio=1.0`", lambda _: gp.Pruner(N, prune_ratio=1.0), ValueError, "prune_ratio must be < 1.0, got prune_ratio=1.0"),
    Case(P, "`policy=\"greedy\"` (unknown)", lambda _: gp.Pruner(N, policy="greedy"), ValueError, "policy must be one of ['epsilon_greedy', 'full', 'infobatch', 'static', 'ucb', 'uniform'], got policy='greedy'"),
    Case(P, "`policy=3`", lambda _: gp.Pruner(N, policy=3), TypeError, "policy must be a name or a Policy, got int"),
    Case(P, "`num_epochs=0`", lambda _: gp.Pruner(N, num_epochs=0), ValueError, "num_epochs must be >= 1, got num_epochs=0"),
    Case(P, "`warmup_epochs=-1`", lambda _: gp.Pruner(N, warmup_epochs=-1), ValueError, "warmup_epochs must be >= 0, got warmup_epochs=-1"),
    Case(P, "`final_full_epochs=5` with `num_epochs=3`", lambda _: gp.Pruner(N, num_epochs=3, final_full_epochs=5), ValueError, "final_full_epochs must be <= 3, got final_full_epochs=5"),
    Case(P, "`final_full_epochs=2` without `num_epochs`", lambda _: gp.Pruner(N, final_full_epochs=2), ValueError, "final_full_epochs=2 needs num_epochs"),
    Case(P, "`policy=\"infobatch\"` without `num_epochs`", lambda _: gp.Pruner(N, policy="infobatch"), ValueError, "policy='infobatch' needs num_epochs"),
    Case(P, "`selection_interval=0`", lambda _: gp.Pruner(N, selection_interval=0), ValueError, "selection_interval must be >= 1, got selection_interval=0"),
    Case(P, "`decay=1.0`", lambda _: gp.Pruner(N, decay=1.0), ValueError, "decay must be < 1.0, got decay=1.0"),
    Case(P, "`epsilon=1.5`", lambda _: gp.Pruner(N, policy="epsilon_greedy", epsilon=1.5), ValueError, "epsilon must be <= 1.0, got epsilon=1.5"),
    Case(P, "`c=-1`", lambda _: gp.Pruner(N, c=-1), ValueError, "c must be >= 0.0, got c=-1.0"),
    Case(P, "`uncertainty=\"mad\"`", lambda _: gp.Pruner(N, uncertainty="mad"), ValueError, "uncertainty must be one of ['std', 'var'], got uncertainty='mad'"),
    Case(P, "`uncertainty=[\"std\"]` (not a str)", lambda _: gp.Pruner(N, uncertainty=["std"]), TypeError, "uncertainty must be a str, one of ['std', 'var'], got list"),
    Case(P, "`delta=2.0` (InfoBatch)", lambda _: gp.Pruner(N, policy="infobatch", num_epochs=4, delta=2.0), ValueError, "delta must be <= 1.0, got delta=2.0"),
    Case(P, "`static_scores` of the wrong length", lambda _: gp.Pruner(N, policy="static", static_scores=torch.rand(N - 1)), ValueError, "static_scores must have one score per sample: got 19 scores for num_samples=20"),
    Case(P, "`static_scores` with another policy", lambda _: gp.Pruner(N, policy="ucb", static_scores=torch.rand(N)), ValueError, "static_scores is only used by policy='static', got policy='ucb'"),
    Case(P, "`static_scores` of integers", lambda _: gp.Pruner(N, policy="static", static_scores=torch.arange(N)), TypeError, "scores must be a floating torch.Tensor, got Tensor torch.int64"),
    Case(P, "`policy=Static(scores)` with the wrong length", lambda _: gp.Pruner(N, policy=Static(torch.rand(3))), ValueError, "static_scores must have one score per sample: got 3 scores"),
    Case(P, "`seed=1.5`", lambda _: gp.Pruner(N, seed=1.5), TypeError, "seed must be an int, got float 1.5"),
    Case(P, "`device=\"meta\"`", lambda _: gp.Pruner(N, device="meta"), ValueError, "device must hold data (cpu or cuda), got device='meta'"),
    Case(P, "`device=\"cuda:99\"` (absent)", lambda _: gp.Pruner(N, device="cuda:99"), ValueError, "device='cuda:99'"),
    Case(P, "`device=\"gpu\"` (not a device)", lambda _: gp.Pruner(N, device="gpu"), ValueError, "device must be a torch device or string, got device='gpu'"),
    Case("budget", "`keep=0`", lambda _: gp.budget(0, 10), ValueError, "keep must be > 0.0"),
    Case("budget", "`num_samples=0`", lambda _: gp.budget(0.5, 0), ValueError, "num_samples must be >= 1"),
    # Pruner methods
    Case("Pruner.plan", "`epoch=-1`", lambda p: p.plan(-1), ValueError, "epoch must be >= 0, got epoch=-1", trained_pruner),
    Case("Pruner.plan", "`epoch=\"3\"`", lambda p: p.plan("3"), TypeError, "epoch must be an int, got str '3'", trained_pruner),
    Case("Pruner.plan", "an epoch before the current plan's", lambda p: p.plan(1), ValueError, "epoch must not go back: plan(1) after plan(2)", trained_pruner),
    Case("Pruner.plan", "a custom policy returning the wrong count", lambda p: p.plan(1), ValueError, "returned 3 indices, expected k=10", lambda: gp.Pruner(N, keep=0.5, policy=WrongCount())),
    Case("Pruner.observe", "`indices` a list", lambda p: p.observe([0, 1, 2], LOSS), TypeError, "indices must be a torch.Tensor, got list", trained_pruner),
    Case("Pruner.observe", "float `indices`", lambda p: p.observe(IDX.float(), LOSS), TypeError, "indices must have an integer dtype, got indices.dtype=torch.float32", trained_pruner),
    Case("Pruner.observe", "bool `indices`", lambda p: p.observe(IDX > 0, LOSS), TypeError, "indices must have an integer dtype, got indices.dtype=torch.bool", trained_pruner),
    Case("Pruner.observe", "2-D `indices`", lambda p: p.observe(IDX[None], LOSS), ValueError, "indices must be 1-D, got indices.shape=(1, 3)", trained_pruner),
    Case("Pruner.observe", "a reduced (0-d) loss", lambda p: p.observe(IDX, LOSS.mean()), ValueError, "per_sample_loss must be 1-D, one value per sample, got per_sample_loss.shape=() (use reduction='none'", trained_pruner),
    Case("Pruner.observe", "a 2-D loss", lambda p: p.observe(IDX, LOSS[None]), ValueError, "per_sample_loss must be 1-D, one value per sample, got per_sample_loss.shape=(1, 3)", trained_pruner),
    Case("Pruner.observe", "integer losses", lambda p: p.observe(IDX, IDX), TypeError, "per_sample_loss must have a floating dtype, got per_sample_loss.dtype=torch.int64", trained_pruner),
    Case("Pruner.observe", "lengths differ", lambda p: p.observe(IDX, LOSS[:2]), ValueError, "indices and per_sample_loss must have the same length, got 3 and 2", trained_pruner),
    Case("Pruner.observe", "an id >= N", lambda p: p.observe(torch.tensor([0, 20]), LOSS[:2]), ValueError, "indices must lie in [0, 20), got an index 20", trained_pruner),
    Case("Pruner.observe", "a negative id", lambda p: p.observe(torch.tensor([-1, 3]), LOSS[:2]), ValueError, "indices must lie in [0, 20), got an index -1", trained_pruner),
    Case("Pruner.observe", "losses on another device", lambda p: p.observe(IDX, LOSS.to("meta")), ValueError, "per_sample_loss must be on cpu, got per_sample_loss.device=meta", trained_pruner),
    Case("Pruner.is_full_epoch", "`epoch=-1`", lambda p: p.is_full_epoch(-1), ValueError, "epoch must be >= 0", trained_pruner),
    Case("Pruner.selection_stats", "`always=2`", lambda p: p.selection_stats(always=2), ValueError, "always must be <= 1.0, got always=2.0", trained_pruner),
    Case("Pruner.load_state_dict", "not a dict", lambda p: p.load_state_dict([1, 2]), TypeError, "state must be a dict from Pruner.state_dict(), got list", trained_pruner),
    Case("Pruner.load_state_dict", "entries missing", lambda p: p.load_state_dict(state_with(rounds=KeyError)), ValueError, "state_dict is missing ['rounds']", trained_pruner),
    Case("Pruner.load_state_dict", "another configuration (k)", lambda p: p.load_state_dict(state_with(config__k=7)), ValueError, "checkpoint was made with k=7, this Pruner has k=10", trained_pruner),
    Case("Pruner.load_state_dict", "a bank tensor of the wrong dtype", lambda p: p.load_state_dict(state_with(bank__count=torch.zeros(N))), ValueError, "state_dict['count'] must be a (20,) torch.int32 tensor, got (20,) torch.float32", trained_pruner),
    Case("Pruner.load_state_dict", "a selection holding an id >= N", lambda p: p.load_state_dict(state_with(selection=torch.tensor([3, 25]))), ValueError, "state_dict['selection'] holds ids outside [0, 20)", trained_pruner),
    Case("Pruner.load_state_dict", "plan ids that are not 1-D int64", lambda p: p.load_state_dict(state_with(plan__indices=torch.zeros(2, 2, dtype=torch.long))), ValueError, "state_dict['plan']['indices'] must be a 1-D int64 tensor, got (2, 2) torch.int64", trained_pruner),
    Case("Pruner.load_state_dict", "plan weights not matching the ids", lambda p: p.load_state_dict(state_with(plan__weights=torch.ones(2))), ValueError, "state_dict['plan']['weights'] must be None or a float tensor shaped like its ids", trained_pruner),
    Case("Pruner.load_state_dict", "`rounds=-1`", lambda p: p.load_state_dict(state_with(rounds=-1)), ValueError, "state_dict['rounds'] must be >= 0", trained_pruner),
    # ScoreBank
    Case(SB, "`num_samples=0`", lambda _: gp.ScoreBank(0), ValueError, "num_samples must be >= 1, got num_samples=0"),
    Case(SB, "`decay=-0.1`", lambda _: gp.ScoreBank(N, decay=-0.1), ValueError, "decay must be >= 0.0, got decay=-0.1"),
    Case(SB, "`decay=nan`", lambda _: gp.ScoreBank(N, decay=float("nan")), ValueError, "decay must be finite, got decay=nan"),
    Case(SB, "`deferred=\"no\"` (truthy string)", lambda _: gp.ScoreBank(N, deferred="no"), TypeError, "deferred must be a bool, got str 'no'"),
    Case(SB, "`device=\"meta\"`", lambda _: gp.ScoreBank(N, device="meta"), ValueError, "device must hold data (cpu or cuda)"),
    Case("ScoreBank.observe", "an id >= N", lambda b: b.observe(torch.tensor([20]), LOSS[:1]), ValueError, "indices must lie in [0, 20), got an index 20", bank),
    Case("ScoreBank.observe", "a reduced (0-d) loss", lambda b: b.observe(IDX, LOSS.sum()), ValueError, "losses must be 1-D, one value per sample", bank),
    Case("ScoreBank.observe", "lengths differ", lambda b: b.observe(IDX, LOSS[:1]), ValueError, "indices and losses must have the same length, got 3 and 1", bank),
    Case("ScoreBank.observe", "integer losses", lambda b: b.observe(IDX, IDX), TypeError, "losses must have a floating dtype", bank),
    Case("ScoreBank.observe", "`indices` on another device", lambda b: b.observe(IDX.to("meta"), LOSS), ValueError, "indices must be on cpu, got indices.device=meta", bank),
    Case("ScoreBank.commit", "`reduce=3` (not callable)", lambda b: b.commit(reduce=3), TypeError, "reduce must be callable or None, got int 3", deferred_bank),
    Case("ScoreBank.selection_frequency", "`rounds=-1`", lambda b: b.selection_frequency(-1), ValueError, "rounds must be >= 0, got rounds=-1", bank),
    Case("ScoreBank.load_state_dict", "not a dict", lambda b: b.load_state_dict(None), TypeError, "state must be a dict from ScoreBank.state_dict(), got NoneType", bank),
    Case("ScoreBank.load_state_dict", "another `num_samples`", lambda b: b.load_state_dict(gp.ScoreBank(5).state_dict()), ValueError, "state_dict is for num_samples=5, this bank has num_samples=20", bank),
    Case("ScoreBank.load_state_dict", "a tensor of the wrong dtype", lambda b: b.load_state_dict(bank_state_with(mean=torch.zeros(N, dtype=torch.float64))), ValueError, "state_dict['mean'] must be a (20,) torch.float32 tensor, got (20,) torch.float64", bank),
    Case("ScoreBank.load_state_dict", "`decay=1.5`", lambda b: b.load_state_dict(bank_state_with(decay=1.5)), ValueError, "state_dict['decay'] must be < 1.0, got state_dict['decay']=1.5", bank),
    Case("ScoreBank.load_state_dict", "`pending` of the wrong shape", lambda b: b.load_state_dict(bank_state_with(pending=torch.zeros(3, 4))), ValueError, "state_dict['pending'] must be None or a (3, 20) tensor", bank),
    # sampler and dataset
    Case("PrunedSampler", "`pruner=None`", lambda _: gp.PrunedSampler(None), TypeError, "pruner must be a gpuprune.Pruner, got NoneType"),
    Case("PrunedSampler", "`num_replicas=0`", lambda _: gp.PrunedSampler(trained_pruner(), num_replicas=0), ValueError, "num_replicas must be >= 1, got num_replicas=0"),
    Case("PrunedSampler", "`rank=2` of 2", lambda _: gp.PrunedSampler(trained_pruner(), num_replicas=2, rank=2), ValueError, "rank must be <= 1, got rank=2"),
    Case("PrunedSampler", "`drop_last=\"yes\"`", lambda _: gp.PrunedSampler(trained_pruner(), drop_last="yes"), TypeError, "drop_last must be a bool, got str 'yes'"),
    Case("PrunedSampler.set_epoch", "`epoch=-1`", lambda s: s.set_epoch(-1), ValueError, "epoch must be >= 0, got epoch=-1", resumed_sampler),
    Case("PrunedSampler.state_dict", "`consumed` beyond this pass", lambda s: s.state_dict(consumed=7), ValueError, "consumed=7 is more than the 6 samples this pass of epoch 2 yields", resumed_sampler),
    Case("PrunedSampler.state_dict", "`consumed=-1`", lambda s: s.state_dict(consumed=-1), ValueError, "consumed must be >= 0, got consumed=-1", resumed_sampler),
    Case("PrunedSampler.state_dict", "`consumed=2.0`", lambda s: s.state_dict(consumed=2.0), TypeError, "consumed must be an int, got float 2.0", resumed_sampler),
    Case("PrunedSampler.state_dict", "`consumed > 0` before the epoch is planned", lambda s: s.state_dict(consumed=1), ValueError, "consumed=1, but epoch 5 has not been planned yet", lambda: sampler_at(5)),
    Case("PrunedSampler.load_state_dict", "not a dict", lambda s: s.load_state_dict([2, 4]), TypeError, "state must be a dict from PrunedSampler.state_dict(), got list", resumed_sampler),
    Case("PrunedSampler.load_state_dict", "entries missing", lambda s: s.load_state_dict({"epoch": 1}), ValueError, "state_dict is missing ['consumed', 'num_replicas', 'drop_last']", resumed_sampler),
    Case("PrunedSampler.load_state_dict", "`epoch=-1`", lambda s: s.load_state_dict({"epoch": -1, "consumed": 0, "num_replicas": 1, "drop_last": False}), ValueError, "state_dict['epoch'] must be >= 0", resumed_sampler),
    Case("PrunedSampler.load_state_dict", "a mid-epoch state from another world size", lambda s: s.load_state_dict({"epoch": 2, "consumed": 3, "num_replicas": 4, "drop_last": False}), ValueError, "a mid-epoch state saved with num_replicas=4, drop_last=False cannot resume with num_replicas=1", resumed_sampler),
    Case("PrunedSampler.__iter__ / __len__", "a loaded `consumed` beyond the epoch's plan", lambda s: len(s), ValueError, "the sampler state says 50 samples of epoch 2 were trained, but this rank's plan has only 10", overrun_sampler),
    Case("IndexedDataset", "not a dataset (`5`)", lambda _: gp.IndexedDataset(5), TypeError, "dataset must be a map-style dataset with __getitem__ and __len__, got int"),
    Case("IndexedDataset", "an IterableDataset", lambda _: gp.IndexedDataset(Stream()), TypeError, "dataset must be a map-style dataset with __getitem__ and __len__, got Stream"),
    # policies
    Case("Static", "`scores` a list", lambda _: Static([1.0, 2.0]), TypeError, "scores must be a floating torch.Tensor, got list"),
    Case("Static", "integer `scores`", lambda _: Static(torch.arange(3)), TypeError, "scores must be a floating torch.Tensor, got Tensor torch.int64"),
    Case("Static", "2-D `scores`", lambda _: Static(torch.rand(2, 2)), ValueError, "scores must be 1-D, got scores.shape=(2, 2)"),
    Case("EpsilonGreedy", "`epsilon=2`", lambda _: EpsilonGreedy(2), ValueError, "epsilon must be <= 1.0, got epsilon=2.0"),
    Case("EpsilonGreedy", "`epsilon=None`", lambda _: EpsilonGreedy(None), TypeError, "epsilon must be a real number, got NoneType None"),
    Case("UCB", "`c=nan`", lambda _: UCB(c=float("nan")), ValueError, "c must be finite, got c=nan"),
    Case("UCB", "`uncertainty=None`", lambda _: UCB(uncertainty=None), TypeError, "uncertainty must be a str, one of ['std', 'var'], got NoneType None"),
    Case("UCB", "`drift=-0.5`", lambda _: UCB(drift=-0.5), ValueError, "drift must be >= 0.0, got drift=-0.5"),
    Case(P, "`drift=float(\"inf\")`", lambda _: gp.Pruner(N, drift=float("inf")), ValueError, "drift must be finite, got drift=inf"),
    Case("InfoBatch", "`ratio=1.0`", lambda _: InfoBatch(ratio=1.0), ValueError, "ratio must be < 1.0, got ratio=1.0"),
    Case("InfoBatch", "`delta=-1`", lambda _: InfoBatch(delta=-1), ValueError, "delta must be >= 0.0, got delta=-1.0"),
    # sharding
    Case("shard_indices", "`indices` a list", lambda _: gp.shard_indices([1, 2], 0, 1), TypeError, "indices must be a torch.Tensor, got list"),
    Case("shard_indices", "2-D `indices`", lambda _: gp.shard_indices(torch.ones(2, 2), 0, 1), ValueError, "indices must be 1-D, got indices.shape=(2, 2)"),
    Case("shard_indices", "`rank=3` of 2", lambda _: gp.shard_indices(torch.arange(4), 3, 2), ValueError, "rank must be <= 1, got rank=3"),
    Case("shard_indices", "`world_size=0`", lambda _: gp.shard_indices(torch.arange(4), 0, 0), ValueError, "world_size must be >= 1, got world_size=0"),
    Case("Plan.batches", "`batch_size=0`", lambda p: p.plan(2).batches(0), ValueError, "batch_size must be >= 1, got batch_size=0", trained_pruner),
    # static scores
    Case("el2n_scores", "`model` a function", lambda _: gp.el2n_scores(lambda x: x, [], 2), TypeError, "model must be a torch.nn.Module, got function"),
    Case("el2n_scores", "`loader=None`", lambda m: gp.el2n_scores(m, None, 2), TypeError, "loader must be iterable, got NoneType", model),
    Case("el2n_scores", "`num_samples=0`", lambda m: gp.el2n_scores(m, [], 0), ValueError, "num_samples must be >= 1, got num_samples=0", model),
    Case("el2n_scores", "batches without indices", lambda m: gp.el2n_scores(m, [(torch.zeros(2, 2), torch.tensor([0, 1]))], 2), ValueError, "loader must yield (inputs, labels, indices) batches, got 2 items", model),
    Case("el2n_scores", "an id >= N", lambda m: gp.el2n_scores(m, [(torch.zeros(2, 2), torch.tensor([0, 1]), torch.tensor([0, 5]))], 2), ValueError, "indices must lie in [0, 2), got [0, 5]", model),
    Case("el2n_scores", "a label >= number of logits", lambda m: gp.el2n_scores(m, [(torch.zeros(2, 2), torch.tensor([0, 2]), torch.tensor([0, 1]))], 2), ValueError, "labels must lie in [0, 2) for 2 logits, got [0, 2]", model),
    Case("el2n_scores", "a loader that misses samples", lambda m: gp.el2n_scores(m, [(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([0]))], 2), ValueError, "loader did not cover the dataset: 1 of 2 samples have no EL2N score", model),
    Case("ForgettingTracker", "`num_samples=0`", lambda _: gp.ForgettingTracker(0), ValueError, "num_samples must be >= 1, got num_samples=0"),
    Case("ForgettingTracker.update", "float `correct`", lambda t: t.update(IDX, torch.ones(3)), TypeError, "correct must be a bool torch.Tensor, got torch.float32", tracker),
    Case("ForgettingTracker.update", "`correct` a list", lambda t: t.update(IDX, [True] * 3), TypeError, "correct must be a bool torch.Tensor, got list", tracker),
    Case("ForgettingTracker.update", "an id >= N", lambda t: t.update(torch.tensor([20]), torch.tensor([True])), ValueError, "indices must lie in [0, 20), got an index 20", tracker),
    Case("ForgettingTracker.update", "lengths differ", lambda t: t.update(IDX, torch.tensor([True])), ValueError, "indices and correct must have the same length, got 3 and 1", tracker),
    # checkpoint files (the subject is the checkpoint directory: every file's bytes must stay)
    Case("save_checkpoint", "`path=3`", lambda d: gp.save_checkpoint({}, 3), TypeError, "path must be a str or os.PathLike, got int 3", "dir"),
    Case("save_checkpoint", "`path` a directory", lambda d: gp.save_checkpoint({}, d), ValueError, "path must be a file, got the directory", "dir"),
    Case("save_checkpoint", "`path` in a missing directory", lambda d: gp.save_checkpoint({}, d / "no" / "ckpt.pt"), FileNotFoundError, "the directory of path=", "dir"),
    Case("save_checkpoint", "an object that cannot be pickled", lambda d: gp.save_checkpoint({"f": lambda: 0}, d / "ckpt.pt"), (AttributeError, pickle.PicklingError), "pickle", "dir"),
    Case("load_checkpoint", "`path=None`", lambda d: gp.load_checkpoint(None), TypeError, "path must be a str or os.PathLike, got NoneType None", "dir"),
    Case("load_checkpoint", "a missing file", lambda d: gp.load_checkpoint(d / "nope.pt"), FileNotFoundError, "no checkpoint file at path=", "dir"),
    Case("load_checkpoint", "a truncated file", lambda d: gp.load_checkpoint(d / "truncated.pt"), ValueError, "is truncated or not a torch checkpoint", "dir"),
    Case("load_checkpoint", "a file that is not a checkpoint", lambda d: gp.load_checkpoint(d / "garbage.pt"), ValueError, "cannot be unpickled", "dir"),
    Case("load_checkpoint", "arbitrary objects with `weights_only=True`", lambda d: gp.load_checkpoint(d / "opaque.pt"), ValueError, "cannot be unpickled", "dir"),
    Case("load_checkpoint", "`map_location=\"gpu0\"`", lambda d: gp.load_checkpoint(d / "ckpt.pt", map_location="gpu0"), ValueError, "map_location must name a device, got map_location='gpu0'", "dir"),
]


# ---------------------------------------------------------------- state snapshots
def snapshot(obj) -> Any:
    """Everything that could change, as plain values and cloned tensors."""
    if obj is None:
        return None
    if isinstance(obj, gp.Pruner):
        plan = obj._plan
        return {"state": obj.state_dict(), "table": obj._weight_table,
                "plan_object": id(plan), "k": obj.k, "epoch": obj.bank.epoch}
    if isinstance(obj, gp.ScoreBank):
        return {"state": obj.state_dict(), "deferred": obj.deferred}
    if isinstance(obj, gp.PrunedSampler):
        return {"pos": (obj.epoch, obj._start, obj.num_replicas, obj.rank, obj.drop_last),
                "pruner": snapshot(obj.pruner)}
    if isinstance(obj, gp.ForgettingTracker):
        return [obj.prev.clone(), obj.learned.clone(), obj.forgotten.clone()]
    if isinstance(obj, torch.nn.Module):
        return {"training": obj.training, "params": {k: v.clone() for k, v in obj.state_dict().items()}}
    if isinstance(obj, Path):
        return {p.name: p.read_bytes() for p in sorted(obj.iterdir()) if p.is_file()}
    raise TypeError(type(obj))


def assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def case_id(case: Case) -> str:
    return f"{case.entry}: {case.bad}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_bad_input_raises_clearly_and_changes_nothing(case, tmp_path):
    subject = checkpoint_dir(tmp_path) if case.subject == "dir" else case.subject()
    before = snapshot(subject)
    with pytest.raises(case.exc) as info:
        case.call(subject)
    assert case.message in str(info.value), str(info.value)
    assert_same(before, snapshot(subject))


def test_subjects_still_work_after_the_errors():
    """The objects stay usable after rejecting input (nothing half-applied)."""
    p = trained_pruner()
    for bad in (lambda: p.observe(IDX, LOSS.mean()), lambda: p.load_state_dict(state_with(rounds=-1))):
        with pytest.raises((TypeError, ValueError)):
            bad()
    ref = trained_pruner()
    for q in (p, ref):
        q.observe(torch.arange(N), torch.linspace(0.0, 1.0, N))
    assert torch.equal(p.plan(3).indices, ref.plan(3).indices)


def test_nonfinite_losses_are_not_errors_but_are_counted():
    """Documented in docs/errors.md: NaN/inf losses are skipped by the statistics, not rejected."""
    p = trained_pruner("ucb")
    before = p.bank.state_dict()
    loss = torch.tensor([float("nan"), float("inf"), 2.0])
    out = p.observe(IDX, loss)
    assert out.isnan()                                      # the training loop still sees it
    after = p.bank.state_dict()
    assert int(after["nonfinite"]) == int(before["nonfinite"]) + 2
    changed = (after["count"] != before["count"]).nonzero().flatten().tolist()
    assert changed == [2]


def test_every_entry_point_has_a_case():
    entries = {c.entry for c in CASES}
    for name in ("Pruner(...)", "Pruner.plan", "Pruner.observe", "Pruner.load_state_dict",
                 "ScoreBank(...)", "ScoreBank.observe", "ScoreBank.load_state_dict", "PrunedSampler",
                 "PrunedSampler.state_dict", "PrunedSampler.load_state_dict", "IndexedDataset",
                 "Static", "EpsilonGreedy", "UCB", "InfoBatch", "shard_indices", "el2n_scores",
                 "ForgettingTracker.update", "save_checkpoint", "load_checkpoint"):
        assert name in entries, name


def doc_table() -> str:
    head = "| Entry point | Bad input | Error (type: message contains) |\n| --- | --- | --- |"
    return "\n".join([head, *(c.doc_row() for c in CASES)])


def test_docs_errors_md_lists_exactly_these_cases():
    text = DOC.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows == [c.doc_row() for c in CASES], "regenerate with: PYTHONPATH=. python tests/test_errors.py"


if __name__ == "__main__":
    sys.stdout.write(doc_table() + "\n")
