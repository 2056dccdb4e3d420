"""Semantic segmentation on images with label masks (`task: segmentation`).

The engine trains a Semantic FPN or UperNet on a DeBiFormer backbone (`debiformer.segmentation`);
this task gives it the mask loaders, the cross-entropy loss (plus the auxiliary head's), and an
evaluation that every rank runs on its shard, whole-image or in sliding windows, at one or more
scales with or without flips, summed into one confusion matrix: mIoU, mean and overall pixel
accuracy, per-class IoU. best.pt follows mIoU; `predictions.png` shows a few validation images
beside their ground truth and prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.io import encode_png
from torchvision.utils import make_grid

from debiformer import runtime
from debiformer.data.mosaics import prepare_mosaics
from debiformer.data.segmentation import (
    SegmentationData,
    SegmentationLoader,
    SegmentationTransform,
    read_class_names,
    read_segmentation_split,
)
from debiformer.engine import Task, fit
from debiformer.errors import UserError
from debiformer.recipe import Recipe, SegmentationConfig
from debiformer.segmentation import build_segmenter
from debiformer.tasks import prepare_checkpoint_evaluation
from debiformer.tasks.detection import CLASS_COLOURS
from debiformer.tasks.segmentation_inference import predict
from debiformer.tasks.segmentation_metrics import confusion_matrix, segmentation_metrics

# ----------------------------------------------------------------------------- data


def read_data(recipe: Recipe, split: str) -> SegmentationData:
    """The recipe's train or val split: the images `data.{split}_path`, their label PNGs
    `data.{split}_masks`, the class names `data.classes`."""
    images = getattr(recipe.data, f"{split}_path")
    masks = getattr(recipe.data, f"{split}_masks")
    for key, folder in ((f"{split}_path", images), (f"{split}_masks", masks)):
        if folder is None or not Path(folder).is_dir():
            what = "is not set" if folder is None else f"folder {folder} does not exist"
            raise UserError(
                f"data.{key}: {what}; a segmentation recipe needs the folders of the images and "
                f"of their label PNGs, e.g. --set data.{key}=DIR"
            )
    if recipe.data.classes is None:
        raise UserError(
            "data.classes: a segmentation recipe needs the class names (a list, or a text file "
            "with one name per line), e.g. --set data.classes=classes.txt"
        )
    seg = recipe.segmentation
    transform = SegmentationTransform(
        scale=(seg.scale[0], seg.scale[1]),
        ratio_range=(seg.ratio_range[0], seg.ratio_range[1]),
        crop_size=seg.crop_size,
        cat_max_ratio=seg.cat_max_ratio,
        ignore_index=seg.ignore_index,
    )
    return read_segmentation_split(
        images,
        masks,
        class_names=read_class_names(recipe.data.classes),
        reduce_zero_label=recipe.data.reduce_zero_label,
        train=split == "train",
        transform=transform,
        seed=recipe.train.seed,
    )


def build_split_loader(
    recipe: Recipe, data: SegmentationData, device: torch.device, batch_size: int, train: bool
) -> SegmentationLoader:
    """This process's loader of one split: its shard under torchrun, batches on `device`."""
    rank, world_size = runtime.rank_and_world()
    return SegmentationLoader(
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


def same_size_groups(images: list[Tensor]) -> list[list[int]]:
    """Indices of `images` in groups inferred together: all at once when they share a size,
    else one by one (padding would change what the model sees)."""
    if len({tuple(image.shape) for image in images}) == 1:
        return [list(range(len(images)))]
    return [[k] for k in range(len(images))]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: SegmentationLoader,
    seg: SegmentationConfig,
    *,
    preview: int = 0,
) -> tuple[dict[str, Any], list[tuple[Tensor, Tensor, Tensor]]]:
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
            probabilities = predict(
                lambda x: model(x)["out"],
                torch.stack([images[k] for k in group]),
                num_classes=len(class_names),
                scale=(seg.scale[0], seg.scale[1]),
                ratios=seg.eval_ratios,
                flip=seg.eval_flip,
                mode=seg.eval_mode,
                crop_size=seg.crop_size,
                stride=seg.eval_stride,
                size_divisor=seg.size_divisor,
            )
            predictions = probabilities.argmax(dim=1)
            for k, prediction in zip(group, predictions, strict=True):
                confusion += confusion_matrix(
                    prediction, masks[k], len(class_names), seg.ignore_index
                )
                if len(previews) < preview:
                    previews.append((images[k].cpu(), masks[k].cpu(), prediction.cpu()))
    model.train(was_training)
    metrics = segmentation_metrics(runtime.sum_over_ranks(confusion).cpu(), class_names)
    return metrics, previews


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
    height = max(panel.shape[1] for panel in panels)
    width = max(panel.shape[2] for panel in panels)
    panels = [F.pad(p, (0, width - p.shape[2], 0, height - p.shape[1])) for p in panels]
    return make_grid(panels, nrow=3, padding=4)


