"""`debiformer eval`: parse options, load the recipe, evaluate a checkpoint, print the metrics."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from debiformer.cli import options
from debiformer.errors import UserError

RECIPE_HELP = (
    f"{options.RECIPE_HELP} Default: the recipe a training checkpoint of this tool stores."
)


def evaluate(
    recipe: str | None = typer.Argument(None, help=RECIPE_HELP),
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="This tool's checkpoint or a released one."
    ),
    json_path: Path | None = typer.Option(
        None, "--json", help="Also write the results to this JSON file."
    ),
    overrides: list[str] = options.OVERRIDES,
    ema: bool = typer.Option(False, "--ema", help="Evaluate the checkpoint's EMA weights."),
    official: bool | None = typer.Option(
        None,
        "--official/--no-official",
        help="Treat as the authors' release (default: detect by key names).",
    ),
) -> None:
    """Validation metrics of a checkpoint for the task of RECIPE (else of the recipe the
    checkpoint stores): top-1/top-5 for classifiers, COCO box and mask AP for detectors, mIoU and
    per-class IoU for segmenters (whole, sliding or multi-scale + flip as the recipe's
    segmentation.eval_* keys say)."""
    from debiformer.recipe import load_recipe
    from debiformer.tasks import checkpoint_recipe, evaluate_checkpoint, task_class

    if recipe is None:
        loaded = checkpoint_recipe(checkpoint, overrides)
    else:
        loaded = load_recipe(recipe, overrides)
    options = {"use_ema": ema, "json_path": json_path}
    if loaded.task == "classification":
        options["official"] = official
    elif official:
        raise UserError("--official: only classification checkpoints come from the release")
    result = evaluate_checkpoint(loaded, checkpoint, **options)
    console = Console()
    head = f"{result['model']} ({result['weights']} weights) on {result['images']} images"
    if "mode" in result:
        head += f", {segmentation_mode(result)}"
    console.print(head, highlight=False, soft_wrap=True)
    if loaded.task in TABLES:
        console.print(TABLES[loaded.task](result))
    line = task_class(loaded.task).describe(result)
    if "images_per_s" in result:
        line += f", {result['images_per_s']:.0f} img/s"
    console.print(line, highlight=False)


def coco_table(result: dict) -> Table:
    """COCO's AP table: a row per kind (box, mask), a column per measure."""
    columns = ["ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"]
    table = Table("", "AP", "AP50", "AP75", "AP small", "AP medium", "AP large")
    for kind, name in (("bbox", "box"), ("segm", "mask")):
        if f"{kind}_ap" in result:
            table.add_row(name, *(f"{result[f'{kind}_{column}']:.3f}" for column in columns))
    return table


def segmentation_mode(result: dict) -> str:
    """How a segmenter was evaluated, e.g. 'whole image, ratios 0.5-1.75 + flip'."""
    text = "whole image" if result["mode"] == "whole" else "sliding window"
    ratios = result["ratios"]
    if ratios != [1.0]:
        text += f", ratios {min(ratios):g}-{max(ratios):g}"
    return text + (" + flip" if result["flip"] else "")


def class_table(result: dict) -> Table:
    """Per-class IoU and pixel accuracy (n/a where the class never occurs)."""
    table = Table("class", "IoU", "Acc")
    for name, iou in result["class_iou"].items():
        acc = result["class_acc"][name]
        table.add_row(name, *("n/a" if v is None else f"{v:.4f}" for v in (iou, acc)))
    return table


# the tables `eval` prints above the task's metrics line, by task
TABLES = {"detection": coco_table, "segmentation": class_table}
