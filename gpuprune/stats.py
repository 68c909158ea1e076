"""Per-sample loss statistics kept on the training device: the state every policy reads.

The state is four flat tensors (structure of arrays), 16 bytes per sample:

==============  =======  ==============================================================
``mean``        float32  exponentially weighted mean of the sample's loss
``var``         float32  exponentially weighted variance of the loss
``last_epoch``  int32    last epoch in which a finite loss was observed (-1: never seen)
``selected``    int32    number of pruned epochs the sample was planned in
==============  =======  ==============================================================

plus two device counters: ``nonfinite`` (NaN/inf losses skipped) and ``invalid_batches`` (GPU batches
ignored for out-of-range ids). This module holds the state and checks it; it never updates it:
:mod:`gpuprune.backend` applies observations (:func:`gpuprune.update.merge_groups` defines the
update), and the :class:`~gpuprune.Pruner` counts selections.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._checks import check_float, check_int, resolve_device

__all__ = ["LossStats", "StatsTensors", "tree_sum", "masked_mean"]


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a 1-D tensor in a fixed pairwise order (pad to a power of two, add halves): the same
    additions on every device, unlike ``torch.sum``, whose order depends on the device and the
    number of threads. About two passes over the data."""
    n = x.numel()
    size = 1 << max(n - 1, 0).bit_length()
    if size != n:
        x = torch.cat([x, torch.zeros(size - n, dtype=x.dtype, device=x.device)])
    while x.numel() > 1:
        x = x[0::2] + x[1::2]
    return x.reshape(())


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The float64 mean of ``values`` where ``mask`` is True (0 when none is), as a 0-d tensor on
    their device, without a host read.

    Summed as a fixed pairwise tree (:func:`tree_sum`), so the bits are the same on every device
    and backend: a mean that decides a selection (InfoBatch's below-mean rule, UCB's drift scale)
    must not depend on a reduction's order, or CPU and GPU would plan differently when extreme
    values make the sum's rounding matter. The one definition of "mean over the seen samples".
    """
    v = torch.where(mask, values.double(), torch.zeros((), dtype=torch.float64,
                                                        device=values.device))
    return tree_sum(v) / mask.sum().clamp(min=1).double()


class StatsTensors(NamedTuple):
    """The tensors an observation updates (what the backends take, in this order)."""

    mean: torch.Tensor
    var: torch.Tensor
    last_epoch: torch.Tensor
    nonfinite: torch.Tensor
    invalid_batches: torch.Tensor


class LossStats:
    """Exponentially weighted loss statistics of N samples, on one device.

    Args:
        num_samples: N, the dataset size (>= 1).
        device: where the state lives (default ``"cpu"``); pass the training GPU to keep it there.

    Attributes:
        mean, var, last_epoch, selected: the per-sample tensors (see the module docstring).
        nonfinite: int64 scalar tensor, NaN/inf losses skipped so far (read it when ready to sync).
        invalid_batches: int64 scalar tensor, GPU batches ignored for out-of-range ids.
    """

    PER_SAMPLE = {"mean": torch.float32, "var": torch.float32, "last_epoch": torch.int32,
                  "selected": torch.int32}
    COUNTERS = ("nonfinite", "invalid_batches")
    #: the most a counter can hold in a saved state: 2**53 (9.0e15) events is 104 days at 10**9
    #: per second, so a larger count was not counted but written; an int64 counter loaded below it
    #: cannot overflow in any run
    MAX_COUNT = 2**53

    def __init__(self, num_samples: int, device: torch.device | str = "cpu") -> None:
        self.num_samples = check_int("num_samples", num_samples, minimum=1)
        self.device = resolve_device(device)
        n, dev = self.num_samples, self.device
        self.mean = torch.zeros(n, dtype=torch.float32, device=dev)
        self.var = torch.zeros(n, dtype=torch.float32, device=dev)
        self.last_epoch = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.selected = torch.zeros(n, dtype=torch.int32, device=dev)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=dev)
        self.invalid_batches = torch.zeros((), dtype=torch.int64, device=dev)

    # ------------------------------------------------------------------ views
    def tensors(self) -> StatsTensors:
        """The tensors an observation updates, for :mod:`gpuprune.backend`."""
        return StatsTensors(self.mean, self.var, self.last_epoch, self.nonfinite,
                            self.invalid_batches)

    @property
    def seen(self) -> torch.Tensor:
        """Boolean mask of samples with at least one finite loss."""
        return self.last_epoch >= 0

    def seen_mean(self, values: torch.Tensor) -> torch.Tensor:
        """The float64 mean of ``values`` over the seen samples (0 when none is seen):
        :func:`masked_mean` with :attr:`seen`."""
        return masked_mean(values, self.seen)

    def std(self) -> torch.Tensor:
        """Standard deviation of each sample's loss (float32)."""
        return self.var.clamp(min=0).sqrt()

    def frequency(self, rounds: int) -> torch.Tensor:
        """Fraction of ``rounds`` pruned epochs in which each sample was planned (float32)."""
        rounds = check_int("rounds", rounds, minimum=0)
        return self.selected.float() / max(rounds, 1)

    def read_invalid_later(self):
        """Start reading :attr:`invalid_batches` without waiting; return a function giving it.

        On a GPU the counter is copied into pinned memory behind the work queued so far, so a wait
        at the end of a plan is for that copy only, not for the plan's own work.
        """
        counter = self.invalid_batches
        if counter.device.type != "cuda":
            return lambda: int(counter)
        host = torch.empty((), dtype=torch.int64, pin_memory=True)
        host.copy_(counter, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def result() -> int:
            done.synchronize()
            return int(host)
        return result

    def selection_stats(self, rounds: int, always: float = 0.9, never: float = 0.1) -> dict:
        """The paper's "sometimes" samples: how often each sample was planned in ``rounds`` pruned
        epochs.

        Returns:
            dict with ``frequency`` (float32 tensor of N, on the CPU), ``rounds``, and the
            fractions of samples planned in more than ``always``, fewer than ``never``, and in
            between (``sometimes``) of the rounds.
        """
        always = check_float("always", always, low=0.0, high=1.0)
        never = check_float("never", never, low=0.0, high=1.0)
        freq = self.frequency(rounds).cpu()
        n = freq.numel()
        hi = int((freq > always).sum())
        lo = int((freq < never).sum())
        return {"frequency": freq, "rounds": rounds, "always": hi / n, "never": lo / n,
                "sometimes": (n - hi - lo) / n}

    def nbytes(self) -> int:
        """Bytes held by the state tensors."""
        return sum(t.numel() * t.element_size() for t in self._all())

    def _all(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in (*self.PER_SAMPLE, *self.COUNTERS)]

    def clone(self) -> "LossStats":
        """An independent copy (same device)."""
        other = LossStats.__new__(LossStats)
        other.num_samples, other.device = self.num_samples, self.device
        for name in (*self.PER_SAMPLE, *self.COUNTERS):
            setattr(other, name, getattr(self, name).clone())
        return other

    def assign(self, other: "LossStats") -> None:
        """Take ``other``'s tensors as this state's (a commit: attribute assignments only)."""
        (self.mean, self.var, self.last_epoch, self.selected, self.nonfinite,
         self.invalid_batches) = (other.mean, other.var, other.last_epoch, other.selected,
                                  other.nonfinite, other.invalid_batches)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The tensors (cloned, on this device)."""
        return {name: getattr(self, name).clone() for name in (*self.PER_SAMPLE, *self.COUNTERS)}

    def check_state_dict(self, state, *, max_epoch: int | None = None, max_selected: int | None = None,
                         key: str = "stats") -> None:
        """Raise TypeError/ValueError naming the entry if ``state`` cannot be this state.

        Checks every entry's presence, shape and dtype, and the values: finite means, finite
        non-negative variances, ``-1 <= last_epoch <= max_epoch``, ``0 <= selected <= max_selected``,
        counters in ``[0, MAX_COUNT]``. Changes nothing.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state_dict[{key!r}] must be a dict from LossStats.state_dict(), got "
                            f"{type(state).__name__}")
        expected = {**{n: ((self.num_samples,), d) for n, d in self.PER_SAMPLE.items()},
                    **{n: ((), torch.int64) for n in self.COUNTERS}}
        extra = sorted(set(state) - set(expected), key=str)
        if extra:
            raise ValueError(f"state_dict[{key!r}] has unknown entries {extra}")
        for name, (shape, dtype) in expected.items():
            if name not in state:
                raise ValueError(f"state_dict[{key!r}] is missing {name!r}")
            t = state[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"state_dict[{key!r}][{name!r}] must be a {shape} {dtype} tensor, "
                                 f"got {got}")
        mean, var = state["mean"], state["var"]
        if not bool(torch.isfinite(mean).all()):
            raise ValueError(f"state_dict[{key!r}]['mean'] holds non-finite values")
        if not bool((torch.isfinite(var) & (var >= 0)).all()):
            raise ValueError(f"state_dict[{key!r}]['var'] holds negative or non-finite values")
        last = state["last_epoch"]
        hi = int(last.max()) if last.numel() else -1
        if int(last.min()) < -1 or (max_epoch is not None and hi > max_epoch):
            raise ValueError(f"state_dict[{key!r}]['last_epoch'] must lie in [-1, "
                             f"{max_epoch if max_epoch is not None else '...'}], got "
                             f"[{int(last.min())}, {hi}]")
        sel = state["selected"]
        if int(sel.min()) < 0 or (max_selected is not None and int(sel.max()) > max_selected):
            raise ValueError(f"state_dict[{key!r}]['selected'] must lie in [0, {max_selected}], got "
                             f"[{int(sel.min())}, {int(sel.max())}]")
        for name in self.COUNTERS:
            count = int(state[name])
            if not 0 <= count <= self.MAX_COUNT:
                raise ValueError(f"state_dict[{key!r}][{name!r}] must lie in [0, 2**53], got "
                                 f"{count}")

    def load_state_dict(self, state: dict, *, max_epoch: int | None = None,
                        max_selected: int | None = None) -> None:
        """Restore a :meth:`state_dict` after checking it whole (see :meth:`check_state_dict`);
        a state that does not fit raises and changes nothing."""
        self.check_state_dict(state, max_epoch=max_epoch, max_selected=max_selected)
        for name in (*self.PER_SAMPLE, *self.COUNTERS):
            getattr(self, name).copy_(state[name].to(self.device))
