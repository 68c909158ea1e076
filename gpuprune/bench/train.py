"""One training run: the loop, its learning-rate schedule, batch sources and timing.

Timing rules (what is charged to wall time):

* ``select_s``: ``Pruner.plan(epoch)`` (the selection and shuffle), bracketed by device syncs;
* ``refresh_s``: the re-score pass before a selection (``--refresh``; :mod:`gpuprune.refresh`):
  a forward pass in inference mode over the samples due, fed like the training batches;
* ``train_s``: everything else of an epoch: fetching batches, forward, backward, ``observe``,
  optimizer steps;
* ``eval_s``: the test-set evaluation after each epoch; measured, shown, **not** charged (it is
  the benchmark's own measurement, the same for every method).

``cpu_s`` is the process CPU time (``time.process_time``) of the charged parts. With one torch
thread on a CPU it is a measure of work that other processes sharing the cores barely disturb,
unlike wall time; on a GPU it only counts the host's share.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from ..data import ImageData
from ..models import build_model
from ..plan import Plan
from ..pruner import Pruner
from ..refresh import Refresher
from ..sampler import IndexedDataset, PrunedSampler
from ..static_scores import ForgettingTracker
from .config import BenchConfig

__all__ = ["lr_factor", "DeviceData", "TensorBatches", "TorchBatches", "make_batches",
           "make_refresh_source", "RunStats", "train_run", "evaluate", "sync"]


def sync(device: torch.device) -> None:
    """Wait for queued device work, so host clocks measure it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lr_factor(progress: float, warmup_frac: float) -> float:
    """Learning-rate multiplier at training ``progress`` in [0, 1].

    Linear from 0.1 to 1 over ``[0, warmup_frac)``, then linear down to 0 at progress 1. The
    progress is computed per optimizer step (step / planned steps, or epoch + batch fraction over
    epochs), so the schedule stays complete when pruned epochs have fewer steps.
    """
    p = min(max(progress, 0.0), 1.0)
    if warmup_frac > 0.0 and p < warmup_frac:
        return 0.1 + 0.9 * p / warmup_frac
    return max(0.0, (1.0 - p) / max(1.0 - warmup_frac, 1e-12))


