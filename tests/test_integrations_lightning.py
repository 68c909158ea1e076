"""PyTorch Lightning (the ``lightning`` package from PyPI), one CPU device and DDP over 2 gloo ranks.

Each finding of issue 19 is first reproduced on a path that bypasses the glue (a user's own
sampler around gpuprune's, a scheduler sized with ``trainer.estimated_stepping_batches``, no
callback), then shown fixed by ``sampler=pruner.sampler()`` + ``PruningCallback`` +
``stepping_batches``. What was trained is what ``training_step`` received.

DDP runs use Lightning's own launcher (``strategy="ddp"`` re-runs the script for rank 1): this file
is that script with ``--worker``, and ``examples/lightning_train.py`` is run as users run it.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset

import lightning as L

import gpuprune
from gpuprune.data import load_dataset
from gpuprune.integrations.lightning import PruningCallback, stepping_batches

sys.path.insert(0, str(Path(__file__).resolve().parent))
from integrations_support import (EXAMPLES, assert_trained_exact_shards,  # noqa: E402
                                  coverage_warnings, dataset_size, read_records, run_script,
                                  shard, short_warning)

BATCH = 64


def data(limit: int) -> TensorDataset:
    d = load_dataset("auto")
    return TensorDataset(d.x_train[:limit].flatten(1).float().div_(255), d.y_train[:limit])


class UserSampler(Sampler[int]):
    """A user's own sampler around gpuprune's (as gpuprune 0.2's PrunedSampler was): not a
    DistributedSampler, so Lightning's DDP shards it again."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __iter__(self):
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)


class Probe(L.LightningModule):
    """A LightningModule that records what training_step received, each epoch's plan, the
    validation passes and its scheduler; the knobs choose the glue or the path around it."""

    def __init__(self, num_samples: int, *, epochs: int = 3, warmup: int = 0, final_full=None,
                 wrap: bool = False, size_with: str = "stepping_batches", validate: bool = False,
                 policy: str = "uniform") -> None:
        super().__init__()
        self.data = data(num_samples)
        self.cfg = dict(epochs=epochs, warmup=warmup, final_full=final_full, wrap=wrap,
                        size_with=size_with, validate=validate, policy=policy)
        self.net = nn.Sequential(nn.Linear(self.data.tensors[0].shape[1], 16), nn.ReLU(),
                                 nn.Linear(16, 10))
        self.received: dict[int, list[int]] = {}
        self.plans: dict[int, list[int]] = {}
        self.validated: list[int] = []
        self.coverage: list[str] = []            # the CoverageWarnings of the run (see fit)

    def setup(self, stage: str) -> None:
        c = self.cfg
        self.pruner = gpuprune.Pruner(len(self.data), keep=0.5, policy=c["policy"],
                                      num_epochs=c["epochs"], warmup_epochs=c["warmup"],
                                      final_full_epochs=c["final_full"], seed=3)
        if not self.pruner.schedule.exact_size:
            self.pruner.plan(0)          # InfoBatch: epoch 0's length is known once planned

    def train_dataloader(self):
        sampler = self.pruner.sampler()
        return DataLoader(gpuprune.IndexedDataset(self.data), batch_size=BATCH,
                          sampler=UserSampler(sampler) if self.cfg["wrap"] else sampler)

    def val_dataloader(self):
        if not self.cfg["validate"]:
            return []
        return DataLoader(TensorDataset(*(t[:BATCH] for t in self.data.tensors)), batch_size=BATCH)

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.received.setdefault(self.current_epoch, []).extend(idx.tolist())
        return self.pruner.observe(idx, F.cross_entropy(self.net(x), y, reduction="none"))

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated.append(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        self.plans[self.current_epoch] = self.pruner.current_plan.indices.tolist()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05)
        if self.cfg["size_with"] == "estimate":        # the usual Lightning way
            self.estimate = self.trainer.estimated_stepping_batches
            total = self.estimate
        else:
            total = stepping_batches(self.trainer, self.pruner, BATCH,
                                     upper_bound=not self.pruner.schedule.exact_size)
        sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=total)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    def record(self, trainer: L.Trainer) -> dict:
        sched = trainer.lr_scheduler_configs[0].scheduler
        return {"rank": trainer.global_rank, "world_size": trainer.world_size,
                "received": self.received, "plans": self.plans, "validated": self.validated,
                "optimizer_steps": trainer.global_step, "scheduler_steps": sched.last_epoch,
                "scheduler_total": sched.total_iters, "history": len(self.pruner.history),
                "coverage": self.coverage}


