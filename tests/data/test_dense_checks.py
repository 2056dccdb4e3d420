"""Dense data checked before any work: every kind of bad image, mask or COCO annotation of either
split stops the task's data preparation (before the first training step) with one line naming
the file; boxes reaching outside their image are clipped with one warning; what the check read is
cached by file size and mtime; what only a full decode finds stops where the file is read."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from debiformer.data import images as image_files
from debiformer.data.checks import rle_counts
from debiformer.data.images import MAX_IMAGE_PIXELS, image_header, read_rgb
from debiformer.errors import UserError
from debiformer.recipe import CocoDataConfig, MaskDataConfig, load_recipe
from debiformer.tasks import build_task
from tests.helpers.coco_files import CATEGORIES, box_annotation, image
from tests.helpers.image_files import huge_png
from tests.helpers.recipes import detection_recipe, segmentation_recipe, write_recipe

SIZE = 16  # every test image is SIZE x SIZE
SPLITS = ("train", "val")


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch) -> Path:
    """The cache folder of this test ($XDG_CACHE_HOME), never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "debiformer" / "checks"


def save_image(path: Path, width: int = SIZE, height: int = SIZE) -> Path:
    """Writes a noisy RGB PNG (noise so that cutting it short cuts its pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def cut_short(path: Path) -> None:
    """Keeps the first 60% of a file: its header stays readable, its pixels are cut."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])


def first_file(folder: Path) -> Path:
    """The first file of a folder by name."""
    return sorted(folder.iterdir())[0]


# ----------------------------------------------------------------------------- segmentation


def segmentation_set(root: Path) -> Path:
    """A mosaics-like layout: 2 training and 2 validation images with L masks of classes 0 and
    1 (the class list: background, thing)."""
    for split in SPLITS:
        for stem in ("a", "b"):
            save_image(root / "images" / split / f"{stem}.png")
            mask = np.zeros((SIZE, SIZE), np.uint8)
            mask[: SIZE // 2] = 1
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "labels" / split / f"{stem}.png")
    (root / "classes.txt").write_text("background\nthing\n")
    return root


def segmentation_task(root: Path, **data):
    """The segmentation task of the set at `root`, `data` overriding its data section."""
    recipe = segmentation_recipe(root, "fpn", data=data)
    return build_task(load_recipe(write_recipe(root / "r.yaml", recipe)))


def save_mask(path: Path, mask: np.ndarray, mode: str | None = None) -> None:
    """Writes `mask` over a mask file."""
    Image.fromarray(mask, mode).save(path)


MASK_FAULTS = {
    "rgb": (lambda path: save_mask(path, np.zeros((SIZE, SIZE, 3), np.uint8)), "mode RGB;"),
    "16-bit": (
        lambda path: save_mask(path, np.full((SIZE, SIZE), 300, np.uint16)),
        r"mode I;16 \(16-bit\)",
    ),
    "wrong-size": (
        lambda path: save_mask(path, np.zeros((SIZE, SIZE - 4), np.uint8)),
        f"is {SIZE}x{SIZE} but its mask .* is {SIZE - 4}x{SIZE}",
    ),
    "beyond-the-classes": (
        lambda path: save_mask(path, np.full((SIZE, SIZE), 7, np.uint8)),
        r"value 7 is not a class \(the class list has 2 names",
    ),
    "not-an-image": (lambda path: path.write_bytes(b"not a png"), "is not a readable image"),
}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("fault", MASK_FAULTS)
def test_a_bad_mask_stops_data_preparation_in_one_line(tmp_path, split, fault):
    root = segmentation_set(tmp_path)
    bad = first_file(root / "labels" / split)
    spoil, expected = MASK_FAULTS[fault]
    spoil(bad)
    with pytest.raises(UserError, match=expected) as error:
        segmentation_task(root).prepare_data()
    assert str(bad) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("split", SPLITS)
def test_an_unreadable_segmentation_image_stops_data_preparation(tmp_path, split):
    root = segmentation_set(tmp_path)
    bad = first_file(root / "images" / split)
    bad.write_bytes(bad.read_bytes()[:20])  # the header cut: not even its size can be read
    with pytest.raises(UserError, match=f"image {bad} is not a readable image") as error:
        segmentation_task(root).prepare_data()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("value", "options"), [(255, {}), (0, {"reduce_zero_label": True})], ids=["255", "zero"]
)
def test_training_masks_all_ignored_are_said_before_training(tmp_path, value, options):
    root = segmentation_set(tmp_path)
    for path in (root / "labels" / "train").iterdir():
        save_mask(path, np.full((SIZE, SIZE), value, np.uint8))
    with pytest.raises(UserError, match="every training label is ignored") as error:
        segmentation_task(root, **options).prepare_data()
    assert f"only {value};" in str(error.value) and "\n" not in str(error.value)


