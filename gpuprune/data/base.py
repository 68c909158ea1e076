"""The in-memory image dataset every loader returns, and deterministic splits and subsets."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ImageData", "split_indices", "subset_indices"]


@dataclass
class ImageData:
    """A labelled image classification dataset held in memory as uint8 tensors.

    Attributes:
        name: short name (``"fashion-mnist"``, ``"digits"``, ``"folder:<dir name>"``).
        x_train: uint8 tensor of shape (N, C, H, W), pixel values 0..255.
        y_train: int64 tensor of N labels in [0, num_classes).
        x_test: uint8 tensor of shape (M, C, H, W).
        y_test: int64 tensor of M labels.
        classes: class names, indexed by label.
        source: where the data was read from (a path or a package name).
        notes: human-readable remarks, e.g. that a fallback dataset is in use.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    source: str
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for attr in ("x_train", "x_test"):
            x = getattr(self, attr)
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{attr} must be a uint8 (N, C, H, W) tensor, got "
                                 f"{x.dtype} of shape {tuple(x.shape)}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"train and test images differ in shape: {tuple(self.x_train.shape[1:])} "
                             f"vs {tuple(self.x_test.shape[1:])}")
        for x_name, y_name in (("x_train", "y_train"), ("x_test", "y_test")):
            x, y = getattr(self, x_name), getattr(self, y_name)
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{y_name} must be int64 of shape ({x.shape[0]},), got {y.dtype} "
                                 f"of shape {tuple(y.shape)}")
        if len(self.x_train) == 0 or len(self.x_test) == 0:
            raise ValueError(f"dataset {self.name!r} needs at least one train and one test image, got "
                             f"{len(self.x_train)} and {len(self.x_test)}")
        k = len(self.classes)
        for y_name in ("y_train", "y_test"):
            y = getattr(self, y_name)
            if int(y.min()) < 0 or int(y.max()) >= k:
                raise ValueError(f"{y_name} has labels outside [0, {k})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the training pixels, scaled to [0, 1] (float32, shape (C,))."""
        x = self.x_train.float().div_(255.0)
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp(min=1e-3)  # a blank channel must not divide by zero
        return mean, std

    def subset(self, train: int | None = None, test: int | None = None, seed: int = 0) -> "ImageData":
        """A random subset of ``train`` training and ``test`` test images (None keeps all).

        The subset is a function of ``seed`` only (an explicit generator, not the global RNG).
        """
        xtr, ytr, xte, yte = self.x_train, self.y_train, self.x_test, self.y_test
        notes = list(self.notes)
        if train is not None and train < len(xtr):
            i = subset_indices(len(xtr), train, seed)
            xtr, ytr = xtr[i], ytr[i]
            notes.append(f"training subset of {train} of {len(self.x_train)} images")
        if test is not None and test < len(xte):
            i = subset_indices(len(xte), test, seed + 1)
            xte, yte = xte[i], yte[i]
            notes.append(f"test subset of {test} of {len(self.x_test)} images")
        return ImageData(self.name, xtr, ytr, xte, yte, list(self.classes), self.source, notes)

    def cifar_shaped(self, size: int = 32) -> "ImageData":
        """The same images in CIFAR's shape: zero-padded to ``size`` x ``size`` (centred; an odd
        margin puts the extra pixel at the bottom/right) and, when grey, repeated to 3 channels.
        Fashion-MNIST's 1x28x28 becomes 3x32x32 (a 2-pixel border), so CIFAR models and
        augmentation run unchanged. The padding is part of every image, so the per-channel
        statistics change (the border is 0).

        Raises:
            ValueError: an image larger than ``size``, or neither 1 nor 3 channels.
        """
        c, h, w = self.image_shape
        if h > size or w > size:
            raise ValueError(f"cifar_shaped pads to {size}x{size}; the images are larger ({h}x{w})")
        if c not in (1, 3):
            raise ValueError(f"cifar_shaped needs 1 or 3 channels, got {c}")
        top, left = (size - h) // 2, (size - w) // 2
        pad = (left, size - w - left, top, size - h - top)

        def reshape(x: torch.Tensor) -> torch.Tensor:
            x = torch.nn.functional.pad(x, pad)
            return x.expand(-1, 3, -1, -1).contiguous() if c == 1 else x
        notes = list(self.notes) + [f"CIFAR-shaped: {c}x{h}x{w} zero-padded to 3x{size}x{size}"]
        return ImageData(self.name, reshape(self.x_train), self.y_train, reshape(self.x_test),
                         self.y_test, list(self.classes), self.source, notes)

    def describe(self) -> str:
        c, h, w = self.image_shape
        return (f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test images, "
                f"{c}x{h}x{w}, {self.num_classes} classes (from {self.source})")


def subset_indices(n: int, size: int, seed: int) -> torch.Tensor:
    """``size`` distinct indices of ``range(n)``, sorted, drawn with a generator seeded by ``seed``."""
    if not 1 <= size <= n:
        raise ValueError(f"subset size must be in [1, {n}], got {size}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:size].sort().values


def split_indices(labels: torch.Tensor, test_fraction: float, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-class random train/test split: ``round(test_fraction * n_c)`` of each class, at
    least one of each class with two or more images, go to the test side.

    Returns sorted (train, test) index tensors. Deterministic in ``seed``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got test_fraction={test_fraction}")
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = round(test_fraction * idx.numel())
        if idx.numel() >= 2:
            n_test = min(max(n_test, 1), idx.numel() - 1)
        else:
            n_test = 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values
