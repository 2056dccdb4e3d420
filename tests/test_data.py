"""Data layer: sources, FFCV conversion, both loaders, sharding, determinism, device RandAugment.

Run as a script under torchrun, this file is the 2-rank sharding worker of `test_torchrun_sharding`.
"""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from debiformer.augment import RandAugmentConfig, rand_augment_ops
from debiformer.data import (
    FASHION_MNIST_DIR,
    ShardPlan,
    WriterOptions,
    build_loader,
    convert_to_ffcv,
    ensure_ffcv_file,
    ffcv_summary,
    loaders,
    make_photo_folder,
    read_fashion_mnist,
)
from debiformer.errors import UserError

FASHION = "fashion-mnist:" + FASHION_MNIST_DIR
CPU = torch.device("cpu")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
NORMALISED_RANGE = (-2.12, 2.65)  # (0 - max mean) / min std .. (1 - min mean) / min std

needs_fashion_mnist = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(), reason="Fashion-MNIST idx files not installed"
)


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: 0..255 floats."""
    return (images * STD + MEAN) * 255


def _loader(split, backend, path, size=32, batch=8, workers=0, **kwargs):
    return build_loader(
        split,
        backend=backend,
        path=str(path),
        image_size=size,
        batch_size=batch,
        num_workers=workers,
        seed=0,
        device=CPU,
        **kwargs,
    )


def _labels(loader) -> list[int]:
    return [int(label) for _, labels in loader for label in labels]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A 3-class ImageFolder of 30 JPEG crops of real photographs (100x75)."""
    return make_photo_folder(tmp_path_factory.mktemp("photos"), 30, size=(100, 75), num_classes=3)


@pytest.fixture(scope="module")
def photos_ffcv(photos, tmp_path_factory) -> Path:
    """`photos` as an FFCV file, every image stored as JPEG."""
    out = tmp_path_factory.mktemp("ffcv") / "photos.beton"
    return convert_to_ffcv(str(photos), out, WriterOptions(write_mode="jpg", jpeg_quality=95)).path


@pytest.fixture(scope="module")
def fashion_ffcv(tmp_path_factory):
    """300 Fashion-MNIST test images as an FFCV file stored raw, and the conversion record."""
    out = tmp_path_factory.mktemp("ffcv") / "fashion.beton"
    return convert_to_ffcv(FASHION, out, WriterOptions(write_mode="raw", subset=300, split="test"))


@needs_fashion_mnist
def test_fashion_mnist_idx_reader_parses_the_standard_files():
    images, labels = read_fashion_mnist(FASHION_MNIST_DIR, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]
    assert np.bincount(labels).tolist() == [1000] * 10


@needs_fashion_mnist
def test_fashion_mnist_both_loaders_return_the_source_pixels_and_labels(fashion_ffcv):
    images, labels = read_fashion_mnist(FASHION_MNIST_DIR, "test")
    ffcv = _loader("val", "ffcv", fashion_ffcv.path, size=28, batch=100, crop_ratio=1.0)
    torchvision = _loader("val", "torchvision", FASHION, size=28, batch=100, crop_ratio=1.0)
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
        assert torch.allclose(_pixels(batch), expected, atol=0.01)


@needs_fashion_mnist
def test_fashion_mnist_train_loaders_upscale_to_three_channel_crops(fashion_ffcv):
    for loader in (
        _loader("train", "ffcv", fashion_ffcv.path, batch=64),
        _loader("train", "torchvision", FASHION, batch=64),
    ):
        images, labels = next(iter(loader))
        assert images.shape == (64, 3, 32, 32) and labels.shape == (64,)
        pixels = _pixels(images)
        assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=0.01)
        assert torch.allclose(pixels[:, 0], pixels[:, 2], atol=0.01)
        assert labels.min() >= 0 and labels.max() <= 9


