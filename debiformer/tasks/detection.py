"""Object detection and instance segmentation on COCO-format data (`task: detection`).

The engine trains torchvision's Mask R-CNN or RetinaNet on a DeBiFormer backbone
(`debiformer.detection`); this task gives it the COCO data, the detector's summed losses, and
an evaluation that every rank runs on its shard, gathered on rank 0 into COCO's box (and mask)
AP. best.pt follows box AP; predictions.png shows boxes, masks and labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from debiformer import runtime
from debiformer.data.checks import check_detection_data
from debiformer.data.coco import DetectionData, DetectionLoader, read_split
from debiformer.engine import Metric
from debiformer.errors import UserError
from debiformer.tasks import Evaluation
from debiformer.tasks.coco_metrics import coco_metrics, gather_results, to_coco_results
from debiformer.tasks.dense import CLASS_COLOURS, DenseTask, grid

SCORE_TO_DRAW = 0.5
PREVIEW_SHORT_SIDE = 256


@torch.no_grad()
def evaluate(model: nn.Module, loader: DetectionLoader, *, preview: int = 0) -> Evaluation:
    """COCO metrics of `model` over every rank's shard of `loader` (on every rank), and the first
    `preview` (image, prediction) of this rank."""
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
    return Evaluation(runtime.broadcast(metrics), previews)


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
        panels.append(draw_bounding_boxes(canvas, boxes, labels, colors=colours, width=2))
    return grid(panels, columns=len(panels))


class DetectionTask(DenseTask):
    """COCO-format detection: the detector's own losses summed; box AP (and mask AP) through
    pycocotools; best.pt follows box AP."""

    metrics = (
        Metric("bbox_ap", "box AP", "{:.3f}"),
        Metric("bbox_ap50", "AP50", "{:.3f}"),
        Metric("segm_ap", "mask AP", "{:.3f}"),
    )
    best_metric = "bbox_ap"
    loader_class = DetectionLoader

    def read_data(self, split: str) -> DetectionData:
        """The recipe's train or val split: the images `data.{split}_path`, their COCO
        annotations `data.{split}_annotations`."""
        images = getattr(self.recipe.data, f"{split}_path")
        annotations = getattr(self.recipe.data, f"{split}_annotations")
        if images is None or annotations is None:
            raise UserError(
                f"data.{split}_path and data.{split}_annotations: a detection recipe needs both "
                "(the image folder and its instances_*.json): set them to a folder and a file"
            )
        if not Path(images).is_dir():
            raise UserError(
                f"data.{split}_path: image folder {images} does not exist; set it to the folder of "
                "the split's images"
            )
        masks = self.recipe.detection.detector == "maskrcnn"
        settings = self.check_settings()
        data = read_split(
            images,
            annotations,
            train=split == "train",
            masks=masks,
            seed=self.recipe.train.seed,
            limit=settings.limit,
        )
        check_detection_data(data, settings)
        return data

    def check_splits(self, train_data: DetectionData, val_data: DetectionData) -> None:
        """Both splits name the same categories."""
        if val_data.class_names != train_data.class_names:
            raise UserError(
                f"{val_data.annotations} has other categories than {train_data.annotations}; "
                "both splits need the same category list"
            )

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        images, targets = batch
        return sum(model(images, targets).values())

    def run_evaluation(self, model: nn.Module, loader: DetectionLoader) -> Evaluation:
        return evaluate(model, loader, preview=self.recipe.detection.preview_images)

    def draw_predictions(self, previews: list[Any], class_names: list[str]) -> Tensor:
        return draw_predictions(previews, class_names)

    def evaluation_settings(self) -> dict[str, Any]:
        return {"detector": self.recipe.detection.detector}
