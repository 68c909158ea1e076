"""Every public entry point rejects bad input with a clear error and leaves its state unchanged.

One table drives the test and docs/errors.md: each case names the entry point, the bad input, the
exception type and a fragment of its message. The test snapshots the object's whole state (every
tensor, counter and flag), makes the bad call, checks the error, and checks the state is unchanged.
``PYTHONPATH=. python tests/test_errors.py`` prints the table for docs/errors.md, and a test keeps the two equal.

The DALI rows (``gpuprune.dali``) use real CPU pipelines (``device_id=None``) over tiny in-memory
arrays; they import DALI only when they run, and are skipped where it is not installed (the table
lists them regardless).
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset

import gpuprune as gp
from gpuprune.backend import TorchBackend
from gpuprune.plan import shard_indices
from gpuprune.policies import EpsilonGreedy, InfoBatch, Policy, Selection, Static, UCB

from conftest import edited, set_at

DOC = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
N = 20


@dataclass
class Case:
    entry: str                       # the public entry point, as written in docs/errors.md
    bad: str                         # the bad input, in words
    call: Callable[[Any], Any]       # makes the bad call on the subject
    exc: type | tuple
    message: str                     # a fragment of the error message (plain text)
    subject: Callable[[], Any] | str = lambda: None   # builds the object whose state must not change
    #                                (a str names a folder made in tmp_path: see TMP_SUBJECTS)
    dali: bool = False               # needs nvidia.dali (skipped without it)

    @property
    def exc_name(self) -> str:
        excs = self.exc if isinstance(self.exc, tuple) else (self.exc,)
        return " / ".join(e.__name__ for e in excs)

    def doc_row(self) -> str:
        return f"| `{self.entry}` | {self.bad} | `{self.exc_name}`: `{self.message}` |"


# ---------------------------------------------------------------- subjects
def trained_pruner(policy: str = "infobatch", num_epochs: int = 6) -> gp.Pruner:
    """A Pruner mid-run: a planned epoch, some losses observed, rescaled samples (InfoBatch)."""
    p = gp.Pruner(N, keep=0.5, policy=policy, num_epochs=num_epochs, seed=1)
    for epoch in range(2):
        plan = p.plan(epoch)
        p.observe(plan.indices, torch.linspace(0.1, 2.0, len(plan)))
    p.plan(2)
    return p


def longer_pruner() -> gp.Pruner:
    """:func:`trained_pruner` with num_epochs=12 (InfoBatch anneals from epoch 10, not 5)."""
    return trained_pruner(num_epochs=12)


def annealed_state() -> dict:
    """The state of a 6-epoch InfoBatch run after its annealing epoch 5 (floor(0.875 * 6))."""
    p = trained_pruner()
    for epoch in (3, 4, 5):
        p.plan(epoch)
    return p.state_dict()


def stats() -> gp.LossStats:
    s = gp.LossStats(N)
    TorchBackend("cpu").observe_(s.tensors(), torch.tensor([1, 2, 2, 7]),
                                 torch.tensor([1.0, 2.0, 3.0, float("nan")]), 0.9, 0)
    return s


def sampler() -> gp.PrunedSampler:
    s = gp.PrunedSampler(trained_pruner("uniform"))
    s.set_epoch(2)
    return s


def resumed_sampler() -> gp.PrunedSampler:
    s = sampler()
    s.load_state_dict(s.state_dict(consumed=4))
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
    (tmp / "notes.txt").write_text("epoch 3, loss 0.25\n")
    os.mkfifo(tmp / "pipe")
    gp.save_checkpoint({"obj": Opaque()}, tmp / "opaque.pt")
    return tmp


class Opaque:
    """Not a tensor or a plain container."""


class WrongCount(Policy):
    name = "wrong_count"

    def select(self, stats, k, *, epoch, generator, backend):
        return Selection(torch.arange(3, dtype=torch.int32))


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(3))

    def __len__(self):
        return 3


def state_with(policy: str = "infobatch", reseal: bool = True, **changes) -> dict:
    """A valid Pruner state dict with some entries replaced (conftest's :func:`edited`), from a
    pruner trained further than the subjects, so a half-applied load would show."""
    other = trained_pruner(policy)
    other.observe(torch.arange(N), torch.full((N,), 5.0))
    other.plan(3)
    return edited(other.state_dict(), reseal, **changes)


# ---------------------------------------------------------------- DALI subjects
def _have_dali() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):     # no `nvidia` package, or nvidia.dali blocked
        return False


HAVE_DALI = _have_dali()
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali is not installed")


def dali():
    """gpuprune.dali, imported only when a DALI case runs (this module imports without DALI)."""
    import gpuprune.dali
    return gpuprune.dali


DX = np.arange(N * 4, dtype=np.uint8).reshape(N, 2, 2, 1)     # N tiny HWC images
DY = np.arange(N, dtype=np.int64) % 3                          # and their labels


def dali_pruner() -> gp.Pruner:
    return gp.Pruner(N, keep=0.5, policy="uniform", num_epochs=6, seed=1)


def array_source():
    return dali().ArraySource(DX, DY, layouts=("HWC", None))


@dataclass
class DaliParts:
    """What an iterator is made of: a Pruner, a source and (built around the source) a pipeline."""
    pruner: gp.Pruner
    source: Any
    pipe: Any = None


def dali_parts(**pipeline_kwargs) -> DaliParts:
    """A Pruner, an ArraySource and a CPU pipeline reading it (not built yet: the iterator builds it)."""
    source = array_source()
    return DaliParts(dali_pruner(), source, dali().build_pipeline(source, batch_size=4,
                                                                  **pipeline_kwargs))


def unbound_parts() -> DaliParts:
    """A Pruner and a source no pipeline uses yet, for build_iterator."""
    return DaliParts(dali_pruner(), array_source())


def dali_iterator():
    """A PrunedDALIIterator mid-epoch: epoch 0 served, one batch of epoch 1 taken (its 10 samples
    in batches of 4)."""
    it = dali().build_iterator(dali_pruner(), array_source(), batch_size=4)
    it.set_epoch(0)
    for _ in it:
        pass
    it.set_epoch(1)
    next(it)
    return it


def iterator_of(d: DaliParts, output_map=("data", "label"), **kwargs):
    return dali().PrunedDALIIterator(d.pipe, output_map, pruner=d.pruner, source=d.source, **kwargs)


def build(d: DaliParts, define_graph=None, **kwargs):
    return dali().build_iterator(d.pruner, d.source, define_graph, **{"batch_size": 4, **kwargs})


def position(**changes) -> dict:
    """The mid-epoch iterator's position (``dali_iterator().state_dict()``) with some entries changed."""
    return {"epoch": 1, "consumed": 4, "num_replicas": 1, "drop_last": False, **changes}


def image_dir(tmp: Path) -> Path:
    """A ``fn.readers.file``-style folder: one subfolder per class (the files are never read)."""
    for cls, names in (("cat", ("a.png", "b.png")), ("dog", ("c.png",))):
        (tmp / cls).mkdir()
        for name in names:
            (tmp / cls / name).write_bytes(b"\x89PNG not really")
    return tmp


def image_files(d: Path) -> list[str]:
    return [str(d / "cat" / "a.png"), str(d / "cat" / "b.png"), str(d / "dog" / "c.png")]


IDX = torch.tensor([0, 1, 2])
LOSS = torch.tensor([1.0, 2.0, 3.0])
P = "Pruner(...)"
LS = "LossStats(...)"
S = "Schedule(...)"

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
    Case(P, "keep schedule without `num_epochs`", lambda _: gp.Pruner(N, keep=("linear", 0.8, 0.2)), ValueError, "is a keep schedule, which needs num_epochs"),
    Case(P, "keep schedule of unknown shape", lambda _: gp.Pruner(N, keep=("step", 0.8, 0.2), num_epochs=4), ValueError, "keep[0] (the schedule's shape) must be one of ['cosine', 'linear']"),
    Case(P, "keep schedule ending at 0", lambda _: gp.Pruner(N, keep=("linear", 0.8, 0), num_epochs=4), ValueError, "keep[2] (end) must be > 0.0"),
    Case(P, "keep callable out of (0, 1] in one epoch", lambda _: gp.Pruner(N, keep=lambda e: 0.5 if e < 3 else 1.5, num_epochs=4), ValueError, "keep(3) must be <= 1.0, got keep(3)=1.5"),
    Case(P, "keep schedule for InfoBatch", lambda _: gp.Pruner(N, keep=("linear", 0.8, 0.2), policy="infobatch", num_epochs=4), ValueError, "plans a loss-dependent number of samples"),
    Case(P, "changing keep schedule for a static subset", lambda _: gp.Pruner(N, keep=("linear", 0.8, 0.2), policy="static", num_epochs=4), ValueError, "selects one subset for the whole run"),
    Case(P, "`prune_ratio=1.0`", lambda _: gp.Pruner(N, prune_ratio=1.0), ValueError, "prune_ratio must be < 1.0, got prune_ratio=1.0"),
    Case(P, "`policy=\"greedy\"` (unknown)", lambda _: gp.Pruner(N, policy="greedy"), ValueError, "policy must be one of ['epsilon_greedy', 'full', 'infobatch', 'static', 'ucb', 'uniform'] or a Policy instance, got policy='greedy'"),
    Case(P, "`policy=3`", lambda _: gp.Pruner(N, policy=3), TypeError, "policy must be a name or a Policy instance, got int 3"),
    Case(P, "`policy=UCB` (the class)", lambda _: gp.Pruner(N, policy=UCB), TypeError, "got the class UCB; write policy=UCB()"),
    Case(P, "a policy setting (`epsilon=99.0`) given to the Pruner", lambda _: gp.Pruner(N, policy="uniform", epsilon=99.0), TypeError, "Pruner() got an unexpected keyword argument 'epsilon'; it is a setting of the policy: pass policy=gpuprune.EpsilonGreedy(epsilon=...)"),
    Case(P, "`c=-3.0`, `delta=5.0`, `drift=-1.0` given to the Pruner", lambda _: gp.Pruner(N, policy="uniform", c=-3.0, delta=5.0, drift=-1.0), TypeError, "unexpected keyword argument 'c'; it is a setting of the policy: pass policy=gpuprune.UCB(c=...)"),
    Case(P, "`static_scores=` given to the Pruner", lambda _: gp.Pruner(N, policy="static", static_scores=torch.rand(N)), TypeError, "pass policy=gpuprune.Static(scores=...)"),
    Case(P, "an unknown keyword", lambda _: gp.Pruner(N, batch_size=4), TypeError, "Pruner() got an unexpected keyword argument 'batch_size'"),
    Case(P, "`num_epochs=0`", lambda _: gp.Pruner(N, num_epochs=0), ValueError, "num_epochs must be >= 1, got num_epochs=0"),
    Case(P, "`num_epochs=2**31` (epochs are int32)", lambda _: gp.Pruner(N, num_epochs=2**31), ValueError, "num_epochs must be <= 2147483647, got num_epochs=2147483648"),
    Case(P, "`warmup_epochs=-1`", lambda _: gp.Pruner(N, warmup_epochs=-1), ValueError, "warmup_epochs must be >= 0, got warmup_epochs=-1"),
    Case(P, "`final_full_epochs=5` with `num_epochs=3`", lambda _: gp.Pruner(N, num_epochs=3, final_full_epochs=5), ValueError, "final_full_epochs must be <= 3, got final_full_epochs=5"),
    Case(P, "`final_full_epochs=2` without `num_epochs`", lambda _: gp.Pruner(N, final_full_epochs=2), ValueError, "final_full_epochs=2 needs num_epochs"),
    Case(P, "`policy=\"infobatch\"` without `num_epochs`", lambda _: gp.Pruner(N, policy="infobatch"), ValueError, "policy='infobatch' needs num_epochs"),
    Case(P, "`selection_interval=0`", lambda _: gp.Pruner(N, selection_interval=0), ValueError, "selection_interval must be >= 1, got selection_interval=0"),
    Case(P, "`decay=1.0`", lambda _: gp.Pruner(N, decay=1.0), ValueError, "decay must be < 1.0, got decay=1.0"),
    Case(P, "`policy=Static(scores)` with the wrong length", lambda _: gp.Pruner(N, policy=Static(torch.rand(3))), ValueError, "static scores must have one score per sample: got 3 scores for num_samples=20"),
    Case(P, "`seed=1.5`", lambda _: gp.Pruner(N, seed=1.5), TypeError, "seed must be an int, got float 1.5"),
    Case(P, "`device=\"meta\"`", lambda _: gp.Pruner(N, device="meta"), ValueError, "device must be a cpu or cuda device, got device='meta'"),
    Case(P, "`device=\"cuda:99\"` (absent)", lambda _: gp.Pruner(N, device="cuda:99"), ValueError, "device='cuda:99'"),
    Case(P, "`device=\"gpu\"` (not a device)", lambda _: gp.Pruner(N, device="gpu"), ValueError, "device must be a torch device or string, got device='gpu'"),
    Case(P, "`backend=\"gpu\"`", lambda _: gp.Pruner(N, backend="gpu"), ValueError, "backend must be one of ['auto', 'cuda', 'torch'], got backend='gpu'"),
    Case(P, "`backend=\"cuda\"` on the CPU", lambda _: gp.Pruner(N, backend="cuda"), ValueError, "backend='cuda' needs a CUDA device, got device=cpu"),
    Case(P, "`process_group=\"world\"`", lambda _: gp.Pruner(N, process_group="world"), ValueError, "process_group must be 'auto', None or a torch.distributed ProcessGroup, got process_group='world'"),
    Case("budget", "`keep=0`", lambda _: gp.budget(0, 10), ValueError, "keep must be > 0.0"),
    Case("budget", "`num_samples=0`", lambda _: gp.budget(0.5, 0), ValueError, "num_samples must be >= 1"),
    # Pruner methods
    Case("Pruner.plan", "`epoch=-1`", lambda p: p.plan(-1), ValueError, "epoch must be >= 0, got epoch=-1", trained_pruner),
    Case("Pruner.plan", "`epoch=\"3\"`", lambda p: p.plan("3"), TypeError, "epoch must be an int, got str '3'", trained_pruner),
    Case("Pruner.plan", "an epoch before the current plan's", lambda p: p.plan(1), ValueError, "epoch must not go back: plan(1) after plan(2)", trained_pruner),
    Case("Pruner.plan", "an epoch beyond `num_epochs`", lambda p: p.plan(6), ValueError, "epoch must be <= 5 (epochs count from 0; the schedule has num_epochs=6), got epoch=6", trained_pruner),
    Case("Pruner.plan", "`epoch=2**31` (the state stores int32 epochs)", lambda p: p.plan(2**31), ValueError, "epoch must be <= 2147483647 (epochs are stored as int32), got epoch=2147483648", lambda: gp.Pruner(N, policy="uniform")),
    Case("Pruner.plan", "a custom policy returning the wrong count", lambda p: p.plan(1), ValueError, "WrongCount() returned 3 ids, expected k=10", lambda: gp.Pruner(N, keep=0.5, policy=WrongCount())),
    Case("Pruner.observe", "`indices` a list", lambda p: p.observe([0, 1, 2], LOSS), TypeError, "indices must be a torch.Tensor, got list", trained_pruner),
    Case("Pruner.observe", "float `indices`", lambda p: p.observe(IDX.float(), LOSS), TypeError, "indices must have an integer dtype, got indices.dtype=torch.float32", trained_pruner),
    Case("Pruner.observe", "bool `indices`", lambda p: p.observe(IDX > 0, LOSS), TypeError, "indices must have an integer dtype, got indices.dtype=torch.bool", trained_pruner),
    Case("Pruner.observe", "uint32 `indices`", lambda p: p.observe(IDX.to(torch.uint32), LOSS), TypeError, "indices must have a signed integer dtype (int8/16/32/64) or uint8, got indices.dtype=torch.uint32: torch cannot index with it", trained_pruner),
    Case("Pruner.observe", "2-D `indices`", lambda p: p.observe(IDX[None], LOSS), ValueError, "indices must be 1-D, got indices.shape=(1, 3)", trained_pruner),
    Case("Pruner.observe", "a reduced (0-d) loss", lambda p: p.observe(IDX, LOSS.mean()), ValueError, "per_sample_loss must be 1-D, one value per sample, got per_sample_loss.shape=() (use reduction='none'", trained_pruner),
    Case("Pruner.observe", "a 2-D loss", lambda p: p.observe(IDX, LOSS[None]), ValueError, "per_sample_loss must be 1-D, one value per sample, got per_sample_loss.shape=(1, 3)", trained_pruner),
    Case("Pruner.observe", "integer losses", lambda p: p.observe(IDX, IDX), TypeError, "per_sample_loss must have a floating dtype, got per_sample_loss.dtype=torch.int64", trained_pruner),
    Case("Pruner.observe", "lengths differ", lambda p: p.observe(IDX, LOSS[:2]), ValueError, "indices and per_sample_loss must have the same length, got 3 and 2", trained_pruner),
    Case("Pruner.observe", "an id >= N", lambda p: p.observe(torch.tensor([0, 20]), LOSS[:2]), ValueError, "indices must lie in [0, 20), got an index 20", trained_pruner),
    Case("Pruner.observe", "a negative id", lambda p: p.observe(torch.tensor([-1, 3]), LOSS[:2]), ValueError, "indices must lie in [0, 20), got an index -1", trained_pruner),
    Case("Pruner.observe", "losses on another device", lambda p: p.observe(IDX, LOSS.to("meta")), ValueError, "per_sample_loss must be on cpu, got per_sample_loss.device=meta", trained_pruner),
    Case("Pruner.observe", "`trained=1`", lambda p: p.observe(IDX, LOSS, trained=1), TypeError, "trained must be a bool, got int 1", trained_pruner),
    Case("Pruner.is_full_epoch", "`epoch=-1`", lambda p: p.is_full_epoch(-1), ValueError, "epoch must be >= 0", trained_pruner),
    Case("Pruner.epoch_size", "an epoch beyond `num_epochs`", lambda p: p.epoch_size(9), ValueError, "epoch must be <= 5", trained_pruner),
    Case("Pruner.total_steps", "InfoBatch (loss-dependent epoch sizes) without `upper_bound=True`", lambda p: p.total_steps(4), ValueError, "plans a loss-dependent number of samples, so the run's step count is not known in advance; pass upper_bound=True", trained_pruner),
    Case("Pruner.total_steps", "no `num_epochs`", lambda p: p.total_steps(4), ValueError, "total_steps needs a schedule with num_epochs", lambda: gp.Pruner(N, policy="uniform")),
    Case("Pruner.total_steps", "`world_size=0`", lambda p: p.total_steps(4, world_size=0), ValueError, "world_size must be >= 1, got world_size=0", lambda: trained_pruner("uniform")),
    Case("Pruner.total_steps", "`upper_bound=\"yes\"`", lambda p: p.total_steps(4, upper_bound="yes"), TypeError, "upper_bound must be a bool, got str 'yes'", trained_pruner),
    Case("Pruner.total_steps", "`batch_size=0`", lambda p: p.total_steps(0), ValueError, "batch_size must be >= 1, got batch_size=0", lambda: trained_pruner("uniform")),
    Case("Pruner.selection_stats", "`always=2`", lambda p: p.selection_stats(always=2), ValueError, "always must be <= 1.0, got always=2.0", trained_pruner),
    Case("Pruner.load_state_dict", "not a dict", lambda p: p.load_state_dict([1, 2]), TypeError, "state must be a dict from Pruner.state_dict(), got list", trained_pruner),
    Case("Pruner.load_state_dict", "an entry missing", lambda p: p.load_state_dict(state_with(rounds=KeyError)), ValueError, "missing ['rounds']", trained_pruner),
    Case("Pruner.load_state_dict", "an unknown entry", lambda p: p.load_state_dict(state_with(bank=None)), ValueError, "unknown ['bank']", trained_pruner),
    Case("Pruner.load_state_dict", "content changed after saving (the checksum)", lambda p: p.load_state_dict(state_with(reseal=False, stats__mean=set_at(3, 1.27e38))), ValueError, "state_dict['checksum'] does not match the state's content", trained_pruner),
    Case("Pruner.load_state_dict", "another `decay`", lambda p: p.load_state_dict(state_with(config__decay=0.5)), ValueError, "checkpoint was made with decay=0.5, this Pruner has decay=", trained_pruner),
    Case("Pruner.load_state_dict", "another policy setting (InfoBatch `delta`)", lambda p: p.load_state_dict(state_with(config__policy=lambda c: {**c, "delta": 0.5})), ValueError, "checkpoint was made with policy.delta=0.5, this Pruner has policy.delta=0.875", trained_pruner),
    Case("Pruner.load_state_dict", "another configuration (k)", lambda p: p.load_state_dict(state_with(config__k=7)), ValueError, "checkpoint was made with k=7, this Pruner has k=10", trained_pruner),
    Case("Pruner.load_state_dict", "an emptied `config`", lambda p: p.load_state_dict(state_with(config={})), ValueError, "state_dict['config'] is missing 'decay'", trained_pruner),
    Case("Pruner.load_state_dict", "a plan of 3 ids where k = 10", lambda p: p.load_state_dict(state_with("uniform", plan__indices=lambda t: t[:3])), ValueError, "state_dict['plan']['indices'] holds 3 ids, its history record says 10", lambda: trained_pruner("uniform")),
    Case("Pruner.load_state_dict", "duplicate plan ids", lambda p: p.load_state_dict(state_with("uniform", plan__indices=set_at(1, -1))), ValueError, "state_dict['plan']['indices'] holds ids outside [0, 20)", lambda: trained_pruner("uniform")),
    Case("Pruner.load_state_dict", "a plan id >= N", lambda p: p.load_state_dict(state_with("uniform", plan__indices=set_at(0, 25))), ValueError, "state_dict['plan']['indices'] holds ids outside [0, 20): [", lambda: trained_pruner("uniform")),
    Case("Pruner.load_state_dict", "a repeated plan id", lambda p: p.load_state_dict(state_with("uniform", plan__indices=lambda t: torch.cat([t[:1], t[:-1]]))), ValueError, "state_dict['plan']['indices'] holds duplicate ids", lambda: trained_pruner("uniform")),
    Case("Pruner.load_state_dict", "plan ids that are not 1-D int32", lambda p: p.load_state_dict(state_with(plan__indices=torch.zeros(2, 2, dtype=torch.long))), ValueError, "state_dict['plan']['indices'] must be a 1-D torch.int32 tensor, got (2, 2) torch.int64", trained_pruner),
    Case("Pruner.load_state_dict", "a NaN mean", lambda p: p.load_state_dict(state_with(stats__mean=set_at(4, float("nan")))), ValueError, "state_dict['stats']['mean'] holds non-finite values", trained_pruner),
    Case("Pruner.load_state_dict", "a negative variance", lambda p: p.load_state_dict(state_with(stats__var=set_at(4, -1.0))), ValueError, "state_dict['stats']['var'] holds negative or non-finite values", trained_pruner),
    Case("Pruner.load_state_dict", "a stats tensor of the wrong dtype", lambda p: p.load_state_dict(state_with(stats__last_epoch=torch.zeros(N))), ValueError, "state_dict['stats']['last_epoch'] must be a (20,) torch.int32 tensor, got (20,) torch.float32", trained_pruner),
    Case("Pruner.load_state_dict", "a sample seen in a future epoch", lambda p: p.load_state_dict(state_with(stats__last_epoch=set_at(0, 9))), ValueError, "state_dict['stats']['last_epoch'] must lie in [-1, 3], got [", trained_pruner),
    Case("Pruner.load_state_dict", "a sample selected more often than there were rounds", lambda p: p.load_state_dict(state_with(stats__selected=set_at(0, 99))), ValueError, "state_dict['stats']['selected'] must lie in [0, 4], got [", trained_pruner),
    Case("Pruner.load_state_dict", "`rounds=-1`", lambda p: p.load_state_dict(state_with(rounds=-1)), ValueError, "state_dict['rounds'] must be >= 0", trained_pruner),
    Case("Pruner.load_state_dict", "a plan epoch that is full in this schedule", lambda p: p.load_state_dict(state_with(plan__full=True)), ValueError, "state_dict['plan']['full']=True, but epoch 3 is pruned in this schedule", trained_pruner),
    # whole-state validation (issue 22, item 3): each state below is edited *and re-checksummed*
    Case("Pruner.load_state_dict", "`rounds=10**9`", lambda p: p.load_state_dict(state_with(rounds=10**9)), ValueError, "state_dict['rounds']=1000000000, but the history holds 4 pruned plans", trained_pruner),
    Case("Pruner.load_state_dict", "a history record with `overlap=\"x\"`", lambda p: p.load_state_dict(state_with(history=lambda h: [h[0], {**h[1], "overlap": "x"}, *h[2:]])), ValueError, "state_dict['history'][1]['overlap'] must be a float in [0, 1], got 'x'", trained_pruner),
    Case("Pruner.load_state_dict", "a history record `{}`", lambda p: p.load_state_dict(state_with(history=lambda h: [h[0], {}, *h[2:]])), ValueError, "state_dict['history'][1] must be a dict with exactly the keys ['epoch', 'size', 'full', 'reselected', 'overlap'], got {}", trained_pruner),
    Case("Pruner.load_state_dict", "1,002 history records for 4 epochs", lambda p: p.load_state_dict(state_with(history=lambda h: h + [h[-1]] * 998)), ValueError, "state_dict['history'][4]['epoch']=3 does not follow the previous record's epoch 3", trained_pruner),
    Case("Pruner.load_state_dict", "`nonfinite=2**62`", lambda p: p.load_state_dict(state_with(stats__nonfinite=torch.tensor(2**62))), ValueError, "state_dict['stats']['nonfinite'] must lie in [0, 2**53], got 4611686018427387904", trained_pruner),
    Case("Pruner.load_state_dict", "an InfoBatch plan of 1 id", lambda p: p.load_state_dict(state_with(plan__indices=lambda t: t[:1])), ValueError, "state_dict['plan']['indices'] holds 1 ids, its history record says", trained_pruner),
    # extending a run (issue 19): the subject has num_epochs=12, the states num_epochs=6
    Case("Pruner.load_state_dict(extend=True)", "`extend=\"yes\"`", lambda p: p.load_state_dict(state_with(), extend="yes"), TypeError, "extend must be a bool, got str 'yes'", longer_pruner),
    Case("Pruner.load_state_dict(extend=True)", "a checkpoint past its first annealing epoch (epoch 5 of 6)", lambda p: p.load_state_dict(annealed_state(), extend=True), ValueError, "cannot extend this checkpoint: its run (num_epochs=6) planned epoch 5 as a full-data epoch, which with num_epochs=12 is pruned", longer_pruner),
    Case("Pruner.load_state_dict(extend=True)", "another setting besides `num_epochs` (`seed`)", lambda p: p.load_state_dict(state_with(config__seed=2), extend=True), ValueError, "checkpoint was made with seed=2, this Pruner has seed=1", longer_pruner),
    Case("Pruner.load_state_dict(extend=True)", "a run longer than this Pruner's", lambda p: p.load_state_dict(state_with(), extend=True), ValueError, "checkpoint was made with schedule.num_epochs=6, more than this Pruner's num_epochs=4: extend=True only lengthens a run", lambda: trained_pruner(num_epochs=4)),
    Case("Pruner.load_state_dict(extend=True)", "a Pruner without `num_epochs`", lambda p: p.load_state_dict(state_with(), extend=True), ValueError, "extend=True continues a run for more epochs, but this Pruner has no num_epochs", lambda: gp.Pruner(N, keep=0.5, policy="uniform")),
    # LossStats
    Case(LS, "`num_samples=0`", lambda _: gp.LossStats(0), ValueError, "num_samples must be >= 1, got num_samples=0"),
    Case(LS, "`device=\"meta\"`", lambda _: gp.LossStats(N, device="meta"), ValueError, "device must be a cpu or cuda device"),
    Case("LossStats.frequency", "`rounds=-1`", lambda b: b.frequency(-1), ValueError, "rounds must be >= 0, got rounds=-1", stats),
    Case("LossStats.load_state_dict", "not a dict", lambda b: b.load_state_dict(None), TypeError, "state_dict['stats'] must be a dict from LossStats.state_dict(), got NoneType", stats),
    Case("LossStats.load_state_dict", "another `num_samples`", lambda b: b.load_state_dict(gp.LossStats(5).state_dict()), ValueError, "state_dict['stats']['mean'] must be a (20,) torch.float32 tensor, got (5,) torch.float32", stats),
    Case("LossStats.load_state_dict", "an inf mean", lambda b: b.load_state_dict({**b.state_dict(), "mean": set_at(0, float("inf"))(b.mean)}), ValueError, "state_dict['stats']['mean'] holds non-finite values", stats),
    # Schedule
    Case(S, "`num_epochs=0`", lambda _: gp.Schedule(0), ValueError, "num_epochs must be >= 1, got num_epochs=0"),
    Case(S, "`final_full_epochs=2` without `num_epochs`", lambda _: gp.Schedule(final_full_epochs=2), ValueError, "final_full_epochs=2 needs num_epochs"),
    Case(S, "`selection_interval=1.5`", lambda _: gp.Schedule(selection_interval=1.5), TypeError, "selection_interval must be an int, got float 1.5"),
    Case("Schedule.total_steps", "no `num_epochs`", lambda _: gp.Schedule().total_steps(10, 5, 2), ValueError, "total_steps needs a schedule with num_epochs"),
    Case("Schedule.total_steps", "`k` > `num_samples`", lambda _: gp.Schedule(3).total_steps(10, 11, 2), ValueError, "k must be <= 10, got k=11"),
    Case("Schedule.steps", "`batch_size=0`", lambda _: gp.Schedule(3).steps(0, 10, 5, 0), ValueError, "batch_size must be >= 1, got batch_size=0"),
    # sampler and dataset
    Case("PrunedSampler", "`pruner=None`", lambda _: gp.PrunedSampler(None), TypeError, "pruner must be a gpuprune.Pruner or another Planner (num_samples, rank, world_size, num_epochs, device, check_epoch, epoch_size, plan), got NoneType"),
    Case("PrunedSampler", "`num_replicas=0`", lambda _: gp.PrunedSampler(trained_pruner(), num_replicas=0), ValueError, "num_replicas must be >= 1, got num_replicas=0"),
    Case("PrunedSampler", "`rank=2` of 2", lambda _: gp.PrunedSampler(trained_pruner(), num_replicas=2, rank=2), ValueError, "rank must be <= 1, got rank=2"),
    Case("PrunedSampler", "`drop_last=\"yes\"`", lambda _: gp.PrunedSampler(trained_pruner(), drop_last="yes"), TypeError, "drop_last must be a bool, got str 'yes'"),
    Case("PrunedSampler.set_epoch", "`epoch=-1`", lambda s: s.set_epoch(-1), ValueError, "epoch must be >= 0, got epoch=-1", resumed_sampler),
    Case("PrunedSampler.set_epoch", "an epoch beyond `num_epochs`", lambda s: s.set_epoch(6), ValueError, "epoch must be <= 5 (epochs count from 0; the schedule has num_epochs=6), got epoch=6", resumed_sampler),
    Case("PrunedSampler.state_dict", "`consumed` beyond this pass", lambda s: s.state_dict(consumed=7), ValueError, "consumed=7 is more than the 6 samples this pass of epoch 2 yields", resumed_sampler),
    Case("PrunedSampler.state_dict", "`consumed=-1`", lambda s: s.state_dict(consumed=-1), ValueError, "consumed must be >= 0, got consumed=-1", resumed_sampler),
    Case("PrunedSampler.state_dict", "`consumed=2.0`", lambda s: s.state_dict(consumed=2.0), TypeError, "consumed must be an int, got float 2.0", resumed_sampler),
    Case("PrunedSampler.load_state_dict", "not a dict", lambda s: s.load_state_dict([2, 4]), TypeError, "state must be a dict from PrunedSampler.state_dict(), got list", resumed_sampler),
    Case("PrunedSampler.load_state_dict", "entries missing", lambda s: s.load_state_dict({"epoch": 1}), ValueError, "state_dict is missing ['consumed', 'num_replicas', 'drop_last']", resumed_sampler),
    Case("PrunedSampler.load_state_dict", "an unknown key (a state of another object)", lambda s: s.load_state_dict({"epoch": 1, "consumed": 0, "num_replicas": 1, "drop_last": False, "batch": 3}), ValueError, "state_dict has unknown keys ['batch']", resumed_sampler),
    Case("PrunedSampler.load_state_dict", "`epoch=-1`", lambda s: s.load_state_dict({"epoch": -1, "consumed": 0, "num_replicas": 1, "drop_last": False}), ValueError, "state_dict['epoch'] must be >= 0", resumed_sampler),
    Case("PrunedSampler.load_state_dict", "an epoch beyond `num_epochs`", lambda s: s.load_state_dict({"epoch": 8, "consumed": 0, "num_replicas": 1, "drop_last": False}), ValueError, "state_dict['epoch'] must be <= 5", resumed_sampler),
    Case("PrunedSampler.load_state_dict", "a mid-epoch state from another world size", lambda s: s.load_state_dict({"epoch": 2, "consumed": 3, "num_replicas": 4, "drop_last": False}), ValueError, "a mid-epoch state saved with num_replicas=4, drop_last=False cannot resume with num_replicas=1", resumed_sampler),
    Case("PrunedSampler.load_state_dict", "`consumed` beyond this rank's share of the epoch", lambda s: s.load_state_dict({"epoch": 2, "consumed": 50, "num_replicas": 1, "drop_last": False}), ValueError, "state_dict['consumed']=50 is more than the 10 samples this rank's share of epoch 2 holds", resumed_sampler),
    Case("IndexedDataset", "not a dataset (`5`)", lambda _: gp.IndexedDataset(5), TypeError, "dataset must be a map-style dataset with __getitem__ and __len__, got int"),
    Case("IndexedDataset", "an IterableDataset", lambda _: gp.IndexedDataset(Stream()), TypeError, "dataset must be a map-style dataset with __getitem__ and __len__, got Stream"),
    # policies
    Case("Static", "`scores` a list", lambda _: Static([1.0, 2.0]), TypeError, "scores must be a floating torch.Tensor, got list"),
    Case("Static", "integer `scores`", lambda _: Static(torch.arange(3)), TypeError, "scores must be a floating torch.Tensor, got Tensor torch.int64"),
    Case("Static", "2-D `scores`", lambda _: Static(torch.rand(2, 2)), ValueError, "scores must be 1-D, got scores.shape=(2, 2)"),
    Case("EpsilonGreedy", "`epsilon=2`", lambda _: EpsilonGreedy(2), ValueError, "epsilon must be <= 1.0, got epsilon=2.0"),
    Case("EpsilonGreedy", "`epsilon=None`", lambda _: EpsilonGreedy(None), TypeError, "epsilon must be a real number, got NoneType None"),
    Case("UCB", "`c=nan`", lambda _: UCB(c=float("nan")), ValueError, "c must be finite, got c=nan"),
    Case("UCB", "`c=-3`", lambda _: UCB(c=-3.0), ValueError, "c must be >= 0.0, got c=-3.0"),
    Case("UCB", "`uncertainty=\"mad\"`", lambda _: UCB(uncertainty="mad"), ValueError, "uncertainty must be one of ['std', 'var'], got uncertainty='mad'"),
    Case("UCB", "`uncertainty=None`", lambda _: UCB(uncertainty=None), TypeError, "uncertainty must be a str, one of ['std', 'var'], got NoneType None"),
    Case("UCB", "`drift=-0.5`", lambda _: UCB(drift=-0.5), ValueError, "drift must be >= 0.0, got drift=-0.5"),
    Case("UCB", "`drift=inf`", lambda _: UCB(drift=float("inf")), ValueError, "drift must be finite, got drift=inf"),
    Case("InfoBatch", "`ratio=1.0`", lambda _: InfoBatch(ratio=1.0), ValueError, "ratio must be < 1.0, got ratio=1.0"),
    Case("InfoBatch", "`delta=-1`", lambda _: InfoBatch(delta=-1), ValueError, "delta must be >= 0.0, got delta=-1.0"),
    Case("InfoBatch", "`delta=2.0`", lambda _: InfoBatch(delta=2.0), ValueError, "delta must be <= 1.0, got delta=2.0"),
    Case("InfoBatch", "`min_keep=0`", lambda _: InfoBatch(min_keep=0.0), ValueError, "min_keep must be > 0.0, got min_keep=0.0"),
    Case(P, "`min_keep=` given to the Pruner", lambda _: gp.Pruner(N, policy="infobatch", num_epochs=4, min_keep=0.2), TypeError, "pass policy=gpuprune.InfoBatch(min_keep=...)"),
    # the re-score pass
    Case("Refresher", "`pruner=None`", lambda _: gp.Refresher(None), TypeError, "pruner must be a gpuprune.Pruner, got NoneType"),
    Case("Refresher", "`which=\"some\"`", lambda p: gp.Refresher(p, which="some"), ValueError, "which must be one of ['all', 'unselected'], got which='some'", trained_pruner),
    Case("Refresher", "`share=0`", lambda p: gp.Refresher(p, share=0.0), ValueError, "share must be > 0.0, got share=0.0", trained_pruner),
    Case("Refresher.run", "`model` a function", lambda p: gp.Refresher(p).run(lambda x: x, None, 3), TypeError, "model must be a torch.nn.Module, got function", trained_pruner),
    Case("Refresher.run", "`data` neither tensors nor batches", lambda p: gp.Refresher(p).run(model(), 5, 3), TypeError, "data must be a pair (x, y) of tensors or an iterable of batches, got int", trained_pruner),
    # sharding
    Case("plan.shard_indices", "`indices` a list", lambda _: shard_indices([1, 2], 0, 1), TypeError, "indices must be a torch.Tensor, got list"),
    Case("plan.shard_indices", "2-D `indices`", lambda _: shard_indices(torch.ones(2, 2), 0, 1), ValueError, "indices must be 1-D, got indices.shape=(2, 2)"),
    Case("plan.shard_indices", "`rank=3` of 2", lambda _: shard_indices(torch.arange(4), 3, 2), ValueError, "rank must be <= 1, got rank=3"),
    Case("plan.shard_indices", "`world_size=0`", lambda _: shard_indices(torch.arange(4), 0, 0), ValueError, "world_size must be >= 1, got world_size=0"),
    Case("Plan.batches", "`batch_size=0`", lambda p: p.plan(2).batches(0), ValueError, "batch_size must be >= 1, got batch_size=0", trained_pruner),
    # static scores
    Case("el2n_scores", "`model` a function", lambda _: gp.el2n_scores(lambda x: x, [], 2), TypeError, "model must be a torch.nn.Module, got function"),
    Case("el2n_scores", "`loader=None`", lambda m: gp.el2n_scores(m, None, 2), TypeError, "loader must be iterable, got NoneType", model),
    Case("el2n_scores", "`num_samples=0`", lambda m: gp.el2n_scores(m, [], 0), ValueError, "num_samples must be >= 1, got num_samples=0", model),
    Case("el2n_scores", "batches without indices", lambda m: gp.el2n_scores(m, [(torch.zeros(2, 2), torch.tensor([0, 1]))], 2), ValueError, "loader must yield (inputs, labels, indices) batches, got 2 items", model),
    Case("el2n_scores", "an id >= N", lambda m: gp.el2n_scores(m, [(torch.zeros(2, 2), torch.tensor([0, 1]), torch.tensor([0, 5]))], 2), ValueError, "indices must lie in [0, 2), got [0, 5]", model),
    Case("el2n_scores", "a label >= number of logits", lambda m: gp.el2n_scores(m, [(torch.zeros(2, 2), torch.tensor([0, 2]), torch.tensor([0, 1]))], 2), ValueError, "labels must lie in [0, 2) for 2 logits, got [0, 2]", model),
    Case("el2n_scores", "a loader that misses samples", lambda m: gp.el2n_scores(m, [(torch.zeros(1, 2), torch.tensor([0]), torch.tensor([0]))], 2), ValueError, "loader did not cover the dataset: 1 of 2 samples have no EL2N score", model),
    Case("el2n_scores", "a model whose outputs are NaN", lambda m: gp.el2n_scores(m, [(torch.full((2, 2), float("nan")), torch.tensor([0, 1]), torch.tensor([0, 1]))], 2), ValueError, "the model's outputs are not finite for 2 of 2 samples (ids [0, 1])", model),
    Case("ForgettingTracker", "`num_samples=0`", lambda _: gp.ForgettingTracker(0), ValueError, "num_samples must be >= 1, got num_samples=0"),
    Case("ForgettingTracker.update", "float `correct`", lambda t: t.update(IDX, torch.ones(3)), TypeError, "correct must be a bool torch.Tensor, got torch.float32", tracker),
    Case("ForgettingTracker.update", "`correct` a list", lambda t: t.update(IDX, [True] * 3), TypeError, "correct must be a bool torch.Tensor, got list", tracker),
    Case("ForgettingTracker.update", "an id >= N", lambda t: t.update(torch.tensor([20]), torch.tensor([True])), ValueError, "indices must lie in [0, 20), got an index 20", tracker),
    Case("ForgettingTracker.update", "lengths differ", lambda t: t.update(IDX, torch.tensor([True])), ValueError, "indices and correct must have the same length, got 3 and 1", tracker),
    # checkpoint files (the subject is the checkpoint directory: every file's bytes must stay)
    Case("save_checkpoint", "`path=3`", lambda d: gp.save_checkpoint({}, 3), TypeError, "path must be a str or os.PathLike, got int 3", "dir"),
    Case("save_checkpoint", "`path` a directory", lambda d: gp.save_checkpoint({}, d), ValueError, "is a directory; a checkpoint is saved to a regular file", "dir"),
    Case("save_checkpoint", "`path` a FIFO (or a device)", lambda d: gp.save_checkpoint({}, d / "pipe"), ValueError, "is not a regular file; a checkpoint is saved to a regular file", "dir"),
    Case("save_checkpoint", "`path` in a missing directory", lambda d: gp.save_checkpoint({}, d / "no" / "ckpt.pt"), FileNotFoundError, "/no/ckpt.pt': its directory", "dir"),
    Case("save_checkpoint", "an object that cannot be pickled", lambda d: gp.save_checkpoint({"f": lambda: 0}, d / "ckpt.pt"), (AttributeError, pickle.PicklingError), "pickle", "dir"),
    Case("load_checkpoint", "`path=None`", lambda d: gp.load_checkpoint(None), TypeError, "path must be a str or os.PathLike, got NoneType None", "dir"),
    Case("load_checkpoint", "a missing file", lambda d: gp.load_checkpoint(d / "nope.pt"), FileNotFoundError, "no checkpoint file at path=", "dir"),
    Case("load_checkpoint", "a truncated file", lambda d: gp.load_checkpoint(d / "truncated.pt"), gp.CheckpointError, "is truncated or extended", "dir"),
    Case("load_checkpoint", "a file that is not a checkpoint", lambda d: gp.load_checkpoint(d / "garbage.pt"), gp.CheckpointError, "garbage.pt' cannot be unpickled (neither a gpuprune checkpoint nor a torch.save file)", "dir"),
    Case("load_checkpoint", "a text file", lambda d: gp.load_checkpoint(d / "notes.txt"), gp.CheckpointError, "notes.txt'", "dir"),
    Case("load_checkpoint", "arbitrary objects with `weights_only=True`", lambda d: gp.load_checkpoint(d / "opaque.pt"), gp.CheckpointError, "cannot be unpickled", "dir"),
    Case("load_checkpoint", "`map_location=\"gpu0\"`", lambda d: gp.load_checkpoint(d / "ckpt.pt", map_location="gpu0"), ValueError, "map_location must name a device, got map_location='gpu0'", "dir"),
]


