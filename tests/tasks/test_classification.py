"""Classification through the engine, on a tiny DeBiFormer with synthetic 32x32 data: outputs,
exact resume after SIGKILL, SIGTERM, non-finite loss, DDP equivalence and restarts, checkpoint
evaluation."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import debiformer
from debiformer import runtime
from debiformer.checkpoint import load_checkpoint
from debiformer.cli.main import app
from debiformer.engine import NonFiniteLossError
from debiformer.errors import UserError
from debiformer.recipe import load_recipe
from debiformer.tasks import classification, evaluate_checkpoint, train
from debiformer.tasks.classification import fall_back_without_ffcv
from tests.data.common import FASHION, needs_fashion_mnist
from tests.helpers.cli import CLI_ENTRY, child_env, free_port, run_in_child
from tests.helpers.recipes import SMALL_BACKBONE, write_recipe
from tests.helpers.tensors import assert_same_tensors
from tests.helpers.toy_task import metrics_lines

STEPS_PER_EPOCH = 8  # 64 synthetic images, global batch 8
TINY = {
    "model": {"name": "debiformer_nano", "arch": SMALL_BACKBONE},
    "data": {
        "backend": "synthetic",
        "image_size": 32,
        "num_classes": 4,
        "synthetic_samples": 64,
        "num_workers": 0,
    },
    "optim": {"lr": 2e-3, "lr_base_batch": None, "clip_grad": 1.0},
    "schedule": {"epochs": 2, "warmup_epochs": 0.5, "warmup_lr": 1e-5, "min_lr": 1e-5},
    "train": {"batch_size": 8, "device": "cpu", "seed": 3},
    "output": {"log_every": 1, "checkpoint_every": 3, "progress": False},
}  # a 0.2 M-parameter DeBiFormer on 64 synthetic 32x32 images


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


# ----------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One complete run with EMA of 2 epochs of 4 steps: (recipe path, run directory, summary)."""
    tmp_path = tmp_path_factory.mktemp("finished")
    path = write_recipe(
        tmp_path / "tiny.yaml",
        TINY,
        data={"synthetic_samples": 32},
        train={"ema": True, "ema_decay": 0.9},
    )
    summary = train(load_recipe(path), run_dir=tmp_path / "run")
    return path, tmp_path / "run", summary


def test_run_writes_summary_metrics_checkpoints_and_recipe(finished_run):
    path, run_dir, summary = finished_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    # the machine its images/s were measured on
    assert on_disk.pop("machine") == summary["machine"] == runtime.machine(torch.device("cpu"))
    assert on_disk == pytest.approx({key: v for key, v in summary.items() if key != "machine"})
    for key in ("top1", "top5", "ema_top1", "loss", "wall_s", "images_per_s"):
        assert isinstance(summary[key], float)
    assert (summary["epochs"], summary["steps"]) == (2, 8)
    assert [line["step"] for line in metrics_lines(run_dir, "train")] == list(range(1, 9))
    assert [line["epoch"] for line in metrics_lines(run_dir, "epoch")] == [1, 2]
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (
        run_dir / "checkpoints" / "best.pt"
    ).is_file()
    assert load_recipe(run_dir / "recipe.yaml") == load_recipe(path)
    assert not list(run_dir.rglob("*.tmp"))


def test_eval_of_a_saved_checkpoint_reproduces_the_run_metrics(finished_run, tmp_path):
    path, run_dir, summary = finished_run
    result = evaluate_checkpoint(
        load_recipe(path), run_dir / "checkpoints" / "last.pt", json_path=tmp_path / "e.json"
    )
    assert result["top1"] == pytest.approx(summary["top1"])
    assert result["loss"] == pytest.approx(summary["loss"])
    assert json.loads((tmp_path / "e.json").read_text())["top5"] == pytest.approx(summary["top5"])
    ema = evaluate_checkpoint(load_recipe(path), run_dir / "checkpoints" / "last.pt", use_ema=True)
    assert (ema["weights"], ema["top1"]) == ("ema", pytest.approx(summary["ema_top1"]))


