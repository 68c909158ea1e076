"""One-call construction: a pipeline from a source and the user's graph, and its iterator."""

from __future__ import annotations

import numbers
import warnings
from contextlib import contextmanager
from typing import Callable, Sequence

from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.base_iterator import LastBatchPolicy

from .._checks import check_int
from ..shard import Planner
from .iterator import PrunedDALIIterator, check_dali_arguments
from .sources import PlanSource

__all__ = ["build_pipeline", "build_iterator"]


def _as_outputs(out) -> tuple:
    if isinstance(out, DataNode):
        return (out,)
    if isinstance(out, (tuple, list)) and all(isinstance(o, DataNode) for o in out):
        return tuple(out)
    raise TypeError(f"define_graph must return a DataNode or a tuple/list of DataNodes, got "
                    f"{type(out).__name__}")


@contextmanager
def _source_kept_on_error(source):
    """A build that fails leaves ``source`` as it was, so a corrected retry can use it.

    ``source.outputs()`` binds the source to the pipeline being defined; without this, an error
    raised after that (by ``define_graph``, DALI's build or the iterator's checks) would leave it
    bound to a dead pipeline, and the retry would fail with "already feeds a pipeline".
    """
    saved = dict(vars(source)) if isinstance(source, PlanSource) else None
    try:
        yield
    except BaseException:
        if saved is not None:
            vars(source).clear()
            vars(source).update(saved)
        raise


def build_pipeline(source: PlanSource, define_graph: Callable[..., object] | None = None, *,
                   batch_size: int, num_threads: int = 2, device_id: int | None = None,
                   **pipeline_kwargs) -> Pipeline:
    """A DALI pipeline: ``source`` → ``define_graph(*data_nodes)`` → outputs.

    Args:
        source: where the samples come from (:class:`~gpuprune.dali.ArraySource`,
            :class:`~gpuprune.dali.GpuArraySource`, :class:`~gpuprune.dali.FileSource`, ...).
        define_graph: the user's part of the graph. It gets the source's data nodes (e.g.
            ``(images, labels)``) and returns the outputs (a DataNode or a tuple of them). Default:
            the data nodes unchanged.
        batch_size: the largest batch (the last one of an epoch may be shorter).
        num_threads: DALI CPU threads. Default ``2``.
        device_id: the GPU, or None for a CPU-only pipeline (default).
        **pipeline_kwargs: more ``nvidia.dali.Pipeline`` arguments (``seed``,
            ``prefetch_queue_depth``, ``py_num_workers``, ``py_start_method``, ...).
            ``enable_checkpointing`` is accepted here but refused by the iterator (use
            ``state_dict``).

    Returns:
        The pipeline (not built yet; the iterator builds it).
    """
    if not isinstance(source, PlanSource):
        raise TypeError(f"source must be a gpuprune.dali PlanSource, got {type(source).__name__}")
    if define_graph is not None and not callable(define_graph):
        raise TypeError(f"define_graph must be callable, got {type(define_graph).__name__}")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    num_threads = check_int("num_threads", num_threads, minimum=1)
    if device_id is not None and (isinstance(device_id, bool)
                                  or not isinstance(device_id, numbers.Integral)):
        raise TypeError(f"device_id must be an int (a GPU) or None (CPU only), got "
                        f"{type(device_id).__name__} {device_id!r}")
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                    **pipeline_kwargs)
    with _source_kept_on_error(source), pipe:
        data = source.outputs()
        outputs = _as_outputs(define_graph(*data) if define_graph is not None else tuple(data))
        pipe.set_outputs(*outputs)
    return pipe


#: DALIGenericIterator arguments that build_iterator passes to the iterator, not the Pipeline
_ITERATOR_ARGS = ("size", "reader_name", "fill_last_batch", "dynamic_shape", "last_batch_padded")


def build_iterator(pruner: Planner, source: PlanSource,
                   define_graph: Callable[..., object] | None = None, *, batch_size: int,
                   output_map: Sequence[str] = ("data", "label"),
                   last_batch_policy: LastBatchPolicy = LastBatchPolicy.PARTIAL,
                   shard_id: int | None = None, num_shards: int | None = None,
                   shuffle: bool = True, prepare_first_batch: bool = True,
                   num_threads: int = 2, device_id: int | None = None,
                   auto_reset: bool | str = False,
                   index_name: str = "index", weight_name: str = "weight",
                   **pipeline_kwargs) -> PrunedDALIIterator:
    """Pipeline and :class:`~gpuprune.dali.PrunedDALIIterator` in one call.

    Args:
        pruner: the :class:`~gpuprune.Pruner` planning the epochs.
        source, define_graph, batch_size, num_threads, device_id: see :func:`build_pipeline`.
        output_map: names of ``define_graph``'s outputs. Default ``("data", "label")``, as
            ``DALIClassificationIterator``.
        last_batch_policy, shard_id, num_shards, shuffle, prepare_first_batch, auto_reset,
            index_name, weight_name: see :class:`~gpuprune.dali.PrunedDALIIterator`.
        **pipeline_kwargs: more ``nvidia.dali.Pipeline`` arguments (``seed``,
            ``prefetch_queue_depth``, ``py_num_workers``, ...). ``DALIGenericIterator``'s own
            arguments (``size``, ``reader_name``, ``fill_last_batch``, ``dynamic_shape``,
            ``last_batch_padded``) go to the iterator, which accepts or explains them.

    Example:
        >>> source = ArraySource(images, labels, layouts=("HWC", None))      # doctest: +SKIP
        >>> def graph(images, labels):
        ...     return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
        ...                                     mean=[127.5], std=[127.5]), labels
        >>> it = build_iterator(pruner, source, graph, batch_size=256)       # doctest: +SKIP
    """
    iterator_kwargs = {k: pipeline_kwargs.pop(k) for k in _ITERATOR_ARGS if k in pipeline_kwargs}
    # checked before the pipeline is defined, so the error names the iterator's argument (the
    # iterator checks them again, and gives DALI's deprecation warning then)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_dali_arguments(auto_reset=auto_reset, last_batch_policy=last_batch_policy,
                             **{k: v for k, v in iterator_kwargs.items() if k != "dynamic_shape"})
    with _source_kept_on_error(source):     # the iterator's checks run after the source is bound
        pipe = build_pipeline(source, define_graph, batch_size=batch_size,
                              num_threads=num_threads, device_id=device_id, **pipeline_kwargs)
        return PrunedDALIIterator(pipe, output_map, pruner=pruner, source=source,
                                  last_batch_policy=last_batch_policy, shard_id=shard_id,
                                  num_shards=num_shards, shuffle=shuffle,
                                  prepare_first_batch=prepare_first_batch, auto_reset=auto_reset,
                                  index_name=index_name, weight_name=weight_name,
                                  **iterator_kwargs)
