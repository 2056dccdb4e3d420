"""Mosaics: offline detection and segmentation data made of Fashion-MNIST items on larger canvases.

Each canvas (RGB, dark noisy background) holds a few Fashion-MNIST items, each resized at random,
tinted with a random colour and placed where its square overlaps no other item's square. One pass
writes a COCO detection / instance-segmentation set and a semantic-segmentation set of the same
canvases. Train canvases take their items from Fashion-MNIST's train split, val canvases from its
test split. Layout under OUT:

    OUT/images/train/000000.png ...       RGB canvases (val: OUT/images/val/...)
    OUT/annotations/instances_train.json  COCO: images, annotations, categories (and _val.json)
    OUT/labels/train/000000.png ...       uint8 semantic labels: 0 background, k category id k
    OUT/classes.txt                        semantic class names, line i names label i

COCO images have `id` = the file's number and `file_name` relative to `images/<split>`;
annotations have ids from 1, `category_id` 1..10 (the Fashion-MNIST class + 1), `bbox`
[x, y, w, h] of the mask's extent (pixels x..x+w-1), `area` = mask pixel count, `iscrowd` 0 and
`segmentation` the mask as COCO RLE. An item's mask is its pixels whose resized intensity exceeds
`MASK_THRESHOLD`. The same arguments always write the same files.
"""

from __future__ import annotations

import inspect
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from rich.console import Console
from torch.utils.data import Dataset

from debiformer.data.coco import pycocotools_module
from debiformer.data.sources import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_PREFIX,
    FashionMNIST,
    fashion_mnist_root,
    read_fashion_mnist,
)
from debiformer.errors import UserError, mention
from debiformer.runtime import TEMP_MARK, write_json, write_text

SPLITS = {"train": "train", "val": "test"}  # mosaics split -> Fashion-MNIST split of its items
ITEM_SIZE = 28  # Fashion-MNIST images are 28x28
MASK_THRESHOLD = 24  # an item pixel belongs to its mask if its intensity (0..255) is above this
PLACEMENT_TRIES = 50  # random positions tried for an item before it is left out
BACKGROUND_LEVEL = 48  # background channels are drawn from 0..BACKGROUND_LEVEL-1
BACKGROUND_NOISE = 6.0  # standard deviation of the background's Gaussian pixel noise
TINT_BRIGHTNESS = (200.0, 255.0)  # range of an item's brightest colour channel
MIN_OPACITY = 0.4  # opacity of an item's faintest mask pixel, so dark items stay visible
PNG_LEVEL = 1  # zlib level of the PNGs: the noisy canvases hardly compress, so compress fast
ITEMS_CANVAS = 32  # side of a `MosaicItems` canvas
ITEMS_SCALE = (0.8, 1.14)  # resize factors of a `MosaicItems` item: 22 to 32 pixels
ITEMS_SEED = 1  # `MosaicItems` draws from generators seeded by (ITEMS_SEED, split, index)
SUPERCATEGORY = "fashion"
COMPLETE_MARK = Path("annotations", "instances_val.json")  # the file that marks a complete set


class Layout(NamedTuple):
    """How canvases are drawn: their side in pixels, the fewest and most items on one, and the
    smallest and largest resize factor of an item."""

    canvas_size: int
    items: tuple[int, int]
    scale: tuple[float, float]


class Item(NamedTuple):
    """One item placed on a canvas: its category id and its mask over the whole canvas."""

    category_id: int
    mask: np.ndarray  # (H, W) bool


class Canvas(NamedTuple):
    """One drawn canvas: its RGB image, its semantic label map and its items."""

    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) uint8, 0 background, k category id k
    items: list[Item]