def fit(model: Probe, *, callback: bool, devices: int = 1) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", max_epochs=model.cfg["epochs"],
                        callbacks=[PruningCallback()] if callback else [], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")                      # Lightning's own advice
        warnings.simplefilter("always", gpuprune.CoverageWarning)
        trainer.fit(model)
    model.coverage = coverage_warnings(caught)
    return trainer


def num_samples() -> int:
    return dataset_size(6000)


# ------------------------------------------------------------------ DDP worker (this file as script)
def worker(out: Path, n: int) -> None:
    """Lightning DDP, 2 ranks: a user's sampler around gpuprune's under the default Trainer, the
    scheduler sized with the estimate (the finding)."""
    model = Probe(n, wrap=True, size_with="estimate")
    trainer = fit(model, callback=False, devices=2)
    (out / f"wrapped{trainer.global_rank}.json").write_text(json.dumps(model.record(trainer)))


@pytest.mark.slow
def test_ddp_default_trainer_shards_a_plain_sampler_again(tmp_path):
    """Finding: under DDP with the default Trainer, a sampler that is not a DistributedSampler is
    wrapped in Lightning's DistributedSamplerWrapper and sharded again: each rank trains half its
    shard (250 of 500 at N=2000) and the scheduler, sized by Lightning's estimate, half the steps
    the plans call for (12 of 24). Now loud: each rank warns once, when epoch 1 is planned, that
    it trained 250 of its 500 samples. (PrunedSampler is a DistributedSampler: the example
    below.)"""
    n = min(2000, num_samples())
    run_script([__file__, "--worker", str(tmp_path), str(n)], timeout=180)
    records = [json.loads((tmp_path / f"wrapped{r}.json").read_text()) for r in range(2)]
    per_rank = -(-(n // 2) // 2)              # ceil(k / 2) planned per rank, k = N / 2
    batches = -(-per_rank // BATCH)
    for rec in records:
        for epoch in range(3):
            plan = rec["plans"][str(epoch)]
            mine = shard(plan, rec["rank"], 2)
            got = rec["received"][str(epoch)]
            assert len(mine) == per_rank and len(got) == -(-per_rank // 2)   # half, not all
            assert set(got) < set(mine)
        steps = rec["optimizer_steps"]
        assert steps == rec["scheduler_steps"] == rec["scheduler_total"] == 3 * -(-batches // 2)
        assert 2 * steps == 3 * batches                  # the plans call for twice as many
        assert rec["coverage"] == [short_warning(rec["rank"], -(-per_rank // 2), per_rank, 0)]
        if n == 2000:
            assert (len(got), len(mine), steps, 3 * batches) == (250, 500, 12, 24)
            assert rec["coverage"][0].startswith(f"gpuprune: rank {rec['rank']} trained 250 of "
                                                 f"the 500 samples planned for it in epoch 0 (50%)")


def test_callback_refuses_a_sampler_lightning_sharded_again():
    """The loader Lightning's DDP makes of a user's sampler (its own DistributedSamplerWrapper, built
    here on one device as Lightning builds it on each rank) is refused with the fix."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    class Resharded(Probe):
        def train_dataloader(self):
            loader = super().train_dataloader()
            return DataLoader(loader.dataset, batch_size=BATCH, sampler=DistributedSamplerWrapper(
                loader.sampler, num_replicas=2, rank=0, shuffle=True))

    model = Resharded(200, wrap=True)
    with pytest.raises(ValueError, match=r"Lightning wrapped the loader's sampler in its "
                                         r"DistributedSamplerWrapper.*Pass sampler=pruner.sampler"
                                         r"\(\) itself"):
        fit(model, callback=True)
    assert model.received == {}


@pytest.mark.slow
def test_ddp_example_trains_every_shard_exactly(tmp_path):
    """examples/lightning_train.py under DDP (2 ranks, Lightning's launcher, default Trainer
    settings): every rank trains exactly its shard of each epoch's plan, the OneCycleLR scheduler
    gets exactly the optimizer steps that run, and set_epoch planned every epoch from 0."""
    n = min(2000, num_samples())
    run_script([str(EXAMPLES / "lightning_train.py"), "--devices", "2", "--limit", str(n),
                "--policy", "ucb", "--warmup-epochs", "1", "--record", str(tmp_path)], timeout=180)
    records = read_records(tmp_path, 2)
    assert_trained_exact_shards(records, epochs=3)
    full, pruned = -(-n // 2), -(-(n // 2) // 2)
    steps = -(-full // BATCH) + 2 * -(-pruned // BATCH)
    for rec in records:
        assert [len(rec["plans"][e]) for e in range(3)] == [n, n // 2, n // 2]
        assert rec["optimizer_steps"] == rec["scheduler_steps"] == rec["scheduler_total"] == steps
        assert rec["history_epochs"] == [0, 1, 2]


@pytest.mark.slow
def test_single_device_estimate_and_validation_reproduced_then_fixed():
    """Finding: one device, warm-up epoch then pruned epochs: Lightning's estimate counts epoch 0's
    batches for every epoch (282 where 188 run, at N=6000), and validation, due at epoch 0's last
    batch index, never runs in the shorter pruned epochs. With the glue: 188 scheduler steps,
    validation every epoch; a scheduler still sized with the estimate is refused."""
    n = num_samples()
    full, pruned = -(-n // BATCH), -(-(n // 2) // BATCH)
    model = Probe(n, warmup=1, size_with="estimate", validate=True)
    trainer = fit(model, callback=False)
    assert model.estimate == 3 * full                             # 282 at N=6000
    assert trainer.global_step == full + 2 * pruned               # 188 at N=6000
    assert model.record(trainer)["scheduler_steps"] == full + 2 * pruned < model.estimate
    assert model.validated == [0]                                 # epochs 1 and 2 not validated
    assert model.coverage == []                       # every planned sample was trained
    if n == 6000:
        assert (model.estimate, trainer.global_step) == (282, 188)

    with pytest.raises(ValueError, match=r"LinearLR.total_iters=\d+ is Lightning's trainer."
                                         r"estimated_stepping_batches") as err:
        fit(Probe(n, warmup=1, size_with="estimate", validate=True), callback=True)
    assert f"= {full + 2 * pruned}" in str(err.value)

    model = Probe(n, warmup=1, validate=True)
    trainer = fit(model, callback=True)
    rec = model.record(trainer)
    assert_trained_exact_shards([rec], epochs=3)
    assert rec["optimizer_steps"] == rec["scheduler_steps"] == rec["scheduler_total"] \
        == full + 2 * pruned
    assert model.validated == [0, 1, 2]
    assert rec["history"] == 3 and rec["coverage"] == []


def test_epochs_longer_than_the_first_are_cut_without_the_callback():
    """Finding: Lightning keeps epoch 0's batch count as every epoch's limit, so the final
    full-data epochs after pruned ones are cut to the pruned size (512 of 1000 samples at
    N=1000). Now loud: the guard warns when epoch 3 is planned, naming PruningCallback (the
    run's last epoch is not checked: nothing plans after it). With PruningCallback every epoch
    runs whole and nothing warns."""
    n = min(1000, num_samples())
    model = Probe(n, epochs=4, final_full=2)
    fit(model, callback=False)
    pruned = -(-(n // 2) // BATCH)
    assert len(model.plans[2]) == len(model.plans[3]) == n
    for epoch in (2, 3):                                          # cut at epoch 0's batch count
        assert len(model.received[epoch]) == pruned * BATCH < n
    assert model.coverage == [short_warning(0, pruned * BATCH, n, 2)]
    assert "without gpuprune.integrations.lightning.PruningCallback" in model.coverage[0]

    model = Probe(n, epochs=4, final_full=2)
    trainer = fit(model, callback=True)
    assert_trained_exact_shards([model.record(trainer)], epochs=4)
    assert trainer.global_step == 2 * pruned + 2 * -(-n // BATCH)
    assert model.coverage == []


def test_infobatch_epochs_of_every_size_are_trained_whole():
    """InfoBatch (loss-dependent epoch sizes: epoch 0 keeps all, as no loss is below the mean yet;
    epoch 1 pruned; full data from epoch 2 of 3) with the recipe's plan(0) in setup(): each epoch
    trains exactly its plan."""
    n = min(1000, num_samples())
    model = Probe(n, policy="infobatch")
    trainer = fit(model, callback=True)
    rec = model.record(trainer)
    assert_trained_exact_shards([rec], epochs=3)
    sizes = [len(model.plans[e]) for e in range(3)]
    assert sizes[0] == sizes[2] == n and sizes[1] < n
    assert trainer.global_step == sum(-(-size // BATCH) for size in sizes)
    assert model.coverage == []


def test_max_epochs_must_fit_the_schedule():
    model = Probe(200, epochs=3)
    trainer = L.Trainer(accelerator="cpu", max_epochs=4, callbacks=[PruningCallback()],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(ValueError, match=r"Trainer\(max_epochs=4\) is more than the pruner's "
                                         r"num_epochs=3: epoch 3 has no plan"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model)
    assert model.received == {}                                   # refused before any step


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2, required=True, metavar=("OUT", "N"))
    a = ap.parse_args()
    worker(Path(a.worker[0]), int(a.worker[1]))
