"""A run's training curves: what its metrics.jsonl holds by curve (training loss, the validation
metric and its EMA, the learning rate, training images/s against optimizer steps), and the figure
of one or more runs (2x2; a validation panel more for each further scale of the runs' metrics,
so that percentages and fractions never share axes). The engine draws every run's curves.png
with it and `debiformer plot` overlays runs. Figures need matplotlib (the `viz` extra), imported
only when drawing."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from debiformer import runtime
from debiformer.errors import UserError

# The scale of the tasks' validation metrics (as their `engine.Metric`s print them): top-1 and
# top-5 in percent, COCO AP and the segmentation metrics as fractions. Curves on different scales
# are drawn on separate axes; a metric not listed (a loss, another task's) gets axes of its own.
METRIC_SCALES = {
    "top1": "%",
    "top5": "%",
    "bbox_ap": "0-1",
    "bbox_ap50": "0-1",
    "segm_ap": "0-1",
    "miou": "0-1",
    "macc": "0-1",
    "aacc": "0-1",
}


@dataclass
class Series:
    """One curve: y values at optimizer steps."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, value: float | None) -> None:
        """Appends a point; a missing value is skipped."""
        if value is not None:
            self.steps.append(step)
            self.values.append(value)


@dataclass
class RunCurves:
    """What a run directory's metrics.jsonl holds, by curve."""

    name: str
    run_dir: Path
    metric: str | None
    loss: Series = field(default_factory=Series)
    val_metric: Series = field(default_factory=Series)
    ema_metric: Series = field(default_factory=Series)
    lr: Series = field(default_factory=Series)
    images_per_s: Series = field(default_factory=Series)


def read_run(run_dir: str | Path, metric: str | None = None) -> RunCurves:
    """The curves of a run directory. Training loss, lr and images/s come from the `train` lines
    (the loss and lr from the `epoch` lines when a run logged none); the validation curve is
    `metric` (else the run's `best_metric` in summary.json) from the evaluated epochs."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    summary = read_mapping(run_dir / "summary.json", json.loads)
    recipe = read_mapping(run_dir / "recipe.yaml", yaml.safe_load)
    metric = metric or summary.get("best_metric")
    curves = RunCurves(summary.get("recipe") or recipe.get("name") or run_dir.name, run_dir, metric)
    train_lines = [record for record in records if record.get("kind") == "train"]
    for record in train_lines:
        curves.loss.add(record["step"], record.get("loss"))
        curves.lr.add(record["step"], record.get("lr"))
        curves.images_per_s.add(record["step"], record.get("images_per_s"))
    for record in records:
        if record.get("kind") != "epoch":
            continue
        if not train_lines:
            curves.loss.add(record["step"], record.get("train_loss"))
            curves.lr.add(record["step"], record.get("lr"))
        if metric is not None:
            curves.val_metric.add(record["step"], record.get(metric))
            curves.ema_metric.add(record["step"], record.get(f"ema_{metric}"))
    return curves


def read_records(run_dir: Path) -> list[dict]:
    """The JSON objects of a run's metrics.jsonl that hold a step; a one-line error for a folder
    without one, and for a line that is not UTF-8 text or not a JSON object (`metrics_line`)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        what = "does not exist" if not run_dir.exists() else "has no metrics.jsonl"
        raise UserError(f"run directory {run_dir} {what}: give the folder a training wrote")
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as error:
        raise UserError(
            f"{path} cannot be read ({error.strerror}); check its permissions"
        ) from None
    records = []
    for number, line in enumerate(lines, start=1):
        record = metrics_line(path, number, line, last=number == len(lines))
        if record is not None and isinstance(record.get("step"), int):
            records.append(record)
    return records


def metrics_line(path: Path, number: int, line: bytes, last: bool) -> dict | None:
    """Line `number` of the metrics file `path` as a JSON object; None for a blank line and for
    an unterminated `last` line that is not JSON (a killed write cut it). A one-line `UserError`
    naming the file and the line for any other line that is not UTF-8 text or not a JSON object.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(
            f"{path} line {number} is not UTF-8 text: a run's metrics.jsonl holds one JSON object "
            "per line; give the folder a training wrote"
        ) from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, an integer too long, nested too deep
        if last:
            return None
        record = None
    if not isinstance(record, dict):
        raise UserError(
            f"{path} line {number} is not a JSON object: a run's metrics.jsonl holds one per "
            "line; fix or remove the line"
        )
    return record


def read_mapping(path: Path, parse) -> dict:
    """A JSON or YAML file's mapping; empty when the file is missing or holds something else."""
    if not path.is_file():
        return {}
    try:
        content = parse(path.read_text())
    except (ValueError, yaml.YAMLError):
        return {}
    return content if isinstance(content, dict) else {}


