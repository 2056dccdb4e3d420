"""The engine on its own: a toy regression task plugged in through the `Task` interface alone,
the schedule, best.pt by the declared metric, the run-directory lock, resume semantics, recipe
history, stale temporaries."""

import copy
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import debiformer
from debiformer import runtime
from debiformer.checkpoint import load_checkpoint, save_checkpoint
from debiformer.engine import (
    Metric,
    NonFiniteLossError,
    StopRequest,
    fit,
    lr_factor,
    micro_batches,
    param_groups,
)
from debiformer.engine.schedule import build_optimizer, set_lr
from debiformer.errors import UserError
from debiformer.recipe import OptimConfig, load_recipe
from debiformer.weights import ModelSpec, build_model
from tests.helpers.hold_run_lock import HOLD_RUN_LOCK
from tests.helpers.recipes import segmentation_recipe, write_recipe
from tests.helpers.tensors import assert_same_tensors
from tests.helpers.toy_task import LineTask, toy_recipe
from tests.helpers.toy_task import metrics_lines as lines

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
    outside = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == outside


def test_micro_batches_take_every_nth_sample_of_each_item():
    images, labels = torch.arange(6), ["a", "b", "c", "d", "e", "f"]
    parts = list(micro_batches((images, labels), 2))
    assert parts[0][0].tolist() == [0, 2, 4] and parts[1][1] == ["b", "d", "f"]


def test_a_metric_declaration_prints_and_compares_values_its_way():
    loss = Metric("loss", "loss", "{:.2f}", higher_is_better=False)
    top1 = Metric("top1", "top-1", "{:.1f}%")
    assert (loss.show(0.123), top1.show(81.25), top1.show(None)) == (
        "loss 0.12",
        "top-1 81.2%",
        "top-1 n/a",
    )
    assert loss.better(0.1, 0.2) and not loss.better(0.3, 0.2) and loss.better(9.0, None)
    assert top1.better(0.3, 0.2) and not top1.better(0.1, 0.2)
    assert (loss.best_of([0.3, 0.1, 0.2]), top1.best_of([0.3, 0.1, 0.2])) == (0.1, 0.3)


def test_a_task_whose_best_metric_is_not_declared_stops_before_any_work(tmp_path):
    class Undeclared(LineTask):
        best_metric = "mse"

    with pytest.raises(TypeError, match="best_metric 'mse' is none of its declared metrics"):
        fit(toy_recipe(), Undeclared(), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> tuple[Path, dict]:
    """The toy recipe trained to the end, uninterrupted: (run directory, summary), read-only."""
    run_dir = tmp_path_factory.mktemp("toy") / "run"
    return run_dir, fit(toy_recipe(), LineTask(), run_dir=run_dir)


def test_a_toy_task_trains_through_the_interface_alone(toy_run):
    run_dir, summary = toy_run
    assert (summary["steps"], summary["best_metric"]) == (18, "neg_mse")
    evaluations = [record["neg_mse"] for record in lines(run_dir, "epoch")]
    assert evaluations[-1] > 2 * evaluations[0] and summary["best_neg_mse"] == max(evaluations)
    assert "ema_neg_mse" in summary
    assert [record["epoch"] for record in lines(run_dir, "epoch")] == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 18
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"last.pt", "best.pt"}


class MseTask(LineTask):
    """The toy task with a lower-is-better best metric: the mean squared error itself."""

    metrics = (Metric("mse", "MSE", "{:.5f}", higher_is_better=False),)
    best_metric = "mse"

    def evaluate(self, model, loader):
        return {"mse": -super().evaluate(model, loader)["neg_mse"]}


def test_best_pt_keeps_the_lowest_value_of_a_lower_is_better_metric(tmp_path):
    """The error falls as the toy line is fitted: best.pt is the epoch of the lowest error, not
    the highest, and the summary's best value is that lowest one."""
    recipe = toy_recipe(train={"ema": False})
    summary = fit(recipe, MseTask(), run_dir=tmp_path / "run")
    errors = [record["mse"] for record in lines(tmp_path / "run", "epoch")]
    assert errors[-1] < errors[0]
    lowest = errors.index(min(errors)) + 1
    assert (summary["best_mse"], summary["best_epoch"]) == (min(errors), lowest)
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["train_state"][0]
    assert (best["epoch"], best["best_value"]) == (lowest, min(errors))


