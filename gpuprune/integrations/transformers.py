"""The Hugging Face ``Trainer``: per-sample losses through the Pruner, gpuprune's sampler, and
``max_steps`` and every epoch sized by the plans.

What the Trainer does with a pruned loader, read from its code (transformers 5.25):

* It builds the train loader from ``_get_train_sampler`` and passes it to
  ``accelerator.prepare``, which with several processes shards it again (see
  :mod:`gpuprune.integrations.accelerate`); its collator drops dataset columns the model's
  ``forward`` does not take, so an index column never reaches ``compute_loss``.
* It measures the loader once, before the first epoch: ``max_steps`` (and so the learning-rate
  schedule) is that epoch's optimizer steps times ``num_train_epochs``, and every epoch is run for
  that many steps: 282 scheduled where 188 run after a full warm-up epoch, a later, longer epoch
  (final full epochs) cut short, and with gradient accumulation the last, incomplete accumulation of
  a shorter epoch never stepping. Given ``max_steps`` instead, it derives the epoch count from the
  first epoch, so a pruned run would stop early or run past the plans.
* It calls ``set_epoch(epoch)`` (from 0) on the loader before every epoch.
* ``compute_loss`` returns the model's reduced loss; InfoBatch's weights and the per-sample
  statistics need the unreduced one.

:class:`PruningTrainer` overrides the methods the Trainer documents for subclassing
(``get_train_dataloader``, ``compute_loss``, ``set_initial_training_values``) and, for the
per-epoch counts, ``_run_epoch`` (checked to exist at import): the loader is gpuprune's sampler over
the dataset with each item's index, prepared without sharding it again; the loss is
``pruner.observe(index, per_sample_loss(outputs, labels))``; ``max_steps`` is the plans' real count
(:func:`max_steps`) and every epoch runs its own number of steps.

Usage::

    args = TrainingArguments(output_dir="out", num_train_epochs=3, per_device_train_batch_size=64)
    pruner = gpuprune.Pruner(len(train_set), keep=0.5, num_epochs=3, device=args.device)
    trainer = PruningTrainer(model=model, args=args, train_dataset=train_set, pruner=pruner)
    trainer.train()
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .._checks import check_int
from ..pruner import Pruner
from ..sampler import PrunedSampler
from ..sizes import num_batches
from ._common import find_sampler, optimizer_steps, require

require("transformers", "transformers", minimum="5.0")
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_utils import seed_worker  # noqa: E402

from .accelerate import prepare_data_loader  # noqa: E402

__all__ = ["PruningTrainer", "max_steps", "per_sample_cross_entropy", "INDEX_KEY"]

#: the batch key that carries each sample's index from the loader to ``compute_loss``
INDEX_KEY = "gpuprune_index"

_RUN_EPOCH_PARAMETERS = ("epoch", "train_dataloader", "steps_in_epoch", "num_update_steps_per_epoch")
if not all(p in inspect.signature(getattr(Trainer, "_run_epoch", lambda: None)).parameters
           for p in _RUN_EPOCH_PARAMETERS):
    import transformers as _tf
    raise ImportError(f"gpuprune.integrations.transformers needs a transformers whose Trainer runs "
                      f"one epoch in _run_epoch({', '.join(_RUN_EPOCH_PARAMETERS)}, ...) (tested "
                      f"with 5.25); found transformers {_tf.__version__}: pip install -U "
                      f"\"transformers>=5.25\"")


def per_sample_cross_entropy(outputs: Any, labels: torch.Tensor, *, shift: bool = False
                             ) -> torch.Tensor:
    """One cross-entropy loss per sample, in float32, from a model's ``logits``.

    Args:
        outputs: the model's output (``outputs["logits"]``, or its first element).
        labels: ``(B,)`` class labels (sequence/image classification), or ``(B, T)`` token labels
            with ``-100`` for positions without a target; a sample's loss is then the mean over
            its targeted tokens (0 when it has none).
        shift: causal language modelling: the logits at position t predict the label at t + 1.
            Default False.

    Returns:
        a ``(B,)`` float32 tensor.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) or hasattr(outputs, "keys") \
        else outputs[0]
    if labels.dim() == 1 and logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if labels.dim() == 2 and logits.dim() == 3:
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        token = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                reduction="none")
        valid = labels.ne(-100)
        return (token * valid).sum(1) / valid.sum(1).clamp(min=1)
    raise TypeError(f"per_sample_cross_entropy handles (B,) labels with (B, C) logits and (B, T) "
                    f"labels with (B, T, V) logits, got labels {tuple(labels.shape)} and logits "
                    f"{tuple(logits.shape)}: pass PruningTrainer(per_sample_loss=fn), fn(outputs, "
                    f"labels) -> one loss per sample")


