"""COCO-format detection data: an image folder and an `instances_*.json`, read with torchvision.

Samples come from `torchvision.datasets.CocoDetection` wrapped for `transforms.v2`, so boxes
(XYXY pixels) and masks travel as `tv_tensors` through the transforms. COCO's conventions:
- crowd regions (`iscrowd: 1`) are never training targets;
- boxes under one pixel wide or high are dropped (`SanitizeBoundingBoxes`);
- training skips images left with no object; evaluation reads every image.
Category ids become labels 1..K in the order of the file's categories (0 is the background), and
`DetectionData.category_ids` maps them back for COCO results.

A batch is `(images, targets)`: lists of float (3, H, W) images in [0, 1] of any sizes, and of
target dicts (`boxes`, `labels`, `masks`, `image_id`), on the device. The sample order and each
sample's flip are pure functions of (seed, epoch, index), so an epoch starts at any batch.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, VisionDataset, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from debiformer.data.draws import stream_seed
from debiformer.data.images import PixelLimit, read_rgb
from debiformer.data.loaders import KeyedLoader
from debiformer.errors import UserError

if TYPE_CHECKING:
    from pycocotools.coco import COCO

MIN_BOX_SIZE = 1.0


MISSING_PYCOCOTOOLS = "COCO data and metrics need pycocotools: pip install 'debiformer[detection]'"
TOP_LEVEL_KEYS = ("images", "annotations", "categories")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox", "area")


def pycocotools_module(name: str) -> ModuleType:
    """`pycocotools.<name>`, or a UserError saying how to install pycocotools."""
    try:
        return importlib.import_module(f"pycocotools.{name}")
    except ImportError as error:
        raise UserError(MISSING_PYCOCOTOOLS) from error


@contextlib.contextmanager
def silenced_stdout() -> Iterator[None]:
    """Swallows what pycocotools prints ("loading annotations into memory...", the stats table)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def load_coco(path: str | Path) -> COCO:
    """The COCO annotation file at `path` as a pycocotools COCO object, read once; any problem
    (unreadable, not JSON, a missing key, an annotation naming an unknown image or category, a bad
    bbox) is a one-line UserError naming the file and the entry."""
    coco_module = pycocotools_module("coco")
    dataset = read_annotation_file(Path(path))
    check_annotations(dataset, Path(path))
    coco = coco_module.COCO()
    coco.dataset = dataset
    with silenced_stdout():
        coco.createIndex()
    return coco


def read_annotation_file(path: Path) -> dict[str, Any]:
    """The parsed JSON object of an annotation file with its three top-level lists."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read the COCO annotation file ({error})") from error
    try:
        dataset = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(
            f"{path}: not JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        ) from error
    if not isinstance(dataset, dict):
        raise UserError(
            f"{path}: a COCO annotation file is a JSON object, not {type_name(dataset)}"
        )
    missing = [key for key in TOP_LEVEL_KEYS if key not in dataset]
    if missing:
        raise UserError(
            f"{path}: missing top-level key(s) {', '.join(missing)} "
            "(a COCO annotation file has images, annotations and categories)"
        )
    for key in TOP_LEVEL_KEYS:
        if not isinstance(dataset[key], list):
            raise UserError(f"{path}: '{key}' is {type_name(dataset[key])}, not a list")
    return dataset


def check_annotations(dataset: dict[str, Any], path: Path) -> None:
    """Raises a UserError for the first entry pycocotools or COCOeval would fail on or misread."""
    image_ids = entry_ids(dataset, "images", path)
    category_ids = entry_ids(dataset, "categories", path)
    for index, annotation in enumerate(dataset["annotations"]):
        where = f"{path}: annotations[{index}]"
        if not isinstance(annotation, dict):
            raise UserError(f"{where}: is {type_name(annotation)}, not an object")
        where += f" (id {annotation['id']})" if "id" in annotation else ""
        missing = [key for key in ANNOTATION_KEYS if key not in annotation]
        if missing:
            raise UserError(f"{where}: missing key(s) {', '.join(missing)}")
        if annotation["image_id"] not in image_ids:
            raise UserError(f"{where}: image_id {annotation['image_id']!r} is not in 'images'")
        if annotation["category_id"] not in category_ids:
            raise UserError(
                f"{where}: category_id {annotation['category_id']!r} is not in 'categories'"
            )
        if not is_box(annotation["bbox"]):
            raise UserError(
                f"{where}: bbox {annotation['bbox']!r} is not [x, y, width, height] "
                "(4 finite numbers, width and height >= 0)"
            )
        if not is_finite_number(annotation["area"]):
            raise UserError(f"{where}: area {annotation['area']!r} is not a finite number")


def entry_ids(dataset: dict[str, Any], key: str, path: Path) -> set[Any]:
    """The ids of the images or categories, each entry checked to be an object with an id."""
    ids = set()
    for index, entry in enumerate(dataset[key]):
        if not isinstance(entry, dict) or "id" not in entry:
            raise UserError(f"{path}: {key}[{index}]: not an object with an 'id'")
        ids.add(entry["id"])
    return ids


def is_finite_number(value: Any) -> bool:
    """Whether `value` is a JSON number (not a boolean) other than NaN and infinity."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_box(value: Any) -> bool:
    """Whether `value` is a COCO box: [x, y, width, height], finite, width and height >= 0."""
    return (
        isinstance(value, list)
        and len(value) == 4
        and all(is_finite_number(number) for number in value)
        and value[2] >= 0
        and value[3] >= 0
    )


