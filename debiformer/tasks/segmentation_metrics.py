"""Semantic-segmentation metrics as mmsegmentation 0.x computes them (`mean_iou`, `eval_metrics`).

confusion_matrix       pixel counts per (ground-truth class, predicted class), ignored pixels left out
segmentation_metrics   mIoU, mAcc, aAcc and per-class IoU/Acc from a confusion matrix

Confusion matrices add up: each process (or batch) counts its own pixels, and the sum of the
counts is the confusion of all of them, from which the metrics are computed once.
"""

from __future__ import annotations

import torch


def confusion_matrix(
    predictions: torch.Tensor, targets: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """int64 (num_classes, num_classes) pixel counts, rows the ground-truth class and columns the
    predicted class, of integer class maps of the same shape (any leading dims); pixels whose
    target is ignore_index count nowhere. The result is on the inputs' device."""
    if predictions.shape != targets.shape:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and targets "
            f"{tuple(targets.shape)} differ in shape"
        )
    if predictions.is_floating_point() or targets.is_floating_point():
        raise ValueError("predictions and targets must be integer class maps")
    labelled = targets != ignore_index
    truth = targets[labelled].long()
    predicted = predictions[labelled].long()
    check_classes("targets", truth, num_classes)
    check_classes("predictions", predicted, num_classes)
    counts = torch.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def check_classes(name: str, classes: torch.Tensor, num_classes: int) -> None:
    """Raises ValueError unless every value of `classes` is a class index in [0, num_classes)."""
    if classes.numel() and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(
            f"{name} hold values outside [0, {num_classes}) (other than the ignore index): "
            f"{classes.min().item()}..{classes.max().item()}"
        )


def segmentation_metrics(confusion: torch.Tensor, class_names: list[str]) -> dict:
    """mmseg's metrics (fractions 0-1) of a confusion matrix (rows ground truth, columns
    prediction): per class IoU = intersection / union and Acc = intersection / ground-truth area,
    None where undefined (a class with union 0 has no IoU, one absent from the ground truth no
    Acc); `miou` and `macc` average the defined values, `aacc` = correct / labelled pixels. With
    nothing labelled miou, macc and aacc are 0.0."""
    num_classes = len(class_names)
    if confusion.shape != (num_classes, num_classes):
        raise ValueError(
            f"confusion matrix {tuple(confusion.shape)} does not match {num_classes} class names"
        )
    if len(set(class_names)) != num_classes:
        raise ValueError(f"class names repeat: {class_names}")
    counts = confusion.detach().cpu().double()
    intersection = counts.diagonal()
    ground_truth_area = counts.sum(dim=1)
    union = ground_truth_area + counts.sum(dim=0) - intersection
    class_iou = ratios(intersection, union)
    class_acc = ratios(intersection, ground_truth_area)
    labelled = ground_truth_area.sum().item()
    return {
        "miou": mean_of_defined(class_iou),
        "macc": mean_of_defined(class_acc),
        "aacc": intersection.sum().item() / labelled if labelled else 0.0,
        "class_iou": dict(zip(class_names, class_iou, strict=True)),
        "class_acc": dict(zip(class_names, class_acc, strict=True)),
    }


def ratios(numerators: torch.Tensor, denominators: torch.Tensor) -> list[float | None]:
    """numerator / denominator per class, None where the denominator is 0."""
    return [
        numerator / denominator if denominator else None
        for numerator, denominator in zip(numerators.tolist(), denominators.tolist(), strict=True)
    ]


def mean_of_defined(values: list[float | None]) -> float:
    """The mean of the values that are not None (numpy's nanmean); 0.0 when none is."""
    defined = [value for value in values if value is not None]
    return sum(defined) / len(defined) if defined else 0.0
