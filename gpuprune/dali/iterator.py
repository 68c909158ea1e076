"""The drop-in iterators: ``DALIGenericIterator``'s and ``DALIClassificationIterator``'s contract
over each epoch's pruning plan."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NoReturn, Sequence

import numpy as np
import torch
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIClassificationIterator, DALIGenericIterator

from .._checks import check_bool
from ..plan import Plan
from ..sizes import num_batches
from ._feed import Feed
from ..shard import EpochShard, Planner
from .sources import BadSampleError, PlanSource

__all__ = ["PrunedDALIIterator", "PrunedDALIClassificationIterator", "check_dali_arguments"]

PARTIAL, DROP, FILL = LastBatchPolicy.PARTIAL, LastBatchPolicy.DROP, LastBatchPolicy.FILL
_CHECKPOINT_HINT = (
    "DALI checkpoints record DALI's own iteration counter, not which planned samples were served, "
    "so a restored pipeline would pair data with the wrong sample ids. Save "
    "it.state_dict() together with pruner.state_dict() instead, and restore them with "
    "pruner.load_state_dict() and it.load_state_dict() on a newly built pipeline and iterator")


def check_dali_arguments(size=-1, reader_name=None, auto_reset=False, fill_last_batch=None,
                         last_batch_padded=False, last_batch_policy=PARTIAL
                         ) -> tuple[LastBatchPolicy, bool]:
    """``(last-batch policy, auto_reset)`` from ``DALIGenericIterator``'s arguments, checked as
    DALI checks them (ValueError where DALI raises one), or refused where they cannot apply."""
    if auto_reset is False or auto_reset is None or (isinstance(auto_reset, str)
                                                     and auto_reset == "no"):
        auto = False
    elif auto_reset is True or (isinstance(auto_reset, str) and auto_reset == "yes"):
        auto = True
    else:                       # DALI's rule: 1, 0, numpy.bool_ and "True" are refused
        kind = type(auto_reset)
        kind = (kind.__name__ if kind.__module__ == "builtins"
                else f"{kind.__module__}.{kind.__name__}")
        raise ValueError(f"auto_reset must be True, False, None, 'yes' or 'no' (as for DALI's "
                         f"iterators), got {kind} {auto_reset!r}")
    padded = last_batch_padded is not None and check_bool("last_batch_padded", last_batch_padded)
    if fill_last_batch is not None:         # DALI's deprecated spelling; it wins over the policy
        warnings.warn("fill_last_batch is deprecated in DALI; use last_batch_policy", Warning,
                      stacklevel=3)
        policy = FILL if check_bool("fill_last_batch", fill_last_batch) else PARTIAL
    elif type(last_batch_policy) is not LastBatchPolicy:
        raise ValueError(f"last_batch_policy must be a LastBatchPolicy (as for DALI's iterators), "
                         f"got {type(last_batch_policy).__name__} {last_batch_policy!r}")
    else:
        policy = last_batch_policy
    if policy == FILL and not padded:
        raise ValueError("last_batch_policy=LastBatchPolicy.FILL (or fill_last_batch=True) without "
                         "last_batch_padded=True would fill the last batch with samples the plan did "
                         "not choose; pass last_batch_padded=True to fill it by repeating the last "
                         "planned sample (a padded reader's FILL), or use PARTIAL (a short last "
                         "batch) or DROP")
    if size is not None and size != -1:
        raise ValueError(f"size={size!r} does not apply to PrunedDALIIterator: the plan sets "
                         "each epoch's size (it.size and len(it) report it); leave size=-1")
    if reader_name is not None:
        raise ValueError(f"reader_name={reader_name!r} does not apply: PrunedDALIIterator's "
                         "pipeline is fed by its gpuprune source, not by a reader, and the plan "
                         "sets each epoch's size. Replace the reader with a FileSource "
                         "(FileSource(file_root=...) reads the same files with the same labels "
                         "as fn.readers.file) and drop reader_name")
    return policy, auto


def _output_names(output_map, index_name, weight_name) -> list[str]:
    """``output_map`` as a list, checked against the two keys the iterator adds."""
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
    return output_map


@dataclass
class _Pass:
    """One run over (the rest of) one epoch's share for this rank: one DALI epoch."""

    epoch: int
    share: Plan                 # this rank's share of the epoch's plan, in serving order
    start: int                  # first entry served (non-zero after a mid-epoch restore)
    end: int                    # one past the last entry served (DROP: cut; FILL: padded)
    num_batches: int
    ids: torch.Tensor           # entries [start, end) as int64, sliced per batch
    weights: torch.Tensor       # their loss weights (float32)
    handed: int = 0             # batches handed out by __next__
    done: bool = False          # StopIteration was raised, or the pass was ended early

    @property
    def finished(self) -> bool:
        """Every batch handed out (``StopIteration`` seen or not), or ended early: the next
        ``iter()`` starts the next epoch. ``len()`` and ``size`` still describe this epoch until
        ``StopIteration`` (as DALI's do), so a loop body reading them at the last batch sees its
        own epoch."""
        return self.done or 0 < self.num_batches == self.handed