def max_steps(pruner: Pruner, args: TrainingArguments, *, upper_bound: bool = False) -> int:
    """Optimizer steps of the pruned run on each process: the ``max_steps`` the Trainer should
    use (:class:`PruningTrainer` sets it). Each epoch counts ``ceil(batches / accumulation)``.

    Args:
        pruner: the run's Pruner (its schedule and world size).
        args: the TrainingArguments (``per_device_train_batch_size``,
            ``gradient_accumulation_steps``, ``dataloader_drop_last``, ``num_train_epochs``).
        upper_bound: for InfoBatch: the bound that counts every pruned epoch with all N samples.
    """
    return optimizer_steps(pruner, args.per_device_train_batch_size,
                           num_epochs=_num_epochs(pruner, args),
                           accumulate=args.gradient_accumulation_steps,
                           drop_last=args.dataloader_drop_last, upper_bound=upper_bound)


def _num_epochs(pruner: Pruner, args: TrainingArguments) -> int:
    """``num_train_epochs`` as the pruner's epoch count; they must agree."""
    epochs = args.num_train_epochs
    if pruner.num_epochs is None:
        raise ValueError("the Pruner needs num_epochs (the Trainer's num_train_epochs) so each "
                         "epoch's plan and the run's steps are known")
    if epochs != pruner.num_epochs:
        raise ValueError(f"TrainingArguments(num_train_epochs={epochs}) differs from the Pruner's "
                         f"num_epochs={pruner.num_epochs}: pass num_train_epochs="
                         f"{pruner.num_epochs} (whole epochs; max_steps can stop a run earlier)")
    return pruner.num_epochs


