"""Semantic-segmentation inference as mmsegmentation 0.x tests (`simple_test`, `aug_test`).

inference_size      the size mmseg's AlignResize(keep_ratio=True) gives an image at a test scale
slide_logits   logits of overlapping crops, averaged where they overlap (`slide_inference`)
predict        class probabilities at the original size, averaged over test scales and flips

A model is any callable taking normalised images (N, 3, h, w) to logits (N, K, h, w) at the same
size. Images come at their original size: the resizing of mmseg's test pipeline happens here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Model = Callable[[torch.Tensor], torch.Tensor]
MODES = ("whole", "slide")


def inference_size(
    height: int, width: int, scale: tuple[int, int], ratio: float = 1.0, size_divisor: int = 32
) -> tuple[int, int]:
    """(height, width) of an image after mmseg's AlignResize(keep_ratio=True) at `scale` times
    `ratio` (truncated to int, as MultiScaleFlipAug does): scaled so that its long side fits the
    scale's long side and its short side the short one (mmcv's rescale_size, rounding half up),
    then each side rounded up to a multiple of size_divisor."""
    scaled = [int(side * ratio) for side in scale]
    factor = min(max(scaled) / max(height, width), min(scaled) / min(height, width))
    return (
        round_up(int(height * factor + 0.5), size_divisor),
        round_up(int(width * factor + 0.5), size_divisor),
    )


def round_up(value: int, divisor: int) -> int:
    """The smallest multiple of divisor that is >= value."""
    return -(-value // divisor) * divisor


def slide_logits(
    model: Model, images: torch.Tensor, crop_size: int, stride: int, num_classes: int
) -> torch.Tensor:
    """Logits (N, num_classes, H, W) of images (N, 3, H, W) as mmseg's slide_inference gives
    them: the model's logits of crop_size x crop_size windows every `stride` pixels (the last
    window of a row or column moved back to end at the border; a side shorter than the crop is
    one window of its length), summed into place and divided by the number of windows covering
    each pixel."""
    if not 0 < stride <= crop_size:
        raise ValueError(f"stride {stride} must be in 1..crop_size ({crop_size}) to cover images")
    batch, _, height, width = images.shape
    logits = images.new_zeros((batch, num_classes, height, width))
    window_counts = images.new_zeros((1, 1, height, width))
    for top, bottom in window_spans(height, crop_size, stride):
        for left, right in window_spans(width, crop_size, stride):
            window = images[:, :, top:bottom, left:right]
            logits[:, :, top:bottom, left:right] += model_logits(model, window, num_classes)
            window_counts[:, :, top:bottom, left:right] += 1
    return logits / window_counts


def window_spans(length: int, crop_size: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) of the sliding windows along one side of `length` pixels, as mmseg places
    them: max(length - crop_size + stride - 1, 0) // stride + 1 windows starting every stride
    pixels, each ending at the border at the latest and then starting crop_size before its end
    (or at 0)."""
    count = max(length - crop_size + stride - 1, 0) // stride + 1
    spans = []
    for index in range(count):
        end = min(index * stride + crop_size, length)
        spans.append((max(end - crop_size, 0), end))
    return spans


@torch.no_grad()
def predict(
    model: Model,
    images: torch.Tensor,
    *,
    num_classes: int,
    scale: tuple[int, int],
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    mode: Literal["whole", "slide"] = "whole",
    crop_size: int = 512,
    stride: int = 341,
    size_divisor: int = 32,
) -> torch.Tensor:
    """Class probabilities (N, num_classes, H, W) of normalised images (N, 3, H, W) at their own
    size, as mmseg's aug_test (simple_test for one ratio without flip) gives them: per ratio, and
    with flip also for the horizontally flipped images (their output flipped back), the images
    resized bilinearly to inference_size(H, W, scale, ratio, size_divisor), their logits ("whole": one
    call of the model; "slide": slide_logits) resized bilinearly to (H, W) and softmaxed over
    classes; the probabilities of all passes averaged."""
    if mode not in MODES:
        raise ValueError(f"inference mode {mode!r}: choose one of {MODES}")
    if not ratios:
        raise ValueError("no test ratios given")
    passes = [
        (ratio, flipped) for ratio in ratios for flipped in ((False, True) if flip else (False,))
    ]
    height, width = images.shape[-2:]
    total = sum(
        pass_probabilities(
            model,
            resized(images, inference_size(height, width, scale, ratio, size_divisor)),
            flipped=flipped,
            original_size=(height, width),
            num_classes=num_classes,
            mode=mode,
            crop_size=crop_size,
            stride=stride,
        )
        for ratio, flipped in passes
    )
    return total / len(passes)


def pass_probabilities(
    model: Model,
    images: torch.Tensor,
    *,
    flipped: bool,
    original_size: tuple[int, int],
    num_classes: int,
    mode: str,
    crop_size: int,
    stride: int,
) -> torch.Tensor:
    """Class probabilities at original_size of images already resized to a test size, flipped
    horizontally before the model and back after it if `flipped`."""
    inputs = images.flip(-1) if flipped else images
    if mode == "slide":
        logits = slide_logits(model, inputs, crop_size, stride, num_classes)
    else:
        logits = model_logits(model, inputs, num_classes)
    probabilities = resized(logits, original_size).softmax(dim=1)
    return probabilities.flip(-1) if flipped else probabilities


def model_logits(model: Model, images: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The model's logits of images (N, 3, h, w), checked to be (N, num_classes, h, w)."""
    logits = model(images)
    expected = (images.shape[0], num_classes, *images.shape[-2:])
    if tuple(logits.shape) != expected:
        raise ValueError(
            f"the model gave logits {tuple(logits.shape)} for images {tuple(images.shape)}; "
            f"expected {expected} (num_classes {num_classes}, at the input's size)"
        )
    return logits


def resized(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """tensor (N, C, h, w) resized bilinearly (align_corners=False) to size; as is if already."""
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)