def DaliCase(*args, **kwargs) -> Case:
    return Case(*args, **kwargs, dali=True)


DI = "PrunedDALIIterator(...)"
FILL_MESSAGE = "last_batch_policy=LastBatchPolicy.FILL (or fill_last_batch=True) without last_batch_padded=True would fill the last batch with samples the plan did not choose"
CHECKPOINT_MESSAGE = "the pipeline has enable_checkpointing=True, which PrunedDALIIterator does not support"
# DALI (gpuprune.dali): real CPU pipelines over tiny arrays; the source and the Pruner must stay as
# they were, the iterator keeps its position. Where DALI's own iterator raises, the type is DALI's.
CASES += [
    DaliCase(DI, "`last_batch_policy=LastBatchPolicy.FILL`", lambda d: iterator_of(d, last_batch_policy=dali().LastBatchPolicy.FILL), ValueError, FILL_MESSAGE, dali_parts),
    DaliCase(DI, "a pipeline with `enable_checkpointing=True`", lambda d: iterator_of(d), ValueError, CHECKPOINT_MESSAGE, lambda: dali_parts(enable_checkpointing=True)),
    DaliCase(DI, "`last_batch_policy=\"FILL\"` (a str, not the enum; ValueError as in DALI)", lambda d: iterator_of(d, last_batch_policy="FILL"), ValueError, "last_batch_policy must be a LastBatchPolicy (as for DALI's iterators), got str 'FILL'", dali_parts),
    DaliCase(DI, "`auto_reset=1` (ValueError as in DALI)", lambda d: iterator_of(d, auto_reset=1), ValueError, "auto_reset must be True, False, None, 'yes' or 'no' (as for DALI's iterators), got int 1", dali_parts),
    DaliCase(DI, "`auto_reset=numpy.bool_(True)` (refused as in DALI)", lambda d: iterator_of(d, auto_reset=np.bool_(True)), ValueError, "auto_reset must be True, False, None, 'yes' or 'no' (as for DALI's iterators), got numpy.bool np.True_", dali_parts),
    DaliCase(DI, "`last_batch_padded=\"yes\"`", lambda d: iterator_of(d, last_batch_padded="yes"), TypeError, "last_batch_padded must be a bool, got str 'yes'", dali_parts),
    DaliCase(DI, "`shard_id=2` with `num_shards=2`", lambda d: iterator_of(d, shard_id=2, num_shards=2), ValueError, "shard_id must be <= 1, got shard_id=2", dali_parts),
    DaliCase(DI, "`num_shards=0`", lambda d: iterator_of(d, num_shards=0), ValueError, "num_shards must be >= 1, got num_shards=0", dali_parts),
    DaliCase(DI, "`index_name=3`", lambda d: iterator_of(d, index_name=3), TypeError, "index_name must be a str, got int 3", dali_parts),
    DaliCase(DI, "`output_map=\"xy\"` (a str, not a list of names)", lambda d: iterator_of(d, "xy"), TypeError, "output_map must be a sequence of names, one per pipeline output, got str 'xy'", dali_parts),
    DaliCase(DI, "`output_map` naming 1 of 2 outputs", lambda d: iterator_of(d, ["data"]), ValueError, "the pipeline has 2 outputs but output_map names 1: ['data']", dali_parts),
    DaliCase(DI, "a Pruner of 10 samples for a source of 20", lambda d: iterator_of(DaliParts(gp.Pruner(10, keep=0.5), d.source, d.pipe)), ValueError, "the pruner plans 10 samples but the source holds 20", dali_parts),
    DaliCase("PrunedDALIIterator.set_epoch", "an epoch beyond `num_epochs`", lambda it: it.set_epoch(6), ValueError, "epoch must be <= 5 (epochs count from 0; the schedule has num_epochs=6), got epoch=6", dali_iterator),
    DaliCase("PrunedDALIIterator.set_epoch", "`epoch=\"2\"`", lambda it: it.set_epoch("2"), TypeError, "epoch must be an int, got str '2'", dali_iterator),
    DaliCase("PrunedDALIIterator.set_epoch", "an epoch before the Pruner's current plan", lambda it: it.set_epoch(0), ValueError, "epoch must not go back: plan(0) after plan(1)", dali_iterator),
    DaliCase("PrunedDALIIterator.load_state_dict", "not a dict", lambda it: it.load_state_dict([1, 4]), TypeError, "state must be a dict from PrunedDALIIterator.state_dict(), got list", dali_iterator),
    DaliCase("PrunedDALIIterator.load_state_dict", "entries missing", lambda it: it.load_state_dict({"epoch": 1, "batch": 2}), ValueError, "state_dict is missing ['consumed', 'num_replicas', 'drop_last']", dali_iterator),
    DaliCase("PrunedDALIIterator.load_state_dict", "an unknown key (a state of another object)", lambda it: it.load_state_dict({**position(), "iteration": 2}), ValueError, "state_dict has unknown keys ['iteration']", dali_iterator),
    DaliCase("PrunedDALIIterator.load_state_dict", "an epoch beyond `num_epochs`", lambda it: it.load_state_dict(position(epoch=9)), ValueError, "state_dict['epoch'] must be <= 5 (epochs count from 0; the schedule has num_epochs=6), got state_dict['epoch']=9", dali_iterator),
    DaliCase("PrunedDALIIterator.load_state_dict", "`consumed` beyond this rank's share of the epoch", lambda it: it.load_state_dict(position(consumed=11)), ValueError, "state_dict['consumed']=11 is more than the 10 samples this rank's share of epoch 1 holds", dali_iterator),
    DaliCase("PrunedDALIIterator.load_state_dict", "a mid-epoch state from another world size", lambda it: it.load_state_dict(position(num_replicas=2)), ValueError, "a mid-epoch state saved with num_replicas=2, drop_last=False cannot resume with num_replicas=1, drop_last=False", dali_iterator),
    DaliCase("build_iterator", "`batch_size=0`", lambda d: build(d, batch_size=0), ValueError, "batch_size must be >= 1, got batch_size=0", unbound_parts),
    DaliCase("build_iterator", "`shuffle=\"no\"` (checked after the source joined the pipeline)", lambda d: build(d, shuffle="no"), TypeError, "shuffle must be a bool, got str 'no'", unbound_parts),
    DaliCase("build_iterator", "`enable_checkpointing=True`", lambda d: build(d, enable_checkpointing=True), ValueError, CHECKPOINT_MESSAGE, unbound_parts),
    DaliCase("build_iterator", "`device_id=\"cpu\"`", lambda d: build(d, device_id="cpu"), TypeError, "device_id must be an int (a GPU) or None (CPU only), got str 'cpu'", unbound_parts),
    DaliCase("build_iterator", "a `define_graph` returning no DataNode", lambda d: build(d, lambda images, labels: 3), TypeError, "define_graph must return a DataNode or a tuple/list of DataNodes, got int", unbound_parts),
    DaliCase("ArraySource(...)", "no arrays", lambda _: dali().ArraySource(), ValueError, "ArraySource needs at least one array"),
    DaliCase("ArraySource(...)", "arrays of different lengths", lambda _: dali().ArraySource(DX, DY[:3]), ValueError, "arrays must share their first dimension, got lengths [3, 20]"),
    DaliCase("ArraySource(...)", "a layout of the wrong rank", lambda _: dali().ArraySource(DX, DY, layouts=("HW", None)), ValueError, "layout 'HW' does not match samples of shape (2, 2, 1)"),
    DaliCase("ArraySource(...)", "`parallel=\"yes\"`", lambda _: dali().ArraySource(DX, parallel="yes"), TypeError, "parallel must be a bool, got str 'yes'"),
    DaliCase("ArraySource(...)", "`layouts=3`", lambda _: dali().ArraySource(DX, layouts=3), TypeError, "layouts must be a str, a list of str/None or None, got int 3"),
    DaliCase("GpuArraySource(...)", "host (numpy) arrays", lambda _: dali().GpuArraySource(DX, DY), TypeError, "GpuArraySource needs arrays on the GPU, but arrays [0, 1] are on the host"),
    DaliCase("FileSource(...)", "both `files` and `file_root`", lambda d: dali().FileSource(image_files(d), file_root=d), ValueError, "give files (and arrays) or file_root, not both", "images"),
    DaliCase("FileSource(...)", "a `file_root` without class folders", lambda d: dali().FileSource(file_root=d / "cat"), ValueError, "in the subdirectories of file_root=", "images"),
    DaliCase("FileSource(...)", "`file_filters=3`", lambda d: dali().FileSource(file_root=d, file_filters=3), TypeError, "file_filters must be a str or a list of str, got int 3", "images"),
    DaliCase("FileSource(...)", "`None` among the files", lambda d: dali().FileSource([*image_files(d), None]), TypeError, "files must hold str paths, got NoneType None", "images"),
    DaliCase("FileSource(...)", "2 labels for 3 files", lambda d: dali().FileSource(image_files(d), np.arange(2)), ValueError, "arrays[0] has 2 entries for 3 files", "images"),
    DaliCase("FileSource(...)", "`on_error=\"skip\"` with `verify=False`", lambda d: dali().FileSource(image_files(d), on_error="skip", verify=False), ValueError, "on_error='skip' needs verify=True", "images"),
    DaliCase("CallbackSource(...)", "`callback=3`", lambda _: dali().CallbackSource(3, N, dtype=np.uint8, ndim=3), TypeError, "callback must be callable, got int"),
    DaliCase("CallbackSource(...)", "2 dtypes, 1 ndim", lambda _: dali().CallbackSource(lambda i, e: i, N, dtype=[np.uint8, np.int64], ndim=[3]), ValueError, "dtype and ndim must have one entry per output"),
    DaliCase("CallbackSource(...)", "`ndim=1.5`", lambda _: dali().CallbackSource(lambda i, e: i, N, dtype=np.uint8, ndim=1.5), TypeError, "ndim must be an int, got float 1.5"),
    DaliCase("CallbackSource(...)", "`dtype=\"pixels\"`", lambda _: dali().CallbackSource(lambda i, e: i, N, dtype="pixels", ndim=3), TypeError, "dtype must be a DALI type or a numpy dtype (one per output), got 'pixels'"),
    DaliCase("CallbackSource(...)", "`layout=\"HW\"` with `ndim=3`", lambda _: dali().CallbackSource(lambda i, e: i, N, dtype=np.uint8, ndim=3, layout="HW"), ValueError, "layout 'HW' does not match ndim=3"),
]


