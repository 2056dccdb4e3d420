"""`output.trackers`: a run feeds Weights & Biases (offline) and MLflow (a SQLite store) the recipe,
every metrics.jsonl number at its step and the summary, and a resumed run continues the same
tracker runs; a tracker that cannot start is a notice and training goes on."""

import json

import pytest

from debiformer.engine import trackers
from debiformer.errors import UserError
from debiformer.recipe import load_recipe
from tests.helpers.cli import child_env, run_in_child
from tests.helpers.recipes import SMALL_BACKBONE, write_recipe
from tests.helpers.toy_task import metrics_lines
from tests.helpers.wandb_files import record_bytes

TINY = {
    "model": {"name": "debiformer_nano", "arch": SMALL_BACKBONE},
    "data": {"backend": "synthetic", "image_size": 32, "num_classes": 4,
             "synthetic_samples": 32, "num_workers": 0},
    "optim": {"lr": 2e-3, "lr_base_batch": None},
    "schedule": {"epochs": 2, "warmup_epochs": 0.5},
    "train": {"batch_size": 8, "device": "cpu", "seed": 3},
    "output": {"log_every": 1, "checkpoint_every": 3, "progress": False},
}  # fmt: skip


def wandb_records(run_dir, kind: str) -> list[dict]:
    """The `kind` records ("history", "summary", or "config": the run record's config) of the
    offline W&B run files under `run_dir`, in order, as key -> value."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for data in record_bytes(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == ("run" if kind == "config" else kind):
                body = getattr(record, kind) if kind != "config" else record.run.config
                items = body.item if kind == "history" else body.update
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in items})  # fmt: skip
    return rows


@pytest.mark.slow
def test_wandb_and_mlflow_get_the_recipe_every_metric_and_a_resume_continues_them(tmp_path):
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = write_recipe(
        tmp_path / "tiny.yaml", TINY,
        output={"trackers": ["wandb", "mlflow"], "mlflow_uri": store},
    )  # fmt: skip
    run_dir = tmp_path / "run"
    env = child_env(WANDB_MODE="offline", WANDB_SILENT="true")
    stopped = run_in_child(
        "train", str(path), "--out", str(run_dir), env={**env, "USR1_AT_SAVE": "1"}
    )
    assert stopped.returncode == 0 and "stopped by SIGUSR1" in stopped.stderr, stopped.stderr
    ids = json.loads((run_dir / "trackers.json").read_text())
    done = run_in_child("train", str(path), "--out", str(run_dir), env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads((run_dir / "trackers.json").read_text()) == ids  # the same runs, continued

    train_lines = metrics_lines(run_dir, "train")
    mlflow.set_tracking_uri(store)
    (run,) = mlflow.search_runs(experiment_names=["tiny"], output_format="list")
    assert run.info.run_id == ids["mlflow"] and run.info.status == "FINISHED"
    # the recipe artifact lies beside the database, not in the working directory's ./mlruns
    assert (tmp_path / "mlartifacts" / run.info.run_id / "artifacts" / "recipe.json").is_file()
    assert (
        run.data.params["optim.lr"] == "0.002"
        and run.data.params["model.name"] == "debiformer_nano"
    )
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    logged = {m.step: m.value for m in history}
    assert {line["step"]: line["loss"] for line in train_lines} == pytest.approx(logged)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.data.metrics["summary/top1"] == pytest.approx(summary["top1"])
    assert run.data.metrics["epoch/top1"] == pytest.approx(summary["top1"])

    attempts = sorted(run_dir.glob("wandb/offline-run-*"))  # one folder per attempt, one run id
    assert len(attempts) == 2 and all(ids["wandb"] in folder.name for folder in attempts)
    config = {key: value for row in wandb_records(run_dir, "config") for key, value in row.items()}
    assert config["optim"]["lr"] == 0.002 and config["model"]["name"] == "debiformer_nano"
    rows = wandb_records(run_dir, "history")
    losses = {row["_step"]: row["train/loss"] for row in rows if "train/loss" in row}
    assert losses == pytest.approx({line["step"]: line["loss"] for line in train_lines})
    final = {key: value for row in wandb_records(run_dir, "summary") for key, value in row.items()}
    assert final["top1"] == pytest.approx(summary["top1"])


def test_a_tracker_that_cannot_start_is_a_notice_and_the_others_run(tmp_path, monkeypatch):
    from rich.console import Console

    def no_wandb(*args, **kwargs):
        raise ImportError("No module named 'wandb'")

    monkeypatch.setattr(trackers, "WandbTracker", no_wandb)
    console = Console(record=True, width=200)
    started = trackers.open_trackers(
        ["wandb"], tmp_path, {"name": "x"}, wandb_project=None, mlflow_uri=None, console=console
    )
    assert started == [] and not (tmp_path / "trackers.json").exists()
    text = console.export_text()
    assert "output.trackers: wandb did not start (No module named 'wandb')" in text
    assert "training goes on without it" in text


def test_an_unknown_tracker_is_a_one_line_error(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", TINY, output={"trackers": ["neptune"]})
    with pytest.raises(UserError, match="output.trackers: unknown tracker 'neptune'; choose from"):
        load_recipe(path)


def test_records_become_named_numbers_and_recipes_flat_parameters():
    record = {"kind": "epoch", "step": 8, "epoch": 2, "top1": 50.0, "name": "x", "ok": True}
    assert trackers.numbers(record) == {"epoch/top1": 50.0}
    flat = trackers.flat({"optim": {"lr": 0.002, "betas": [0.9, 0.999]}, "name": "tiny"})
    assert flat == {"optim.lr": "0.002", "optim.betas": "[0.9, 0.999]", "name": "tiny"}
