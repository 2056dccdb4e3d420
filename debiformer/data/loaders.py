"""Loaders yielding normalised image batches on the device, from FFCV files, torchvision or noise.

Every loader yields `(images, labels)` on the target device: images float32 (N, 3, S, S)
normalised with the ImageNet mean/std, labels int64 (N,). Workers produce uint8; the move to the
device, normalisation and batch augmentations (RandAugment, random erasing) happen on the device.
Sample order is a pure function of (seed, epoch) and the shard of each torch.distributed rank.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms

from debiformer.augment import DeviceRandAugment
from debiformer.data.ffcv_files import ffcv_summary, import_ffcv
from debiformer.data.sources import FASHION_MNIST_PREFIX, open_source
from debiformer.errors import UserError

BACKENDS = ("ffcv", "torchvision", "synthetic")


# ----------------------------------------------------------------------------- order and sharding


@dataclass(frozen=True)
class ShardPlan:
    """Which samples one rank reads in one epoch.

    Training (shuffle): a permutation seeded by (seed, epoch), cut to a multiple of the world
    size so every rank gets the same number of samples; rank r takes every world-th sample from r.
    Evaluation: all samples in order, split the same way without dropping any, so every sample is
    read exactly once across ranks.
    """

    num_samples: int
    shuffle: bool
    seed: int
    rank: int = 0
    world_size: int = 1

    def indices(self, epoch: int) -> np.ndarray:
        """The sample indices of this rank for `epoch`, in reading order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            order = order[: self.num_samples // self.world_size * self.world_size]
        else:
            order = np.arange(self.num_samples)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        if self.shuffle:
            return self.num_samples // self.world_size
        return len(range(self.rank, self.num_samples, self.world_size))


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A 32-bit seed for the random streams of one rank in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _rank_and_world(distributed: bool) -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) unless distributed and torch.distributed is up."""
    if distributed and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _ShardSampler(Sampler):
    """A torch Sampler reading a ShardPlan at the epoch set by `set_epoch`."""

    def __init__(self, plan: ShardPlan):
        self.plan = plan
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(self.plan.indices(self.epoch).tolist())

    def __len__(self) -> int:
        return len(self.plan)


# ----------------------------------------------------------------------------- device transforms


@dataclass(frozen=True)
class AugmentOptions:
    """Train-time augmentations: crop and flip in the workers, the rest on the device per batch."""

    hflip: float = 0.5
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    randaugment: str | None = None
    random_erasing: float = 0.0

    @classmethod
    def from_dict(cls, options: dict | None) -> AugmentOptions:
        """Options from a recipe's `augment` mapping; unknown keys are a UserError."""
        options = dict(options or {})
        unknown = set(options) - set(cls.__dataclass_fields__)
        if unknown:
            known = ", ".join(cls.__dataclass_fields__)
            raise UserError(
                f"unknown augment option(s) {', '.join(sorted(unknown))}: known are {known}"
            )
        for key in ("scale", "ratio"):
            if key in options:
                options[key] = tuple(float(v) for v in options[key])
        return cls(**options)


class DeviceBatchTransform:
    """uint8 batch on the device -> [RandAugment] -> float normalised -> [random erasing]."""

    def __init__(self, device: torch.device, augment: AugmentOptions | None, seed: int, rank: int):
        self.device = device
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1) * 255
        self.scale, self.shift = 1 / std, -mean / std
        self.seed, self.rank = seed, rank
        self.rand_augment = None
        self.random_erasing = None
        if augment is not None and augment.randaugment:
            self.rand_augment = DeviceRandAugment.from_spec(augment.randaugment)
        if augment is not None and augment.random_erasing > 0:
            from timm.data.random_erasing import RandomErasing

            self.random_erasing = RandomErasing(augment.random_erasing, mode="pixel", device=device)
        self.generator: torch.Generator | None = None

    def start_epoch(self, epoch: int) -> None:
        """Reseed the batch augmentations from (seed, epoch, rank)."""
        if self.rand_augment is not None:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(epoch_seed(self.seed, epoch, self.rank))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.rand_augment is not None:
            images = self.rand_augment(images, self.generator)
        images = images.float().mul_(self.scale).add_(self.shift)
        if self.random_erasing is not None:
            images = self.random_erasing(images)
        return images


# ----------------------------------------------------------------------------- loaders


