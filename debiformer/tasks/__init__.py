"""Tasks the training engine runs (`debiformer.engine.Task`): what differs between them.

`train` and `evaluate_checkpoint` pick the task a recipe names (`task:`), importing only its
module, so classification never needs the dense tasks' extras.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from debiformer import runtime
from debiformer.checkpoint import load_checkpoint
from debiformer.recipe import ModelConfig, Recipe
from debiformer.weights import load_weights

MODULES = {
    "classification": "debiformer.tasks.classification",
    "detection": "debiformer.tasks.detection",
    "segmentation": "debiformer.tasks.segmentation",
}


def train(
    recipe: Recipe,
    *,
    run_dir: str | Path,
    resume: str | Path | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Trains what the recipe describes (`debiformer train`); returns the run's summary."""
    module = importlib.import_module(MODULES[recipe.task])
    return module.train(recipe, run_dir=run_dir, resume=resume, fresh=fresh)


def evaluate_checkpoint(recipe: Recipe, checkpoint: str | Path, **options: Any) -> dict[str, Any]:
    """The validation metrics of a checkpoint for the recipe's task (`debiformer eval`)."""
    module = importlib.import_module(MODULES[recipe.task])
    return module.evaluate_checkpoint(recipe, checkpoint, **options)


@dataclasses.dataclass
class CheckpointEvaluation:
    """What `evaluate_checkpoint` of a dense task evaluates: the model with the checkpoint's
    weights on the device, which weights those are, the validation data and its loader."""

    model: nn.Module
    weights: str
    data: Any
    loader: Any
    device: torch.device


def prepare_checkpoint_evaluation(
    recipe: Recipe,
    checkpoint: str | Path,
    *,
    use_ema: bool,
    json_path: str | Path | None,
    read_data: Callable[[Recipe, str], Any],
    build_loader: Callable[..., Any],
    build_model: Callable[[ModelConfig, int], nn.Module],
) -> CheckpointEvaluation:
    """The set-up `debiformer eval` shares between dense tasks: `--json` checked writable, the
    device and precision checked, the validation split read with the task's `read_data` and
    `build_loader`, the task's `build_model(model_config, num_classes)` given every weight from
    the checkpoint (nothing is read from `model.pretrained`)."""
    if json_path is not None:
        runtime.check_writable(json_path, "--json")
    state = load_checkpoint(checkpoint)
    device = runtime.select_device(recipe.train.device, option="train.device")
    runtime.check_precision(recipe.train.precision, device, option="train.precision")
    data = read_data(recipe, "val")
    batch_size = recipe.train.eval_batch_size or recipe.train.batch_size // recipe.train.accum_steps
    loader = build_loader(recipe, data, device, batch_size, train=False)
    backbone = dataclasses.replace(recipe.model, pretrained=None)
    model = build_model(backbone, len(data.class_names))
    weights = load_weights(model, state, Path(checkpoint), use_ema=use_ema, official=False)
    return CheckpointEvaluation(model.to(device), weights, data, loader, device)
