"""Semantic segmentation on images with label masks (`task: segmentation`).

The engine trains a Semantic FPN or UperNet on a DeBiFormer backbone (`debiformer.segmentation`);
this task gives it the mask data, the cross-entropy loss (plus the auxiliary head's), and an
evaluation that every rank runs on its shard, whole-image or in sliding windows, at one or more
scales with or without flips, summed into one confusion matrix: mIoU, mean and overall pixel
accuracy, per-class IoU. best.pt follows mIoU; predictions.png shows a few validation images
beside their ground truth and prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from debiformer import runtime
from debiformer.data.checks import check_segmentation_data
from debiformer.data.segmentation import (
    SegmentationData,
    SegmentationLoader,
    SegmentationTransform,
    read_class_names,
    read_segmentation_split,
)
from debiformer.engine import Metric
from debiformer.errors import UserError
from debiformer.recipe import SegmentationConfig
from debiformer.tasks import Evaluation
from debiformer.tasks.dense import CLASS_COLOURS, DenseTask, grid
from debiformer.tasks.segmentation_inference import predict
from debiformer.tasks.segmentation_metrics import confusion_matrix, segmentation_metrics


def same_size_groups(images: list[Tensor]) -> list[list[int]]:
    """Indices of `images` in groups inferred together: all at once when they share a size,
    else one by one (padding would change what the model sees)."""
    if len({tuple(image.shape) for image in images}) == 1:
        return [list(range(len(images)))]
    return [[k] for k in range(len(images))]


def evaluation_probabilities(
    model: nn.Module, images: Tensor, seg: SegmentationConfig, num_classes: int
) -> Tensor:
    """Class probabilities (N, K, H, W) of normalised same-size images (N, 3, H, W) by the
    recipe's evaluation inference (`segmentation.eval_mode`, `eval_ratios`, `eval_flip`, ...):
    what `evaluate` and `debiformer predict` both compute."""
    return predict(
        lambda x: model(x)["out"],
        images,
        num_classes=num_classes,
        scale=(seg.scale[0], seg.scale[1]),
        ratios=seg.eval_ratios,
        flip=seg.eval_flip,
        mode=seg.eval_mode,
        crop_size=seg.crop_size,
        stride=seg.eval_stride,
        size_divisor=seg.size_divisor,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: SegmentationLoader,
    seg: SegmentationConfig,
    *,
    preview: int = 0,
) -> Evaluation:
    """mIoU and the other metrics of `model` over every rank's shard of `loader` (on every
    rank), and the first `preview` (image, ground truth, prediction) of this rank."""
    was_training = model.training
    model.eval()
    class_names = loader.data.class_names
    confusion = torch.zeros(len(class_names), len(class_names), dtype=torch.int64)
    confusion = confusion.to(loader.device)
    previews = []
    for images, masks in loader:
        for group in same_size_groups(images):
            group_images = torch.stack([images[k] for k in group])
            probabilities = evaluation_probabilities(model, group_images, seg, len(class_names))
            predictions = probabilities.argmax(dim=1)
            for k, prediction in zip(group, predictions, strict=True):
                confusion += confusion_matrix(
                    prediction, masks[k], len(class_names), seg.ignore_index
                )
                if len(previews) < preview:
                    previews.append((images[k].cpu(), masks[k].cpu(), prediction.cpu()))
    model.train(was_training)
    metrics = segmentation_metrics(runtime.sum_over_ranks(confusion).cpu(), class_names)
    return Evaluation(metrics, previews)


def palette(num_classes: int) -> Tensor:
    """(num_classes + 1, 3) uint8 colours: one per class (tab10's first, then seeded random
    ones), and black last, for ignored pixels."""
    colours = torch.tensor(CLASS_COLOURS, dtype=torch.uint8)
    extra = max(0, num_classes - len(colours))
    random = torch.randint(0, 256, (extra, 3), generator=torch.Generator().manual_seed(0))
    return torch.cat([colours[:num_classes], random.to(torch.uint8), torch.zeros(1, 3).byte()])


def draw_predictions(
    previews: list[tuple[Tensor, Tensor, Tensor]], num_classes: int, ignore_index: int
) -> Tensor:
    """One uint8 image: a row per preview of the image, its ground truth and the prediction,
    classes in `palette` colours (ignored pixels black)."""
    colours = palette(num_classes)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    panels = []
    for image, mask, prediction in previews:
        pixels = ((image.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        mask = torch.where(mask == ignore_index, num_classes, mask)
        panels += [pixels, colours[mask].permute(2, 0, 1), colours[prediction].permute(2, 0, 1)]
    return grid(panels, columns=3)


class SegmentationTask(DenseTask):
    """Semantic segmentation: pixel cross-entropy (ignoring `ignore_index`), plus the auxiliary
    head's weighted by `aux_weight`; mIoU from one confusion matrix over all ranks; best.pt
    follows mIoU."""

    metrics = tuple(
        Metric(key, label, "{:.4f}")
        for key, label in (("miou", "mIoU"), ("macc", "mAcc"), ("aacc", "aAcc"))
    )
    best_metric = "miou"
    loader_class = SegmentationLoader

    def read_data(self, split: str) -> SegmentationData:
        """The recipe's train or val split: the images `data.{split}_path`, their label PNGs
        `data.{split}_masks`, the class names `data.classes`."""
        images = getattr(self.recipe.data, f"{split}_path")
        masks = getattr(self.recipe.data, f"{split}_masks")
        for key, folder in ((f"{split}_path", images), (f"{split}_masks", masks)):
            if folder is None or not Path(folder).is_dir():
                what = "is not set" if folder is None else f"folder {folder} does not exist"
                raise UserError(
                    f"data.{key}: {what}; a segmentation recipe needs the folders of the images "
                    f"and of their label PNGs: set data.{key} to a folder"
                )
        if self.recipe.data.classes is None:
            raise UserError(
                "data.classes: a segmentation recipe needs the class names (a list, or a text file "
                "with one name per line): set data.classes, e.g. to classes.txt"
            )
        seg = self.recipe.segmentation
        transform = SegmentationTransform(
            scale=(seg.scale[0], seg.scale[1]),
            ratio_range=(seg.ratio_range[0], seg.ratio_range[1]),
            crop_size=seg.crop_size,
            cat_max_ratio=seg.cat_max_ratio,
            ignore_index=seg.ignore_index,
        )
        settings = self.check_settings()
        data = read_segmentation_split(
            images,
            masks,
            class_names=read_class_names(self.recipe.data.classes),
            reduce_zero_label=self.recipe.data.reduce_zero_label,
            train=split == "train",
            transform=transform,
            seed=self.recipe.train.seed,
            limit=settings.limit,
        )
        check_segmentation_data(data, train=split == "train", settings=settings)
        return data

    def build_model(self) -> nn.Module:
        model = super().build_model()
        if runtime.rank_and_world()[1] > 1 and self.device.type == "cuda":
            # the heads' BatchNorm statistics over all GPUs, as the release's SyncBN; torch's
            # SyncBatchNorm runs only on GPUs, so CPU processes keep per-process statistics
            model.head = nn.SyncBatchNorm.convert_sync_batchnorm(model.head)
            if model.aux_head is not None:
                model.aux_head = nn.SyncBatchNorm.convert_sync_batchnorm(model.aux_head)
        return model

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        images, masks = batch
        seg = self.recipe.segmentation
        outputs = model(images)
        loss = F.cross_entropy(outputs["out"], masks, ignore_index=seg.ignore_index)
        if "aux" in outputs:
            aux = F.cross_entropy(outputs["aux"], masks, ignore_index=seg.ignore_index)
            loss = loss + seg.aux_weight * aux
        return loss

    def run_evaluation(self, model: nn.Module, loader: SegmentationLoader) -> Evaluation:
        seg = self.recipe.segmentation
        return evaluate(model, loader, seg, preview=seg.preview_images)

    def draw_predictions(self, previews: list[Any], class_names: list[str]) -> Tensor:
        return draw_predictions(previews, len(class_names), self.recipe.segmentation.ignore_index)

    def evaluation_settings(self) -> dict[str, Any]:
        seg = self.recipe.segmentation
        return {
            "head": seg.head,
            "mode": seg.eval_mode,
            "ratios": list(seg.eval_ratios),
            "flip": seg.eval_flip,
        }
