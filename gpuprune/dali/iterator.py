"""The drop-in iterator: ``DALIGenericIterator``'s contract over each epoch's pruning plan."""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass
from typing import NoReturn, Sequence

import numpy as np
import torch
from nvidia.dali import types
from nvidia.dali.backend import TensorGPU
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from nvidia.dali.plugin.pytorch.torch_utils import feed_ndarray, to_torch_type

from .._checks import check_bool
from ..plan import Plan
from ..sizes import num_batches
from ..shard import EpochShard, Planner, Position
from .sources import BadSampleError, PlanSource

__all__ = ["PrunedDALIIterator"]

_CHECKPOINT_HINT = (
    "DALI checkpoints record DALI's own iteration counter, not which planned samples were served, "
    "so a restored pipeline would pair data with the wrong sample ids. Save "
    "it.state_dict() together with pruner.state_dict() instead, and restore them with "
    "pruner.load_state_dict() and it.load_state_dict() on a newly built pipeline and iterator")


@dataclass
class _Pass:
    """One run over (the rest of) one epoch's plan for this rank: a segment of a DALI epoch."""

    epoch: int
    plan: Plan            # this rank's share, in training order
    start: int            # first plan entry served (non-zero after a mid-epoch restore)
    end: int              # one past the last entry served (cut to whole batches with DROP)
    num_batches: int      # batches in [start, end)
    source_plan: Plan | None = None       # the Pruner's plan the share was taken from
    base: int = 0         # position of plan entry 0 in the source's plan storage
    handed: int = 0       # batches handed out by __next__
    done: bool = False    # StopIteration was raised, or the pass was ended early
    ids: torch.Tensor | None = None       # entries [start, end) as int64, sliced per batch
    weights: torch.Tensor | None = None   # their loss weights (float32)

    def consumed(self, batch_size: int) -> int:
        """Plan entries of this rank's epoch served so far (the Position's ``consumed``)."""
        return min(self.start + self.handed * batch_size, self.end)


def _same_plan(a: Plan, b: Plan) -> bool:
    """Whether two plans serve the same ids with the same loss weights."""
    if a is b:
        return True
    if (a.epoch, a.full, a.num_samples, a.weight) != (b.epoch, b.full, b.num_samples, b.weight):
        return False
    if (a.rescaled is None) != (b.rescaled is None):
        return False
    if a.rescaled is not None and not torch.equal(a.rescaled, b.rescaled.to(a.rescaled.device)):
        return False
    return a.indices.shape == b.indices.shape and torch.equal(a.indices,
                                                              b.indices.to(a.indices.device))


