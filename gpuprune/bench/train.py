"""One training run: the loop, its learning-rate schedule, batch sources and timing.

Timing rules (what is charged to wall time):

* ``select_s``: ``Pruner.plan(epoch)`` (the selection and shuffle), bracketed by device syncs;
* ``refresh_s``: the re-score pass before a selection (``--refresh``; :mod:`gpuprune.refresh`):
  a forward pass in inference mode over the samples due, fed like the training batches;
* ``train_s``: everything else of an epoch: fetching batches, forward, backward, ``observe``,
  optimizer steps;
* ``eval_s``: the test-set evaluation (after every ``eval_every`` epochs and the last); measured,
  shown, **not** charged (it is the benchmark's own measurement, the same for every method);
* ``exploit_s``: the exploitation measurement (``exploitation=True``): a forward pass over all N
  training samples before each epoch; measured, **not** charged;
* ``setup_s``: building the model, the optimizer and the batch source before the first epoch;
  measured, not charged (the same for every method).

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

__all__ = ["lr_factor", "onecycle_factor", "schedule_factor", "DeviceData", "TensorBatches",
           "TorchBatches", "make_batches", "make_refresh_source", "RunStats", "train_run",
           "evaluate", "current_losses", "exploitation_of", "sync", "ReferenceStep"]


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


def onecycle_factor(progress: float, pct_start: float, div_factor: float = 25.0,
                    final_div_factor: float = 1e4) -> float:
    """Learning-rate multiplier of the one-cycle policy at training ``progress`` in [0, 1].

    The shape of ``torch.optim.lr_scheduler.OneCycleLR`` (``anneal_strategy="cos"``, two phases)
    as a function of progress rather than of a step index: cosine from ``1 / div_factor`` up to 1
    over ``[0, pct_start]``, then cosine down to ``1 / (div_factor * final_div_factor)`` at 1.
    Torch's step-indexed values are the same curve sampled at ``step / (total_steps - 1)`` with
    the peak at step ``pct_start * total_steps - 1``: within one step's shift of this one.
    """
    p = min(max(progress, 0.0), 1.0)
    low, end = 1.0 / div_factor, 1.0 / (div_factor * final_div_factor)

    def cos_anneal(start: float, stop: float, t: float) -> float:
        return stop + (start - stop) / 2.0 * (math.cos(math.pi * t) + 1.0)
    if pct_start > 0.0 and p <= pct_start:
        return cos_anneal(low, 1.0, p / pct_start)
    return cos_anneal(1.0, end, (p - pct_start) / max(1.0 - pct_start, 1e-12))


def schedule_factor(schedule: str, progress: float, warmup_frac: float) -> float:
    """The multiplier of learning-rate schedule ``schedule`` (``"linear"``: :func:`lr_factor`,
    ``"onecycle"``: :func:`onecycle_factor` with ``pct_start=warmup_frac``)."""
    if schedule == "onecycle":
        return onecycle_factor(progress, warmup_frac)
    if schedule == "linear":
        return lr_factor(progress, warmup_frac)
    raise ValueError(f"lr_schedule must be 'linear' or 'onecycle', got {schedule!r}")


class DeviceData:
    """The dataset on the training device, plus what batches need (normalisation, augmentation)."""

    def __init__(self, data: ImageData, device: torch.device, channels_last: bool = False) -> None:
        self.data = data
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.num_samples = len(data.x_train)
        self.x_train = data.x_train.to(device)
        self.y_train = data.y_train.to(device)
        self.x_test = data.x_test.to(device)
        self.y_test = data.y_test.to(device)
        mean, std = data.channel_stats()
        self.mean = mean.view(1, -1, 1, 1).to(device)
        self.std = std.view(1, -1, 1, 1).to(device)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32, scaled to [0, 1] then standardised per channel (in the
        memory format the models use)."""
        x = (x.float().div_(255.0) - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)


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
    exploit_s: float = 0.0
    setup_s: float = 0.0
    tracker_s: float = 0.0
    cpu_s: float = 0.0
    refresh_cpu_s: float = 0.0
    tracker_cpu_s: float = 0.0
    refresh_samples: int = 0
    #: the reference step's CPU and wall seconds measured around the run (nan: not measured)
    probe_cpu_s: float = float("nan")
    probe_wall_s: float = float("nan")
    steps: int = 0
    samples: int = 0
    epochs: int = 0
    final_acc: float = float("nan")
    best_acc: float = float("nan")
    #: one point per evaluated epoch: epoch, steps, samples, time_s (charged wall, cumulative),
    #: cpu_s (charged CPU, cumulative), acc
    curve: list[dict] = field(default_factory=list)
    #: one record per epoch when exploitation is measured (see :func:`exploitation_of`)
    exploit: list[dict] = field(default_factory=list)

    @property
    def charged_s(self) -> float:
        """Charged wall seconds: train + select + refresh."""
        return self.train_s + self.select_s + self.refresh_s


