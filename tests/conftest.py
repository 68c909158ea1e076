"""Test configuration, and the helpers and fixtures several test modules share.

Under CI (``CI`` set) hypothesis runs a fixed, derandomised set of examples, so a landing never
depends on luck; locally it explores new examples on every run.

Test modules import the helpers with ``from conftest import ...`` (pytest puts tests/ on the path).
The multi-process jobs of tests/dist_jobs.py are shared through the ``launched``/``job`` fixtures.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

import gpuprune as gp
from gpuprune.backend import TorchBackend
from gpuprune.state import state_checksum

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fmnist_images():
    """``take(n)``: the first ``n`` Fashion-MNIST training images, ``(n, 28, 28, 1)`` uint8, read
    once per session from the Debian package dataset-fashion-mnist (the test skips without it)."""
    path = FMNIST / "train-images-idx3-ubyte.gz"
    if not path.exists():
        pytest.skip(f"Fashion-MNIST not found in {FMNIST} (Debian package dataset-fashion-mnist)")
    with gzip.open(path) as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    return lambda n: data[:n].copy()


# ---------------------------------------------------------------- shared helpers
POLICY_NAMES = ["uniform", "epsilon_greedy", "ucb", "infobatch", "static", "full"]


class Stats(gp.LossStats):
    """LossStats plus the backend's update, for hand-computed cases."""

    def __init__(self, n, decay=0.9):
        super().__init__(n)
        self.decay = decay

    def observe(self, ids, losses, epoch=0):
        TorchBackend("cpu").observe_(self.tensors(), ids, losses, self.decay, epoch)


def feed(pruner: gp.Pruner, plan: gp.Plan, seed: int = 0, batch: int = 64) -> None:
    """Observe a deterministic pseudo-random loss for every planned sample."""
    g = torch.Generator().manual_seed(seed * 1000 + plan.epoch)
    n = pruner.num_samples
    losses = torch.rand(n, generator=g) * (1 + torch.arange(n) % 7)
    for i in range(0, len(plan), batch):
        idx = plan.indices[i:i + batch]
        pruner.observe(idx, losses[idx.long()])


def make(policy: str, n: int = 500, keep: float = 0.3, **kw) -> gp.Pruner:
    return gp.Pruner(n, keep=keep, policy=policy, num_epochs=kw.pop("num_epochs", 8), seed=11, **kw)


def top_k_by_score(score, k, seed):
    return TorchBackend("cpu").top_k(score, score.numel(), k, seed).long()


def plan_set(plan: gp.Plan) -> set[int]:
    """A plan's sample ids as a set."""
    return set(plan.indices.tolist())


def edited(state: dict, reseal: bool = True, **changes) -> dict:
    """``state`` with entries replaced and, unless ``reseal=False``, its checksum recomputed, as an
    attacker or a buggy script would: ``a__b=v`` sets ``state["a"]["b"]`` (a callable maps the old
    value, ``KeyError`` deletes the entry). The checks behind the checksum must hold alone."""
    for path, value in changes.items():
        d, keys = state, path.split("__")
        for key in keys[:-1]:
            d = d[key]
        if value is KeyError:
            del d[keys[-1]]
        else:
            d[keys[-1]] = value(d[keys[-1]]) if callable(value) else value
    if reseal and "checksum" in state:
        state["checksum"] = state_checksum(state)
    return state


def set_at(i: int, value):
    """A change for :func:`edited`: a copy of the tensor with entry ``i`` set to ``value``."""
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[i] = value
        return t
    return change


# ---------------------------------------------------------------- multi-process jobs
@pytest.fixture(scope="session")
def launched(tmp_path_factory):
    """world -> the ranks' results of tests/dist_jobs.py's job; each world runs once per session,
    when first needed (test_distributed.py and test_refresh.py share it)."""
    from dist_jobs import launch
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            cache[world] = launch(world, tmp_path_factory.mktemp(f"dist{world}"))
        return cache[world]
    return get


@pytest.fixture(params=[2, pytest.param(4, marks=pytest.mark.slow)], ids=["2ranks", "4ranks"])
def job(request, launched):
    """(world, the ranks' results) for 2 and 4 gloo ranks (4: marked slow, ~20 s to launch)."""
    return request.param, launched(request.param)