def fit_stopped_at_step_five(run_dir: Path, monkeypatch) -> dict:
    """The toy recipe trained into `run_dir` until a stop request after step 5 (mid-epoch, off
    the checkpoint grid); its summary."""
    calls = {"n": 0}
    real_any_rank = debiformer.runtime.any_rank

    def stop_at_five(flag, device):
        calls["n"] += 1
        return real_any_rank(flag or calls["n"] == 5, device)

    monkeypatch.setattr(debiformer.runtime, "any_rank", stop_at_five)
    summary = fit(toy_recipe(), LineTask(), run_dir=run_dir)
    monkeypatch.undo()
    return summary


@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_same_weights(toy_run, tmp_path, monkeypatch):
    """A stop request after step 5 (mid-epoch, off the checkpoint grid), then a resume."""
    full, uninterrupted = toy_run
    stopped = fit_stopped_at_step_five(tmp_path / "run", monkeypatch)
    assert stopped["stopped"] and stopped["steps"] == 5
    resumed = fit(toy_recipe(), LineTask(), run_dir=tmp_path / "run")
    assert resumed["neg_mse"] == uninterrupted["neg_mse"]
    weights = [load_checkpoint(r / "checkpoints" / "last.pt") for r in (full, tmp_path / "run")]
    for key, tensor in weights[0]["model"].items():
        assert torch.equal(tensor, weights[1]["model"][key]), key
    assert [r["step"] for r in lines(tmp_path / "run", "train")] == list(range(2, 19, 2))


def test_a_disk_full_stops_in_one_line_and_the_run_resumes_to_the_same_weights(
    toy_run, tmp_path, monkeypatch
):
    """The disk fills while the 5th checkpoint (last.pt at step 8) is written, as torch's zip
    writer reports it: one line; last.pt of step 6 stays; running again resumes from it."""
    full, uninterrupted = toy_run
    real_save, calls = torch.save, {"n": 0}

    def save_until_the_disk_fills(obj, file, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] < 5:
            return real_save(obj, file, *args, **kwargs)
        file.write(b"half a checkpoint")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    with pytest.raises(UserError, match="no space left") as error:
        fit(toy_recipe(), LineTask(), run_dir=tmp_path / "run")
    monkeypatch.undo()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert "\n" not in str(error.value) and f"{checkpoints} has" in str(error.value)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "last.pt"]
    assert load_checkpoint(checkpoints / "last.pt")["train_state"][0]["step"] == 6
    resumed = fit(toy_recipe(), LineTask(), run_dir=tmp_path / "run")
    assert resumed["neg_mse"] == uninterrupted["neg_mse"]
    weights = [load_checkpoint(r / "checkpoints" / "last.pt") for r in (full, tmp_path / "run")]
    assert_same_tensors(weights[0]["model"], weights[1]["model"])


def test_a_metrics_line_that_fills_the_disk_is_one_line_and_leaves_the_file_whole(
    tmp_path, monkeypatch
):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n')
    real_open = open

    class FullDisk:
        """An append-mode file whose writes of more than 4 bytes fill the disk part-way."""

        def __init__(self, file):
            self.file = file

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def write(self, text):
            self.file.write(text[:4])
            self.file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("builtins.open", lambda *a, **k: FullDisk(real_open(*a, **k)))
    with pytest.raises(UserError, match="no space left") as error:
        runtime.append_line(metrics, '{"step": 2}')
    monkeypatch.undo()
    assert "\n" not in str(error.value) and f"{tmp_path} has" in str(error.value)
    assert metrics.read_text() == '{"step": 1}\n'


def test_resume_drops_a_metrics_line_cut_short_by_a_crash(toy_run, tmp_path, monkeypatch):
    """A run killed while appending leaves half a line (its bytes cut inside a character too);
    the resumed run drops it with the lines after its checkpoint."""
    full, uninterrupted = toy_run
    fit_stopped_at_step_five(tmp_path / "run", monkeypatch)
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + '{"kind": "train", "note": "é'.encode()[:-1])
    resumed = fit(toy_recipe(), LineTask(), run_dir=tmp_path / "run")
    assert resumed["neg_mse"] == uninterrupted["neg_mse"]
    assert [r["step"] for r in lines(tmp_path / "run", "train")] == list(range(2, 19, 2))


