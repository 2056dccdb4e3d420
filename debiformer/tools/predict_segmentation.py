"""`debiformer predict` with a segmentation checkpoint: one label PNG per image, as `eval` computes
it (the recipe's `segmentation.eval_*` inference: whole or sliding window, test ratios, flip).

    load_segmenter        the network, its recipe's segmentation settings and class count
    predict_label_maps    every readable image's (H, W) class indices, at the image's own size
    write_label_png       a label map as a palette PNG (pixel value = class index), and an overlay

The PNGs are the masks `data.val_masks` holds: single-channel, one value per class, so `eval`'s
metrics can be computed from them again (the tests do).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from debiformer import runtime
from debiformer.data.images import readable_images
from debiformer.data.segmentation import SegmentationTransform
from debiformer.recipe import SegmentationConfig, task_recipe
from debiformer.tasks.segmentation import evaluation_probabilities, palette
from debiformer.weights import WeightsFile, build_model, spec_of_checkpoint

OVERLAY_ALPHA = 0.5  # the label colours' weight over the image in an overlay


@dataclass
class Segmenter:
    """A segmentation model in eval mode, its recipe's inference settings and class count."""

    model: nn.Module
    settings: SegmentationConfig
    num_classes: int
    weights: str


def load_segmenter(file: WeightsFile, recipe: str | None) -> Segmenter:
    """The segmentation network of checkpoint `file` with exactly its weights; its inference
    settings from `recipe`, else the recipe the checkpoint stores."""
    the_recipe = task_recipe(recipe, file.recipe, "segmentation", of=f"checkpoint {file.path}")
    spec = spec_of_checkpoint(file, recipe=the_recipe)
    model, _ = build_model(spec, checkpoint=file)
    return Segmenter(model.eval(), the_recipe.segmentation, spec.num_classes, str(file.path))


@torch.no_grad()
def predict_label_maps(
    segmenter: Segmenter,
    paths: Sequence[Path],
    *,
    device: torch.device,
    precision: str,
    max_pixels: int,
    on_failure: Callable[[Path, str], None],
    advance: Callable[[int], None] = lambda count: None,
) -> Iterator[tuple[Path, Image.Image, np.ndarray]]:
    """(path, image, (H, W) uint8 class indices) of each readable image of `paths`, one image at
    a time (images differ in size), normalised as the evaluation loader does; for each
    unreadable one `on_failure(path, reason)`. `advance(1)` is called as each file is done."""
    normalise = SegmentationTransform().build(train=False)
    model = segmenter.model.to(device)
    images = readable_images(paths, max_pixels=max_pixels, on_failure=on_failure, advance=advance)
    for path, image in images:
        pixels = normalise(v2.functional.pil_to_tensor(image))[None].to(device)
        with runtime.autocast(device, precision):
            probabilities = evaluation_probabilities(
                model, pixels, segmenter.settings, segmenter.num_classes
            )
        yield path, image, probabilities[0].argmax(dim=0).to(torch.uint8).cpu().numpy()


def write_label_png(
    labels: np.ndarray, num_classes: int, path: Path, image: Image.Image | None = None
) -> None:
    """`labels` as a palette PNG at `path` (pixel values are class indices, coloured by
    `tasks.segmentation.palette`); with `image`, also PATH-overlay.png: the colours over it."""
    colours = palette(num_classes).numpy()
    label_png = Image.fromarray(labels, mode="P")
    label_png.putpalette(colours[:num_classes].flatten().tolist())
    with runtime.atomic_writer(path, "wb") as file:
        label_png.save(file, format="PNG")
    if image is not None:
        blended = (1 - OVERLAY_ALPHA) * np.asarray(image) + OVERLAY_ALPHA * colours[labels]
        overlay = Image.fromarray(blended.round().astype(np.uint8))
        with runtime.atomic_writer(path.with_name(f"{path.stem}-overlay.png"), "wb") as file:
            overlay.save(file, format="PNG")
