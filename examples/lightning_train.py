"""PyTorch Lightning with dynamic data pruning, on one device or several (DDP).

    python examples/lightning_train.py                          # one CPU device
    python examples/lightning_train.py --devices 2              # DDP, 2 processes (gloo on CPU)
    python examples/lightning_train.py --accelerator gpu --devices 8 --policy infobatch

A small MLP on Fashion-MNIST (the Debian package ``dataset-fashion-mnist``; scikit-learn's digits
when it is missing). The lines that differ from a plain Lightning script are marked ``# gpuprune``:
the Pruner made in ``setup()`` (Lightning starts the process group inside ``trainer.fit``), the
index-returning dataset and the pruner's sampler, ``pruner.observe`` in ``training_step``, the
scheduler sized with ``stepping_batches`` instead of ``trainer.estimated_stepping_batches``, and
``PruningCallback``. See docs/integrations.md.

``--record DIR`` writes ``DIR/rank<r>.json`` per rank: the sample ids each training step received,
per epoch, each epoch's plan, and the optimizer and scheduler step counts (the tests read it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import gpuprune
from gpuprune.data import load_dataset
from gpuprune.integrations.lightning import PruningCallback, stepping_batches   # gpuprune


def train_set(limit: int) -> TensorDataset:
    """The first ``limit`` training images as flat floats in [0, 1], and their labels."""
    data = load_dataset("auto")
    x = data.x_train[:limit].flatten(1).float().div_(255)
    return TensorDataset(x, data.y_train[:limit])


class Classifier(L.LightningModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.data = train_set(args.limit)
        self.net = nn.Sequential(nn.Linear(self.data.tensors[0].shape[1], 64), nn.ReLU(),
                                 nn.Linear(64, 10))
        self.received: dict[int, list[int]] = {}     # epoch -> sample ids training_step got
        self.plans: dict[int, list[int]] = {}

    def setup(self, stage: str) -> None:
        a = self.args                                                     # gpuprune
        self.pruner = gpuprune.Pruner(len(self.data), keep=a.keep, policy=a.policy,
                                      num_epochs=a.epochs, warmup_epochs=a.warmup_epochs,
                                      seed=a.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(gpuprune.IndexedDataset(self.data), batch_size=self.args.batch_size,  # gpuprune
                          sampler=self.pruner.sampler())                                      # gpuprune

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, idx = batch                                                 # gpuprune: + idx
        self.received.setdefault(self.current_epoch, []).extend(idx.tolist())
        loss = self.pruner.observe(idx, F.cross_entropy(self.net(x), y, reduction="none"))  # gpuprune
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.plans[self.current_epoch] = self.pruner.current_plan.indices.tolist()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.args.lr, momentum=0.9)
        steps = stepping_batches(self.trainer, self.pruner, self.args.batch_size)  # gpuprune
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.args.lr, total_steps=steps)
        return [opt], [{"scheduler": sched, "interval": "step"}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=6000, help="train on the first LIMIT images")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--policy", default="ucb", choices=sorted(gpuprune.POLICIES))
    ap.add_argument("--warmup-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64, help="per device")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--record", type=Path, help="write what each rank trained to RECORD/rank<r>.json")
    args = ap.parse_args()

    L.seed_everything(args.seed, verbose=False)
    model = Classifier(args)
    trainer = L.Trainer(accelerator=args.accelerator, devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto", max_epochs=args.epochs,
                        callbacks=[PruningCallback()],                               # gpuprune
                        logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model)
    sched = trainer.lr_scheduler_configs[0].scheduler
    if trainer.is_global_zero:
        print(f"{trainer.world_size} rank(s): {trainer.global_step} optimizer steps on each, "
              f"scheduler {sched.last_epoch} of {sched.total_steps}; trained per epoch on rank 0: "
              f"{[len(model.received[e]) for e in sorted(model.received)]} samples", flush=True)
    if args.record is not None:
        args.record.mkdir(parents=True, exist_ok=True)
        (args.record / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "rank": trainer.global_rank, "world_size": trainer.world_size,
            "num_samples": len(model.data), "received": model.received, "plans": model.plans,
            "optimizer_steps": trainer.global_step, "scheduler_steps": sched.last_epoch,
            "scheduler_total": sched.total_steps,
            "history_epochs": [h["epoch"] for h in model.pruner.history]}))


if __name__ == "__main__":
    main()
