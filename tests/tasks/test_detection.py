"""Detection end to end on a handful of real mosaics: Mask R-CNN and RetinaNet with a small
nano backbone each train a step, evaluate with COCO metrics, write predictions.png and pick
best.pt by box AP; `debiformer eval` prints the AP table; bad data gives one line."""

import json

import pytest
import torch
from typer.testing import CliRunner

from debiformer.cli.main import app
from debiformer.data.coco import DetectionLoader, read_split
from debiformer.errors import UserError
from debiformer.recipe import load_recipe
from debiformer.tasks import evaluate_checkpoint, train
from debiformer.weights import ModelSpec, build_model
from tests.helpers.cli import run_in_child
from tests.helpers.recipes import detection_recipe, write_recipe


@pytest.mark.parametrize("detector", ["maskrcnn", "retinanet"])
def test_a_detector_trains_and_evaluates_on_mosaics(mosaics, tmp_path, detector):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", detection_recipe(mosaics, detector)))
    run_dir = tmp_path / "run"
    summary = train(recipe, run_dir=run_dir)
    assert summary["steps"] == 2 and summary["best_metric"] == "bbox_ap"
    expected = {"bbox_ap", "bbox_ap50", "bbox_ap75", "bbox_ap_small", "bbox_ap_large"}
    if detector == "maskrcnn":
        expected |= {"segm_ap", "segm_ap50"}
    epoch = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epoch[-1]["kind"] == "epoch"
    assert {key: summary[key] for key in expected} == {key: epoch[-1][key] for key in expected}
    assert summary["best_bbox_ap"] == epoch[-1]["bbox_ap"]
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    png = (run_dir / "predictions.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_training_batches_hold_flipped_tv_tensors_the_same_for_any_start(mosaics):
    data = read_split(
        mosaics / "images" / "train",
        mosaics / "annotations" / "instances_train.json",
        train=True,
        masks=True,
        seed=5,
    )
    loader = DetectionLoader(
        data, batch_size=2, train=True, device=torch.device("cpu"), num_workers=0, seed=5
    )
    batches = list(loader.batches(epoch=1))
    assert len(batches) == len(loader) == 4
    images, targets = batches[1]
    for image, target in zip(images, targets, strict=True):
        assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
        assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"]) >= 1
        assert target["labels"].min() >= 1 and target["labels"].max() <= 10
    resumed_images, resumed_targets = next(iter(loader.batches(epoch=1, start_batch=1)))
    assert all(torch.equal(a, b) for a, b in zip(images, resumed_images, strict=True))
    assert all(
        torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, resumed_targets, strict=True)
    )


def test_eval_command_prints_the_coco_table_and_writes_json(mosaics, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", detection_recipe(mosaics, "maskrcnn"))
    recipe = load_recipe(path)
    model = build_model(ModelSpec.from_recipe(recipe, 10))[0]
    checkpoint = tmp_path / "weights.pt"
    torch.save(model.state_dict(), checkpoint)
    out = tmp_path / "eval" / "result.json"
    args = ["eval", str(path), "--checkpoint", str(checkpoint), "--json", str(out)]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "AP50" in done.output and "mask" in done.output
    result = json.loads(out.read_text())
    assert {"bbox_ap", "segm_ap", "images"} <= result.keys() and result["images"] == 3
    assert (out.parent / "predictions.png").is_file()
    refused = CliRunner().invoke(app, [*args, "--official"])
    assert isinstance(refused.exception, UserError)
    assert "only classification checkpoints" in str(refused.exception)


@pytest.mark.slow
def test_two_processes_evaluate_every_image_once_gathered_on_rank_0(mosaics, tmp_path):
    """Trained and evaluated under torchrun (gloo, 2 processes, a shard each), the summary's COCO
    metrics equal those of one process evaluating the same checkpoint on all images."""
    path = write_recipe(tmp_path / "r.yaml", detection_recipe(mosaics, "retinanet"))
    run_dir = tmp_path / "run"
    done = run_in_child("train", str(path), "--out", str(run_dir), torchrun=["--nproc-per-node=2"])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    alone = evaluate_checkpoint(load_recipe(path), run_dir / "checkpoints" / "last.pt")
    for key in ("bbox_ap", "bbox_ap50", "bbox_ap75", "bbox_ar100"):
        assert summary[key] == pytest.approx(alone[key], abs=1e-6), key


def test_a_corrupt_annotation_file_stops_training_in_one_line(mosaics, tmp_path):
    broken = tmp_path / "instances_train.json"
    text = (mosaics / "annotations" / "instances_train.json").read_text()
    broken.write_text(text[: len(text) // 2])
    recipe = detection_recipe(mosaics, "retinanet", data={"train_annotations": str(broken)})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(UserError, match=f"{broken}: not JSON") as error:
        train(load_recipe(path), run_dir=tmp_path / "run")
    assert "\n" not in str(error.value)
