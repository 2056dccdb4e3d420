"""Sources: Fashion-MNIST idx files, ImageFolder trees, the photo folder maker."""

import numpy as np
import pytest

from debiformer.data import FASHION_MNIST_DIR, FashionMNIST, ImageFolder, read_fashion_mnist
from debiformer.data.sources import open_source
from debiformer.errors import UserError
from tests.data.common import FASHION, needs_fashion_mnist


@needs_fashion_mnist
def test_fashion_mnist_idx_reader_parses_the_standard_files():
    images, labels = read_fashion_mnist(FASHION_MNIST_DIR, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]
    assert np.bincount(labels).tolist() == [1000] * 10


@needs_fashion_mnist
def test_fashion_mnist_source_gives_three_channel_images_and_ten_classes():
    dataset = open_source(FASHION, "test")
    assert isinstance(dataset, FashionMNIST) and len(dataset.classes) == 10
    image, label = dataset[0]
    assert image.mode == "RGB" and image.size == (28, 28) and label == 9


def test_photo_folder_is_an_image_folder_with_a_class_per_photo(photos):
    dataset = ImageFolder(photos)
    assert dataset.classes == ["00_astronaut", "01_coffee", "02_chelsea"]
    assert len(dataset) == 30 and dataset.targets == [0] * 10 + [1] * 10 + [2] * 10
    assert dataset[0][0].size == (100, 75) and dataset.empty_classes == []


def test_empty_class_folders_stay_classes(photos, tmp_path):
    for name in ("00_a", "01_b", "02_c"):
        (tmp_path / name).mkdir()
    image = next((photos / "00_astronaut").iterdir())
    (tmp_path / "01_b" / image.name).write_bytes(image.read_bytes())
    dataset = ImageFolder(tmp_path)
    assert dataset.classes == ["00_a", "01_b", "02_c"] and dataset.targets == [1]
    assert dataset.empty_classes == ["00_a", "02_c"]


def test_missing_sources_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(UserError, match="no images"):
        ImageFolder(tmp_path)
    with pytest.raises(UserError, match="no Fashion-MNIST idx files"):
        open_source(f"fashion-mnist:{tmp_path}")


def test_an_unreadable_image_folder_image_is_named_in_one_line(tmp_path):
    bad = tmp_path / "cat" / "1.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=f"image {bad} is not a readable image") as error:
        ImageFolder(tmp_path)[0]
    assert "\n" not in str(error.value)
