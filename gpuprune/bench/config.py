"""The benchmark's settings and the names of the methods it compares."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..policies import UCB, EpsilonGreedy, InfoBatch, Policy, Static
from ..schedule import Schedule, check_keep
from ..sizes import budget

__all__ = ["BenchConfig", "METHODS", "SCHEDULED", "ABLATIONS", "ALL_METHODS", "uses_schedule",
           "keep_argument", "BASELINES", "DYNAMIC", "REFRESHED", "STATIC", "SCORED", "LOADERS", "REFRESH", "LR_SCHEDULES", "AMP", "CLOCKS", "LADDER", "PRESETS", "DRY_RUN",
           "base_method", "uses_refresh", "charged_clock", "dry_run_config", "make_policy",
           "step_budget"]

#: the policies' own defaults: the benchmark runs what users get
_EG, _UCB, _IB = EpsilonGreedy(), UCB(), InfoBatch()

#: full data (the reference) and full data for as many optimizer steps as a pruned run
BASELINES = ("full", "full_short")
#: dynamic policies: a new subset each epoch
DYNAMIC = ("uniform", "epsilon_greedy", "ucb", "infobatch")
#: policies whose selection reads the loss statistics, so their runs feed Pruner.observe
SCORED = ("epsilon_greedy", "ucb", "infobatch")
#: the SCORED policies with a re-score pass (:mod:`gpuprune.refresh`) before each selection,
#: charged to them; they run in the same sweep as the plain policies, against the same reference
REFRESHED = tuple(f"{m}+refresh" for m in SCORED)
#: static baselines: one subset for the whole run; el2n and forgetting pay for their scores
STATIC = ("static_random", "el2n", "forgetting")
#: the exact-size policies run with the sweep's keep schedule (``--keep-schedule``) in place of
#: the constant keep ``1 - p``; only with a keep schedule, and not in ``all`` without one
SCHEDULED = ("uniform+sched", "epsilon_greedy+sched", "ucb+sched")
#: every method, in table order (a policy's variants right after it)
METHODS = (BASELINES + ("uniform", "uniform+sched", "epsilon_greedy", "epsilon_greedy+refresh",
                        "epsilon_greedy+sched", "ucb", "ucb+refresh", "ucb+sched", "infobatch",
                        "infobatch+refresh", "infobatch+norescale", "infobatch+noanneal")
           + STATIC)
#: InfoBatch's ablations: without rescaling the kept well-learned samples' loss
#: (``InfoBatch(rescale=False)``), and without annealing (``delta=1.0``: no full-data epochs at
#: the end); asked for by name, not in ``all``
ABLATIONS = ("infobatch+norescale", "infobatch+noanneal")
#: what ``--methods all`` runs (the keep-schedule variants join it when a schedule is given)
ALL_METHODS = tuple(m for m in METHODS if m not in SCHEDULED + ABLATIONS)
#: ways to feed batches
LOADERS = ("tensor", "torch", "dali")
#: what the re-score pass of the ``+refresh`` methods covers
REFRESH = ("unselected", "all")
#: learning-rate schedules (both per optimizer step; see :mod:`gpuprune.bench.train`)
LR_SCHEDULES = ("linear", "onecycle")
#: mixed precision of the forward pass
AMP = ("none", "bf16")
#: the clock charged time is read on: process CPU time, or wall time with device syncs
CLOCKS = ("auto", "cpu", "wall")
#: fractions of the full run's optimizer steps the equal-time ladder may train full data for
LADDER = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)


def base_method(method: str) -> str:
    """The policy a method runs: ``"ucb+refresh"`` -> ``"ucb"``."""
    return method.split("+", 1)[0]


def uses_refresh(method: str) -> bool:
    """Whether a method runs the re-score pass before its selections."""
    return method.endswith("+refresh")


def uses_schedule(method: str) -> bool:
    """Whether a method keeps the sweep's keep schedule instead of ``1 - p`` (``"ucb+sched"``)."""
    return method.endswith("+sched")


def keep_argument(method: str, cfg: "BenchConfig", prune_ratio: float) -> dict:
    """The Pruner's size argument for ``method`` in the sweep: the keep schedule for a ``+sched``
    method, else ``prune_ratio``."""
    return {"keep": cfg.keep_schedule} if uses_schedule(method) else {"prune_ratio": prune_ratio}