class PrunedDALIIterator(DALIGenericIterator):
    """``DALIGenericIterator`` over the samples a :class:`~gpuprune.Pruner` plans for each epoch.

    Yields what ``DALIGenericIterator`` yields, a list with one dict of torch tensors keyed by
    ``output_map``, plus two entries from the plan, both on the Pruner's device:

    * ``index``: the batch's sample ids (int64), ready for ``pruner.observe``;
    * ``weight``: each sample's loss weight (float32; 1.0 unless the policy rescales losses, as
      InfoBatch does).

    The ids are taken from the plan, not from a pipeline output: DALI's external source returns
    iteration ``i``'s data as output ``i``, so the ``j``-th batch of a pass is the ``j``-th planned
    batch. The graph must keep the samples in their order, as DALI operators do; a batch-permuting
    graph (``fn.permute_batch`` on the main samples) would need its own ids.

    Epochs (docs/dali.md, "Epochs"): each pass is one epoch of the plan. At its start the iterator
    asks ``pruner.plan(epoch)`` for the plan, takes this rank's shard, publishes it to the pipeline's
    :class:`~gpuprune.dali.PlanSource`, and only then lets DALI prefetch::

        for epoch in range(it.epoch, num_epochs):    # it.epoch: 0, or the restored epoch
            it.set_epoch(epoch)                      # plans; a collective under DDP
            for (batch,) in it:
                loss = pruner.observe(batch["index"], criterion(model(batch["data"]), batch["label"]))

    * The iterator follows DALI's rules: ``iter(it)`` (each ``for`` loop) continues an unfinished
      epoch and starts the next one after a finished epoch; ``next(it)`` after the end raises
      ``StopIteration`` again until ``reset()``/``iter()`` (or, with ``auto_reset``, starts the next
      epoch). Without :meth:`set_epoch` the epochs count up from 0.
    * **One rule after a break, live or restored**: the position is (epoch, samples served). The
      next loop continues that epoch with its remaining batches, exactly as a restore from
      :meth:`state_dict` does; :meth:`set_epoch` with another epoch or :meth:`reset` ends it
      (unlike DALI's ``reset``, which ignores an unfinished epoch) and the next loop starts the
      next epoch.
    * ``len(it)`` and ``it.size`` count the batches and samples of the running pass (from its start
      position), or of the pass the next ``iter()`` starts. They never plan: before
      :meth:`set_epoch` they give the size the schedule predicts (the same on every rank).
    * :meth:`plan` is this rank's share of the epoch's plan, in the order its batches serve it
      (the ids ``batch["index"]`` will hold), like :meth:`PrunedSampler.plan
      <gpuprune.sampler.PrunedSampler.plan>`; e.g. for work over exactly this rank's samples.
    * **Read-ahead across epoch boundaries** (``read_ahead=True``): when the next epoch's plan is
      already determined before this epoch's last losses arrive (``Pruner.peek``: full-data
      epochs, the ``uniform``/``static``/``full`` policies, epochs reusing a selection), its first
      batches are fed to DALI right after this epoch's last ones, in the same DALI epoch, as a
      reader keeps reading across its epochs; the pipeline never drains and refills between such
      epochs. :meth:`set_epoch` still plans (the collective) and then hands out exactly those
      batches. Anything else (another epoch, a ``break`` followed by ``set_epoch``/``reset``,
      :meth:`load_state_dict`, a plan that differs from the one read ahead) drops the read-ahead
      like an early exit. Loss-dependent plans (UCB, epsilon-greedy, InfoBatch's pruned epochs)
      cannot be read ahead: they depend on the epoch's last losses.

    Args:
        pipelines: one DALI pipeline (or a list holding one) whose graph starts with ``source``.
            One pipeline per process: for several GPUs run one process per GPU.
        output_map: names of the pipeline's outputs, in order (as for ``DALIGenericIterator``).
        size, reader_name, fill_last_batch, dynamic_shape, last_batch_padded: the arguments of
            ``DALIGenericIterator``, accepted where they mean something here: ``size=-1`` (the
            plan sets each epoch's size), ``reader_name=None`` (there is no reader),
            ``fill_last_batch=False`` (deprecated spelling of PARTIAL), any ``dynamic_shape``
            (ignored by DALI too), ``last_batch_padded=False``. Other values raise ValueError
            saying why and what to use.
        auto_reset: like DALI's: if True, ``next()`` after the end of an epoch (which raised
            ``StopIteration`` once) starts the next one. ``iter()`` does that anyway. Default False.
        last_batch_policy: ``LastBatchPolicy.PARTIAL`` (default: the last batch may be short) or
            ``LastBatchPolicy.DROP`` (it is dropped). ``FILL`` is refused: it would train on
            samples the plan did not choose.
        prepare_first_batch: if True (default), an epoch's first batches are prepared as soon as
            the epoch is known, in :meth:`set_epoch`, so the pipeline works while you do something
            else (evaluate, log); if False, on the first ``next()``. (DALI's iterator prepares in
            its constructor, which cannot plan: the epoch to start is not known yet.)
        pruner: the :class:`~gpuprune.Pruner` that plans the epochs.
        source: the pipeline's :class:`~gpuprune.dali.PlanSource`.
        shard_id: this rank. Default: the rank in the pruner's process group (0 without one).
        num_shards: number of ranks. Default: the size of the pruner's process group (1 without
            one); a value that disagrees with a distributed pruner raises. Every rank gets an equal
            share of the same plan (:meth:`gpuprune.Plan.shard`): with PARTIAL the plan is padded
            by wrap-around, so up to ``num_shards - 1`` samples appear twice; with DROP it is cut
            to a multiple of ``num_shards``.
        shuffle: if True (default), batches follow the plan's shuffled order. If False, each
            epoch's planned ids are served in increasing id order (``policy="full"`` then reads
            0, 1, ..., N-1, like a reader without ``random_shuffle``).
        read_ahead: if True (default), read the next epoch's first batches before this one ends
            whenever its plan is already determined (see above). The next epoch's source calls
            (``gather`` with its epoch, file reads and checks) then happen during this epoch. If
            False, each epoch's batches are read only after it starts (the pipeline refills).
        index_name: key of the sample ids in each batch dict. Default ``"index"``.
        weight_name: key of the loss weights. Default ``"weight"``.

    Raises:
        BadSampleError: a file of a :class:`~gpuprune.dali.FileSource` could not be read or decoded
            (the message names the file, the sample id and the epoch). After this or any other
            pipeline error the iterator cannot continue; build a new pipeline and iterator and
            restore the position with :meth:`load_state_dict`.
    """

    def __init__(self, pipelines, output_map: Sequence[str], size: int = -1,
                 reader_name: str | None = None, auto_reset: bool | str | None = False,
                 fill_last_batch: bool | None = None, dynamic_shape: bool | None = False,
                 last_batch_padded: bool = False,
                 last_batch_policy: LastBatchPolicy = LastBatchPolicy.PARTIAL,
                 prepare_first_batch: bool = True, *, pruner: Planner, source: PlanSource,
                 shard_id: int | None = None, num_shards: int | None = None, shuffle: bool = True,
                 read_ahead: bool = True, index_name: str = "index",
                 weight_name: str = "weight") -> None:
        pipes = list(pipelines) if isinstance(pipelines, (list, tuple)) else [pipelines]
        if len(pipes) != 1:
            raise ValueError(f"PrunedDALIIterator takes one pipeline, got {len(pipes)}; run one "
                             "process per GPU instead (each rank gets its shard of the plan)")
        pipe = pipes[0]
        if not isinstance(pruner, Planner):
            raise TypeError(f"pruner must be a gpuprune.Pruner or another Planner, got "
                            f"{type(pruner).__name__}")
        if not isinstance(source, PlanSource):
            raise TypeError(f"source must be a gpuprune.dali PlanSource, got {type(source).__name__}")
        self._check_stock_arguments(size, reader_name, last_batch_padded)
        if fill_last_batch is not None:     # DALI's deprecated spelling; it wins over the policy
            warnings.warn("fill_last_batch is deprecated in DALI; use last_batch_policy", Warning,
                          stacklevel=2)
            last_batch_policy = (LastBatchPolicy.FILL if check_bool("fill_last_batch",
                                                                     fill_last_batch)
                                 else LastBatchPolicy.PARTIAL)
        if not isinstance(last_batch_policy, LastBatchPolicy):
            raise TypeError(f"last_batch_policy must be a LastBatchPolicy, got "
                            f"{type(last_batch_policy).__name__} {last_batch_policy!r}")
        if last_batch_policy == LastBatchPolicy.FILL:
            raise ValueError("last_batch_policy=LastBatchPolicy.FILL (or fill_last_batch=True) "
                             "would fill the last batch with samples the plan did not choose; use "
                             "LastBatchPolicy.PARTIAL (short last batch) or DROP")
        if isinstance(auto_reset, str):
            if auto_reset not in ("yes", "no"):
                raise ValueError(f"auto_reset must be a bool, 'yes' or 'no', got "
                                 f"auto_reset={auto_reset!r}")
        elif auto_reset is not None and not isinstance(auto_reset, (bool, np.bool_)):
            # 1 or 0.0 are refused, as DALI's iterator does
            raise TypeError(f"auto_reset must be a bool, 'yes' or 'no', got "
                            f"{type(auto_reset).__name__} {auto_reset!r}")
        self._prepare = check_bool("prepare_first_batch", prepare_first_batch)
        self.shuffle = check_bool("shuffle", shuffle)
        self.read_ahead = check_bool("read_ahead", read_ahead)
        if getattr(pipe, "_enable_checkpointing", False) or getattr(pipe, "_checkpoint", None):
            which = ("was restored from a DALI checkpoint (checkpoint=...)"
                     if getattr(pipe, "_checkpoint", None) else "has enable_checkpointing=True")
            raise ValueError(f"the pipeline {which}, which PrunedDALIIterator does not support: "
                             f"{_CHECKPOINT_HINT}")
        if source.batch_size is None:
            raise ValueError("source is not part of the pipeline: call source.outputs() in its "
                             "definition (or use gpuprune.dali.build_iterator)")
        if source.batch_size != pipe.max_batch_size:
            raise ValueError(f"source belongs to a pipeline of batch_size={source.batch_size}, this "
                             f"pipeline has batch_size={pipe.max_batch_size}")
        if pruner.num_samples != source.num_samples:
            raise ValueError(f"the pruner plans {pruner.num_samples} samples but the source holds "
                             f"{source.num_samples}")
        # the per-rank view (share, sizes); the position and passes are still kept here
        self._view = EpochShard(pruner, num_shards, shard_id,
                                drop_last=last_batch_policy == LastBatchPolicy.DROP,
                                shuffle=self.shuffle,
                                owner="PrunedDALIIterator", names=("num_shards", "shard_id"))
        self.shard_id, self.num_shards = self._view.rank, self._view.num_replicas
        if isinstance(output_map, str):
            raise TypeError(f"output_map must be a sequence of names, one per pipeline output, got "
                            f"str {output_map!r}")
        output_map = list(output_map)
        if len(set(output_map)) != len(output_map):
            raise ValueError(f"output_map names must be distinct, got {output_map}")
        for key, name in (("index_name", index_name), ("weight_name", weight_name)):
            if not isinstance(name, str):
                raise TypeError(f"{key} must be a str, got {type(name).__name__} {name!r}")
            if name in output_map:
                raise ValueError(f"{key}={name!r} is added by the iterator; it must not be in "
                                 f"output_map {output_map}")
        if index_name == weight_name:
            raise ValueError(f"index_name and weight_name must differ, both are {index_name!r}")
        # counted from the defined graph where there is one: pipe.num_outputs builds the pipeline
        # (threads, parallel workers), which a refused iterator must not leave behind
        graph = getattr(pipe, "_graph_outputs", None) or getattr(pipe, "_graph_out", None)
        num_outputs = len(graph) if graph else pipe.num_outputs
        if num_outputs != len(output_map):
            raise ValueError(f"the pipeline has {num_outputs} outputs but output_map names "
                             f"{len(output_map)}: {output_map}")
        self.pruner = pruner
        self.source = source
        self.policy = last_batch_policy
        self.index_name, self.weight_name = index_name, weight_name
        self._auto_reset_epochs = (auto_reset == "yes" if isinstance(auto_reset, str)
                                   else bool(auto_reset))
        self._drop = last_batch_policy == LastBatchPolicy.DROP
        self._next = (0, 0)             # (epoch, first plan entry) of the next pass
        self._pass: _Pass | None = None
        # The DALI epoch in progress: one pass or, reading ahead, several back to back. _ahead is
        # the next epoch's pass, published after the current one (the read-ahead); _covered the
        # batches published to the source in this DALI epoch, _served those taken from the
        # pipeline; _final: nothing more will be published (DALI may have been told the end).
        self._ahead: _Pass | None = None
        self._covered = self._served = 0
        self._final = True
        self._error: BaseException | None = None
        self._shard_cache: tuple[Plan | None, Plan | None] = (None, None)
        self._ready = False
        # Builds the pipeline and sets DALI's attributes. Nothing runs before the first epoch is
        # published (prepare_first_batch=False here: DALI would call the source at once, before
        # any plan exists). size=-1: DALI runs until the source raises StopIteration; this class
        # drives the pipeline itself.
        if source.parallel and getattr(pipe, "_py_start_method", "fork") == "fork":
            # DALI forks its Python workers in this build. A forked child inherits every
            # unreachable object still waiting for the cycle collector, DALI pipelines included,
            # and if the collector runs in the child their finalisers shut down a pipeline the
            # child does not own (a segfault in DALI 2.4). Collect them in the parent first.
            gc.collect()
        super().__init__(pipe, output_map, size=-1, auto_reset=False, prepare_first_batch=False)
        self._ready = True

    @staticmethod
    def _check_stock_arguments(size, reader_name, last_batch_padded) -> None:
        if size is not None and size != -1:
            raise ValueError(f"size={size!r} does not apply to PrunedDALIIterator: the plan sets "
                             "each epoch's size (it.size and len(it) report it); leave size=-1")
        if reader_name is not None:
            raise ValueError(f"reader_name={reader_name!r} does not apply: PrunedDALIIterator's "
                             "pipeline is fed by its gpuprune source, not by a reader, and the plan "
                             "sets each epoch's size. Replace the reader with a FileSource "
                             "(FileSource(file_root=...) reads the same files with the same labels "
                             "as fn.readers.file) and drop reader_name")
        if last_batch_padded not in (False, None):
            raise ValueError(f"last_batch_padded={last_batch_padded!r} does not apply: it describes "
                             "a reader's pad_last_batch, and a plan is never padded; choose the last "
                             "batch with last_batch_policy (PARTIAL or DROP)")

    # ------------------------------------------------------------------ DALI's size attributes
    @property
    def size(self) -> int:
        """Samples of this rank's running pass (from its start position), or of the pass the next
        ``iter()`` starts; -1 while that is unknown (a loss-dependent InfoBatch epoch not planned
        yet). Never plans."""
        if not self._ready:
            return -1                      # while DALIGenericIterator.__init__ runs
        p = self._pass
        if p is not None and not p.done:
            return len(p.plan) - p.start
        epoch, start = self._next
        n = self._view.shard_size(epoch)
        return -1 if n is None else max(0, n - start)

    @property
    def _size(self) -> int:
        # DALI's attribute, read by code such as ceil(loader._size / batch_size): the planned size
        return self.size

    @_size.setter
    def _size(self, value) -> None:
        # DALIGenericIterator.__init__ assigns its `size` argument (-1) here; sizes come from plans
        self._dali_size = value

    # ------------------------------------------------------------------ plans
    def plan(self) -> Plan:
        """This rank's share of the plan of :attr:`epoch`, in serving order (planned now if it was
        not: under a process group that is a collective), as :meth:`PrunedSampler.plan
        <gpuprune.sampler.PrunedSampler.plan>` gives it.

        The whole share, from its first entry: a pass resumed mid-epoch serves it from the restored
        position on, and with ``LastBatchPolicy.DROP`` a pass stops after its last whole batch
        (``len(it) * batch_size`` entries of a pass from the start). After a finished pass
        :attr:`epoch` stays that pass's epoch until the next one starts (:meth:`set_epoch` or the
        next loop). Never changes the position.
        """
        p = self._pass
        return p.plan if p is not None else self._shard_for(self._next[0])

    def _shard_for(self, epoch: int) -> Plan:
        """This rank's share of ``epoch``'s plan, in serving order (plans the epoch if needed)."""
        return self._shard_of(self.pruner.plan(epoch))

    def _shard_of(self, plan: Plan) -> Plan:
        """This rank's share of ``plan``, in serving order."""
        if self._shard_cache[0] is plan:
            return self._shard_cache[1]
        shard = self._view.share(plan)
        self._shard_cache = (plan, shard)
        return shard

    def _batches_from(self, n: int, start: int) -> int:
        return num_batches(max(0, n - start), self.batch_size, self._drop)

    def total_steps(self, *, upper_bound: bool = False) -> int:
        """Optimizer steps of the whole run on this rank (one per batch), for step-based learning
        rate schedules such as ``OneCycleLR(total_steps=it.total_steps())``.

        :meth:`gpuprune.Pruner.total_steps` with this iterator's batch size, number of shards and
        last-batch policy (``DROP`` drops), so both answer the same. Exact for policies that plan
        exactly k samples (all but InfoBatch); InfoBatch's pruned epochs depend on the losses, so
        it raises ValueError unless ``upper_bound=True`` (every pruned epoch counted with all N
        samples: the schedule never runs out). Needs the Pruner's ``num_epochs``.
        """
        return self.pruner.total_steps(self.batch_size, drop_last=self._drop,
                                       world_size=self.num_shards, upper_bound=upper_bound)

    # ------------------------------------------------------------------ epochs
    def _api(self):
        """The scope DALI's own iterators drive their pipeline in (DALI refuses mixed API use)."""
        return self._pipes[0]._check_api_type_scope(types.PipelineAPIType.ITERATOR)

    def _check_usable(self) -> None:
        if self._error is not None:
            raise RuntimeError("this PrunedDALIIterator stopped after an error (see above); a DALI "
                               "pipeline cannot continue after an error: build a new pipeline and "
                               "iterator and restore the position with load_state_dict()"
                               ) from self._error

    def _lookahead(self) -> int:
        """How far past the batches taken DALI may have asked the source: the pipeline's prefetch
        queue, plus the batches parallel workers compute ahead of it."""
        pipe = self._pipes[0]
        depth = max(pipe.cpu_queue_size, pipe.gpu_queue_size)
        return depth + (self.source.prefetch_queue_depth if self.source.parallel else 0)

    def _start_pass(self) -> None:
        epoch, start = self._next
        source_plan = self.pruner.plan(epoch)          # a collective under a process group
        plan = self._shard_of(source_plan)
        n = len(plan)
        if start > n:
            raise ValueError(f"cannot resume epoch {epoch} after {start} samples: this rank's plan "
                             f"of it has only {n}")
        a = self._ahead
        if a is not None:
            if start == 0 and a.epoch == epoch and _same_plan(a.source_plan, source_plan):
                # read ahead: DALI is already producing this epoch's batches
                self._ahead, self._pass, self._next = None, a, (epoch + 1, 0)
                return
            self._abandon()                            # read ahead for nothing: drop it
        nb = self._batches_from(n, start)
        end = start + nb * self.batch_size if self._drop else n
        pipe = self._pipes[0]
        if pipe._last_iter:                # the previous DALI epoch ended: start the next one
            pipe.reset()
        if not pipe._first_iter:
            raise RuntimeError("internal error: the DALI pipeline did not finish its previous epoch")
        # publish before DALI asks for data; the pipeline's epoch counter tags the plan
        base = self.source.publish(pipe._epoch_idx, epoch, plan.indices, start, end, nb)
        self._pass = p = _Pass(epoch, plan, start, end, nb, source_plan, base or 0)
        self._next = (epoch + 1, 0)
        self._covered, self._served, self._final = nb, 0, False
        self._extend(self._lookahead())    # a short pass: decide on the read-ahead before DALI asks
        try:
            with self._api():
                pipe.schedule_run()        # prefetch: DALI calls the source queue-depth times
        except Exception as e:
            self._fail(e)
        # while DALI works: the pass's ids and weights, so each batch only slices them
        self._slice(p)

    def _slice(self, p: _Pass) -> None:
        p.ids = p.plan.indices[p.start:p.end].to(torch.int64)
        p.weights = p.plan.weights_of(p.ids)

    def _extend(self, upcoming: int) -> None:
        """Before DALI may ask the source for iterations up to ``upcoming`` (exclusive) of its
        epoch: if that is past the published batches, decide now what follows them, since DALI
        ends its epoch at the first iteration the source has no batch for.

        Reading ahead, the next epoch's batches follow the running pass in the same DALI epoch
        when its plan is already determined (``Pruner.peek``: full-data epochs, policies that do
        not read the losses, reused selections), so the pipeline never drains and refills between
        such epochs. Otherwise (a loss-dependent plan, the last epoch, a read-ahead already
        published, ``read_ahead=False``) the DALI epoch ends after the published batches.
        """
        if self._final or upcoming <= self._covered:
            return
        self._final = True
        p = self._pass
        if not self.read_ahead or self._ahead is not None or p is None or p.done:
            return
        epoch = p.epoch + 1
        try:                                           # local: no collective, changes nothing
            source_plan = self.pruner.peek(self.pruner.check_epoch(epoch))
        except ValueError:              # past the last epoch, or the planner moved past this one
            return
        if source_plan is None:
            return
        plan = self._shard_of(source_plan)
        nb = self._batches_from(len(plan), 0)
        if nb == 0:
            return
        end = nb * self.batch_size if self._drop else len(plan)
        base = self.source.append(epoch, plan.indices, 0, end, nb, self._covered)
        a = _Pass(epoch, plan, 0, end, nb, source_plan, base)
        self._slice(a)
        self._ahead = a
        self._covered += nb
        # another read-ahead needs this one's plan made (peek looks one epoch past the last plan)
        self._final = upcoming > self._covered

    def _abandon(self) -> None:
        """End the DALI epoch now: stop the source, then drain what DALI has already prefetched
        (the rest of the running pass and any read-ahead), so nothing of it reaches a later epoch
        (DALI's pipeline reset() does nothing mid-epoch)."""
        p = self._pass
        if (p is not None and not p.done) or self._ahead is not None:
            self.source.cut()
            pipe = self._pipes[0]
            try:
                with self._api():
                    while True:
                        pipe.share_outputs()
                        pipe.release_outputs()
                        pipe.schedule_run()
            except StopIteration:
                pass
            except Exception as e:
                self._fail(e)
        if p is not None:
            p.done = True
        self._ahead = None
        self._final = True

    def _end_pass(self) -> None:
        """Leave the current pass: an unfinished one ends the DALI epoch (:meth:`_abandon`); after
        one whose batches were all handed out, a read-ahead of the next epoch stays."""
        p = self._pass
        if p is None:
            return
        if not p.done and p.handed < p.num_batches:
            self._abandon()
        p.done = True
        self._pass = None

    def _fail(self, err: BaseException) -> NoReturn:
        """Record a pipeline error and raise it, naming the bad file when a file is to blame."""
        self._error = err
        p = self._pass
        if isinstance(err, BadSampleError) or p is None:
            raise err
        # the batches in flight: the rest of the pass, then the read-ahead's first ones
        window = (self._lookahead() + 2) * self.batch_size
        for q in (p, self._ahead):
            if q is None or window <= 0:
                continue
            first = q.consumed(self.batch_size)
            last = min(q.end, first + window)
            bad = self.source.find_bad(q.base + first, q.base + last)
            if bad is not None:
                index, path, what, detail = bad
                raise BadSampleError(f"cannot {what} file {path!r} (sample index {index}, epoch "
                                     f"{q.epoch}): {detail}", index=index, path=path) from err
            window -= last - first
        raise err

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the epoch of the next pass, and plan it.

        Planning is a collective under a process group: every rank calls it. If ``epoch`` is the
        epoch in progress (or the restored one), its position is kept; any other epoch ends the
        unfinished pass and starts from the beginning of ``epoch``. With ``prepare_first_batch``
        the pipeline starts preparing its first batches right away, unless they were read ahead
        (then this only plans and checks that the plan is the one read ahead). Optional: without
        it the iterator runs epochs 0, 1, 2, ..., planning each when its pass starts.
        """
        epoch = self.pruner.check_epoch(epoch)
        self._check_usable()
        p = self._pass
        if p is not None and not p.done and p.epoch == epoch:
            return                          # the epoch in progress continues
        self._shard_for(epoch)              # plan first: if it fails, nothing has changed
        self._end_pass()
        if self._next[0] != epoch:
            self._next = (epoch, 0)
        if self._prepare:
            self._start_pass()

    def reset(self) -> None:
        """End the current epoch, even part-way; the next pass starts the next epoch.

        Unlike DALI's ``reset()``, which ignores an unfinished epoch (and the next loop continues
        it), this drops the rest of the epoch: call it to abandon an epoch after a ``break``.
        After a finished epoch it only closes it (a read-ahead of the next epoch stays).
        """
        self._check_usable()
        self._end_pass()

    def checkpoints(self):
        """Not supported: raises ValueError. Use :meth:`state_dict` (see the message)."""
        raise ValueError(f"PrunedDALIIterator.checkpoints() is not supported: {_CHECKPOINT_HINT}")

    @property
    def epoch(self) -> int:
        """The epoch of the current (or just finished) pass; before one starts, the next epoch."""
        return self._pass.epoch if self._pass is not None else self._next[0]

    @property
    def bad_samples(self) -> dict[int, tuple[str, str]]:
        """Samples found bad by a :class:`~gpuprune.dali.FileSource`: ``{index: (path, reason)}``."""
        return self.source.bad_samples

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> "PrunedDALIIterator":
        self._check_usable()
        p = self._pass
        if p is None or p.done:
            self._end_pass()
            self._start_pass()
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        self._check_usable()
        self._ever_consumed = True
        p = self._pass
        if p is None or (p.done and self._auto_reset_epochs):
            self._end_pass()
            self._start_pass()
            p = self._pass
        if p.done:
            raise StopIteration
        pipe = self._pipes[0]
        if p.handed == p.num_batches:
            p.done = True
            if self._ahead is None and (not pipe.empty() or not pipe._last_iter):
                self._fail(RuntimeError(f"internal error: DALI has more data after the "
                                        f"{p.num_batches} batches planned for epoch {p.epoch}"))
            raise StopIteration
        # the schedule_run below lets DALI ask for one more batch: read ahead now if it is past
        # the published ones (before taking this batch, so a failing plan loses nothing)
        self._extend(self._lookahead() + self._served + 1)
        try:
            with self._api():
                outputs = pipe.share_outputs()
                batch = self._to_torch(pipe, outputs)
                pipe.release_outputs()
                pipe.schedule_run()        # the next prefetch: DALI calls the source again
        except StopIteration:
            p.done = True
            self._fail(RuntimeError(f"internal error: DALI ended epoch {p.epoch} after "
                                    f"{p.handed} of {p.num_batches} batches"))
        except Exception as e:
            self._fail(e)
        self._served += 1
        index, weight = self._ids_and_weights(p)
        got = len(next(iter(batch.values())))
        if got != len(index):
            self._fail(RuntimeError(f"internal error: DALI delivered {got} samples for batch "
                                    f"{p.handed} of epoch {p.epoch}, the plan has {len(index)}"))
        p.handed += 1
        batch[self.index_name], batch[self.weight_name] = index, weight
        return [batch]

    def _to_torch(self, pipe, outputs) -> dict[str, torch.Tensor]:
        """DALI's outputs as torch tensors, as ``DALIGenericIterator`` makes them (zero-copy views
        with the dynamic executor, copies with the legacy one)."""
        batch = {}
        for name, out in zip(self.output_map, outputs):
            tensor = out.as_tensor()
            gpu = isinstance(tensor, TensorGPU)
            device = torch.device("cuda", pipe.device_id) if gpu else torch.device("cpu")
            if pipe.exec_dynamic:
                if gpu:
                    with device:
                        batch[name] = torch.from_dlpack(tensor)
                else:
                    batch[name] = torch.from_dlpack(tensor)
            else:
                t = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
                stream = torch.cuda.current_stream(device=device) if device.type == "cuda" else None
                feed_ndarray(tensor, t, cuda_stream=stream)
                batch[name] = t
        return batch

    def _ids_and_weights(self, p: _Pass) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's ids (int64) and loss weights, from the plan on the Pruner's device
        (views into the pass's copies: the plan itself is never exposed)."""
        i = p.handed * self.batch_size
        index, weight = p.ids[i:i + self.batch_size], p.weights[i:i + self.batch_size]
        lo = p.base + p.start + i
        keep = self.source.kept(lo, lo + len(index))                    # skipped bad samples
        if keep is not None:
            mask = torch.from_numpy(keep).to(index.device)
            index, weight = index[mask], weight[mask]
        return index, weight

    def __len__(self) -> int:
        p = self._pass
        if p is not None and not p.done:
            return p.num_batches
        epoch, start = self._next
        n = self._view.shard_size(epoch)
        if n is None:
            raise RuntimeError(f"the length of epoch {epoch} is known once it is planned (its "
                               f"size depends on the losses observed until then): call "
                               f"it.set_epoch({epoch}) first")
        return self._batches_from(n, start)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The position, in :class:`gpuprune.sampler.Position`'s format (the sampler's):
        ``{"epoch", "consumed", "num_replicas", "drop_last"}``, where ``consumed`` counts the
        samples of this rank's share of the epoch in the batches handed out so far (skipped bad
        files included). Between epochs it is the next epoch with ``consumed=0``.

        Save it with ``pruner.state_dict()`` after the optimizer step of the last batch taken.
        """
        p = self._pass
        if p is not None and not p.done:
            epoch, consumed = p.epoch, p.consumed(self.batch_size)
        else:
            epoch, consumed = self._next
        return Position.make(epoch, consumed, self.num_shards, self._drop)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (from this class or from ``PrunedSampler``): the next
        pass runs the rest of the saved epoch, from sample ``consumed`` of this rank's share, then
        the later epochs. Restore the Pruner as well, so that it returns the same plans.

        A mid-epoch position needs the same number of shards and last-batch policy; the batch size
        may differ (batches then start at the saved sample). Raises TypeError/ValueError before
        changing anything if ``state`` does not fit.
        """
        epoch, consumed = Position.check(state, self.num_shards, self._drop, "PrunedDALIIterator")
        self.pruner.check_epoch(epoch, "state_dict['epoch']")
        n = self._view.shard_size(epoch)
        if n is not None and consumed > n:
            raise ValueError(f"state_dict['consumed']={consumed} is more than the {n} samples this "
                             f"rank's share of epoch {epoch} holds")
        self._check_usable()
        self._abandon()                     # the running pass and any read-ahead
        self._pass = None
        self._next = (epoch, consumed)