def autocast(device: torch.device, amp: str):
    """The forward pass's precision context: ``torch.autocast`` to bfloat16 for ``amp="bf16"``."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: DeviceData, batch_size: int, amp: str = "none") -> float:
    """Test accuracy in percent."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=data.device)
    with autocast(data.device, amp):
        for s in range(0, len(data.x_test), batch_size):
            logits = model(data.normalize(data.x_test[s:s + batch_size]))
            correct += (logits.argmax(1) == data.y_test[s:s + batch_size]).sum()
    model.train(was_training)
    return 100.0 * int(correct) / len(data.x_test)


@torch.no_grad()
def current_losses(model: torch.nn.Module, data: DeviceData, batch_size: int, *,
                   label_smoothing: float = 0.0, amp: str = "none") -> torch.Tensor:
    """Every training sample's loss under the current weights (float32, N, on the device): a
    forward pass in ``eval()`` mode without augmentation, the training flag restored after. It
    changes no state the training reads (no gradients, no batch-norm statistics)."""
    was_training = model.training
    model.eval()
    out = torch.empty(data.num_samples, dtype=torch.float32, device=data.device)
    with autocast(data.device, amp):
        for s in range(0, data.num_samples, batch_size):
            logits = model(data.normalize(data.x_train[s:s + batch_size]))
            out[s:s + batch_size] = F.cross_entropy(logits.float(), data.y_train[s:s + batch_size],
                                                    reduction="none",
                                                    label_smoothing=label_smoothing)
    model.train(was_training)
    return out


def exploitation_of(losses: torch.Tensor, indices: torch.Tensor, *, epoch: int,
                    full: bool) -> dict:
    """How much an epoch's plan (its sample ``indices``) exploits the current ``losses`` (one per
    sample).

    Returns:
        dict with ``epoch``, ``full`` (a full-data plan), ``ratio``: the planned samples' mean loss
        over all samples' mean (1 for full data and, in expectation, for a uniform draw; above 1
        when the plan favours high-loss samples), and ``top``: the share of the plan among the
        ``len(plan)`` highest-loss samples (a uniform draw of k of N gives about k / N; 1 means
        the plan is exactly the top k).
    """
    idx = indices.long().to(losses.device)
    k, n = idx.numel(), losses.numel()
    mean_all = losses.double().mean()
    ratio = float(losses[idx].double().mean() / mean_all) if k else float("nan")
    if k >= n:
        top = 1.0
    else:
        in_top = torch.zeros(n, dtype=torch.bool, device=losses.device)
        in_top[torch.topk(losses, k, sorted=False).indices] = True
        top = float(in_top[idx].sum()) / k
    return {"epoch": int(epoch), "full": bool(full), "ratio": ratio, "top": top}


