"""Scores for the static baselines, computed from a model before (or during) a scoring run.

* EL2N (Paul et al., NeurIPS 2021): ``|| softmax(f(x)) - onehot(y) ||_2`` early in training,
  averaged over a few independently trained models; keep the highest.
* Forgetting (Toneva et al., ICLR 2019): how often a sample goes from correctly to incorrectly
  classified between two consecutive presentations over a full training run; samples never learned
  count as forgotten infinitely often; keep the highest.

Both cost training time before the pruned run starts; benchmarks must charge it.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from ._checks import check_batch, check_int, resolve_device

__all__ = ["el2n_scores", "ForgettingTracker"]


@torch.no_grad()
def el2n_scores(model: torch.nn.Module, loader: Iterable, num_samples: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """EL2N score of every sample under ``model`` (eval mode, no gradients).

    Args:
        model: a classifier returning logits.
        loader: yields ``(inputs, labels, indices)`` batches (e.g. over :class:`IndexedDataset`).
        num_samples: N; every index in [0, N) must appear at least once.
        device: where the model runs.

    Returns:
        float32 tensor of N scores on the CPU.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    num_samples = check_int("num_samples", num_samples, minimum=1)
    dev = resolve_device(device)
    if not hasattr(loader, "__iter__"):
        raise TypeError(f"loader must be iterable, got {type(loader).__name__}")
    out = torch.full((num_samples,), float("nan"))
    covered = torch.zeros(num_samples, dtype=torch.bool)
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) != 3:
                got = (f"{len(batch)} items" if isinstance(batch, (tuple, list))
                       else type(batch).__name__)
                raise ValueError(f"loader must yield (inputs, labels, indices) batches, got {got}")
            x, y, idx = batch
            idx = torch.as_tensor(idx).long().cpu()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_samples):
                raise ValueError(f"indices must lie in [0, {num_samples}), got "
                                 f"[{int(idx.min())}, {int(idx.max())}]")
            logits = model(x.to(dev))
            p = F.softmax(logits.float(), dim=1)
            y = torch.as_tensor(y).to(dev).long()
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= p.shape[1]):
                raise ValueError(f"labels must lie in [0, {p.shape[1]}) for {p.shape[1]} logits, "
                                 f"got [{int(y.min())}, {int(y.max())}]")
            onehot = F.one_hot(y, p.shape[1]).float()
            out[idx] = (p - onehot).norm(dim=1).cpu()
            covered[idx] = True
    finally:
        model.train(was_training)
    bad = torch.isnan(out) & covered
    if bool(bad.any()):
        ids = bad.nonzero().flatten()
        raise ValueError(f"the model's outputs are not finite for {ids.numel()} of {num_samples} "
                         f"samples (ids {ids[:10].tolist()}{' ...' if ids.numel() > 10 else ''}): "
                         f"their EL2N score is undefined")
    missing = int((~covered).sum())
    if missing:
        raise ValueError(f"loader did not cover the dataset: {missing} of {num_samples} samples "
                         "have no EL2N score")
    return out


class ForgettingTracker:
    """Count forgetting events per sample during a scoring run.

    Call :meth:`update` with each training batch's correctness. :meth:`counts` gives the forgetting
    counts, with never-learned samples at +inf (they are the hardest to keep).
    """

    def __init__(self, num_samples: int, device: torch.device | str = "cpu") -> None:
        self.num_samples = check_int("num_samples", num_samples, minimum=1)
        self.device = resolve_device(device)
        self.prev = torch.zeros(self.num_samples, dtype=torch.bool, device=self.device)
        self.learned = torch.zeros(self.num_samples, dtype=torch.bool, device=self.device)
        self.forgotten = torch.zeros(self.num_samples, dtype=torch.int32, device=self.device)

    def update(self, indices: torch.Tensor, correct: torch.Tensor) -> None:
        """Record one batch: ``correct[j]`` says whether sample ``indices[j]`` was classified right."""
        if not isinstance(correct, torch.Tensor) or correct.dtype != torch.bool:
            raise TypeError("correct must be a bool torch.Tensor, got "
                            f"{getattr(correct, 'dtype', type(correct).__name__)}")
        check_batch(indices, correct.float(), self.device, self.num_samples, loss_name="correct")
        idx = indices.long()
        self.forgotten.index_add_(0, idx, (self.prev[idx] & ~correct).int())
        self.prev[idx] = correct
        self.learned[idx] |= correct

    def counts(self) -> torch.Tensor:
        """float32 forgetting counts; +inf for samples never classified correctly."""
        c = self.forgotten.float()
        return torch.where(self.learned, c, torch.full_like(c, float("inf")))
