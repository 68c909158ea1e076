"""Benchmark data loaders (Fashion-MNIST IDX, digits, image folders) and models."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from gpuprune.data import (ImageData, find_fashion_mnist, load_dataset, load_digits,
                           load_fashion_mnist, load_image_folder, read_idx, split_indices)
from gpuprune.data import fashion_mnist as fm
from gpuprune.models import MODELS, build_model

PIL = pytest.importorskip("PIL.Image")


def write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    """Write a ubyte IDX file: 0, 0, 0x08, ndim, big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def tiny_fashion_folder(tmp_path, n_train=12, n_test=5, gz=True):
    rng = np.random.default_rng(0)
    arrays = {"train": (rng.integers(0, 256, (n_train, 28, 28)), np.arange(n_train) % 10),
              "test": (rng.integers(0, 256, (n_test, 28, 28)), (np.arange(n_test) * 3) % 10)}
    for split, (img, lab) in fm.FILES.items():
        x, y = arrays[split]
        suffix = ".gz" if gz else ""
        write_idx(tmp_path / (img + suffix), x, gz)
        write_idx(tmp_path / (lab + suffix), y, gz)
    return arrays


# ------------------------------------------------------------------------------ IDX / Fashion-MNIST
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    a = (np.arange(2 * 3 * 4) * 7 % 256).reshape(2, 3, 4)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(p, a, gz)
    out = read_idx(p)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    assert np.array_equal(out, a)


def test_read_idx_rejects_bad_header_and_size(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 2]) + b"\0" * 8)   # 0x0D = float, not ubyte
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(p)
    p.write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 5]) + b"\1\2\3")    # says 5, holds 3
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(p)


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_from_a_folder(tmp_path, gz):
    arrays = tiny_fashion_folder(tmp_path, gz=gz)
    d = load_fashion_mnist(tmp_path)
    assert d.name == "fashion-mnist" and d.num_classes == 10
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert torch.equal(d.x_train[:, 0], torch.from_numpy(arrays["train"][0].astype(np.uint8)))
    assert d.y_test.tolist() == [0, 3, 6, 9, 2]


def test_load_fashion_mnist_missing_file_names_the_folder(tmp_path):
    tiny_fashion_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    assert find_fashion_mnist(tmp_path) is None
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(find_fashion_mnist() is None, reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_matches_its_documented_shape_and_statistics():
    d = load_fashion_mnist()
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.y_train).tolist() == [6000] * 10
    assert torch.bincount(d.y_test).tolist() == [1000] * 10
    assert abs(d.x_train.double().mean().item() - 72.94) < 0.01     # 0.2860 * 255
    mean, std = d.channel_stats()
    assert abs(mean.item() - 0.2860) < 1e-3 and abs(std.item() - 0.3530) < 1e-3


# ------------------------------------------------------------------------------ digits and splits
def test_digits_split_is_per_class_disjoint_and_deterministic():
    a, b = load_digits(), load_digits()
    assert len(a.x_train) + len(a.x_test) == 1797
    assert a.x_train.shape[1:] == (1, 8, 8) and int(a.x_train.max()) == 255
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    counts_test = torch.bincount(a.y_test, minlength=10)
    counts_all = counts_test + torch.bincount(a.y_train, minlength=10)
    assert torch.equal(counts_test, torch.round(0.2 * counts_all.double()).long())
    c = load_digits(seed=1)
    assert not torch.equal(a.y_test, c.y_test) or not torch.equal(a.x_test, c.x_test)


def test_split_indices_hand_case():
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])      # class 2 has one image: train only
    train, test = split_indices(labels, 0.4, seed=3)
    assert sorted(train.tolist() + test.tolist()) == list(range(8))
    assert torch.bincount(labels[test], minlength=3).tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="test_fraction"):
        split_indices(labels, 1.0, seed=0)


def test_subset_is_seeded_and_sized():
    d = load_digits()
    s1, s2 = d.subset(100, 50), d.subset(100, 50)
    assert len(s1.x_train) == 100 and len(s1.x_test) == 50
    assert torch.equal(s1.x_train, s2.x_train) and torch.equal(s1.y_test, s2.y_test)
    assert any("training subset" in n for n in s1.notes)
    assert len(d.subset(None, None).x_train) == len(d.x_train)


