"""Real datasets for the benchmark, loaded into memory as uint8 image tensors.

* Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (or a folder of its IDX files);
* scikit-learn's 8x8 digits, the fallback when Fashion-MNIST is not installed;
* any folder of class-named image folders (ImageFolder layout, read with Pillow).

:func:`load_dataset` picks one from a name and an optional folder and says when it falls back.
"""

from __future__ import annotations

from pathlib import Path

from .base import ImageData, split_indices, subset_indices
from . import fashion_mnist as _fm
from .digits import load_digits
from .fashion_mnist import DEFAULT_ROOT, find_fashion_mnist, load_fashion_mnist, read_idx
from .folder import load_image_folder, looks_like_image_folder

__all__ = ["ImageData", "DATASETS", "load_dataset", "load_fashion_mnist", "load_digits",
           "load_image_folder", "find_fashion_mnist", "looks_like_image_folder", "read_idx",
           "split_indices", "subset_indices", "DEFAULT_ROOT"]

#: names accepted by :func:`load_dataset`
DATASETS = ("auto", "fashion-mnist", "digits", "folder")


def fallback_message(where: Path) -> str:
    return (f"FALLBACK: Fashion-MNIST was not found in {where} (install the Debian package "
            "dataset-fashion-mnist, or pass --data-dir with its IDX files); using scikit-learn's "
            "8x8 digits instead (1,797 images), so results are NOT Fashion-MNIST results")


def load_dataset(name: str = "auto", data_dir: str | Path | None = None, *,
                 image_size: int | None = None, test_fraction: float = 0.2,
                 seed: int = 0) -> ImageData:
    """Load a benchmark dataset by name.

    Args:
        name: ``"auto"`` (default): the image folder or Fashion-MNIST files in ``data_dir`` when
            given, else Fashion-MNIST from :data:`DEFAULT_ROOT`, else digits (with a fallback note).
            ``"fashion-mnist"``: from ``data_dir`` (an error if the files are not there) or from
            :data:`DEFAULT_ROOT`, falling back to digits with a note when that is missing.
            ``"digits"``: scikit-learn's digits. ``"folder"``: :func:`load_image_folder` of ``data_dir``.
        data_dir: folder to read from (see ``name``).
        image_size: resize side for ``"folder"`` data (default: the first image's size).
        test_fraction: held-out share for data without a test split (digits, folders). Default ``0.2``.
        seed: seed of such splits. Default ``0``.

    The default folder is read from ``gpuprune.data.fashion_mnist.DEFAULT_ROOT`` at call time.

    Returns:
        :class:`ImageData`; a fallback is recorded in its ``notes`` (callers should show them).

    Raises:
        ValueError: unknown name, or ``"folder"`` without ``data_dir``.
        FileNotFoundError: ``data_dir`` does not hold the requested data.
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got dataset={name!r}")
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"data_dir is not a folder: {data_dir}")
    if name == "digits":
        return load_digits(test_fraction=test_fraction, seed=seed)
    if name == "folder" or (name == "auto" and data_dir is not None
                            and find_fashion_mnist(data_dir) is None):
        if data_dir is None:
            raise ValueError("dataset='folder' needs data_dir (a folder of class-named image folders)")
        return load_image_folder(data_dir, image_size=image_size, test_fraction=test_fraction, seed=seed)
    if data_dir is not None:                       # fashion-mnist (or auto) from an explicit folder
        return load_fashion_mnist(data_dir)
    if find_fashion_mnist(None) is not None:
        return load_fashion_mnist(None)
    data = load_digits(test_fraction=test_fraction, seed=seed)
    data.notes.append(fallback_message(_fm.DEFAULT_ROOT))
    return data