class Loader(ABC):
    """Batches of (normalised float images, int64 labels) on the device; see `build_loader`."""

    num_samples: int
    num_classes: int

    def __init__(
        self, plan: ShardPlan, batch_size: int, drop_last: bool, transform: DeviceBatchTransform
    ):
        self.plan = plan
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.transform = transform
        self.num_samples = plan.num_samples
        self.epoch = 0

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.plan) // self.batch_size
        return math.ceil(len(self.plan) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Read epoch `epoch` next: order and batch augmentations depend only on (seed, epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        self.transform.start_epoch(epoch)
        return self._device_batches(epoch)

    def _device_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.uint8_batches(epoch):
            yield self.transform(images), labels.to(self.transform.device, non_blocking=True).long()

    @abstractmethod
    def uint8_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 (N, 3, S, S) images and labels of `epoch` as the workers deliver them."""


class SyntheticLoader(Loader):
    """Random uint8 images and labels made on the device: no decoding cost, for benchmarks."""

    pool_size = 256

    def __init__(
        self,
        plan: ShardPlan,
        batch_size: int,
        drop_last: bool,
        transform: DeviceBatchTransform,
        image_size: int,
        num_classes: int,
    ):
        super().__init__(plan, batch_size, drop_last, transform)
        self.num_classes = num_classes
        generator = torch.Generator().manual_seed(plan.seed)
        pool = min(self.pool_size, plan.num_samples)
        images = torch.randint(
            0, 256, (pool, 3, image_size, image_size), dtype=torch.uint8, generator=generator
        )
        self.images = images.to(transform.device)
        self.labels = torch.randint(0, num_classes, (plan.num_samples,), generator=generator)

    def uint8_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = torch.from_numpy(self.plan.indices(epoch))
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = indices[start : start + self.batch_size]
            yield self.images[(batch % len(self.images)).to(self.images.device)], self.labels[batch]


def _collate_uint8(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack uint8 image tensors and labels into one batch."""
    images = torch.stack([image for image, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return images, labels


class TorchvisionLoader(Loader):
    """A torch DataLoader over an ImageFolder or Fashion-MNIST, PIL transforms in the workers."""

    def __init__(
        self,
        dataset: Dataset,
        plan: ShardPlan,
        batch_size: int,
        drop_last: bool,
        transform: DeviceBatchTransform,
        num_workers: int,
    ):
        super().__init__(plan, batch_size, drop_last, transform)
        self.num_classes = len(dataset.classes)
        self.sampler = _ShardSampler(plan)
        self.generator = torch.Generator()
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=_collate_uint8,
            pin_memory=transform.device.type == "cuda",
            drop_last=drop_last,
            generator=self.generator,
        )

    def uint8_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(epoch_seed(self.plan.seed, epoch, self.plan.rank))
        return iter(self.loader)


def _torchvision_transform(
    train: bool, image_size: int, crop_ratio: float, augment: AugmentOptions
) -> Callable:
    """PIL -> uint8 tensor: random resized crop and flip (train) or resize and centre crop (val)."""
    if train:
        steps = [
            transforms.RandomResizedCrop(
                image_size, scale=augment.scale, ratio=augment.ratio, antialias=True
            ),
            transforms.RandomHorizontalFlip(augment.hflip),
        ]
    else:
        steps = [
            transforms.Resize(round(image_size / crop_ratio)),
            transforms.CenterCrop(image_size),
        ]
    return transforms.Compose([*steps, transforms.PILToTensor()])


def _ffcv_order(plan: ShardPlan):
    """An FFCV traversal order reading `plan` (FFCV's own distributed order repeats samples to
    even out the ranks, which would count some twice in evaluation)."""
    from ffcv.traversal_order.base import TraversalOrder

    class ShardOrder(TraversalOrder):
        """FFCV calls the order it is given with the loader; this one needs nothing from it."""

        def __init__(self):
            pass

        def __call__(self, loader) -> ShardOrder:
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return plan.indices(epoch).astype(np.uint64)

    return ShardOrder()


class FfcvLoader(Loader):
    """An FFCV loader: decode, crop and flip in compiled threads, uint8 straight to the device.
    On the CPU the uint8 batches are FFCV's own buffers, reused a few batches later (the
    normalised batches of `__iter__` are new tensors)."""

    def __init__(
        self,
        path: Path,
        plan: ShardPlan,
        batch_size: int,
        drop_last: bool,
        transform: DeviceBatchTransform,
        num_workers: int,
        pipelines: dict,
    ):
        super().__init__(plan, batch_size, drop_last, transform)
        ffcv = import_ffcv()
        self.num_classes = ffcv_summary(path).num_classes
        self.loader = ffcv.loader.Loader(
            str(path),
            batch_size=batch_size,
            num_workers=max(num_workers, 1),
            order=_ffcv_order(plan),
            drop_last=drop_last,
            pipelines=pipelines,
            seed=plan.seed,
        )

    def uint8_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.loader.next_epoch = epoch
        return iter(self.loader)


def _ffcv_in_place_flip(flip_prob: float):
    """FFCV's RandomHorizontalFlip (same random draws) without its copy of every image: the
    chosen images are mirrored where they lie, the others are left untouched."""
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class InPlaceHorizontalFlip(Operation):
        """Mirror each (N, H, W, C) uint8 image with probability `flip_prob`, in place."""

        def generate_code(self) -> Callable:
            parallel_range = Compiler.get_iterator()

            def flip(images, _):
                should_flip = np.random.rand(images.shape[0]) < flip_prob
                height, width, channels = images.shape[1:]
                for i in parallel_range(images.shape[0]):
                    if should_flip[i]:
                        for y in range(height):
                            for x in range(width // 2):
                                for c in range(channels):
                                    left = images[i, y, x, c]
                                    images[i, y, x, c] = images[i, y, width - 1 - x, c]
                                    images[i, y, width - 1 - x, c] = left
                return images

            flip.is_parallel = True
            return flip

        def declare_state_and_memory(self, previous_state):
            return replace(previous_state, jit_mode=True), None

    return InPlaceHorizontalFlip()


def _ffcv_pipelines(
    train: bool, image_size: int, crop_ratio: float, augment: AugmentOptions, device: torch.device
) -> dict:
    """Fresh FFCV image and label pipelines (decoder objects cannot be shared between loaders)."""
    from ffcv.fields.decoders import (
        CenterCropRGBImageDecoder,
        IntDecoder,
        RandomResizedCropRGBImageDecoder,
    )
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

    size = (image_size, image_size)
    if train:
        image = [RandomResizedCropRGBImageDecoder(size, scale=augment.scale, ratio=augment.ratio)]
        if augment.hflip > 0:
            image.append(_ffcv_in_place_flip(augment.hflip))
    else:
        image = [CenterCropRGBImageDecoder(size, ratio=crop_ratio)]
    image += [ToTensor()]
    label = [IntDecoder(), ToTensor(), Squeeze(1)]
    if device.type != "cpu":
        image.append(ToDevice(device, non_blocking=True))
        label.append(ToDevice(device, non_blocking=True))
    image.append(ToTorchImage())
    return {"image": image, "label": label}


def build_loader(
    split: str,
    *,
    backend: str,
    path: str | None,
    image_size: int,
    batch_size: int,
    num_workers: int,
    seed: int,
    device: torch.device,
    distributed: bool = False,
    augment: dict | None = None,
    crop_ratio: float = 0.875,
    num_classes: int | None = None,
    synthetic_samples: int = 1024,
) -> Loader:
    """A loader of `split` ("train" or "val") from `backend` ("ffcv", "torchvision" or "synthetic").

    `path`: an FFCV file (ffcv), an ImageFolder root or "fashion-mnist:<dir>" (torchvision;
    train reads the Fashion-MNIST train split, val the test split), None (synthetic).
    Train: random resized crop to `image_size`, flip, `augment` on the device, last partial
    batch dropped. Val: resize to image_size/crop_ratio, centre crop, every sample once.
    """
    if split not in ("train", "val"):
        raise UserError(f"unknown split {split!r}: use train or val")
    if backend not in BACKENDS:
        raise UserError(f"unknown data backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if batch_size < 1 or image_size < 1:
        raise UserError(
            f"batch size and image size must be positive, got {batch_size} and {image_size}"
        )
    device = torch.device(device)
    train = split == "train"
    options = AugmentOptions.from_dict(augment) if train else AugmentOptions()
    rank, world_size = _rank_and_world(distributed)
    transform = DeviceBatchTransform(device, options if train else None, seed, rank)

    def plan_for(num_samples: int) -> ShardPlan:
        return ShardPlan(num_samples, shuffle=train, seed=seed, rank=rank, world_size=world_size)

    if backend == "synthetic":
        if not num_classes:
            raise UserError(
                "the synthetic backend needs num_classes (model.num_classes in the recipe)"
            )
        return SyntheticLoader(
            plan_for(synthetic_samples), batch_size, train, transform, image_size, num_classes
        )
    if not path:
        raise UserError(
            f"the {backend} backend needs a data path (data.{split}_path in the recipe)"
        )
    if backend == "torchvision":
        pil_transform = _torchvision_transform(train, image_size, crop_ratio, options)
        dataset = open_source(path, "train" if train else "test", pil_transform)
        return TorchvisionLoader(
            dataset, plan_for(len(dataset)), batch_size, train, transform, num_workers
        )
    import_ffcv()
    file = Path(path)
    if file.is_dir() or str(path).startswith(FASHION_MNIST_PREFIX):
        raise UserError(
            f"the ffcv backend reads a .beton file, not {path}: convert it with "
            f"`debiformer data convert {path} OUT.beton` or set data.backend: torchvision"
        )
    pipelines = _ffcv_pipelines(train, image_size, crop_ratio, options, device)
    plan = plan_for(ffcv_summary(file).num_samples)
    return FfcvLoader(file, plan, batch_size, train, transform, num_workers, pipelines)
