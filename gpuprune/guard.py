"""The coverage guard: each rank checks that it trained the samples planned for it.

gpuprune's promise, that every rank trains exactly its share of each epoch's plan, holds when the
loop iterates gpuprune's loader once per epoch after ``set_epoch(epoch)``. Frameworks and loops can
break it without any error (issue 19): a loader sharded a second time (Lightning's
``DistributedSamplerWrapper`` around a sampler that is not a ``DistributedSampler``,
``accelerator.prepare(loader)`` with several processes), epochs cut to the first epoch's length, a
loop without ``set_epoch`` (every epoch trains epoch 0's plan again), a 1-based loop (epoch 0 is
never trained). The guard makes each of them loud with a :class:`CoverageWarning`, each kind once
per run, at the cost of a few integer operations on the host per batch:

* a loader that starts a pass over this rank's share (:meth:`gpuprune.shard.EpochShard.begin`, what
  :class:`~gpuprune.PrunedSampler` and the DALI iterator call) reports how many samples it serves;
* :meth:`gpuprune.Pruner.observe` adds the batch's length (tensor metadata: no device read, no
  synchronisation, no collective) to a host counter; inside ``torch.compile`` an opaque op does it
  when the compiled step runs (:mod:`gpuprune.library`), so compiled steps count and warn alike;
* **too many**: once this epoch's count passes the samples served plus the largest batch, the same
  plan is being trained again (checked in ``observe``); so is a second pass that a loader starts
  over the same epoch without ``set_epoch`` in between (checked when the pass starts);
* **too few**: when the next epoch is planned, a count below the samples served minus the largest
  batch (less one) means something sharded the loader again or ended the epoch early. An epoch in
  which nothing was observed is not checked (a loop that does not call ``observe``, e.g. uniform
  pruning), and neither is the run's last epoch (nothing plans after it);
* **skipped start**: a Pruner whose first plan is for an epoch after 0, while it holds no history
  (a fresh run, not a resumed one), never trains epoch 0 (a 1-based loop).

The tolerance of one batch lets a loader drop its last short batch (``DataLoader(drop_last=True)``,
DALI's ``DROP``) or pad it (DALI's ``FILL``) without a warning. Each rank checks its own counts:
nothing is exchanged. Epochs no loader served (a loop over ``pruner.plan(e).indices`` itself) are
not checked.
"""

from __future__ import annotations

import warnings

from ._registry import register

__all__ = ["CoverageWarning", "CoverageGuard"]

#: the fixes named by the warning that a rank trained too few of its samples
_SHORT_FIXES = (
    "Something shards the loader again or ends its epochs early: PyTorch Lightning with a sampler "
    "that is not a DistributedSampler (its DistributedSamplerWrapper), or without "
    "gpuprune.integrations.lightning.PruningCallback (it cuts every epoch to the first one's "
    "length); accelerator.prepare(loader) with several processes; the Hugging Face Trainer's own "
    "loader; a break or limit_train_batches. Pass sampler=pruner.sampler() itself and "
    "callbacks=[PruningCallback()] (Lightning), prepare the loader with "
    "gpuprune.integrations.accelerate.prepare_data_loader (accelerate), use "
    "gpuprune.integrations.transformers.PruningTrainer (Trainer); see docs/integrations.md")

#: how to call set_epoch, in every warning about a plan trained again
_SET_EPOCH = ("Call loader.sampler.set_epoch(epoch) before each epoch (epochs count from 0, as "
              "with DistributedSampler), on one sampler kept for the whole run")


class CoverageWarning(UserWarning):
    """A rank trained fewer samples than planned for it, trained a plan again, or skipped epoch 0.

    Each kind is raised once per run (per :class:`~gpuprune.Pruner`). Silence it with
    ``warnings.filterwarnings("ignore", category=gpuprune.CoverageWarning)``; turn it into an error
    (for CI) with ``"error"``.
    """


