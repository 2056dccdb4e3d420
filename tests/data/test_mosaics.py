"""Mosaics: COCO detection / segmentation and semantic-label sets of Fashion-MNIST items."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_api
from pycocotools.coco import COCO
from typer.testing import CliRunner

from debiformer.cli import flags
from debiformer.cli.main import app
from debiformer.data import FashionMNIST
from debiformer.data import mosaics as mosaics_module
from debiformer.data.mosaics import (
    MosaicItems,
    check_mosaics_options,
    ensure_mosaics,
    write_mosaics,
)
from debiformer.data.sources import FASHION_MNIST_ITEMS_PREFIX, open_source
from debiformer.errors import UserError
from tests.data.common import needs_fashion_mnist, write_idx_folder

SMALL = {"train_images": 4, "val_images": 3}
MIN_CONTRAST = 40  # an item's mean brightest channel above its canvas's background mean

# pycocotools' mask decoding (annToMask) warns under numpy 2; the masks are right
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory) -> Path:
    """A small mosaics set of the real Fashion-MNIST (tests using it need `needs_fashion_mnist`)."""
    return write_mosaics(tmp_path_factory.mktemp("mosaics") / "set", **SMALL)


@pytest.fixture
def tiny_source(tmp_path) -> Path:
    """An idx folder of 10 white squares (one per class) standing in for Fashion-MNIST."""
    images = np.zeros((10, 28, 28), np.uint8)
    images[:, 4:24, 4:24] = 255
    return write_idx_folder(tmp_path / "idx", images, np.arange(10))


def read_png(path: Path) -> np.ndarray:
    """The pixels of a PNG file."""
    with Image.open(path) as image:
        return np.asarray(image)


@needs_fashion_mnist
def test_the_layout_holds_images_labels_annotations_and_class_names(mosaics):
    assert sorted(os.listdir(mosaics)) == ["annotations", "classes.txt", "images", "labels"]
    assert sorted(os.listdir(mosaics / "annotations")) == [
        "instances_train.json",
        "instances_val.json",
    ]
    for split, count in (("train", 4), ("val", 3)):
        names = [f"{index:06d}.png" for index in range(count)]
        assert sorted(os.listdir(mosaics / "images" / split)) == names
        assert sorted(os.listdir(mosaics / "labels" / split)) == names
        with Image.open(mosaics / "images" / split / names[0]) as image:
            assert image.mode == "RGB" and image.size == (128, 128)
        with Image.open(mosaics / "labels" / split / names[0]) as labels:
            assert labels.mode == "L" and labels.size == (128, 128)
    lines = (mosaics / "classes.txt").read_text().splitlines()
    assert lines == ["background", *FashionMNIST.classes]
    assert lines[10] == "Ankle boot"


@needs_fashion_mnist
@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_masks_and_boxes_agree_with_the_label_maps(mosaics, split):
    coco = COCO(str(mosaics / "annotations" / f"instances_{split}.json"))
    assert [(c["id"], c["name"], c["supercategory"]) for c in coco.dataset["categories"]] == [
        (index + 1, name, "fashion") for index, name in enumerate(FashionMNIST.classes)
    ]
    assert [image["file_name"] for image in coco.dataset["images"]] == [
        f"{index:06d}.png" for index in range(len(coco.dataset["images"]))
    ]
    for image in coco.dataset["images"]:
        assert (image["width"], image["height"]) == (128, 128)
        labels = read_png(mosaics / "labels" / split / image["file_name"])
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert 1 <= len(annotations) <= 6
        masks = [coco.annToMask(annotation).astype(bool) for annotation in annotations]
        for annotation, mask in zip(annotations, masks, strict=True):
            rows, columns = np.nonzero(mask)
            x, y, w, h = annotation["bbox"]
            assert [x, y, x + w - 1, y + h - 1] == [
                columns.min(),
                rows.min(),
                columns.max(),
                rows.max(),
            ]
            assert annotation["bbox"] == mask_api.toBbox(annotation["segmentation"]).tolist()
            assert annotation["area"] == mask.sum() and annotation["iscrowd"] == 0
            box = (slice(y, y + h), slice(x, x + w))
            assert np.array_equal(mask[box], labels[box] == annotation["category_id"])
        assert np.sum(masks, axis=0).max() == 1, "two items overlap"
        painted = np.zeros_like(labels)
        for annotation, mask in zip(annotations, masks, strict=True):
            painted[mask] = annotation["category_id"]
        assert np.array_equal(painted, labels)


@needs_fashion_mnist
def test_items_are_clearly_brighter_than_their_noisy_background(mosaics):
    for path in sorted((mosaics / "images" / "train").iterdir()):
        brightness = read_png(path).max(axis=-1).astype(float)
        labels = read_png(mosaics / "labels" / "train" / path.name)
        background = brightness[labels == 0]
        assert background.std() > 1, "the background is not noisy"
        for category in np.unique(labels[labels > 0]):
            assert brightness[labels == category].mean() > background.mean() + MIN_CONTRAST


@needs_fashion_mnist
def test_the_same_seed_writes_the_same_files_and_another_seed_others(mosaics, tmp_path):
    again = write_mosaics(tmp_path / "again", **SMALL)
    other = write_mosaics(tmp_path / "other", **SMALL, seed=1)
    for name in ("annotations/instances_train.json", "annotations/instances_val.json"):
        assert (again / name).read_bytes() == (mosaics / name).read_bytes()
        assert (other / name).read_bytes() != (mosaics / name).read_bytes()
    for name in ("images/train/000003.png", "labels/val/000002.png"):
        assert (again / name).read_bytes() == (mosaics / name).read_bytes()
    train = (mosaics / "images" / "train" / "000000.png").read_bytes()
    assert train != (mosaics / "images" / "val" / "000000.png").read_bytes()


def test_train_items_come_from_the_train_split_and_val_items_from_the_test_split(
    monkeypatch, tiny_source, tmp_path
):
    """A reader whose train split holds only Trousers and whose test split only Bags."""
    read = mosaics_module.read_fashion_mnist
    requested = []

    def one_class_per_split(root, split):
        requested.append(split)
        images, _ = read(root, split)
        return images, np.full(len(images), 1 if split == "train" else 8)

    monkeypatch.setattr(mosaics_module, "read_fashion_mnist", one_class_per_split)
    out = write_mosaics(tmp_path / "set", **SMALL, source=tiny_source)
    assert requested == ["train", "test"]
    for split, category in (("train", 2), ("val", 9)):
        coco = COCO(str(out / "annotations" / f"instances_{split}.json"))
        assert {annotation["category_id"] for annotation in coco.dataset["annotations"]} == {
            category
        }
        labels = [read_png(path) for path in (out / "labels" / split).iterdir()]
        assert np.unique(labels).tolist() == [0, category]


@pytest.mark.parametrize(
    ("options", "library", "command"),
    [
        ({"train_images": 0}, "train_images and val_images must be", "--train and --val must be"),
        ({"val_images": -2}, "train_images and val_images must be", "--train and --val must be"),
        ({"items": (3, 2)}, "items 3 2: give the fewest and most", "--items 3 2: give the"),
        ({"items": (0, 2)}, "items 0 2: give the fewest and most", "--items 0 2: give the"),
        ({"scale": (0.0, 1.0)}, "scale 0.0 1.0: give the smallest", "--scale 0.0 1.0: give the"),
        (
            {"canvas_size": 40},
            "canvas_size 40: the canvas must hold the largest item (56 px at scale 2.0); "
            "use canvas_size=56 or more, or a smaller scale",
            "--size 40: the canvas must hold the largest item (56 px at scale 2.0); "
            "use --size 56 or more, or a smaller --scale",
        ),
        ({"seed": -1}, "seed must be 0 or more", "--seed must be 0 or more"),
    ],
)
def test_bad_arguments_are_one_line_errors_before_any_work(
    options, library, command, tiny_source, tmp_path
):
    with pytest.raises(UserError) as error:
        write_mosaics(tmp_path / "set", **{**SMALL, **options}, source=tiny_source)
    assert str(error.value).startswith(library) and "\n" not in str(error.value)
    assert flags.message(error.value, "data mosaics").startswith(command)
    assert sorted(os.listdir(tmp_path)) == ["idx"]
    with pytest.raises(UserError) as error:
        check_mosaics_options({"out": "set", **SMALL, **options})
    assert str(error.value).startswith(library)


def test_checking_options_looks_at_no_file_and_fills_in_the_defaults(tmp_path):
    check_mosaics_options({"out": tmp_path, **SMALL})  # a foreign folder is found when writing
    check_mosaics_options({"out": "set", **SMALL, "items": [1, 1], "scale": [0.5, 0.5]})
    with pytest.raises(UserError, match=r"^canvas_size 50: .* \(56 px at scale 2.0\)"):
        check_mosaics_options({"out": "set", **SMALL, "canvas_size": 50})
    with pytest.raises(UserError, match="bad mosaics option"):
        check_mosaics_options({"out": "set", "train_images": 4})


def test_a_missing_source_or_pycocotools_or_a_foreign_folder_is_a_user_error(
    monkeypatch, tiny_source, tmp_path
):
    with pytest.raises(UserError, match="no Fashion-MNIST idx files"):
        write_mosaics(tmp_path / "set", **SMALL, source=tmp_path / "missing")
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not a mosaics folder: delete it or choose another"):
        write_mosaics(foreign, **SMALL, source=tiny_source)
    assert os.listdir(foreign) == ["todo.txt"]
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    with pytest.raises(UserError, match=r"pip install 'debiformer\[detection\]'"):
        write_mosaics(tmp_path / "set", **SMALL, source=tiny_source)
    assert sorted(os.listdir(tmp_path)) == ["idx", "notes"]


def test_an_interrupted_run_leaves_the_earlier_set_or_nothing(monkeypatch, tiny_source, tmp_path):
    out = write_mosaics(tmp_path / "set", **SMALL, source=tiny_source)
    before = (out / "annotations" / "instances_val.json").read_bytes()

    def interrupt() -> list:
        raise KeyboardInterrupt

    monkeypatch.setattr(mosaics_module, "_categories", interrupt)
    for target in (out, tmp_path / "new"):
        with pytest.raises(KeyboardInterrupt):
            write_mosaics(target, **SMALL, seed=1, source=tiny_source)
    assert sorted(os.listdir(tmp_path)) == ["idx", "set"]
    assert (out / "annotations" / "instances_val.json").read_bytes() == before


def test_writing_again_replaces_the_set_in_place(tiny_source, tmp_path):
    out = write_mosaics(tmp_path / "set", **SMALL, source=tiny_source)
    write_mosaics(out, train_images=2, val_images=1, seed=5, source=tiny_source)
    assert sorted(os.listdir(tmp_path)) == ["idx", "set"]
    assert len(os.listdir(out / "images" / "train")) == 2


def test_ensure_writes_only_when_the_set_is_missing(monkeypatch, tiny_source, tmp_path):
    with pytest.raises(UserError, match="bad mosaics option"):
        ensure_mosaics(tmp_path / "set", train_images=4, val_images=3, canvas=64)
    out = ensure_mosaics(tmp_path / "set", **SMALL, source=tiny_source)
    assert (out / "annotations" / "instances_val.json").is_file()

    def must_not_write(*args, **kwargs):
        raise AssertionError("ensure_mosaics rewrote a complete set")

    monkeypatch.setattr(mosaics_module, "write_mosaics", must_not_write)
    assert ensure_mosaics(out, **SMALL, seed=3, source=tiny_source) == out


def test_cli_writes_a_set_and_prints_a_summary(tiny_source, tmp_path):
    out = tmp_path / "set"
    args = ["--train", "3", "--val", "2", "--size", "64", "--items", "1", "2", "--seed", "7"]
    result = CliRunner().invoke(
        app,
        ["data", "mosaics", str(out), *args, "--scale", "1", "1.5", "--source", str(tiny_source)],
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 3 train + 2 val images," in result.output
    coco = COCO(str(out / "annotations" / "instances_train.json"))
    assert len(coco.dataset["images"]) == 3
    assert {(i["width"], i["height"]) for i in coco.dataset["images"]} == {(64, 64)}
    assert all(1 <= len(coco.getAnnIds(imgIds=i)) <= 2 for i in coco.getImgIds())


def test_mosaic_items_draw_one_tinted_item_per_noisy_canvas_the_same_each_time(tiny_source):
    """`fashion-mnist-items:` draws each product as the mosaics draw theirs, one per canvas: the
    item's mask carries a colour far above the dark noisy background; item i is always drawn
    the same, and the train and test splits are drawn apart."""
    items = open_source(f"{FASHION_MNIST_ITEMS_PREFIX}{tiny_source}", "train")
    assert isinstance(items, MosaicItems) and len(items) == 10
    assert items.classes == FashionMNIST.classes
    side = mosaics_module.ITEMS_CANVAS
    smallest, largest = (20 * scale for scale in mosaics_module.ITEMS_SCALE)  # the 20x20 square
    canvases = []
    for index in range(10):
        image, label = items[index]
        assert label == index and image.size == (side, side) and image.mode == "RGB"
        pixels = np.asarray(image).astype(float)
        brightness = pixels.max(axis=-1)
        item = brightness > 100  # the white square, tinted: its brightest channel is >= 200 * 0.4
        assert (smallest - 1) ** 2 <= item.sum() <= (largest + 1) ** 2
        assert brightness[~item].mean() < 48 + 12 and brightness[~item].std() > 1
        canvases.append(pixels)
    assert not np.array_equal(canvases[0], canvases[1])
    assert np.array_equal(np.asarray(items[3][0]), canvases[3])
    test_split = open_source(f"{FASHION_MNIST_ITEMS_PREFIX}{tiny_source}", "test")
    assert not np.array_equal(np.asarray(test_split[3][0]), canvases[3])