def charged_clock(clock: str, device: str) -> str:
    """``"cpu"`` or ``"wall"``: ``"auto"`` is process CPU time on a CPU (other processes sharing
    the cores disturb it much less than wall time) and wall time on a GPU (where the host's CPU
    time misses the device's work)."""
    if clock != "auto":
        return clock
    return "wall" if str(device).startswith("cuda") else "cpu"


@dataclass
class BenchConfig:
    """Everything that defines a benchmark sweep (the data are chosen separately).

    Attributes:
        model: ``"mlp"`` (default), ``"cnn"`` or ``"resnet18"``.
        width: base width of ``cnn`` (default 32) and ``resnet18`` (default 64); ``None``
            (default) keeps the model's own. Small widths make seconds-long dry runs.
        epochs: epochs of every run (the full-data reference and the pruned runs). Default ``10``.
        batch_size: training batch size. Default ``128``.
        lr: peak learning rate of SGD with Nesterov momentum. Default ``0.05``.
        momentum: SGD momentum. Default ``0.9``.
        weight_decay: L2 weight decay. Default ``5e-4``.
        lr_schedule: ``"linear"`` (default): from 10% of ``lr`` up to ``lr`` over ``warmup_frac``
            of training, then linearly to 0; ``"onecycle"``: torch's ``OneCycleLR`` shape (cosine
            from ``lr / 25`` up to ``lr`` over ``warmup_frac`` of training, then cosine down to
            ``lr / 25e4``). Both are computed per optimizer step from the training progress.
        warmup_frac: share of training with a rising learning rate. Default ``0.15``.
        label_smoothing: cross-entropy label smoothing. Default ``0.0``.
        augment: random shifted crops (``augment_pad`` pixels of zero padding) and horizontal
            flips. Default ``False``.
        augment_pad: padding of the random crops. Default ``2``.
        prune_ratios: the ratios p to compare; each pruned run keeps ``round((1 - p) N)``
            samples per pruned epoch. Default ``(0.5,)``.
        seeds: one run of every method per seed. Default ``(0,)``.
        methods: names from :data:`METHODS`; ``"full"`` always runs (it is the reference).
            Default :data:`ALL_METHODS` (every method but the ``+sched`` variants).
        keep_schedule: ``(shape, start, end)``, ``shape`` ``"linear"`` or ``"cosine"``: the keep
            schedule (:func:`gpuprune.schedule.keep_fractions`) the ``+sched`` methods run with in
            place of ``1 - p``; they sit in every ratio's table, against the same baselines.
            Default ``None``.
        epsilon, ucb_c, ucb_drift, uncertainty, delta: the policies' settings
            (``EpsilonGreedy(epsilon)``, ``UCB(c, uncertainty, drift)``, ``InfoBatch(delta)``);
            defaults are the policies' own.
        decay: the Pruner's EMA weight; ``None`` (default) takes each policy's default (0.9, and
            0.0 for InfoBatch: the latest loss, as the official code).
        warmup_epochs, selection_interval: passed to :class:`gpuprune.Pruner`.
        refresh: what the ``+refresh`` methods' forward-only re-score pass
            (:class:`gpuprune.refresh.Refresher`) covers before each selection: ``"unselected"``
            (default) or ``"all"``. Its time is charged to them.
        el2n_seeds: models trained to score EL2N (K). Default ``2``.
        el2n_epochs: epochs each scoring model trains, on the full run's schedule. Default ``2``.
        target_acc: accuracy (percent) for the time-to-accuracy column; ``None`` (default) uses
            the same seed's full-data accuracy minus ``target_drop``.
        target_drop: points below full-data accuracy that count as reaching it. Default ``1.0``.
        equal_time: run the equal-time ladder (full data on shortened schedules whose charged
            times bracket each method's; see :mod:`gpuprune.bench.equal_time`). Default ``True``.
        ladder: the fractions of the full run's optimizer steps a ladder run may use. Default
            :data:`LADDER`. Only those that bracket some method's time are run.
        clock: the clock charged time is read on: ``"auto"`` (default: CPU time on a CPU, wall
            time on a GPU), ``"cpu"`` or ``"wall"``.
        probe_steps: steps of the reference training step timed before and after every run
            (:class:`gpuprune.bench.train.ReferenceStep`); the speed-ups and the equal-time
            comparison then use charged time in reference steps, which the machine's load
            changes much less than seconds. ``0`` compares raw seconds. Default ``10``.
        exploitation: before every epoch, an *uncharged* forward pass over all N training
            samples measures how much the plan exploits the loss (the planned samples' mean
            current loss over all samples' mean). Default ``False`` (it costs about a third of an
            epoch of training per epoch, in wall time).
        eval_every: evaluate on the test set every this many epochs (and after the last).
            Default ``1``.
        device: ``"cpu"`` (default) or ``"cuda"``.
        amp: ``"none"`` (default) or ``"bf16"``: the forward pass under ``torch.autocast``
            (losses in float32).
        channels_last: models and batches in channels-last memory format (faster convolutions
            on GPUs). Default ``False``.
        pruner_backend: the Pruner's ``backend`` (``"auto"``, ``"cuda"``, ``"torch"``). Default
            ``"auto"``.
        loader: ``"tensor"`` (default; batches gathered from in-memory tensors by the plan's
            indices), ``"torch"`` (DataLoader with :class:`gpuprune.PrunedSampler`) or ``"dali"``.
        workers: DataLoader worker processes for ``loader="torch"``. Default ``0``.
        eval_batch_size: batch size of test-set evaluation and of forward-only passes. Default
            ``1024``.
    """

    model: str = "mlp"
    width: int | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "linear"
    warmup_frac: float = 0.15
    label_smoothing: float = 0.0
    augment: bool = False
    augment_pad: int = 2
    prune_ratios: tuple[float, ...] = (0.5,)
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = field(default_factory=lambda: ALL_METHODS)
    keep_schedule: tuple | None = None
    epsilon: float = _EG.epsilon
    ucb_c: float = _UCB.c
    ucb_drift: float = _UCB.drift
    uncertainty: str = _UCB.uncertainty
    decay: float | None = None
    delta: float = _IB.delta
    warmup_epochs: int = 0
    selection_interval: int = 1
    refresh: str = "unselected"
    el2n_seeds: int = 2
    el2n_epochs: int = 2
    target_acc: float | None = None
    target_drop: float = 1.0
    equal_time: bool = True
    ladder: tuple[float, ...] = LADDER
    clock: str = "auto"
    probe_steps: int = 10
    exploitation: bool = False
    eval_every: int = 1
    device: str = "cpu"
    amp: str = "none"
    channels_last: bool = False
    pruner_backend: str = "auto"
    loader: str = "tensor"
    workers: int = 0
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods must be among {list(METHODS)}, got {unknown}")
        for p in self.prune_ratios:
            if not 0.0 < p < 1.0:
                raise ValueError(f"prune ratios must lie in (0, 1), got {p}")
        for name, value, allowed in (("refresh", self.refresh, REFRESH),
                                     ("loader", self.loader, LOADERS),
                                     ("lr_schedule", self.lr_schedule, LR_SCHEDULES),
                                     ("amp", self.amp, AMP), ("clock", self.clock, CLOCKS),
                                     ("pruner_backend", self.pruner_backend,
                                      ("auto", "cuda", "torch"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {name}={value!r}")
        if self.el2n_epochs > self.epochs:
            raise ValueError(f"el2n_epochs must be <= epochs ({self.epochs}), got {self.el2n_epochs}")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs must be < epochs ({self.epochs}), got {self.warmup_epochs}")
        if self.probe_steps < 0:
            raise ValueError(f"probe_steps must be >= 0, got probe_steps={self.probe_steps}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got eval_every={self.eval_every}")
        if self.width is not None and self.width < 1:
            raise ValueError(f"width must be >= 1, got width={self.width}")
        if not self.ladder or any(not 0.0 < f <= 1.0 for f in self.ladder):
            raise ValueError(f"ladder fractions must lie in (0, 1], got ladder={self.ladder!r}")
        self.ladder = tuple(sorted(set(float(f) for f in self.ladder) | {1.0}))
        if self.keep_schedule is not None:
            self.keep_schedule = check_keep(tuple(self.keep_schedule))
            if not isinstance(self.keep_schedule, tuple):
                raise ValueError(f"keep_schedule must be (shape, start, end), got "
                                 f"keep_schedule={self.keep_schedule!r}")
        sched = [m for m in self.methods if uses_schedule(m)]
        if sched and self.keep_schedule is None:
            raise ValueError(f"methods {sched} run the keep schedule: give keep_schedule "
                             f"(--keep-schedule SHAPE START END)")
        # table order, "full" first and always present
        self.methods = tuple(m for m in METHODS if m == "full" or m in self.methods)

    @property
    def clock_name(self) -> str:
        """The clock charged time is read on: ``"cpu"`` or ``"wall"`` (see :func:`charged_clock`)."""
        return charged_clock(self.clock, self.device)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("prune_ratios", "seeds", "methods", "ladder"):
            d[key] = list(d[key])
        return d

    def replace(self, **changes) -> "BenchConfig":
        """A copy with ``changes`` applied (checked like a new config)."""
        d = asdict(self)
        d.update(changes)
        for key in ("prune_ratios", "seeds", "methods", "ladder"):
            d[key] = tuple(d[key])
        return BenchConfig(**d)


#: named settings of ``gpuprune bench`` (keys are its option names with "_"; "_about" describes)
PRESETS: dict[str, dict] = {
    "gpu-study": {
        "_about": "the CIFAR-shaped GPU study (scripts/gpu_study.sh): Fashion-MNIST padded to "
                  "3x32x32, ResNet-18, crops and flips, OneCycle, label smoothing, 30 epochs, "
                  "every method at p = 0.5, bf16 on CUDA, within an 8-minute H100 budget",
        "dataset": "fashion-mnist", "cifar_shaped": True, "train_subset": 10000,
        "test_subset": 5000, "model": "resnet18", "augment": True, "augment_pad": 4,
        "lr_schedule": "onecycle", "warmup_frac": 0.3, "lr": 0.2, "batch_size": 512,
        "label_smoothing": 0.1, "epochs": 30, "prune_ratios": [0.5], "seeds": [0, 1],
        "methods": ["all"], "eval_every": 5, "eval_batch_size": 2048, "device": "cuda",
        "amp": "bf16", "channels_last": True, "probe_steps": 5, "time_limit_s": 450.0,
    },
    "exploitation-30": {
        "_about": "30 epochs of the MLP at p = 0.5 with the exploitation measured every epoch, "
                  "for the loss-based methods and their baselines",
        "epochs": 30, "exploitation": True, "prune_ratios": [0.5],
        "methods": ["full_short", "uniform", "epsilon_greedy", "ucb", "ucb+refresh", "infobatch"],
    },
}

#: what --dry-run shrinks a sweep to (the same code path, seconds on a CPU)
DRY_RUN = {"train_subset": 64, "test_subset": 32, "epochs": 2, "batch_size": 16, "width": 8,
           "eval_batch_size": 64}


def dry_run_config(cfg: BenchConfig) -> BenchConfig:
    """``cfg`` shrunk for a seconds-long run on the CPU: :data:`DRY_RUN`'s epochs and batch
    sizes (at most), width 8 for cnn/resnet18, the first seed, one EL2N model of one epoch."""
    return cfg.replace(
        epochs=DRY_RUN["epochs"], seeds=cfg.seeds[:1],
        batch_size=min(cfg.batch_size, DRY_RUN["batch_size"]),
        eval_batch_size=min(cfg.eval_batch_size, DRY_RUN["eval_batch_size"]),
        width=None if cfg.model == "mlp" else DRY_RUN["width"],
        warmup_epochs=min(cfg.warmup_epochs, DRY_RUN["epochs"] - 1), el2n_seeds=1,
        el2n_epochs=1, eval_every=1, device="cpu", pruner_backend="auto")

def step_budget(cfg: BenchConfig, num_samples: int, prune_ratio: float) -> int:
    """Optimizer steps of a ``uniform`` run at ``prune_ratio`` (warm-up epochs at full data)."""
    schedule = Schedule(cfg.epochs, warmup_epochs=cfg.warmup_epochs)
    return schedule.total_steps(num_samples, budget(1.0 - prune_ratio, num_samples), cfg.batch_size)


def make_policy(method: str, cfg: BenchConfig, scores: torch.Tensor | None) -> Policy | str:
    """The policy a benchmark method runs (``"ucb+refresh"`` runs ``ucb``), with the sweep's
    settings."""
    variant, method = method, base_method(method)
    if method == "epsilon_greedy":
        return EpsilonGreedy(epsilon=cfg.epsilon)
    if method == "ucb":
        return UCB(c=cfg.ucb_c, uncertainty=cfg.uncertainty, drift=cfg.ucb_drift)
    if method == "infobatch":
        return InfoBatch(delta=1.0 if variant == "infobatch+noanneal" else cfg.delta,
                         rescale=variant != "infobatch+norescale")
    if method in ("static_random", "el2n", "forgetting"):
        return Static(scores)
    return method