# ---------------------------------------------------------------- state snapshots
def snapshot(obj) -> Any:
    """Everything that could change, as plain values and cloned tensors."""
    if obj is None:
        return None
    if isinstance(obj, gp.Pruner):
        return {"state": obj.state_dict(), "plan_object": id(obj.current_plan), "k": obj.k,
                "history": obj.history}
    if isinstance(obj, gp.LossStats):
        return {"state": obj.state_dict()}
    if isinstance(obj, gp.PrunedSampler):
        # the position (epoch, consumed, world size, drop_last), the shard, the order and what the
        # next pass yields, all through the public API (len raises for an overrun position:
        # one loaded while the epoch's size was unknown)
        try:
            remaining = len(obj)
        except ValueError as e:
            remaining = str(e)
        return {"position": obj.state_dict(consumed=0), "rank": obj.rank, "shuffle": obj.shuffle,
                "len": remaining, "pruner": snapshot(obj.pruner)}
    if isinstance(obj, gp.ForgettingTracker):
        return [obj.prev.clone(), obj.learned.clone(), obj.forgotten.clone()]
    if isinstance(obj, torch.nn.Module):
        return {"training": obj.training, "params": {k: v.clone() for k, v in obj.state_dict().items()}}
    if isinstance(obj, Path):
        return {str(p.relative_to(obj)): (p.read_bytes() if p.is_file() else stat.S_IFMT(p.stat().st_mode))
                for p in sorted(obj.rglob("*"))}
    if isinstance(obj, DaliParts):
        # the pipeline may be built by a refused iterator (DALI's iterator builds it first too);
        # test_dali_subjects_still_work_after_the_errors shows it still serves a corrected one
        return {"pruner": snapshot(obj.pruner), "source": snapshot(obj.source)}
    d = sys.modules.get("gpuprune.dali")     # imported if obj is one of its objects
    if d is not None and isinstance(obj, d.PlanSource):
        # bound to a pipeline or not; what it found bad
        return {"batch_size": obj.batch_size, "bad": obj.bad_samples}
    if d is not None and isinstance(obj, d.PrunedDALIIterator):
        # public state only; test_dali_subjects_still_work_after_the_errors compares what it serves
        # afterwards with an untouched twin
        return {"position": obj.state_dict(), "epoch": obj.epoch, "len": len(obj), "size": obj.size,
                "plan": obj.plan().indices.clone(), "bad": obj.bad_samples,
                "pruner": snapshot(obj.pruner), "source": snapshot(obj.source)}
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


