"""The random draws of the training data, each a pure function of the seed, the epoch and an index.

Sample order: `(seed, epoch)` (see `ShardPlan`). Crop of a sample: `(seed, epoch, sample index)`,
whatever the backend, worker count or rank that reads it. Flip, RandAugment and random erasing of
a batch: `(seed, epoch, rank, batch index)` in the `AUGMENT_STREAM`; what a task draws for a batch
(mixup, cutmix) comes from the same key in the `TASK_STREAM`. So two runs with the same seed read
the same batches, and an epoch can start at any batch without reading the batches before it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

CROP_ATTEMPTS = 10
DRAWS_PER_CROP = 4 * CROP_ATTEMPTS
# the independent random streams of one batch: the loader's augmentations, the task's draws
AUGMENT_STREAM, TASK_STREAM = 0, 1


def stream_seed(*key: int) -> int:
    """A 64-bit seed for the random stream named by `key` (e.g. seed, epoch, rank, batch)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0])


def batch_generator(
    seed: int, epoch: int, rank: int, batch: int, device: torch.device, stream: int
) -> torch.Generator:
    """The generator of `stream` for batch `batch` of `rank` in `epoch`, on `device`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(seed, epoch, rank, batch, stream) & (2**63 - 1))
    return generator


def crop_uniforms(seed: int, epoch: int, index: int) -> np.ndarray:
    """The `DRAWS_PER_CROP` uniform draws in [0, 1) of the crop of sample `index` in `epoch`."""
    return np.random.default_rng([seed, epoch, index]).random(DRAWS_PER_CROP)


def random_crop_box(
    height: int, width: int, scale: np.ndarray, ratio: np.ndarray, uniforms: np.ndarray
) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of a random resized crop, as torchvision and FFCV draw it:
    up to 10 tries of an area share in `scale` and a log-uniform aspect ratio in `ratio`, else the
    centre crop closest to `ratio`. `uniforms` holds `DRAWS_PER_CROP` draws in [0, 1), four a try.
    Plain arithmetic, so numba compiles it for FFCV's decoders."""
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(CROP_ATTEMPTS):
        draws = uniforms[4 * attempt : 4 * attempt + 4]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[0])
        aspect = math.exp(log_low + (log_high - log_low) * draws[1])
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(draws[2] * (height - crop_height + 1))
            left = int(draws[3] * (width - crop_width + 1))
            return top, left, crop_height, crop_width
    in_ratio = width / height
    if in_ratio < min(ratio[0], ratio[1]):
        crop_width, crop_height = width, int(round(width / min(ratio[0], ratio[1])))
    elif in_ratio > max(ratio[0], ratio[1]):
        crop_width, crop_height = int(round(height * max(ratio[0], ratio[1]))), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width
