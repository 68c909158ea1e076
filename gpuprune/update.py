"""The statistics update, in torch: the reference the CUDA observe kernel matches bit for bit.

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
and a variance too large for float32 saturates at its largest finite value, so the state stays finite
whatever the losses.

All updates are gathers, a B-element sort and scatters: no ``.item()``, no boolean indexing and no
data-dependent shapes, so an update never waits for the GPU. On the CPU, where reading values costs
nothing, a batch of distinct ids (the usual case: a sampler without replacement) takes a fast path:
one observation per sample, so no sort, no segment sums and no ``decay ** c``, in numpy, with the
same roundings in the same order as the general path (a test compares the two bit for bit).
"""

from __future__ import annotations

import numpy as np
import torch

from .keys import F32_MAX
from .stats import StatsTensors

__all__ = ["merge_groups", "prepare_losses", "observe_torch", "observe_distinct_cpu", "observe_groups",
           "F32_MAX"]



def prepare_losses(losses: torch.Tensor) -> torch.Tensor:
    """Losses as float32, detached. Finite values beyond the float32 range (float64 inputs such as
    1e300) saturate at +-3.4e38 like other huge losses; NaN and +-inf stay as they are (skipped)."""
    x = losses.detach()
    if x.dtype == torch.float64:
        x = torch.where(torch.isfinite(x), x.clamp(-F32_MAX, F32_MAX), x)
    return x.to(torch.float32)


def int_pow(base: float, n: torch.Tensor, max_n: int) -> torch.Tensor:
    """``base ** n`` for whole ``0 <= n <= max_n`` (float64), by binary exponentiation.

    The same round-to-nearest multiplies in the same order on every device and in the CUDA kernel,
    so the result never depends on a ``pow`` library (torch's CPU pow and CUDA's libdevice pow
    differ in the last bit for some inputs). ``max_n`` bounds the loop (the batch size).
    """
    e = n.long()
    r = torch.ones_like(n, dtype=torch.float64)
    b = torch.full_like(r, base)
    for bit in range(max(int(max_n), 1).bit_length()):
        r = torch.where((e >> bit) & 1 == 1, r * b, r)
        b = b * b
    return r