TMP_SUBJECTS = {"dir": checkpoint_dir, "images": image_dir}


@pytest.mark.parametrize("case", [pytest.param(c, marks=needs_dali) if c.dali else c for c in CASES],
                         ids=[case_id(c) for c in CASES])
def test_bad_input_raises_clearly_and_changes_nothing(case, tmp_path):
    subject = (TMP_SUBJECTS[case.subject](tmp_path) if isinstance(case.subject, str)
               else case.subject())
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


def batches(it) -> list[dict]:
    return [{k: v.clone() for k, v in b.items()} for (b,) in it]


@needs_dali
def test_dali_subjects_still_work_after_the_errors():
    """After every rejected call the mid-epoch iterator serves exactly what an untouched twin
    serves (the rest of epoch 1, then epoch 2); parts whose iterator was refused, and
    a source whose build_iterator failed, make a working iterator on the next, corrected call."""
    it, twin = dali_iterator(), dali_iterator()
    for case in CASES:
        if case.subject is dali_iterator:
            with pytest.raises(case.exc):
                case.call(it)
    for epoch in (1, 2):
        it.set_epoch(epoch)
        twin.set_epoch(epoch)
        got, want = batches(it), batches(twin)
        assert [len(b["index"]) for b in got] == ([4, 2] if epoch == 1 else [4, 4, 2])
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            assert np.array_equal(a["data"].numpy(), DX[a["index"].numpy()])
    for case in CASES:
        if case.subject in (dali_parts, unbound_parts):
            parts = case.subject()
            with pytest.raises(case.exc):
                case.call(parts)
            fixed = iterator_of(parts) if parts.pipe is not None else build(parts)
            fixed.set_epoch(0)
            ids = torch.cat([b["index"] for b in batches(fixed)])
            assert torch.equal(ids, parts.pruner.plan(0).indices.long()), case_id(case)