def test_photo_folder_both_loaders_agree(photos, photos_ffcv):
    summary = ffcv_summary(photos_ffcv)
    assert (summary.num_samples, summary.class_counts) == (30, [10, 10, 10])
    assert summary.width_range == (100, 100) and summary.height_range == (75, 75)
    assert summary.jpeg_fraction == 1.0
    ffcv = _loader("val", "ffcv", photos_ffcv, batch=30)
    torchvision = _loader("val", "torchvision", photos, batch=30)
    (ffcv_images, ffcv_labels), (tv_images, tv_labels) = next(iter(ffcv)), next(iter(torchvision))
    assert ffcv_labels.tolist() == tv_labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    assert ffcv_images.shape == tv_images.shape == (30, 3, 32, 32)
    assert ffcv_images.dtype == tv_images.dtype == torch.float32
    for images in (ffcv_images, tv_images):
        assert NORMALISED_RANGE[0] <= images.min() and images.max() <= NORMALISED_RANGE[1]
    # same centre crop of the same photo, up to JPEG re-encoding and resize filters
    assert (_pixels(ffcv_images) - _pixels(tv_images)).abs().mean() < 12


def test_train_loaders_crop_flip_and_drop_the_partial_batch(photos, photos_ffcv):
    for loader in (_loader("train", "ffcv", photos_ffcv), _loader("train", "torchvision", photos)):
        assert len(loader) == 3
        batches = list(loader)
        assert [len(labels) for _, labels in batches] == [8, 8, 8]
        assert all(images.shape == (8, 3, 32, 32) for images, _ in batches)
        assert len(set(_labels(loader))) == 3


def test_ffcv_train_flip_mirrors_the_chosen_images(photos_ffcv):
    """The in-place flip: with every image chosen, the crops come out mirrored, labels unchanged."""
    whole_photo = {"scale": (1.0, 1.0), "ratio": (4 / 3, 4 / 3)}
    plain = _loader("train", "ffcv", photos_ffcv, augment={**whole_photo, "hflip": 0.0})
    flipped = _loader("train", "ffcv", photos_ffcv, augment={**whole_photo, "hflip": 1.0})
    batches = 0
    for (images, labels), (mirrored, same_labels) in zip(
        plain.uint8_batches(0), flipped.uint8_batches(0), strict=True
    ):
        assert torch.equal(same_labels, labels)
        assert torch.equal(mirrored, images.flip(-1))
        assert not torch.equal(mirrored, images)
        batches += 1
    assert batches == 3


@pytest.mark.parametrize("backend", ["torchvision", "ffcv", "synthetic"])
def test_order_is_a_function_of_seed_and_epoch(backend, photos, photos_ffcv):
    path = {"torchvision": photos, "ffcv": photos_ffcv, "synthetic": None}[backend]
    loader = build_loader(
        "train",
        backend=backend,
        path=str(path) if path else None,
        image_size=16,
        batch_size=4,
        num_workers=0,
        seed=3,
        device=CPU,
        num_classes=3,
        synthetic_samples=30,
    )
    loader.set_epoch(5)
    first = _labels(loader)
    loader.set_epoch(6)
    other = _labels(loader)
    loader.set_epoch(5)
    assert _labels(loader) == first != other


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


@pytest.fixture(scope="module")
def one_per_class(tmp_path_factory) -> tuple[Path, Path]:
    """An ImageFolder of 10 photos, one per class, so labels name samples; and its FFCV file."""
    root = tmp_path_factory.mktemp("one_per_class")
    folder = make_photo_folder(root / "folder", 10, size=(40, 30), num_classes=10)
    return folder, convert_to_ffcv(
        str(folder), root / "ffcv.beton", WriterOptions(write_mode="raw")
    ).path


