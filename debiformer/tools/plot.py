"""`debiformer plot`: the training curves of run directories overlaid in one figure (drawn by
`debiformer.curves`), each run's validation curve the metric its task declares to pick best.pt;
the figure checks that `debiformer show` shares; and the confusion matrix of a classifier's
`debiformer eval`. Figures need matplotlib (the `viz` extra)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from debiformer import runtime
from debiformer.curves import draw_runs, read_mapping, read_records, read_run, save_figure
from debiformer.errors import UserError
from debiformer.tasks import TASK_NAMES, task_class

__all__ = [
    "check_figure_path",
    "draw_confusion",
    "plot_runs",
    "require_matplotlib",
    "run_metric",
    "save_figure",
]

VIZ_INSTALL = "pip install 'debiformer[viz]'"
CONFUSION_DPI = 120


def run_metric(run_dir: str | Path) -> str | None:
    """The validation metric of a run: its summary's `best_metric`; for an unfinished run, the
    best metric its recipe's task declares (classification where the recipe names none), else
    the first task's best metric that its metrics lines hold."""
    run_dir = Path(run_dir)
    summary = read_mapping(run_dir / "summary.json", json.loads)
    if summary.get("best_metric"):
        return summary["best_metric"]
    recipe = read_mapping(run_dir / "recipe.yaml", yaml.safe_load)
    if recipe:
        task = recipe.get("task", "classification")
        return task_class(task).best_metric if task in TASK_NAMES else None
    keys = {key for record in read_records(run_dir) for key in record}
    metrics = (task_class(name).best_metric for name in TASK_NAMES)
    return next((metric for metric in metrics if metric in keys), None)


def require_matplotlib() -> None:
    """A one-line `UserError` when matplotlib (the `viz` extra) is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f"figures need matplotlib: {VIZ_INSTALL}") from None


def check_figure_path(out: Path) -> None:
    """A one-line `UserError` about `out` for a figure path whose format matplotlib cannot
    write, or whose folder is not writable; checked before any work."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix[1:].lower() not in formats:
        raise UserError(f"{out}: give a file name ending in .png (or .svg, .pdf, ...)", about="out")
    runtime.check_writable(out, "out")


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """`debiformer plot`: the curves of `run_dirs` overlaid in one figure at `out`, with a legend
    of their recipe names (and folder, where names repeat), validation metrics of different
    scales on separate axes (`curves.runs_figure`). Returns `out`."""
    require_matplotlib()
    out = Path(out)
    check_figure_path(out)
    runs = [read_run(run_dir, run_metric(run_dir)) for run_dir in run_dirs]
    draw_runs(runs, out)
    return out


def draw_confusion(report: dict, out: str | Path) -> Path:
    """The confusion matrix of a classification `eval` (`class_report`'s "confusion_matrix")
    as a figure at `out`: rows the true classes, columns the top-1 classes, each row's share
    of its images in colour, the counts written in the cells when there are 30 classes or
    fewer. Returns `out`."""
    require_matplotlib()
    import numpy as np
    from matplotlib.figure import Figure

    names, counts = report["classes"], np.asarray(report["counts"], dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(4 + 0.45 * len(names), 40)
    figure = Figure(figsize=(side, side * 0.9))
    axes = figure.subplots()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true class's images")
    if len(names) <= 30:
        ticks = range(len(names))
        axes.set_xticks(ticks, names, rotation=60, ha="right")
        axes.set_yticks(ticks, names)
        for row, column in np.ndindex(counts.shape):
            colour = "white" if shares[row, column] > 0.5 else "black"
            axes.text(column, row, f"{counts[row, column]:.0f}", ha="center", va="center",
                      fontsize=7, color=colour)  # fmt: skip
    axes.set_xlabel("predicted (top-1)")
    axes.set_ylabel("true class")
    figure.tight_layout()
    save_figure(figure, Path(out), dpi=CONFUSION_DPI)
    return Path(out)
