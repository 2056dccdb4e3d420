"""Experiment trackers beside metrics.jsonl (`output.trackers`), on rank 0 only:

    wandb    Weights & Biases (`pip install 'debiformer[wandb]'`): project `output.wandb_project`
             (default: the recipe's name); offline with WANDB_MODE=offline, its files in
             <run_dir>/wandb
    mlflow   MLflow (`pip install 'debiformer[mlflow]'`): the tracking URI `output.mlflow_uri`
             (default: the MLFLOW_TRACKING_URI variable, else sqlite:///<run_dir>/mlflow.db);
             experiment: the recipe's name

Each gets the resolved recipe as its config (MLflow: flattened parameters, and the whole recipe
as recipe.json), every metrics.jsonl record's numbers at its step (as `<kind>/<key>`), and the
summary at the end. Their run ids are kept in <run_dir>/trackers.json, so a resumed run continues
the same tracker runs. A tracker that cannot start (not installed, not logged in, no server) is a
one-line notice, and training goes on without it. TensorBoard stays in `rundir.MetricsLog`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from debiformer import runtime

TRACKERS = ("tensorboard", "wandb", "mlflow")
IDS_FILE = "trackers.json"


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def finish(self, summary: dict[str, Any] | None) -> None: ...


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers named `<kind>/<key>` (step, epoch and kind left out)."""
    return {
        f"{record['kind']}/{key}": float(value)
        for key, value in record.items()
        if key not in ("kind", "step", "epoch")
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    }


def flat(mapping: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested recipe as `section.key` -> value text (MLflow's parameters)."""
    items = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            items |= flat(value, f"{prefix}{key}.")
        else:
            items[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return items


class WandbTracker:
    """A W&B run in <run_dir>/wandb, resumed by id."""

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, run_id: str | None):
        import wandb

        self.run = wandb.init(
            project=project,
            name=run_dir.name,
            config=config,
            dir=str(run_dir),
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.id = self.run.id

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(numbers(record), step=int(record["step"]))

    def finish(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            self.run.summary.update(
                {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
            )
        self.run.finish()


class MlflowTracker:
    """An MLflow run in the recipe's experiment, resumed by id."""

    def __init__(self, run_dir: Path, config: dict[str, Any], uri: str, run_id: str | None):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        if run_id is None:
            experiment_id = _mlflow_experiment(mlflow, str(config.get("name", "debiformer")), uri)
            run = mlflow.start_run(experiment_id=experiment_id, run_name=run_dir.name)
            mlflow.log_params(flat(config))
            mlflow.log_dict(config, "recipe.json")
        else:
            run = mlflow.start_run(run_id=run_id)
        self.id = run.info.run_id

    def log(self, record: dict[str, Any]) -> None:
        self.mlflow.log_metrics(numbers(record), step=int(record["step"]))

    def finish(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            values = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}
            self.mlflow.log_metrics({f"summary/{k}": v for k, v in values.items()})
        self.mlflow.end_run(status="FINISHED" if summary is not None else "KILLED")


def _mlflow_experiment(mlflow: Any, name: str, uri: str) -> str:
    """The id of experiment `name`, made if new. With a SQLite store its artifacts go to
    `mlartifacts` beside the database file (MLflow's default is ./mlruns in the working
    directory); a tracking server keeps its own."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///")).absolute()
        location = (database.parent / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def open_trackers(
    names: list[str],
    run_dir: Path,
    config: dict[str, Any],
    *,
    wandb_project: str | None,
    mlflow_uri: str | None,
    console: Console,
) -> list[Tracker]:
    """The trackers `names` asks for (TensorBoard aside), started or resumed (the ids in
    <run_dir>/trackers.json); each that fails to start is a notice."""
    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    starts = {
        "wandb": lambda: WandbTracker(
            run_dir, config, wandb_project or str(config.get("name")), ids.get("wandb")
        ),
        "mlflow": lambda: MlflowTracker(
            run_dir,
            config,
            mlflow_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(run_dir / 'mlflow.db').absolute()}",
            ids.get("mlflow"),
        ),
    }
    trackers = []
    for name in names:
        if name not in starts:
            continue
        try:
            tracker = starts[name]()
        except Exception as error:  # any failure to start leaves training running without it
            detail = " ".join(str(error).split())[:160] or type(error).__name__
            console.print(
                f"[yellow]notice:[/] output.trackers: {name} did not start ({detail}); "
                f"training goes on without it (install it with pip install 'debiformer[{name}]')",
                highlight=False,
            )
            continue
        ids[name] = tracker.id
        trackers.append(tracker)
    if trackers:
        runtime.write_json(ids_path, ids)
    return trackers
