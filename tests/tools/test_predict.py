"""`debiformer predict`: the answers `eval` computes for the same images, one row per image (CSV or
JSON, with class names), and files that cannot be read skipped with a notice and exit code 1."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from debiformer.checkpoint import save_checkpoint
from debiformer.data.images import image_files
from debiformer.errors import UserError
from debiformer.recipe import load_recipe, recipe_to_dict
from debiformer.tasks import evaluate_checkpoint
from debiformer.tasks.classification import build_split_loader
from debiformer.tools.classifier import load_classifier
from debiformer.tools.predict import predict
from debiformer.tools.predict_detection import load_detector
from debiformer.tools.predict_segmentation import load_segmenter
from debiformer.weights import ModelSpec, build_model, open_weights, spec_entry

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> dict[str, Path]:
    """An image folder of three classes (greyscale, RGB and palette PNGs and JPEGs of several
    sizes), a nano checkpoint for them with a recorded 40-pixel, crop-0.8 preprocessing, and the
    recipe `eval` reads the folder with."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / "images" / name).mkdir(parents=True)
        for index, (mode, size, suffix) in enumerate(
            [("L", (28, 28), ".png"), ("RGB", (61, 45), ".jpg"), ("P", (50, 70), ".png")] * 2
        ):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            pixels[..., label] //= 4  # a colour cast per class
            image = Image.fromarray(pixels).convert(mode)
            image.save(root / "images" / name / f"{index}{suffix}")
    torch.manual_seed(0)
    spec = ModelSpec(
        "debiformer_nano",
        num_classes=3,
        preprocessing={"input_size": [3, 40, 40], "crop_pct": 0.8, "interpolation": "bilinear"},
    )
    model, _ = build_model(spec)
    torch.nn.init.normal_(model.head.weight, std=1.0)
    save_checkpoint({"model": model.state_dict(), **spec_entry(spec)}, root / "nano.pt")
    recipe = root / "eval.yaml"
    recipe.write_text(
        "model: {name: debiformer_nano}\n"
        f"data: {{backend: torchvision, train_path: {root / 'images'}, "
        f"val_path: {root / 'images'}, image_size: 40, crop_ratio: 0.8, num_workers: 0}}\n"
        "train: {device: cpu, batch_size: 5}\n"
    )
    return {
        "root": root,
        "images": root / "images",
        "checkpoint": root / "nano.pt",
        "recipe": recipe,
    }


def test_predictions_equal_what_eval_computes_on_the_same_images(labelled):
    recipe = load_recipe(str(labelled["recipe"]))
    evaluated = evaluate_checkpoint(recipe, labelled["checkpoint"])
    predictions, failures = predict([labelled["images"]], checkpoint=labelled["checkpoint"])
    assert failures == [] and len(predictions) == evaluated["images"] == 18
    hits = [p.classes[0] == CLASSES.index(Path(p.image).parent.name) for p in predictions]
    top1 = 100 * np.mean(hits)
    assert top1 == pytest.approx(evaluated["top1"])
    assert len({p.classes[0] for p in predictions}) > 1  # the check can tell images apart

    classifier = load_classifier(checkpoint=labelled["checkpoint"])
    loader = build_split_loader(recipe, "val", torch.device("cpu"), 5)
    with torch.no_grad():
        probabilities = torch.cat([classifier.model(x).softmax(-1) for x, _ in loader])
    by_file = {p.image: p for p in predictions}
    files = [path for path, _ in ImageFolder(labelled["images"]).samples]  # the loader's order
    for path, row in zip(files, probabilities, strict=True):
        prediction = by_file[path]
        torch.testing.assert_close(
            torch.tensor(prediction.probabilities), row[prediction.classes], rtol=1e-5, atol=1e-6
        )


