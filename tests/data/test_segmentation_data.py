"""Semantic segmentation data: masks read and checked, the mmsegmentation-style transforms, samples
drawn from (seed, epoch, index) and the loader's batches."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from debiformer.data.segmentation import (
    CategoryBalancedCrop,
    RandomRescale,
    SegmentationData,
    SegmentationLoader,
    SegmentationSamples,
    SegmentationTransform,
    read_class_names,
    read_segmentation_split,
)
from debiformer.errors import UserError
from tests.data.common import CPU, pixels, write_pair

CROP = 32
SMALL = SegmentationTransform(scale=(64, 32), ratio_range=(0.75, 1.5), crop_size=CROP)


def painted(mask: np.ndarray) -> np.ndarray:
    """An RGB image white where `mask` is 1 and black elsewhere, so the image shows the mask."""
    return np.repeat((mask == 1)[..., None] * 255, 3, axis=2)


def blocks(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A mask of classes 0 and 1 in random rectangles, asymmetric so flips and crops show."""
    mask = np.zeros((height, width), np.uint8)
    for _ in range(4):
        top, left = rng.integers(0, height - 4), rng.integers(0, width - 4)
        mask[
            top : top + rng.integers(3, height // 2), left : left + rng.integers(3, width // 2)
        ] = 1
    return mask


def samples(root: Path, transform=SMALL, *, train=True, seed=0, **options) -> SegmentationSamples:
    """The samples of `root/images` and `root/masks`: 2 classes, zero label kept, unless told."""
    options = {"num_classes": 2, "reduce_zero_label": False, **options}
    return SegmentationSamples(
        root / "images", root / "masks", train=train, seed=seed, transform=transform, **options
    )


def split(root: Path, masks: str = "masks", *, train: bool, seed: int = 0) -> SegmentationData:
    """The split of `root/images` and `root/<masks>`: classes background and thing, zero label
    kept."""
    return read_segmentation_split(
        root / "images",
        root / masks,
        class_names=["background", "thing"],
        reduce_zero_label=False,
        train=train,
        transform=SMALL,
        seed=seed,
    )


def unscaled(height: int, width: int) -> SegmentationTransform:
    """The training transform with a rescale that keeps height x width images as they are."""
    return SegmentationTransform(scale=(width, height), ratio_range=(1.0, 1.0), crop_size=CROP)


def seeded(transform, seed: int, *inputs):
    """`transform(*inputs)` with the global torch generator seeded by `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(*inputs)


# ----------------------------------------------------------------------------- class names


def test_read_class_names_takes_a_list_or_the_lines_of_a_file(tmp_path):
    assert read_class_names(["sky", "road"]) == ["sky", "road"]
    path = tmp_path / "classes.txt"
    path.write_text("background\n  shirt \n\ntrouser\n")
    assert (
        read_class_names(path) == read_class_names(str(path)) == ["background", "shirt", "trouser"]
    )


@pytest.mark.parametrize("text", [None, "\n  \n"], ids=["missing", "blank"])
def test_read_class_names_names_the_file_in_one_line(tmp_path, text):
    path = tmp_path / "classes.txt"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError) as error:
        read_class_names(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------- masks


def test_reduce_zero_label_ignores_zero_and_shifts_the_rest(tmp_path):
    mask = np.array([[0, 1, 2], [150, 255, 1]])
    write_pair(tmp_path, "a", np.zeros((2, 3, 3)), mask)
    reduced = samples(tmp_path, train=False, num_classes=150, reduce_zero_label=True)
    _, classes = reduced[0, 0]
    assert classes.dtype == torch.int64
    assert classes.tolist() == [[255, 0, 1], [149, 255, 0]]
    _, kept = samples(tmp_path, train=False, num_classes=151)[0, 0]
    assert kept.tolist() == mask.tolist()


def test_a_palette_mask_gives_its_indices(tmp_path):
    write_pair(tmp_path, "a", np.zeros((2, 2, 3)), np.array([[0, 1], [1, 0]]), mask_mode="P")
    _, classes = samples(tmp_path, train=False)[0, 0]
    assert classes.tolist() == [[0, 1], [1, 0]]


@pytest.mark.parametrize(
    ("reduce_zero_label", "value", "expected"),
    [
        (True, 151, "value 151 is not a class (the class list has 150 names; with "),
        (False, 150, "value 150 is not a class (the class list has 150 names: values run 0..149"),
    ],
    ids=["reduced", "kept"],
)
def test_a_value_outside_the_classes_names_the_file_in_one_line(
    tmp_path, reduce_zero_label, value, expected
):
    write_pair(tmp_path, "a", np.zeros((2, 2, 3)), np.array([[1, 2], [value, 0]]))
    data = samples(tmp_path, train=False, num_classes=150, reduce_zero_label=reduce_zero_label)
    with pytest.raises(UserError) as error:
        data[0, 0]
    message = str(error.value)
    assert message.startswith(f"mask {tmp_path / 'masks' / 'a.png'}: ")
    assert expected in message and "\n" not in message


def test_an_rgb_mask_is_refused(tmp_path):
    write_pair(tmp_path, "a", np.zeros((2, 2, 3)), np.zeros((2, 2)), mask_mode="RGB")
    with pytest.raises(UserError, match=r"a\.png: mode RGB; masks must be single-channel PNGs"):
        samples(tmp_path, train=False)[0, 0]


def test_a_missing_mask_is_refused_naming_it(tmp_path):
    write_pair(tmp_path, "a", np.zeros((2, 2, 3)), np.zeros((2, 2)))
    Image.new("RGB", (2, 2)).save(tmp_path / "images" / "b.jpg")
    with pytest.raises(UserError) as error:
        samples(tmp_path)
    expected = f"image {tmp_path / 'images' / 'b.jpg'} has no mask: expected "
    assert str(error.value) == expected + str(tmp_path / "masks" / "b.png")


def test_a_folder_without_images_is_refused_naming_it(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("no image here")
    with pytest.raises(UserError, match=f"image folder {tmp_path / 'images'}: no image"):
        samples(tmp_path)


def test_an_image_and_a_mask_of_different_sizes_are_refused(tmp_path):
    write_pair(tmp_path, "a", np.zeros((4, 6, 3)), np.zeros((4, 5)))
    with pytest.raises(UserError, match=r"a\.png is 6x4 but its mask .*a\.png is 5x4"):
        samples(tmp_path, train=False)[0, 0]


def test_pairs_and_split_follow_image_names(tmp_path):
    for stem in ("b", "a"):
        write_pair(tmp_path, stem, np.zeros((2, 2, 3)), np.zeros((2, 2)))
    data = split(tmp_path, train=False)
    assert [image.name for image, _ in data.samples.pairs] == ["a.png", "b.png"]
    assert [mask.parent for _, mask in data.samples.pairs] == [tmp_path / "masks"] * 2
    with pytest.raises(UserError, match="mask folder .*labels not found"):
        split(tmp_path, "labels", train=False)


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize(
    ("scale", "ratio", "size", "expected"),
    [
        ((2048, 512), 1.0, (100, 300), (512, 1536)),  # the short side bounds: 512 / 100
        ((2048, 512), 1.0, (300, 100), (1536, 512)),
        ((2048, 512), 1.0, (10, 1000), (20, 2048)),  # the long side bounds: 2048 / 1000
        ((64, 16), 0.5, (10, 50), (6, 32)),  # targets (32, 8); factor 32 / 50; 6.4 rounds to 6
    ],
)
def test_random_rescale_gives_mmcvs_size(scale, ratio, size, expected):
    image = tv_tensors.Image(torch.zeros(3, *size, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(size, dtype=torch.uint8))
    resized_image, resized_mask = RandomRescale(scale, (ratio, ratio))(image, mask)
    assert tuple(resized_image.shape) == (3, *expected)
    assert tuple(resized_mask.shape) == expected


def test_random_rescale_keeps_mask_values():
    mask = tv_tensors.Mask(torch.tensor([[0, 7], [255, 3]], dtype=torch.uint8))
    image = tv_tensors.Image(torch.zeros(3, 2, 2, dtype=torch.uint8))
    _, resized = seeded(RandomRescale((16, 16), (0.7, 1.3)), 0, image, mask)
    assert set(resized.unique().tolist()) == {0, 3, 7, 255}


def crop_ratio(mask: torch.Tensor) -> float:
    """The share of the most frequent class among a crop's labelled pixels."""
    counts = torch.bincount(mask[mask != 255].flatten().long())
    return float(counts.max() / counts.sum())


def test_category_balanced_crop_avoids_one_class_crops():
    mask = torch.ones(40, 40, dtype=torch.uint8)
    mask[12:28, 12:28] = 2  # class 2 is a 16x16 block amid class 1
    mask[:4] = 255
    image = tv_tensors.Image(torch.zeros(3, 40, 40, dtype=torch.uint8))
    balanced, plain = [], []
    for seed in range(10):
        _, crop = seeded(CategoryBalancedCrop(20, 0.75), seed, image, tv_tensors.Mask(mask))
        balanced.append(crop_ratio(crop))
        _, crop = seeded(CategoryBalancedCrop(20, 1.0), seed, image, tv_tensors.Mask(mask))
        plain.append(crop_ratio(crop))
        assert tuple(crop.shape) == (20, 20)
    assert max(balanced) < 0.75
    assert max(plain) >= 0.75  # without the rule some crops are (almost) all class 1


def test_category_balanced_crop_takes_the_whole_of_a_smaller_side():
    image = tv_tensors.Image(torch.zeros(3, 10, 50, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(10, 50, dtype=torch.uint8))
    cropped_image, cropped_mask = seeded(CategoryBalancedCrop(20), 0, image, mask)
    assert tuple(cropped_image.shape) == (3, 10, 20) and tuple(cropped_mask.shape) == (10, 20)


def test_ignore_index_must_fit_an_8_bit_mask():
    with pytest.raises(UserError, match="ignore index 300 is not 0..255"):
        SegmentationTransform(ignore_index=300)


# ----------------------------------------------------------------------------- samples


def test_a_training_sample_smaller_than_the_crop_is_padded(tmp_path):
    mask = np.ones((20, 30))
    mask[:, :10] = 0
    write_pair(tmp_path, "a", painted(mask), mask)
    image, classes = samples(tmp_path, unscaled(20, 30))[0, 0]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, CROP, CROP)
    assert classes.dtype == torch.int64 and tuple(classes.shape) == (CROP, CROP)
    assert (image[:, 20:] == 0).all() and (image[:, :, 30:] == 0).all()
    assert (classes[20:] == 255).all() and (classes[:, 30:] == 255).all()
    assert (classes[:20, :30] != 255).all()
    assert (classes[:20, :30] == 1).sum() == 20 * 20


def test_training_samples_keep_image_and_mask_aligned(tmp_path):
    rng = np.random.default_rng(0)
    for stem in ("a", "b", "c"):
        mask = blocks(48, 64, rng)
        write_pair(tmp_path, stem, painted(mask), mask)
    data = samples(tmp_path, unscaled(48, 64), seed=3)
    checked = 0
    for epoch in range(4):
        for index in range(3):
            image, classes = data[epoch, index]
            assert tuple(classes.shape) == (CROP, CROP) and (classes != 255).all()
            brightness = pixels(image[None])[0].mean(0)
            if (classes == 0).any() and (classes == 1).any():
                # photometric distortion keeps white above black; crops and flips move both alike
                assert brightness[classes == 1].min() > brightness[classes == 0].max()
                checked += 1
    assert checked >= 6


def test_a_sample_is_a_function_of_seed_epoch_and_index(tmp_path):
    rng = np.random.default_rng(1)
    mask = blocks(60, 80, rng)
    write_pair(tmp_path, "a", rng.integers(0, 256, (60, 80, 3)), mask)
    first, again, other_seed = samples(tmp_path), samples(tmp_path), samples(tmp_path, seed=1)
    image, classes = first[2, 0]
    torch.manual_seed(123)  # the global generator does not matter
    same_image, same_classes = again[2, 0]
    assert torch.equal(image, same_image) and torch.equal(classes, same_classes)
    assert not torch.equal(image, first[3, 0][0])
    assert not torch.equal(image, other_seed[2, 0][0])


def test_evaluation_samples_keep_their_size(tmp_path):
    mask = np.zeros((21, 37))
    write_pair(tmp_path, "a", np.full((21, 37, 3), 255), mask)
    image, classes = samples(tmp_path, train=False)[0, 0]
    assert tuple(image.shape) == (3, 21, 37) and tuple(classes.shape) == (21, 37)
    assert torch.allclose(pixels(image[None]), torch.full((1, 3, 21, 37), 255.0), atol=1e-3)


# ----------------------------------------------------------------------------- loader


@pytest.fixture
def folder(tmp_path) -> Path:
    """Five image/mask pairs of different sizes, classes 0 and 1."""
    rng = np.random.default_rng(2)
    for index, (height, width) in enumerate([(40, 50), (30, 60), (50, 50), (24, 40), (60, 36)]):
        mask = blocks(height, width, rng)
        write_pair(tmp_path, f"{index:06d}", painted(mask), mask)
    return tmp_path


def loader(root: Path, *, train: bool, batch_size: int = 2, workers: int = 0):
    """A CPU loader of the pairs under `root`."""
    return SegmentationLoader(
        split(root, train=train, seed=4),
        batch_size=batch_size,
        train=train,
        device=CPU,
        num_workers=workers,
        seed=4,
    )


def test_training_batches_are_stacked_crops_the_same_from_any_start(folder):
    train = loader(folder, train=True)
    assert train.num_samples == 5 and train.source == str(folder / "images")
    batches = list(train.batches(epoch=1))
    assert len(batches) == len(train) == 2  # the last partial batch is dropped
    for images, masks in batches:
        assert images.dtype == torch.float32 and tuple(images.shape) == (2, 3, CROP, CROP)
        assert masks.dtype == torch.int64 and tuple(masks.shape) == (2, CROP, CROP)
    resumed = list(train.batches(epoch=1, start_batch=1))
    assert len(resumed) == 1
    assert all(torch.equal(a, b) for a, b in zip(batches[1], resumed[0], strict=True))
    other_epoch = next(iter(train.batches(epoch=2)))
    assert not torch.equal(other_epoch[0], batches[0][0])


def test_workers_read_the_same_training_batches(folder):
    in_process = list(loader(folder, train=True).batches(epoch=3))
    in_workers = list(loader(folder, train=True, workers=1).batches(epoch=3))
    for (images, masks), (worker_images, worker_masks) in zip(in_process, in_workers, strict=True):
        assert torch.equal(images, worker_images) and torch.equal(masks, worker_masks)


def test_evaluation_batches_are_lists_of_whole_images_in_order(folder):
    evaluation = loader(folder, train=False)
    batches = list(evaluation)
    assert len(batches) == len(evaluation) == 3
    sizes = [tuple(mask.shape) for _, masks in batches for mask in masks]
    assert sizes == [(40, 50), (30, 60), (50, 50), (24, 40), (60, 36)]
    for images, masks in batches:
        for image, mask in zip(images, masks, strict=True):
            assert tuple(image.shape) == (3, *mask.shape) and mask.dtype == torch.int64
    tail = list(evaluation.batches(epoch=0, start_batch=2))
    assert len(tail) == 1 and torch.equal(tail[0][1][0], batches[2][1][0])