class CoverageGuard:
    """One rank's count of the samples it observed in the current epoch against the samples its
    loader serves. Held by a :class:`~gpuprune.Pruner` as :attr:`~gpuprune.Pruner.coverage`; the
    Pruner and the loaders call it, users only read it.

    Attributes:
        epoch: the epoch of the current plan (None before the first).
        observed: samples observed in that epoch on this rank (a re-score pass's are not counted).
        largest: the largest batch observed in it (the tolerance of the checks).
    """

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self.epoch: int | None = None
        self.observed = 0
        self.largest = 0
        self._serving: dict[tuple[int, int], int] = {}   # (rank, num_replicas) -> samples served
        self._warned: set[str] = set()
        #: this guard's key for the op that counts a compiled step's batches (:mod:`gpuprune.library`)
        self.key = register(self)

    def __setstate__(self, state: dict) -> None:
        # a copy (pickle, deepcopy) is another guard: it counts under a key of its own
        self.__dict__.update(state)
        self.key = register(self)

    @property
    def expected(self) -> int | None:
        """Samples this epoch's loader passes serve on this rank (the last pass of each loader
        shard), or None when no loader has started a pass in this epoch."""
        return sum(self._serving.values()) if self._serving else None

    # ------------------------------------------------------------------ events
    def begin(self, shard: tuple[int, int], epoch: int, size: int, again: bool) -> None:
        """A loader starts a pass of ``size`` samples over share ``shard`` = ``(rank,
        num_replicas)`` of ``epoch``; ``again``: that loader already started one over the same
        epoch since its last ``set_epoch``."""
        if epoch != self.epoch:
            return
        if again:
            self._warn("again", f"gpuprune: rank {self.rank}'s loader starts another pass over "
                                f"epoch {epoch}'s plan without set_epoch, so it trains epoch "
                                f"{epoch}'s samples again: a loop that never calls set_epoch "
                                f"trains epoch {epoch}'s samples in every epoch. {_SET_EPOCH}.")
        self._serving[shard] = size

    def observe(self, size: int) -> None:
        """A batch of ``size`` samples was observed (host integers only)."""
        self.observed += size
        if size > self.largest:
            self.largest = size
        if self._serving and "again" not in self._warned:
            expected = sum(self._serving.values())
            if self.observed > expected + self.largest:
                self._warn("again", f"gpuprune: rank {self.rank} observed {self.observed} samples "
                                    f"in epoch {self.epoch}, whose plan gives it {expected}: the "
                                    f"same plan is being trained again (the loop iterates the "
                                    f"loader again without set_epoch, or set_epoch({self.epoch}) "
                                    f"was called again), so every epoch trains epoch "
                                    f"{self.epoch}'s samples. {_SET_EPOCH}.", stacklevel=4)

    def planned(self, epoch: int, first: bool) -> None:
        """A new plan of ``epoch`` became current (``first``: the Pruner had no plan and no
        history): check the epoch that ends, then count the new one from zero."""
        expected = self.expected
        if expected is not None and 0 < self.observed < expected - (self.largest - 1):
            self._warn("short", f"gpuprune: rank {self.rank} trained {self.observed} of the "
                                f"{expected} samples planned for it in epoch {self.epoch} "
                                f"({100 * self.observed / expected:.0f}%). {_SHORT_FIXES}.")
        if first and epoch > 0:
            never = "epoch 0 is" if epoch == 1 else f"epochs 0 to {epoch - 1} are"
            self._warn("skipped", f"gpuprune: the first epoch planned is epoch {epoch}, so {never} "
                                  f"never trained: epochs count from 0, as with "
                                  f"DistributedSampler.set_epoch. A loop `for epoch in range(1, "
                                  f"num_epochs + 1)` skips epoch 0 (a full warm-up epoch, if any) "
                                  f"and fails at its last epoch: use range(num_epochs). Resuming? "
                                  f"Load the Pruner's state_dict before planning.")
        self.restart(epoch)

    def restart(self, epoch: int | None) -> None:
        """Count ``epoch`` from zero (a new plan, or a restored state), with no loader pass yet."""
        self.epoch, self.observed, self.largest = epoch, 0, 0
        self._serving = {}

    def _warn(self, kind: str, message: str, stacklevel: int = 3) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, CoverageWarning, stacklevel=stacklevel)

    def __repr__(self) -> str:
        return (f"CoverageGuard(rank={self.rank}, epoch={self.epoch}, observed={self.observed}, "
                f"expected={self.expected})")
