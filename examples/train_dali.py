"""Train a small CNN on Fashion-MNIST through a DALI pipeline, with dynamic data pruning.

The DALI graph (random flips, normalisation) is ordinary user code; the only gpuprune parts are the
source at its start, the iterator, and ``pruner.observe`` on the unreduced loss. The learning rate
follows ``OneCycleLR`` sized with the run's total optimizer steps (``it.total_steps()``): pruned
epochs are shorter than the full warm-up and final epochs.

    python examples/train_dali.py                        # CPU, about a minute on 2 cores
    python examples/train_dali.py --keep 1.0             # the full-data baseline, for comparison
    python examples/train_dali.py --device cuda          # GPU: data on the GPU, DALI on device 0

Data: the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from nvidia.dali import fn, types

import gpuprune as gp
from gpuprune.dali import ArraySource, GpuArraySource, build_iterator

ROOT = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 72.94, 90.0           # training-set pixel mean and (rounded) standard deviation


def load(split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28, 1) uint8 (HWC) and labels (N,) int64."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(ROOT / f"{prefix}-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(ROOT / f"{prefix}-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return x[:limit].copy(), y[:limit].copy()


def augment(images, labels):
    """The user's DALI graph: random horizontal flip, normalise, HWC uint8 -> CHW float."""
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                      mean=[MEAN], std=[STD], mirror=fn.random.coin_flip())
    return images, labels


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)        # 28 -> 14
        x = F.max_pool2d(F.relu(self.c2(x)), 2)        # 14 -> 7
        return self.fc(x.flatten(1))


@torch.no_grad()
def accuracy(model, x: np.ndarray, y: np.ndarray, device) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 1000):
        xb = torch.from_numpy(x[i:i + 1000]).to(device).permute(0, 3, 1, 2).float()
        pred = model((xb - MEAN) / STD).argmax(1).cpu()
        correct += int((pred == torch.from_numpy(y[i:i + 1000])).sum())
    model.train()
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--keep", type=float, default=0.5, help="fraction kept per pruned epoch")
    ap.add_argument("--policy", default="ucb", choices=sorted(gp.POLICIES))
    ap.add_argument("--warmup", type=int, default=1, help="full-data epochs at the start")
    ap.add_argument("--final-full", type=int, default=1, help="full-data epochs at the end")
    ap.add_argument("--samples", type=int, default=20000, help="training samples used (max 60000)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(args.seed)                       # model initialisation only
    x, y = load("train", args.samples)
    x_test, y_test = load("test")
    n = len(x)

    # 1. the pruner (scores live on the training device)
    pruner = gp.Pruner(n, keep=args.keep, policy=args.policy, num_epochs=args.epochs,
                       warmup_epochs=args.warmup if args.keep < 1 else 0,
                       final_full_epochs=(None if args.policy == "infobatch" or args.keep >= 1
                                          else args.final_full), seed=args.seed,
                       device=device)
    # 2. a source at the start of the DALI graph; on a GPU the arrays are gathered there
    if device.type == "cuda":
        source = GpuArraySource(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device),
                                layouts=("HWC", None))
        dali_device = device.index if device.index is not None else torch.cuda.current_device()
    else:
        source = ArraySource(x, y, layouts=("HWC", None))
        dali_device = None
    # 3. the iterator, in place of DALIClassificationIterator
    it = build_iterator(pruner, source, augment, batch_size=args.batch_size, num_threads=2,
                        device_id=dali_device, seed=args.seed)

    model = SmallCNN().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    # 4. a step-based LR schedule sized for the whole run: pruned epochs have fewer steps than
    #    full ones (warm-up, final), so len(it) of the first epoch times the epochs would be wrong.
    #    the Pruner counts them per batch size, drop policy and rank (it.total_steps() is the
    #    same call with the iterator's settings). InfoBatch's pruned epochs depend on the losses:
    #    upper_bound=True counts them full, so the schedule never runs out.
    bound = not pruner.schedule.exact_size
    total_steps = pruner.total_steps(args.batch_size, world_size=it.num_shards, drop_last=False,
                                     upper_bound=bound)
    assert total_steps == it.total_steps(upper_bound=bound)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total_steps)
    seen, steps_done = 0, 0
    start = time.perf_counter()
    print(f"{n} training samples, keep={args.keep}, policy={args.policy}, device={device}, "
          f"{total_steps} optimizer steps in {args.epochs} epochs")
    for epoch in range(args.epochs):
        it.set_epoch(epoch)                             # plans the epoch
        t0, total, count = time.perf_counter(), 0.0, 0
        planned, steps = len(pruner.plan(epoch)), len(it)
        for (batch,) in it:
            data, label = batch["data"].to(device), batch["label"].to(device)
            index = batch["index"].to(device)
            per_sample = F.cross_entropy(model(data), label, reduction="none")
            loss = pruner.observe(index, per_sample)    # records the losses, returns the mean
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps_done += 1
            total += float(loss.detach()) * len(index)
            count += len(index)
        seen += count
        acc = accuracy(model, x_test, y_test, device)
        print(f"epoch {epoch}: {planned:6d} planned / {steps:4d} steps, train loss "
              f"{total / max(count, 1):.4f}, test acc {acc:.4f}, {time.perf_counter() - t0:.1f}s")
    # exact for every policy but InfoBatch, whose total is an upper bound (data-dependent epochs)
    assert steps_done == total_steps or (not pruner.schedule.exact_size and steps_done < total_steps)
    stats = pruner.selection_stats()
    print(f"trained on {seen} samples ({seen / (n * args.epochs):.0%} of full data) in "
          f"{time.perf_counter() - start:.1f}s")
    if stats["rounds"]:
        print(f"over {stats['rounds']} pruned epochs: {stats['always']:.0%} of samples always planned, "
              f"{stats['never']:.0%} never, {stats['sometimes']:.0%} sometimes")


if __name__ == "__main__":
    main()
