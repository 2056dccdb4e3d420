"""COCO-format data: annotation files checked entry by entry, samples and loaders as the detection
task reads them."""

import json
import math
import re
import sys

import pytest

from debiformer.data.coco import MISSING_PYCOCOTOOLS, load_coco
from debiformer.errors import UserError
from tests.helpers.coco_files import CATEGORIES, box_annotation, image, write_coco

# ----------------------------------------------------------------------------- load_coco


def test_load_coco_reads_the_file_silently(tmp_path, capsys):
    path = write_coco(tmp_path, [image(1), image(2)], [box_annotation(1, 2, 1, [0, 0, 9, 9])])
    ground_truth = load_coco(path)
    assert ground_truth.getImgIds() == [1, 2]
    assert ground_truth.getAnnIds(imgIds=2) == [1]
    assert capsys.readouterr().out == ""


def valid_dataset() -> dict:
    """One image with two annotations: the dataset the corruptions below start from."""
    annotations = [box_annotation(1, 1, 1, [0, 0, 9, 9]), box_annotation(2, 1, 2, [5, 5, 9, 9])]
    return {"images": [image(1)], "annotations": annotations, "categories": CATEGORIES}


def annotation_with(index: int, **changes) -> str:
    """The valid dataset as JSON, annotation `index` changed (a value of None deletes the key)."""
    dataset = valid_dataset()
    annotation = dataset["annotations"][index]
    annotation.update(changes)
    for key in [key for key, value in changes.items() if value is None]:
        del annotation[key]
    return json.dumps(dataset)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (json.dumps(valid_dataset())[:-20], r"not JSON \(.* at line 1, column \d+\)"),
        (json.dumps({"images": [], "annotations": []}), "missing top-level key.* categories"),
        (annotation_with(1, image_id=99), r"annotations\[1\] \(id 2\): image_id 99 is not"),
        (annotation_with(0, category_id=7), r"annotations\[0\] \(id 1\): category_id 7 is not"),
        (annotation_with(1, category_id=None), r"annotations\[1\] \(id 2\): missing .*category_id"),
        (annotation_with(0, bbox=[1, 2, 3]), r"annotations\[0\] \(id 1\): bbox \[1, 2, 3\] is not"),
        (annotation_with(0, bbox=[0, 0, -1, 5]), r"annotations\[0\] \(id 1\): bbox .* is not"),
        (annotation_with(0, bbox=[0, 0, "9", 5]), r"annotations\[0\] \(id 1\): bbox .* is not"),
        (
            annotation_with(0, bbox=[0, 0, math.nan, 5]),
            r"annotations\[0\] \(id 1\): bbox .* is not",
        ),
    ],
    ids=[
        "truncated",
        "no-categories",
        "unknown-image",
        "unknown-category",
        "missing-key",
        "three-numbers",
        "negative-width",
        "string",
        "nan",
    ],
)
def test_load_coco_names_the_file_and_entry_in_one_line(tmp_path, text, expected):
    path = tmp_path / "instances.json"
    path.write_text(text)
    with pytest.raises(UserError) as error:
        load_coco(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    assert re.search(expected, message), message


def test_load_coco_without_pycocotools_says_how_to_install(tmp_path, monkeypatch):
    path = write_coco(tmp_path, [image(1)], [])
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)  # makes the import fail
    with pytest.raises(UserError) as error:
        load_coco(path)
    assert str(error.value) == MISSING_PYCOCOTOOLS