def _check_values(
    train_images: int,
    val_images: int,
    canvas_size: int,
    items: tuple[int, int],
    scale: tuple[float, float],
    seed: int,
) -> None:
    """A one-line UserError for the first of these `write_mosaics` arguments that cannot make a
    mosaics set."""
    if train_images < 1 or val_images < 1:
        raise UserError(
            f"{mention('train_images')} and {mention('val_images')} must be at least 1 canvas "
            f"each, got {train_images} and {val_images}"
        )
    if not 1 <= items[0] <= items[1]:
        raise UserError(
            f"{items[0]} {items[1]}: give the fewest and most items per canvas with "
            "1 <= fewest <= most, e.g. 2 6",
            about="items",
        )
    if not 0 < scale[0] <= scale[1]:
        raise UserError(
            f"{scale[0]} {scale[1]}: give the smallest and largest item scale with "
            "0 < smallest <= largest, e.g. 1.0 2.0",
            about="scale",
        )
    largest = round(ITEM_SIZE * scale[1])
    if canvas_size < largest:
        raise UserError(
            f"{canvas_size}: the canvas must hold the largest item ({largest} px at scale "
            f"{scale[1]}); use {mention('canvas_size', largest)} or more, or a smaller "
            f"{mention('scale')}",
            about="canvas_size",
        )
    if seed < 0:
        raise UserError(f"must be 0 or more, got {seed}", about="seed")


def _check_out(out: Path) -> None:
    """A one-line UserError if `out` holds something other than a mosaics set or nothing."""
    if out.exists() and not _is_mosaics_folder(out) and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"{out} exists and is not a mosaics folder: delete it or choose another folder"
        )


def _is_mosaics_folder(out: Path) -> bool:
    """True if `out` holds a complete mosaics set."""
    return (out / COMPLETE_MARK).is_file()


def _place(
    rng: np.random.Generator, size: int, canvas_size: int, squares: list[tuple[int, int, int]]
) -> tuple[int, int] | None:
    """A random top-left (x, y) where a `size` square overlaps none of `squares` (x, y, size);
    None if `PLACEMENT_TRIES` random positions all overlap one."""
    candidates = rng.integers(0, canvas_size - size + 1, (PLACEMENT_TRIES, 2))
    if not squares:
        return int(candidates[0, 0]), int(candidates[0, 1])
    taken = np.array(squares)
    x, y = candidates[:, :1], candidates[:, 1:]
    overlaps = (
        (x < taken[:, 0] + taken[:, 2])
        & (taken[:, 0] < x + size)
        & (y < taken[:, 1] + taken[:, 2])
        & (taken[:, 1] < y + size)
    )
    free = np.flatnonzero(~overlaps.any(axis=1))
    if len(free) == 0:
        return None
    return int(candidates[free[0], 0]), int(candidates[free[0], 1])


def _background(rng: np.random.Generator, canvas_size: int) -> np.ndarray:
    """A dark canvas of one random colour with Gaussian noise, (H, W, 3) float32 in 0..255."""
    colour = rng.integers(0, BACKGROUND_LEVEL, 3)
    noise = rng.standard_normal((canvas_size, canvas_size, 3), dtype=np.float32)
    return np.clip(colour + BACKGROUND_NOISE * noise, 0, 255, dtype=np.float32)


def _tint(rng: np.random.Generator) -> np.ndarray:
    """A random bright colour (3,) whose brightest channel lies in `TINT_BRIGHTNESS`."""
    colour = rng.uniform(0.3, 1.0, 3)
    return (colour / colour.max() * rng.uniform(*TINT_BRIGHTNESS)).astype(np.float32)


