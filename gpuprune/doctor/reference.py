"""The implementations the doctor compares: backends (the CUDA kernels, the torch backend's CPU paths
and the torch reference), and Pruner runs on them. The independent numpy oracle of the documented
formulas serves the test suite (``tests/numpy_reference.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch




# ================================================================================== implementations
class Disagreement(AssertionError):
    """An implementation broke a contract on its own (wrong dtype, wrong count)."""


@dataclass(frozen=True)
class RunSpec:
    """One Pruner run of the plan check: every setting that fixes its plans."""

    policy: str
    num_samples: int = 300
    keep: float = 0.5
    num_epochs: int = 6
    warmup_epochs: int = 0
    seed: int = 0
    decay: float | None = None
    settings: tuple[tuple[str, Any], ...] = ()

    def settings_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def label(self) -> str:
        extra = ", ".join(f"{k}={'<scores>' if k == 'scores' else v}" for k, v in self.settings)
        return (f"{self.policy}({extra}) N={self.num_samples} keep={self.keep} epochs="
                f"{self.num_epochs} warmup={self.warmup_epochs} seed={self.seed}")


class Implementation:
    """One way to compute the primitives and plans: a backend under test, or a reference.

    Inputs arrive as CPU tensors; results leave as numpy arrays. Subclass to add an implementation
    or to break one on purpose (the doctor's own tests do).

    Attributes:
        name: shown in every line that compares it.
        ignores_bad_batches: True when a batch holding an out-of-range id is ignored and counted in
            ``invalid_batches`` (the GPU contract); False when ids are checked by the caller (CPU).
    """

    name: str = "implementation"
    ignores_bad_batches: bool = False

    def top_k(self, score: torch.Tensor | None, n: int, k: int, seed: int) -> np.ndarray:
        """Sorted int64 ids of the k largest keys (see :mod:`gpuprune.keys`)."""
        raise NotImplementedError

    def shuffle(self, ids: torch.Tensor, seed: int) -> np.ndarray:
        """``ids`` (unique) in shuffle order."""
        raise NotImplementedError

    def new_state(self, n: int) -> Any:
        """Fresh statistics of n samples."""
        raise NotImplementedError

    def observe(self, state: Any, ids: torch.Tensor, losses: torch.Tensor, decay: float,
                epoch: int) -> None:
        """Apply one batch to ``state``."""
        raise NotImplementedError

    def arrays(self, state: Any) -> dict[str, np.ndarray]:
        """``mean``, ``var`` (float32), ``last_epoch`` (int32), ``nonfinite`` and
        ``invalid_batches`` (int64 scalars) of ``state``."""
        raise NotImplementedError

    def start(self, spec: RunSpec) -> Any:
        """A run: an object with ``plan(epoch) -> (ids in order, float32 weight per entry)``,
        ``observe(ids, losses)`` and ``arrays()``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class BackendImplementation(Implementation):
    """A :class:`gpuprune.backend.Backend` (torch or the kernels), and Pruners that use it."""

    def __init__(self, backend, name: str | None = None) -> None:
        self.backend = backend
        self.device = torch.device(backend.device)
        kind = "CUDA kernels" if backend.name == "cuda" else f"{backend.name} backend"
        self.name = name or f"{kind} ({self.device.type})"
        self.ignores_bad_batches = self.device.type == "cuda"

    def top_k(self, score, n, k, seed):
        from ..sizes import index_dtype
        out = self.backend.top_k(None if score is None else score.to(self.device), n, k, seed)
        if out.dtype != index_dtype(n) or out.dim() != 1 or out.device != self.device:
            raise Disagreement(f"{self.name}: top_k(N={n}, k={k}) returned a {tuple(out.shape)} "
                               f"{out.dtype} tensor on {out.device}, expected 1-D {index_dtype(n)} "
                               f"on {self.device}")
        return np.sort(out.cpu().numpy().astype(np.int64))

    def shuffle(self, ids, seed):
        return self.backend.shuffle(ids.to(self.device), seed).cpu().numpy().astype(np.int64)

    def new_state(self, n):
        from ..stats import LossStats
        return LossStats(n, self.device)

    def observe(self, state, ids, losses, decay, epoch):
        # exact=True: the torch backend on CUDA then adds 3+ copies of an id in batch order, as the
        # kernels and the CPU always do (without it CUDA's atomics make the low bits vary)
        self.backend.observe_(state.tensors(), ids.to(self.device), losses.to(self.device), decay,
                              epoch, exact=True)

    def arrays(self, state):
        return {name: getattr(state, name).cpu().numpy() for name in
                ("mean", "var", "last_epoch", "nonfinite", "invalid_batches")}

    def start(self, spec):
        return _PrunerRun(self, spec)

    def plan(self, arrays: dict, shuffle_seed: int, pick=None, ids=None, full: bool = False,
             previous=None) -> dict:
        """:meth:`gpuprune.backend.Backend.plan` on statistics given as CPU tensors (``mean``,
        ``var``, ``last_epoch``, ``selected``), counting, with the previous plan ``previous``
        (``(ids or None, size)``); every part back as a numpy array (the overlap as its bits),
        and ``total``: the kernels' own count of planned ids (the plan's length elsewhere)."""
        import dataclasses

        from ..keys import GivenScore
        from ..stats import LossStats
        dev = self.device
        stats = LossStats(arrays["mean"].numel(), dev)
        for name in ("mean", "var", "last_epoch", "selected"):
            getattr(stats, name).copy_(arrays[name])
        if pick is not None and isinstance(pick.score, GivenScore):
            pick = dataclasses.replace(pick, score=GivenScore(pick.score.values.to(dev)))
        prev = None if previous is None else (
            None if previous[0] is None else previous[0].to(dev), previous[1])
        parts = self.backend.plan(stats, shuffle_seed=shuffle_seed, pick=pick, full=full,
                                  ids=None if ids is None else ids.to(dev), previous=prev)
        out = {"indices": parts.indices.cpu().numpy().astype(np.int64),
               "selected": parts.selected.cpu().numpy(),
               "overlap": None if parts.overlap is None else
               parts.overlap.cpu().numpy().view(np.uint64),
               "rescaled": None if parts.rescaled is None else parts.rescaled.cpu().numpy()}
        ops = getattr(self.backend, "ops", None)
        out["total"] = ops.last_total() if ops is not None else len(out["indices"])
        return out


def _policy_object(spec: RunSpec):
    from ..policies import POLICIES
    settings = spec.settings_dict()
    if "scores" in settings:
        settings["scores"] = torch.as_tensor(np.asarray(settings["scores"], dtype=np.float32))
    return POLICIES[spec.policy](**settings)


class _PrunerRun:
    """A real :class:`~gpuprune.Pruner` on the implementation's device and backend."""

    def __init__(self, impl: BackendImplementation, spec: RunSpec) -> None:
        from ..pruner import Pruner
        self.impl = impl
        self.pruner = Pruner(spec.num_samples, keep=spec.keep, policy=_policy_object(spec),
                             num_epochs=spec.num_epochs, warmup_epochs=spec.warmup_epochs,
                             decay=spec.decay, seed=spec.seed, device=impl.device,
                             process_group=None, backend="torch")
        self.pruner.backend = impl.backend          # the backend under test, whatever it is

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.pruner.plan(epoch)
        return (p.indices.cpu().numpy().astype(np.int64),
                p.weights_of(p.indices).cpu().numpy().astype(np.float32))

    def observe(self, ids: torch.Tensor, losses: torch.Tensor) -> None:
        dev = self.impl.device
        self.pruner.observe(ids.to(dev), losses.to(dev))

    def arrays(self) -> dict[str, np.ndarray]:
        return self.impl.arrays(self.pruner.stats)
