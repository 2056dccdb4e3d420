"""Constants and small helpers shared by the data tests."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from debiformer.data import FASHION_MNIST_DIR, build_loader
from debiformer.data.sources import FASHION_MNIST_FILES

FASHION = "fashion-mnist:" + FASHION_MNIST_DIR
CPU = torch.device("cpu")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
NORMALISED_RANGE = (-2.12, 2.65)  # (0 - max mean) / min std .. (1 - min mean) / min std

needs_fashion_mnist = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(), reason="Fashion-MNIST idx files not installed"
)


def pixels(images: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: 0..255 floats."""
    return (images * STD + MEAN) * 255


def make_loader(split, backend, path, size=32, batch=8, workers=0, **kwargs):
    """A CPU loader with seed 0 unless `kwargs` say otherwise."""
    return build_loader(
        split,
        backend=backend,
        path=str(path) if path is not None else None,
        image_size=size,
        batch_size=batch,
        num_workers=workers,
        seed=kwargs.pop("seed", 0),
        device=CPU,
        **kwargs,
    )


def labels_of(batches) -> list[int]:
    """Every label of `batches` (a loader: one pass over it)."""
    return [int(label) for _, labels in batches for label in labels]


def write_idx_folder(folder: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """A Fashion-MNIST style folder whose train and test splits both hold `images` and `labels`."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        images_name, labels_name = FASHION_MNIST_FILES[split]
        for name, array in ((images_name, images), (labels_name, labels)):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(
                size.to_bytes(4, "big") for size in array.shape
            )
            with gzip.open(folder / name, "wb") as file:
                file.write(header + array.astype(np.uint8).tobytes())
    return folder


def write_pair(
    root: Path, stem: str, image: np.ndarray, mask: np.ndarray, mask_mode: str = "L"
) -> None:
    """Writes `root/images/<stem>.png` (RGB) and `root/masks/<stem>.png` (mode `mask_mode`)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.astype(np.uint8), "RGB").save(root / "images" / f"{stem}.png")
    if mask_mode == "RGB":
        mask = np.repeat(mask[..., None], 3, axis=2)
    Image.fromarray(mask.astype(np.uint8), mask_mode).save(root / "masks" / f"{stem}.png")
