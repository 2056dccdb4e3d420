"""Image classification (`task: classification`): the model, FFCV/torchvision/synthetic
loaders, the loss (mixup/cutmix, label smoothing), top-1/top-5 accuracy, and a checkpoint's
metrics on the validation set (`ClassificationTask.evaluate_checkpoint`, `debiformer eval`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torchvision.transforms import v2

from debiformer import runtime
from debiformer.data import build_loader, ensure_ffcv_file
from debiformer.data.class_names import known_class_names
from debiformer.data.loaders import AugmentOptions, check_labels
from debiformer.engine import Metric, Task
from debiformer.errors import UserError
from debiformer.recipe import Recipe
from debiformer.tasks import Evaluation, eval_batch_size, open_checkpoint, start_model
from debiformer.weights import ModelSpec, build_model

# ----------------------------------------------------------------------------- recipe -> parts


def fall_back_without_ffcv(recipe: Recipe, console: Console) -> Recipe:
    """The recipe to run: an FFCV recipe with `*_source`s reads them through torchvision when FFCV
    is not installed (installs without the OpenCV headers it builds against)."""
    data = recipe.data
    if data.backend != "ffcv" or importlib.util.find_spec("ffcv") is not None:
        return recipe
    if data.train_source is None or data.val_source is None:
        return recipe  # the data module's import error says how to install FFCV
    console.print(
        "[yellow]warning:[/] FFCV is not installed: reading data.train_source and "
        "data.val_source with the torchvision backend",
        highlight=False,
    )
    fallback = dataclasses.replace(
        data, backend="torchvision", train_path=data.train_source, val_path=data.val_source
    )
    return dataclasses.replace(recipe, data=fallback)


def prepare_ffcv_files(recipe: Recipe, splits: tuple[str, ...] = ("train", "val")) -> None:
    """Converts `data.<split>_source` to the FFCV file `data.<split>_path` where that is missing."""
    data = recipe.data
    if data.backend != "ffcv":
        return
    for split in splits:
        path, source = getattr(data, f"{split}_path"), getattr(data, f"{split}_source")
        if path is None:
            raise UserError(
                f"data.{split}_path: not set; set it to the split's FFCV file, e.g. "
                f"/path/to/{split}.beton"
            )
        if not Path(path).exists() and source is None:
            raise UserError(
                f"data.{split}_path: FFCV file {path} does not exist (set data.{split}_source "
                "to convert one, or make it with `debiformer data convert`)"
            )
        if source is not None:
            options = {"split": "train" if split == "train" else "test", **data.ffcv_writer}
            ensure_ffcv_file(source, path, **options)


def build_split_loader(recipe: Recipe, split: str, device: torch.device, batch_size: int):
    """The loader of `split` ("train" or "val") that the recipe's `data` and `augment` describe."""
    data, aug = recipe.data, recipe.augment
    path = getattr(data, f"{split}_path")
    if data.backend != "synthetic" and not path:
        raise UserError(
            f"data.{split}_path: not set; set it to the split's data ({data.backend} backend)"
        )
    train = split == "train"
    augment = AugmentOptions(
        hflip=0.5 if aug.hflip else 0.0,
        scale=tuple(aug.scale),
        ratio=tuple(aug.ratio),
        randaugment=aug.randaugment,
        random_erasing=aug.random_erasing,
    )
    return build_loader(
        split,
        backend=data.backend,
        path=path,
        image_size=data.image_size if train else data.val_image_size or data.image_size,
        batch_size=batch_size,
        num_workers=data.num_workers,
        seed=recipe.train.seed,
        device=device,
        distributed=runtime.rank_and_world()[1] > 1,
        augment=augment if train else None,
        crop_ratio=data.crop_ratio,
        num_classes=data.num_classes,
        synthetic_samples=data.synthetic_samples,
    )