def test_the_csv_has_one_row_per_image_with_class_names(run_main, labelled, tmp_path):
    out = tmp_path / "top.csv"
    pattern = str(labelled["images"] / "*" / "*.png")
    code, stdout, err = run_main(
        "predict", pattern, "--checkpoint", str(labelled["checkpoint"]), "--out", str(out),
        "--top-k", "2",
    )  # fmt: skip
    assert code == 0, err
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 12 and "wrote 12 predictions" in stdout
    assert list(rows[0]) == [
        "image", "class_1", "name_1", "probability_1", "class_2", "name_2", "probability_2",
    ]  # fmt: skip
    for row in rows:
        assert row["name_1"] == f"class {row['class_1']}"  # the checkpoint records no names
        assert float(row["probability_1"]) >= float(row["probability_2"])


def test_class_names_come_from_the_recipe_and_json_names_the_model(labelled, tmp_path):
    out = tmp_path / "top.json"
    predict([labelled["images"] / "bee"], checkpoint=labelled["checkpoint"],
            recipe=str(labelled["recipe"]), out=out, top_k=3)  # fmt: skip
    written = json.loads(out.read_text())
    assert written["model"] == "debiformer_nano" and written["failed"] == []
    assert written["preprocessing"] == {"size": 40, "crop_pct": 0.8, "interpolation": "bilinear"}
    assert len(written["predictions"]) == 6
    top = written["predictions"][0]["top"]
    assert sorted(entry["name"] for entry in top) == CLASSES
    assert sum(entry["probability"] for entry in top) == pytest.approx(1.0)


def test_unreadable_files_are_skipped_with_a_notice_and_exit_code_1(run_main, labelled, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    good = labelled["images"] / "cat" / "0.png"
    out = tmp_path / "top.csv"
    code, stdout, err = run_main(
        "predict", str(tmp_path / "broken.png"), str(good), str(tmp_path / "empty.jpg"),
        str(tmp_path / "notes.txt"), "--checkpoint", str(labelled["checkpoint"]),
        "--out", str(out),
    )  # fmt: skip
    assert code == 1
    notices = [line for line in err.splitlines() if line.startswith("skipped:")]
    assert len(notices) == 3 and all("fix or remove it" in line for line in notices)
    assert [row["image"] for row in csv.DictReader(out.open())] == [str(good)]
    assert "3 of 4 files not read" in stdout


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["missing.png"], "missing.png: no such file or folder"),
        (["*.nothing"], "*.nothing: no file matches this pattern"),
        (["{images}", "--out", "top.txt"], "--out top.txt: expected a .csv or .json file name"),
        (["{images}", "--top-k", "0"], "--top-k must be at least 1"),
        (["{images}", "--precision", "fp8"], "--precision"),
    ],
)
def test_bad_input_is_one_line_before_any_image_is_read(
    run_main, labelled, tmp_path, monkeypatch, arguments, message
):
    monkeypatch.chdir(tmp_path)
    arguments = [a.format(images=labelled["images"]) for a in arguments]
    code, _, err = run_main("predict", *arguments, "--checkpoint", str(labelled["checkpoint"]))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert message in err
    assert not (tmp_path / "top.txt").exists()


@pytest.mark.parametrize(
    ("load", "task"), [(load_segmenter, "segmentation"), (load_detector, "detection")]
)
def test_a_dense_model_needs_a_recipe_of_its_task(labelled, load, task):
    file = open_weights(labelled["checkpoint"])  # stores no recipe
    expected = f"a {task} model needs its recipe's {task} settings"
    for recipe in (None, str(labelled["recipe"])):  # none, then a classification recipe
        with pytest.raises(UserError, match=expected):
            load(file, recipe)


def test_folders_give_their_images_once_in_order(labelled):
    files = image_files([labelled["images"] / "ant", labelled["images"] / "ant" / "0.png"])
    assert [f.name for f in files] == ["0.png", "1.jpg", "2.png", "3.png", "4.jpg", "5.png"]


