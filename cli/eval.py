"""`debiformer eval`: parse options, load the recipe, evaluate a checkpoint, print the metrics."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from debiformer.recipe import load_recipe

RECIPE_HELP = "Recipe YAML file, or the name of a shipped one (e.g. quickstart, tiny)."
SET_HELP = "Override a recipe value: section.key=value (repeatable), e.g. --set optim.lr=1e-3."


def evaluate(
    recipe: str = typer.Argument(..., help=RECIPE_HELP),
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="This tool's checkpoint or a released one."
    ),
    json_path: Path | None = typer.Option(
        None, "--json", help="Also write the results to this JSON file."
    ),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP, metavar="SECTION.KEY=VALUE"),
    ema: bool = typer.Option(False, "--ema", help="Evaluate the checkpoint's EMA weights."),
    official: bool | None = typer.Option(
        None,
        "--official/--no-official",
        help="Treat as the authors' release (default: detect by key names).",
    ),
) -> None:
    """Top-1, top-5, loss and images/s of a checkpoint on the recipe's validation set."""
    from debiformer.tasks.classification import evaluate_checkpoint

    result = evaluate_checkpoint(
        load_recipe(recipe, overrides),
        checkpoint,
        use_ema=ema,
        official=official,
        json_path=json_path,
    )
    Console().print(
        f"{result['model']} ({result['weights']} weights) on {result['images']} images: "
        f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
        f"{result['images_per_s']:.0f} img/s",
        highlight=False,
    )
