"""The mosaics set that the detection and segmentation tests share."""

from pathlib import Path

import pytest

from debiformer.data.mosaics import write_mosaics


@pytest.fixture(scope="session")
def mosaics(tmp_path_factory) -> Path:
    """8 training and 3 validation mosaics of 64x64 with 1-2 unscaled items each, read-only."""
    out = tmp_path_factory.mktemp("mosaics") / "set"
    return write_mosaics(
        out, train_images=8, val_images=3, canvas_size=64, items=(1, 2), scale=(1.0, 1.0)
    )