class _WithIndex(Dataset):
    """Items of a dict-style dataset (the Trainer's format) with their index under INDEX_KEY."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        if not hasattr(item, "keys"):
            raise TypeError(f"PruningTrainer needs dataset items that are dicts (the Trainer's "
                            f"format, e.g. {{'input_ids': ..., 'labels': ...}}), got "
                            f"{type(item).__name__}")
        if INDEX_KEY in item:
            raise ValueError(f"dataset items already hold the key {INDEX_KEY!r}, which "
                             f"PruningTrainer uses for each sample's index")
        return {**item, INDEX_KEY: index}


class _IndexCollator:
    """Collate the items without their index (the Trainer's collator, unused columns removed),
    then add the indices as one int64 tensor."""

    def __init__(self, collate: Callable) -> None:
        self.collate = collate

    def __call__(self, features: list[dict]) -> dict:
        ids = torch.tensor([f[INDEX_KEY] for f in features], dtype=torch.int64)
        batch = self.collate([{k: v for k, v in f.items() if k != INDEX_KEY} for f in features])
        batch[INDEX_KEY] = ids
        return batch


class PruningTrainer(Trainer):
    """A ``transformers.Trainer`` that trains each epoch on the Pruner's plan.

    Args:
        *args, **kwargs: the Trainer's own arguments (``model``, ``args``, ``train_dataset``
            whose items are dicts, ``eval_dataset``, ``data_collator``, ...).
        pruner: the :class:`~gpuprune.Pruner`, created after the TrainingArguments (which start
            the process group under torchrun / accelerate launch), with ``num_samples =
            len(train_dataset)`` and ``num_epochs = num_train_epochs``, on the training device
            (``device=args.device``).
        per_sample_loss: ``fn(outputs, labels) -> (B,)`` losses; default
            :func:`per_sample_cross_entropy` (causal-LM models shift their labels as the Trainer
            does). Needed when the model's labels are not the single ``labels`` input.

    Training batches carry each sample's index (``INDEX_KEY``) to :meth:`compute_loss`, which
    pops it, runs the model without its labels, and returns ``pruner.observe(index,
    per_sample_loss(outputs, labels))``; evaluation batches keep the Trainer's own loss.
    ``TrainingArguments.max_steps`` may stop the run earlier than the plans' end (:func:`max_steps`),
    not later.
    """

    #: observe() returns the batch's (weighted) mean: the Trainer divides it over accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, pruner: Pruner,
                 per_sample_loss: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
                 **kwargs: Any) -> None:
        if not isinstance(pruner, Pruner):
            raise TypeError(f"pruner must be a gpuprune.Pruner, got {type(pruner).__name__}")
        super().__init__(*args, **kwargs)
        self.pruner = pruner
        self.per_sample_loss = per_sample_loss
        # the token count the Trainer would otherwise gather from every process at every step
        # scales reduced losses only; observe() returns a per-batch mean
        self.model_accepts_loss_kwargs = False
        if per_sample_loss is None and list(self.label_names) != ["labels"]:
            raise ValueError(f"the model's labels are {self.label_names}, not ['labels']: pass "
                             f"PruningTrainer(per_sample_loss=fn), fn(outputs, labels) -> one loss "
                             f"per sample")
        if self.train_dataset is not None and len(self.train_dataset) != pruner.num_samples:
            raise ValueError(f"train_dataset has {len(self.train_dataset)} samples, the Pruner "
                             f"num_samples={pruner.num_samples}")
        if pruner.world_size != self.args.world_size:
            raise ValueError(f"the Pruner is synchronised over {pruner.world_size} process(es), "
                             f"the Trainer runs {self.args.world_size}: create the Pruner after "
                             f"the TrainingArguments, which start the process group")
        _num_epochs(pruner, self.args)

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        """gpuprune's sampler over the train dataset (each item with its index), prepared by
        accelerate without sharding it again (see :mod:`gpuprune.integrations.accelerate`)."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset, collate = self.train_dataset, self.data_collator
        if hasattr(dataset, "column_names") and hasattr(dataset, "remove_columns"):  # datasets.Dataset
            dataset = self._remove_unused_columns(dataset, description="Training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="Training")
        args = self.args
        loader = DataLoader(
            _WithIndex(dataset), batch_size=self._train_batch_size,
            sampler=PrunedSampler(self.pruner), drop_last=args.dataloader_drop_last,
            collate_fn=_IndexCollator(collate), num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor,
            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers,
                                   rank=args.process_index))
        return prepare_data_loader(self.accelerator, loader)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """Training batches: ``pruner.observe(index, per-sample loss)``; others: the Trainer's."""
        if INDEX_KEY not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        index = inputs.pop(INDEX_KEY)
        labels = inputs.pop(self.label_names[0]) if len(self.label_names) == 1 else None
        outputs = model(**inputs)
        if self.per_sample_loss is not None:
            losses = self.per_sample_loss(outputs, labels)
        else:
            losses = per_sample_cross_entropy(outputs, labels,
                                              shift=getattr(self, "_loss_shifts_labels", False))
        loss = self.pruner.observe(index.to(self.pruner.device), losses.to(self.pruner.device))
        loss = loss.to(losses.device)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ step counts
    def set_initial_training_values(self, args: TrainingArguments, dataloader: DataLoader):
        """The Trainer's values, with ``max_steps`` and the epoch count from the plans."""
        (_, per_epoch, num_examples, _, total_batch, _, _) = super().set_initial_training_values(
            args, dataloader)
        sampler = find_sampler(dataloader)
        exact = self.pruner.schedule.exact_size
        total = optimizer_steps(self.pruner, self._train_batch_size, world_size=sampler.num_replicas,
                                num_epochs=_num_epochs(self.pruner, args),
                                accumulate=args.gradient_accumulation_steps,
                                drop_last=args.dataloader_drop_last, upper_bound=not exact)
        steps = total
        if args.max_steps > 0:
            if exact and args.max_steps > total:
                raise ValueError(f"TrainingArguments(max_steps={args.max_steps}) is more than the "
                                 f"{total} optimizer steps of this pruned run's {self.pruner.num_epochs}"
                                 f" epochs: leave max_steps unset (or <= {total})")
            steps = min(args.max_steps, total)
        samples = sum(self.pruner.epoch_size(e) or self.pruner.num_samples
                      for e in range(self.pruner.num_epochs))
        # per-epoch values are set per epoch in _run_epoch; these cover the longest epoch
        return (self.pruner.num_epochs, per_epoch, num_examples, samples, total_batch,
                len(dataloader), steps)

    def _run_epoch(self, *args: Any, **kwargs: Any):
        """The Trainer's epoch, with this epoch's own batch and update-step counts."""
        bound = inspect.signature(super()._run_epoch).bind(*args, **kwargs)
        loader = bound.arguments["train_dataloader"]
        sampler = find_sampler(loader)
        if sampler is not None:
            sampler.set_epoch(bound.arguments["epoch"])     # plans it (the Trainer does it again)
            batches = num_batches(len(sampler), self._train_batch_size, self.args.dataloader_drop_last)
            accumulate = check_int("gradient_accumulation_steps",
                                   self.args.gradient_accumulation_steps, minimum=1)
            bound.arguments["steps_in_epoch"] = batches
            bound.arguments["num_update_steps_per_epoch"] = math.ceil(batches / accumulate)
        return super()._run_epoch(*bound.args, **bound.kwargs)
