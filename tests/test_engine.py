"""The engine on its own: a toy regression task plugged in through the `Task` interface alone,
the schedule, the run-directory lock, resume semantics, recipe history, stale temporaries."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import debiformer
from debiformer.checkpoint import load_checkpoint
from debiformer.engine import (
    NonFiniteLossError,
    StopRequest,
    Task,
    TrainState,
    fit,
    lr_factor,
    micro_batches,
    param_groups,
)
from debiformer.errors import UserError
from debiformer.recipe import recipe_from_dict
from tests.helpers.hold_run_lock import HOLD_RUN_LOCK

# ----------------------------------------------------------------------------- a toy task


class LineLoader:
    """Noisy samples of y = x - 0.5 in batches; batch b of epoch e is a function of (e, b)."""

    def __init__(self, batch_size: int, batches: int, seed: int, poison_from: int | None = None):
        self.batch_size, self.num_batches, self.seed = batch_size, batches, seed
        self.poison_from = poison_from
        self.num_samples = batch_size * batches

    def __len__(self) -> int:
        return self.num_batches

    def batches(self, epoch: int, start_batch: int = 0):
        for batch in range(start_batch, self.num_batches):
            generator = torch.Generator().manual_seed(self.seed * 10_000 + epoch * 100 + batch)
            x = torch.rand(self.batch_size, 1, generator=generator)
            y = x - 0.5 + 0.01 * torch.randn(self.batch_size, 1, generator=generator)
            if (
                self.poison_from is not None
                and epoch * self.num_batches + batch >= self.poison_from
            ):
                y = y * float("nan")
            yield x, y

    def __iter__(self):
        return self.batches(0)


class LineTask(Task):
    """Fits a line with a linear layer: what any task must give the engine, and nothing more."""

    best_metric = "neg_mse"

    def __init__(self, poison_from: int | None = None):
        self.poison_from = poison_from

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.1), nn.Linear(8, 1))

    def build_loaders(self, device, batch_size, eval_batch_size):
        train = LineLoader(batch_size, 6, seed=1, poison_from=self.poison_from)
        return train, LineLoader(eval_batch_size, 2, seed=2)

    def prepare_batch(self, batch, generator):
        x, y = batch
        return x + 0.001 * torch.randn(x.shape, generator=generator), y

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(model(x), y)

    @torch.no_grad()
    def evaluate(self, model, loader) -> dict[str, float]:
        model.eval()
        errors = [nn.functional.mse_loss(model(x), y).item() for x, y in loader.batches(0)]
        model.train()
        return {"neg_mse": -sum(errors) / len(errors)}


def toy_recipe(**sections: dict):
    recipe = {
        "model": {"name": "debiformer_nano"},
        "optim": {"lr": 0.05, "lr_base_batch": None},
        "schedule": {"epochs": 3, "warmup_epochs": 0.5, "warmup_lr": 1e-4, "min_lr": 1e-4},
        "train": {"batch_size": 8, "device": "cpu", "seed": 7, "ema": True, "ema_decay": 0.5},
        "output": {"log_every": 2, "checkpoint_every": 4, "progress": False},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    return recipe_from_dict({"name": "toy", **recipe})


def lines(run_dir: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if record["kind"] == kind]


# ----------------------------------------------------------------------------- units


def test_lr_schedule_warms_up_then_follows_a_cosine():
    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=10, total_steps=110, warmup_ratio=0.1, min_ratio=0.01)

    assert factor(0) == pytest.approx(0.1)
    assert factor(5) == pytest.approx(0.55)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.505)
    assert factor(110) == pytest.approx(0.01)


def test_step_decay_multiplies_by_gamma_at_each_milestone_after_warm_up():
    def factor(step: int) -> float:
        return lr_factor(
            step,
            warmup_steps=10,
            total_steps=120,
            warmup_ratio=0.1,
            min_ratio=0.01,
            decay="step",
            milestone_steps=[80, 110],
            gamma=0.1,
        )

    assert factor(5) == pytest.approx(0.55)
    assert factor(10) == factor(79) == pytest.approx(1.0)
    assert factor(80) == factor(109) == pytest.approx(0.1)
    assert factor(110) == factor(119) == pytest.approx(0.01)


def test_poly_decay_is_scaled_by_the_warm_up_as_mmcv_does():
    def factor(step: int) -> float:
        return lr_factor(
            step, warmup_steps=10, total_steps=100, warmup_ratio=0.1, min_ratio=0.0, decay="poly"
        )

    assert factor(0) == pytest.approx(0.1)
    assert factor(5) == pytest.approx(0.55 * 0.95)
    assert factor(10) == pytest.approx(0.9)
    assert factor(75) == pytest.approx(0.25)
    assert factor(100) == 0.0
    squared = lr_factor(50, warmup_steps=0, total_steps=100, warmup_ratio=1, min_ratio=0.2,
                        decay="poly", power=2.0)  # fmt: skip
    assert squared == pytest.approx(0.2 + 0.8 * 0.25)


def test_a_schedule_in_steps_stops_part_way_through_the_last_epoch(tmp_path: Path):
    schedule = {"epochs": None, "steps": 9, "warmup_steps": 2, "decay": "poly", "min_lr": 0.0}
    summary = fit(toy_recipe(schedule=schedule), LineTask(), run_dir=tmp_path / "run")
    assert summary["steps"] == 9 and summary["epochs"] == 1.5
    epochs = lines(tmp_path / "run", "epoch")
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 6), (2, 9)]
    assert "neg_mse" in epochs[-1]
    assert epochs[-1]["lr"] == pytest.approx(0.05 * (1 - 8 / 9))


def test_a_schedule_has_epochs_or_steps():
    with pytest.raises(UserError, match="schedule.epochs or schedule.steps"):
        toy_recipe(schedule={"steps": 9})
    with pytest.raises(UserError, match="schedule.steps: must be at least 1"):
        toy_recipe(schedule={"epochs": None, "steps": 0})
    with pytest.raises(UserError, match="steps between 0 and schedule.steps"):
        toy_recipe(schedule={"epochs": None, "steps": 9, "decay": "step", "milestones": [12]})


def test_no_weight_decay_on_norms_biases_and_position_bias_tables():
    model = debiformer.create_model("debiformer_nano", num_classes=4)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): name for name, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert any(name.endswith("rpe_table") for name in skipped)
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_stop_request_turns_signals_into_a_flag_and_a_second_ctrl_c_aborts():
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_micro_batches_take_every_nth_sample_of_each_item():
    images, labels = torch.arange(6), ["a", "b", "c", "d", "e", "f"]
    parts = list(micro_batches((images, labels), 2))
    assert parts[0][0].tolist() == [0, 2, 4] and parts[1][1] == ["b", "d", "f"]


def test_train_state_round_trips_through_plain_values():
    state = TrainState(epoch=2, batch=3, step=15, best_value=0.5, last_eval={"top1": 1.0})
    again = TrainState()
    again.load_state_dict(state.state_dict())
    assert again == state


# ----------------------------------------------------------------------------- runs


def test_a_toy_task_trains_through_the_interface_alone(tmp_path):
    summary = fit(toy_recipe(), LineTask(), run_dir=tmp_path / "run")
    assert (summary["steps"], summary["best_metric"]) == (18, "neg_mse")
    evaluations = [record["neg_mse"] for record in lines(tmp_path / "run", "epoch")]
    assert evaluations[-1] > 2 * evaluations[0] and summary["best_neg_mse"] == max(evaluations)
    assert "ema_neg_mse" in summary
    assert [record["epoch"] for record in lines(tmp_path / "run", "epoch")] == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 18
    assert {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()} == {"last.pt", "best.pt"}


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """A stop request after step 5 (mid-epoch, off the checkpoint grid), then a resume."""
    uninterrupted = fit(toy_recipe(), LineTask(), run_dir=tmp_path / "full")
    calls = {"n": 0}
    real_any_rank = debiformer.runtime.any_rank

    def stop_at_five(flag, device):
        calls["n"] += 1
        return real_any_rank(flag or calls["n"] == 5, device)

    monkeypatch.setattr(debiformer.runtime, "any_rank", stop_at_five)
    stopped = fit(toy_recipe(), LineTask(), run_dir=tmp_path / "run")
    monkeypatch.undo()
    assert stopped["stopped"] and stopped["steps"] == 5
    resumed = fit(toy_recipe(), LineTask(), run_dir=tmp_path / "run")
    assert resumed["neg_mse"] == uninterrupted["neg_mse"]
    weights = [load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "run")]
    for key, tensor in weights[0]["model"].items():
        assert torch.equal(tensor, weights[1]["model"][key]), key
    assert [r["step"] for r in lines(tmp_path / "run", "train")] == list(range(2, 19, 2))


def test_a_resumed_run_after_a_nan_stop_uses_the_new_lr(tmp_path):
    with pytest.raises(NonFiniteLossError, match="Try a lower optim.lr"):
        fit(toy_recipe(optim={"lr": 0.05}), LineTask(poison_from=9), run_dir=tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    step = state["train_state"][0]["step"]
    assert step == 8
    lower = toy_recipe(optim={"lr": 0.01})
    summary = fit(lower, LineTask(), run_dir=tmp_path / "run")
    resumed_lrs = [r["lr"] for r in lines(tmp_path / "run", "train") if r["step"] > step]
    fresh = fit(lower, LineTask(), run_dir=tmp_path / "fresh")
    fresh_lrs = [r["lr"] for r in lines(tmp_path / "fresh", "train") if r["step"] > step]
    assert resumed_lrs == pytest.approx(fresh_lrs) and max(resumed_lrs) <= 0.01
    assert summary["steps"] == fresh["steps"]
    assert (tmp_path / "run" / "recipe.1.yaml").is_file()
    assert "lr: 0.01" in (tmp_path / "run" / "recipe.yaml").read_text()


def test_each_epoch_is_saved_before_its_evaluation(tmp_path):
    class FailingEvaluation(LineTask):
        def evaluate(self, model, loader):
            raise UserError("the validation set is empty")

    with pytest.raises(UserError, match="validation set is empty"):
        fit(toy_recipe(), FailingEvaluation(), run_dir=tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["train_state"][0]
    assert (saved["epoch"], saved["step"], saved["eval_pending"]) == (1, 6, True)
    fit(toy_recipe(), LineTask(), run_dir=tmp_path / "run")
    assert [record["epoch"] for record in lines(tmp_path / "run", "epoch")] == [1, 2, 3]


def test_resume_refuses_a_changed_model_data_or_batch_in_one_line(tmp_path):
    fit(toy_recipe(schedule={"epochs": 1}), LineTask(), run_dir=tmp_path / "run")
    recipe_before = (tmp_path / "run" / "recipe.yaml").read_text()
    for change, key in (
        ({"train": {"batch_size": 4}}, "train.batch_size"),
        ({"model": {"name": "debiformer_tiny"}}, "model.name"),
        ({"data": {"image_size": 64}}, "data.image_size"),
    ):
        with pytest.raises(UserError, match=f"{key} was .* cannot change on resume") as error:
            fit(toy_recipe(**change), LineTask(), run_dir=tmp_path / "run")
        assert "\n" not in str(error.value)
    assert (tmp_path / "run" / "recipe.yaml").read_text() == recipe_before
    assert not list((tmp_path / "run").glob("recipe.*.yaml"))


def test_resume_and_fresh_together_is_a_usage_error(tmp_path):
    with pytest.raises(UserError, match="--resume and --fresh"):
        fit(toy_recipe(), LineTask(), run_dir=tmp_path / "run", resume="x.pt", fresh=True)
    assert not (tmp_path / "run").exists()


def test_a_failed_validation_leaves_no_run_directory(tmp_path):
    class BrokenTask(LineTask):
        def build_loaders(self, device, batch_size, eval_batch_size):
            raise UserError("data.train_path: does not exist")

    with pytest.raises(UserError, match="does not exist"):
        fit(toy_recipe(), BrokenTask(), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_folder_that_cannot_be_written_stops_before_training(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(UserError, match="--out .*checkpoints.*cannot create") as error:
        fit(toy_recipe(), LineTask(), run_dir=tmp_path / "run")
    assert "\n" not in str(error.value)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "checkpoints"]


def test_temporaries_of_killed_writes_are_removed_on_the_next_start(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / ".last.pt.tmp-1234").write_bytes(b"half")
    (checkpoints / ".last.pt.999.tmp").write_bytes(b"half, older name")
    fit(toy_recipe(schedule={"epochs": 1}), LineTask(), run_dir=tmp_path / "run")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "last.pt"]


def test_a_second_training_into_a_live_run_directory_stops_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    fit(toy_recipe(schedule={"epochs": 1}), LineTask(), run_dir=run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    holder = subprocess.Popen(
        [sys.executable, str(HOLD_RUN_LOCK), str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"is in use by process {holder.pid}") as error:
            fit(toy_recipe(schedule={"epochs": 2}), LineTask(), run_dir=run_dir)
        assert "\n" not in str(error.value)
    finally:
        holder.kill()
        holder.wait()
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    # the killed holder's lock is stale now: a new run takes it over
    time.sleep(0.1)
    assert fit(toy_recipe(schedule={"epochs": 2}), LineTask(), run_dir=run_dir)["steps"] == 12
