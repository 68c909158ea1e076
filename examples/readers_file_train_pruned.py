"""Train a small CNN on an image folder with DALI: ``fn.readers.file``, then the same with pruning.

Two scripts, identical but for about ten lines (``diff examples/readers_file_train.py
examples/readers_file_train_pruned.py``):

* ``readers_file_train.py``: the usual DALI image-folder recipe. ``fn.readers.file`` lists
  ``<root>/<class>/<image>`` files and labels them by class folder, ``fn.decoders.image`` decodes,
  ``DALIClassificationIterator`` feeds PyTorch.
* ``readers_file_train_pruned.py``: dynamic data pruning. ``FileSource(file_root=...)`` lists the
  same files with the same labels (int32, shape ``(B, 1)``, as the reader's), the Pruner plans each
  epoch's samples, ``PrunedDALIIterator`` replaces the classification iterator and ``pruner.observe``
  records the per-sample losses and returns their mean. The rest of the graph is unchanged.

    python examples/readers_file_train.py                  # CPU; writes 3000 Fashion-MNIST PNGs
    python examples/readers_file_train_pruned.py --data DIR   # your folder of class subdirectories

Data for the default folder: the Debian package dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
import gpuprune
from gpuprune.dali import FileSource, PrunedDALIIterator

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def make_folder(root: Path, n: int) -> Path:
    """Write the first n Fashion-MNIST training images as ``root/<label>/<index>.png``."""
    from PIL import Image
    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(FMNIST / "train-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    for i, (img, label) in enumerate(zip(x, y)):
        (root / f"class_{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"class_{label}" / f"{i:05d}.png")
    return root


@pipeline_def
def train_pipeline(source):
    jpegs, labels = source.outputs()      # the files fn.readers.file lists, in the planned order
    images = fn.decoders.image(jpegs, device="cpu", output_type=types.GRAY)
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                      mean=[72.9], std=[90.0], mirror=fn.random.coin_flip())
    return images, labels


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="image folder (default: write one)")
    ap.add_argument("--samples", type=int, default=3000, help="images in the default folder")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="dali-folder-") as tmp:
        root = args.data or make_folder(Path(tmp), args.samples)
        source = FileSource(file_root=root, decoder=None)
        pruner = gpuprune.Pruner(source.num_samples, keep=0.5, policy="ucb")
        pipe = train_pipeline(source, batch_size=args.batch_size, num_threads=2,
                              device_id=None, seed=0)
        loader = PrunedDALIIterator(pipe, ["data", "label"], pruner=pruner, source=source,
                                    auto_reset=True, last_batch_policy=LastBatchPolicy.PARTIAL)
        model = small_cnn()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for epoch in range(args.epochs):
            t0, seen, correct, total = time.perf_counter(), 0, 0, 0.0
            for data in loader:
                x, y = data[0]["data"], data[0]["label"].squeeze(-1).long()
                out = model(x)
                loss = pruner.observe(data[0]["index"], F.cross_entropy(out, y, reduction="none"))
                opt.zero_grad()
                loss.backward()
                opt.step()
                seen += len(y)
                correct += int((out.argmax(1) == y).sum())
                total += float(loss.detach()) * len(y)
            print(f"epoch {epoch}: {seen} samples, loss {total / seen:.4f}, train accuracy "
                  f"{correct / seen:.3f}, {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
