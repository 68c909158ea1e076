"""How long the CIFAR-shaped GPU study takes on an H100: an estimate from CPU measurements.

1. Count the floating-point operations of one training step and one forward pass of the study's
   model on its input shape (``torch.utils.flop_counter``, exact for the convolutions and matrix
   products that dominate), and time a few steps on this CPU (for the record: they show the
   counter's figures are the work actually done here).
2. Assume a sustained rate on the GPU (``--tflops``, default 50 TFLOP/s for an H100 in bf16:
   about 6 % of the 798 TFLOP/s a large bf16 matrix product reached on this workplace's H100,
   because a CIFAR ResNet-18 is mostly small convolutions, batch norms and ReLUs, which are
   bound by memory traffic and kernel launches, in eager PyTorch). That gives trained and
   forward-only images per second.
3. Count the study's work (:func:`gpuprune.bench.budget.planned_work`: samples trained and
   forward-only of every run, InfoBatch and the equal-time ladder estimated) and divide.

Prints the figures and, last, ``RATES <train/s> <forward/s>`` for ``gpuprune bench
--assume-rates``. Run by ``scripts/gpu_study.sh --dry-run``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from gpuprune.bench.budget import planned_work, project
from gpuprune.bench.config import ALL_METHODS, PRESETS, BenchConfig
from gpuprune.models import build_model


def study_config(seeds: list[int] | None = None) -> tuple[BenchConfig, int, int]:
    """The gpu-study preset as a BenchConfig, with its training and test set sizes."""
    preset = {k: v for k, v in PRESETS["gpu-study"].items() if not k.startswith("_")}
    fields = BenchConfig.__dataclass_fields__
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in preset.items() if k in fields}
    cfg["methods"] = ALL_METHODS if "all" in preset["methods"] else tuple(preset["methods"])
    if seeds is not None:
        cfg["seeds"] = tuple(seeds)
    return BenchConfig(**cfg), preset["train_subset"], preset["test_subset"]


def flops_per_image(model: torch.nn.Module, shape: tuple[int, int, int], batch: int = 8
                    ) -> tuple[float, float]:
    """(training step, forward pass) floating-point operations per image."""
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    train = fc.get_total_flops() / batch
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return train, fc.get_total_flops() / batch


def cpu_step_seconds(model: torch.nn.Module, shape: tuple[int, int, int], batch: int,
                     steps: int) -> float:
    """Median seconds of a training step on this CPU (one torch thread), after one untimed."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tflops", type=float, default=50.0,
                    help="sustained TFLOP/s assumed on the GPU (default 50: an H100, bf16)")
    ap.add_argument("--forward-speedup", type=float, default=None,
                    help="forward-only images/s over trained images/s (default: the FLOP ratio)")
    ap.add_argument("--steps", type=int, default=3, help="CPU steps timed (default 3)")
    ap.add_argument("--batch", type=int, default=8, help="CPU batch size (default 8)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="seeds of the study (default: the preset's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg, n, n_test = study_config(args.seeds)
    shape = (3, 32, 32)
    model = build_model(cfg.model, shape, 10, torch.Generator().manual_seed(0))
    train_flops, fwd_flops = flops_per_image(model, shape)
    step = cpu_step_seconds(model, shape, args.batch, args.steps)
    cpu_rate = args.batch * train_flops / step / 1e9
    train_rate = args.tflops * 1e12 / train_flops
    fwd_rate = train_rate * (args.forward_speedup or train_flops / fwd_flops)
    work = planned_work(cfg, n, n_test)
    p = project(work, train_rate, fwd_rate)
    print(f"model {cfg.model} on {shape}: {train_flops / 1e9:.2f} GFLOP per trained image, "
          f"{fwd_flops / 1e9:.2f} per forward-only image (torch.utils.flop_counter)")
    print(f"this CPU, one thread: {step:.3f} s per step of {args.batch} images = "
          f"{cpu_rate:.0f} GFLOP/s sustained ({args.batch / step:.1f} images/s)")
    print(f"assumed GPU rate {args.tflops:g} TFLOP/s: {train_rate:,.0f} trained and "
          f"{fwd_rate:,.0f} forward-only images/s")
    print(f"study: {cfg.epochs} epochs, {n} training / {n_test} test images, seeds "
          f"{list(cfg.seeds)}, {len(cfg.methods)} methods at p = {list(cfg.prune_ratios)}: "
          f"{p['train']:,.0f} images trained + {p['forward']:,.0f} forward-only "
          f"({p['full_run_equivalents']:.1f} full-run equivalents)")
    print(f"estimate: {p['seconds']:.0f} s of training and evaluation on the GPU, plus start-up "
          f"(CUDA context, data, warm-up: about 30 s); the bench refuses to start above "
          f"{PRESETS['gpu-study']['time_limit_s']:.0f} s projected from its own warm-up")
    print(f"RATES {train_rate:.0f} {fwd_rate:.0f}")


if __name__ == "__main__":
    main()
