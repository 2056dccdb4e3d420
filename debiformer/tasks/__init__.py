"""The tasks the training engine runs, by the name a recipe gives (`task:`).

    classification   ClassificationTask   top-1 (FFCV, torchvision or synthetic images)
    detection        DetectionTask        COCO box AP (torchvision's heads)
    segmentation     SegmentationTask     mIoU (Semantic FPN, UperNet)

A task class is imported on first use, so classification never needs the dense tasks' extras.
Each is an `engine.Task` built as `TaskClass(recipe, run_dir=None)`, and evaluates a checkpoint
for `debiformer eval` with `evaluate_checkpoint(checkpoint, use_ema=..., json_path=...)`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from debiformer import runtime
from debiformer.engine import Task, fit
from debiformer.errors import UserError
from debiformer.recipe import Recipe, recipe_from_stored
from debiformer.weights import ModelSpec, WeightsFile, build_model, open_weights

TASKS = {
    "classification": "debiformer.tasks.classification:ClassificationTask",
    "detection": "debiformer.tasks.detection:DetectionTask",
    "segmentation": "debiformer.tasks.segmentation:SegmentationTask",
}
TASK_NAMES = tuple(TASKS)


@dataclass
class Evaluation:
    """What evaluating a model gives: its metrics (the same on every rank) and a few of this
    rank's inputs with their predictions, for a figure (none for classification)."""

    metrics: dict[str, Any]
    previews: list[Any] = field(default_factory=list)


def eval_batch_size(recipe: Recipe) -> int:
    """The batch of an evaluation in one process: `train.eval_batch_size`, else a training
    micro-batch."""
    return recipe.train.eval_batch_size or recipe.train.batch_size // recipe.train.accum_steps


def open_checkpoint(
    recipe: Recipe, checkpoint: str | Path, json_path: str | Path | None
) -> tuple[WeightsFile, torch.device, str]:
    """What every `evaluate_checkpoint` starts with, before any long work: `json_path` checked
    writable, the checkpoint read, the recipe's device and precision checked. Returns (the
    checkpoint, read once, the device, the precision as it runs there: `auto` resolved)."""
    if json_path is not None:
        runtime.check_writable(json_path, "json_path")
    file = open_weights(checkpoint)
    device = runtime.select_device(recipe.train.device, option="train.device")
    precision = runtime.resolve_precision(recipe.train.precision, device, option="train.precision")
    return file, device, precision


def start_model(recipe: Recipe, spec: ModelSpec) -> nn.Module:
    """The network `spec` describes, started from the recipe's `model.pretrained` when that is
    set (`model.pretrained_ema`, `model.new_head`), through `weights.build_model`."""
    model = recipe.model
    network, _ = build_model(
        spec, pretrained=model.pretrained, ema=model.pretrained_ema, new_head=model.new_head
    )
    return network


def task_class(name: str) -> type[Task]:
    """The Task class of the task `name`, its module imported now."""
    if name not in TASKS:
        raise UserError(f"task: {name!r} is not a task; choose one of {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_task(recipe: Recipe, run_dir: str | Path | None = None) -> Task:
    """The task the recipe names, writing its figures (predictions.png) into `run_dir`."""
    return task_class(recipe.task)(recipe, run_dir)


def train(
    recipe: Recipe,
    *,
    run_dir: str | Path,
    resume: str | Path | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Trains what the recipe describes (`debiformer train`); returns the run's summary. The
    tasks of a Slurm job of several tasks (`srun debiformer train ...`) train as one job
    (`runtime.adopt_slurm_environment`). Freed host memory is kept for reuse
    (`runtime.keep_freed_memory`)."""
    runtime.adopt_slurm_environment()
    runtime.keep_freed_memory()
    return fit(recipe, build_task(recipe, run_dir), run_dir=run_dir, resume=resume, fresh=fresh)


def evaluate_checkpoint(recipe: Recipe, checkpoint: str | Path, **options: Any) -> dict[str, Any]:
    """The validation metrics of a checkpoint for the recipe's task (`debiformer eval`):
    `options` are the task's `evaluate_checkpoint` options."""
    return build_task(recipe).evaluate_checkpoint(checkpoint, **options)


def checkpoint_recipe(checkpoint: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe a training checkpoint of this tool stores, with `section.key=value`
    `overrides`: what `debiformer eval` evaluates a checkpoint with when given no recipe."""
    stored = open_weights(checkpoint).recipe
    if stored is None:
        raise UserError(
            f"checkpoint {checkpoint} stores no recipe (only this tool's training checkpoints "
            "do): give the recipe it was trained with"
        )
    return recipe_from_stored(stored, overrides)