def test_eval_at_precision_auto_runs_at_the_precision_it_resolves_to(finished_run, monkeypatch):
    """On a CPU without AMX `train.precision: auto` evaluates in fp32: the run's own figures."""
    path, run_dir, summary = finished_run
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": False})
    recipe = load_recipe(path, ["train.precision=auto"])
    result = evaluate_checkpoint(recipe, run_dir / "checkpoints" / "last.pt")
    assert result["loss"] == pytest.approx(summary["loss"])


def test_eval_cli_prints_metrics_and_writes_json(finished_run, tmp_path):
    path, run_dir, _ = finished_run
    out = tmp_path / "eval.json"
    args = [
        "eval",
        str(path),
        "--checkpoint",
        str(run_dir / "checkpoints" / "best.pt"),
        "--json",
        str(out),
    ]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "top-1" in done.output
    assert set(json.loads(out.read_text())) >= {"top1", "top5", "loss", "images_per_s"}


def test_eval_reports_per_class_top1_and_a_confusion_matrix_that_add_up(finished_run, tmp_path):
    pytest.importorskip("matplotlib")
    path, run_dir, summary = finished_run
    out, figure = tmp_path / "eval.json", tmp_path / "confusion.png"
    args = ["eval", str(path), "--checkpoint", str(run_dir / "checkpoints" / "last.pt")]
    done = CliRunner().invoke(
        app, [*args, "--json", str(out), "--confusion", str(figure), "--tta", "flip"]
    )
    assert done.exit_code == 0, done.output
    result = json.loads(out.read_text())
    assert result["tta"] == "flip" and "with flip test-time augmentation: top-1" in done.output
    assert result["top1"] == pytest.approx(summary["top1"])  # the plain figures stay as they are
    counts = torch.tensor(result["confusion_matrix"]["counts"])
    classes = result["confusion_matrix"]["classes"]
    assert counts.shape == (len(classes), len(classes)) and counts.sum() == result["images"]
    assert 100 * counts.trace() / counts.sum() == pytest.approx(summary["top1"])
    for k, name in enumerate(classes):
        expected = 100 * counts[k, k] / counts[k].sum() if counts[k].sum() else None
        assert result["class_top1"][name] == pytest.approx(expected)
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert f"{classes[0]}" in done.output  # the per-class table
    refused = CliRunner().invoke(app, [*args, "--confusion", str(tmp_path / "c.txt")])
    assert refused.exit_code != 0 and not (tmp_path / "c.txt").exists()