def test_segmentation_label_pngs_give_the_miou_eval_computes(mosaics, tmp_path, run_main):
    """A segmenter's PNGs (pixel value = class) scored against the validation masks give `eval`'s
    mIoU, with a test ratio and flip as the recipe's evaluation says."""
    from debiformer.tasks.segmentation import SegmentationTask
    from debiformer.tasks.segmentation_metrics import confusion_matrix, segmentation_metrics
    from tests.helpers.recipes import segmentation_recipe, write_recipe

    path = write_recipe(tmp_path / "seg.yaml", segmentation_recipe(mosaics, "fpn"))
    overrides = ["segmentation.eval_ratios=[0.75,1.0]", "segmentation.eval_flip=true"]
    recipe = load_recipe(str(path), overrides)
    path = write_recipe(tmp_path / "seg_eval.yaml", recipe_to_dict(recipe))
    torch.manual_seed(0)
    model = build_model(ModelSpec.from_recipe(recipe, 11))[0]
    checkpoint = tmp_path / "weights.pt"
    torch.save(model.state_dict(), checkpoint)
    evaluated = evaluate_checkpoint(recipe, checkpoint)
    out = tmp_path / "labels"
    code, stdout, err = run_main(
        "predict", str(recipe.data.val_path), "--checkpoint", str(checkpoint), "--recipe",
        str(path), "--out", str(out), "--overlay",
    )  # fmt: skip
    assert code == 0, err
    assert "wrote 3 label PNGs" in stdout
    data = SegmentationTask(recipe).read_data("val")
    confusion = torch.zeros(len(data.class_names), len(data.class_names), dtype=torch.int64)
    for index, (image_path, _) in enumerate(data.samples.pairs):
        written = Image.open(out / f"{image_path.stem}.png")
        assert written.mode == "P" and written.size == Image.open(image_path).size
        assert (out / f"{image_path.stem}-overlay.png").is_file()
        labels = torch.from_numpy(np.array(written)).long()
        _, mask = data.samples[(0, index)]
        confusion += confusion_matrix(labels, mask, len(data.class_names))
    miou = segmentation_metrics(confusion, data.class_names)["miou"]
    assert miou == pytest.approx(evaluated["miou"], abs=1e-9)


def test_a_segmenter_needs_a_folder_to_write_into(mosaics, tmp_path, run_main):
    from tests.helpers.recipes import segmentation_recipe, write_recipe

    path = write_recipe(tmp_path / "seg.yaml", segmentation_recipe(mosaics, "fpn"))
    recipe = load_recipe(str(path))
    checkpoint = tmp_path / "weights.pt"
    torch.save(build_model(ModelSpec.from_recipe(recipe, 11))[0].state_dict(), checkpoint)
    code, _, err = run_main(
        "predict", str(recipe.data.val_path), "--checkpoint", str(checkpoint), "--recipe",
        str(path), "--out", str(tmp_path / "labels.csv"),
    )  # fmt: skip
    assert code == 2 and "--out" in err and "give a folder" in err