class DeviceData:
    """The dataset on the training device, plus what batches need (normalisation, augmentation)."""

    def __init__(self, data: ImageData, device: torch.device) -> None:
        self.data = data
        self.device = device
        self.num_samples = len(data.x_train)
        self.x_train = data.x_train.to(device)
        self.y_train = data.y_train.to(device)
        self.x_test = data.x_test.to(device)
        self.y_test = data.y_test.to(device)
        mean, std = data.channel_stats()
        self.mean = mean.view(1, -1, 1, 1).to(device)
        self.std = std.view(1, -1, 1, 1).to(device)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32, scaled to [0, 1] then standardised per channel."""
        return (x.float().div_(255.0) - self.mean) / self.std


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random ``pad``-pixel-shift crops and horizontal flips of a uint8 batch, drawn from ``generator``
    (a CPU generator; the few draws are moved to the batch's device)."""
    b, c, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return xp[torch.arange(b, device=x.device)[:, None, None, None],
              torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


# ------------------------------------------------------------------------------ batch sources
class TensorBatches:
    """Batches gathered straight from the in-memory tensors by the plan's indices (no DataLoader)."""

    name = "tensor"

    def __init__(self, data: DeviceData, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size

    def bind(self, pruner: Pruner) -> "TensorBatches":
        return self

    def epoch(self, plan: Plan) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        idx, bs = plan.indices, self.batch_size
        for s in range(0, len(idx), bs):
            b = idx[s:s + bs]
            yield self.data.x_train[b], self.data.y_train[b], b


class TorchBatches:
    """A ``torch.utils.data.DataLoader`` over the CPU tensors with :class:`gpuprune.PrunedSampler`."""

    name = "torch"

    def __init__(self, data: DeviceData, batch_size: int, workers: int = 0) -> None:
        self.data, self.batch_size, self.workers = data, batch_size, workers
        self.dataset = IndexedDataset(torch.utils.data.TensorDataset(data.data.x_train,
                                                                      data.data.y_train))
        self.loader = None
        self.sampler = None

    def bind(self, pruner: Pruner) -> "TorchBatches":
        bound = TorchBatches.__new__(TorchBatches)
        bound.__dict__.update(self.__dict__)
        bound.sampler = PrunedSampler(pruner)
        bound.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=bound.sampler,
            num_workers=self.workers, pin_memory=self.data.device.type == "cuda",
            # the loader draws a worker base seed per epoch; without its own generator it would
            # take it from (and advance) the global RNG
            generator=torch.Generator().manual_seed(pruner.seed))
        return bound

    def epoch(self, plan: Plan) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(plan.epoch)         # before creating the iterator
        dev = self.data.device
        for x, y, i in self.loader:
            yield (x.to(dev, non_blocking=True), y.to(dev, non_blocking=True),
                   i.to(dev, non_blocking=True))


def make_batches(kind: str, data: DeviceData, cfg: BenchConfig):
    """The batch source named ``kind`` (``"tensor"``, ``"torch"`` or ``"dali"``)."""
    if kind == "tensor":
        return TensorBatches(data, cfg.batch_size)
    if kind == "torch":
        return TorchBatches(data, cfg.batch_size, cfg.workers)
    if kind == "dali":
        from .dali_batches import DaliBatches
        return DaliBatches(data, cfg.batch_size)
    raise ValueError(f"loader must be one of ['tensor', 'torch', 'dali'], got loader={kind!r}")


def make_refresh_source(kind: str, data: DeviceData, cfg: BenchConfig, refresher: Refresher):
    """What the re-score pass reads, fed like the training batches of loader ``kind``: the
    in-memory tensors (``"tensor"``), a DataLoader over :meth:`Refresher.sampler` (``"torch"``) or
    a DALI iterator over :attr:`Refresher.feed` (``"dali"``), all with ``cfg.eval_batch_size``
    (no gradients are kept). Each loads only the samples due, in the feed's order, so the three
    give the same batches."""
    if kind == "tensor":
        return (data.x_train, data.y_train)
    if kind == "torch":
        dataset = IndexedDataset(torch.utils.data.TensorDataset(data.data.x_train, data.data.y_train))
        return torch.utils.data.DataLoader(
            dataset, batch_size=cfg.eval_batch_size, sampler=refresher.sampler(),
            num_workers=cfg.workers, pin_memory=data.device.type == "cuda",
            generator=torch.Generator().manual_seed(refresher.seed))
    if kind == "dali":
        from ..dali import ArraySource, build_iterator
        if data.device.type == "cuda":
            source, device_id = ArraySource(data.x_train, data.y_train), data.device.index
        else:
            source = ArraySource(data.data.x_train.numpy(), data.data.y_train.numpy())
            device_id = None
        return build_iterator(refresher.feed, source, batch_size=cfg.eval_batch_size,
                              output_map=("data", "label"), num_threads=1, device_id=device_id)
    raise ValueError(f"loader must be one of ['tensor', 'torch', 'dali'], got loader={kind!r}")


# ------------------------------------------------------------------------------ the run
@dataclass
class RunStats:
    """What one run measured. Times in seconds; accuracies in percent."""

    train_s: float = 0.0
    select_s: float = 0.0
    refresh_s: float = 0.0
    eval_s: float = 0.0
    tracker_s: float = 0.0
    cpu_s: float = 0.0
    refresh_cpu_s: float = 0.0
    tracker_cpu_s: float = 0.0
    refresh_samples: int = 0
    steps: int = 0
    samples: int = 0
    epochs: int = 0
    final_acc: float = float("nan")
    best_acc: float = float("nan")
    #: one point per evaluated epoch: epoch, steps, samples, time_s (charged, cumulative), acc
    curve: list[dict] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: DeviceData, batch_size: int) -> float:
    """Test accuracy in percent."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=data.device)
    for s in range(0, len(data.x_test), batch_size):
        logits = model(data.normalize(data.x_test[s:s + batch_size]))
        correct += (logits.argmax(1) == data.y_test[s:s + batch_size]).sum()
    model.train()
    return 100.0 * int(correct) / len(data.x_test)


def train_run(*, data: DeviceData, cfg: BenchConfig, pruner: Pruner, batches, init_seed: int,
              aug_seed: int, use_observe: bool, step_budget: int | None = None,
              stop_after_epochs: int | None = None, tracker: ForgettingTracker | None = None,
              time_offset: float = 0.0, cpu_offset: float = 0.0, evaluate_each_epoch: bool = True,
              refresh: str = "none", progress=None) -> tuple[torch.nn.Module, RunStats]:
    """Train a fresh model on ``pruner``'s plans; return it and its measurements.

    Args:
        data: the dataset on the device.
        cfg: hyper-parameters (model, epochs, batch size, optimiser, schedule).
        pruner: chooses each epoch's samples (``policy="full"`` for full data).
        batches: a batch source (:func:`make_batches`), bound to ``pruner`` here.
        init_seed: seed of the initial weights (the same for every method of one benchmark seed).
        aug_seed: seed of the augmentation draws.
        use_observe: backpropagate ``pruner.observe(idx, losses)`` (policies that read scores);
            otherwise the plain mean, so baselines pay no bookkeeping they do not need.
        step_budget: stop after this many optimizer steps; the schedule then runs over the steps
            (the shortened full-data baseline). ``None``: ``cfg.epochs`` epochs, per-epoch progress.
        stop_after_epochs: stop early, keeping the ``cfg.epochs`` schedule (EL2N scoring runs).
        tracker: a ForgettingTracker fed each batch's correctness (its time is kept apart on CPU).
        time_offset: charged time before training (scoring), added to the curve's times.
        cpu_offset: the same in process CPU seconds.
        evaluate_each_epoch: evaluate on the test set after every epoch (off for scoring runs).
        refresh: ``"none"``, ``"unselected"`` or ``"all"``: a re-score pass
            (:class:`gpuprune.refresh.Refresher`) before every epoch that draws a selection from
            the losses; charged (``refresh_s``, and in ``cpu_s``).
        progress: optional tqdm bar advanced once per epoch.
    """
    dev = data.device
    c, h, w = data.data.image_shape
    model = build_model(cfg.model, (c, h, w), data.data.num_classes,
                        torch.Generator().manual_seed(init_seed), dev)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    aug_gen = torch.Generator().manual_seed(aug_seed)
    src = batches.bind(pruner)
    refresher = rsrc = None
    if refresh != "none":
        refresher = Refresher(pruner, which=refresh)
        rsrc = make_refresh_source(batches.name, data, refresher=refresher, cfg=cfg)

    def refresh_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction="none", label_smoothing=cfg.label_smoothing)
    n, bs = data.num_samples, cfg.batch_size
    if step_budget is not None:
        num_epochs = -(-step_budget // -(-n // bs))
    else:
        num_epochs = cfg.epochs if stop_after_epochs is None else stop_after_epochs
    st = RunStats()
    cpu_tracker = dev.type == "cpu"
    model.train()
    for epoch in range(num_epochs):
        sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        if refresher is not None and refresher.due(epoch):
            rr = refresher.run(model, rsrc, epoch, loss_fn=refresh_loss, transform=data.normalize,
                               batch_size=cfg.eval_batch_size)
            sync(dev)
            st.refresh_samples += rr.scored
            tr, cr = time.perf_counter(), time.process_time()
            st.refresh_s += tr - t0
            st.refresh_cpu_s += cr - c0
            t0 = tr
        plan = pruner.plan(epoch)
        sync(dev)
        t1 = time.perf_counter()
        st.select_s += t1 - t0
        n_batches = plan.batches(bs)
        tracker_s = tracker_cpu_s = 0.0
        for j, (xb, yb, ib) in enumerate(src.epoch(plan)):
            if step_budget is not None:
                progress_now = st.steps / step_budget
            else:
                progress_now = (epoch + j / max(n_batches, 1)) / cfg.epochs
            lr = cfg.lr * lr_factor(progress_now, cfg.warmup_frac)
            for group in opt.param_groups:
                group["lr"] = lr
            if cfg.augment:
                xb = augment(xb, aug_gen)
            logits = model(data.normalize(xb))
            per_sample = F.cross_entropy(logits, yb, reduction="none",
                                         label_smoothing=cfg.label_smoothing)
            loss = pruner.observe(ib, per_sample) if use_observe else per_sample.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if tracker is not None:
                ta, ca = time.perf_counter(), time.process_time()
                tracker.update(ib, logits.detach().argmax(1) == yb)
                if cpu_tracker:          # on a GPU the update is asynchronous: left in train_s
                    tracker_s += time.perf_counter() - ta
                    tracker_cpu_s += time.process_time() - ca
            st.steps += 1
            st.samples += int(ib.numel())
            if step_budget is not None and st.steps >= step_budget:
                break
        sync(dev)
        st.train_s += time.perf_counter() - t1 - tracker_s
        st.cpu_s += time.process_time() - c0 - tracker_cpu_s
        st.tracker_s += tracker_s
        st.tracker_cpu_s += tracker_cpu_s
        st.epochs += 1
        if evaluate_each_epoch:
            te = time.perf_counter()
            acc = evaluate(model, data, cfg.eval_batch_size)
            st.eval_s += time.perf_counter() - te
            st.curve.append({"epoch": epoch + 1, "steps": st.steps, "samples": st.samples,
                             "time_s": time_offset + st.train_s + st.select_s + st.refresh_s,
                             "cpu_s": cpu_offset + st.cpu_s, "acc": acc})
            if progress is not None:
                progress.set_postfix(acc=f"{acc:.2f}", refresh=False)
        if progress is not None:
            progress.update(1)
        if step_budget is not None and st.steps >= step_budget:
            break
    accs = [p["acc"] for p in st.curve if not math.isnan(p["acc"])]
    if accs:
        st.final_acc, st.best_acc = accs[-1], max(accs)
    return model, st