def test_nonfinite_losses_are_not_errors_but_are_counted():
    """Documented in docs/errors.md: NaN/inf losses are skipped by the statistics, not rejected."""
    p = trained_pruner("ucb")
    before = p.stats.state_dict()
    loss = torch.tensor([float("nan"), float("inf"), 2.0])
    out = p.observe(IDX, loss)
    assert out.isnan()                                      # the training loop still sees it
    after = p.stats.state_dict()
    assert int(after["nonfinite"]) == int(before["nonfinite"]) + 2
    changed = (after["mean"] != before["mean"]).nonzero().flatten().tolist()
    assert changed == [2]


def test_policy_setting_hints_name_a_parameter_the_policy_takes():
    """A policy setting given to the Pruner raises with a hint; following the hint must work: the
    class it names takes the parameter it names (0.1's ``static_scores`` is ``Static(scores=)``)."""
    from gpuprune.pruner import _POLICY_SETTINGS
    values = {"epsilon": 0.2, "c": 2.0, "uncertainty": "var", "drift": 0.5, "ratio": 0.3, "rescale": False,
              "delta": 0.5, "min_keep": 0.2, "scores": torch.rand(N), "static_scores": torch.rand(N)}
    assert set(_POLICY_SETTINGS) == set(values)      # every constructor parameter, and 0.1's name
    for name, value in values.items():
        with pytest.raises(TypeError) as err:
            gp.Pruner(N, num_epochs=4, **{name: value})
        hint = re.search(r"; it is a setting of the policy: pass policy=gpuprune\.(\w+)\((\w+)=\.\.\.\)$",
                         str(err.value))
        assert hint is not None, str(err.value)
        cls, param = hint.groups()
        policy = getattr(gp, cls)(**{param: value})
        assert gp.Pruner(N, num_epochs=4, policy=policy).policy.config()[param] is not None


def test_every_entry_point_has_a_case():
    entries = {c.entry for c in CASES}
    for name in ("Pruner(...)", "Pruner.plan", "Pruner.observe", "Pruner.load_state_dict",
                 "Pruner.load_state_dict(extend=True)",
                 "LossStats(...)", "LossStats.load_state_dict", "Schedule(...)",
                 "Schedule.total_steps", "Pruner.total_steps", "PrunedSampler", "PrunedSampler.set_epoch",
                 "PrunedSampler.state_dict", "PrunedSampler.load_state_dict", "IndexedDataset",
                 "Static", "EpsilonGreedy", "UCB", "InfoBatch", "plan.shard_indices", "el2n_scores",
                 "ForgettingTracker.update", "save_checkpoint", "load_checkpoint",
                 "PrunedDALIIterator(...)", "PrunedDALIIterator.set_epoch",
                 "PrunedDALIIterator.load_state_dict", "build_iterator", "ArraySource(...)",
                 "GpuArraySource(...)",
                 "FileSource(...)", "CallbackSource(...)"):
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