def write_predictions(path: Path, previews: list, num_classes: int, ignore_index: int) -> None:
    """`draw_predictions` as a PNG file, written atomically."""
    if previews:
        with runtime.atomic_writer(path, "wb") as file:
            image = draw_predictions(previews, num_classes, ignore_index)
            file.write(encode_png(image).numpy().tobytes())


# ----------------------------------------------------------------------------- the task


class SegmentationTask(Task):
    """Semantic segmentation: pixel cross-entropy (ignoring `ignore_index`), plus the auxiliary
    head's weighted by `aux_weight`; mIoU from one confusion matrix over all ranks; best.pt
    follows mIoU; predictions.png after every evaluation."""

    best_metric = "miou"

    def __init__(self, recipe: Recipe, run_dir: str | Path | None = None) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.class_names: list[str] = []
        self.device = torch.device("cpu")

    def build_loaders(self, device: torch.device, batch_size: int, eval_batch_size: int):
        if runtime.rank_and_world()[0] == 0:
            prepare_mosaics(self.recipe.data.mosaics)
        runtime.barrier()
        train_data, val_data = read_data(self.recipe, "train"), read_data(self.recipe, "val")
        self.class_names, self.device = train_data.class_names, device
        return (
            build_split_loader(self.recipe, train_data, device, batch_size, train=True),
            build_split_loader(self.recipe, val_data, device, eval_batch_size, train=False),
        )

    def build_model(self) -> nn.Module:
        model = build_segmenter(self.recipe.model, self.recipe.segmentation, len(self.class_names))
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

    def evaluate(self, model: nn.Module, loader: SegmentationLoader) -> dict[str, Any]:
        seg = self.recipe.segmentation
        metrics, previews = evaluate(model, loader, seg, preview=seg.preview_images)
        if self.run_dir is not None and runtime.rank_and_world()[0] == 0:
            path = self.run_dir / "predictions.png"
            write_predictions(path, previews, len(self.class_names), seg.ignore_index)
        return metrics

    def describe(self, metrics: dict[str, Any]) -> str:
        return f"mIoU {metrics['miou']:.3f}, mAcc {metrics['macc']:.3f}, aAcc {metrics['aacc']:.3f}"


def train(
    recipe: Recipe,
    *,
    run_dir: str | Path,
    resume: str | Path | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Trains the recipe's segmenter (`debiformer train` with `task: segmentation`); returns
    the run's summary."""
    task = SegmentationTask(recipe, run_dir)
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
    """mIoU and the other metrics of a checkpoint of this tool on the recipe's validation set,
    evaluated as `segmentation.eval_*` say; writes the result as JSON to `json_path` when given,
    and predictions.png beside it."""
    seg = recipe.segmentation
    setup = prepare_checkpoint_evaluation(
        recipe,
        checkpoint,
        use_ema=use_ema,
        json_path=json_path,
        read_data=read_data,
        build_loader=build_split_loader,
        build_model=lambda model, classes: build_segmenter(model, seg, classes),
    )
    model, loader, val_data = setup.model, setup.loader, setup.data
    with runtime.autocast(setup.device, recipe.train.precision):
        metrics, previews = evaluate(model, loader, seg, preview=seg.preview_images)
    result = {
        "checkpoint": str(checkpoint),
        "weights": setup.weights,
        "model": recipe.model.name,
        "head": seg.head,
        "mode": seg.eval_mode,
        "ratios": list(seg.eval_ratios),
        "flip": seg.eval_flip,
        "images": len(val_data.samples),
        "device": str(setup.device),
        **metrics,
    }
    if json_path is not None:
        runtime.write_json(json_path, result)
        path = Path(json_path).with_name("predictions.png")
        write_predictions(path, previews, len(val_data.class_names), seg.ignore_index)
    return result
