"""Hugging Face accelerate with dynamic data pruning, on one process or several.

    python examples/accelerate_train.py                                   # one CPU process
    accelerate launch --num_processes 2 --cpu examples/accelerate_train.py  # 2 processes (gloo)
    torchrun --nproc_per_node=2 examples/accelerate_train.py                # the same, with torchrun

A small MLP on Fashion-MNIST (the Debian package ``dataset-fashion-mnist``; scikit-learn's digits
when it is missing). The lines that differ from accelerate's own example loop are marked
``# gpuprune``: the Pruner (created after the Accelerator, so it shares its process group), the
index-returning dataset and the pruner's sampler, ``prepare_data_loader`` so that
``accelerator.prepare`` does not shard the loader again, the scheduler sized with
``scheduler_steps``, and ``pruner.observe``. Like pytorch/examples' mnist, the loop never calls
``set_epoch``: the prepared loader does. See docs/integrations.md.

``--record DIR`` writes ``DIR/rank<r>.json`` per process: the sample ids each step received, per
epoch, each epoch's plan, and the optimizer and scheduler step counts (the tests read it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

import gpuprune
from gpuprune.data import load_dataset
from gpuprune.integrations.accelerate import prepare_data_loader, scheduler_steps   # gpuprune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=6000, help="train on the first LIMIT images")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--policy", default="ucb", choices=sorted(gpuprune.POLICIES))
    ap.add_argument("--warmup-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--record", type=Path, help="write what each process trained to RECORD/rank<r>.json")
    args = ap.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    data = load_dataset("auto")
    train_set = TensorDataset(data.x_train[:args.limit].flatten(1).float().div_(255),
                              data.y_train[:args.limit])
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(train_set.tensors[0].shape[1], 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    pruner = gpuprune.Pruner(len(train_set), keep=args.keep, policy=args.policy,        # gpuprune
                             num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                             seed=args.seed, device=accelerator.device)
    loader = DataLoader(gpuprune.IndexedDataset(train_set), batch_size=args.batch_size,  # gpuprune
                        sampler=pruner.sampler())                                      # gpuprune
    loader = prepare_data_loader(accelerator, loader)                                  # gpuprune
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=scheduler_steps(accelerator, pruner, args.batch_size))  # gpuprune
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)

    received: dict[int, list[int]] = {}
    plans: dict[int, list[int]] = {}
    steps = 0
    model.train()
    for epoch in range(args.epochs):
        for x, y, idx in loader:                                                       # gpuprune: + idx
            received.setdefault(epoch, []).extend(idx.tolist())
            loss = pruner.observe(idx, F.cross_entropy(model(x), y, reduction="none"))  # gpuprune
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            steps += 1
        plans[epoch] = pruner.current_plan.indices.tolist()
        if accelerator.is_main_process:
            print(f"epoch {epoch}: {len(received[epoch])} samples on process 0, loss "
                  f"{loss.item():.4f}", flush=True)
    inner = sched.scheduler
    if accelerator.is_main_process:
        print(f"{accelerator.num_processes} process(es): {steps} optimizer steps on each, "
              f"scheduler {inner.last_epoch} of {inner.total_steps}", flush=True)
    if args.record is not None:
        args.record.mkdir(parents=True, exist_ok=True)
        (args.record / f"rank{accelerator.process_index}.json").write_text(json.dumps({
            "rank": accelerator.process_index, "world_size": accelerator.num_processes,
            "num_samples": len(train_set), "received": received, "plans": plans,
            "optimizer_steps": steps, "scheduler_steps": inner.last_epoch,
            "scheduler_total": inner.total_steps,
            "history_epochs": [h["epoch"] for h in pruner.history]}))
    accelerator.wait_for_everyone()      # every rank done before the process group ends
    accelerator.end_training()


if __name__ == "__main__":
    main()
