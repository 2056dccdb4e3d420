"""Recipe files for tests: a recipe as a dict, some of its sections changed key by key, written
as YAML; the small detection and segmentation recipes of a mosaics set."""

from pathlib import Path

import yaml


def merge_sections(recipe: dict, **sections: dict) -> dict:
    """`recipe` with each of `sections` merged into its section of that name (their keys win)."""
    merged = dict(recipe)
    for section, values in sections.items():
        merged[section] = {**merged.get(section, {}), **values}
    return merged


def write_recipe(path: Path, recipe: dict, **sections: dict) -> Path:
    """Writes `merge_sections(recipe, **sections)` as YAML at `path`; returns `path`."""
    path.write_text(yaml.safe_dump(merge_sections(recipe, **sections)))
    return path


SMALL_BACKBONE = {"dims": [32, 32, 32, 32], "depths": [1, 1, 1, 1], "offset_groups": [1, 1, 1, 1]}


def mosaics_recipe(task: str, files: dict, options: dict, schedule: dict) -> dict:
    """A `task` recipe on a mosaics set's `files` (its data section): a 0.2 M-parameter nano
    backbone, `options` as the task's section, one CPU process."""
    return {
        "task": task,
        "model": {"name": "debiformer_nano", "arch": SMALL_BACKBONE},
        "data": {**files, "num_workers": 0},
        task: {"fpn_channels": 16, "preview_images": 2, **options},
        "optim": {"lr": 1e-3, "lr_base_batch": None},
        "schedule": schedule,
        "train": {"batch_size": 4, "device": "cpu", "seed": 1},
        "output": {"log_every": 1, "progress": False},
    }


def detection_recipe(mosaics: Path, detector: str, **sections: dict) -> dict:
    """Detection on the COCO files of `mosaics` with `detector` and narrow heads, one epoch;
    `sections` override its keys."""
    files = {
        "train_path": str(mosaics / "images" / "train"),
        "train_annotations": str(mosaics / "annotations" / "instances_train.json"),
        "val_path": str(mosaics / "images" / "val"),
        "val_annotations": str(mosaics / "annotations" / "instances_val.json"),
    }
    options = {
        "detector": detector,
        "representation_size": 32,
        "min_size": 64,
        "max_size": 64,
        "rois_per_image": 16,
    }
    schedule = {"epochs": 1, "warmup_epochs": 0.5, "decay": "step", "milestones": [0.5]}
    return merge_sections(mosaics_recipe("detection", files, options, schedule), **sections)


def segmentation_recipe(mosaics: Path, head: str, **sections: dict) -> dict:
    """Semantic segmentation on the label maps of `mosaics` with `head` (fpn or upernet), narrow
    channels and 48-pixel crops, 5 steps; `sections` override its keys."""
    files = {
        "train_path": str(mosaics / "images" / "train"),
        "train_masks": str(mosaics / "labels" / "train"),
        "val_path": str(mosaics / "images" / "val"),
        "val_masks": str(mosaics / "labels" / "val"),
        "classes": str(mosaics / "classes.txt"),
    }
    options = {
        "head": head,
        "channels": 16,
        "aux_channels": 8,
        "scale": [256, 64],
        "ratio_range": [0.75, 1.25],
        "crop_size": 48,
        "eval_stride": 32,
    }
    schedule = {"epochs": None, "steps": 5, "warmup_steps": 1, "decay": "poly"}
    return merge_sections(mosaics_recipe("segmentation", files, options, schedule), **sections)