def test_flip_test_time_augmentation_averages_each_image_with_its_mirror_image():
    """On a model whose outputs for an image and its mirror image differ, the flip figures are
    those of the mean probabilities, computed here by hand."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    images, labels = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    metrics = classification.evaluate(model, [(images, labels)], tta="flip").metrics
    with torch.no_grad():
        mean = (model(images).softmax(1) + model(images.flip(3)).softmax(1)) / 2
    expected_top1 = 100 * (mean.argmax(1) == labels).float().mean().item()
    assert metrics["tta_top1"] == pytest.approx(expected_top1)
    assert metrics["tta_loss"] == pytest.approx(-mean[range(6), labels].log().mean().item())
    assert metrics["tta_loss"] != pytest.approx(metrics["loss"])


def test_multi_crop_averages_the_four_corners_and_the_centre():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    images, labels = torch.randn(5, 3, 6, 7), torch.tensor([0, 1, 2, 0, 1])
    metrics = classification.evaluate_five_crops(model, [(images, labels)], size=4)
    corners = [(0, 0), (0, 3), (2, 0), (2, 3), (1, 2)]  # top-left, top-right, bottom-left, ...
    with torch.no_grad():
        mean = sum(model(images[:, :, y : y + 4, x : x + 4]).softmax(1) for y, x in corners) / 5
    assert metrics["tta_top1"] == pytest.approx(100 * (mean.argmax(1) == labels).float().mean())
    assert metrics["tta_loss"] == pytest.approx(-mean[range(5), labels].log().mean().item())


def test_eval_reports_multi_crop_beside_the_plain_figures(finished_run):
    path, run_dir, summary = finished_run
    recipe = load_recipe(path)
    result = evaluate_checkpoint(recipe, run_dir / "checkpoints" / "last.pt", tta="multi-crop")
    assert result["tta"] == "multi-crop" and result["top1"] == pytest.approx(summary["top1"])
    assert 0 <= result["tta_top1"] <= 100 and result["tta_loss"] > 0
    with pytest.raises(UserError, match="unknown test-time augmentation 'ten-crop'"):
        evaluate_checkpoint(recipe, run_dir / "checkpoints" / "last.pt", tta="ten-crop")


def test_eval_needs_no_recipe_for_a_checkpoint_of_this_tool(finished_run, tmp_path):
    """The checkpoint's stored recipe and model spec rebuild its model; a recipe given still
    wins, and overrides apply to the stored recipe."""
    path, run_dir, summary = finished_run
    best = run_dir / "checkpoints" / "best.pt"
    assert torch.load(best, weights_only=True)["model_spec"]["num_classes"] == 4
    out = tmp_path / "eval.json"
    done = CliRunner().invoke(app, ["eval", "--checkpoint", str(best), "--json", str(out)])
    assert done.exit_code == 0, done.output
    assert json.loads(out.read_text())["top1"] == pytest.approx(summary["best_top1"])
    overridden = CliRunner().invoke(
        app, ["eval", "--checkpoint", str(best), "--set", "data.image_size=16"]
    )
    assert "data.image_size: must be at least 32" in str(overridden.exception)
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(best, weights_only=True)["model"], bare)
    done = CliRunner().invoke(app, ["eval", "--checkpoint", str(bare)])
    assert isinstance(done.exception, UserError) and "stores no recipe" in str(done.exception)
    with_recipe = CliRunner().invoke(app, ["eval", str(path), "--checkpoint", str(bare)])
    assert with_recipe.exit_code == 0, with_recipe.output


def test_fine_tuning_starts_from_pretrained_weights_with_frozen_parts_and_layer_decay(
    finished_run, tmp_path
):
    """A run started from another run's weights with a new head, at a new resolution, the stem
    frozen and layer-wise lr decay: the stem stays exactly the checkpoint's, the rest starts
    there (no table is resized), and each layer group's lr is the schedule's times its own
    scale."""
    path, run_dir, _ = finished_run
    pretrained = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    overrides = [
        f"model.pretrained={run_dir / 'checkpoints' / 'last.pt'}",
        "model.new_head=true",
        "model.freeze=[stem]",
        "optim.layer_decay=0.5",
        "optim.lr=1e-7",
        "schedule.epochs=1",
        "data.image_size=48",
        "data.synthetic_samples=16",
    ]
    train(load_recipe(path, overrides), run_dir=tmp_path / "fine")
    state = load_checkpoint(tmp_path / "fine" / "checkpoints" / "last.pt")
    tuned = state["model"]
    for key in pretrained:
        if key.startswith("stem.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(tuned[key], pretrained[key]), key
        elif key.startswith("stages.") and "running_" not in key and tuned[key].is_floating_point():
            torch.testing.assert_close(tuned[key], pretrained[key], atol=1e-5, rtol=0)
    assert not torch.allclose(tuned["head.weight"], pretrained["head.weight"], atol=1e-3)
    groups = state["optimizer"]["param_groups"]
    scales = sorted({group["lr_scale"] for group in groups})
    assert len(scales) > 3 and scales[-1] == 1.0 and scales[0] < 0.1
    assert len({round(group["lr"] / group["lr_scale"], 15) for group in groups}) == 1


def test_freezing_a_module_the_model_lacks_is_a_one_line_error(finished_run, tmp_path):
    path, _, _ = finished_run
    with pytest.raises(UserError, match="model.freeze: 'stages.9' names no module") as error:
        train(load_recipe(path, ["model.freeze=[stages.9]"]), run_dir=tmp_path / "run")
    assert "\n" not in str(error.value)


def test_unreadable_checkpoint_is_a_one_line_user_error(finished_run, tmp_path):
    path, run_dir, _ = finished_run
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((run_dir / "checkpoints" / "last.pt").read_bytes()[:5000])
    with pytest.raises(
        UserError, match=f"checkpoint {damaged} is not a readable checkpoint"
    ) as error:
        evaluate_checkpoint(load_recipe(path), damaged)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="is not a readable checkpoint"):
        train(load_recipe(path), run_dir=tmp_path / "run", resume=damaged)


def test_missing_ffcv_path_and_bad_batch_are_user_errors(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", TINY)
    with pytest.raises(UserError, match="data.train_path: not set"):
        train(load_recipe(path, ["data.backend=ffcv"]), run_dir=tmp_path / "a")
    with pytest.raises(UserError, match="train.batch_size: 8 does not divide into 1 processes x 3"):
        train(load_recipe(path, ["train.accum_steps=3"]), run_dir=tmp_path / "b")


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    """Killed right after the checkpoint at step 9 (mid-epoch 2, after an evaluation), resumed to
    the end: model, EMA and optimizer state are bit-for-bit those of an uninterrupted run. Mixup,
    cutmix, drop path and random erasing make every RNG stream matter."""
    path = write_recipe(
        tmp_path / "tiny.yaml",
        TINY,
        schedule={"epochs": 3},
        model={"drop_path": 0.1},
        augment={"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1, "random_erasing": 0.5},
        train={"ema": True, "ema_decay": 0.9},
    )
    train(load_recipe(path), run_dir=tmp_path / "full")

    run_dir = tmp_path / "interrupted"
    killed = run_in_child(
        "train", str(path), "--out", str(run_dir), env=child_env(KILL_AT_SAVE="6")
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    at_kill = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    position = at_kill["train_state"][0]
    assert (position["epoch"], position["batch"], position["step"]) == (1, 1, 9)

    resumed = run_in_child("train", str(path), "--out", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    done = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert done["train_state"][0]["step"] == 3 * STEPS_PER_EPOCH
    assert_same_tensors(full["model"], done["model"])
    assert_same_tensors(full["ema"], done["ema"])
    assert_same_tensors(full["optimizer"]["state"][0], done["optimizer"]["state"][0])
    assert [line["loss"] for line in metrics_lines(run_dir, "train")] == [
        line["loss"] for line in metrics_lines(tmp_path / "full", "train")
    ]


@pytest.mark.slow
def test_ffcv_runs_with_flips_and_randaugment_are_bit_identical_and_resume_exactly(tmp_path):
    """Real photographs through FFCV with random resized crops, flips, RandAugment and random
    erasing: two runs of one recipe give the same weights bit for bit, and so does a run killed
    with SIGKILL mid-epoch (right after its checkpoint at step 4) and resumed."""
    pytest.importorskip("ffcv")
    from debiformer.data import WriterOptions, convert_to_ffcv, make_photo_folder

    photos = make_photo_folder(tmp_path / "photos", 24, size=(48, 36), num_classes=3)
    options = WriterOptions(write_mode="jpg", num_workers=1)
    ffcv_file = convert_to_ffcv(str(photos), tmp_path / "photos.beton", options).path
    data = {"backend": "ffcv", "train_path": str(ffcv_file), "val_path": str(ffcv_file)}
    path = write_recipe(
        tmp_path / "ffcv.yaml",
        TINY,
        data={**data, "num_classes": 3, "num_workers": 2},
        augment={"hflip": True, "randaugment": "rand-m9-mstd0.5-inc1", "random_erasing": 0.5},
        output={"checkpoint_every": 2},
    )
    first = train(load_recipe(path), run_dir=tmp_path / "first")
    second = train(load_recipe(path), run_dir=tmp_path / "second")
    assert first["steps"] == second["steps"] == 6
    runs = ["first", "second"]
    final = {run: load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in runs}
    assert_same_tensors(final["first"]["model"], final["second"]["model"])

    run_dir = tmp_path / "killed"
    # saves: step 2; epoch 1's end (before and after its evaluation, with best.pt); step 4
    env = child_env(KILL_AT_SAVE="5")
    killed = run_in_child("train", str(path), "--out", str(run_dir), env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    position = load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"][0]
    assert (position["epoch"], position["batch"], position["step"]) == (1, 1, 4)
    resumed = run_in_child("train", str(path), "--out", str(run_dir))
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr
    done = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert_same_tensors(final["first"]["model"], done["model"])
    assert_same_tensors(final["first"]["optimizer"]["state"][0], done["optimizer"]["state"][0])


def sigterm_after_a_checkpoint(path: Path, run_dir: Path, to_group: bool) -> tuple[int, str]:
    """Starts `debiformer train PATH --out RUN_DIR` in a session of its own and, once it has
    written a checkpoint, sends SIGTERM to it (or to its whole process group); returns the step
    of that checkpoint and stderr, after checking that the command exited with status 0."""
    process = subprocess.Popen(
        [sys.executable, str(CLI_ENTRY), "train", str(path), "--out", str(run_dir)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    last = run_dir / "checkpoints" / "last.pt"
    while not last.exists() and process.poll() is None:
        time.sleep(0.05)
    step_before = load_checkpoint(last)["train_state"][0]["step"]
    if to_group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    return step_before, stderr


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    path = write_recipe(
        tmp_path / "tiny.yaml", TINY, schedule={"epochs": 200}, output={"checkpoint_every": 2}
    )
    run_dir = tmp_path / "run"
    step_before, stderr = sigterm_after_a_checkpoint(path, run_dir, to_group=False)
    assert "stopped by SIGTERM" in stderr
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert step_before <= state["train_state"][0]["step"] < 200 * STEPS_PER_EPOCH
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slow
@needs_fashion_mnist
def test_sigterm_to_the_process_group_spares_the_loader_workers(tmp_path):
    """`timeout`, Slurm and `kill -- -PGID` signal every process of the group, the loader's
    workers too: the run still stops after a step with a checkpoint (it ended with the
    DataLoader's "worker killed by signal" traceback and nothing saved)."""
    data = {
        "backend": "torchvision",
        "train_path": FASHION,
        "val_path": FASHION,
        "num_classes": 10,
        "num_workers": 2,
    }
    path = write_recipe(tmp_path / "tiny.yaml", TINY, data=data, output={"checkpoint_every": 2})
    run_dir = tmp_path / "run"
    step_before, stderr = sigterm_after_a_checkpoint(path, run_dir, to_group=True)
    assert "stopped by SIGTERM at step" in stderr and "Traceback" not in stderr, stderr
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["train_state"][0]["step"] >= step_before


class PoisonedLoader:
    """Wraps a loader so that its images become NaN from global batch `from_batch` on."""

    def __init__(self, loader, from_batch: int):
        self.loader, self.from_batch, self.seen = loader, from_batch, 0

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int, start_batch: int = 0):
        for images, labels in self.loader.batches(epoch, start_batch):
            self.seen += 1
            yield (images * float("nan") if self.seen >= self.from_batch else images), labels


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    build = classification.build_split_loader

    def poisoned(recipe, split, *args):
        loader = build(recipe, split, *args)
        return PoisonedLoader(loader, 5) if split == "train" else loader

    monkeypatch.setattr(classification, "build_split_loader", poisoned)
    path = write_recipe(
        tmp_path / "tiny.yaml", TINY, output={"log_every": 4, "checkpoint_every": 3}
    )
    with pytest.raises(NonFiniteLossError, match="training loss is nan") as error:
        train(load_recipe(path), run_dir=tmp_path / "run")
    assert "last good checkpoint" in str(error.value)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["train_state"][0]["step"] == 3
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


