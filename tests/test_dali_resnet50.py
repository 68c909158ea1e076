"""NVIDIA's ResNet-50 DALI example, in its shape, converted to pruning (issue 22, item 9).

The example (DALI's ``docs/examples/use_cases/pytorch/resnet50``) reads an image folder with
``fn.readers.file(file_root, shard_id, num_shards, random_shuffle, pad_last_batch=True,
name="Reader")``, decodes with ``fn.decoders.image_random_crop``, resizes, flips and normalises,
feeds ``DALIClassificationIterator(pipe, reader_name="Reader", last_batch_policy=PARTIAL,
auto_reset=True)`` and trains with ``data[0]["data"]``, ``data[0]["label"].squeeze(-1).long()`` and
``train_loader_len = ceil(train_loader._size / batch_size)``. Here the same pipeline shape runs on
the CPU (a small model, a folder of Fashion-MNIST PNGs in class subfolders) twice: as written, and
converted (``FileSource(file_root=...)`` for the reader, ``PrunedDALIClassificationIterator`` for
the iterator, ``pruner.observe`` around the per-sample loss). The training loop is the same code
for both; its arithmetic on ``_size`` and its label handling hold on both.

``pad_last_batch=True`` (the reader's) is ``last_batch_padded=True`` (the iterator's): with
``PARTIAL``, as in the example, both trim the padding; with ``FILL`` both fill the last batch with
repeats of the last sample.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("nvidia.dali")
Image = pytest.importorskip("PIL.Image")

from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from nvidia.dali.pipeline import Pipeline  # noqa: E402
from nvidia.dali.plugin.base_iterator import LastBatchPolicy  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIClassificationIterator, DALIGenericIterator  # noqa: E402

import gpuprune as gp  # noqa: E402
from gpuprune.dali import (FileSource, PrunedDALIClassificationIterator,  # noqa: E402
                           PrunedDALIIterator, discover_files)

CROP, BS, SHARDS = 24, 16, 2
MEAN, STD = [0.485 * 255] * 3, [0.229 * 255] * 3


@pytest.fixture(scope="module")
def folder(fmnist_images, tmp_path_factory):
    """101 images in 3 class folders (uneven: 34, 34, 33)."""
    x = fmnist_images(101)
    root = tmp_path_factory.mktemp("imagenet_like")
    for i in range(101):
        cls = root / f"n0{i % 3}"
        cls.mkdir(exist_ok=True)
        Image.fromarray(x[i, :, :, 0]).convert("RGB").save(cls / f"img_{i:04d}.png")
    return root


def augment(images):
    """The example's training augmentation (CPU decoding: ``dali_cpu=True``)."""
    images = fn.decoders.image_random_crop(images, device="cpu", output_type=types.RGB,
                                           random_aspect_ratio=[0.8, 1.25],
                                           random_area=[0.1, 1.0], num_attempts=100)
    images = fn.resize(images, resize_x=CROP, resize_y=CROP, interp_type=types.INTERP_TRIANGULAR)
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                    crop=(CROP, CROP), mean=MEAN, std=STD,
                                    mirror=fn.random.coin_flip(probability=0.5))


# ---------------------------------------------------------------- as in the example
@pipeline_def
def create_dali_pipeline(data_dir, shard_id, num_shards, pad=True):
    images, labels = fn.readers.file(file_root=data_dir, shard_id=shard_id, num_shards=num_shards,
                                     random_shuffle=True, pad_last_batch=pad, name="Reader")
    return augment(images), labels


def stock_loader(folder, shard_id, policy=LastBatchPolicy.PARTIAL):
    pipe = create_dali_pipeline(batch_size=BS, num_threads=2, device_id=None, seed=12 + shard_id,
                                data_dir=str(folder), shard_id=shard_id, num_shards=SHARDS)
    pipe.build()
    return DALIClassificationIterator(pipe, reader_name="Reader", last_batch_policy=policy,
                                      auto_reset=True)


# ---------------------------------------------------------------- converted
@pipeline_def
def create_pruned_pipeline(source):
    images, labels = source.outputs()
    return augment(images), labels