class ReferenceStep:
    """A fixed piece of work timed just before and just after every run: ``steps`` training steps
    (forward, backward, SGD step) of the benchmark's own model on one fixed batch.

    Dividing a run's charged time by the reference step's time measured around it expresses the run
    in *reference steps*: a unit that moves with the machine's speed at that moment (other
    processes on the cores, clock changes), so runs made minutes apart under a different load stay
    comparable. For full-data training a run's reference steps are about its optimizer steps.

    Args:
        data: the dataset on the device (the first ``cfg.batch_size`` samples are the batch).
        cfg: the model, batch size and precision.
        steps: steps per measurement. Default ``10``.
    """

    def __init__(self, data: DeviceData, cfg: BenchConfig, steps: int = 10) -> None:
        c, h, w = data.data.image_shape
        self.data, self.cfg, self.steps = data, cfg, steps
        self.model = build_model(cfg.model, (c, h, w), data.data.num_classes,
                                 torch.Generator().manual_seed(0), data.device, width=cfg.width)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # a tiny rate: the weights barely move, so every measurement does the same work
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-6, momentum=cfg.momentum)
        b = min(cfg.batch_size, data.num_samples)
        self.x, self.y = data.x_train[:b], data.y_train[:b]

    def measure(self) -> tuple[float, float]:
        """(process CPU seconds, wall seconds) of one reference step, the mean of ``steps``."""
        dev = self.data.device
        sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(self.steps):
            with autocast(dev, self.cfg.amp):
                logits = self.model(self.data.normalize(self.x))
            loss = F.cross_entropy(logits.float(), self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        sync(dev)
        return ((time.process_time() - c0) / self.steps, (time.perf_counter() - t0) / self.steps)


def train_run(*, data: DeviceData, cfg: BenchConfig, pruner: Pruner, batches, init_seed: int,
              aug_seed: int, use_observe: bool, step_budget: int | None = None,
              stop_after_epochs: int | None = None, tracker: ForgettingTracker | None = None,
              time_offset: float = 0.0, cpu_offset: float = 0.0, evaluate_each_epoch: bool = True,
              refresh: str = "none", exploitation: bool = False,
              progress=None) -> tuple[torch.nn.Module, RunStats]:
    """Train a fresh model on ``pruner``'s plans; return it and its measurements.

    Args:
        data: the dataset on the device.
        cfg: hyper-parameters (model, epochs, batch size, optimiser, schedule, precision).
        pruner: chooses each epoch's samples (``policy="full"`` for full data).
        batches: a batch source (:func:`make_batches`), bound to ``pruner`` here.
        init_seed: seed of the initial weights (the same for every method of one benchmark seed).
        aug_seed: seed of the augmentation draws.
        use_observe: backpropagate ``pruner.observe(idx, losses)`` (policies that read scores);
            otherwise the plain mean, so baselines pay no bookkeeping they do not need.
        step_budget: stop after this many optimizer steps; the schedule then runs over the steps
            (the shortened full-data baselines). ``None``: ``cfg.epochs`` epochs, per-epoch
            progress.
        stop_after_epochs: stop early, keeping the ``cfg.epochs`` schedule (EL2N scoring runs).
        tracker: a ForgettingTracker fed each batch's correctness (its time is kept apart on CPU).
        time_offset: charged time before training (scoring), added to the curve's times.
        cpu_offset: the same in process CPU seconds.
        evaluate_each_epoch: evaluate on the test set (every ``cfg.eval_every`` epochs and after
            the last; off for scoring runs).
        refresh: ``"none"``, ``"unselected"`` or ``"all"``: a re-score pass
            (:class:`gpuprune.refresh.Refresher`) before every epoch that draws a selection from
            the losses; charged (``refresh_s``, and in ``cpu_s``).
        exploitation: measure :func:`exploitation_of` each epoch's plan against every sample's
            current loss (an uncharged forward pass over all N before the epoch's training).
        progress: optional tqdm bar advanced once per epoch.
    """
    dev = data.device
    sync(dev)
    ts = time.perf_counter()
    c, h, w = data.data.image_shape
    model = build_model(cfg.model, (c, h, w), data.data.num_classes,
                        torch.Generator().manual_seed(init_seed), dev, width=cfg.width)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    aug_gen = torch.Generator().manual_seed(aug_seed)
    src = batches.bind(pruner)
    refresher = rsrc = None
    if refresh != "none":
        refresher = Refresher(pruner, which=refresh)
        rsrc = make_refresh_source(batches.name, data, refresher=refresher, cfg=cfg)

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, reduction="none",
                               label_smoothing=cfg.label_smoothing)
    n, bs = data.num_samples, cfg.batch_size
    if step_budget is not None:
        num_epochs = -(-step_budget // -(-n // bs))
    else:
        num_epochs = cfg.epochs if stop_after_epochs is None else stop_after_epochs
    st = RunStats()
    cpu_tracker = dev.type == "cpu"
    model.train()
    sync(dev)
    st.setup_s = time.perf_counter() - ts
    for epoch in range(num_epochs):
        sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        if refresher is not None and refresher.due(epoch):
            with autocast(dev, cfg.amp):
                rr = refresher.run(model, rsrc, epoch, loss_fn=loss_fn, transform=data.normalize,
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
        skip_s = skip_cpu_s = 0.0          # uncharged work inside the epoch
        if exploitation:
            ue, uc = time.perf_counter(), time.process_time()
            losses = current_losses(model, data, cfg.eval_batch_size,
                                    label_smoothing=cfg.label_smoothing, amp=cfg.amp)
            st.exploit.append(exploitation_of(losses, plan.indices, epoch=plan.epoch,
                                              full=plan.full))
            sync(dev)
            skip_s, skip_cpu_s = time.perf_counter() - ue, time.process_time() - uc
            st.exploit_s += skip_s
        n_batches = plan.batches(bs)
        tracker_s = tracker_cpu_s = 0.0
        for j, (xb, yb, ib) in enumerate(src.epoch(plan)):
            if step_budget is not None:
                progress_now = st.steps / step_budget
            else:
                progress_now = (epoch + j / max(n_batches, 1)) / cfg.epochs
            lr = cfg.lr * schedule_factor(cfg.lr_schedule, progress_now, cfg.warmup_frac)
            for group in opt.param_groups:
                group["lr"] = lr
            if cfg.augment:
                xb = augment(xb, aug_gen, cfg.augment_pad)
            with autocast(dev, cfg.amp):
                logits = model(data.normalize(xb))
            per_sample = loss_fn(logits, yb)
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
        st.train_s += time.perf_counter() - t1 - tracker_s - skip_s
        st.cpu_s += time.process_time() - c0 - tracker_cpu_s - skip_cpu_s
        st.tracker_s += tracker_s
        st.tracker_cpu_s += tracker_cpu_s
        st.epochs += 1
        last = epoch == num_epochs - 1 or (step_budget is not None and st.steps >= step_budget)
        if evaluate_each_epoch and (last or (epoch + 1) % cfg.eval_every == 0):
            te = time.perf_counter()
            acc = evaluate(model, data, cfg.eval_batch_size, cfg.amp)
            st.eval_s += time.perf_counter() - te
            st.curve.append({"epoch": epoch + 1, "steps": st.steps, "samples": st.samples,
                             "time_s": time_offset + st.charged_s,
                             "cpu_s": cpu_offset + st.cpu_s, "acc": acc})
            if progress is not None:
                progress.set_postfix(acc=f"{acc:.2f}", refresh=False)
        if progress is not None:
            progress.update(1)
        if last:
            break
    accs = [p["acc"] for p in st.curve if not math.isnan(p["acc"])]
    if accs:
        st.final_acc, st.best_acc = accs[-1], max(accs)
    return model, st