def _opacity(intensity: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(S, S, 1) opacity of an item over the background: 0 off its mask, on it rising with
    `intensity` from `MIN_OPACITY` to 1."""
    opacity = MIN_OPACITY + (1 - MIN_OPACITY) * intensity.astype(np.float32) / 255
    return np.where(mask, opacity, 0)[..., None]


def _blend_item(
    rng: np.random.Generator, image: np.ndarray, photo: np.ndarray, x: int, y: int, size: int
) -> np.ndarray:
    """Resize `photo` (28, 28) to `size` pixels square, tint it and blend it over its mask into
    `image` (H, W, 3) float32 at top-left (x, y); returns the mask (size, size) bool. An empty
    mask leaves `image` and `rng` as they were."""
    resized = np.asarray(Image.fromarray(photo).resize((size, size), Image.BILINEAR))
    item_mask = resized > MASK_THRESHOLD
    if item_mask.any():
        alpha = _opacity(resized, item_mask)
        region = image[y : y + size, x : x + size]
        region[:] = region * (1 - alpha) + _tint(rng) * alpha
    return item_mask


def _draw_canvas(
    rng: np.random.Generator, photos: np.ndarray, classes: np.ndarray, layout: Layout
) -> Canvas:
    """One canvas of `layout` with items drawn from `photos` (N, 28, 28) whose classes are
    `classes`, each resized, tinted and blended over its mask onto a dark background."""
    canvas_size = layout.canvas_size
    image = _background(rng, canvas_size)
    labels = np.zeros((canvas_size, canvas_size), np.uint8)
    placed: list[Item] = []
    squares: list[tuple[int, int, int]] = []
    for _ in range(rng.integers(layout.items[0], layout.items[1] + 1)):
        index = rng.integers(len(photos))
        size = max(1, round(ITEM_SIZE * rng.uniform(*layout.scale)))
        position = _place(rng, size, canvas_size, squares)
        if position is None:
            continue
        x, y = position
        item_mask = _blend_item(rng, image, photos[index], x, y, size)
        if not item_mask.any():
            continue
        category_id = int(classes[index]) + 1
        labels[y : y + size, x : x + size][item_mask] = category_id
        mask = np.zeros((canvas_size, canvas_size), bool)
        mask[y : y + size, x : x + size] = item_mask
        placed.append(Item(category_id, mask))
        squares.append((x, y, size))
    return Canvas(np.round(image).astype(np.uint8), labels, placed)


class MosaicItems(Dataset):
    """Fashion-MNIST items drawn one per small canvas as the mosaics draw theirs (resized at
    random by a factor in `ITEMS_SCALE`, tinted, blended over a dark noisy background, at a random
    place): (PIL RGB image, label) pairs of `ITEMS_CANVAS` pixels square.

    A classifier trained on them sees the products as the dense quick starts' canvases show them,
    so its features carry over to detection and segmentation (see docs/detection.md). Item i of a
    split is always drawn the same; the "train" split draws Fashion-MNIST's train items, "test"
    its test items."""

    classes = FashionMNIST.classes

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None):
        self.photos, self.labels = read_fashion_mnist(root, split)
        self.targets = self.labels.tolist()
        self.split_index = list(SPLITS.values()).index(split)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple:
        rng = np.random.default_rng([ITEMS_SEED, self.split_index, index])
        image = _background(rng, ITEMS_CANVAS)
        size = round(ITEM_SIZE * rng.uniform(*ITEMS_SCALE))
        x, y = (int(v) for v in rng.integers(0, ITEMS_CANVAS - size + 1, 2))
        _blend_item(rng, image, self.photos[index], x, y, size)
        picture = Image.fromarray(np.round(image).astype(np.uint8))
        if self.transform is not None:
            picture = self.transform(picture)
        return picture, int(self.labels[index])


def _mask_box(mask: np.ndarray) -> list[int]:
    """The COCO box [x, y, w, h] of a non-empty (H, W) mask: it covers pixels x..x+w-1."""
    columns = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return [
        int(columns[0]),
        int(rows[0]),
        int(columns[-1] - columns[0] + 1),
        int(rows[-1] - rows[0] + 1),
    ]


def _annotations(items: list[Item], image_id: int, first_id: int, mask_api) -> list[dict]:
    """The COCO annotations of one canvas's items, numbered from `first_id`."""
    if not items:
        return []
    masks = np.asfortranarray(np.stack([item.mask for item in items], axis=-1).astype(np.uint8))
    rles = mask_api.encode(masks)
    return [
        {
            "id": first_id + offset,
            "image_id": image_id,
            "category_id": item.category_id,
            "bbox": _mask_box(item.mask),
            "area": int(item.mask.sum()),
            "iscrowd": 0,
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
        }
        for offset, (item, rle) in enumerate(zip(items, rles, strict=True))
    ]


def _categories() -> list[dict]:
    """The COCO categories: ids 1..10 in Fashion-MNIST class order."""
    return [
        {"id": label + 1, "name": name, "supercategory": SUPERCATEGORY}
        for label, name in enumerate(FashionMNIST.classes)
    ]


def _write_split(
    root: Path, split: str, count: int, source: Path, layout: Layout, seed: int, mask_api
) -> int:
    """Write `count` canvases of `split` (images, labels, COCO file) under `root`, with items
    from the Fashion-MNIST folder `source`; returns the number of objects."""
    photos, classes = read_fashion_mnist(source, SPLITS[split])
    rng = np.random.default_rng([seed, list(SPLITS).index(split)])
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    size = layout.canvas_size
    images, annotations = [], []
    for image_id in range(count):
        canvas = _draw_canvas(rng, photos, classes, layout)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(canvas.image).save(image_dir / file_name, compress_level=PNG_LEVEL)
        Image.fromarray(canvas.labels).save(label_dir / file_name, compress_level=PNG_LEVEL)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        annotations += _annotations(canvas.items, image_id, len(annotations) + 1, mask_api)
    coco = {"images": images, "annotations": annotations, "categories": _categories()}
    write_json(root / "annotations" / f"instances_{split}.json", coco)
    return len(annotations)


def _move_into_place(folder: Path, out: Path) -> None:
    """Rename the complete `folder` to `out`, replacing an earlier set (or empty folder) there."""
    if not out.exists():
        os.replace(folder, out)
        return
    old = out.with_name(f".{out.name}{TEMP_MARK}old-{os.getpid()}")
    os.replace(out, old)
    os.replace(folder, out)
    shutil.rmtree(old)


def write_mosaics(
    out: str | os.PathLike,
    *,
    train_images: int,
    val_images: int,
    canvas_size: int = 128,
    items: tuple[int, int] = (2, 6),
    scale: tuple[float, float] = (1.0, 2.0),
    seed: int = 0,
    source: str | os.PathLike = FASHION_MNIST_DIR,
) -> Path:
    """Write a mosaics set (see the module docstring for the layout) to the folder `out`.

    `train_images` / `val_images` canvases of `canvas_size` pixels square, each with `items`
    (fewest, most) Fashion-MNIST items from `source` resized by a factor in `scale`. Everything
    is drawn from generators seeded by (`seed`, split). The set is written into a temporary
    sibling folder and renamed to `out` when complete, replacing an earlier set there; anything
    else at `out` other than an empty folder is an error.
    """
    out = Path(out)
    _check_values(train_images, val_images, canvas_size, items, scale, seed)
    _check_out(out)
    source = fashion_mnist_root(f"{FASHION_MNIST_PREFIX}{source}")
    mask_api = pycocotools_module("mask")
    layout = Layout(canvas_size, items, scale)
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = out.with_name(f".{out.name}{TEMP_MARK}{os.getpid()}")
    shutil.rmtree(folder, ignore_errors=True)
    try:
        write_text(folder / "classes.txt", "\n".join(["background", *FashionMNIST.classes]) + "\n")
        objects = sum(
            _write_split(folder, split, count, source, layout, seed, mask_api)
            for split, count in (("train", train_images), ("val", val_images))
        )
        _move_into_place(folder, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    Console(stderr=True).print(
        f"wrote {out}: {train_images} train + {val_images} val images, {objects} objects of "
        f"{len(FashionMNIST.classes)} classes in {time.perf_counter() - start:.1f} s",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return out


def ensure_mosaics(out: str | os.PathLike, **options: Any) -> Path:
    """`out` if it holds a complete mosaics set, else `write_mosaics(out, **options)`.

    The existing set is kept as it is, whatever `options` say.
    """
    _arguments(out, options)
    out = Path(out)
    if _is_mosaics_folder(out):
        return out
    return write_mosaics(out, **options)


def check_mosaics_options(options: Mapping[str, Any]) -> None:
    """A one-line UserError for the first of `options` (`out` and keyword arguments of
    `write_mosaics`, of its parameters' types; the others at their defaults) that cannot make a
    mosaics set; no file is looked at."""
    given = _arguments(options.get("out"), {k: v for k, v in options.items() if k != "out"})
    _check_values(
        given["train_images"],
        given["val_images"],
        given["canvas_size"],
        given["items"],
        given["scale"],
        given["seed"],
    )


def _arguments(out: str | os.PathLike | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """`write_mosaics`' arguments for `out` and the keyword `options`, its defaults filled in; a
    UserError for an unknown or missing option."""
    try:
        bound = inspect.signature(write_mosaics).bind(out, **options)
    except TypeError as error:
        raise UserError(f"bad mosaics option(s): {error}") from None
    bound.apply_defaults()
    return bound.arguments


def prepare_mosaics(options: dict[str, Any]) -> Path | None:
    """The mosaics a recipe's `data.mosaics` describes (`out` plus `write_mosaics` options),
    written when missing; None when `options` is empty."""
    if not options:
        return None
    options = dict(options)
    try:
        out = options.pop("out")
    except KeyError:
        raise UserError("data.mosaics: needs out, the folder to write them to") from None
    return ensure_mosaics(out, **options)