def type_name(value: Any) -> str:
    """How an unexpected JSON value is named in an error: 'a list', 'a str', ..."""
    return f"a {type(value).__name__}"


def check_segm_ground_truth(ground_truth: COCO, source: str | Path = "ground truth") -> None:
    """Raises a UserError when the ground truth lacks what mask evaluation reads: a segmentation
    in every annotation, and the height and width of every image (to rasterise polygons)."""
    for index, annotation in enumerate(ground_truth.dataset["annotations"]):
        if "segmentation" not in annotation:
            raise UserError(
                f"{source}: annotations[{index}] (id {annotation['id']}): no 'segmentation', "
                "which masks (Mask R-CNN, mask AP) need"
            )
    for index, image in enumerate(ground_truth.dataset["images"]):
        if "height" not in image or "width" not in image:
            raise UserError(
                f"{source}: images[{index}] (id {image['id']}): no 'height' and 'width', "
                "which masks (Mask R-CNN, mask AP) need"
            )


# ----------------------------------------------------------------------------- samples


class _IndexedCocoDetection(CocoDetection):
    """torchvision's CocoDetection over an index already loaded (and checked) by `load_coco`,
    keeping only the images `image_ids` and refusing those above `limit`."""

    def __init__(self, root: Path, coco: COCO, image_ids: list[int], limit: PixelLimit) -> None:
        VisionDataset.__init__(self, str(root))
        self.coco = coco
        self.ids = image_ids
        self.limit = limit

    def _load_image(self, id: int) -> Image.Image:
        path = Path(self.root) / self.coco.loadImgs(id)[0]["file_name"]
        return read_rgb(path, max_pixels=self.limit.pixels, limit_name=self.limit.name)


def _trainable(coco: COCO, image_id: int) -> bool:
    """Whether an image has an object to learn from: a non-crowd box at least a pixel wide."""
    return any(
        not ann.get("iscrowd", 0)
        and ann["bbox"][2] >= MIN_BOX_SIZE
        and ann["bbox"][3] >= MIN_BOX_SIZE
        for ann in coco.imgToAnns[image_id]
    )