def test_image_data_rejects_mismatched_labels():
    x = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="y_train"):
        ImageData("t", x, torch.zeros(2, dtype=torch.int64), x, torch.zeros(3, dtype=torch.int64),
                  ["a"], "here")
    with pytest.raises(ValueError, match="labels outside"):
        ImageData("t", x, torch.tensor([0, 1, 2]), x, torch.zeros(3, dtype=torch.int64),
                  ["a", "b"], "here")


# ------------------------------------------------------------------------------ image folders
def make_png_folder(root, classes=("cat", "ant", "bee"), per_class=4, mode="L", size=(6, 5)):
    """class folders of PNGs whose pixels encode (class, image): value = 40 * class + image."""
    expected = {}
    for ci, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(per_class):
            value = 40 * ci + j
            if mode == "L":
                a = np.full((size[1], size[0]), value, np.uint8)
            else:
                a = np.zeros((size[1], size[0], 3), np.uint8)
                a[..., 0], a[..., 1], a[..., 2] = value, 255 - value, 7
            PIL.fromarray(a, mode).save(root / name / f"img{j}.png")
            expected[(name, j)] = a
    return expected


def test_image_folder_grey_split_per_class(tmp_path):
    make_png_folder(tmp_path, per_class=5)
    d = load_image_folder(tmp_path, test_fraction=0.2)
    assert d.classes == ["ant", "bee", "cat"]                  # sorted folder names
    assert d.image_shape == (1, 5, 6)
    assert len(d.x_train) == 12 and len(d.x_test) == 3       # one of five per class held out
    assert torch.bincount(d.y_test).tolist() == [1, 1, 1]
    # every image is constant; its value tells its class: 40 * (index in the written order)
    written_class = {"cat": 0, "ant": 1, "bee": 2}
    for x, y in zip(torch.cat([d.x_train, d.x_test]), torch.cat([d.y_train, d.y_test])):
        assert x.min() == x.max()
        assert int(x.flatten()[0]) // 40 == written_class[d.classes[int(y)]]


def test_image_folder_rgb_with_train_test_layout_and_resize(tmp_path):
    exp = make_png_folder(tmp_path / "train", classes=("a", "b"), per_class=2, mode="RGB")
    make_png_folder(tmp_path / "test", classes=("a", "b"), per_class=1, mode="RGB")
    d = load_image_folder(tmp_path)
    assert d.image_shape == (3, 5, 6) and len(d.x_train) == 4 and len(d.x_test) == 2
    assert d.y_train.tolist() == [0, 0, 1, 1]
    assert torch.equal(d.x_train[2], torch.from_numpy(exp[("b", 0)]).permute(2, 0, 1))
    r = load_image_folder(tmp_path, image_size=4)
    assert r.image_shape == (3, 4, 4)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no class folders with images"):
        load_image_folder(tmp_path)


# ------------------------------------------------------------------------------ load_dataset
def test_load_dataset_falls_back_to_digits_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEFAULT_ROOT", tmp_path / "missing")
    d = load_dataset("auto")
    assert d.name == "digits"
    assert any("FALLBACK" in n and str(tmp_path / "missing") in n for n in d.notes)
    d = load_dataset("fashion-mnist")
    assert d.name == "digits" and d.notes


def test_load_dataset_picks_folder_or_idx_from_data_dir(tmp_path):
    make_png_folder(tmp_path / "imgs")
    assert load_dataset("auto", tmp_path / "imgs").name == "folder:imgs"
    (tmp_path / "fm").mkdir()
    tiny_fashion_folder(tmp_path / "fm")
    assert load_dataset("auto", tmp_path / "fm").name == "fashion-mnist"
    with pytest.raises(FileNotFoundError):
        load_dataset("fashion-mnist", tmp_path / "imgs")      # an explicit folder: no fallback
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("folder")


