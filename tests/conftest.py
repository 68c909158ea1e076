"""Test configuration.

Under CI (``CI`` set) hypothesis runs a fixed, derandomised set of examples, so a landing never
depends on luck; locally it explores new examples on every run.
"""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fmnist_images():
    """``take(n)``: the first ``n`` Fashion-MNIST training images, ``(n, 28, 28, 1)`` uint8, read
    once per session from the Debian package dataset-fashion-mnist (the test skips without it)."""
    path = FMNIST / "train-images-idx3-ubyte.gz"
    if not path.exists():
        pytest.skip(f"Fashion-MNIST not found in {FMNIST} (Debian package dataset-fashion-mnist)")
    with gzip.open(path) as f:
        data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    return lambda n: data[:n].copy()
