"""The `debiformer` command itself: subcommands, version, and one-line errors."""

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

import debiformer
from cli.main import app

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_the_subcommands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "bench", "profile", "data"):
        assert command in result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"debiformer {debiformer.__version__}"


def test_bad_input_is_a_one_line_error_not_a_traceback(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("optim:\n  lrr: 0.1\n")
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "train", str(recipe), "--out", str(tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error:") and "optim.lrr" in lines[0]


def test_a_bad_option_value_is_a_one_line_error():
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "bench", "--grad-checkpointing", "one"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --grad-checkpointing takes stage numbers 1-4, e.g. 1,3; got 'one'"
    )
