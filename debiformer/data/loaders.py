"""Loaders yielding batches on the device, by epoch: the `EpochLoader` protocol and its loaders.

The image loaders (`build_loader`: FFCV files, torchvision, noise) yield `(images, labels)` on
the target device: images float32 (N, 3, S, S) normalised with the ImageNet mean/std, labels
int64 (N,). Workers produce uint8 crops; the move to the device, normalisation and batch
augmentations (flip, RandAugment, random erasing) happen on the device. `KeyedLoader` reads
datasets whose samples draw their own randomness (COCO, image+mask files). Every random draw is a
pure function of the seed, the epoch and a sample or batch index (see `debiformer.data.draws`), so
an epoch can start at any batch (`batches(epoch, start_batch)`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import functional as TF

from debiformer import runtime
from debiformer.augment import DeviceRandAugment, DeviceRandomErasing, random_horizontal_flip
from debiformer.data.draws import AUGMENT_STREAM, batch_generator, crop_uniforms, random_crop_box
from debiformer.data.ffcv_files import FileSummary, ffcv_summary, import_ffcv
from debiformer.data.sources import FASHION_MNIST_PREFIXES, open_source
from debiformer.errors import UserError

if TYPE_CHECKING:
    from debiformer.data.ffcv_ops import SeededRandomResizedCrop

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


# ----------------------------------------------------------------------------- the loader protocol


@runtime_checkable
class EpochLoader(Protocol):
    """Batches of this process, by epoch: what training reads and evaluation iterates.

    - `len(loader)`: the batches in one epoch of this process (its shard of the samples).
    - `loader.batches(epoch, start_batch=0)`: batches `start_batch`, ..., `len(loader) - 1` of
      epoch `epoch` (0-based), on the device. Batch b of an epoch is the same whatever batch the
      pass starts at, whatever passes came before and however many workers read it: a training
      loader orders its samples by a permutation seeded by (seed, epoch) and draws every random
      augmentation from (seed, epoch, sample or batch index); an evaluation loader reads its
      samples in order, the same in every epoch. Resuming inside an epoch is
      `batches(epoch, batch)`; `start_batch == len(loader)` yields nothing.
    - `iter(loader)`: `batches(0)`, one whole pass over epoch 0 (for an evaluation loader: its
      samples once, in order). A loader keeps no epoch of its own between passes.
    """

    def __len__(self) -> int: ...

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class ShardedLoader(ABC):
    """An `EpochLoader` of the samples a `ShardPlan` gives this rank, cut into batches of
    `batch_size` (the last partial one dropped if `drop_last`); subclasses read the batches.

    `source` names what it reads (for messages), `num_samples` counts the samples of all ranks.
    """

    source: str

    def __init__(self, plan: ShardPlan, batch_size: int, drop_last: bool):
        self.plan = plan
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.num_samples = plan.num_samples

    def __len__(self) -> int:
        """Batches in a whole epoch."""
        if self.drop_last:
            return len(self.plan) // self.batch_size
        return math.ceil(len(self.plan) / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        """One whole pass over epoch 0."""
        return self.batches(0)

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[Any]:
        """Batches `start_batch`, `start_batch + 1`, ... of `epoch` on the device."""
        if not 0 <= start_batch <= len(self):
            raise UserError(
                f"start batch {start_batch} is outside the {len(self)} batches of an epoch of "
                f"{self.source}"
            )
        return self._read(epoch, start_batch)

    def epoch_indices(self, epoch: int, start_batch: int = 0) -> np.ndarray:
        """The sample indices of batches `start_batch`, ... of `epoch`, in reading order."""
        stop = len(self) * self.batch_size if self.drop_last else None
        return self.plan.indices(epoch)[start_batch * self.batch_size : stop]

    @abstractmethod
    def _read(self, epoch: int, start_batch: int) -> Iterator[Any]:
        """Batches `start_batch`, ... of `epoch` on the device (`start_batch` is in range)."""


# ----------------------------------------------------------------------------- worker processes


class EpochSampler(Sampler):
    """A torch Sampler yielding the `(epoch, sample index)` keys of the samples set by `select`."""

    def __init__(self):
        self.epoch = 0
        self.indices = np.zeros(0, dtype=np.int64)

    def select(self, epoch: int, indices: np.ndarray) -> None:
        """Read the samples `indices` of `epoch` on the next pass."""
        self.epoch, self.indices = epoch, indices

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in self.indices.tolist())

    def __len__(self) -> int:
        return len(self.indices)


class WorkerReader:
    """A torch DataLoader over a dataset read by `(epoch, index)` keys, in `num_workers` worker
    processes (none: in this one); `read(epoch, indices)` yields the batches of those samples,
    made by `collate(samples)`."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        num_workers: int,
        collate: Callable[[list], Any],
        seed: int,
        pin_memory: bool = False,
    ):
        self.sampler = EpochSampler()
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            worker_init_fn=runtime.ignore_stop_signals,
            # its own generator: starting the workers then draws nothing from the global one
            generator=torch.Generator().manual_seed(seed),
        )

    def read(self, epoch: int, indices: np.ndarray) -> Iterator[Any]:
        """The batches of samples `indices` of `epoch`, in that order."""
        self.sampler.select(epoch, indices)
        try:
            yield from self.loader
        except UserError as error:
            raise UserError(worker_message(error)) from None


