"""A backbone pretrained on Fashion-MNIST items drawn as the mosaics draw them
(`recipes/quickstart_items.yaml`) helps segmentation of mosaics (`quickstart_segmentation`):
both recipes scaled down to a 0.2 M-parameter backbone and a few hundred steps, the Semantic FPN
whose backbone starts from the classifier, at 0.3 times the head's lr, beats the one from scratch
with the same steps (measured for seeds 0-3: +0.070, +0.129, +0.128, +0.074 mIoU; at the full lr
the lead is -0.009, +0.074, +0.009, +0.056, within the run-to-run spread of a 150-step
segmentation). The test runs one seed, the one of smallest lead: each seed costs two
segmentation runs, about two minutes of the suite's time."""

from pathlib import Path

import pytest
import yaml

from debiformer.recipe import load_recipe
from debiformer.tasks import train
from tests.data.common import needs_fashion_mnist
from tests.helpers.recipes import SMALL_BACKBONE

MARGIN = 0.03  # mIoU by which the pretrained start must lead
SEED = 0  # of seeds 0-3, the one where it led least
ARCH = f"model.arch={yaml.safe_dump(SMALL_BACKBONE, default_flow_style=True).strip()}"


@pytest.fixture(scope="module")
def items_classifier(tmp_path_factory) -> Path:
    """The best checkpoint of `quickstart_items` with the small backbone after 300 steps of 128
    items, on FFCV files of 4,000 training and 1,000 test items."""
    folder = tmp_path_factory.mktemp("items")
    overrides = [
        ARCH,
        f"data.train_path={folder}/train.beton",
        f"data.val_path={folder}/test.beton",
        "data.ffcv_writer={write_mode: raw, subset: 4000}",
        "data.num_workers=1",
        "schedule.epochs=null",
        "schedule.steps=300",
        "schedule.warmup_steps=30",
        "train.batch_size=128",
        "output.progress=false",
    ]
    train(load_recipe("quickstart_items", overrides), run_dir=folder / "run")
    return folder / "run" / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def small_mosaics(tmp_path_factory) -> Path:
    """Where the runs write 300 training and 200 validation mosaics of 64x64 (the first one)."""
    return tmp_path_factory.mktemp("transfer") / "mosaics"


def segmentation_miou(mosaics: Path, run_dir: Path, seed: int, pretrained: Path | None) -> float:
    """The mIoU of `quickstart_segmentation` with the small backbone on `mosaics` after 150
    steps of 8 crops at lr 4e-3 (the `pretrained` backbone's at 0.3 times that)."""
    overrides = [
        ARCH,
        f"data.mosaics={{out: {mosaics}, train_images: 300, val_images: 200, canvas_size: 64}}",
        f"data.train_path={mosaics}/images/train",
        f"data.train_masks={mosaics}/labels/train",
        f"data.val_path={mosaics}/images/val",
        f"data.val_masks={mosaics}/labels/val",
        f"data.classes={mosaics}/classes.txt",
        "data.num_workers=0",
        "segmentation.scale=[256,64]",
        "segmentation.crop_size=64",
        "optim.lr=4e-3",
        "schedule.steps=150",
        "schedule.warmup_steps=15",
        "train.batch_size=8",
        f"train.seed={seed}",
        "output.progress=false",
    ]
    if pretrained is not None:
        overrides += [f"model.pretrained={pretrained}", "optim.pretrained_lr_scale=0.3"]
    summary = train(load_recipe("quickstart_segmentation", overrides), run_dir=run_dir)
    assert summary["steps"] == 150
    return summary["miou"]


@pytest.mark.slow
@needs_fashion_mnist
def test_a_backbone_pretrained_on_items_beats_scratch_on_mosaics(
    items_classifier, small_mosaics, tmp_path
):
    scratch = segmentation_miou(small_mosaics, tmp_path / "scratch", SEED, None)
    pretrained = segmentation_miou(small_mosaics, tmp_path / "pretrained", SEED, items_classifier)
    assert pretrained > scratch + MARGIN, f"scratch {scratch}, pretrained {pretrained}"
