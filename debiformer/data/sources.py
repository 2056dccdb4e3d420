"""Image sources: class-per-folder trees (ImageNet layout), Fashion-MNIST idx files (as they are,
or as the mosaics draw their items), photos."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from debiformer.data.images import read_rgb
from debiformer.errors import UserError

FASHION_MNIST_PREFIX = "fashion-mnist:"
# Fashion-MNIST's items drawn as the mosaics draw them (`debiformer.data.mosaics.MosaicItems`)
FASHION_MNIST_ITEMS_PREFIX = "fashion-mnist-items:"
FASHION_MNIST_PREFIXES = (FASHION_MNIST_PREFIX, FASHION_MNIST_ITEMS_PREFIX)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
    "camera",
    "grass",
)


def fashion_mnist_root(source: str | os.PathLike) -> Path | None:
    """The idx folder if `source` is "fashion-mnist:<dir>", "fashion-mnist-items:<dir>" or a
    folder of idx files, else None."""
    text = str(source)
    prefix = next((p for p in FASHION_MNIST_PREFIXES if text.startswith(p)), None)
    if prefix is not None:
        root = Path(text[len(prefix) :] or FASHION_MNIST_DIR)
        if not (root / FASHION_MNIST_FILES["train"][0]).is_file():
            raise UserError(
                f"no Fashion-MNIST idx files in {root}: install the Debian package "
                "dataset-fashion-mnist or point fashion-mnist:<dir> at the folder holding them"
            )
        return root
    root = Path(text)
    return root if (root / FASHION_MNIST_FILES["train"][0]).is_file() else None


def _read_idx(path: Path) -> np.ndarray:
    """Parse one gzip idx file (the MNIST format) into a numpy array."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_fashion_mnist(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N, 28, 28) uint8 and labels (N,) int64 of split "train" or "test"."""
    images_name, labels_name = FASHION_MNIST_FILES[split]
    images = _read_idx(Path(root) / images_name)
    labels = _read_idx(Path(root) / labels_name).astype(np.int64)
    return images, labels


class FashionMNIST(Dataset):
    """Fashion-MNIST from the idx files: (3-channel PIL image, label) pairs, no download."""

    classes = [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None):
        self.images, self.labels = read_fashion_mnist(root, split)
        self.targets = self.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple:
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class ImageFolder(Dataset):
    """A class-per-folder image tree (the ImageNet layout): (PIL RGB image, label) pairs."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None):
        root = Path(root)
        if not root.is_dir():
            raise UserError(
                f"image folder {root} does not exist: give a folder with one sub-folder per class"
            )
        self.classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
        self.samples = [
            (str(path), label)
            for label, name in enumerate(self.classes)
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise UserError(f"no images in {root}: expected {root}/<class>/<image>.jpg")
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    @property
    def empty_classes(self) -> list[str]:
        """The class folders without images (classes all the same, with no samples)."""
        present = set(self.targets)
        return [name for label, name in enumerate(self.classes) if label not in present]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple:
        path, label = self.samples[index]
        image = read_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def open_source(
    source: str | os.PathLike, split: str = "train", transform: Callable | None = None
) -> Dataset:
    """The data set behind a source: Fashion-MNIST (split "train" or "test"), as it is or as
    mosaics items ("fashion-mnist-items:<dir>"), or an ImageFolder."""
    root = fashion_mnist_root(source)
    if root is not None and str(source).startswith(FASHION_MNIST_ITEMS_PREFIX):
        from debiformer.data.mosaics import MosaicItems  # mosaics draw with this module's reader

        return MosaicItems(root, split, transform)
    if root is not None:
        return FashionMNIST(root, split, transform)
    return ImageFolder(source, transform)


def _photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photographs as an (H, W, 3) uint8 array."""
    import skimage.data

    image = getattr(skimage.data, name)()
    image = image[0] if isinstance(image, tuple) else image
    return np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]


def _write_photo_class(job: tuple[Path, str, int, tuple[int, int], int, int]) -> None:
    """Write `count` random crops (random scale and aspect, random flip) of one photo as JPEGs."""
    out_dir, name, label, size, first, count = job
    photo = Image.fromarray(_photo(name))
    rng = np.random.default_rng([label, first])
    folder = out_dir / f"{label:02d}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    width, height = photo.size
    for index in range(first, first + count):
        scale = rng.uniform(0.35, 1.0)
        crop_w = max(16, int(width * scale * rng.uniform(0.8, 1.0)))
        crop_h = max(16, int(height * scale * rng.uniform(0.8, 1.0)))
        left, top = rng.integers(0, width - crop_w + 1), rng.integers(0, height - crop_h + 1)
        image = photo.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image.save(folder / f"{index:05d}.jpg", quality=90)


def make_photo_folder(
    out_dir: str | os.PathLike,
    num_images: int,
    size: tuple[int, int] = (500, 375),
    num_classes: int = len(PHOTOS),
    workers: int = 1,
) -> Path:
    """An ImageFolder of JPEG crops of scikit-image's bundled photographs, one class per photograph.

    Each image is a random crop (35-100% scale) of its photograph, flipped at random and resized to
    `size` (width, height). The same arguments always give the same files.
    """
    if not 1 <= num_classes <= len(PHOTOS):
        raise UserError(f"num_classes must be between 1 and {len(PHOTOS)}, got {num_classes}")
    out_dir = Path(out_dir)
    per_class = np.diff(np.linspace(0, num_images, num_classes + 1).astype(int))
    chunk = 100
    jobs = [
        (out_dir, PHOTOS[label], label, size, first, min(chunk, count - first))
        for label, count in enumerate(per_class)
        for first in range(0, count, chunk)
    ]
    if workers > 1:
        with Pool(workers) as pool:
            pool.map(_write_photo_class, jobs)
    else:
        for job in jobs:
            _write_photo_class(job)
    return out_dir