def pruned_loader(folder, shard_id, policy=LastBatchPolicy.PARTIAL):
    source = FileSource(file_root=folder, decoder=None)
    pruner = gp.Pruner(source.num_samples, keep=0.5, policy="ucb", num_epochs=3, seed=0)
    pipe = create_pruned_pipeline(batch_size=BS, num_threads=2, device_id=None, seed=12 + shard_id,
                                  source=source)
    loader = PrunedDALIClassificationIterator(pipe, pruner=pruner, source=source,
                                              shard_id=shard_id, num_shards=SHARDS,
                                              last_batch_policy=policy, last_batch_padded=True,
                                              auto_reset=True)
    return loader, pruner


def train(train_loader, model, optimizer, observe=None) -> list[tuple[int, int, int]]:
    """The example's loop (one epoch); ``observe`` is the only line the conversion adds.
    Returns (i, train_loader_len, batch size) per step."""
    steps = []
    for i, data in enumerate(train_loader):
        input = data[0]["data"]
        target = data[0]["label"].squeeze(-1).long()
        train_loader_len = int(math.ceil(train_loader._size / BS))
        output = model(input)
        if observe is None:
            loss = F.cross_entropy(output, target)
        else:
            loss = observe(data[0]["index"], F.cross_entropy(output, target, reduction="none"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert input.shape[1:] == (3, CROP, CROP) and target.dtype == torch.int64
        steps.append((i, train_loader_len, len(target)))
    return steps


def model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_the_example_converts_and_its_loop_runs_unchanged(folder):
    files, labels = discover_files(folder)
    for shard_id in range(SHARDS):
        model, opt = model_and_optimizer()
        stock = stock_loader(folder, shard_id)
        loader, pruner = pruned_loader(folder, shard_id)
        assert isinstance(loader, DALIClassificationIterator)
        assert isinstance(loader, DALIGenericIterator)
        for epoch in range(3):
            s_steps = train(stock, model, opt)
            p_steps = train(loader, model, opt, observe=pruner.observe)
            plan = pruner.plan(epoch)
            # train_loader_len from _size is the number of steps the loop takes, on both
            assert all(n == len(s_steps) for _, n, _ in s_steps)
            assert all(n == len(p_steps) for _, n, _ in p_steps)
            share = plan.shard(shard_id, SHARDS)
            assert len(p_steps) == math.ceil(len(share) / BS) == 2          # 51 of 101: 26 each
            assert sum(b for _, _, b in p_steps) == len(share)
            assert sum(b for _, _, b in s_steps) in (50, 51)                # the reader's shard
        assert pruner.rounds == 3
    # labels are the class folders, as the reader's
    loader, pruner = pruned_loader(folder, 0)
    for (b,) in loader:
        assert np.array_equal(b["label"].reshape(-1).numpy(), labels[b["index"].numpy()])


def test_pad_last_batch_is_last_batch_padded(folder):
    """FILL on both: the reader's pad_last_batch=True repeats its shard's last sample to fill the
    last batch, as last_batch_padded=True does with this rank's share (sample ids as labels)."""
    files, _ = discover_files(folder)
    n = len(files)
    pipe = Pipeline(batch_size=BS, num_threads=1, device_id=None)
    with pipe:
        _, labels = fn.readers.file(files=files, labels=list(range(n)), shard_id=1,
                                    num_shards=SHARDS, pad_last_batch=True, name="Reader")
        pipe.set_outputs(labels)
    stock = DALIGenericIterator(pipe, ["label"], reader_name="Reader",
                                last_batch_policy=LastBatchPolicy.FILL)
    source = FileSource(files, np.arange(n), decoder=None)
    pipe = Pipeline(batch_size=BS, num_threads=1, device_id=None)
    with pipe:
        _, labels = source.outputs()
        pipe.set_outputs(labels)
    pruner = gp.Pruner(n, keep=0.5, policy="uniform", seed=0)
    loader = PrunedDALIIterator(pipe, ["label"], pruner=pruner, source=source, shard_id=1,
                                num_shards=SHARDS, last_batch_policy=LastBatchPolicy.FILL,
                                last_batch_padded=True)
    shards = {"stock": list(range(n // SHARDS, n)),                 # the reader's shard 1
              "pruned": pruner.plan(0).shard(1, SHARDS).indices.tolist()}
    for name, it in (("stock", stock), ("pruned", loader)):
        got = [i for (b,) in it for i in b["label"].reshape(-1).tolist()]
        share = shards[name]
        pad = -len(share) % BS
        assert pad > 0 and got == share + [share[-1]] * pad, name
