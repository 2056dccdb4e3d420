"""`debiformer show --erf`: the effective receptive field of a stage, as the paper's Figure 5
shows it, by the method of that line of work (RepLKNet's `visualize_erf`): for each image, the
gradient of the central unit of the stage's map (its channels' ReLU, summed) with respect to the
input pixels, absolute and summed over the colour channels; averaged over the images; shown as
log10(1 + x), scaled to a maximum of 1.

    receptive_field   the averaged map of a model, a stage and a batch of images
    contribution_areas  how much of the input holds a share of the total (RepLKNet's area ratio)
    show_erf          the command: images read and prepared as `predict` does, figure and arrays
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn

from debiformer import runtime
from debiformer.data.images import MAX_IMAGE_PIXELS, image_files, read_rgb
from debiformer.errors import UserError
from debiformer.tools.classifier import load_classifier
from debiformer.tools.plot import check_figure_path, require_matplotlib, save_figure

STAGES = (1, 2, 3, 4)
# the shares of the total contribution whose smallest covering area `contribution_areas` gives
AREA_SHARES = (0.2, 0.3, 0.5, 0.99)
BATCH = 16


def receptive_field(model: nn.Module, images: torch.Tensor, stage: int) -> np.ndarray:
    """(H, W): the mean over `images` (N, 3, H, W, normalised) of |d unit / d input| summed over
    the colour channels, where unit is the sum over channels of ReLU of stage `stage`'s map
    (numbered 1-4) at its central position (h // 2, w // 2)."""
    total = torch.zeros(images.shape[2:], dtype=torch.float64)
    for batch in images.split(BATCH):
        batch = batch.clone().requires_grad_(True)
        stage_map = model.stage_maps(batch, last_stage=stage - 1)[-1]
        height, width = stage_map.shape[2:]
        unit = stage_map[:, :, height // 2, width // 2].relu().sum()
        (gradient,) = torch.autograd.grad(unit, batch)
        total += gradient.abs().sum(dim=(0, 1)).double()
    return (total / len(images)).numpy()


def log_scaled(field: np.ndarray) -> np.ndarray:
    """log10(1 + field), scaled to a maximum of 1 (all zeros stay zeros)."""
    scaled = np.log10(1 + field)
    return scaled / scaled.max() if scaled.max() > 0 else scaled


def contribution_areas(field: np.ndarray) -> dict[str, float]:
    """For each share t of `AREA_SHARES`, the fraction of the input's pixels that the smallest
    centred square holding a share t of the total contribution covers (RepLKNet's
    high-contribution area ratio): larger means a wider effective receptive field."""
    height, width = field.shape
    total = field.sum()
    areas = {}
    for share in AREA_SHARES:
        for half in range(max(height, width) // 2 + 1):
            top, left = max(height // 2 - half, 0), max(width // 2 - half, 0)
            window = field[top : height // 2 + half + 1, left : width // 2 + half + 1]
            if total == 0 or window.sum() >= share * total:
                areas[f"{share:g}"] = window.size / field.size
                break
    return areas


def show_erf(
    images: Sequence[str | Path],
    out: str | Path,
    *,
    stage: int = 4,
    model_name: str | None = None,
    recipe: str | None = None,
    checkpoint: str | Path | None = None,
    pretrained: str | None = None,
    size: int | None = None,
    json_path: str | Path | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    console: Console | None = None,
) -> dict[str, Any]:
    """`debiformer show --erf`: the effective receptive field of `stage` over `images` (files,
    folders or globs, as `data.images.image_files` finds them; each read
    as RGB, resized and centre-cropped to `size`, else the model's evaluation size, as `predict`
    prepares them), drawn at `out` and, with `json_path`, written as arrays. Every image and
    setting is checked before the model is loaded. Returns what the JSON holds."""
    require_matplotlib()
    console = console or Console(stderr=True, soft_wrap=True)
    out = Path(out)
    check_figure_path(out)
    if stage not in STAGES:
        raise UserError(f"must be 1-4, got {stage}", about="stage")
    if json_path is not None:
        runtime.check_writable(json_path, "json_path")
    pictures = [read_rgb(path, max_pixels=max_pixels) for path in image_files(images)]
    torch.manual_seed(0)  # random weights, where no weights are given, are the same every time
    classifier = load_classifier(model_name, recipe, checkpoint, pretrained, work="show")
    preprocessing = classifier.preprocessing
    if size is not None:
        preprocessing = type(preprocessing)(
            size, preprocessing.crop_pct, preprocessing.interpolation
        )
    crops = torch.stack([preprocessing.crop(picture) for picture in pictures])
    inputs = preprocessing.normalise(crops, torch.device("cpu"))
    field = receptive_field(classifier.model.eval(), inputs, stage)
    result = {
        "model": classifier.name,
        "weights": classifier.weights,
        "stage": stage,
        "images": len(pictures),
        "input_size": list(inputs.shape[2:]),
        "contribution_areas": contribution_areas(field),
        "erf": field.tolist(),
        "erf_log_scaled": log_scaled(field).tolist(),
    }
    draw_erf(result, out)
    console.print(f"wrote {out}", highlight=False)
    if json_path is not None:
        runtime.write_json(json_path, result)
    return result


def draw_erf(result: dict[str, Any], out: Path) -> None:
    """The log-scaled field as a heat map over the input's pixels, with its contribution areas."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.6, 4.2), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(np.asarray(result["erf_log_scaled"]), cmap="RdYlGn", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, label="log10(1 + |gradient|), scaled")
    shares = result["contribution_areas"]
    weights = (
        "random weights, seed 0" if result["weights"] == "random" else Path(result["weights"]).name
    )
    thresholds = "/".join(f"{float(share):.0%}" for share in shares)
    figure.suptitle(
        f"{result['model']} ({weights}), stage {result['stage']}, {result['images']} images\n"
        f"centred area holding {thresholds} of the total: "
        + "/".join(f"{area:.0%}" for area in shares.values()),
        fontsize=8,
    )
    axes.set_xticks([])
    axes.set_yticks([])
    save_figure(figure, out, dpi=130)
