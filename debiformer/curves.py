"""A run's training curves: what its metrics.jsonl holds by curve (training loss, the validation
metric and its EMA, the learning rate, training images/s against optimizer steps), and the 2x2
figure of one or more runs. The engine draws every run's curves.png with it and `debiformer plot`
overlays runs. Figures need matplotlib (the `viz` extra), imported only when drawing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from debiformer import runtime
from debiformer.errors import UserError


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
    """The JSON lines of a run's metrics.jsonl that hold a step (a line a killed write cut is
    skipped); a one-line error for a folder without one."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        what = "does not exist" if not run_dir.exists() else "has no metrics.jsonl"
        raise UserError(f"run directory {run_dir} {what}: give the folder a training wrote")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


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


def draw_runs(runs: list[RunCurves], out: Path) -> None:
    """Writes the 2x2 figure of the runs' curves to `out`."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 7.5), layout="constrained")
    axes = figure.subplots(2, 2, sharex=True).ravel()
    metrics = sorted({run.metric for run in runs if run.metric})
    titles = ["training loss", f"validation {' / '.join(metrics) or 'metric'}"]
    titles += ["learning rate", "training images/s"]
    for panel, title in zip(axes, titles, strict=True):
        panel.set_title(title, fontsize=10)
        panel.grid(alpha=0.3)
    for index, (run, label) in enumerate(zip(runs, run_labels(runs), strict=True)):
        colour = f"C{index % 10}"
        axes[0].plot(run.loss.steps, run.loss.values, color=colour, label=label)
        metric_label = f"{label}: {run.metric}" if len(metrics) > 1 else label
        val, ema = run.val_metric, run.ema_metric
        axes[1].plot(val.steps, val.values, "o-", color=colour, label=metric_label)
        if ema.steps:
            axes[1].plot(ema.steps, ema.values, "s--", color=colour, label=f"{metric_label} EMA")
        axes[2].plot(run.lr.steps, run.lr.values, color=colour, label=label)
        axes[3].plot(run.images_per_s.steps, run.images_per_s.values, color=colour, label=label)
    for panel in axes:
        if not any(len(line.get_xdata()) for line in panel.lines):
            panel.text(0.5, 0.5, "no data", ha="center", va="center", transform=panel.transAxes)
    for panel in axes[2:]:
        panel.set_xlabel("optimizer step")
    axes[0].legend(fontsize=8)
    if len(metrics) > 1 or any(run.ema_metric.steps for run in runs):
        axes[1].legend(fontsize=8)
    save_figure(figure, out, dpi=100)
