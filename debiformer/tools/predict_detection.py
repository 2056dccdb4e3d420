"""`debiformer predict` with a detection checkpoint: COCO results JSON, as `eval` computes it.

    load_detector          the detector, its category ids and the image ids its recipe's
                           validation annotations give file names
    predict_coco_results   every readable image's detections as COCO result entries (boxes,
                           scores, category ids; compressed RLE masks for Mask R-CNN)

The file is the list pycocotools' `COCO.loadRes` reads. An image listed in the recipe's
`data.val_annotations` (by its file name) gets that image id, so the results score against those
annotations as `eval` scores them; any other image gets its 1-based position among the inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2

from debiformer import runtime
from debiformer.data.coco import load_coco
from debiformer.data.images import readable_images
from debiformer.errors import UserError
from debiformer.recipe import Recipe, task_recipe
from debiformer.tasks.coco_metrics import to_coco_results
from debiformer.weights import WeightsFile, build_model, spec_of_checkpoint


@dataclass
class Detector:
    """A detector in eval mode; the COCO category id of each label 1..K; the image id of each
    file name of the recipe's validation annotations (empty where they cannot be read)."""

    model: nn.Module
    category_ids: list[int]
    image_ids: dict[str, int] = field(default_factory=dict)


def _annotated_ids(recipe: Recipe, num_classes: int) -> tuple[list[int], dict[str, int]]:
    """The category ids and the file-name -> image id map of the recipe's validation
    annotations; labels 1..K and no image ids where the file is not at hand."""
    path = recipe.data.val_annotations
    if path is None or not Path(path).is_file():
        return list(range(1, num_classes + 1)), {}
    coco = load_coco(path)
    image_ids = {Path(image["file_name"]).name: id for id, image in coco.imgs.items()}
    return sorted(coco.cats), image_ids


def load_detector(file: WeightsFile, recipe: str | None) -> Detector:
    """The detector of checkpoint `file` with exactly its weights, the category ids of its
    recipe's annotations (`recipe`, else the one the checkpoint stores)."""
    the_recipe = task_recipe(recipe, file.recipe, "detection", of=f"checkpoint {file.path}")
    spec = spec_of_checkpoint(file, recipe=the_recipe)
    model, _ = build_model(spec, checkpoint=file)
    category_ids, image_ids = _annotated_ids(the_recipe, spec.num_classes)
    if len(category_ids) != spec.num_classes:
        raise UserError(
            f"data.val_annotations names {len(category_ids)} categories, the checkpoint's head "
            f"{spec.num_classes}: give the recipe it was trained with"
        )
    return Detector(model.eval(), category_ids, image_ids)


@torch.no_grad()
def predict_coco_results(
    detector: Detector,
    paths: Sequence[Path],
    *,
    device: torch.device,
    precision: str,
    max_pixels: int,
    on_failure: Callable[[Path, str], None],
    advance: Callable[[int], None] = lambda count: None,
) -> list[dict]:
    """COCO result entries of every readable image of `paths` (its pixels scaled to [0, 1] as
    the evaluation loader does; the detector resizes and normalises); for each unreadable one
    `on_failure(path, reason)`. `advance(1)` is called as each file is done."""
    model = detector.model.to(device)
    category_ids = torch.tensor(detector.category_ids)
    results = []
    positions = {path: position for position, path in enumerate(paths, start=1)}
    images = readable_images(paths, max_pixels=max_pixels, on_failure=on_failure, advance=advance)
    for path, image in images:
        pixels = v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True)
        with runtime.autocast(device, precision):
            (prediction,) = model([pixels.to(device)])
        prediction = {
            key: (value.float() if value.is_floating_point() else value).cpu()
            for key, value in prediction.items()
        }
        prediction["labels"] = category_ids[prediction["labels"] - 1]
        image_id = detector.image_ids.get(path.name, positions[path])
        results += to_coco_results(image_id, prediction)
    return results