def test_torchrun_sharding(tmp_path, one_per_class):
    folder, _ = one_per_class
    result = tmp_path / "shards.json"
    command = [
        Path(sys.executable).parent / "torchrun",
        "--nproc_per_node=2",
        "--master_port=29531",
        __file__,
        str(folder),
        str(result),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    subprocess.run(command, check=True, env=env, timeout=120, capture_output=True)
    shards = json.loads(result.read_text())
    rank0, rank1 = shards["val"]
    assert sorted(rank0 + rank1) == list(range(10)) and not set(rank0) & set(rank1)
    rank0, rank1 = shards["train"]
    assert len(rank0) == len(rank1) == 4 and not set(rank0) & set(rank1)


def test_ffcv_eval_shards_read_every_sample_once(one_per_class, monkeypatch):
    """FFCV pipelines take seconds to compile per process, so its two ranks run in this one; the
    rank and world size come from torch.distributed exactly as in the torchrun test. (FFCV's own
    distributed order would pad the ranks with repeated samples.)"""
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(loaders, "_rank_and_world", lambda distributed, rank=rank: (rank, 2))
        shards.append(_labels(_loader("val", "ffcv", one_per_class[1], batch=2, distributed=True)))
    assert sorted(shards[0] + shards[1]) == list(range(10)) and not set(shards[0]) & set(shards[1])


def _corrupt_folder(photos: Path, out: Path) -> Path:
    """A copy of two classes of `photos` with one JPEG cut in half."""
    for class_dir in sorted(photos.iterdir())[:2]:
        (out / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:3]:
            (out / class_dir.name / image.name).write_bytes(image.read_bytes())
    bad = sorted((out / sorted(os.listdir(out))[1]).iterdir())[0]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    return bad


def test_corrupt_image_stops_by_default_and_is_skipped_on_request(photos, tmp_path, capsys):
    bad = _corrupt_folder(photos, tmp_path / "folder")
    out = tmp_path / "out.beton"
    with pytest.raises(UserError, match=str(bad)):
        convert_to_ffcv(str(tmp_path / "folder"), out)
    assert not out.exists()
    conversion = convert_to_ffcv(str(tmp_path / "folder"), out, WriterOptions(on_bad_image="skip"))
    assert conversion.skipped == [str(bad)]
    assert str(bad) in capsys.readouterr().err
    assert ffcv_summary(out).class_counts == [3, 2]


def _convert_in_new_session(out: Path) -> None:
    """Child process: convert all Fashion-MNIST training images, in a process group of its own."""
    os.setsid()
    convert_to_ffcv(FASHION, out, WriterOptions(write_mode="jpg", num_workers=1))


def test_interrupted_conversion_leaves_no_file(tmp_path):
    out = tmp_path / "fashion.beton"
    writer = multiprocessing.get_context("fork").Process(
        target=_convert_in_new_session, args=(out,)
    )
    writer.start()
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("fashion.beton.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    os.killpg(writer.pid, signal.SIGKILL)
    writer.join()
    assert list(tmp_path.glob("fashion.beton.partial-*")), "the conversion never started"
    assert not out.exists()
    ensured = ensure_ffcv_file(FASHION, out, subset=50, write_mode="raw")
    assert ffcv_summary(ensured).num_samples == 50
    stamp = out.stat().st_mtime_ns
    ensure_ffcv_file(FASHION, out, subset=50, write_mode="raw")
    assert out.stat().st_mtime_ns == stamp


def test_ensure_refuses_a_file_that_is_not_ffcv(tmp_path):
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match="not an FFCV"):
        ensure_ffcv_file(FASHION, junk)


def test_bad_input_is_a_user_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        _loader("train", "torchvision", tmp_path / "missing")
    with pytest.raises(UserError, match="data convert"):
        _loader("train", "ffcv", tmp_path / "missing.beton")
    with pytest.raises(UserError, match="unknown augment"):
        _loader("train", "synthetic", None, num_classes=2, augment={"flip": 0.5})
    with pytest.raises(UserError, match="unknown RandAugment"):
        _loader("train", "synthetic", None, num_classes=2, augment={"randaugment": "rand-q9"})
    monkeypatch.setitem(sys.modules, "ffcv", None)
    with pytest.raises(UserError, match="data.backend: torchvision"):
        _loader("train", "ffcv", tmp_path / "missing.beton")


def test_device_augmentations_change_images_inside_the_normalised_range():
    plain = _loader("train", "synthetic", None, num_classes=2)
    augmented = _loader(
        "train",
        "synthetic",
        None,
        num_classes=2,
        augment={"randaugment": "rand-m9-mstd0.5-inc1", "random_erasing": 1.0},
    )
    (clean, _), (changed, _) = next(iter(plain)), next(iter(augmented))
    assert clean.shape == changed.shape and changed.dtype == torch.float32
    assert not torch.equal(clean, changed)
    assert NORMALISED_RANGE[0] <= clean.min() and clean.max() <= NORMALISED_RANGE[1]


def test_cli_convert_inspect_and_bench(photos, tmp_path):
    from typer.testing import CliRunner

    from cli.data import app

    runner = CliRunner()
    out = tmp_path / "photos.beton"
    converted = runner.invoke(app, ["convert", str(photos), str(out), "--write-mode", "jpg"])
    assert converted.exit_code == 0, converted.output
    inspected = runner.invoke(app, ["inspect", str(out)])
    assert inspected.exit_code == 0 and "30 samples, 3 classes" in inspected.output
    assert "width 100-100, height 75-75" in inspected.output
    result = tmp_path / "bench.json"
    args = ["bench", str(photos), "--image-size", "32", "--batch-size", "10", "--workers", "0"]
    benched = runner.invoke(app, [*args, "--ffcv-file", str(out), "--json", str(result)])
    assert benched.exit_code == 0, benched.output
    numbers = json.loads(result.read_text())
    assert numbers["num_images"] == 30 and numbers["speedup"] > 0 and numbers["uint8_speedup"] > 0


def test_rand_augment_spec_parses_like_timm():
    config = RandAugmentConfig.parse("rand-m9-mstd0.5-inc1")
    assert (config.magnitude, config.magnitude_std, config.increasing, config.num_ops) == (
        9,
        0.5,
        True,
        2,
    )


@pytest.mark.parametrize("increasing", [True, False])
def test_device_rand_augment_ops_match_timm_on_a_photograph(increasing, monkeypatch):
    import skimage.data
    import timm.data.auto_augment as timm_aa
    from PIL import Image

    monkeypatch.setattr(timm_aa, "_randomly_negate", lambda value: value)
    photo = Image.fromarray(skimage.data.chelsea()).resize((96, 64))
    batch = torch.from_numpy(np.asarray(photo)).permute(2, 0, 1)[None]
    increasing_names = {"Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"}
    for name, op in rand_augment_ops(increasing).items():
        timm_name = name + ("Increasing" if increasing and name in increasing_names else "")
        reference = timm_aa.AugmentOp(
            timm_name,
            prob=1.0,
            magnitude=9,
            hparams={"img_mean": (124, 116, 104), "interpolation": Image.BILINEAR},
        )
        expected = torch.from_numpy(np.asarray(reference(photo))).permute(2, 0, 1).float()
        result = op(batch, torch.tensor([0.9]), torch.tensor([1.0]))[0].float()
        # pointwise ops match exactly (+-1 rounding), geometric ones differ at a few edge pixels
        assert (result - expected).abs().mean() < 1.0, name


def _shard_worker(folder: str, result: str) -> None:
    """torchrun entry: each rank reads epoch 0 of both splits; rank 0 writes every rank's labels."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    shards = {}
    for split in ("train", "val"):
        loader = _loader(split, "torchvision", folder, size=16, batch=2, distributed=True)
        shards[split] = [None] * dist.get_world_size()
        dist.all_gather_object(shards[split], _labels(loader))
    if dist.get_rank() == 0:
        Path(result).write_text(json.dumps(shards))
    dist.destroy_process_group()


if __name__ == "__main__":
    _shard_worker(*sys.argv[1:3])
