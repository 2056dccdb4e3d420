"""Library errors name parameters; on the command line they read as the flags that set them."""

from pathlib import Path

import pytest
import torch

from debiformer.cli.flags import message
from debiformer.engine import fit
from debiformer.errors import UserError
from debiformer.recipe import load_recipe
from debiformer.tools.bench import BenchOptions
from debiformer.tools.export import ExportOptions
from debiformer.tools.plot import check_figure_path
from debiformer.tools.profile import ProfileOptions
from tests.helpers.toy_task import LineTask, toy_recipe

NANO = {"models": ("debiformer_nano",), "device": "cpu"}


def error_of(make) -> UserError:
    with pytest.raises(UserError) as error:
        make()
    return error.value


def test_a_resume_the_run_cannot_continue_names_resume_and_fresh(tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(1)}, weights)
    error = error_of(
        lambda: fit(toy_recipe(), LineTask(), run_dir=tmp_path / "run", resume=weights)
    )
    assert str(error).startswith(f"resume {weights}: not a training checkpoint")
    assert message(error, "train").startswith(f"--resume {weights}: not a training checkpoint")
    error = error_of(
        lambda: fit(toy_recipe(), LineTask(), run_dir=tmp_path, resume="x", fresh=True)
    )
    assert str(error).startswith("resume and fresh contradict each other")
    assert message(error, "train").startswith("--resume and --fresh contradict each other")


@pytest.mark.parametrize(
    ("command", "make", "library", "cli"),
    [
        (
            "train",
            lambda tmp: load_recipe("quickstart", ["optim.lr"]),
            "overrides 'optim.lr': expected section.key=value",
            "--set 'optim.lr': expected section.key=value",
        ),
        (
            "bench",
            lambda tmp: BenchOptions(**NANO, runtimes=("onnxruntime",), modes=("train",)),
            "runtimes=onnxruntime measures inference only: use modes=infer",
            "--runtime onnxruntime measures inference only: use --mode infer",
        ),
        (
            "bench",
            lambda tmp: BenchOptions(**NANO, grad_checkpointing=(5,)),
            "grad_checkpointing takes stages 1-4, got [5]",
            "--grad-checkpointing takes stages 1-4, got [5]",
        ),
        (
            "profile",
            lambda tmp: ProfileOptions(device="cpu", batch_size=0),
            "batch_size must be at least 1, got 0",
            "--batch-size must be at least 1, got 0",
        ),
        (
            "export",
            lambda tmp: ExportOptions(
                out=tmp / "nano.safetensors", model="debiformer_nano", ema=True
            ),
            "ema reads the EMA weights of a checkpoint; give one",
            "--ema reads the EMA weights of a --checkpoint; give one",
        ),
        (
            "export",
            lambda tmp: ExportOptions(out=tmp / "nano.safetensors"),
            "name the model: model=NAME, recipe=RECIPE or a checkpoint",
            "name the model: --model NAME, --recipe RECIPE or a --checkpoint",
        ),
        (
            "plot",
            lambda tmp: check_figure_path(Path("curves.txt")),
            "out curves.txt: give a file name ending in .png",
            "--out curves.txt: give a file name ending in .png",
        ),
    ],
)
def test_library_errors_read_as_flags_on_the_command_line(tmp_path, command, make, library, cli):
    error = error_of(lambda: make(tmp_path))
    assert str(error).startswith(library)
    assert message(error, command).startswith(cli)