def test_detection_results_are_evals_detections_and_load_in_pycocotools(
    mosaics, tmp_path, run_main, monkeypatch
):
    """A Mask R-CNN's COCO results JSON holds the detections `eval` scores (the same image ids,
    categories, boxes, scores and RLE masks), reads back with `loadRes`, and scores `eval`'s box
    and mask AP against the validation annotations."""
    from debiformer.data.coco import load_coco
    from debiformer.tasks import detection
    from debiformer.tasks.coco_metrics import coco_metrics
    from tests.helpers.recipes import detection_recipe, write_recipe

    # one image per batch, as predict reads them: a batch pads its images to one size, which
    # moves boxes by float rounding (about 1e-6 pixels)
    recipe = detection_recipe(mosaics, "maskrcnn", train={"eval_batch_size": 1})
    path = write_recipe(tmp_path / "det.yaml", recipe)
    recipe = load_recipe(str(path))
    torch.manual_seed(0)
    checkpoint = tmp_path / "weights.pt"
    torch.save(build_model(ModelSpec.from_recipe(recipe, 10))[0].state_dict(), checkpoint)
    scored_by_eval = []

    def keep_results(ground_truth, results, iou_types):
        scored_by_eval.extend(results)
        return coco_metrics(ground_truth, results, iou_types)

    monkeypatch.setattr(detection, "coco_metrics", keep_results)
    evaluated = evaluate_checkpoint(recipe, checkpoint)
    out = tmp_path / "results.json"
    code, stdout, err = run_main(
        "predict", str(recipe.data.val_path), "--checkpoint", str(checkpoint), "--recipe",
        str(path), "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    results = json.loads(out.read_text())
    assert len(results) == len(scored_by_eval) > 0 and f"wrote {len(results)} detections" in stdout

    def key(entry):
        return entry["image_id"], entry["score"]

    for ours, theirs in zip(sorted(results, key=key), sorted(scored_by_eval, key=key), strict=True):
        assert (ours["image_id"], ours["category_id"]) == (
            theirs["image_id"],
            theirs["category_id"],
        )
        assert ours["bbox"] == pytest.approx(theirs["bbox"]) and ours["score"] == pytest.approx(
            theirs["score"]
        )
        assert ours["segmentation"] == theirs["segmentation"]
    ground_truth = load_coco(recipe.data.val_annotations)
    assert ground_truth.loadRes([dict(r) for r in results]).getAnnIds()  # pycocotools reads it
    scored = coco_metrics(ground_truth, results, ("bbox", "segm"))
    assert scored["bbox_ap"] == pytest.approx(evaluated["bbox_ap"])
    assert scored["segm_ap"] == pytest.approx(evaluated["segm_ap"])


@pytest.mark.slow
def test_an_onnx_export_predicts_what_its_pytorch_model_does(exported_onnx, tmp_path):
    """`--runtime onnxruntime` on an ONNX file: its recorded preprocessing and the same top-k
    (ImageNet's names, 1000 classes) as the PyTorch model it was exported from."""
    from debiformer.tools import export
    from debiformer.tools.classifier import Preprocessing

    for index in range(3):
        Image.new("RGB", (50 + 9 * index, 40), (70 * index, 120, 30)).save(
            tmp_path / f"{index}.png"
        )
    onnx_rows, failures = predict(
        [tmp_path], checkpoint=exported_onnx.path, runtime_name="onnxruntime", top_k=3
    )
    assert failures == [] and len(onnx_rows) == 3
    model, config = export.build_model(exported_onnx.options)
    preprocessing = Preprocessing(33, config["crop_pct"], config["interpolation"])
    for row in onnx_rows:
        crop = preprocessing.crop(Image.open(row.image).convert("RGB"))
        with torch.no_grad():
            probabilities = model(preprocessing.normalise(crop[None], torch.device("cpu")))
        top = probabilities.softmax(-1)[0].topk(3)
        assert row.classes == top.indices.tolist()
        torch.testing.assert_close(torch.tensor(row.probabilities), top.values, atol=1e-4, rtol=0)
        assert len(row.names) == 3 and row.names[0] != "class 0"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"checkpoint": "model.pt"}, "runs an ONNX file: give checkpoint=FILE.onnx"),
        ({"checkpoint": "m.onnx", "precision": "bf16"}, "runs on the CPU in fp32"),
        ({"checkpoint": "m.onnx", "runtime_name": "tvm"}, "unknown runtime 'tvm'"),
    ],
)
def test_the_onnx_runtime_is_refused_in_one_line_where_it_cannot_run(tmp_path, options, message):
    from debiformer.errors import UserError

    pytest.importorskip("onnxruntime")
    options = {"runtime_name": "onnxruntime", **options}
    with pytest.raises(UserError, match=message):
        predict([tmp_path], **options)
