"""Images in class-named folders (the ImageFolder layout), read with Pillow into memory.

Two layouts are accepted::

    root/<class>/<image>                      split per class into train/test (``test_fraction``)
    root/train/<class>/<image>  root/test/<class>/<image>   (``val`` is accepted for ``test``)

Classes are the sorted folder names (label = position). Images are grey (1 channel) when every file
is grey, else RGB (3 channels); all are resized to one size (``image_size``, default the first
image's size) so the whole set fits in one uint8 tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import ImageData, split_indices

__all__ = ["IMAGE_EXTENSIONS", "looks_like_image_folder", "load_image_folder"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".pgm", ".ppm", ".pbm"})
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _split_dirs(root: Path) -> tuple[Path, Path] | None:
    train = root / "train"
    for name in ("test", "val"):
        if train.is_dir() and (root / name).is_dir():
            return train, root / name
    return None


def looks_like_image_folder(root: str | Path) -> bool:
    """True if ``root`` has class subfolders (directly or under ``train/``) holding images."""
    root = Path(root)
    if not root.is_dir():
        return False
    split = _split_dirs(root)
    base = split[0] if split else root
    return any(_images(d) for d in _class_dirs(base))


def _scan(base: Path, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    dirs = _class_dirs(base)
    names = [d.name for d in dirs]
    if classes is None:
        classes = names
    else:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise ValueError(f"{base} has class folders not present in the training folder: {unknown}")
    paths, labels = [], []
    for d in dirs:
        files = _images(d)
        paths += files
        labels += [classes.index(d.name)] * len(files)
    return paths, labels, classes


def _read(paths: list[Path], size: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    from PIL import Image

    modes = []
    for p in paths:
        with Image.open(p) as im:
            modes.append(im.mode)
            if size is None:
                size = im.size          # (width, height)
    grey = all(m in _GREY_MODES for m in modes)
    channels = 1 if grey else 3
    out = np.empty((len(paths), channels, size[1], size[0]), dtype=np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("L" if grey else "RGB")
            if im.size != size:
                im = im.resize(size, Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
        out[i] = a[None] if grey else a.transpose(2, 0, 1)
    return out, size


def load_image_folder(root: str | Path, image_size: int | tuple[int, int] | None = None,
                      test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """Load an ImageFolder-style tree into memory.

    Args:
        root: the top folder (see the module docstring for the layouts).
        image_size: side ``s`` (square) or ``(height, width)`` to resize every image to. Default:
            the size of the first image found.
        test_fraction: share of each class held out for testing when ``root`` has no
            ``train``/``test`` split. Default ``0.2``.
        seed: seed of that split. Default ``0``.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: no class folder with images, or test classes unknown to the training side.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    size = None
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if h < 1 or w < 1:
            raise ValueError(f"image_size must be positive, got image_size={image_size!r}")
        size = (int(w), int(h))
    split = _split_dirs(root)
    if split is not None:
        tr_paths, tr_labels, classes = _scan(split[0], None)
        te_paths, te_labels, _ = _scan(split[1], classes)
        if not tr_paths or not te_paths:
            raise ValueError(f"{root}: need images under both {split[0].name}/ and {split[1].name}/")
        x_tr, size = _read(tr_paths, size)
        x_te, _ = _read(te_paths, size)
        if x_te.shape[1] != x_tr.shape[1]:     # grey train, colour test (or the reverse): use RGB
            x_tr = np.repeat(x_tr, 3, axis=1) if x_tr.shape[1] == 1 else x_tr
            x_te = np.repeat(x_te, 3, axis=1) if x_te.shape[1] == 1 else x_te
        data = (torch.from_numpy(x_tr), torch.tensor(tr_labels, dtype=torch.int64),
                torch.from_numpy(x_te), torch.tensor(te_labels, dtype=torch.int64))
    else:
        paths, labels, classes = _scan(root, None)
        if not paths:
            raise ValueError(f"{root} holds no class folders with images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        x, _ = _read(paths, size)
        y = torch.tensor(labels, dtype=torch.int64)
        train, test = split_indices(y, test_fraction, seed)
        if test.numel() == 0:
            raise ValueError(f"{root}: too few images to hold any out for testing; add images or "
                             "use a train/ and test/ split")
        x = torch.from_numpy(x)
        data = (x[train], y[train], x[test], y[test])
    return ImageData(f"folder:{root.name}", *data, classes, str(root))
