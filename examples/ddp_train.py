"""Data-parallel training with dynamic data pruning, launched with torchrun.

    torchrun --nproc_per_node=2 examples/ddp_train.py                  # CPU: gloo
    torchrun --nproc_per_node=8 examples/ddp_train.py --policy infobatch    # GPUs: NCCL
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
        examples/ddp_train.py                                           # several nodes

Each rank trains a small CNN on its shard of the epoch's plan (Fashion-MNIST from the Debian package
``dataset-fashion-mnist`` at /usr/share/datasets/fashion-mnist, else scikit-learn's digits). The
Pruner is created after ``init_process_group``, so it finds the default group by itself: each
rank observes the losses of its own samples, and once per epoch, before the next plan, the
statistics are all-reduced so that every rank computes the same plan. The changes against a plain
DDP script are marked ``# gpuprune``.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset

import gpuprune

FASHION = Path("/usr/share/datasets/fashion-mnist")


def load_data() -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(name, x_train, y_train, x_test, y_test): float (N, 1, 28, 28) normalised images, int64 labels."""
    if (FASHION / "train-images-idx3-ubyte.gz").exists():
        def idx(name: str, header: int) -> np.ndarray:
            with gzip.open(FASHION / name) as f:
                return np.frombuffer(f.read(), dtype=np.uint8, offset=header)
        xs = [idx(f"{s}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28) for s in ("train", "t10k")]
        ys = [idx(f"{s}-labels-idx1-ubyte.gz", 8).astype(np.int64) for s in ("train", "t10k")]
        x_tr, x_te = (torch.from_numpy(x.copy()).float().div_(255).sub_(0.2860).div_(0.3530)
                      for x in xs)
        return "fashion-mnist", x_tr, torch.from_numpy(ys[0]), x_te, torch.from_numpy(ys[1])
    from sklearn.datasets import load_digits       # 1797 8x8 digits: a small stand-in
    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1).div_(16)
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).sub_(0.3).div_(0.4)
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1500], perm[1500:]
    return "digits", x[tr], y[tr], x[te], y[te]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 10))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int, world: int,
             device: torch.device) -> float:
    """Test accuracy: each rank scores every world-th test image, the counts are all-reduced."""
    model.eval()
    xs, ys = x[rank::world], y[rank::world]
    correct = torch.zeros(2, dtype=torch.int64, device=device)
    for i in range(0, len(ys), 1000):
        pred = model(xs[i:i + 1000].to(device)).argmax(1)
        correct[0] += (pred == ys[i:i + 1000].to(device)).sum()
    correct[1] = len(ys)
    dist.all_reduce(correct)
    model.train()
    return correct[0].item() / correct[1].item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--keep", type=float, default=0.5, help="fraction kept per pruned epoch")
    ap.add_argument("--policy", default="ucb", choices=sorted(gpuprune.POLICIES))
    ap.add_argument("--warmup-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128, help="per rank")
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--limit", type=int, default=0, help="use only the first LIMIT training images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds before a collective waiting for a dead or stalled rank fails")
    ap.add_argument("--checkpoint", type=Path, help="save here at the end of every epoch (rank 0)")
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    # A bounded timeout turns a crashed rank into an error on the others instead of a hang.
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get(
            "LOCAL_WORLD_SIZE", world))))

    name, x_tr, y_tr, x_te, y_te = load_data()
    if args.limit:
        x_tr, y_tr = x_tr[:args.limit], y_tr[:args.limit]
    n = len(y_tr)

    torch.manual_seed(args.seed)                            # same initial weights on every rank
    model = make_model().to(device)
    model = DDP(model, device_ids=[local_rank] if cuda else None)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    pruner = gpuprune.Pruner(n, keep=args.keep, policy=args.policy, num_epochs=args.epochs,  # gpuprune
                             warmup_epochs=args.warmup_epochs, seed=args.seed, device=device)
    per_step = pruner.schedule.exact_size
    if per_step:   # a per-step schedule sized for the pruned run: this rank's batches, all epochs
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=args.lr, total_steps=pruner.total_steps(args.batch_size))  # gpuprune
    else:          # InfoBatch: epoch sizes depend on the losses, so schedule per epoch
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    sampler = gpuprune.PrunedSampler(pruner)                # gpuprune: this rank's shard
    loader = DataLoader(gpuprune.IndexedDataset(TensorDataset(x_tr, y_tr)),   # gpuprune: + index
                        batch_size=args.batch_size, sampler=sampler, pin_memory=cuda)

    start = 0
    if args.resume:
        ckpt = gpuprune.load_checkpoint(args.checkpoint, map_location=device)  # rank 0's, on all
        model.module.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        pruner.load_state_dict(ckpt["pruner"])              # gpuprune
        start = ckpt["epoch"] + 1

    if rank == 0:
        print(f"{name}: {n} training images, {world} ranks ({dist.get_backend()}), policy "
              f"{args.policy}, keep {args.keep}, device {device}", flush=True)
    for epoch in range(start, args.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)            # gpuprune: merge statistics and plan (all ranks)
        planned = len(pruner.plan(epoch))   # the plan just made (cached)
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for x, y, idx in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            per_sample = F.cross_entropy(model(x), y, reduction="none")
            loss = pruner.observe(idx.to(device), per_sample)   # gpuprune: record, weight
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if per_step:
                sched.step()
            total += torch.stack([per_sample.detach().sum().double(),
                                  torch.tensor(float(len(y)), device=device, dtype=torch.float64)])
        if not per_step:
            sched.step()
        dist.all_reduce(total)
        acc = evaluate(model, x_te, y_te, rank, world, device)
        if args.checkpoint is not None:
            pruner.synchronize()                            # gpuprune: merge before saving
            if rank == 0:                                   # crash-safe write
                gpuprune.save_checkpoint({"epoch": epoch, "model": model.module.state_dict(),
                                          "optimizer": opt.state_dict(),
                                          "scheduler": sched.state_dict(),
                                          "pruner": pruner.state_dict()}, args.checkpoint)
        if rank == 0:
            print(f"epoch {epoch}: trained {int(total[1])} of {n} samples (plan {planned}, "
                  f"{len(sampler)} per rank), loss {total[0].item() / total[1].item():.4f}, "
                  f"test acc {acc:.4f}, {time.perf_counter() - t0:.1f} s", flush=True)
    if rank == 0:
        stats = pruner.selection_stats()
        print(f"selection over {stats['rounds']} pruned epochs: always {stats['always']:.3f}, "
              f"sometimes {stats['sometimes']:.3f}, never {stats['never']:.3f}; non-finite losses "
              f"skipped: {int(pruner.stats.nonfinite)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