def build_criterion(recipe: Recipe, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    """The loss, and the mixup/cutmix transform when enabled (it then applies label smoothing)."""
    aug = recipe.augment
    if aug.mixup > 0 or aug.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=aug.mixup,
            cutmix_alpha=aug.cutmix,
            prob=aug.mixup_prob,
            switch_prob=aug.mixup_switch_prob,
            label_smoothing=aug.label_smoothing,
            num_classes=num_classes,
        )
        return SoftTargetCrossEntropy(), mixup
    if aug.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(aug.label_smoothing), None
    return nn.CrossEntropyLoss(), None


@contextmanager
def numpy_seeded(generator: torch.Generator) -> Iterator[None]:
    """numpy's global generator seeded from `generator` for the block, then put back: timm's
    Mixup draws from it, and its draws must depend on the batch alone."""
    saved = np.random.get_state()
    np.random.seed(int(torch.randint(2**31, (1,), generator=generator)))
    try:
        yield
    finally:
        np.random.set_state(saved)


# ----------------------------------------------------------------------------- metrics


TTA_MODES = ("flip", "multi-crop")


def _scores(log_probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(cross-entropy sum, top-1 hits, top-5 hits) of a batch, in float64."""
    k = min(5, log_probabilities.shape[1])
    hits = log_probabilities.topk(k, dim=1).indices == labels[:, None]
    loss = F.nll_loss(log_probabilities, labels, reduction="sum")
    return torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])


def _flip_averaged(model: nn.Module, images: torch.Tensor, log_probabilities: torch.Tensor):
    """Log of the mean of the class probabilities of the images and of their mirror images."""
    mirrored = model(images.flip(dims=[3])).float().log_softmax(dim=1)
    return torch.logsumexp(torch.stack([log_probabilities, mirrored]), dim=0) - math.log(2)


@torch.no_grad()
def evaluate_five_crops(
    model: nn.Module, loader, size: int, *, channels_last: bool = False
) -> dict[str, float]:
    """`tta_top1`, `tta_top5` and `tta_loss` of the mean probabilities of five `size` crops (the
    four corners and the centre, torchvision's FiveCrop) of each of `loader`'s images, which are
    the evaluation images resized to size / crop ratio and not cropped (multi-crop testing)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # images, loss sum, top-1, top-5
    for images, labels in loader:
        crops = torch.stack(v2.functional.five_crop(images, [size, size]))
        crops = crops.flatten(0, 1)
        if channels_last:
            crops = crops.contiguous(memory_format=torch.channels_last)
        log_probabilities = model(crops).float().log_softmax(dim=1).unflatten(0, (5, -1))
        mean = torch.logsumexp(log_probabilities, dim=0) - math.log(5)
        totals[0] += len(labels)
        totals[1:4] += _scores(mean, labels)
    runtime.sum_over_ranks(totals)
    model.train(was_training)
    count, loss_sum, top1, top5 = totals.tolist()
    return {"tta_top1": 100.0 * top1 / count, "tta_top5": 100.0 * top5 / count,
            "tta_loss": loss_sum / count}  # fmt: skip


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    *,
    channels_last: bool = False,
    confusion: torch.Tensor | None = None,
    tta: str | None = None,
) -> Evaluation:
    """Top-1/top-5 accuracy (%), mean cross-entropy and images/s of `model` over `loader`; with
    `confusion` (a classes x classes tensor of zeros on the model's device), the count of each
    (true class, top-1 class) pair is added into it; with `tta="flip"` the same three figures
    again (`tta_top1`, ...) for the mean of each image's and its mirror image's probabilities
    (timm's and MMPretrain's flip test-time augmentation), from the same pass.

    Under torch.distributed each rank reads its shard and the counts are summed over ranks.
    Autocast, if any, is the caller's.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # images, then (loss sum, top-1, top-5) plain and with test-time augmentation
    totals = torch.zeros(7, dtype=torch.float64, device=device)
    start = time.perf_counter()
    for images, labels in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        log_probabilities = model(images).float().log_softmax(dim=1)
        if confusion is not None:
            pairs = (labels, log_probabilities.argmax(dim=1))
            confusion.index_put_(pairs, torch.ones_like(labels, dtype=confusion.dtype), True)
        totals[0] += len(labels)
        totals[1:4] += _scores(log_probabilities, labels)
        if tta is not None:
            totals[4:7] += _scores(_flip_averaged(model, images, log_probabilities), labels)
    runtime.synchronize(device)
    elapsed = time.perf_counter() - start
    runtime.sum_over_ranks(totals)
    if confusion is not None:
        runtime.sum_over_ranks(confusion)
    model.train(was_training)
    count, loss_sum, top1, top5, tta_loss_sum, tta_top1, tta_top5 = totals.tolist()
    if count == 0:
        raise UserError("the validation set is empty")
    metrics = {
        "top1": 100.0 * top1 / count,
        "top5": 100.0 * top5 / count,
        "loss": loss_sum / count,
        "images": int(count),
        "images_per_s": count / elapsed,
    }
    if tta is not None:
        metrics |= {
            "tta": tta,
            "tta_top1": 100.0 * tta_top1 / count,
            "tta_top5": 100.0 * tta_top5 / count,
            "tta_loss": tta_loss_sum / count,
        }
    return Evaluation(metrics)


def class_report(confusion: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """Per-class top-1 accuracy (%; None for a class without images) and the confusion matrix
    (rows: true classes, columns: top-1 classes) with its class names, as plain values."""
    images = confusion.sum(dim=1)
    correct = confusion.diagonal()
    accuracy = {
        name: (100.0 * int(hits) / int(count) if count else None)
        for name, hits, count in zip(names, correct, images, strict=True)
    }
    return {
        "class_top1": accuracy,
        "confusion_matrix": {"classes": list(names), "counts": confusion.tolist()},
    }


# ----------------------------------------------------------------------------- the task


class ClassificationTask(Task):
    """Classification on the recipe's images: cross-entropy (with mixup/cutmix and label
    smoothing as the recipe says), top-1/top-5 accuracy; best.pt follows top-1."""

    metrics = (
        Metric("top1", "top-1", "{:.2f}%"),
        Metric("top5", "top-5", "{:.2f}%"),
        Metric("loss", "loss", "{:.4f}", higher_is_better=False),
    )
    best_metric = "top1"

    def __init__(
        self, recipe: Recipe, run_dir: str | Path | None = None, console: Console | None = None
    ) -> None:
        """`run_dir` is every task's second argument; a classifier writes no figures there."""
        self.console = console or Console(stderr=True)
        self.recipe = fall_back_without_ffcv(recipe, self.console)
        self.num_classes: int | None = recipe.data.num_classes
        self.criterion: nn.Module | None = None
        self.mixup: Mixup | None = None

    def prepare_data(self) -> None:
        """Converts the FFCV files the recipe names from their sources where they are missing."""
        prepare_ffcv_files(self.recipe)

    def build_loaders(self, device: torch.device, batch_size: int, eval_batch_size: int):
        """Train and validation loaders; their labels are checked against the class count
        before any training."""
        train_loader = build_split_loader(self.recipe, "train", device, batch_size)
        val_loader = build_split_loader(self.recipe, "val", device, eval_batch_size)
        self.num_classes = self.num_classes or train_loader.num_classes
        check_labels(train_loader, self.num_classes, "train")
        check_labels(val_loader, self.num_classes, "val")
        self.criterion, self.mixup = build_criterion(self.recipe, self.num_classes)
        return train_loader, val_loader

    def model_spec(self) -> ModelSpec:
        return ModelSpec.from_recipe(self.recipe, self.num_classes)

    def build_model(self) -> nn.Module:
        return start_model(self.recipe, self.model_spec())

    def start_epoch(self, epoch: int) -> None:
        """Switches mixup/cutmix off from `augment.mixup_off_epoch` on."""
        if self.mixup is not None and self.recipe.augment.mixup_off_epoch is not None:
            self.mixup.mixup_enabled = epoch < self.recipe.augment.mixup_off_epoch

    def prepare_batch(self, batch: Any, generator: torch.Generator) -> Any:
        """Mixes the batch up (mixup/cutmix), drawing from `generator` only."""
        if self.mixup is None:
            return batch
        with numpy_seeded(generator):
            return self.mixup(*batch)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, targets = batch
        if self.recipe.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.criterion(model(images), targets)

    def evaluate(self, model: nn.Module, loader) -> dict[str, float]:
        return evaluate(model, loader, channels_last=self.recipe.train.channels_last).metrics

    def evaluate_checkpoint(
        self,
        checkpoint: str | Path,
        *,
        use_ema: bool = False,
        official: bool | None = None,
        json_path: str | Path | None = None,
        tta: str | None = None,
    ) -> dict[str, Any]:
        """Evaluates a checkpoint (this tool's, a bare state dict, or a released one) on the
        recipe's validation set, with per-class top-1 and the confusion matrix, and with `tta`
        ("flip" or "multi-crop": `evaluate`, `evaluate_five_crops`) the test-time augmented
        figures beside the plain ones; writes the result as JSON to `json_path` when given."""
        if tta not in (None, *TTA_MODES):
            raise UserError(
                f": unknown test-time augmentation {tta!r}; choose flip or multi-crop", about="tta"
            )
        recipe = self.recipe
        file, device, precision = open_checkpoint(recipe, checkpoint, json_path)
        prepare_ffcv_files(recipe, splits=("val",))
        loader = build_split_loader(recipe, "val", device, eval_batch_size(recipe))
        spec = ModelSpec.from_recipe(recipe, recipe.data.num_classes or loader.num_classes)
        model, provenance = build_model(spec, checkpoint=file, ema=use_ema, official=official)
        confusion = torch.zeros(
            spec.num_classes, spec.num_classes, dtype=torch.int64, device=device
        )
        with runtime.autocast(device, precision):
            metrics = self._checkpoint_metrics(model, loader, device, confusion, tta)
        result = {
            "checkpoint": str(checkpoint),
            "weights": provenance.weights,
            "model": recipe.model.name,
            "image_size": recipe.data.val_image_size or recipe.data.image_size,
            "device": str(device),
            **metrics,
            **class_report(confusion.cpu(), known_class_names(recipe, file, spec.num_classes)),
        }
        if json_path is not None:
            runtime.write_json(json_path, result)
        return result

    def _checkpoint_metrics(
        self,
        model: nn.Module,
        loader,
        device: torch.device,
        confusion: torch.Tensor,
        tta: str | None,
    ) -> dict[str, Any]:
        """The plain metrics of `model` (moved to `device`) over `loader`, its (true, top-1)
        counts added into `confusion`, and the `tta` figures beside them."""
        channels_last = self.recipe.train.channels_last
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        flip = "flip" if tta == "flip" else None
        metrics = evaluate(
            model, loader, channels_last=channels_last, confusion=confusion, tta=flip
        ).metrics
        if tta == "multi-crop":
            metrics |= {"tta": tta, **self._five_crop_metrics(model, device)}
        return metrics

    def _five_crop_metrics(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Multi-crop figures: the validation images resized to size / crop ratio, uncropped
        (`data.crop_ratio` 1 at that size), five crops of the evaluation size each."""
        recipe, size = self.recipe, self.recipe.data.val_image_size or self.recipe.data.image_size
        wide = round(size / recipe.data.crop_ratio)
        data = dataclasses.replace(recipe.data, val_image_size=wide, crop_ratio=1.0)
        widened = dataclasses.replace(recipe, data=data)
        prepare_ffcv_files(widened, splits=("val",))
        loader = build_split_loader(widened, "val", device, eval_batch_size(recipe))
        return evaluate_five_crops(model, loader, size, channels_last=recipe.train.channels_last)