# ------------------------------------------------------------------------------ models
@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("resnet18", (3, 8, 8))])
def test_models_are_seeded_by_their_generator_only(name, shape):
    state = torch.random.get_rng_state()
    a = build_model(name, shape, 10, torch.Generator().manual_seed(5))
    b = build_model(name, shape, 10, torch.Generator().manual_seed(5))
    c = build_model(name, shape, 10, torch.Generator().manual_seed(6))
    assert torch.equal(torch.random.get_rng_state(), state)          # global RNG untouched
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert not any(p.is_meta for p in a.parameters())
    a.eval()
    assert a(torch.zeros(2, *shape)).shape == (2, 10)


def test_model_default_init_bounds():
    m = build_model("mlp", (1, 4, 4), 3, torch.Generator().manual_seed(0))
    first = m.net[1]
    bound = 1 / 16 ** 0.5          # kaiming_uniform(a=sqrt(5)) and bias bound are 1/sqrt(fan_in)
    assert first.weight.abs().max() <= bound and first.bias.abs().max() <= bound
    assert first.weight.std() > bound / 3


def test_build_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("vgg", (1, 8, 8), 10, torch.Generator())
    assert set(MODELS) == {"mlp", "cnn", "resnet18"}


def test_resnet18_width_keeps_the_architecture():
    n_params = {w: sum(p.numel() for p in build_model("resnet18", (3, 32, 32), 10,
                                                       torch.Generator().manual_seed(0),
                                                       width=w).parameters())
                for w in (8, 64)}
    assert 11_100_000 < n_params[64] < 11_300_000                    # the standard ResNet-18
    assert n_params[8] < n_params[64] / 50                           # about (8 / 64) ** 2
    small = build_model("resnet18", (3, 32, 32), 10, torch.Generator().manual_seed(0), width=8)
    assert small.head.in_features == 64 and len(small.blocks) == 8
    cnn = build_model("cnn", (1, 8, 8), 10, torch.Generator().manual_seed(0), width=4)
    assert cnn.head.in_features == 16
    with pytest.raises(ValueError, match="width applies to"):
        build_model("mlp", (1, 8, 8), 10, torch.Generator(), width=4)
    with pytest.raises(ValueError, match="width must be >= 1"):
        build_model("resnet18", (3, 8, 8), 10, torch.Generator(), width=0)


# ------------------------------------------------------------------------------ CIFAR shape
def test_cifar_shaped_pads_and_repeats_channels(tmp_path):
    tiny_fashion_folder(tmp_path)
    d = load_fashion_mnist(tmp_path)
    c = d.cifar_shaped()
    assert c.image_shape == (3, 32, 32) and len(c.x_train) == len(d.x_train)
    assert c.x_train.dtype == torch.uint8 and c.x_train.is_contiguous()
    for ch in range(3):                                  # the image, centred, in every channel
        assert torch.equal(c.x_train[:, ch, 2:30, 2:30], d.x_train[:, 0])
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert int(c.x_train[:, :, border].max()) == 0 and int(c.x_test[:, :, border].max()) == 0
    assert torch.equal(c.y_train, d.y_train) and c.classes == d.classes
    assert any("CIFAR-shaped" in n for n in c.notes)
    # odd margins: the extra pixel at the bottom/right; 3 channels are kept as they are
    rgb = ImageData("rgb", torch.full((2, 3, 29, 31), 7, dtype=torch.uint8),
                    torch.tensor([0, 1]), torch.full((1, 3, 29, 31), 7, dtype=torch.uint8),
                    torch.tensor([1]), ["a", "b"], "test")
    r = rgb.cifar_shaped()
    assert r.image_shape == (3, 32, 32)
    assert int(r.x_train[0, 0, 1, 0]) == 7 and int(r.x_train[0, 0, 0, 0]) == 0      # top 1 row
    assert int(r.x_train[0, 0, 30, 31]) == 0 and int(r.x_train[0, 0, 29, 30]) == 7  # bottom 2
    with pytest.raises(ValueError, match="larger"):
        rgb.cifar_shaped(size=16)
    two = ImageData("two", torch.zeros(1, 2, 8, 8, dtype=torch.uint8), torch.tensor([0]),
                    torch.zeros(1, 2, 8, 8, dtype=torch.uint8), torch.tensor([0]), ["a"], "t")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        two.cifar_shaped()