class PrunedDALIIterator(DALIGenericIterator):
    """``DALIGenericIterator`` over the samples a :class:`~gpuprune.Pruner` plans for each epoch.

    Yields what ``DALIGenericIterator`` yields, a list with one dict of torch tensors keyed by
    ``output_map``, plus two entries from the plan, both on the Pruner's device:

    * ``index``: the batch's sample ids (int64), ready for ``pruner.observe``;
    * ``weight``: each sample's loss weight (float32; 1.0 unless the policy rescales losses, as
      InfoBatch does).

    The ids are taken from the plan, not from a pipeline output: DALI's external source returns
    iteration ``i``'s data as output ``i``, so the ``j``-th batch of an epoch is the ``j``-th planned
    batch. The graph must keep the samples in their order, as DALI operators do.

    Epochs (docs/dali.md, "Epochs")::

        for epoch in range(it.epoch, num_epochs):    # it.epoch: 0, or the restored epoch
            it.set_epoch(epoch)                      # plans; a collective under DDP
            for (batch,) in it:
                loss = pruner.observe(batch["index"], criterion(model(batch["data"]), batch["label"]))

    * DALI's rules hold: ``iter(it)`` (each ``for`` loop) continues an unfinished epoch and starts
      the next one after a finished epoch, an epoch being finished once all its batches were handed
      out (whether ``StopIteration`` was seen or not); ``next(it)`` after the end raises
      ``StopIteration`` again until ``reset()``/``iter()`` (or, with ``auto_reset``, starts the next
      epoch). Without :meth:`set_epoch` the epochs count up from 0.
    * **One rule after a break, live or restored**: the position is (epoch, samples served). The
      next loop continues that epoch with its remaining batches, exactly as a restore from
      :meth:`state_dict` does; :meth:`set_epoch` with another epoch or :meth:`reset` ends it
      (unlike DALI's ``reset``, which ignores an unfinished epoch).
    * ``len(it)`` and ``it.size`` count the batches and samples of the running epoch (from its
      start position), or of the one the next ``iter()`` starts. They never plan.
    * :meth:`plan` is this rank's share of the epoch's plan, in serving order.

    This class is a ``DALIGenericIterator`` for ``isinstance`` checks, but it does not run
    ``DALIGenericIterator``'s constructor: its pipeline is driven by a stock
    ``DALIGenericIterator`` it holds (:mod:`gpuprune.dali._feed`), and it overrides every public
    method (``__iter__``, ``__next__``, ``__len__``, ``reset``, ``size``, ``checkpoints``).

    Args:
        pipelines: one DALI pipeline (or a list holding one) whose graph starts with ``source``.
            One pipeline per process: for several GPUs run one process per GPU.
        output_map: names of the pipeline's outputs, in order (as for ``DALIGenericIterator``).
        size, reader_name, dynamic_shape: accepted where they mean something here: ``size=-1``
            (the plan sets each epoch's size), ``reader_name=None`` (there is no reader), any
            ``dynamic_shape`` (ignored by DALI too). Other values raise ValueError saying why.
        auto_reset: as DALI's (``True``/``"yes"``, ``False``/``None``/``"no"``; anything else is a
            ValueError, as in DALI): if true, ``next()`` after the end of an epoch (which raised
            ``StopIteration`` once) starts the next one. ``iter()`` does that anyway.
        last_batch_policy: ``LastBatchPolicy.PARTIAL`` (default: the last batch may be short),
            ``DROP`` (it is dropped), or ``FILL`` with ``last_batch_padded=True``. A value that is
            not a ``LastBatchPolicy`` is a ValueError, as in DALI.
        last_batch_padded: the counterpart of a reader's ``pad_last_batch=True``: each rank's
            share is padded to whole batches by repeating its last sample. With ``FILL`` every
            batch is then full (the last one ends with repeats of the share's last sample, served
            and observed as that sample); with ``PARTIAL`` and ``DROP`` the padding is trimmed or
            dropped again, as DALI does, so nothing changes. Every rank's share has the same
            length anyway (wrap-around padding across ranks). Default ``False``.
        fill_last_batch: DALI's deprecated spelling: ``False`` means ``PARTIAL``, ``True``
            ``FILL``.
        prepare_first_batch: if True (default), an epoch's first batches are prepared as soon as
            the epoch is known, in :meth:`set_epoch`, so the pipeline works while you do something
            else (evaluate, log); if False, on the first ``next()``.
        pruner: the :class:`~gpuprune.Pruner` that plans the epochs (or another
            :class:`~gpuprune.shard.Planner`, such as ``Refresher.feed``).
        source: the pipeline's :class:`~gpuprune.dali.PlanSource`.
        shard_id, num_shards: this rank and the number of ranks. Default: the pruner's process
            group (0 and 1 without one); values that disagree with a distributed pruner raise.
            Every rank gets an equal share of the same plan (:meth:`gpuprune.Plan.shard`).
        shuffle: if True (default), batches follow the plan's shuffled order; if False, each
            epoch's planned ids are served in increasing id order.
        index_name, weight_name: keys of the sample ids and loss weights. Defaults ``"index"``,
            ``"weight"``.

    Raises:
        BadSampleError: a file of a :class:`~gpuprune.dali.FileSource` could not be read or decoded
            (the message names the file, the sample id and the epoch). After this or any other
            pipeline error the iterator cannot continue; build a new pipeline and iterator and
            restore the position with :meth:`load_state_dict`.
    """

    def __init__(self, pipelines, output_map: Sequence[str], size: int = -1,
                 reader_name: str | None = None, auto_reset: bool | str | None = False,
                 fill_last_batch: bool | None = None, dynamic_shape: bool | None = False,
                 last_batch_padded: bool = False, last_batch_policy: LastBatchPolicy = PARTIAL,
                 prepare_first_batch: bool = True, *, pruner: Planner, source: PlanSource,
                 shard_id: int | None = None, num_shards: int | None = None, shuffle: bool = True,
                 index_name: str = "index", weight_name: str = "weight") -> None:
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
        self.last_batch_policy, self._auto_reset = check_dali_arguments(
            size, reader_name, auto_reset, fill_last_batch, last_batch_padded, last_batch_policy)
        self._prepare = check_bool("prepare_first_batch", prepare_first_batch)
        if source.batch_size is None:
            raise ValueError("source is not part of the pipeline: call source.outputs() in its "
                             "definition (or use gpuprune.dali.build_iterator)")
        if source.batch_size != pipe.max_batch_size:
            raise ValueError(f"source belongs to a pipeline of batch_size={source.batch_size}, this "
                             f"pipeline has batch_size={pipe.max_batch_size}")
        if pruner.num_samples != source.num_samples:
            raise ValueError(f"the pruner plans {pruner.num_samples} samples but the source holds "
                             f"{source.num_samples}")
        self._shard = EpochShard(pruner, num_shards, shard_id, drop_last=self._drop,
                                 shuffle=shuffle, owner="PrunedDALIIterator",
                                 names=("num_shards", "shard_id"))
        output_map = _output_names(output_map, index_name, weight_name)
        dev, gpu = pruner.device, pipe.device_id
        if gpu is not None and dev.type == "cuda" and dev.index != gpu:
            raise ValueError(f"the pipeline's device_id={gpu} puts its GPU outputs on cuda:{gpu}, "
                             f"but the Pruner, and so each batch's ids, live on {dev}, and "
                             f"pruner.observe needs the ids and the losses on one device: create "
                             f"the Pruner with device='cuda:{gpu}' (or call "
                             f"torch.cuda.set_device({gpu}) before creating it)")
        self.pruner, self.source, self.output_map = pruner, source, output_map
        self.index_name, self.weight_name = index_name, weight_name
        self.batch_size = int(pipe.max_batch_size)
        self._pass: _Pass | None = None
        self._error: BaseException | None = None
        self._feed = Feed(pipe, source, output_map)    # builds it, runs its empty DALI epoch 0
        if self._feed.checkpointing:
            which = ("was restored from a DALI checkpoint (checkpoint=...)"
                     if pipe.is_restored_from_checkpoint else "has enable_checkpointing=True")
            raise ValueError(f"the pipeline {which}, which PrunedDALIIterator does not support: "
                             f"{_CHECKPOINT_HINT}")
        if pipe.num_outputs != len(output_map):
            raise ValueError(f"the pipeline has {pipe.num_outputs} outputs but output_map names "
                             f"{len(output_map)}: {output_map}")

    # ------------------------------------------------------------------ facts
    @property
    def _drop(self) -> bool:
        return self.last_batch_policy == DROP

    @property
    def shard_id(self) -> int:
        """This rank."""
        return self._shard.rank

    @property
    def num_shards(self) -> int:
        """The number of ranks sharing each plan."""
        return self._shard.num_replicas

    @property
    def shuffle(self) -> bool:
        """Whether batches follow the plan's order (else the planned ids in increasing order)."""
        return self._shard.shuffle

    @property
    def epoch(self) -> int:
        """The epoch of the current (or just finished) pass; before one starts, the next epoch."""
        return self._pass.epoch if self._pass is not None else self._shard.epoch

    @property
    def size(self) -> int:
        """Samples of this rank's running epoch (from its start position), or of the one the next
        ``iter()`` starts; -1 while unknown (a loss-dependent InfoBatch epoch not planned yet).
        Never plans."""
        p = self._pass
        if p is not None and not p.done:
            return len(p.share) - p.start
        n = self._shard.shard_size()
        return -1 if n is None else max(0, n - self._shard.start)

    @property
    def _size(self) -> int:
        # DALI's attribute, read by code such as ceil(loader._size / batch_size): the planned size
        return self.size

    def __len__(self) -> int:
        p = self._pass
        if p is not None and not p.done:
            return p.num_batches
        return self._shard.num_batches(self.batch_size, self._drop)

    def plan(self) -> Plan:
        """This rank's share of the plan of :attr:`epoch`, in serving order (planned now if it was
        not: under a process group that is a collective), as :meth:`PrunedSampler.plan
        <gpuprune.sampler.PrunedSampler.plan>` gives it: the whole share, from its first entry
        (without ``FILL``'s padding). Never changes the position."""
        p = self._pass
        return p.share if p is not None else self._shard.plan()

    def total_steps(self, *, upper_bound: bool = False) -> int:
        """Optimizer steps of the whole run on this rank (one per batch), for step-based learning
        rate schedules such as ``OneCycleLR(total_steps=it.total_steps())``:
        :meth:`gpuprune.Pruner.total_steps` with this iterator's batch size, number of shards and
        last-batch policy. InfoBatch raises ValueError unless ``upper_bound=True`` (every pruned
        epoch counted with all N samples). Needs the Pruner's ``num_epochs``."""
        if not hasattr(self.pruner, "total_steps"):
            raise TypeError(f"total_steps needs a Pruner; this iterator's planner is a "
                            f"{type(self.pruner).__name__}")
        return self.pruner.total_steps(self.batch_size, drop_last=self._drop,
                                       world_size=self.num_shards, upper_bound=upper_bound)

    @property
    def bad_samples(self) -> dict[int, tuple[str, str]]:
        """Samples found bad by a :class:`~gpuprune.dali.FileSource`: ``{index: (path, reason)}``."""
        return self.source.bad_samples

    def checkpoints(self):
        """Not supported: raises ValueError. Use :meth:`state_dict` (see the message)."""
        raise ValueError(f"PrunedDALIIterator.checkpoints() is not supported: {_CHECKPOINT_HINT}")

    # ------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the epoch of the next pass, and plan it.

        Planning is a collective under a process group: every rank calls it. If ``epoch`` is the
        epoch in progress (or the restored one), its position is kept; any other epoch ends the
        unfinished pass and starts from the beginning of ``epoch``. With ``prepare_first_batch``
        the pipeline starts preparing its first batches right away. Optional: without it the
        iterator runs epochs 0, 1, 2, ..., planning each when its pass starts.
        """
        epoch = self.pruner.check_epoch(epoch)
        self._check_usable()
        p = self._pass
        if p is not None and not p.finished and p.epoch == epoch:
            return                          # the epoch in progress continues
        self._shard.set_epoch(epoch)        # plan first: if it fails, nothing has changed
        self._end_pass()
        if self._prepare:
            self._start_pass()

    def reset(self) -> None:
        """End the current epoch, even part-way; the next pass starts the next epoch.

        Unlike DALI's ``reset()``, which ignores an unfinished epoch (and the next loop continues
        it), this drops the rest of the epoch: call it to abandon an epoch after a ``break``.
        """
        self._check_usable()
        p = self._pass
        if p is not None and not p.finished:
            self._shard.seek(p.epoch + 1)
        self._end_pass()

    def _start_pass(self) -> None:
        share = self._shard.begin()         # plans the position's epoch (a collective under DDP);
        #                                     the coverage guard counts the pass
        epoch, start, n, bs = self._shard.epoch, self._shard.start, len(share), self.batch_size
        nb = num_batches(n - start, bs, self._drop)
        end = n if self.last_batch_policy == PARTIAL else start + nb * bs
        ids = share.indices
        if end > n:                         # FILL, padded: repeat the share's last sample
            ids = torch.cat([ids, ids[-1:].expand(end - n)])
        if nb:
            try:
                self._feed.start(epoch, ids, start, end)      # publish, then DALI prefetches
            except Exception as e:
                self._fail(e)
        served = ids[start:end].to(torch.int64)         # while DALI works: sliced per batch
        self._pass = _Pass(epoch, share, start, end, nb, served, share.weights_of(served))

    def _end_pass(self) -> None:
        """Leave the current pass; an unfinished one ends its DALI epoch (drained, dropped)."""
        p = self._pass
        if p is not None and not p.finished and p.num_batches:
            try:
                self._feed.stop()
            except Exception as e:
                self._fail(e)
        if p is not None:
            p.done = True
        self._pass = None

    def _check_usable(self) -> None:
        if self._error is not None:
            raise RuntimeError("this PrunedDALIIterator stopped after an error (see above); a DALI "
                               "pipeline cannot continue after an error: build a new pipeline and "
                               "iterator and restore the position with load_state_dict()"
                               ) from self._error

    def _fail(self, err: BaseException) -> NoReturn:
        """Record a pipeline error and raise it, naming the bad file when a file is to blame."""
        self._error = err
        p = self._pass
        if isinstance(err, BadSampleError) or p is None:
            raise err
        first = p.start + p.handed * self.batch_size            # the batches in flight
        last = min(p.end, first + (self._feed.in_flight() + 1) * self.batch_size)
        bad = self.source.find_bad(first, last)
        if bad is not None:
            index, path, what, detail = bad
            raise BadSampleError(f"cannot {what} file {path!r} (sample index {index}, epoch "
                                 f"{p.epoch}): {detail}", index=index, path=path) from err
        raise err

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> "PrunedDALIIterator":
        self._check_usable()
        p = self._pass
        if p is None or p.finished:
            self._end_pass()
            self._start_pass()
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        self._check_usable()
        p = self._pass
        if p is None or (p.done and self._auto_reset):
            self._end_pass()
            self._start_pass()
            p = self._pass
        if p.done or p.handed == p.num_batches:
            if not p.done and not p.num_batches:
                self._shard.seek(p.epoch + 1)       # an empty pass ends here
            p.done = True
            raise StopIteration
        try:
            batch = self._feed.take()
        except StopIteration:
            self._fail(RuntimeError(f"internal error: DALI ended epoch {p.epoch} after "
                                    f"{p.handed} of {p.num_batches} batches"))
        except Exception as e:
            self._fail(e)
        index, weight = self._ids_and_weights(p)
        got = len(next(iter(batch.values())))
        if got != len(index):
            self._fail(RuntimeError(f"internal error: DALI delivered {got} samples for batch "
                                    f"{p.handed} of epoch {p.epoch}, the plan has {len(index)}"))
        p.handed += 1
        if p.handed == p.num_batches:
            self._shard.seek(p.epoch + 1)           # the position: the next epoch
        batch[self.index_name], batch[self.weight_name] = index, weight
        return [batch]

    def _ids_and_weights(self, p: _Pass) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's ids (int64) and loss weights on the Pruner's device: views of the pass's
        copies, without a host synchronisation (skipped bad samples are selected by position)."""
        i = p.handed * self.batch_size
        index, weight = p.ids[i:i + self.batch_size], p.weights[i:i + self.batch_size]
        lo = p.start + i
        keep = self.source.kept(lo, lo + len(index))
        if keep is not None:
            pos = torch.from_numpy(np.flatnonzero(keep)).to(index.device)
            index, weight = index.index_select(0, pos), weight.index_select(0, pos)
        return index, weight

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The position, in :class:`gpuprune.sampler.Position`'s format (the sampler's):
        ``{"epoch", "consumed", "num_replicas", "drop_last"}``, where ``consumed`` counts the
        samples of this rank's share of the epoch in the batches handed out so far (skipped bad
        files included). Once an epoch's batches were all handed out it is the next epoch with
        ``consumed=0``. Save it with ``pruner.state_dict()`` after the optimizer step of the last
        batch taken."""
        p = self._pass
        if p is not None and not p.finished:
            return self._shard.state_dict(min(p.handed * self.batch_size, len(p.share) - p.start))
        return self._shard.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (from this class or from ``PrunedSampler``): the next
        pass runs the rest of the saved epoch, from sample ``consumed`` of this rank's share, then
        the later epochs. Restore the Pruner as well, so that it returns the same plans.

        A mid-epoch position needs the same number of shards and last-batch policy (``DROP`` or
        not); the batch size may differ. Raises TypeError/ValueError before changing anything if
        ``state`` does not fit.
        """
        self._check_usable()
        self._shard.load_state_dict(state)      # checks everything, then moves the position
        self._end_pass()                        # the running pass: drained, dropped


class PrunedDALIClassificationIterator(PrunedDALIIterator, DALIClassificationIterator):
    """``DALIClassificationIterator``'s counterpart: :class:`PrunedDALIIterator` with
    ``output_map=["data", "label"]``, so each batch is ``[{"data", "label", "index", "weight"}]``.

    Takes ``DALIClassificationIterator``'s arguments (no ``output_map``) plus the gpuprune
    keywords (``pruner``, ``source``, ...); ``isinstance`` checks for either DALI class hold.
    """

    def __init__(self, pipelines, size: int = -1, reader_name: str | None = None,
                 auto_reset: bool | str | None = False, fill_last_batch: bool | None = None,
                 dynamic_shape: bool | None = False, last_batch_padded: bool = False,
                 last_batch_policy: LastBatchPolicy = PARTIAL, prepare_first_batch: bool = True,
                 **kwargs) -> None:
        super().__init__(pipelines, ["data", "label"], size, reader_name, auto_reset,
                         fill_last_batch, dynamic_shape, last_batch_padded, last_batch_policy,
                         prepare_first_batch, **kwargs)
