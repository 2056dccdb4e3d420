"""Segmentation end to end on a handful of real mosaics: Semantic FPN and UperNet with a small
nano backbone train on a schedule in steps, evaluate to mIoU, write predictions.png and pick
best.pt by mIoU, alone and under a two-process gloo run; `debiformer eval` prints the per-class
table whole, sliding and multi-scale + flip; bad masks give one line."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from debiformer.cli.main import app
from debiformer.errors import UserError
from debiformer.recipe import load_recipe
from debiformer.tasks import evaluate_checkpoint, train
from debiformer.weights import ModelSpec, build_model
from tests.helpers.cli import run_in_child
from tests.helpers.recipes import segmentation_recipe, write_recipe


@pytest.mark.parametrize("head", ["fpn", "upernet"])
def test_a_segmenter_trains_and_evaluates_on_mosaics(mosaics, tmp_path, head):
    path = write_recipe(tmp_path / "r.yaml", segmentation_recipe(mosaics, head))
    run_dir = tmp_path / "run"
    summary = train(load_recipe(path), run_dir=run_dir)
    assert summary["steps"] == 5 and summary["best_metric"] == "miou"
    present = [iou for iou in summary["class_iou"].values() if iou is not None]
    assert summary["miou"] == pytest.approx(sum(present) / len(present))
    assert set(summary["class_iou"]) == set((mosaics / "classes.txt").read_text().split("\n")[:-1])
    evaluated = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["best_miou"] == max(r["miou"] for r in evaluated if r["kind"] == "epoch")
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert (run_dir / "predictions.png").stat().st_size > 0


def test_eval_command_prints_the_class_table_in_each_mode(mosaics, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", segmentation_recipe(mosaics, "upernet"))
    recipe = load_recipe(path)
    torch.manual_seed(0)
    model = build_model(ModelSpec.from_recipe(recipe, 11))[0]
    checkpoint = tmp_path / "weights.pt"
    torch.save(model.state_dict(), checkpoint)
    results, printed = {}, {}
    modes = {
        "whole": [],
        "slide": ["--set", "segmentation.eval_mode=slide"],
        "ms_flip": [
            "--set", "segmentation.eval_ratios=[0.5,0.75,1.0,1.25,1.5,1.75]",
            "--set", "segmentation.eval_flip=true",
        ],
    }  # fmt: skip
    for name, options in modes.items():
        out = tmp_path / name / "result.json"
        args = ["eval", str(path), "--checkpoint", str(checkpoint), "--json", str(out), *options]
        done = CliRunner().invoke(app, args)
        assert done.exit_code == 0, done.output
        assert "mIoU" in done.output and "Sandal" in done.output
        printed[name] = done.output
        results[name] = json.loads(out.read_text())
        assert results[name]["images"] == 3
        assert (out.parent / "predictions.png").is_file()
    assert "images, whole image" in printed["whole"] and "sliding window" in printed["slide"]
    assert "ratios 0.5-1.75 + flip" in printed["ms_flip"]
    assert results["ms_flip"]["flip"] and results["ms_flip"]["ratios"][0] == 0.5
    assert len({results[name]["miou"] for name in modes}) > 1


@pytest.mark.slow
def test_two_processes_train_both_heads_and_count_every_pixel_once(mosaics, tmp_path):
    """Under torchrun (gloo, 2 processes) each head takes its training steps, and the confusion
    matrix summed over both shards gives the mIoU one process gives on all images."""
    for head in ("fpn", "upernet"):
        path = write_recipe(tmp_path / f"{head}.yaml", segmentation_recipe(mosaics, head))
        run_dir = tmp_path / head
        done = run_in_child(
            "train", str(path), "--out", str(run_dir), torchrun=["--nproc-per-node=2"]
        )
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == 5
        alone = evaluate_checkpoint(load_recipe(path), run_dir / "checkpoints" / "last.pt")
        for key in ("miou", "macc", "aacc"):
            assert summary[key] == pytest.approx(alone[key], abs=1e-6), (head, key)


def test_a_mask_with_a_value_beyond_the_classes_stops_training_in_one_line(mosaics, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for source in sorted((mosaics / "labels" / "train").iterdir()):
        (masks / source.name).write_bytes(source.read_bytes())
    bad = masks / sorted(p.name for p in masks.iterdir())[2]
    Image.fromarray(np.full((64, 64), 12, dtype=np.uint8)).save(bad)
    recipe = segmentation_recipe(mosaics, "fpn", data={"train_masks": str(masks), "num_workers": 1})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(UserError, match=f"{bad}") as error:
        train(load_recipe(path), run_dir=tmp_path / "run")
    assert "\n" not in str(error.value) and "12" in str(error.value)


def test_a_recipe_without_classes_or_masks_says_which_key_is_missing(mosaics, tmp_path):
    recipe = segmentation_recipe(mosaics, "fpn")
    path = write_recipe(tmp_path / "r.yaml", recipe, data={"classes": None})
    with pytest.raises(UserError, match="data.classes"):
        train(load_recipe(path), run_dir=tmp_path / "run")
    path = write_recipe(tmp_path / "r.yaml", recipe, data={"val_masks": None})
    with pytest.raises(UserError, match="data.val_masks: is not set"):
        train(load_recipe(path), run_dir=tmp_path / "run")
