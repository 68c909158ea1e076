"""Issue 19's findings outside the frameworks: each reproduced, then shown loud; and the
optional package.

A loop without ``set_epoch`` still trains epoch 0's plan every epoch, and a 1-based loop still
skips epoch 0: gpuprune cannot change the loop, but the coverage guard (gpuprune/guard.py) now
warns at the first wrong pass or plan, naming the cause and the fix. Extending a run is refused
with the way to do it, ``load_state_dict(state, extend=True)`` (tests/test_extend.py). The
frameworks' loops are not affected: Lightning, accelerate's prepared loader and the Hugging Face
Trainer call ``set_epoch`` from 0 by themselves (the example tests assert the plans of epochs 0, 1,
2), shown here for accelerate's loader in a loop that never calls it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import gpuprune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from integrations_support import (again_on_observe, again_on_pass,  # noqa: E402
                                  coverage_warnings)

N, EPOCHS = 200, 3


def loader_of(pruner: gpuprune.Pruner) -> DataLoader:
    data = gpuprune.IndexedDataset(TensorDataset(torch.zeros(N, 1)))
    return DataLoader(data, batch_size=16, sampler=pruner.sampler())


def received(loader, epochs, pruner=None) -> list[list[int]]:
    """The ids of each epoch's pass (observed with ``pruner`` when given, as a training loop)."""
    out = []
    for _ in epochs:
        ids = []
        for _, idx in loader:
            if pruner is not None:
                pruner.observe(idx, torch.ones(len(idx)))
            ids += idx.tolist()
        out.append(ids)
    return out