def test_resume_refuses_a_checkpoint_whose_weights_hold_nan(tmp_path):
    fit(toy_recipe(schedule={"epochs": 1}), LineTask(), run_dir=tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    checkpoint = load_checkpoint(last)
    checkpoint["model"]["2.bias"].fill_(float("nan"))
    save_checkpoint(checkpoint, last)
    with pytest.raises(UserError, match=r"tensor '2\.bias' holds NaN") as error:
        fit(toy_recipe(), LineTask(), run_dir=tmp_path / "run")
    assert str(last) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
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
    with pytest.raises(UserError, match="resume and fresh contradict"):
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
    with pytest.raises(UserError, match="run_dir .*checkpoints.*cannot create") as error:
        fit(toy_recipe(), LineTask(), run_dir=tmp_path / "run")
    assert "\n" not in str(error.value) and error.value.about == "run_dir"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "checkpoints"]


def test_temporaries_of_killed_writes_are_removed_on_the_next_start(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / ".last.pt.tmp-1234").write_bytes(b"half")
    (checkpoints / ".last.pt.999.tmp").write_bytes(b"half, older name")
    fit(toy_recipe(schedule={"epochs": 1}), LineTask(), run_dir=tmp_path / "run")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.slow
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


def test_a_pretrained_backbone_learns_at_pretrained_lr_scale_times_the_lr(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", segmentation_recipe(tmp_path, "fpn")))
    segmenter = build_model(ModelSpec.from_recipe(recipe, 11))[0]
    classifier = debiformer.create_model("debiformer_nano", num_classes=4)
    optim = OptimConfig(pretrained_lr_scale=0.1)
    for model, backbone in ((segmenter, "backbone.body."), (classifier, "")):
        optimizer = build_optimizer(model, optim, peak_lr=1e-3, pretrained=True)
        set_lr(optimizer, 1e-3)
        lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        assert len(lr_of) == sum(1 for _ in model.parameters())
        for name, param in model.named_parameters():
            in_backbone = name.startswith(backbone) and not name.startswith("head.")
            assert lr_of[id(param)] == pytest.approx(1e-4 if in_backbone else 1e-3), name
        from_scratch = build_optimizer(model, optim, peak_lr=1e-3)
        set_lr(from_scratch, 1e-3)
        assert {group["lr"] for group in from_scratch.param_groups} == {1e-3}
    with pytest.raises(UserError, match="optim.pretrained_lr_scale: this model has no DeBiFormer"):
        build_optimizer(torch.nn.Linear(2, 2), optim, peak_lr=1e-3, pretrained=True)
    with pytest.raises(UserError, match="optim.pretrained_lr_scale: set it to 1 with optim.layer"):
        OptimConfig(layer_decay=0.75, pretrained_lr_scale=0.5).check()


def test_adamw_is_fused_on_the_cpu_and_takes_the_same_steps_as_its_loop():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    looped = copy.deepcopy(model)
    optim = OptimConfig()
    optimizer = build_optimizer(model, optim, peak_lr=1e-2)
    loop = torch.optim.AdamW(
        param_groups(looped, optim.weight_decay), lr=1e-2, betas=optim.betas, eps=optim.eps
    )
    assert (
        optimizer.defaults["fused"] and not loop.defaults["fused"] and not loop.defaults["foreach"]
    )
    inputs = torch.randn(4, 6)
    for _ in range(3):
        for net, opt in ((model, optimizer), (looped, loop)):
            opt.zero_grad()
            net(inputs).square().sum().backward()
            opt.step()
    for fused_param, loop_param in zip(model.parameters(), looped.parameters(), strict=True):
        torch.testing.assert_close(fused_param, loop_param)
    on_meta = torch.nn.Linear(2, 2, device="meta")
    assert not build_optimizer(on_meta, OptimConfig(), peak_lr=1e-3).defaults["fused"]
