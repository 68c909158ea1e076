"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) from its IDX files.

The Debian package ``dataset-fashion-mnist`` installs the four gzipped files in
:data:`DEFAULT_ROOT`; any folder holding the same files (gzipped or not) works too.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from .base import ImageData

__all__ = ["DEFAULT_ROOT", "FILES", "CLASSES", "read_idx", "find_fashion_mnist", "load_fashion_mnist"]

#: where the Debian package ``dataset-fashion-mnist`` puts the files
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

#: split -> (images file, labels file), names without the ``.gz`` suffix
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot"]


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (optionally gzipped) into an array of its stated shape.

    The header is 2 zero bytes, a type byte (0x08: ubyte), the number of dimensions d, then d
    big-endian uint32 sizes; the data follow.

    Raises:
        ValueError: the header is not that of a ubyte IDX file or the size does not match.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {raw[:4]!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) if shape else 1
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes), file has "
                         f"{len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _file(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def find_fashion_mnist(root: str | Path | None = None) -> Path | None:
    """The folder holding all four Fashion-MNIST files (``root`` or the Debian default), or None."""
    root = DEFAULT_ROOT if root is None else Path(root)
    if all(_file(root, stem) is not None for pair in FILES.values() for stem in pair):
        return root
    return None


def load_fashion_mnist(root: str | Path | None = None) -> ImageData:
    """Load Fashion-MNIST: 60,000 train and 10,000 test 1x28x28 uint8 images, 10 classes.

    Args:
        root: folder with the four IDX files; default :data:`DEFAULT_ROOT`.

    Raises:
        FileNotFoundError: a file is missing (the message names the folder and the package).
    """
    folder = find_fashion_mnist(root)
    if folder is None:
        where = DEFAULT_ROOT if root is None else Path(root)
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in {where} (expected "
            f"{', '.join(s + '.gz' for p in FILES.values() for s in p)}); install the Debian package "
            "dataset-fashion-mnist or pass the folder holding them")
    arrays = {}
    for split, (img, lab) in FILES.items():
        x = read_idx(_file(folder, img))
        y = read_idx(_file(folder, lab))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{folder}: {split} images {x.shape} and labels {y.shape} do not match")
        arrays[split] = (torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
    return ImageData("fashion-mnist", *arrays["train"], *arrays["test"], list(CLASSES), str(folder))