def test_a_loop_without_set_epoch_trains_epoch_0_every_epoch_and_warns():
    pruner = gpuprune.Pruner(N, keep=0.5, policy="uniform", num_epochs=EPOCHS, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", gpuprune.CoverageWarning)
        got = received(loader_of(pruner), range(EPOCHS), pruner)
    assert got[0] == got[1] == got[2] and len(got[0]) == N // 2      # the same half, 3 times
    assert [h["epoch"] for h in pruner.history] == [0]               # one plan for three epochs
    assert coverage_warnings(caught) == [again_on_pass(0, 0)]        # at the second pass, once


def test_accelerates_loader_calls_set_epoch_itself():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from gpuprune.integrations.accelerate import prepare_data_loader
    try:
        accelerator = Accelerator(cpu=True)
        pruner = gpuprune.Pruner(N, keep=0.5, policy="uniform", num_epochs=EPOCHS, seed=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", gpuprune.CoverageWarning)
            got = received(prepare_data_loader(accelerator, loader_of(pruner)), range(EPOCHS),
                           pruner)
    finally:
        AcceleratorState._reset_state(True)
    assert [h["epoch"] for h in pruner.history] == [0, 1, 2]
    assert len({tuple(ids) for ids in got}) == 3                     # a new subset each epoch
    assert coverage_warnings(caught) == []


def test_accelerates_loader_after_a_break_serves_the_same_epoch_again_and_warns():
    """accelerate's prepared loader counts a pass only when it ends (DataLoaderShard.iteration),
    so after a break its next pass calls set_epoch(0) again and trains epoch 0's plan again: the
    guard warns once the count passes the plan (100) by more than a batch (16): 32 + 96 = 128."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from gpuprune.integrations.accelerate import prepare_data_loader
    try:
        accelerator = Accelerator(cpu=True)
        pruner = gpuprune.Pruner(N, keep=0.5, policy="uniform", num_epochs=EPOCHS, seed=1)
        loader = prepare_data_loader(accelerator, loader_of(pruner))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", gpuprune.CoverageWarning)
            for i, (_, idx) in enumerate(loader):            # "epoch 0": a break after 2 batches
                pruner.observe(idx, torch.ones(len(idx)))
                if i == 1:
                    break
            plan0 = pruner.current_plan.indices.tolist()
            got = received(loader, range(2), pruner)         # "epochs 1 and 2"
    finally:
        AcceleratorState._reset_state(True)
    assert [h["epoch"] for h in pruner.history] == [0, 1]    # the second pass was epoch 0 again
    assert got[0] == plan0 and got[1] != plan0
    assert coverage_warnings(caught) == [again_on_observe(0, 128, 0, 100)]


def test_a_one_based_loop_skips_the_warmup_warns_at_once_and_fails_at_its_last_epoch():
    pruner = gpuprune.Pruner(N, keep=0.5, policy="uniform", num_epochs=EPOCHS, warmup_epochs=1)
    sampler = pruner.sampler()
    with pytest.warns(gpuprune.CoverageWarning) as caught:
        for epoch in range(1, EPOCHS):
            sampler.set_epoch(epoch)
    assert [str(w.message) for w in caught] == [
        "gpuprune: the first epoch planned is epoch 1, so epoch 0 is never trained: epochs count "
        "from 0, as with DistributedSampler.set_epoch. A loop `for epoch in range(1, num_epochs + "
        "1)` skips epoch 0 (a full warm-up epoch, if any) and fails at its last epoch: use "
        "range(num_epochs). Resuming? Load the Pruner's state_dict before planning."]
    assert [(h["epoch"], h["full"]) for h in pruner.history] == [(1, False), (2, False)]
    with pytest.raises(ValueError) as err:                          # the full warm-up never ran
        sampler.set_epoch(EPOCHS)
    # the message says that epochs count from 0 (issue 19)
    assert str(err.value) == ("epoch must be <= 2 (epochs count from 0; the schedule has "
                              "num_epochs=3), got epoch=3")


def test_extending_a_run_is_refused_with_the_way_to_do_it():
    short = gpuprune.Pruner(N, keep=0.5, num_epochs=2)
    short.plan(0)
    short.plan(1)
    longer = gpuprune.Pruner(N, keep=0.5, num_epochs=4)
    with pytest.raises(ValueError) as err:
        longer.load_state_dict(short.state_dict())
    assert str(err.value) == (
        "checkpoint was made with schedule.num_epochs=2, this Pruner has schedule.num_epochs=4: "
        "to continue that run for more epochs, load it with pruner.load_state_dict(state, "
        "extend=True) (docs/integrations.md, \"Resume with more epochs\")")
    longer.load_state_dict(short.state_dict(), extend=True)
    assert [h["epoch"] for h in longer.history] == [0, 1]
    assert len(longer.plan(3)) == N // 2                             # epochs 2 and 3 follow


def test_gpuprune_imports_no_framework_and_each_glue_says_what_to_install():
    """``import gpuprune`` (and ``gpuprune.integrations``) loads none of the frameworks; with a
    framework missing, importing its glue raises ImportError naming the package to install."""
    code = textwrap.dedent("""
        import sys
        import gpuprune, gpuprune.integrations
        loaded = [m for m in ("lightning", "pytorch_lightning", "accelerate", "transformers")
                  if m in sys.modules]
        assert not loaded, loaded
        for framework, glue in (("lightning", "lightning"), ("accelerate", "accelerate"),
                                ("transformers", "transformers")):
            sys.modules[framework] = None               # as if it were not installed
            try:
                __import__(f"gpuprune.integrations.{glue}")
            except ImportError as e:
                assert f"needs {framework}: pip install {framework}" in str(e), str(e)
                assert 'gpuprune[integrations]' in str(e), str(e)
            else:
                raise AssertionError(f"gpuprune.integrations.{glue} imported without {framework}")
            del sys.modules[framework]
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_an_old_framework_version_is_refused():
    from gpuprune.integrations._common import _release, require
    assert _release("2.6.6") == (2, 6, 6) and _release("5.0.0rc1") == (5, 0, 0)
    assert _release("2.13.0+cpu") == (2, 13, 0)
    with pytest.raises(ImportError, match=r"needs torch>=99.0, found 2\.13"):
        require("torch", "torch", minimum="99.0")