def save_figure(figure, path: Path, dpi: int) -> None:
    """Writes a matplotlib `Figure` to `path` atomically, in the format its suffix names."""
    with runtime.atomic_writer(path, "wb") as file:
        figure.savefig(file, format=path.suffix[1:].lower(), dpi=dpi)


def write_run_curves(run_dir: str | Path, metric: str) -> Path:
    """<run_dir>/curves.png of one run, its validation curve `metric`."""
    out = Path(run_dir) / "curves.png"
    draw_runs([read_run(run_dir, metric)], out)
    return out


def run_labels(runs: list[RunCurves]) -> list[str]:
    """Legend labels: recipe names, with the run folder added where names repeat."""
    names = [run.name for run in runs]
    return [
        f"{run.name} ({run.run_dir.name})" if names.count(run.name) > 1 else run.name
        for run in runs
    ]


def metric_scale(metric: str) -> str:
    """The scale `metric`'s values are on: "%" or "0-1" (`METRIC_SCALES`), else the metric's own
    name (a scale of its own)."""
    return METRIC_SCALES.get(metric, metric)


def metrics_by_scale(metrics: Iterable[str]) -> dict[str, list[str]]:
    """The distinct `metrics`, sorted, grouped by `metric_scale`; one group per scale."""
    groups: dict[str, list[str]] = {}
    for metric in sorted(set(metrics)):
        groups.setdefault(metric_scale(metric), []).append(metric)
    return groups


def runs_figure(runs: list[RunCurves]):
    """The matplotlib `Figure` of the runs' curves against optimizer steps, in two rows of
    panels: training loss, the validation metric and its EMA (one panel per scale of the runs'
    metrics, `metrics_by_scale`: top-1 in percent never shares axes with AP or mIoU), the
    learning rate and training images/s. 2x2 when the runs' metrics share one scale."""
    from matplotlib.figure import Figure

    groups = metrics_by_scale(run.metric for run in runs if run.metric) or {"": []}
    columns = math.ceil((len(groups) + 3) / 2)
    figure = Figure(figsize=(5.5 * columns, 7.5), layout="constrained")
    grid = figure.subplots(2, columns, sharex=True)
    axes = list(grid.ravel())
    bottom = list(grid[1])
    if len(axes) > len(groups) + 3:  # the spare bottom-right panel; the one above shows steps
        axes.pop().remove()
        bottom[-1] = grid[0, -1]
        bottom[-1].xaxis.set_tick_params(labelbottom=True)
    loss, lr, speed = axes[0], axes[-2], axes[-1]
    validation = dict(zip(groups, axes[1:-2], strict=True))
    titles = {loss: "training loss", lr: "learning rate", speed: "training images/s"}
    for scale, metrics in groups.items():
        unit = f" ({scale})" if scale in METRIC_SCALES.values() else ""
        titles[validation[scale]] = f"validation {' / '.join(metrics) or 'metric'}{unit}"
    for panel in axes:
        panel.set_title(titles[panel], fontsize=10)
        panel.grid(alpha=0.3)
    for index, (run, label) in enumerate(zip(runs, run_labels(runs), strict=True)):
        colour = f"C{index % 10}"
        loss.plot(run.loss.steps, run.loss.values, color=colour, label=label)
        if run.metric:
            scale = metric_scale(run.metric)
            metric_label = f"{label}: {run.metric}" if len(groups[scale]) > 1 else label
            val, ema = run.val_metric, run.ema_metric
            panel = validation[scale]
            panel.plot(val.steps, val.values, "o-", color=colour, label=metric_label)
            if ema.steps:
                panel.plot(ema.steps, ema.values, "s--", color=colour, label=f"{metric_label} EMA")
        lr.plot(run.lr.steps, run.lr.values, color=colour, label=label)
        speed.plot(run.images_per_s.steps, run.images_per_s.values, color=colour, label=label)
    for panel in axes:
        if not any(len(line.get_xdata()) for line in panel.lines):
            panel.text(0.5, 0.5, "no data", ha="center", va="center", transform=panel.transAxes)
    for panel in bottom:
        panel.set_xlabel("optimizer step")
    loss.legend(fontsize=8)
    for scale, metrics in groups.items():
        if len(metrics) > 1 or any(run.ema_metric.steps for run in runs if run.metric in metrics):
            validation[scale].legend(fontsize=8)
    return figure


def draw_runs(runs: list[RunCurves], out: Path) -> None:
    """Writes the figure of the runs' curves (`runs_figure`) to `out`."""
    save_figure(runs_figure(runs), out, dpi=100)
