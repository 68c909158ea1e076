"""scikit-learn's handwritten digits (the UCI optical digits test set): the small fallback dataset."""

from __future__ import annotations

import numpy as np
import torch

from .base import ImageData, split_indices

__all__ = ["load_digits"]


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """1,797 grey 8x8 digit images, 10 classes, split per class into train and test.

    Pixel values 0..16 (block counts) are scaled to 0..255 so every dataset shares one uint8 range.

    Args:
        test_fraction: share of each class held out for testing. Default ``0.2`` (1,437 / 360).
        seed: seed of the split. Default ``0``.

    Raises:
        ImportError: scikit-learn is not installed (``pip install scikit-learn``).
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    bunch = _sk_load_digits()
    x = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    x = torch.from_numpy(x).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train, test = split_indices(y, test_fraction, seed)
    return ImageData("digits", x[train], y[train], x[test], y[test],
                     [str(c) for c in range(10)], "scikit-learn (sklearn.datasets.load_digits)")