@pytest.mark.slow
def test_two_processes_match_one_even_across_a_torchrun_restart(tmp_path):
    """2 DDP processes with 4 images each compute what 1 process accumulating 2 micro-batches of 4
    does (batch norm sees the same 4 images per forward either way): same losses, same weights.
    Rank 0 is SIGKILLed after its second checkpoint; torchrun --max-restarts 1 restarts both
    workers, which resume from that checkpoint and finish the same run. Flips are off: each rank
    draws its batch's augmentations from its own stream, so only unaugmented runs coincide."""
    path = write_recipe(tmp_path / "tiny.yaml", TINY, augment={"hflip": False})
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))  # as each of the two processes runs
    try:
        single = train(load_recipe(path, ["train.accum_steps=2"]), run_dir=tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    done = run_in_child(
        "train",
        str(path),
        "--out",
        str(tmp_path / "two"),
        env=child_env(KILL_AT_SAVE="2"),
        torchrun=["--nproc-per-node=2", "--max-restarts=1"],
    )
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (two["world_size"], two["steps"]) == (2, single["steps"])
    losses_one = [line["loss"] for line in metrics_lines(tmp_path / "one", "train")]
    losses_two = [line["loss"] for line in metrics_lines(tmp_path / "two", "train")]
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
    # batch-norm running statistics differ by design (DDP keeps rank 0's); parameters must not
    one, two = (weights(tmp_path / name / "checkpoints" / "last.pt") for name in ("one", "two"))
    parameters = {name for name, _ in debiformer.create_model("debiformer_nano").named_parameters()}
    assert_same_tensors(
        {k: v for k, v in one.items() if k in parameters},
        {k: v for k, v in two.items() if k in parameters},
        atol=1e-5,
    )


@pytest.mark.slow
def test_nproc_per_node_trains_and_a_recipe_error_in_its_processes_is_one_line(tmp_path):
    """`train --nproc-per-node 2` launches torchrun in the command's own process: a finished run
    exits 0; an error that the processes find (the synthetic backend without num_classes) is one
    `error:` line, not one per process, and exit code 2, without torchrun's traceback and failure
    table."""
    path = write_recipe(tmp_path / "tiny.yaml", TINY, schedule={"epochs": 1})
    done = run_in_child("train", str(path), "--out", str(tmp_path / "run"), "--nproc-per-node", "2")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["world_size"] == 2
    data = {key: value for key, value in TINY["data"].items() if key != "num_classes"}
    bad = write_recipe(tmp_path / "bad.yaml", {**TINY, "data": data})
    failed = run_in_child(
        "train", str(bad), "--out", str(tmp_path / "bad"), "--nproc-per-node", "2"
    )
    assert failed.returncode == 2, failed.stderr
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the synthetic backend"), lines


def slurm_tasks(*args: str, env: dict[str, str], port: int) -> list:
    """`debiformer ARGS` as the two tasks of a Slurm job on this host (`srun -n 2`), each with half
    of this process's threads; their completed processes."""
    threads = str(max(1, torch.get_num_threads() // 2))
    env = {key: value for key, value in env.items() if not key.startswith(("SLURM_", "MASTER_"))}
    tasks = [
        subprocess.Popen(
            [sys.executable, str(CLI_ENTRY), *args],
            env={
                **env,
                "OMP_NUM_THREADS": threads,
                "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(rank),
                "SLURM_NTASKS": "2",
                "SLURM_JOB_ID": "4242",
                "SLURM_JOB_NODELIST": "localhost",
                "MASTER_PORT": str(port),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    for task in tasks:
        task.stdout, task.stderr = task.communicate(timeout=240)
    return tasks


@pytest.mark.slow
def test_slurm_tasks_train_as_one_job_and_resume_exactly_after_sigusr1(tmp_path):
    """Two tasks started with a 2-task Slurm job's variables train as `--nproc-per-node 2` does,
    to the same weights; SIGUSR1 (Slurm's warning before the time limit) after the second
    checkpoint stops both with a checkpoint, and the requeued tasks finish with the same weights."""
    path = write_recipe(tmp_path / "tiny.yaml", TINY, augment={"hflip": False})
    done = run_in_child(
        "train", str(path), "--out", str(tmp_path / "torchrun"), torchrun=["--nproc-per-node=2"]
    )
    assert done.returncode == 0, done.stderr
    reference = weights(tmp_path / "torchrun" / "checkpoints" / "last.pt")
    port = free_port()
    train_args = ("train", str(path), "--out", str(tmp_path / "slurm"))
    tasks = slurm_tasks(*train_args, env=child_env(), port=port)
    assert [task.returncode for task in tasks] == [0, 0]
    summary = json.loads((tmp_path / "slurm" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["stopped"] is None
    assert_same_tensors(weights(tmp_path / "slurm" / "checkpoints" / "last.pt"), reference)

    requeued = ("train", str(path), "--out", str(tmp_path / "requeued"))
    tasks = slurm_tasks(*requeued, env=child_env(USR1_AT_SAVE="2"), port=port)
    assert [task.returncode for task in tasks] == [0, 0]
    stop_line = tasks[0].stderr + tasks[0].stdout
    assert "stopped by SIGUSR1 at step" in stop_line and "Run the same command again" in stop_line
    assert not (tmp_path / "requeued" / "summary.json").exists()
    at_stop = load_checkpoint(tmp_path / "requeued" / "checkpoints" / "last.pt")
    assert 0 < at_stop["train_state"][0]["step"] < summary["steps"]
    tasks = slurm_tasks(*requeued, env=child_env(), port=port)
    assert [task.returncode for task in tasks] == [0, 0]
    finished = json.loads((tmp_path / "requeued" / "summary.json").read_text())
    assert finished["stopped"] is None and finished["steps"] == summary["steps"]
    assert_same_tensors(weights(tmp_path / "requeued" / "checkpoints" / "last.pt"), reference)


def test_fp16_on_the_cpu_is_refused_before_any_work(tmp_path):
    path = write_recipe(tmp_path / "tiny.yaml", TINY)
    with pytest.raises(UserError, match="train.precision: fp16 needs a CUDA device"):
        train(load_recipe(path, ["train.precision=fp16"]), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bf16_channels_last_checkpointing_and_accumulation_train(tmp_path):
    path = write_recipe(
        tmp_path / "tiny.yaml", TINY, schedule={"epochs": 1}, data={"synthetic_samples": 16}
    )
    overrides = [
        "train.precision=bf16",
        "train.channels_last=true",
        "train.accum_steps=2",
        "train.grad_checkpointing=[1,3]",
    ]
    summary = train(load_recipe(path, overrides), run_dir=tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert summary["steps"] == 2
    assert all(line["loss"] > 0 for line in metrics_lines(tmp_path / "run", "train"))
    assert not state["scaler"]  # bf16 needs no loss scaling


def test_without_ffcv_the_quick_start_reads_its_sources_with_torchvision(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "ffcv" else real_find_spec(name, *a),
    )
    recipe = fall_back_without_ffcv(load_recipe("quickstart"), Console(quiet=True))
    assert recipe.data.backend == "torchvision"
    assert (
        recipe.data.train_path
        == recipe.data.val_path
        == "fashion-mnist:/usr/share/datasets/fashion-mnist"
    )


@pytest.mark.slow
def test_fashion_mnist_subset_through_ffcv_conversion(tmp_path):
    """The quick start's path on 256 images: idx files -> FFCV files on first use -> training."""
    pytest.importorskip("ffcv")
    from debiformer.data import ffcv_summary

    fashion_mnist = Path("/usr/share/datasets/fashion-mnist")
    if not (fashion_mnist / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST idx files not installed (Debian package dataset-fashion-mnist)")
    overrides = [
        f"data.train_path={tmp_path / 'train.beton'}",
        f"data.val_path={tmp_path / 'val.beton'}",
        "data.ffcv_writer={write_mode: raw, subset: 256}",
        "data.num_workers=1",
        "train.batch_size=32",
        "schedule.epochs=1",
        "output.progress=false",
        "model.arch={dims: [32, 32, 32, 32], depths: [1, 1, 1, 1], offset_groups: [1, 1, 1, 1]}",
    ]
    recipe = load_recipe("quickstart", overrides)
    summary = train(recipe, run_dir=tmp_path / "run")
    assert (tmp_path / "train.beton").is_file() and (tmp_path / "val.beton").is_file()
    assert summary["steps"] == 256 // 32
    assert summary["images"] == ffcv_summary(tmp_path / "val.beton").num_samples
