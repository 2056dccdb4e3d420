"""Object detection and instance segmentation on COCO-format data (`task: detection`).

The engine trains torchvision's Mask R-CNN or RetinaNet on a DeBiFormer backbone
(`debiformer.detection`); this task gives it the COCO loaders, the detector's summed losses, and
an evaluation that every rank runs on its shard, gathered on rank 0 into COCO's box (and mask)
AP, with `predictions.png` drawn in the run directory. best.pt follows box AP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn
from torchvision.io import encode_png
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from debiformer import runtime
from debiformer.data.coco import DetectionData, DetectionLoader, read_split
from debiformer.data.mosaics import prepare_mosaics
from debiformer.detection import build_detector
from debiformer.engine import Task, fit
from debiformer.errors import UserError
from debiformer.recipe import Recipe
from debiformer.tasks import prepare_checkpoint_evaluation
from debiformer.tasks.coco_metrics import coco_metrics, gather_results, to_coco_results

SCORE_TO_DRAW = 0.5
PREVIEW_SHORT_SIDE = 256
# one bright colour per class (matplotlib's tab10, cycled), readable on dark and light images
CLASS_COLOURS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


# ----------------------------------------------------------------------------- data


def read_data(recipe: Recipe, split: str) -> DetectionData:
    """The recipe's train or val split (`data.{split}_path` images, `data.{split}_annotations`)."""
    images = getattr(recipe.data, f"{split}_path")
    annotations = getattr(recipe.data, f"{split}_annotations")
    if images is None or annotations is None:
        raise UserError(
            f"data.{split}_path and data.{split}_annotations: a detection recipe needs both (the "
            f"image folder and its instances_*.json), e.g. --set data.{split}_path=DIR"
        )
    if not Path(images).is_dir():
        raise UserError(
            f"data.{split}_path: image folder {images} does not exist; point it at the split's "
            f"images with --set data.{split}_path=DIR"
        )
    masks = recipe.detection.detector == "maskrcnn"
    return read_split(
        images, annotations, train=split == "train", masks=masks, seed=recipe.train.seed
    )


def build_split_loader(
    recipe: Recipe, data: DetectionData, device: torch.device, batch_size: int, train: bool
) -> DetectionLoader:
    """This process's loader of one split: its shard under torchrun, batches on `device`."""
    rank, world_size = runtime.rank_and_world()
    return DetectionLoader(
        data,
        batch_size=batch_size,
        train=train,
        device=device,
        num_workers=recipe.data.num_workers,
        seed=recipe.train.seed,
        rank=rank,
        world_size=world_size,
    )


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DetectionLoader, *, preview: int = 0
) -> tuple[dict[str, float], list[tuple[Tensor, dict[str, Tensor]]]]:
    """COCO metrics of `model` over every rank's shard of `loader` (on every rank), and the first
    `preview` images of this rank with their predictions."""
    was_training = model.training
    model.eval()
    category_ids = torch.tensor(loader.data.category_ids)
    results, previews = [], []
    for images, targets in loader:
        for image, target, prediction in zip(images, targets, model(images), strict=True):
            prediction = {
                key: (value.float() if value.is_floating_point() else value).cpu()
                for key, value in prediction.items()
            }
            if len(previews) < preview:
                previews.append((image.cpu(), prediction))
            prediction["labels"] = category_ids[prediction["labels"] - 1]
            results += to_coco_results(target["image_id"], prediction)
    model.train(was_training)
    results = gather_results(results)
    iou_types = ("bbox", "segm") if loader.data.samples.masks else ("bbox",)
    metrics = (
        coco_metrics(loader.data.coco, results, iou_types)
        if runtime.rank_and_world()[0] == 0
        else None
    )
    return runtime.broadcast(metrics), previews


