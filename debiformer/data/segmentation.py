"""Semantic segmentation data: an image folder, a folder of label masks and a class list.

Every image `images/<stem>.<jpg|jpeg|png|bmp|webp>` has its mask `masks/<stem>.png`: a
single-channel PNG ('L' or 'P') whose pixel values are class indices, 255 ignored. With
`reduce_zero_label` (ADE20K, as mmsegmentation reads it) 0 is "other" and ignored and every other
value v is class v-1.

Training follows mmsegmentation's ADE20K pipeline: random rescale, category-balanced random crop,
horizontal flip, photometric distortion, then ImageNet normalisation and padding to the crop size
(image 0, mask ignored). Evaluation only normalises: the inference code resizes to its test scales.
A sample's randomness is a pure function of (seed, epoch, index), so it is the same whatever
worker reads it and an epoch can start at any batch.

A training batch is `(images, masks)`: float (N, 3, crop, crop) and int64 (N, crop, crop); an
evaluation batch is `(list of images, list of masks)` of each image's own size; on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from debiformer.data.draws import stream_seed
from debiformer.data.images import IMAGE_SUFFIXES, PixelLimit, read_image, read_rgb
from debiformer.data.loaders import KeyedLoader
from debiformer.errors import UserError

MASK_MODES = ("L", "P")  # single-channel PNGs: grey levels or palette indices
IGNORE_INDEX = 255
CROP_RETRIES = 10  # mmsegmentation's RandomCrop redraws a crop at most this often


def read_class_names(classes: list[str] | str | Path) -> list[str]:
    """The class names: a list as is, or the lines of a text file (stripped, blank lines skipped),
    line k naming label k."""
    if isinstance(classes, list):
        return classes
    path = Path(classes)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"class list {path}: cannot be read ({error})") from None
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise UserError(f"class list {path}: no class names (one name a line, line k = label k)")
    return names


# ----------------------------------------------------------------------------- transforms


class RandomRescale(v2.Transform):
    """mmsegmentation's `RandomResize(scale, ratio_range, keep_ratio=True)`: draw r uniformly in
    `ratio_range`, take the target (long, short) sides `(int(max(scale) * r), int(min(scale) * r))`
    and resize by min(long target / long side, short target / short side), keeping the aspect
    ratio (mmcv's `rescale_size`, sides rounded half up). Images bilinear without antialiasing (as
    OpenCV's INTER_LINEAR that mmcv uses), masks nearest."""

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float]) -> None:
        super().__init__()
        self.scale = scale
        self.ratio_range = ratio_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        ratio = float(torch.empty(()).uniform_(*self.ratio_range))
        long_target, short_target = int(max(self.scale) * ratio), int(min(self.scale) * ratio)
        factor = min(long_target / max(height, width), short_target / min(height, width))
        return {"size": [int(height * factor + 0.5), int(width * factor + 0.5)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            interpolation = v2.InterpolationMode.NEAREST
        else:
            interpolation = v2.InterpolationMode.BILINEAR
        return self._call_kernel(
            v2.functional.resize,
            inpt,
            size=params["size"],
            interpolation=interpolation,
            antialias=False,
        )


class CategoryBalancedCrop(v2.Transform):
    """mmsegmentation's `RandomCrop(size, cat_max_ratio, ignore_index)`: a random crop of
    min(size, side) per side. While the crop holds a single class, or its most frequent class
    covers `cat_max_ratio` or more of its labelled (not ignored) pixels, it is drawn again, at most
    `CROP_RETRIES` times; the last draw is kept. With `cat_max_ratio` >= 1 the first draw is kept."""

    def __init__(self, size: int, cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.size = size
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_height, crop_width = min(self.size, height), min(self.size, width)
        box = _random_box(height, width, crop_height, crop_width)
        masks = [inpt for inpt in flat_inputs if isinstance(inpt, tv_tensors.Mask)]
        if masks and self.cat_max_ratio < 1:
            for _ in range(CROP_RETRIES):
                if self._balanced(masks[0], box):
                    break
                box = _random_box(height, width, crop_height, crop_width)
        return box

    def _balanced(self, mask: torch.Tensor, box: dict[str, int]) -> bool:
        """Whether the crop `box` of `mask` holds several classes, none covering
        `cat_max_ratio` or more of its labelled pixels."""
        top, left = box["top"], box["left"]
        crop = mask[..., top : top + box["height"], left : left + box["width"]]
        labels, counts = torch.unique(crop, return_counts=True)
        counts = counts[labels != self.ignore_index]
        return len(counts) > 1 and bool(counts.max() < self.cat_max_ratio * counts.sum())

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.crop, inpt, **params)


def _random_box(height: int, width: int, crop_height: int, crop_width: int) -> dict[str, int]:
    """A crop of `crop_height` x `crop_width` at a uniformly drawn place in a height x width
    image, as the keyword arguments of `v2.functional.crop`."""
    top = int(torch.randint(height - crop_height + 1, ()))
    left = int(torch.randint(width - crop_width + 1, ()))
    return {"top": top, "left": left, "height": crop_height, "width": crop_width}


class PhotoMetricDistortion(v2.RandomPhotometricDistort):
    """mmsegmentation's `PhotoMetricDistortion()` in torchvision's terms.

    The same: brightness, then contrast either before saturation or after hue (even odds),
    saturation, hue, each applied with probability 0.5, on the uint8 image (values clipped), with
    contrast and saturation factors in (0.5, 1.5). Hue: mmseg's delta 18 is in OpenCV's uint8 hue
    unit (2 degrees), so +-36 degrees, a hue factor in (-0.1, 0.1). torchvision's random channel
    permutation, which mmseg has not, is left out.
    What differs: mmseg adds a brightness delta in [-32, 32] where torchvision multiplies by a
    factor in (1 - 32/255, 1 + 32/255) = (0.875, 1.125) (the same change for white); mmseg's
    contrast multiplies the pixels by the factor where torchvision blends with the mean grey;
    mmseg's saturation scales the HSV saturation where torchvision blends with the greyscale
    image; mmseg draws integer hue deltas."""

    def __init__(self) -> None:
        super().__init__(
            brightness=(1 - 32 / 255, 1 + 32 / 255),
            contrast=(0.5, 1.5),
            saturation=(0.5, 1.5),
            hue=(-0.1, 0.1),
            p=0.5,
        )

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {**super().make_params(flat_inputs), "channel_permutation": None}


class PadBottomRight(v2.Transform):
    """Pads the bottom and right of a sample smaller than `size` x `size` up to that size: the
    image with 0, the mask with `ignore_index`."""

    def __init__(self, size: int, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.size = size
        self.ignore_index = ignore_index

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        return {"padding": [0, 0, max(self.size - width, 0), max(self.size - height, 0)]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else 0
        return self._call_kernel(v2.functional.pad, inpt, padding=params["padding"], fill=fill)


@dataclass(frozen=True)
class SegmentationTransform:
    """The settings of the training transform (mmsegmentation's ADE20K defaults) and the
    builder of the training and evaluation transforms of (uint8 image, uint8 mask) pairs."""

    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop_size: int = 512
    cat_max_ratio: float = 0.75
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if not 0 <= self.ignore_index <= 255:
            raise UserError(f"ignore index {self.ignore_index} is not 0..255: masks are 8-bit PNGs")

    def build(self, train: bool) -> v2.Compose:
        """Training: rescale, balanced crop, flip, photometric distortion, normalise, pad to the
        crop size. Evaluation: normalise only (sizes kept)."""
        normalise = [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ]
        if not train:
            return v2.Compose(normalise)
        return v2.Compose(
            [
                RandomRescale(self.scale, self.ratio_range),
                CategoryBalancedCrop(self.crop_size, self.cat_max_ratio, self.ignore_index),
                v2.RandomHorizontalFlip(0.5),
                PhotoMetricDistortion(),
                *normalise,
                PadBottomRight(self.crop_size, self.ignore_index),
            ]
        )


# ----------------------------------------------------------------------------- samples


def _image_files(images: Path) -> list[Path]:
    """The image files of a folder, sorted by name; a UserError if it holds none."""
    try:
        files = sorted(
            path
            for path in images.iterdir()
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
        )
    except OSError as error:
        raise UserError(f"image folder {images}: cannot be read ({error})") from None
    if not files:
        raise UserError(
            f"image folder {images}: no image ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "nothing to train or evaluate on"
        )
    return files


def _mask_pairs(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths of every image of `images`: the mask is `masks/<stem>.png`."""
    pairs = []
    for image in _image_files(images):
        mask = masks / f"{image.stem}.png"
        if not mask.is_file():
            raise UserError(f"image {image} has no mask: expected {mask}")
        pairs.append((image, mask))
    return pairs


def _read_image(path: Path, limit: PixelLimit) -> tv_tensors.Image:
    """An image file as a uint8 (3, H, W) RGB image (greyscale and palette images converted)."""
    image = read_rgb(path, max_pixels=limit.pixels, limit_name=limit.name)
    return tv_tensors.Image(v2.functional.pil_to_tensor(image))


def read_mask(path: Path, limit: PixelLimit) -> np.ndarray:
    """A mask file as a uint8 (H, W) array of its pixel values; a UserError naming the file unless
    it is an 8-bit single-channel image ('L' or 'P')."""
    mask = read_image(path, max_pixels=limit.pixels, limit_name=limit.name, what="mask")
    if mask.mode not in MASK_MODES:
        bits = " (16-bit)" if mask.mode.startswith("I;16") else ""
        raise UserError(
            f"mask {path}: mode {mask.mode}{bits}; masks must be single-channel PNGs "
            "('L' or 'P', 8 bits) of class indices"
        )
    return np.array(mask, dtype=np.uint8)


class SegmentationSamples(Dataset):
    """(image, mask) samples read by `(epoch, index)` keys: a normalised float (3, H, W) image and
    its int64 (H, W) class indices (`transform.ignore_index` ignored), the training transform's
    randomness drawn from (seed, epoch, index) whatever worker reads it."""

    def __init__(
        self,
        images: Path,
        masks: Path,
        *,
        num_classes: int,
        reduce_zero_label: bool,
        train: bool,
        seed: int,
        transform: SegmentationTransform,
        limit: PixelLimit = PixelLimit(),
    ) -> None:
        self.pairs = _mask_pairs(Path(images), Path(masks))
        self.limit = limit
        self.num_classes = num_classes
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = transform.ignore_index
        self.seed = seed
        self.transform = transform.build(train)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        image_path, mask_path = self.pairs[index]
        image = _read_image(image_path, self.limit)
        mask = self._classes(mask_path)
        if tuple(image.shape[-2:]) != tuple(mask.shape):
            raise UserError(
                f"image {image_path} is {image.shape[-1]}x{image.shape[-2]} but its mask "
                f"{mask_path} is {mask.shape[-1]}x{mask.shape[-2]}: they must be the same size"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(self.seed, epoch, index) & (2**63 - 1))
            image, mask = self.transform(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()

    def _classes(self, path: Path) -> tv_tensors.Mask:
        """The uint8 (H, W) class indices of a mask file, zero label reduced if asked; a UserError
        naming the file for a value that is no class."""
        values = read_mask(path, self.limit)
        classes = self.to_classes(values)
        wrong = (classes != self.ignore_index) & (classes >= self.num_classes)
        if wrong.any():
            raise UserError(f"mask {path}: {self.not_a_class(int(values[wrong][0]))}")
        return tv_tensors.Mask(torch.from_numpy(classes))

    def to_classes(self, values: np.ndarray) -> np.ndarray:
        """The class index of each uint8 mask value (`ignore_index` for ignored ones), zero label
        reduced if asked; values beyond the classes stay beyond them."""
        if not self.reduce_zero_label:
            return values
        classes = values - np.uint8(1)  # 0 wraps to 255
        classes[(values == 0) | (values == self.ignore_index)] = self.ignore_index
        return classes

    def value_rule(self) -> str:
        """Which mask values are classes and which are ignored."""
        names = f"the class list has {self.num_classes} names"
        if self.reduce_zero_label:
            return (
                f"{names}; with reduce_zero_label values run 1..{self.num_classes}, 0 and "
                f"{self.ignore_index} are ignored"
            )
        return f"{names}: values run 0..{self.num_classes - 1}, {self.ignore_index} is ignored"

    def not_a_class(self, value: int) -> str:
        """Why a mask value is no class, and which values are."""
        return f"value {value} is not a class ({self.value_rule()})"


# ----------------------------------------------------------------------------- loader


@dataclass
class SegmentationData:
    """One split's segmentation data: its folders, class names and samples."""

    images: Path
    masks: Path
    class_names: list[str]
    samples: SegmentationSamples


def read_segmentation_split(
    images: str | Path,
    masks: str | Path,
    *,
    class_names: list[str],
    reduce_zero_label: bool,
    train: bool,
    transform: SegmentationTransform,
    seed: int = 0,
    limit: PixelLimit = PixelLimit(),
) -> SegmentationData:
    """One split of segmentation data: the image and mask folders (the caller checks that they
    exist, naming their recipe keys) and the class names, label k named by `class_names[k]`;
    images and masks above `limit` are refused where they are read."""
    images, masks = Path(images), Path(masks)
    for what, folder in (("image", images), ("mask", masks)):
        if not folder.is_dir():
            raise UserError(f"{what} folder {folder} not found")
    samples = SegmentationSamples(
        images,
        masks,
        num_classes=len(class_names),
        reduce_zero_label=reduce_zero_label,
        train=train,
        seed=seed,
        transform=transform,
        limit=limit,
    )
    return SegmentationData(images, masks, class_names, samples)


def _stack(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch: images and masks stacked (all of the crop size)."""
    return torch.stack([image for image, _ in samples]), torch.stack([mask for _, mask in samples])


def _lists(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list, list]:
    """An evaluation batch: lists of images and masks, each of its own size."""
    return [image for image, _ in samples], [mask for _, mask in samples]


def _stacked_to_device(
    batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch on `device`."""
    images, masks = batch
    return images.to(device, non_blocking=True), masks.to(device, non_blocking=True)


def _lists_to_device(batch: tuple[list, list], device: torch.device) -> tuple[list, list]:
    """An evaluation batch with every tensor on `device`."""
    images, masks = batch
    return (
        [image.to(device, non_blocking=True) for image in images],
        [mask.to(device, non_blocking=True) for mask in masks],
    )


class SegmentationLoader(KeyedLoader):
    """Batches of (images, masks) of one rank on the device, from worker processes: stacked crops
    in training, lists of whole images in evaluation. Training shuffles by (seed, epoch) and every
    rank reads as many images; evaluation reads every image once across ranks, in order.
    `batches(epoch, start_batch)` starts anywhere."""

    def __init__(self, data: SegmentationData, *, train: bool, **options: Any) -> None:
        """`options`: the batch_size, device, num_workers, seed, rank and world_size of
        `KeyedLoader`."""
        super().__init__(
            data.samples,
            source=str(data.images),
            train=train,
            collate=_stack if train else _lists,
            to_device=_stacked_to_device if train else _lists_to_device,
            **options,
        )
        self.data = data
