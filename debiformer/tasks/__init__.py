"""Tasks the training engine runs (`debiformer.engine.Task`): what differs between them.

`train` and `evaluate_checkpoint` pick the task a recipe names (`task:`), importing only its
module, so classification never needs the dense tasks' extras.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from debiformer.recipe import Recipe

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