def test_the_check_is_cached_until_a_file_changes(tmp_path, monkeypatch, user_cache):
    root = segmentation_set(tmp_path)
    opened = []
    open_image = image_files.Image.open
    monkeypatch.setattr(
        image_files.Image, "open", lambda path, *a: opened.append(path) or open_image(path, *a)
    )
    segmentation_task(root).prepare_data()
    assert len(opened) == 8 and len(list(user_cache.iterdir())) == 4
    opened.clear()
    segmentation_task(root).prepare_data()
    assert opened == []
    bad = first_file(root / "labels" / "val")
    save_mask(bad, np.full((SIZE, SIZE), 9, np.uint8))
    with pytest.raises(UserError, match=f"mask {bad}: value 9 is not a class"):
        segmentation_task(root).prepare_data()
    assert opened == [bad]


def test_a_file_cut_in_its_body_stops_where_it_is_read_naming_it(tmp_path):
    root = segmentation_set(tmp_path)
    bad = first_file(root / "images" / "val")
    cut_short(bad)
    task = segmentation_task(root)
    task.prepare_data()  # the header is whole: only the decode finds the cut
    with pytest.raises(
        UserError, match=f"image {bad} cannot be read .*; fix or remove it"
    ) as error:
        task.prepared["val"].samples[0, 0]
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- detection


def coco_set(root: Path, annotations: list[dict] | None = None, split: str = "train") -> Path:
    """A mosaics-like COCO layout: in each split images 1 and 2 (SIZE x SIZE PNGs) with a box
    each; `annotations` replace those of `split`."""
    for each in SPLITS:
        entries = [{**image(image_id, SIZE), "file_name": f"{image_id}.png"} for image_id in (1, 2)]
        for entry in entries:
            save_image(root / "images" / each / entry["file_name"])
        boxes = [box_annotation(k, k, 1, [2, 2, 8, 8]) for k in (1, 2)]
        dataset = {
            "images": entries,
            "annotations": annotations if each == split and annotations is not None else boxes,
            "categories": CATEGORIES,
        }
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{each}.json").write_text(json.dumps(dataset))
    return root


def detection_task(root: Path, **data):
    """The Mask R-CNN task of the COCO set at `root`, `data` overriding its data section."""
    recipe = detection_recipe(root, "maskrcnn", data=data)
    return build_task(load_recipe(write_recipe(root / "r.yaml", recipe)))


def rle(counts, size=(SIZE, SIZE)) -> dict:
    """An RLE segmentation."""
    return {"size": list(size), "counts": counts}


@pytest.mark.parametrize("split", SPLITS)
def test_a_missing_or_missized_coco_image_stops_data_preparation(tmp_path, split):
    root = coco_set(tmp_path)
    missing = root / "images" / split / "1.png"
    missing.unlink()
    with pytest.raises(UserError, match=f"image {missing} does not exist"):
        detection_task(root).prepare_data()
    save_image(missing, SIZE - 6, SIZE)
    with pytest.raises(UserError) as error:
        detection_task(root).prepare_data()
    message = str(error.value)
    assert message.startswith(f"{root / 'annotations' / f'instances_{split}.json'}: ")
    assert f"image {missing} is {SIZE - 6}x{SIZE} but the file says {SIZE}x{SIZE}" in message


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(
    ("box", "expected"),
    [([SIZE + 2, 2, 4, 4], "lies outside"), ([-8.5, 2, 9, 4], "is mostly outside")],
    ids=["beyond", "half-a-pixel-inside"],
)
def test_a_box_outside_its_image_names_file_and_annotation(tmp_path, split, box, expected):
    annotations = [box_annotation(1, 1, 1, [2, 2, 8, 8]), box_annotation(7, 2, 1, box)]
    root = coco_set(tmp_path, annotations, split)
    with pytest.raises(UserError) as error:
        detection_task(root).prepare_data()
    message = str(error.value)
    assert f"annotation 7 of image {root / 'images' / split / '2.png'}" in message
    assert expected in message and "\n" not in message