def merge_groups(mean: torch.Tensor, var: torch.Tensor, seen: torch.Tensor, n_new: torch.Tensor,
                 sum_d: torch.Tensor, sum_d2: torch.Tensor, decay: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge groups of new losses into EMA state (pure function; float64 arithmetic).

    Args:
        mean, var: old state of the affected samples (float32).
        seen: whether each sample had a finite loss before (bool).
        n_new: number of finite new losses per sample (may be 0: the state is returned unchanged).
        sum_d, sum_d2: sums of ``x - mean`` and ``(x - mean)**2`` over the new losses (shifted by
            the old mean for numerical stability).
        decay: weight kept from the old value per observation, in [0, 1).

    Returns:
        ``(mean', var')`` as float32.
    """
    n = n_new.double()
    c = n.clamp(min=1.0)
    dm = sum_d.double() / c                                   # group mean - old mean
    within = (sum_d2.double() / c - dm * dm).clamp(min=0.0)   # within-group variance
    a = 1.0 - int_pow(decay, n, n.numel())              # a group has at most numel() losses
    a = torch.where(seen, a, torch.ones_like(a))              # first visit: take the group as is
    a = torch.where(n > 0, a, torch.zeros_like(a))            # nothing new: keep the state
    new_mean = mean.double() + a * dm
    new_var = (1.0 - a) * var.double() + a * within + a * (1.0 - a) * dm * dm
    # finite losses far apart (|x| ~ 1e19) give a variance beyond float32: saturate, never inf
    new_var = new_var.clamp(max=F32_MAX)
    return new_mean.to(mean.dtype), new_var.to(var.dtype)


def _segment_sums(seg: torch.Tensor, values: list[torch.Tensor], exact: bool) -> list[torch.Tensor]:
    """Per-segment sums of ``values`` (B entries each, segments of the sorted batch), broadcast back.

    Sums run in batch order within a segment: sequential ``index_add`` on the CPU. On CUDA
    ``index_add`` adds 3+ copies of one id in an arbitrary order; ``exact=True`` (used by the
    distributed merge, once per epoch) adds them one rank of occurrence at a time instead, which is
    deterministic and equal to the sequential order, at the cost of one host read.
    """
    b = seg.numel()
    out = [torch.zeros(b, dtype=torch.float64, device=seg.device) for _ in values]
    if not exact or seg.device.type == "cpu":
        for o, v in zip(out, values):
            o.index_add_(0, seg, v)
        return [o[seg] for o in out]
    first = torch.ones(b, dtype=torch.bool, device=seg.device)
    first[1:] = seg[1:] != seg[:-1]
    pos = torch.arange(b, device=seg.device)
    occurrence = pos - torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
    for r in range(int(occurrence.max()) + 1 if b else 0):     # the one host read
        at = occurrence == r
        for o, v in zip(out, values):
            o.index_add_(0, seg, torch.where(at, v, torch.zeros_like(v)))
    return [o[seg] for o in out]


def observe_torch(t: StatsTensors, ids: torch.Tensor, losses: torch.Tensor, decay: float,
                  epoch: int, *, exact: bool = False) -> None:
    """Apply one batch of observations to the state in place (the torch backend).

    ``ids`` are validated by the caller for dtype, shape and device; on the CPU also for range. On
    a GPU an out-of-range id makes the whole batch ignored and counted in ``invalid_batches``,
    without a host read. ``losses`` come from :func:`prepare_losses`. On the CPU a batch of
    distinct ids takes :func:`observe_distinct_cpu`; everything else :func:`observe_groups`.
    """
    if ids.device.type == "cpu" and observe_distinct_cpu(t, ids, losses, decay, epoch):
        return
    observe_groups(t, ids, losses, decay, epoch, exact=exact)


def observe_distinct_cpu(t: StatsTensors, ids: torch.Tensor, losses: torch.Tensor, decay: float,
                         epoch: int) -> bool:
    """:func:`observe_groups` for a CPU batch whose ids are all distinct; returns False (and changes
    nothing) when some id repeats.

    Each sample then gets at most one finite loss x, a group of one: ``n = 1``, group mean x,
    within-group variance exactly 0 and weight ``a = 1 - decay`` (``decay ** 1 = decay`` exactly),
    so :func:`merge_groups` reduces to the operations below, rounded in the same order: the sums
    start from 0.0 as ``index_add`` does (``0.0 + d`` turns a -0.0 into +0.0), ``a * within`` is
    ``+0`` and adds nothing. About ten numpy operations on B values instead of about sixty torch
    operations.
    """
    idx = ids.numpy()
    if idx.size > 1:
        s = np.sort(idx)
        if (s[1:] == s[:-1]).any():
            return False
    x = losses.numpy()
    finite = np.isfinite(x)
    skipped = idx.size - int(np.count_nonzero(finite))
    if skipped:
        counter = t.nonfinite.numpy()
        counter += skipped
    mean, var, last = t.mean.numpy(), t.var.numpy(), t.last_epoch.numpy()
    mu = mean[idx].astype(np.float64)
    seen = last[idx] >= 0
    d = x - mu
    a = 1.0 - decay * seen                                  # 1 - decay; 1 at a first visit
    if skipped:   # a skipped loss is a group of none: a = 0, d = 0, so the state becomes state + 0.0
        d = np.where(finite, d, 0.0)                        # (a -0.0 turns +0.0, as in general)
        a *= finite
    d += 0.0                                                # the segment sum 0.0 + d
    oma = 1.0 - a
    new_var = oma * var[idx].astype(np.float64)             # (1 - a) * var + a * 0 ...
    new_var += a * oma * d * d                              # ... + a * (1 - a) * dm * dm
    mean[idx] = (mu + a * d).astype(np.float32)
    var[idx] = np.minimum(new_var, F32_MAX).astype(np.float32)
    last[idx] = np.where(finite, np.int32(epoch), last[idx])
    return True


def observe_groups(t: StatsTensors, ids: torch.Tensor, losses: torch.Tensor, decay: float,
                   epoch: int, *, exact: bool = False) -> None:
    """The general update (any batch, any device): sort, segment sums, :func:`merge_groups`."""
    n = t.mean.numel()
    idx = ids.long()
    x = losses
    finite = torch.isfinite(x)
    if idx.device.type == "cpu":
        ok = torch.ones((), dtype=torch.bool)
    else:
        ok = (idx.min() >= 0) & (idx.max() < n)
        idx = idx.clamp(0, n - 1)   # keep the gathers in range; the batch is then not used
        t.invalid_batches.add_((~ok).long())
    use = finite & ok
    t.nonfinite.add_((~finite & ok).sum())
    b = idx.numel()
    sidx, perm = torch.sort(idx, stable=True)
    x, use = x[perm], use[perm]
    start = torch.ones(b, dtype=torch.bool, device=idx.device)
    start[1:] = sidx[1:] != sidx[:-1]
    seg = torch.cumsum(start, 0) - 1                       # segment id per element, < b
    mu = t.mean[sidx]
    d = torch.where(use, x.double() - mu.double(),
                    torch.zeros((), dtype=torch.float64, device=idx.device))
    n_new, s1, s2 = _segment_sums(seg, [use.double(), d, d * d], exact)
    last = t.last_epoch[sidx]
    mean, var = merge_groups(mu, t.var[sidx], last >= 0, n_new, s1, s2, decay)
    # every member of a segment writes the same values, so duplicate writes are harmless
    t.mean[sidx] = mean
    t.var[sidx] = var
    t.last_epoch[sidx] = torch.where(n_new > 0, torch.full_like(last, epoch), last)
