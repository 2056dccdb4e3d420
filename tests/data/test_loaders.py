"""Loaders: both backends' pixels and labels, sharding, reproducible, resumable epochs, and the
one meaning of epoch and start batch (`EpochLoader`) that every loader shares.

Run as a script under torchrun, this file is the 2-rank sharding worker of `test_torchrun_sharding`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from debiformer import runtime
from debiformer.data import EpochLoader, ShardPlan, check_labels, read_fashion_mnist
from debiformer.data.loaders import AugmentOptions, KeyedLoader
from debiformer.errors import UserError
from tests.data.common import (
    FASHION,
    FASHION_MNIST_DIR,
    NORMALISED_RANGE,
    labels_of,
    make_loader,
    needs_fashion_mnist,
    pixels,
    write_idx_folder,
)
from tests.helpers.cli import free_port

# FFCV compiles its pipelines on first use in each process: seconds per loader
SLOW_FFCV = pytest.param("ffcv", marks=pytest.mark.slow)
EVERY_AUGMENTATION = AugmentOptions(
    hflip=0.5, scale=(0.25, 1.0), randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.5
)


@pytest.mark.slow
@needs_fashion_mnist
def test_fashion_mnist_both_loaders_return_the_source_pixels_and_labels(fashion_ffcv):
    images, labels = read_fashion_mnist(FASHION_MNIST_DIR, "test")
    ffcv = make_loader("val", "ffcv", fashion_ffcv.path, size=28, batch=100, crop_ratio=1.0)
    torchvision = make_loader("val", "torchvision", FASHION, size=28, batch=100, crop_ratio=1.0)
    assert (ffcv.num_samples, ffcv.num_classes, len(ffcv)) == (300, 10, 3)
    assert (torchvision.num_samples, torchvision.num_classes) == (10000, 10)
    ffcv_images, ffcv_labels = next(iter(ffcv))
    tv_images, tv_labels = next(iter(torchvision))
    for batch, batch_labels, indices in (
        (ffcv_images, ffcv_labels, fashion_ffcv.indices[:100]),
        (tv_images, tv_labels, np.arange(100)),
    ):
        assert batch.shape == (100, 3, 28, 28) and batch.dtype == torch.float32
        assert batch_labels.dtype == torch.int64
        assert batch_labels.tolist() == labels[indices].tolist()
        expected = torch.from_numpy(images[indices]).float()[:, None].expand(-1, 3, -1, -1)
        assert torch.allclose(pixels(batch), expected, atol=0.01)


@pytest.mark.slow
@needs_fashion_mnist
def test_fashion_mnist_train_loaders_upscale_to_three_channel_crops(fashion_ffcv):
    for loader in (
        make_loader("train", "ffcv", fashion_ffcv.path, batch=64),
        make_loader("train", "torchvision", FASHION, batch=64),
    ):
        images, labels = next(iter(loader))
        assert images.shape == (64, 3, 32, 32) and labels.shape == (64,)
        image_pixels = pixels(images)
        assert torch.allclose(image_pixels[:, 0], image_pixels[:, 1], atol=0.01)
        assert torch.allclose(image_pixels[:, 0], image_pixels[:, 2], atol=0.01)
        assert labels.min() >= 0 and labels.max() <= 9


@pytest.mark.slow
def test_photo_folder_both_loaders_agree(photos, photos_ffcv):
    ffcv = make_loader("val", "ffcv", photos_ffcv, batch=30)
    torchvision = make_loader("val", "torchvision", photos, batch=30)
    (ffcv_images, ffcv_labels), (tv_images, tv_labels) = next(iter(ffcv)), next(iter(torchvision))
    assert ffcv_labels.tolist() == tv_labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    assert ffcv_images.shape == tv_images.shape == (30, 3, 32, 32)
    assert ffcv_images.dtype == tv_images.dtype == torch.float32
    for images in (ffcv_images, tv_images):
        assert NORMALISED_RANGE[0] <= images.min() and images.max() <= NORMALISED_RANGE[1]
    # same centre crop of the same photo, up to JPEG re-encoding and resize filters
    assert (pixels(ffcv_images) - pixels(tv_images)).abs().mean() < 12


def test_both_backends_crop_the_same_boxes_of_the_same_samples(photos, photos_ffcv):
    """Crops are drawn per (seed, epoch, sample) with the same algorithm; the backends differ in
    their random streams, so only the statistics of their crops agree. With the whole image as
    the only possible crop, they agree image by image."""
    whole = AugmentOptions(scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), hflip=0.0)
    ffcv = make_loader("train", "ffcv", photos_ffcv, augment=whole)
    torchvision = make_loader("train", "torchvision", photos, augment=whole)
    for (ffcv_images, ffcv_labels), (tv_images, tv_labels) in zip(ffcv, torchvision, strict=True):
        assert torch.equal(ffcv_labels, tv_labels)
        assert (pixels(ffcv_images) - pixels(tv_images)).abs().mean() < 12


def test_an_ffcv_loader_leaves_torchs_thread_count_as_it_was(photos_ffcv):
    """FFCV's compiler sets torch's thread count to a loader's worker count: one process with
    fewer workers than cores lost threads, and two processes on two cores got two each."""
    threads = torch.get_num_threads()
    workers = 1 if threads > 1 else 2
    next(iter(make_loader("train", "ffcv", photos_ffcv, workers=workers)))
    assert torch.get_num_threads() == threads


def test_an_ffcv_loader_with_more_workers_than_cores_reads(photos_ffcv):
    """A recipe's worker count above the machine's cores (a server's recipe on a laptop) gives
    FFCV's pipeline as many threads as there are cores; FFCV stopped with numba's ValueError."""
    import numba

    workers = numba.config.NUMBA_NUM_THREADS + 2
    images, labels = next(iter(make_loader("train", "ffcv", photos_ffcv, workers=workers)))
    assert images.shape == (8, 3, 32, 32) and labels.shape == (8,)


def test_train_loaders_crop_flip_and_drop_the_partial_batch(photos, photos_ffcv):
    for loader in (
        make_loader("train", "ffcv", photos_ffcv),
        make_loader("train", "torchvision", photos),
    ):
        assert len(loader) == 3
        batches = list(loader)
        assert [len(labels) for _, labels in batches] == [8, 8, 8]
        assert all(images.shape == (8, 3, 32, 32) for images, _ in batches)
        assert len(set(labels_of(loader))) == 3


@pytest.mark.parametrize("backend", ["torchvision", "ffcv", "synthetic"])
def test_order_is_a_function_of_seed_and_epoch(backend, photos, photos_ffcv):
    path = {"torchvision": photos, "ffcv": photos_ffcv, "synthetic": None}[backend]
    loader = make_loader(
        "train", backend, path, size=16, batch=4, seed=3, num_classes=3, synthetic_samples=30
    )
    first = labels_of(loader.batches(5))
    assert labels_of(loader.batches(6)) != first
    assert labels_of(loader.batches(5)) == first


def _copies(batches) -> list[tuple[torch.Tensor, ...]]:
    """Copies of `batches`, tuples of tensors (FFCV reuses its buffers)."""
    return [tuple(tensor.clone() for tensor in batch) for batch in batches]


def _batches(loader, epoch: int, start_batch: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Copies of the batches `start_batch`, ... of `epoch`."""
    return _copies(loader.batches(epoch, start_batch))


def _same(batches, others) -> bool:
    """True if two lists of batches are bit-identical."""
    return len(batches) == len(others) and all(
        len(batch) == len(other) and all(map(torch.equal, batch, other))
        for batch, other in zip(batches, others, strict=True)
    )


def _train_loaders(backend, photos, photos_ffcv, workers=(1, 2), **kwargs):
    """Two train loaders with every augmentation on, built apart, with `workers` workers."""
    path = {"torchvision": photos, "ffcv": photos_ffcv, "synthetic": None}[backend]
    return [
        make_loader(
            "train",
            backend,
            path,
            batch=6,
            workers=count,
            augment=EVERY_AUGMENTATION,
            num_classes=3,
            synthetic_samples=30,
            **kwargs,
        )  # fmt: skip
        for count in workers
    ]


@pytest.mark.parametrize("backend", [SLOW_FFCV, "torchvision", "synthetic"])
def test_same_seed_gives_bit_identical_batches_whatever_the_worker_count(
    backend, photos, photos_ffcv
):
    first, second = _train_loaders(backend, photos, photos_ffcv)
    batches = _batches(first, 2)
    assert len(batches) == 5 and _same(batches, _batches(second, 2))
    assert _same(batches, _batches(first, 2))


@pytest.mark.parametrize("backend", [SLOW_FFCV, "torchvision", "synthetic"])
def test_an_epoch_started_at_batch_k_yields_the_batches_from_k(backend, photos, photos_ffcv):
    loader, resumed = _train_loaders(backend, photos, photos_ffcv)
    whole = _batches(loader, 4)
    for start in (1, 3, 5):
        assert _same(_batches(resumed, 4, start), whole[start:])
    assert _same(_batches(loader, 4, 3), whole[3:])
    with pytest.raises(UserError, match="start batch 6 is outside the 5 batches"):
        resumed.batches(4, 6)


class _Keys(Dataset):
    """30 samples, each the `(epoch, index)` key it was read by."""

    def __len__(self) -> int:
        return 30

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        return torch.tensor(key)


def _indices_and_epochs(batch: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A batch of `_Keys` as (sample indices, epochs) on `device`."""
    return batch[:, 1].to(device), batch[:, 0].to(device)


def _protocol_loader(backend: str, split: str, photos, photos_ffcv):
    """A loader of 30 samples in batches of 8 from `backend` ("keyed": a `KeyedLoader`)."""
    if backend == "keyed":
        return KeyedLoader(
            _Keys(),
            source="keys",
            batch_size=8,
            train=split == "train",
            device=torch.device("cpu"),
            num_workers=0,
            seed=3,
            collate=torch.stack,
            to_device=_indices_and_epochs,
        )
    path = {"torchvision": photos, "ffcv": photos_ffcv, "synthetic": None}[backend]
    augment = EVERY_AUGMENTATION if split == "train" else None
    return make_loader(
        split, backend, path, size=16, seed=3, augment=augment, num_classes=3, synthetic_samples=30
    )


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("backend", [SLOW_FFCV, "torchvision", "synthetic", "keyed"])
def test_every_loader_gives_epoch_and_start_batch_one_meaning(backend, split, photos, photos_ffcv):
    """`batches(epoch, k)` is the tail from k of `batches(epoch)` whatever was read before,
    `iter(loader)` is always `batches(0)`, and only training batches depend on the epoch."""
    loader = _protocol_loader(backend, split, photos, photos_ffcv)
    assert isinstance(loader, EpochLoader)
    whole = _batches(loader, 4)
    assert len(whole) == len(loader) == (3 if split == "train" else 4)
    for start in range(len(loader), -1, -1):
        assert _same(_batches(loader, 4, start), whole[start:])
    first_pass = _copies(loader)
    assert _same(first_pass, _copies(loader)) and _same(first_pass, _batches(loader, 0))
    with pytest.raises(UserError, match=f"start batch 5 is outside the {len(loader)} batches"):
        loader.batches(4, 5)
    if backend != "keyed":
        assert _same(_batches(loader, 5), whole) == (split == "val")
        return
    plan = ShardPlan(30, shuffle=split == "train", seed=3)
    for epoch in (4, 5):  # the batches of `_Keys` show what was read: the plan's order, `epoch`
        batches = _batches(loader, epoch)
        indices, epochs = (torch.cat(column).tolist() for column in zip(*batches, strict=True))
        assert indices == plan.indices(epoch)[: len(indices)].tolist() and set(epochs) == {epoch}


@pytest.mark.parametrize("backend", [SLOW_FFCV, "torchvision"])
def test_epochs_and_ranks_draw_differently(backend, photos, photos_ffcv, monkeypatch):
    """Same samples in the same order: only the draws of the epoch or the rank differ."""
    loader, _ = _train_loaders(backend, photos, photos_ffcv)
    monkeypatch.setattr(ShardPlan, "indices", lambda plan, epoch: np.arange(plan.num_samples))
    epoch_0, epoch_1 = _batches(loader, 0), _batches(loader, 1)
    monkeypatch.setattr(runtime, "rank_and_world", lambda: (1, 1))
    (rank_1,) = _train_loaders(backend, photos, photos_ffcv, workers=(1,), distributed=True)
    for other in (epoch_1, _batches(rank_1, 0)):
        for (images, labels), (other_images, other_labels) in zip(epoch_0, other, strict=True):
            assert torch.equal(labels, other_labels) and not torch.equal(images, other_images)


def test_check_labels_names_the_split_and_the_data(tmp_path):
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    folder = write_idx_folder(tmp_path / "idx", images, np.array([0, 3, 11, 2]))
    loader = make_loader("val", "torchvision", f"fashion-mnist:{folder}", batch=2)
    assert loader.label_range == (0, 11)
    with pytest.raises(UserError, match=r"^val data fashion-mnist:.*idx: labels run from 0 to 11"):
        check_labels(loader, 10, "val")
    check_labels(loader, 12, "val")
    synthetic = make_loader("train", "synthetic", None, num_classes=5)
    check_labels(synthetic, 5, "train")
    with pytest.raises(UserError, match="train data synthetic data: labels run from 0 to 4"):
        check_labels(synthetic, 4, "train")


def test_class_count_messages_name_the_recipe_key(tmp_path):
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    folder = write_idx_folder(tmp_path / "idx", images, np.array([0, 3, 1, 2]))
    loader = make_loader("val", "torchvision", f"fashion-mnist:{folder}", batch=2)
    with pytest.raises(UserError, match="labels run from 0 to 3.* or set data.num_classes$"):
        check_labels(loader, 3, "val")
    with pytest.raises(UserError, match="has 10 classes, the model 5.* or set data.num_classes$"):
        check_labels(loader, 5, "val")
    with pytest.raises(UserError, match=r"needs num_classes \(data.num_classes in the recipe\)"):
        make_loader("train", "synthetic", None)


def test_shard_plan_is_disjoint_and_complete():
    for world in (2, 3):
        train = [
            ShardPlan(31, shuffle=True, seed=1, rank=r, world_size=world).indices(4)
            for r in range(world)
        ]
        assert len({len(shard) for shard in train}) == 1
        assert len(np.unique(np.concatenate(train))) == 31 // world * world
        val = [
            ShardPlan(31, shuffle=False, seed=1, rank=r, world_size=world).indices(4)
            for r in range(world)
        ]
        assert sorted(np.concatenate(val).tolist()) == list(range(31))


@pytest.mark.slow
def test_torchrun_sharding(tmp_path, one_per_class):
    folder, _ = one_per_class
    result = tmp_path / "shards.json"
    command = [
        Path(sys.executable).parent / "torchrun",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        __file__,
        str(folder),
        str(result),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    subprocess.run(command, check=True, env=env, timeout=120, capture_output=True)
    shards = json.loads(result.read_text())
    rank0, rank1 = shards["val"]
    assert sorted(rank0 + rank1) == list(range(10)) and not set(rank0) & set(rank1)
    rank0, rank1 = shards["train"]
    assert len(rank0) == len(rank1) == 4 and not set(rank0) & set(rank1)


@pytest.mark.slow
def test_ffcv_eval_shards_read_every_sample_once(one_per_class, monkeypatch):
    """FFCV pipelines take seconds to compile per process, so its two ranks run in this one; the
    rank and world size come from torch.distributed exactly as in the torchrun test. (FFCV's own
    distributed order would pad the ranks with repeated samples.)"""
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(runtime, "rank_and_world", lambda rank=rank: (rank, 2))
        loader = make_loader("val", "ffcv", one_per_class[1], batch=2, distributed=True)
        shards.append(labels_of(loader))
    assert sorted(shards[0] + shards[1]) == list(range(10)) and not set(shards[0]) & set(shards[1])


def test_bad_input_is_a_user_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        make_loader("train", "torchvision", tmp_path / "missing")
    with pytest.raises(UserError, match="data convert"):
        make_loader("train", "ffcv", tmp_path / "missing.beton")
    with pytest.raises(UserError, match="unknown RandAugment"):
        make_loader(
            "train", "synthetic", None, num_classes=2, augment=AugmentOptions(randaugment="rand-q9")
        )
    monkeypatch.setitem(sys.modules, "ffcv", None)
    with pytest.raises(UserError, match="data.backend: torchvision"):
        make_loader("train", "ffcv", tmp_path / "missing.beton")


def _shard_worker(folder: str, result: str) -> None:
    """torchrun entry: each rank reads epoch 0 of both splits; rank 0 writes every rank's labels."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    shards = {}
    for split in ("train", "val"):
        loader = make_loader(split, "torchvision", folder, size=16, batch=2, distributed=True)
        shards[split] = [None] * dist.get_world_size()
        dist.all_gather_object(shards[split], labels_of(loader))
    if dist.get_rank() == 0:
        Path(result).write_text(json.dumps(shards))
    dist.destroy_process_group()


if __name__ == "__main__":
    _shard_worker(*sys.argv[1:3])
