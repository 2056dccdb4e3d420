"""`debiformer plot`, the curves.png every training writes, and `output.tensorboard`."""

import importlib.util
import json

import pytest

import debiformer.curves
from debiformer.curves import read_run
from debiformer.engine import fit
from debiformer.tools.plot import run_metric
from tests.helpers.toy_task import LineTask, toy_recipe

pytest.importorskip("matplotlib")


def write_run(run_dir, records, summary=None, recipe="name: quickstart\ntask: classification\n"):
    """A run directory as a training leaves it: metrics.jsonl, recipe.yaml, summary.json."""
    run_dir.mkdir(parents=True)
    lines = "".join(json.dumps(record) + "\n" for record in records)
    (run_dir / "metrics.jsonl").write_text(lines + '{"kind": "train", "st')  # a cut last line
    (run_dir / "recipe.yaml").write_text(recipe)
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))


def train_line(step, loss):
    return {
        "kind": "train",
        "epoch": step / 10,
        "step": step,
        "loss": loss,
        "lr": 1e-3 * step,
        "images_per_s": 100.0 + step,
    }


@pytest.fixture
def runs(tmp_path):
    """A finished detection run with evaluations, and an unfinished one without any."""
    evaluated = tmp_path / "detection"
    epochs = [
        {
            "kind": "epoch",
            "epoch": e,
            "step": 10 * e,
            "train_loss": 1.0 / e,
            "lr": 1e-3,
            "bbox_ap": 0.1 * e,
            "ema_bbox_ap": 0.1 * e + 0.01,
            "images": 50,
        }
        for e in (1, 2)
    ]
    write_run(
        evaluated,
        [
            train_line(5, 2.0),
            train_line(10, 1.5),
            epochs[0],
            train_line(15, 1.2),
            train_line(20, 1.0),
            epochs[1],
        ],
        summary={"recipe": "quickstart_detection", "best_metric": "bbox_ap"},
    )
    unevaluated = tmp_path / "early"
    write_run(unevaluated, [train_line(5, 2.5), train_line(10, 2.0)])
    return evaluated, unevaluated


def test_read_run_takes_the_curves_and_the_task_metric(runs):
    evaluated, unevaluated = (read_run(run, run_metric(run)) for run in runs)
    assert (evaluated.name, evaluated.metric) == ("quickstart_detection", "bbox_ap")
    assert evaluated.loss.steps == [5, 10, 15, 20] and evaluated.loss.values[-1] == 1.0
    assert evaluated.val_metric.steps == [10, 20] and evaluated.val_metric.values == [0.1, 0.2]
    assert evaluated.ema_metric.values == [0.11, 0.21000000000000002]
    assert evaluated.images_per_s.values == [105.0, 110.0, 115.0, 120.0]
    assert (unevaluated.name, unevaluated.metric) == ("quickstart", "top1")
    assert unevaluated.val_metric.steps == [] and unevaluated.lr.steps == [5, 10]


def test_plot_overlays_runs_with_and_without_evaluations(run_main, runs, tmp_path):
    out = tmp_path / "figures" / "curves.png"
    code, _, err = run_main("plot", *map(str, runs), "--out", str(out))
    assert code == 0, err
    assert out.stat().st_size > 20_000 and f"wrote {out}" in err


def test_plot_of_a_folder_without_metrics_is_a_one_line_error(run_main, tmp_path):
    code, _, err = run_main("plot", str(tmp_path), "--out", str(tmp_path / "c.png"))
    assert code == 2
    assert (
        err.strip()
        == f"error: run directory {tmp_path} has no metrics.jsonl: give the folder a training wrote"
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\n", "line 1 is not UTF-8 text"),
        (b'{"kind": "train", "step": 1}\n\nnot json\n{"step": 2}\n', "line 3 is not a JSON object"),
        (b'{"step": 1}\n[{"step": 2}]\n', "line 2 is not a JSON object"),
    ],
    ids=["binary", "not-json", "not-an-object"],
)
def test_plot_of_a_metrics_file_that_is_not_json_lines_names_the_line(
    run_main, runs, tmp_path, content, problem
):
    evaluated, _ = runs
    metrics = evaluated / "metrics.jsonl"
    metrics.write_bytes(content)
    code, _, err = run_main("plot", str(evaluated), "--out", str(tmp_path / "c.png"))
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {metrics} {problem}"), err
    assert not (tmp_path / "c.png").exists()


def test_validation_metrics_of_different_scales_get_separate_axes(runs, tmp_path):
    """Top-1 (percent) and box AP (a fraction) never share axes; each panel holds its runs'."""
    classified = tmp_path / "classification"
    epochs = [
        {"kind": "epoch", "step": 10 * e, "top1": 40.0 * e, "ema_top1": 41.0 * e} for e in (1, 2)
    ]
    write_run(
        classified, [train_line(5, 2.0), epochs[0], epochs[1]], summary={"best_metric": "top1"}
    )
    curves = [read_run(run, run_metric(run)) for run in (runs[0], classified)]
    figure = debiformer.curves.runs_figure(curves)
    lines = {panel.get_title(): [line.get_label() for line in panel.lines] for panel in figure.axes}
    assert lines == {
        "training loss": ["quickstart_detection", "quickstart"],
        "validation bbox_ap (0-1)": ["quickstart_detection", "quickstart_detection EMA"],
        "validation top1 (%)": ["quickstart", "quickstart EMA"],
        "learning rate": ["quickstart_detection", "quickstart"],
        "training images/s": ["quickstart_detection", "quickstart"],
    }
    assert debiformer.curves.metrics_by_scale(["top5", "miou", "loss", "top1", "bbox_ap"]) == {
        "0-1": ["bbox_ap", "miou"],
        "loss": ["loss"],
        "%": ["top1", "top5"],
    }


def test_training_writes_curves_and_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = toy_recipe(schedule={"epochs": 2}, output={"tensorboard": True})
    fit(recipe, LineTask(), run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "curves.png").stat().st_size > 20_000
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/images_per_s", "epoch/neg_mse"} <= set(scalars)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [record["loss"] for record in logged if record["kind"] == "train"]
    assert [event.value for event in events.Scalars("train/loss")] == pytest.approx(losses)


def test_curves_never_fail_a_training(tmp_path, monkeypatch, capsys):
    def broken(run_dir, metric):
        raise RuntimeError("no display")

    monkeypatch.setattr(debiformer.curves, "write_run_curves", broken)
    summary = fit(toy_recipe(schedule={"epochs": 1}), LineTask(), run_dir=tmp_path / "broken")
    assert summary["steps"] == 6
    assert "warning: curves.png not written (RuntimeError: no display)" in capsys.readouterr().err

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a),
    )
    fit(toy_recipe(schedule={"epochs": 1}), LineTask(), run_dir=tmp_path / "bare")
    assert "curves.png skipped: matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "bare" / "curves.png").exists()