def draw_predictions(
    previews: list[tuple[Tensor, dict[str, Tensor]]], class_names: list[str]
) -> Tensor:
    """One uint8 image: each preview image (enlarged to a short side of at least 256 pixels)
    with its predicted masks, boxes and labels of score >= 0.5, side by side."""
    panels = []
    for image, prediction in previews:
        scale = max(1, PREVIEW_SHORT_SIDE // min(image.shape[-2:]))
        keep = prediction["scores"] >= SCORE_TO_DRAW
        canvas = (image * 255).round().to(torch.uint8)
        canvas = F.interpolate(canvas[None], scale_factor=scale, mode="nearest")[0]
        classes = prediction["labels"][keep].tolist()
        colours = [CLASS_COLOURS[(label - 1) % len(CLASS_COLOURS)] for label in classes]
        if "masks" in prediction and keep.any():
            masks = F.interpolate(prediction["masks"][keep], scale_factor=scale) > 0.5
            canvas = draw_segmentation_masks(canvas, masks[:, 0], alpha=0.45, colors=colours)
        labels = [
            f"{class_names[label - 1]} {score:.2f}"
            for label, score in zip(classes, prediction["scores"][keep].tolist(), strict=True)
        ]
        boxes = prediction["boxes"][keep] * scale
        canvas = draw_bounding_boxes(canvas, boxes, labels, colors=colours, width=2)
        panels.append(canvas)
    height = max(panel.shape[1] for panel in panels)
    width = max(panel.shape[2] for panel in panels)
    panels = [F.pad(p, (0, width - p.shape[2], 0, height - p.shape[1])) for p in panels]
    return make_grid(panels, nrow=len(panels), padding=4)


def write_predictions(path: Path, previews: list, class_names: list[str]) -> None:
    """`draw_predictions` as a PNG file, written atomically."""
    if previews:
        with runtime.atomic_writer(path, "wb") as file:
            file.write(encode_png(draw_predictions(previews, class_names)).numpy().tobytes())


# ----------------------------------------------------------------------------- the task


class DetectionTask(Task):
    """COCO-format detection: the detector's own losses summed; box AP (and mask AP) through
    pycocotools; best.pt follows box AP; predictions.png after every evaluation."""

    best_metric = "bbox_ap"

    def __init__(self, recipe: Recipe, run_dir: str | Path | None = None) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.class_names: list[str] = []

    def build_loaders(self, device: torch.device, batch_size: int, eval_batch_size: int):
        if runtime.rank_and_world()[0] == 0:
            prepare_mosaics(self.recipe.data.mosaics)
        runtime.barrier()
        train_data, val_data = read_data(self.recipe, "train"), read_data(self.recipe, "val")
        if val_data.class_names != train_data.class_names:
            raise UserError(
                f"{val_data.annotations} has other categories than {train_data.annotations}; "
                "both splits need the same category list"
            )
        self.class_names = train_data.class_names
        return (
            build_split_loader(self.recipe, train_data, device, batch_size, train=True),
            build_split_loader(self.recipe, val_data, device, eval_batch_size, train=False),
        )

    def build_model(self) -> nn.Module:
        return build_detector(self.recipe.model, self.recipe.detection, len(self.class_names))

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        images, targets = batch
        return sum(model(images, targets).values())

    def evaluate(self, model: nn.Module, loader: DetectionLoader) -> dict[str, float]:
        metrics, previews = evaluate(model, loader, preview=self.recipe.detection.preview_images)
        if self.run_dir is not None and runtime.rank_and_world()[0] == 0:
            write_predictions(self.run_dir / "predictions.png", previews, self.class_names)
        return metrics

    def describe(self, metrics: dict[str, float]) -> str:
        text = f"box AP {metrics['bbox_ap']:.3f}, AP50 {metrics['bbox_ap50']:.3f}"
        if "segm_ap" in metrics:
            text += f", mask AP {metrics['segm_ap']:.3f}"
        return text


def train(
    recipe: Recipe,
    *,
    run_dir: str | Path,
    resume: str | Path | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Trains the recipe's detector (`debiformer train` with `task: detection`); returns the
    run's summary."""
    task = DetectionTask(recipe, run_dir)
    return fit(recipe, task, run_dir=run_dir, resume=resume, fresh=fresh)


# ----------------------------------------------------------------------------- eval command


def evaluate_checkpoint(
    recipe: Recipe,
    checkpoint: str | Path,
    *,
    use_ema: bool = False,
    json_path: str | Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """COCO metrics of a checkpoint of this tool on the recipe's validation set; writes the
    result as JSON to `json_path` when given, and predictions.png beside it."""
    setup = prepare_checkpoint_evaluation(
        recipe,
        checkpoint,
        use_ema=use_ema,
        json_path=json_path,
        read_data=read_data,
        build_loader=build_split_loader,
        build_model=lambda model, classes: build_detector(model, recipe.detection, classes),
    )
    model, loader, val_data = setup.model, setup.loader, setup.data
    with runtime.autocast(setup.device, recipe.train.precision):
        metrics, previews = evaluate(model, loader, preview=recipe.detection.preview_images)
    result = {
        "checkpoint": str(checkpoint),
        "weights": setup.weights,
        "model": recipe.model.name,
        "detector": recipe.detection.detector,
        "images": len(val_data.samples),
        "device": str(setup.device),
        **metrics,
    }
    if json_path is not None:
        runtime.write_json(json_path, result)
        write_predictions(
            Path(json_path).with_name("predictions.png"), previews, val_data.class_names
        )
    return result