def worker_message(error: UserError) -> str:
    """The one-line message of a UserError raised in a loader's worker process, which the
    DataLoader re-raises with the worker's traceback around it."""
    text = str(error).rstrip()
    if "DataLoader worker" not in text:
        return text
    return text.splitlines()[-1].split("UserError: ", 1)[-1]


class KeyedLoader(ShardedLoader):
    """Batches of one rank on the device from a dataset read by `(epoch, index)` keys (a sample's
    randomness drawn from its key), in worker processes.

    Training shuffles by (seed, epoch), every rank reads as many samples and the last partial
    batch is dropped; evaluation reads every sample once across ranks, in order.
    `collate(samples)` makes a batch of the samples, `to_device(batch, device)` moves it.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        source: str,
        batch_size: int,
        train: bool,
        device: torch.device,
        num_workers: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        collate: Callable[[list], Any],
        to_device: Callable[[Any, torch.device], Any],
    ) -> None:
        plan = ShardPlan(len(dataset), train, seed, rank, world_size)
        super().__init__(plan, batch_size, drop_last=train)
        self.source, self.device, self.to_device = source, device, to_device
        self.reader = WorkerReader(dataset, batch_size, num_workers, collate, seed)

    def _read(self, epoch: int, start_batch: int) -> Iterator[Any]:
        for batch in self.reader.read(epoch, self.epoch_indices(epoch, start_batch)):
            yield self.to_device(batch, self.device)


# ----------------------------------------------------------------------------- device transforms


@dataclass(frozen=True)
class AugmentOptions:
    """Train-time augmentations: crop in the workers, the rest on the device per batch."""

    hflip: float = 0.5
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    randaugment: str | None = None
    random_erasing: float = 0.0


class DeviceBatchTransform:
    """uint8 batch on the device -> [flip] -> [RandAugment] -> float normalised -> [erasing].

    The random ops of batch b of epoch e draw, in that order, from one generator: the augment
    stream of (seed, e, rank, b) (see `draws`).
    """

    def __init__(self, device: torch.device, augment: AugmentOptions | None, seed: int, rank: int):
        self.device = device
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1) * 255
        self.scale, self.shift = 1 / std, -mean / std
        self.seed, self.rank = seed, rank
        augment = augment or AugmentOptions(hflip=0.0)
        self.hflip = augment.hflip
        self.rand_augment = None
        self.random_erasing = None
        if augment.randaugment:
            self.rand_augment = DeviceRandAugment.from_spec(augment.randaugment)
        if augment.random_erasing > 0:
            self.random_erasing = DeviceRandomErasing(augment.random_erasing)

    def _generator(self, epoch: int, batch: int) -> torch.Generator | None:
        """The generator of this batch's random ops; None if there are none."""
        if self.hflip > 0 or self.rand_augment is not None or self.random_erasing is not None:
            return batch_generator(self.seed, epoch, self.rank, batch, self.device, AUGMENT_STREAM)
        return None

    def __call__(self, images: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        """The normalised, augmented float batch of uint8 `images`, batch `batch` of `epoch`."""
        images = images.to(self.device, non_blocking=True)
        generator = self._generator(epoch, batch)
        if self.hflip > 0:
            images = random_horizontal_flip(images, self.hflip, generator)
        if self.rand_augment is not None:
            images = self.rand_augment(images, generator)
        images = images.float().mul_(self.scale).add_(self.shift)
        if self.random_erasing is not None:
            images = self.random_erasing(images, generator)
        return images


# ----------------------------------------------------------------------------- image loaders


class Loader(ShardedLoader):
    """Batches of (normalised float images, int64 labels) on the device; see `build_loader`.

    `num_classes` is the class count of the data (stored with an FFCV file; an ImageFolder's
    class folders), `label_range` the lowest and highest label in it.
    """

    num_classes: int
    label_range: tuple[int, int]

    def __init__(
        self, plan: ShardPlan, batch_size: int, drop_last: bool, transform: DeviceBatchTransform
    ):
        super().__init__(plan, batch_size, drop_last)
        self.transform = transform

    def _read(self, epoch: int, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.uint8_batches(epoch, start_batch)
        for batch, (images, labels) in enumerate(batches, start_batch):
            labels = labels.to(self.transform.device, non_blocking=True).long()
            yield self.transform(images, epoch, batch), labels

    @abstractmethod
    def uint8_batches(
        self, epoch: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 (N, 3, S, S) crops and labels of batches `start_batch`, ... of `epoch`, as the
        workers deliver them (not yet flipped or augmented)."""


def check_labels(data: Loader | FileSummary, num_classes: int, split: str) -> None:
    """UserError naming `split` and the data unless every label of `data` (a loader or an FFCV
    file's summary) is a class of a model with `num_classes` classes. Call it before training."""
    source = data.source
    low, high = data.label_range
    if low < 0 or high >= num_classes:
        raise UserError(
            f"{split} data {source}: labels run from {low} to {high}, outside the model's "
            f"{num_classes} classes (0..{num_classes - 1}): use data with the training classes "
            "or set data.num_classes"
        )
    if data.num_classes > num_classes:
        raise UserError(
            f"{split} data {source}: has {data.num_classes} classes, the model {num_classes}: "
            "use data with the training classes or set data.num_classes"
        )


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
        self.source = "synthetic data"
        self.num_classes = num_classes
        generator = torch.Generator().manual_seed(plan.seed)
        pool = min(self.pool_size, plan.num_samples)
        images = torch.randint(
            0, 256, (pool, 3, image_size, image_size), dtype=torch.uint8, generator=generator
        )
        self.images = images.to(transform.device)
        self.labels = torch.randint(0, num_classes, (plan.num_samples,), generator=generator)
        self.label_range = (int(self.labels.min()), int(self.labels.max()))

    def uint8_batches(
        self, epoch: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = torch.from_numpy(self.epoch_indices(epoch, start_batch))
        for start in range(0, len(indices), self.batch_size):
            batch = indices[start : start + self.batch_size]
            yield self.images[(batch % len(self.images)).to(self.images.device)], self.labels[batch]


def _collate_uint8(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack uint8 image tensors and labels into one batch."""
    images = torch.stack([image for image, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return images, labels


class _EpochSamples(Dataset):
    """A source read by `(epoch, index)` keys: `transform(image, epoch, index)` and the label."""

    def __init__(
        self, dataset: Dataset, transform: Callable[[Image.Image, int, int], torch.Tensor]
    ):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        image, label = self.dataset[index]
        return self.transform(image, epoch, index), label


@dataclass(frozen=True)
class _SeededRandomResizedCrop:
    """PIL -> uint8 tensor: a random resized crop drawn from (seed, epoch, sample index)."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    seed: int

    def __call__(self, image: Image.Image, epoch: int, index: int) -> torch.Tensor:
        uniforms = crop_uniforms(self.seed, epoch, index)
        top, left, height, width = random_crop_box(
            image.height, image.width, self.scale, self.ratio, uniforms
        )
        crop = TF.resized_crop(image, top, left, height, width, [self.size, self.size])
        return TF.pil_to_tensor(crop)


@dataclass(frozen=True)
class CentreCrop:
    """PIL -> uint8 tensor: resize the shorter side to size / crop_ratio (`interpolation`, with
    antialiasing), crop the centre: the evaluation transform of the torchvision backend, and of
    `debiformer predict` (which takes the interpolation a model's weights were trained with)."""

    size: int
    crop_ratio: float
    interpolation: str = "bilinear"

    def __call__(self, image: Image.Image, epoch: int = 0, index: int = 0) -> torch.Tensor:
        mode = TF.InterpolationMode(self.interpolation)
        image = TF.resize(image, round(self.size / self.crop_ratio), interpolation=mode)
        return TF.pil_to_tensor(TF.center_crop(image, self.size))


class TorchvisionLoader(Loader):
    """A torch DataLoader over an ImageFolder or Fashion-MNIST, PIL crops in the workers."""

    def __init__(
        self,
        source: str,
        dataset: Dataset,
        plan: ShardPlan,
        batch_size: int,
        drop_last: bool,
        transform: DeviceBatchTransform,
        crop: Callable[[Image.Image, int, int], torch.Tensor],
        num_workers: int,
    ):
        super().__init__(plan, batch_size, drop_last, transform)
        self.source = source
        self.num_classes = len(dataset.classes)
        self.label_range = (int(min(dataset.targets)), int(max(dataset.targets)))
        self.reader = WorkerReader(
            _EpochSamples(dataset, crop),
            batch_size,
            num_workers,
            _collate_uint8,
            plan.seed,
            pin_memory=transform.device.type == "cuda",
        )

    def uint8_batches(
        self, epoch: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.reader.read(epoch, self.epoch_indices(epoch, start_batch))


def _ffcv_order(indices: np.ndarray):
    """An FFCV traversal order reading the samples in its `indices` attribute, set before each pass
    (FFCV's own distributed order repeats samples to even out the ranks, which would count some
    twice in evaluation)."""
    from ffcv.traversal_order.base import TraversalOrder

    class ShardOrder(TraversalOrder):
        """FFCV calls the order it is given with the loader; this one needs nothing from it."""

        def __init__(self):
            self.indices = indices.astype(np.uint64)

        def __call__(self, loader) -> ShardOrder:
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return self.indices

    return ShardOrder()


class FfcvLoader(Loader):
    """An FFCV loader: decode and crop in compiled threads, uint8 straight to the device.
    On the CPU the uint8 batches are FFCV's own buffers, reused a few batches later (the
    normalised batches of `batches` are new tensors)."""

    def __init__(
        self,
        summary: FileSummary,
        plan: ShardPlan,
        batch_size: int,
        drop_last: bool,
        transform: DeviceBatchTransform,
        num_workers: int,
        pipelines: dict,
        crop: SeededRandomResizedCrop | None,
    ):
        super().__init__(plan, batch_size, drop_last, transform)
        ffcv = import_ffcv()
        self.source = str(summary.path)
        self.num_classes = summary.num_classes
        self.label_range = summary.label_range
        self.order = _ffcv_order(plan.indices(0))
        self.crop = crop
        self.loader = ffcv.loader.Loader(
            str(summary.path),
            batch_size=batch_size,
            num_workers=max(num_workers, 1),
            order=self.order,
            drop_last=drop_last,
            pipelines=pipelines,
            seed=plan.seed,
        )

    def uint8_batches(
        self, epoch: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.epoch_indices(epoch, start_batch)
        if len(indices) == 0:
            return iter(())
        self.order.indices = indices.astype(np.uint64)
        if self.crop is not None:
            self.crop.set_epoch(self.plan.seed, epoch)
        return iter(self.loader)


def _ffcv_pipelines(
    train: bool, image_size: int, crop_ratio: float, augment: AugmentOptions, device: torch.device
) -> tuple[dict, SeededRandomResizedCrop | None]:
    """Fresh FFCV image and label pipelines (decoder objects cannot be shared between loaders),
    and their random crop decoder (train) whose epoch the loader sets."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

    from debiformer.data.ffcv_ops import SeededRandomResizedCrop

    size = (image_size, image_size)
    crop = None
    if train:
        crop = SeededRandomResizedCrop(size, scale=augment.scale, ratio=augment.ratio)
        image = [crop]
    else:
        image = [CenterCropRGBImageDecoder(size, ratio=crop_ratio)]
    image += [ToTensor()]
    label = [IntDecoder(), ToTensor(), Squeeze(1)]
    if device.type != "cpu":
        image.append(ToDevice(device, non_blocking=True))
        label.append(ToDevice(device, non_blocking=True))
    image.append(ToTorchImage())
    return {"image": image, "label": label}, crop


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
    augment: AugmentOptions | None = None,
    crop_ratio: float = 0.875,
    num_classes: int | None = None,
    synthetic_samples: int = 1024,
) -> Loader:
    """A loader of `split` ("train" or "val") from `backend` ("ffcv", "torchvision" or "synthetic").

    `path`: an FFCV file (ffcv), an ImageFolder root or "fashion-mnist:<dir>" (torchvision;
    train reads the Fashion-MNIST train split, val the test split), None (synthetic).
    Train: random resized crop to `image_size`, then on the device flip and the rest of
    `augment` (the defaults of `AugmentOptions` when None); the last partial batch is dropped.
    Val: resize to image_size/crop_ratio, centre crop, every sample once.
    `distributed`: read this process's shard of the samples (the rank and world size of the
    torch.distributed process group); otherwise all of them.
    """
    _check_settings(split, backend, path, batch_size, image_size, num_classes)
    device = torch.device(device)
    train = split == "train"
    options = augment or AugmentOptions()
    rank, world_size = runtime.rank_and_world() if distributed else (0, 1)
    transform = DeviceBatchTransform(device, options if train else None, seed, rank)

    def plan_for(num_samples: int) -> ShardPlan:
        return ShardPlan(num_samples, shuffle=train, seed=seed, rank=rank, world_size=world_size)

    if backend == "synthetic":
        return SyntheticLoader(
            plan_for(synthetic_samples), batch_size, train, transform, image_size, num_classes
        )
    if backend == "torchvision":
        dataset = open_source(path, "train" if train else "test")
        if train:
            crop = _SeededRandomResizedCrop(image_size, options.scale, options.ratio, seed)
        else:
            crop = CentreCrop(image_size, crop_ratio)
        return TorchvisionLoader(
            str(path), dataset, plan_for(len(dataset)), batch_size, train, transform, crop,
            num_workers,
        )  # fmt: skip
    summary = ffcv_summary(Path(path))
    pipelines, crop = _ffcv_pipelines(train, image_size, crop_ratio, options, device)
    plan = plan_for(summary.num_samples)
    return FfcvLoader(summary, plan, batch_size, train, transform, num_workers, pipelines, crop)


def _check_settings(
    split: str,
    backend: str,
    path: str | None,
    batch_size: int,
    image_size: int,
    num_classes: int | None,
) -> None:
    """One-line errors for settings no loader can be built from (before any data is read)."""
    if split not in ("train", "val"):
        raise UserError(f"unknown split {split!r}: use train or val")
    if backend not in BACKENDS:
        raise UserError(f"unknown data backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if batch_size < 1 or image_size < 1:
        raise UserError(
            f"batch size and image size must be positive, got {batch_size} and {image_size}"
        )
    if backend == "synthetic":
        if not num_classes:
            raise UserError(
                "the synthetic backend needs num_classes (data.num_classes in the recipe)"
            )
        return
    if not path:
        raise UserError(
            f"the {backend} backend needs a data path (data.{split}_path in the recipe)"
        )
    if backend == "ffcv":
        import_ffcv()
        if Path(path).is_dir() or str(path).startswith(FASHION_MNIST_PREFIXES):
            raise UserError(
                f"the ffcv backend reads a .beton file, not {path}: convert it with "
                f"`debiformer data convert {path} OUT.beton` or set data.backend: torchvision"
            )
