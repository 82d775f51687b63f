"""Shared fixtures of prunekit's Python tests."""

import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def prunekit_bin() -> str:
    """The CLI binary (PRUNEKIT_BIN, else target/release/prunekit of the repository)."""
    path = os.environ.get("PRUNEKIT_BIN", str(ROOT / "target" / "release" / "prunekit"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"the prunekit CLI is not at {path}: run `cargo build --release` or set PRUNEKIT_BIN")
    return path


@pytest.fixture(scope="session")
def tiny_arrays():
    """64 random RGB 8-bit images of 32x32 in 4 classes, and 8 more for validation."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (72, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 72).astype(np.int64)
    return (images[:64], labels[:64]), (images[64:], labels[64:])