def test_a_box_partly_outside_is_clipped_with_one_warning(tmp_path, capsys):
    annotations = [box_annotation(k, (k + 1) // 2, 1, [SIZE - 4, -2, 8, 8]) for k in (1, 2, 3)]
    root = coco_set(tmp_path, annotations, "val")
    task = detection_task(root)
    task.prepare_data()
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1
    assert (
        "clipped 3 box(es) that reach outside their images (first: 1.png annotation 1)" in warning
    )
    data = task.prepared["val"]
    assert data.coco.anns[1]["bbox"] == [SIZE - 4, 0, 4, 6]
    _, target = data.samples[0, 0]
    assert target["boxes"].tolist() == [[SIZE - 4, 0, SIZE, 6]] * 2


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(
    ("segmentation", "expected"),
    [
        (rle("zz!"), "RLE counts"),
        (rle([10, 5]), "RLE counts"),
        (rle([-4, SIZE * SIZE + 4]), "RLE counts"),
        (rle([SIZE * SIZE], (SIZE, 4)), "RLE size"),
        ([[1, 1, 5, 5]], "segmentation polygon"),
        ({"counts": [4]}, "neither polygons nor an RLE"),
    ],
    ids=["garbled-string", "short", "negative", "other-size", "two-points", "no-size"],
)
def test_an_invalid_segmentation_names_file_and_annotation(tmp_path, split, segmentation, expected):
    bad = {**box_annotation(7, 2, 1, [2, 2, 4, 4]), "segmentation": segmentation}
    root = coco_set(tmp_path, [box_annotation(1, 1, 1, [2, 2, 8, 8]), bad], split)
    with pytest.raises(UserError, match=expected) as error:
        detection_task(root).prepare_data()
    message = str(error.value)
    assert message.startswith(f"{root / 'annotations' / f'instances_{split}.json'}: annotation 7 ")
    assert "\n" not in message


def test_rle_counts_decode_pycocotools_strings():
    mask_api = pytest.importorskip("pycocotools.mask")
    mask = np.zeros((SIZE, SIZE), np.uint8, order="F")
    mask[3:9, 5:12] = 1
    encoded = mask_api.encode(mask)
    counts = rle_counts(encoded["counts"].decode())
    assert sum(counts) == SIZE * SIZE and sum(counts[1::2]) == mask.sum()


# ----------------------------------------------------------------------------- pixel limit


def test_the_pixel_limits_defaults_are_pils():
    assert CocoDataConfig().max_image_pixels == MaskDataConfig().max_image_pixels
    assert MaskDataConfig().max_image_pixels == MAX_IMAGE_PIXELS == 89_478_485
    assert Image.MAX_IMAGE_PIXELS is None  # the limit is ours, said with the setting raising it


def test_a_decompression_bomb_is_refused_from_its_header_in_one_line(tmp_path):
    bomb = tmp_path / "bomb.png"
    huge_png(bomb, 20_000, 20_000)
    for read in (image_header, read_rgb):
        with pytest.raises(UserError, match=f"image {bomb} is 20000x20000 .* above the limit"):
            read(bomb)


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_an_image_above_the_recipes_pixel_limit_stops_data_preparation(tmp_path, task):
    make_set, make_task = {
        "segmentation": (segmentation_set, segmentation_task),
        "detection": (coco_set, detection_task),
    }[task]
    root = make_set(tmp_path)
    with pytest.raises(UserError) as error:
        make_task(root, max_image_pixels=SIZE * SIZE - 1).prepare_data()
    message = str(error.value)
    assert f"above the limit of {SIZE * SIZE - 1} pixels" in message
    assert message.endswith("raise data.max_image_pixels") and str(root / "images") in message
    make_task(root, max_image_pixels=SIZE * SIZE).prepare_data()


# ----------------------------------------------------------------------------- end to end


def test_train_stops_on_a_bad_validation_mask_before_any_step(tmp_path, run_main):
    root = segmentation_set(tmp_path / "set")
    bad = first_file(root / "labels" / "val")
    save_mask(bad, np.full((SIZE, SIZE), 7, np.uint8))
    recipe = write_recipe(tmp_path / "r.yaml", segmentation_recipe(root, "fpn"))
    code, _, err = run_main("train", str(recipe), "--out", str(tmp_path / "run"))
    assert code == 2
    assert err.count("\n") == 1 and f"mask {bad}: value 7 is not a class" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
