"""Data sets shared by the data tests: photo folders, their FFCV files, a Fashion-MNIST subset."""

from pathlib import Path

import pytest

from debiformer.data import WriterOptions, convert_to_ffcv, make_photo_folder
from tests.data.common import FASHION


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """A 3-class ImageFolder of 30 JPEG crops of real photographs (100x75)."""
    return make_photo_folder(tmp_path_factory.mktemp("photos"), 30, size=(100, 75), num_classes=3)


@pytest.fixture(scope="session")
def photos_ffcv(photos, tmp_path_factory) -> Path:
    """`photos` as an FFCV file, every image stored as JPEG."""
    out = tmp_path_factory.mktemp("ffcv") / "photos.beton"
    return convert_to_ffcv(str(photos), out, WriterOptions(write_mode="jpg", jpeg_quality=95)).path


@pytest.fixture(scope="session")
def fashion_ffcv(tmp_path_factory):
    """300 Fashion-MNIST test images as an FFCV file stored raw, and the conversion record."""
    out = tmp_path_factory.mktemp("ffcv") / "fashion.beton"
    return convert_to_ffcv(FASHION, out, WriterOptions(write_mode="raw", subset=300, split="test"))


@pytest.fixture(scope="session")
def one_per_class(tmp_path_factory) -> tuple[Path, Path]:
    """An ImageFolder of 10 photos, one per class, so labels name samples; and its FFCV file."""
    root = tmp_path_factory.mktemp("one_per_class")
    folder = make_photo_folder(root / "folder", 10, size=(40, 30), num_classes=10)
    return folder, convert_to_ffcv(
        str(folder), root / "ffcv.beton", WriterOptions(write_mode="raw")
    ).path
