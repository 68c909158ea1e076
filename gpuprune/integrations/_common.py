"""What the framework glue shares: importing a framework, finding the sampler, counting steps."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..sampler import PrunedSampler

__all__ = ["require", "find_sampler", "optimizer_steps"]


def require(module: str, package: str, minimum: str | None = None) -> ModuleType:
    """Import ``module``, or raise ImportError saying which package to install.

    Args:
        module: the module to import, e.g. ``"lightning.pytorch"``.
        package: its PyPI name, e.g. ``"lightning"``.
        minimum: the oldest version the glue supports (checked against ``package``'s
            ``__version__`` when it has one), or None.
    """
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"this gpuprune integration needs {package}: pip install {package} (or "
                          f"pip install \"gpuprune[integrations]\" for every framework gpuprune "
                          f"supports)") from e
    if minimum is not None:
        top = importlib.import_module(module.split(".")[0])
        version = getattr(top, "__version__", None)
        if version is not None and _release(version) < _release(minimum):
            raise ImportError(f"this gpuprune integration needs {package}>={minimum}, found "
                              f"{version}: pip install -U \"{package}>={minimum}\"")
    return mod


def _release(version: str) -> tuple[int, ...]:
    """``"2.6.6"`` -> ``(2, 6, 6)``: the leading numbers; a pre-release or local suffix
    (``"5.0.0rc1"``, ``"2.13.0+cpu"``) ends it."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = piece[:len(piece) - len(piece.lstrip("0123456789"))]
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:
            break
    return tuple(parts)


def find_sampler(loader) -> PrunedSampler | None:
    """The :class:`~gpuprune.PrunedSampler` a DataLoader draws from (its ``sampler``, or its batch
    sampler's ``sampler``, also through accelerate's shard wrappers), or None."""
    candidates = [getattr(loader, "sampler", None)]
    batch_sampler = getattr(loader, "batch_sampler", None)
    while batch_sampler is not None:
        candidates.append(getattr(batch_sampler, "sampler", None))
        batch_sampler = getattr(batch_sampler, "batch_sampler", None)   # accelerate's shard
    return next((s for s in candidates if isinstance(s, PrunedSampler)), None)


def optimizer_steps(pruner, batch_size: int, *, world_size: int | None = None,
                    shard_drop_last: bool = False, num_epochs: int | None = None,
                    accumulate: int = 1, drop_last: bool = False,
                    upper_bound: bool = False) -> int:
    """Optimizer steps on each rank for epochs ``0 .. num_epochs - 1`` of ``pruner``'s schedule,
    with a framework's batching: :meth:`gpuprune.Schedule.total_steps`, the one step-count
    formula (per epoch ``ceil(batches / accumulate)``, where ``batches`` counts one rank's shard
    and a last, incomplete accumulation still steps, as Lightning and the Hugging Face Trainer
    do).

    Args:
        pruner: the :class:`~gpuprune.Pruner`.
        batch_size: samples per batch on each rank.
        world_size: shards each epoch is split into (default: the pruner's world size).
        shard_drop_last: the sampler's ``drop_last`` (cut the plan to a multiple of
            ``world_size``). Default False.
        num_epochs: epochs the run trains (default: the pruner's ``num_epochs``, at most it).
        accumulate: batches per optimizer step (gradient accumulation). Default ``1``.
        drop_last: the DataLoader drops its last short batch (``DataLoader(drop_last=True)``;
            the sampler's own ``drop_last`` cuts the shard). Default False.
        upper_bound: for InfoBatch, count every pruned epoch with all N samples (see
            :meth:`gpuprune.Pruner.total_steps`). Default False.

    Raises:
        ValueError: no ``num_epochs`` anywhere, more epochs than the pruner's ``num_epochs``, or
            InfoBatch without ``upper_bound=True``.
    """
    if pruner.num_epochs is None:
        raise ValueError("the pruner has no num_epochs: create it with num_epochs=... so the "
                         "run's step count is known")
    return pruner.schedule.total_steps(
        pruner.num_samples, pruner.k, batch_size,
        world_size=pruner.world_size if world_size is None else world_size,
        drop_last=shard_drop_last, drop_last_batch=drop_last, accumulate=accumulate,
        epochs=num_epochs, upper_bound=upper_bound)