class CocoSamples(Dataset):
    """COCO samples read by `(epoch, index)` keys: a float image in [0, 1] and its target, with
    boxes and masks as tv_tensors, labels 1..K, crowds dropped, and the training flip drawn from
    (seed, epoch, index) whatever worker reads it; `image_ids` are the images read."""

    def __init__(
        self,
        images: Path,
        coco: COCO,
        *,
        train: bool,
        masks: bool,
        seed: int,
        limit: PixelLimit = PixelLimit(),
    ) -> None:
        image_ids = sorted(coco.imgs)
        if train:
            image_ids = [image_id for image_id in image_ids if _trainable(coco, image_id)]
        self.image_ids = image_ids
        keys = ["image_id", "boxes", "labels", "iscrowd", *(["masks"] if masks else [])]
        self.samples = wrap_dataset_for_transforms_v2(
            _IndexedCocoDetection(images, coco, image_ids, limit), target_keys=keys
        )
        self.masks = masks
        self.label_of = {category: label for label, category in enumerate(sorted(coco.cats), 1)}
        self.seed = seed
        flips = [v2.RandomHorizontalFlip(0.5)] if train else []
        self.transform = v2.Compose(
            [*flips, v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(MIN_BOX_SIZE)]
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        epoch, index = key
        image, annotations = self.samples[index]
        image = v2.functional.to_image(image)
        target = self._objects(annotations, tuple(image.shape[-2:]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(self.seed, epoch, index) & (2**63 - 1))
            return self.transform(image, target)

    def _objects(self, annotations: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
        """The non-crowd objects of one image as a target dict (empty tensors when none)."""
        crowd = torch.tensor(annotations.get("iscrowd", []), dtype=torch.bool)
        keep = ~crowd
        boxes = annotations.get("boxes", torch.zeros(0, 4)).as_subclass(torch.Tensor)[keep]
        labels = [self.label_of[int(c)] for c in annotations.get("labels", torch.zeros(0))[keep]]
        target = {
            "image_id": annotations["image_id"],
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=size),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
        if self.masks:
            masks = annotations.get("masks", torch.zeros(0, *size, dtype=torch.uint8))
            target["masks"] = tv_tensors.Mask(masks.as_subclass(torch.Tensor)[keep])
        return target


def _collate(samples: list[tuple[torch.Tensor, dict]]) -> tuple[list, list]:
    """A batch as (list of images, list of targets): images keep their own sizes."""
    return [image for image, _ in samples], [target for _, target in samples]


def _target_to_device(target: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A target dict with its tensors on `device`."""
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in target.items()
    }


def _batch_to_device(batch: tuple[list, list], device: torch.device) -> tuple[list, list]:
    """A batch of (images, targets) with every tensor on `device`."""
    images, targets = batch
    return (
        [image.to(device, non_blocking=True) for image in images],
        [_target_to_device(target, device) for target in targets],
    )


# ----------------------------------------------------------------------------- loader


@dataclass
class DetectionData:
    """One split's COCO data: the index, the samples and what the task needs to know of them."""

    images: Path
    annotations: Path
    coco: COCO
    samples: CocoSamples

    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each label 1..K, in label order."""
        return sorted(self.coco.cats)

    @property
    def class_names(self) -> list[str]:
        """Category name of each label 1..K, in label order."""
        return [self.coco.cats[category]["name"] for category in self.category_ids]


def read_split(
    images: str | Path,
    annotations: str | Path,
    *,
    train: bool,
    masks: bool,
    seed: int = 0,
    limit: PixelLimit = PixelLimit(),
) -> DetectionData:
    """One split of COCO-format data: the image folder and its annotation file (the caller
    checks that the folder exists, naming its recipe key); images above `limit` are refused
    where they are read."""
    images, annotations = Path(images), Path(annotations)
    coco = load_coco(annotations)
    if masks:
        check_segm_ground_truth(coco, annotations)
    samples = CocoSamples(images, coco, train=train, masks=masks, seed=seed, limit=limit)
    if len(samples) == 0:
        what = "no image with an object" if train else "no image"
        raise UserError(f"annotation file {annotations}: {what}; nothing to train or evaluate on")
    return DetectionData(images, annotations, coco, samples)


class DetectionLoader(KeyedLoader):
    """Batches of (images, targets) of one rank on the device, from worker processes.

    Training shuffles by (seed, epoch) and every rank reads as many images; evaluation reads
    every image once across ranks, in order. `batches(epoch, start_batch)` starts anywhere.
    """

    def __init__(self, data: DetectionData, *, train: bool, **options: Any) -> None:
        """`options`: the batch_size, device, num_workers, seed, rank and world_size of
        `KeyedLoader`."""
        super().__init__(
            data.samples,
            source=str(data.annotations),
            train=train,
            collate=_collate,
            to_device=_batch_to_device,
            **options,
        )
        self.data = data
