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
    tta: str | None = typer.Option(
        None,
        "--tta",
        help="Classifiers: flip (the mean of each image's and its mirror image's probabilities) "
        "or multi-crop (of five crops, corners and centre, of the image resized to size / crop "
        "ratio), reported beside the plain figures.",
    ),
    confusion: Path | None = typer.Option(
        None,
        "--confusion",
        help="Classifiers: also draw the confusion matrix in this figure file (.png; viz extra).",
    ),
    official: bool | None = typer.Option(
        None,
        "--official/--no-official",
        help="Treat as the authors' release (default: detect by key names).",
    ),
) -> None:
    """Validation metrics of a checkpoint for the task of RECIPE (else of the recipe the
    checkpoint stores): top-1/top-5, per-class top-1 and the confusion matrix (in --json) for
    classifiers, COCO box and mask AP for detectors, mIoU and per-class IoU for segmenters
    (whole, sliding or multi-scale + flip as the recipe's segmentation.eval_* keys say)."""
    from debiformer.recipe import load_recipe
    from debiformer.tasks import checkpoint_recipe, evaluate_checkpoint, task_class

    if recipe is None:
        loaded = checkpoint_recipe(checkpoint, overrides)
    else:
        loaded = load_recipe(recipe, overrides)
    options = {"use_ema": ema, "json_path": json_path}
    if loaded.task == "classification":
        options |= {"official": official, "tta": tta}
    elif official:
        raise UserError("--official: only classification checkpoints come from the release")
    elif tta is not None:
        raise UserError(f"--tta: takes classifiers; this is a {loaded.task} recipe")
    if confusion is not None:
        check_confusion_path(confusion, loaded.task)
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
    if "tta" in result:
        tta_line = f"with {result['tta']} test-time augmentation: top-1 {result['tta_top1']:.2f}%, "
        console.print(f"{tta_line}top-5 {result['tta_top5']:.2f}%", highlight=False)
    if confusion is not None:
        from debiformer.tools.plot import draw_confusion

        console.print(f"wrote {draw_confusion(result['confusion_matrix'], confusion)}")


def check_confusion_path(path: Path, task: str) -> None:
    """--confusion: a classifier's, a figure file matplotlib writes; checked before evaluating."""
    from debiformer.tools.plot import check_figure_path, require_matplotlib

    if task != "classification":
        raise UserError(f"--confusion: a {task} recipe's evaluation has no confusion matrix")
    require_matplotlib()
    check_figure_path(path)


# at most this many classes are listed one by one; beyond, the lowest top-1 are
LISTED_CLASSES = 20


def class_accuracy_table(result: dict) -> Table:
    """Top-1 per class: every class for up to `LISTED_CLASSES`, else the lowest ones."""
    rows = [(name, top1) for name, top1 in result["class_top1"].items() if top1 is not None]
    title = None
    if len(rows) > LISTED_CLASSES:
        rows = sorted(rows, key=lambda row: row[1])[:LISTED_CLASSES]
        title = f"the {LISTED_CLASSES} classes of lowest top-1"
    table = Table("class", "top-1", title=title)
    for name, top1 in rows:
        table.add_row(name, f"{top1:.2f}%")
    return table


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
TABLES = {
    "classification": class_accuracy_table,
    "detection": coco_table,
    "segmentation": class_table,
}
