"""Per-sample loss statistics kept on the training device.

The state is a set of flat tensors (structure of arrays), 20 bytes per sample:

=============  =======  ==============================================================
``mean``       float32  exponentially weighted mean of the sample's loss
``var``        float32  exponentially weighted variance of the loss
``count``      int32    number of finite losses observed
``last_epoch`` int32    last epoch in which a finite loss was observed (-1: never)
``selected``   int32    number of pruned epochs the sample was planned in
=============  =======  ==============================================================

Update rule
-----------
With ``alpha = 1 - decay``, one observation x of a seen sample (Finch 2009, "Incremental calculation
of weighted mean and variance")::

    d = x - mean;  mean += alpha * d;  var = (1 - alpha) * (var + alpha * d**2)

A sample that appears c times in one call is merged exactly and order-free: its c finite values form
one group of weight ``a = 1 - decay**c`` (what c observations of the same value would get), with group
mean ``m`` and within-group variance ``w``, combined with the old state by the weighted-mixture
formula::

    mean' = mean + a * (m - mean)
    var'  = (1 - a) * var + a * w + a * (1 - a) * (m - mean)**2

For c = 1 this is exactly Finch's update. The first observation of a sample sets ``a = 1`` (the mean
becomes the loss, the variance the within-group spread). Non-finite losses are skipped and counted,
and a variance too large for float32 saturates at its largest finite value, so the state stays
finite whatever the losses.

All updates are gathers, a B-element sort and scatters: no ``.item()``, no boolean indexing and no
data-dependent shapes, so ``observe`` never waits for the GPU.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._checks import check_batch, check_bool, check_float, check_int, resolve_device
from .kernels import resolve_backend

__all__ = ["ScoreBank", "merge_groups"]

_F32_MAX = float(torch.finfo(torch.float32).max)


def merge_groups(mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, n_new: torch.Tensor,
                 sum_d: torch.Tensor, sum_d2: torch.Tensor, decay: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge groups of new losses into EMA state (pure function; float64 arithmetic).

    Args:
        mean, var, count: old state of the affected samples.
        n_new: number of finite new losses per sample (may be 0: the state is returned unchanged).
        sum_d, sum_d2: sums of ``x - mean`` and ``(x - mean)**2`` over the new losses (shifted by
            the old mean for numerical stability).
        decay: weight kept from the old value per observation, in [0, 1).

    Returns:
        ``(mean', var', count')`` with the dtypes of the inputs.
    """
    n = n_new.double()
    c = n.clamp(min=1.0)
    dm = sum_d.double() / c                                   # group mean - old mean
    within = (sum_d2.double() / c - dm * dm).clamp(min=0.0)   # within-group variance
    a = 1.0 - torch.pow(torch.full_like(n, decay), n)
    a = torch.where(count > 0, a, torch.ones_like(a))         # first visit: take the group as is
    a = torch.where(n > 0, a, torch.zeros_like(a))            # nothing new: keep the state
    m64 = mean.double()
    new_mean = m64 + a * dm
    new_var = (1.0 - a) * var.double() + a * within + a * (1.0 - a) * dm * dm
    # finite losses far apart (|x| ~ 1e19) give a variance beyond float32: saturate, never inf
    new_var = new_var.clamp(max=_F32_MAX)
    new_count = count + n_new.to(count.dtype)
    return new_mean.to(mean.dtype), new_var.to(var.dtype), new_count


