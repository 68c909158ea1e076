"""The Hugging Face Trainer with dynamic data pruning, on one process or several.

    python examples/transformers_train.py                                    # one CPU process
    torchrun --nproc_per_node=2 examples/transformers_train.py               # 2 processes (gloo)
    accelerate launch --num_processes 2 --cpu examples/transformers_train.py

A tiny ViT built from a config in code (no download) classifies Fashion-MNIST (the Debian package
``dataset-fashion-mnist``; scikit-learn's digits when it is missing). The lines that differ from
a plain Trainer script are marked ``# gpuprune``: the Pruner (created after the TrainingArguments,
which start the process group) and ``PruningTrainer`` in place of ``Trainer``. Its LR schedule
and ``max_steps`` follow the plans; see docs/integrations.md.

``--record DIR`` writes ``DIR/rank<r>.json`` per process: the sample ids whose losses reached
``pruner.observe``, per epoch, each epoch's plan, and the optimizer and scheduler step counts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification

import gpuprune
from gpuprune.data import load_dataset
from gpuprune.integrations.transformers import PruningTrainer                      # gpuprune


class Images(Dataset):
    """Fashion-MNIST items in the Trainer's format: {"pixel_values", "labels"}."""

    def __init__(self, limit: int) -> None:
        data = load_dataset("auto")
        self.x = data.x_train[:limit].float().div_(255)
        self.y = data.y_train[:limit]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def tiny_vit(image: torch.Tensor) -> ViTForImageClassification:
    channels, size, _ = image.shape
    config = ViTConfig(image_size=size, patch_size=size // 4, num_channels=channels, hidden_size=32,
                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       num_labels=10)
    return ViTForImageClassification(config)


class Recorder(TrainerCallback):
    """The Trainer's epoch number, for recording which ids each epoch's losses came from."""

    epoch = -1

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=6000, help="train on the first LIMIT images")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--policy", default="ucb", choices=sorted(gpuprune.POLICIES))
    ap.add_argument("--warmup-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", type=Path, help="Trainer output (default: a temporary folder)")
    ap.add_argument("--record", type=Path, help="write what each process trained to RECORD/rank<r>.json")
    args = ap.parse_args()

    train_set = Images(args.limit)
    torch.manual_seed(args.seed)
    model = tiny_vit(train_set[0]["pixel_values"])
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=str(args.output_dir or tmp), num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.accumulate, learning_rate=args.lr,
            lr_scheduler_type="linear", use_cpu=not torch.cuda.is_available(), seed=args.seed,
            save_strategy="no", report_to=[], logging_steps=10, disable_tqdm=True)
        pruner = gpuprune.Pruner(len(train_set), keep=args.keep, policy=args.policy,   # gpuprune
                                 num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
                                 seed=args.seed, device=targs.device)
        recorder = Recorder()
        received: dict[int, list[int]] = {}
        if args.record is not None:         # note the ids reaching observe, then observe them
            observe = pruner.observe

            def recording(idx, loss):
                received.setdefault(recorder.epoch, []).extend(idx.tolist())
                return observe(idx, loss)
            pruner.observe = recording
        plans: dict[int, list[int]] = {}

        class Plans(TrainerCallback):
            def on_epoch_end(self, a, state, control, **kwargs):
                plans[recorder.epoch] = pruner.current_plan.indices.tolist()

        trainer = PruningTrainer(model=model, args=targs, train_dataset=train_set,          # gpuprune
                                 pruner=pruner, callbacks=[recorder, Plans()])            # gpuprune
        result = trainer.train()
    state = trainer.state
    if targs.process_index == 0:
        print(f"{targs.world_size} process(es): {state.global_step} optimizer steps of max_steps "
              f"{state.max_steps}, scheduler at step {trainer.lr_scheduler.last_epoch}, final lr "
              f"{trainer.lr_scheduler.get_last_lr()[0]:.3g}, train loss {result.training_loss:.4f}",
              flush=True)
    if args.record is not None:
        args.record.mkdir(parents=True, exist_ok=True)
        (args.record / f"rank{targs.process_index}.json").write_text(json.dumps({
            "rank": targs.process_index, "world_size": targs.world_size,
            "num_samples": len(train_set), "received": received, "plans": plans,
            "optimizer_steps": state.global_step, "scheduler_steps": trainer.lr_scheduler.last_epoch,
            "scheduler_total": state.max_steps,
            "history_epochs": [h["epoch"] for h in pruner.history]}))
    trainer.accelerator.wait_for_everyone()  # every process done before the process group ends
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
