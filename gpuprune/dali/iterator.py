"""The drop-in iterator: ``DALIGenericIterator``'s contract over each epoch's pruning plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .._checks import check_int
from ..plan import Plan, num_batches
from ..pruner import Pruner
from ..sampler import shard_of
from .sources import BadSampleError, PlanSource

__all__ = ["PrunedDALIIterator"]


@dataclass
class _Pass:
    """One run over (the rest of) one epoch's plan."""

    epoch: int
    plan: Plan            # this rank's share
    start: int            # first plan batch served (non-zero after a mid-epoch restore)
    total: int            # batches in this rank's full plan
    consumed: int = 0     # batches handed out in this pass
    done: bool = False    # DALI has raised StopIteration for this pass
    looped: bool = False  # iter() was called on this pass (a for loop runs over it)

    @property
    def num_batches(self) -> int:
        return self.total - self.start


class PrunedDALIIterator(DALIGenericIterator):
    """``DALIGenericIterator`` over the samples a :class:`~gpuprune.Pruner` plans for each epoch.

    Yields what ``DALIGenericIterator`` yields, a list with one dict of torch tensors keyed by
    ``output_map``, plus two entries from the plan, both on the Pruner's device:

    * ``index``: the batch's sample ids (int64), ready for ``pruner.observe``;
    * ``weight``: each sample's loss weight (float32; 1.0 unless the policy rescales losses, as
      InfoBatch does).

    The ids are taken from the plan, not from a pipeline output: DALI's external source returns
    iteration ``i``'s data as output ``i``, so the ``j``-th batch of a pass is plan batch
    ``start + j``. (An extra output would cost DALI about 0.1 ms per batch.) The graph must keep
    the samples in their order, as DALI operators do; a batch-permuting graph (``fn.permute_batch``
    on the main samples) would need its own ids.

    Each pass over the iterator is one epoch: the iterator asks ``pruner.plan(epoch)`` for the plan,
    takes this rank's shard, publishes it to the pipeline's
    :class:`~gpuprune.dali.sources.PlanSource`, and only then lets DALI prefetch the epoch.

    Epochs::

        for epoch in range(num_epochs):
            it.set_epoch(epoch)             # optional: without it, epochs count up from 0
            for (batch,) in it:             # batch["data"], batch["label"], batch["index"], batch["weight"]
                loss = pruner.observe(batch["index"], criterion(model(batch["data"]), batch["label"]))

    * ``iter(it)`` (each ``for`` loop) starts the next epoch: the one given to :meth:`set_epoch`,
      else the last one + 1. It continues the current epoch instead when no loop has run over it
      yet (the epoch was started by ``next(it)``, e.g. to peek at a batch) or when it has not
      handed out a batch yet.
    * Leaving an epoch early (``break``) is safe: the next ``for`` loop, :meth:`set_epoch` or
      :meth:`reset` ends it, stops the source and drains the few batches DALI had prefetched, so
      nothing of the old epoch reaches the next one. (A bare ``next(it)`` after a ``break``
      continues the old epoch.)
    * ``len(it)`` is the number of batches of the running epoch (for this rank), or of the epoch
      the next ``iter()`` will start. It never plans: before :meth:`set_epoch` it gives the size
      the schedule predicts (the same on every rank). After a mid-epoch restore it counts the
      remaining batches.
    * :meth:`state_dict` / :meth:`load_state_dict` hold (epoch, batches consumed): restored into a
      fresh pipeline + iterator (and with the Pruner restored too), iteration continues with exactly
      the remaining batches of that epoch, then the same later epochs.

    Args:
        pipelines: one DALI pipeline (or a list holding one) whose graph starts with ``source``.
            One pipeline per process: for several GPUs run one process per GPU, each with its
            ``shard_id``.
        output_map: names of the pipeline's outputs, in order (as for ``DALIGenericIterator``).
        pruner: the :class:`~gpuprune.Pruner` that plans the epochs.
        source: the pipeline's :class:`~gpuprune.dali.sources.PlanSource`.
        last_batch_policy: ``LastBatchPolicy.PARTIAL`` (default: the last batch may be short) or
            ``LastBatchPolicy.DROP`` (it is dropped). ``FILL`` is not supported: it would train on
            samples the plan did not choose.
        shard_id: this rank. Default: the rank in the pruner's process group (0 without one).
        num_shards: number of ranks. Default: the size of the pruner's process group (1 without
            one); a value that disagrees with a distributed pruner raises. Every rank gets an equal
            share of the same plan (:meth:`gpuprune.Plan.shard`): with PARTIAL the plan is padded
            by wrap-around, so up to ``num_shards - 1`` samples appear twice; with DROP it is cut
            to a multiple of ``num_shards``.
        auto_reset: like DALI's: if True, ``next()`` after the end of an epoch starts the next one
            (``StopIteration`` is still raised once at the end). ``iter()`` does that anyway.
            Default ``False``.
        index_name: key of the sample ids in each batch dict. Default ``"index"``.
        weight_name: key of the loss weights. Default ``"weight"``.

    Raises:
        BadSampleError: a file of a :class:`~gpuprune.dali.FileSource` could not be read or decoded
            (the message names the file, the sample id and the epoch). After this or any other
            pipeline error the iterator cannot continue; build a new pipeline and iterator and
            restore the position with :meth:`load_state_dict`.
    """

    def __init__(self, pipelines, output_map: Sequence[str], *, pruner: Pruner, source: PlanSource,
                 last_batch_policy: LastBatchPolicy = LastBatchPolicy.PARTIAL,
                 shard_id: int | None = None, num_shards: int | None = None, auto_reset: bool | str = False, index_name: str = "index",
                 weight_name: str = "weight") -> None:
        pipes = list(pipelines) if isinstance(pipelines, (list, tuple)) else [pipelines]
        if len(pipes) != 1:
            raise ValueError(f"PrunedDALIIterator takes one pipeline, got {len(pipes)}; run one "
                             "process per GPU with its own shard_id instead")
        pipe = pipes[0]
        if not isinstance(pruner, Pruner):
            raise TypeError(f"pruner must be a gpuprune.Pruner, got {type(pruner).__name__}")
        if not isinstance(source, PlanSource):
            raise TypeError(f"source must be a gpuprune.dali PlanSource, got {type(source).__name__}")
        if source.batch_size is None:
            raise ValueError("source is not part of the pipeline: call source.outputs() in its "
                             "definition (or use gpuprune.dali.build_iterator)")
        if source.batch_size != pipe.max_batch_size:
            raise ValueError(f"source belongs to a pipeline of batch_size={source.batch_size}, this "
                             f"pipeline has batch_size={pipe.max_batch_size}")
        if pruner.num_samples != source.num_samples:
            raise ValueError(f"the pruner plans {pruner.num_samples} samples but the source holds "
                             f"{source.num_samples}")
        if last_batch_policy not in (LastBatchPolicy.PARTIAL, LastBatchPolicy.DROP):
            raise ValueError(f"last_batch_policy must be LastBatchPolicy.PARTIAL or DROP, got "
                             f"last_batch_policy={last_batch_policy!r}")
        self.shard_id, self.num_shards = shard_of(pruner, num_shards, shard_id, "PrunedDALIIterator")
        if auto_reset not in (True, False, None, "yes", "no"):
            raise ValueError(f"auto_reset must be a bool, 'yes' or 'no', got auto_reset={auto_reset!r}")
        output_map = list(output_map)
        if len(set(output_map)) != len(output_map):
            raise ValueError(f"output_map names must be distinct, got {output_map}")
        for key, name in (("index_name", index_name), ("weight_name", weight_name)):
            if name in output_map:
                raise ValueError(f"{key}={name!r} is added by the iterator; it must not be in "
                                 f"output_map {output_map}")
        if index_name == weight_name:
            raise ValueError(f"index_name and weight_name must differ, both are {index_name!r}")
        if pipe.num_outputs != len(output_map):
            raise ValueError(f"the pipeline has {pipe.num_outputs} outputs but output_map names "
                             f"{len(output_map)}: {output_map}")
        self.pruner = pruner
        self.source = source
        self.policy = last_batch_policy
        self.index_name, self.weight_name = index_name, weight_name
        self._auto_reset_epochs = auto_reset in (True, "yes")
        self._drop = last_batch_policy == LastBatchPolicy.DROP
        self._next = (0, 0)             # (epoch, first batch) of the next pass
        self._pass: _Pass | None = None
        self._ended = 0                 # passes ended = DALI epochs finished (BatchInfo.epoch_idx)
        self._error: BaseException | None = None
        self._shard_cache: tuple[Plan | None, Plan | None] = (None, None)
        # size=-1: DALI runs until the source raises StopIteration (dali.md §2.4); nothing runs
        # before the first epoch is published (prepare_first_batch=False, §2.1).
        super().__init__(pipe, output_map, size=-1, auto_reset=False, prepare_first_batch=False)

    # ------------------------------------------------------------------ plans
    def _plan_for(self, epoch: int) -> Plan:
        plan = self.pruner.plan(epoch)
        if self.num_shards == 1:
            return plan
        if self._shard_cache[0] is not plan:
            self._shard_cache = (plan, plan.shard(self.shard_id, self.num_shards, self._drop))
        return self._shard_cache[1]

    def _num_batches(self, plan: Plan) -> int:
        return plan.batches(self.batch_size, drop_last=self._drop)

    def _predicted_batches(self, epoch: int) -> int:
        """Batches of ``epoch`` for this rank without planning it (the planned size if planned)."""
        n = self.pruner.shard_size(epoch, self.num_shards, self._drop)
        if n is None:
            raise RuntimeError(f"the length of epoch {epoch} is known once it is planned (policy "
                               f"{self.pruner.policy.name!r} plans a loss-dependent number of "
                               f"samples): call it.set_epoch({epoch}) first")
        return num_batches(n, self.batch_size, self._drop)

    # ------------------------------------------------------------------ epochs
    def _check_usable(self) -> None:
        if self._error is not None:
            raise RuntimeError("this PrunedDALIIterator stopped after an error (see above); a DALI "
                               "pipeline cannot continue after an error: build a new pipeline and "
                               "iterator and restore the position with load_state_dict()"
                               ) from self._error

    def _start_pass(self) -> None:
        epoch, start = self._next
        plan = self._plan_for(epoch)
        total = self._num_batches(plan)
        if start > total:
            raise ValueError(f"cannot resume epoch {epoch} at batch {start}: its plan has only "
                             f"{total} batches for this rank")
        tag = self._ended
        self.source.publish(tag, plan.indices, start, total - start)    # before any prefetch
        if self._ended:
            DALIGenericIterator.reset(self)       # pipeline reset + prefetch of the new epoch
        dali_epoch = getattr(self._pipes[0], "_epoch_idx", tag)
        if dali_epoch != tag:
            raise RuntimeError(f"internal error: DALI is at epoch {dali_epoch}, plan published for "
                               f"{tag}")
        self._pass = _Pass(epoch, plan, start, total)
        self._next = (epoch + 1, 0)

    def _end_pass(self) -> None:
        p = self._pass
        if p is None:
            return
        if not p.done:
            # leaving early: stop the source, then drain what DALI has already prefetched so the
            # pipeline reaches its end of epoch (reset() is ignored mid-epoch, dali.md §2.13)
            self.source.cut()
            try:
                while True:
                    DALIGenericIterator.__next__(self)
            except StopIteration:
                pass
            except Exception as e:
                self._fail(e)
            p.done = True
        self._pass = None
        self._ended += 1

    def _fail(self, err: BaseException) -> None:
        """Record a pipeline error and raise it, naming the bad file when a file is to blame."""
        self._error = err
        p = self._pass
        if isinstance(err, BadSampleError) or p is None:
            raise err
        pipe = self._pipes[0]
        ahead = max(pipe.cpu_queue_size, pipe.gpu_queue_size) + 2
        if self.source.parallel:
            ahead += self.source.prefetch_queue_depth
        first = p.start + p.consumed
        bad = self.source.find_bad(first, min(p.total, first + ahead))
        if bad is None:
            raise err
        index, path, what, detail = bad
        raise BadSampleError(f"cannot {what} file {path!r} (sample index {index}, epoch "
                             f"{p.epoch}): {detail}", index=index, path=path) from err

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the epoch of the next pass (ends an unfinished pass first).

        Plans the epoch (under a process group that is a collective: every rank calls it).
        Optional: without it the iterator runs epochs 0, 1, 2, ..., planning each when its pass
        starts. Calling it with the epoch that is already pending keeps a restored mid-epoch
        position.
        """
        epoch = self.pruner.schedule.check_epoch(epoch)
        self._check_usable()
        self._plan_for(epoch)
        p = self._pass
        if p is not None and p.epoch == epoch and not p.done and p.consumed == 0:
            return                          # already the fresh pass of this epoch
        self._end_pass()
        if self._next[0] != epoch:
            self._next = (epoch, 0)

    def reset(self) -> None:
        """End the current epoch, even part-way (unlike DALI's reset, which ignores that)."""
        self._check_usable()
        self._end_pass()

    @property
    def epoch(self) -> int:
        """The epoch of the current (or just finished) pass; before one starts, the next epoch."""
        return self._pass.epoch if self._pass is not None else self._next[0]

    @property
    def bad_samples(self) -> dict[int, tuple[str, str]]:
        """Samples skipped by a ``FileSource(on_error="skip")``: ``{index: (path, reason)}``."""
        return self.source.bad_samples

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> "PrunedDALIIterator":
        self._check_usable()
        p = self._pass
        if p is not None and (p.done or (p.looped and p.consumed > 0)):
            self._end_pass()              # finished, or left by a previous for loop
        if self._pass is None:
            self._start_pass()
        self._pass.looped = True
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        self._check_usable()
        p = self._pass
        if p is None or (p.done and self._auto_reset_epochs):
            self._end_pass()
            self._start_pass()
            p = self._pass
        if p.done:
            raise StopIteration
        try:
            out = DALIGenericIterator.__next__(self)
        except StopIteration:
            p.done = True
            if p.consumed != p.num_batches:
                self._fail(RuntimeError(f"internal error: DALI ended epoch {p.epoch} after "
                                        f"{p.consumed} of {p.num_batches} batches"))
            raise
        except Exception as e:
            self._fail(e)
        batch = out[0]
        index, weight = self._ids_and_weights(p)
        got = len(next(iter(batch.values()))) if batch else len(index)
        if got != len(index):
            self._fail(RuntimeError(f"internal error: DALI delivered {got} samples for plan batch "
                                    f"{p.start + p.consumed} of epoch {p.epoch}, the plan has "
                                    f"{len(index)}"))
        p.consumed += 1
        batch[self.index_name], batch[self.weight_name] = index, weight
        return out

    def _ids_and_weights(self, p: _Pass) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's ids and loss weights: slices of the plan (views, on the plan's device)."""
        lo = (p.start + p.consumed) * self.batch_size
        hi = min(lo + self.batch_size, len(p.plan))
        index = p.plan.indices[lo:hi]
        keep = self.source.kept(lo, hi)      # skipped bad samples (FileSource on_error="skip")
        if keep is not None:
            index = index[torch.from_numpy(keep).to(index.device)]
        return index, p.plan.weights_of(index)

    def __len__(self) -> int:
        p = self._pass
        if p is not None and not p.done:
            return p.num_batches
        epoch, start = self._next
        return max(0, self._predicted_batches(epoch) - start)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The position: the epoch in progress and how many of its batches were handed out.

        Save it with ``pruner.state_dict()`` at the same moment (e.g. after an optimizer step).
        """
        p = self._pass
        if p is not None and not p.done:
            epoch, batch = p.epoch, p.start + p.consumed
        else:
            epoch, batch = self._next
        return {"epoch": epoch, "batch": batch, "batch_size": self.batch_size,
                "num_shards": self.num_shards, "shard_id": self.shard_id,
                "last_batch_policy": self.policy.name}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`: the next pass runs the rest of the saved epoch.

        The batch size, sharding and last-batch policy must match. Restore the Pruner as well, so
        that it returns the same plans.
        """
        if not isinstance(state, dict) or "epoch" not in state or "batch" not in state:
            raise TypeError("state must be a dict from PrunedDALIIterator.state_dict()")
        mine = self.state_dict()
        for key in ("batch_size", "num_shards", "shard_id", "last_batch_policy"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"state was saved with {key}={state[key]!r}, this iterator has "
                                 f"{key}={mine[key]!r}")
        epoch = check_int("state['epoch']", state["epoch"], minimum=0)
        batch = check_int("state['batch']", state["batch"], minimum=0)
        self._check_usable()
        self._end_pass()
        self._next = (epoch, batch)