class ScoreBank:
    """Exponentially weighted loss statistics for N samples, on one device.

    Args:
        num_samples: N, the dataset size (> 0).
        device: where the state lives (default ``"cpu"``); pass the training GPU to keep it there.
        decay: weight kept from the old mean/variance per observation, in [0, 1). Default ``0.9``
            (InfoBatch's smoothing coefficient). ``0`` keeps only the latest loss.
        deferred: if True, ``observe`` only accumulates this epoch's sums and :meth:`commit` merges
            them (used by multi-process training, where the sums are all-reduced first).
        backend: ``"auto"`` (default): the CUDA kernels of :mod:`gpuprune.kernels` on a CUDA device
            where CuPy loads them, else torch; ``"cuda"``: the kernels or an error saying why not;
            ``"torch"``: the torch reference. Both give the same state and the same selections.

    Example:
        >>> bank = ScoreBank(4)
        >>> bank.observe(torch.tensor([0, 2, 2]), torch.tensor([1.0, 2.0, 4.0]))
        >>> bank.mean.tolist()
        [1.0, 0.0, 3.0, 0.0]
    """

    def __init__(self, num_samples: int, device: torch.device | str = "cpu", decay: float = 0.9,
                 deferred: bool = False, backend: str = "auto") -> None:
        self.num_samples = check_int("num_samples", num_samples, minimum=1)
        self.decay = check_float("decay", decay, low=0.0, high=1.0, high_open=True)
        self.device = resolve_device(device)
        self.deferred = check_bool("deferred", deferred)
        n, dev = self.num_samples, self.device
        self.mean = torch.zeros(n, dtype=torch.float32, device=dev)
        self.var = torch.zeros(n, dtype=torch.float32, device=dev)
        self.count = torch.zeros(n, dtype=torch.int32, device=dev)
        self.last_epoch = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.selected = torch.zeros(n, dtype=torch.int32, device=dev)
        # Device-side counters: read them only when you are ready to sync.
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=dev)
        self.invalid_batches = torch.zeros((), dtype=torch.int64, device=dev)
        self.epoch = 0
        self._acc: torch.Tensor | None = None  # deferred mode: (3, N) float64 [count, sum_d, sum_d2]
        #: the kernel backend (a :class:`gpuprune.kernels.KernelOps`), or None for torch
        self.kernels = resolve_backend(backend, dev, n)
        self._invalid_read: int | None = None  # invalid_batches as read by host_counts()

    @property
    def backend(self) -> str:
        """``"cuda"`` when the kernels run the update and the selections, else ``"torch"``."""
        return "torch" if self.kernels is None else "cuda"

    # ------------------------------------------------------------------ observe
    def observe(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Record one batch of per-sample losses (no host synchronisation).

        Args:
            indices: 1-D integer tensor of sample ids in [0, N), on the bank's device. Duplicates
                are merged exactly (see the module docstring).
            losses: 1-D float tensor of the same length; it is detached. NaN/inf entries are
                skipped and added to :attr:`nonfinite`.

        On CPU an out-of-range id raises ``ValueError`` before anything changes. On a GPU the check
        would need a sync, so a batch holding one is ignored as a whole and counted in
        :attr:`invalid_batches`; :meth:`raise_if_invalid` (called by ``Pruner.plan``) raises then.
        """
        check_batch(indices, losses, self.device, self.num_samples)
        if indices.numel() == 0:
            return
        self._invalid_read = None
        if self.kernels is not None and not self.deferred:
            self.kernels.observe(self, indices, losses)   # the same update, fused into one kernel
            return
        idx = indices.long()
        x = losses.detach().to(torch.float32)
        finite = torch.isfinite(x)
        if self.device.type == "cpu":
            ok = torch.ones((), dtype=torch.bool)
        else:
            ok = (idx.min() >= 0) & (idx.max() < self.num_samples)
            idx = idx.clamp(0, self.num_samples - 1)   # keep the gathers in range; weights are 0
            self.invalid_batches += (~ok).long()
        use = finite & ok
        self.nonfinite += (~finite & ok).sum()
        if self.deferred:
            self._accumulate(idx, x, use)
        else:
            self._update(idx, x, use)

    def _update(self, idx: torch.Tensor, x: torch.Tensor, use: torch.Tensor) -> None:
        b = idx.numel()
        sidx, perm = torch.sort(idx, stable=True)
        x, use = x[perm], use[perm]
        start = torch.ones(b, dtype=torch.bool, device=idx.device)
        start[1:] = sidx[1:] != sidx[:-1]
        seg = torch.cumsum(start, 0) - 1                       # segment id per element, < b
        mu = self.mean[sidx]
        d = torch.where(use, x.double() - mu.double(), torch.zeros((), dtype=torch.float64,
                                                                    device=idx.device))
        z = torch.zeros(b, dtype=torch.float64, device=idx.device)
        n_new = z.index_add(0, seg, use.double())[seg]
        s1 = z.index_add(0, seg, d)[seg]
        s2 = z.index_add(0, seg, d * d)[seg]
        count = self.count[sidx]
        mean, var, cnt = merge_groups(mu, self.var[sidx], count, n_new, s1, s2, self.decay)
        # every member of a segment writes the same values, so duplicate writes are harmless
        self.mean[sidx] = mean
        self.var[sidx] = var
        self.count[sidx] = cnt
        seen = torch.where(n_new > 0, torch.full_like(count, self.epoch), self.last_epoch[sidx])
        self.last_epoch[sidx] = seen

    def _accumulate(self, idx: torch.Tensor, x: torch.Tensor, use: torch.Tensor) -> None:
        if self._acc is None:
            self._acc = torch.zeros(3, self.num_samples, dtype=torch.float64, device=self.device)
        d = torch.where(use, x.double() - self.mean[idx].double(),
                        torch.zeros((), dtype=torch.float64, device=idx.device))
        self._acc[0].index_add_(0, idx, use.double())
        self._acc[1].index_add_(0, idx, d)
        self._acc[2].index_add_(0, idx, d * d)

    def pending(self) -> torch.Tensor:
        """This epoch's accumulated sums in deferred mode, a (3, N) float64 tensor (zeros if none).

        Reduce it across processes in place (e.g. ``dist.all_reduce``) before :meth:`commit`.
        """
        if self._acc is None:
            self._acc = torch.zeros(3, self.num_samples, dtype=torch.float64, device=self.device)
        return self._acc

    def commit(self, reduce: Callable[[torch.Tensor], None] | None = None) -> None:
        """Merge the accumulated sums of deferred mode into the state, then clear them.

        Args:
            reduce: optional in-place reduction applied to :meth:`pending` first (for example an
                all-reduce over ranks), so that every process merges the same sums.
        """
        if reduce is not None and not callable(reduce):
            raise TypeError(f"reduce must be callable or None, got {type(reduce).__name__} {reduce!r}")
        acc = self.pending()
        self._invalid_read = None          # a reduce may change the counters (see distributed.py)
        if reduce is not None:
            reduce(acc)
        n_new = acc[0]
        mean, var, cnt = merge_groups(self.mean, self.var, self.count, n_new, acc[1], acc[2],
                                      self.decay)
        self.mean.copy_(mean)
        self.var.copy_(var)
        self.count.copy_(cnt)
        self.last_epoch.copy_(torch.where(n_new > 0, torch.full_like(self.last_epoch, self.epoch),
                                          self.last_epoch))
        acc.zero_()

    def host_counts(self, *values: torch.Tensor) -> list[int]:
        """Read integer device scalars, together with :attr:`invalid_batches`, in one transfer.

        The invalid-batch count read here serves the next :meth:`raise_if_invalid` (unless a batch is
        observed in between), so a plan that needs one value from the device syncs only once.
        """
        got = torch.stack([self.invalid_batches.reshape(()).long(),
                           *(v.reshape(()).long() for v in values)]).tolist()
        self._invalid_read = got[0]
        return got[1:]

    def raise_if_invalid(self) -> None:
        """Raise ValueError if a GPU batch with out-of-range ids was ignored (one host sync, none if
        :meth:`host_counts` has just read the counter)."""
        bad = int(self.invalid_batches) if self._invalid_read is None else self._invalid_read
        self._invalid_read = None
        if bad:
            self.invalid_batches.zero_()
            raise ValueError(f"observe() received indices outside [0, {self.num_samples}) in {bad} "
                             f"batch(es); those batches were not recorded")

    # ------------------------------------------------------------------ views
    @property
    def seen(self) -> torch.Tensor:
        """Boolean mask of samples with at least one finite loss."""
        return self.count > 0

    def std(self) -> torch.Tensor:
        return self.var.clamp(min=0).sqrt()

    def selection_frequency(self, rounds: int) -> torch.Tensor:
        """Fraction of ``rounds`` pruned epochs in which each sample was planned (float32)."""
        rounds = check_int("rounds", rounds, minimum=0)
        return self.selected.float() / max(rounds, 1)

    # ------------------------------------------------------------------ state
    _TENSORS = ("mean", "var", "count", "last_epoch", "selected", "nonfinite", "invalid_batches")

    def state_dict(self) -> dict:
        state = {name: getattr(self, name).clone() for name in self._TENSORS}
        state.update(num_samples=self.num_samples, decay=self.decay, epoch=self.epoch,
                     pending=None if self._acc is None or not bool(self._acc.any()) else self._acc.clone())
        return state

    def check_state_dict(self, state: dict) -> None:
        """Raise TypeError/ValueError if ``state`` cannot be loaded into this bank (changes nothing)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from ScoreBank.state_dict(), got "
                            f"{type(state).__name__}")
        missing = [key for key in (*self._TENSORS, "num_samples", "decay", "epoch") if key not in state]
        if missing:
            raise ValueError(f"state_dict is missing {missing}")
        if state["num_samples"] != self.num_samples:
            raise ValueError(f"state_dict is for num_samples={state['num_samples']!r}, "
                             f"this bank has num_samples={self.num_samples}")
        for name in self._TENSORS:
            t, mine = state[name], getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.shape != mine.shape or t.dtype != mine.dtype:
                got = (f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor)
                       else type(t).__name__)
                raise ValueError(f"state_dict[{name!r}] must be a {tuple(mine.shape)} {mine.dtype} "
                                 f"tensor, got {got}")
        check_float("state_dict['decay']", state["decay"], low=0.0, high=1.0, high_open=True)
        check_int("state_dict['epoch']", state["epoch"], minimum=0)
        pend = state.get("pending")
        if pend is not None and (not isinstance(pend, torch.Tensor)
                                 or pend.shape != (3, self.num_samples)):
            raise ValueError(f"state_dict['pending'] must be None or a (3, {self.num_samples}) tensor")

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; sizes and dtypes must match. Tensors go to this bank's device.

        Raises TypeError/ValueError before changing anything if ``state`` does not fit.
        """
        self.check_state_dict(state)
        self._invalid_read = None
        for name in self._TENSORS:
            getattr(self, name).copy_(state[name].to(self.device))
        self.decay = float(state["decay"])
        self.epoch = int(state["epoch"])
        pend = state.get("pending")
        self._acc = None if pend is None else pend.to(self.device, torch.float64).clone()
