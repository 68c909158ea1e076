"""The benchmark's settings and the names of the methods it compares."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..policies import UCB, EpsilonGreedy, InfoBatch

__all__ = ["BenchConfig", "METHODS", "BASELINES", "DYNAMIC", "STATIC", "SCORED", "LOADERS",
           "REFRESH"]

#: the policies' own defaults: the benchmark runs what users get
_EG, _UCB, _IB = EpsilonGreedy(), UCB(), InfoBatch()

#: full data (the reference) and full data for as many optimizer steps as a pruned run
BASELINES = ("full", "full_short")
#: dynamic policies: a new subset each epoch
DYNAMIC = ("uniform", "epsilon_greedy", "ucb", "infobatch")
#: static baselines: one subset for the whole run; el2n and forgetting pay for their scores
STATIC = ("static_random", "el2n", "forgetting")
#: every method, in table order
METHODS = BASELINES + DYNAMIC + STATIC
#: policies whose selection reads the loss statistics, so their runs feed Pruner.observe
SCORED = ("epsilon_greedy", "ucb", "infobatch")
#: ways to feed batches
LOADERS = ("tensor", "torch", "dali")
#: re-score passes (:mod:`gpuprune.refresh`) before each selection of the SCORED policies
REFRESH = ("none", "unselected", "all")


@dataclass
class BenchConfig:
    """Everything that defines a benchmark sweep (the data are chosen separately).

    Attributes:
        model: ``"mlp"`` (default), ``"cnn"`` or ``"resnet18"``.
        epochs: epochs of every run (the full-data reference and the pruned runs). Default ``10``.
        batch_size: training batch size. Default ``128``.
        lr: peak learning rate of SGD with Nesterov momentum. Default ``0.05``.
        momentum: SGD momentum. Default ``0.9``.
        weight_decay: L2 weight decay. Default ``5e-4``.
        warmup_frac: share of training (by progress, see :func:`gpuprune.bench.train.lr_factor`) over
            which the learning rate rises linearly from 10% to 100% of ``lr``; it then falls
            linearly to 0. Default ``0.15``.
        label_smoothing: cross-entropy label smoothing. Default ``0.0``.
        augment: random 2-pixel-padded crops and horizontal flips. Default ``False``.
        prune_ratios: the ratios p to compare; each pruned run keeps ``round((1 - p) N)``
            samples per pruned epoch. Default ``(0.5,)``.
        seeds: one run of every method per seed. Default ``(0,)``.
        methods: names from :data:`METHODS`; ``"full"`` always runs (it is the reference).
        epsilon, ucb_c, ucb_drift, uncertainty, delta: the policies' settings
            (``EpsilonGreedy(epsilon)``, ``UCB(c, uncertainty, drift)``, ``InfoBatch(delta)``);
            defaults are the policies' own.
        decay: the Pruner's EMA weight; ``None`` (default) takes each policy's default (0.9, and
            0.0 for InfoBatch: the latest loss, as the official code).
        warmup_epochs, selection_interval: passed to :class:`gpuprune.Pruner`.
        refresh: ``"none"`` (default), ``"unselected"`` or ``"all"``: a forward-only re-score pass
            (:class:`gpuprune.refresh.Refresher`) before each selection of the policies that read
            losses (epsilon_greedy, ucb, infobatch); its time is charged to the run.
        el2n_seeds: models trained to score EL2N (K). Default ``2``.
        el2n_epochs: epochs each scoring model trains, on the full run's schedule. Default ``2``.
        target_acc: accuracy (percent) for the time-to-accuracy column; ``None`` (default) uses
            the same seed's full-data accuracy minus ``target_drop``.
        target_drop: points below full-data accuracy that count as reaching it. Default ``1.0``.
        device: ``"cpu"`` (default) or ``"cuda"``.
        loader: ``"tensor"`` (default; batches gathered from in-memory tensors by the plan's
            indices), ``"torch"`` (DataLoader with :class:`gpuprune.PrunedSampler`) or ``"dali"``.
        workers: DataLoader worker processes for ``loader="torch"``. Default ``0``.
        eval_batch_size: batch size of test-set evaluation. Default ``1024``.
    """

    model: str = "mlp"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_frac: float = 0.15
    label_smoothing: float = 0.0
    augment: bool = False
    prune_ratios: tuple[float, ...] = (0.5,)
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = field(default_factory=lambda: METHODS)
    epsilon: float = _EG.epsilon
    ucb_c: float = _UCB.c
    ucb_drift: float = _UCB.drift
    uncertainty: str = _UCB.uncertainty
    decay: float | None = None
    delta: float = _IB.delta
    warmup_epochs: int = 0
    selection_interval: int = 1
    refresh: str = "none"
    el2n_seeds: int = 2
    el2n_epochs: int = 2
    target_acc: float | None = None
    target_drop: float = 1.0
    device: str = "cpu"
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
        if self.refresh not in REFRESH:
            raise ValueError(f"refresh must be one of {list(REFRESH)}, got refresh={self.refresh!r}")
        if self.loader not in LOADERS:
            raise ValueError(f"loader must be one of {list(LOADERS)}, got loader={self.loader!r}")
        if self.el2n_epochs > self.epochs:
            raise ValueError(f"el2n_epochs must be <= epochs ({self.epochs}), got {self.el2n_epochs}")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs must be < epochs ({self.epochs}), got {self.warmup_epochs}")
        # table order, "full" first and always present
        self.methods = tuple(m for m in METHODS if m == "full" or m in self.methods)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prune_ratios"] = list(self.prune_ratios)
        d["seeds"] = list(self.seeds)
        d["methods"] = list(self.methods)
        return d
