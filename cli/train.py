"""`debiformer train`: parse options, load the recipe, train (or launch torchrun to)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

from debiformer.cli import options
from debiformer.errors import UserError


def train(
    recipe: str = options.RECIPE,
    overrides: list[str] = options.OVERRIDES,
    out: Path | None = typer.Option(
        None, "--out", help="Run directory (default: output.dir or runs/<recipe>)."
    ),
    resume: Path | None = typer.Option(
        None,
        "--resume",
        help="Checkpoint to resume from (default: the run directory's last.pt, if any).",
    ),
    fresh: bool = typer.Option(
        False, "--fresh", help="Start over even if the run directory has a checkpoint."
    ),
    nproc_per_node: int = typer.Option(
        1, "--nproc-per-node", help="Processes to launch with torchrun."
    ),
    max_restarts: int = typer.Option(
        0, "--max-restarts", help="With --nproc-per-node: torchrun restarts."
    ),
) -> None:
    """Train a model as RECIPE says; resumes automatically from an existing run directory."""
    from debiformer.recipe import load_recipe
    from debiformer.tasks import train as train_task

    if resume is not None and fresh:
        raise UserError("--resume and --fresh contradict each other: give one of them")
    if nproc_per_node < 1:
        raise UserError(f"--nproc-per-node: must be at least 1, got {nproc_per_node}")
    if max_restarts < 0:
        raise UserError(f"--max-restarts: must be at least 0, got {max_restarts}")
    loaded = load_recipe(recipe, overrides)
    run_dir = out or Path(loaded.output.dir or Path("runs") / loaded.name)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir}: is a file; give a directory")
    if nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        args = ["train", recipe, *(f"--set={item}" for item in overrides), "--out", str(run_dir)]
        args += ["--resume", str(resume)] if resume else []
        args += ["--fresh"] if fresh else []
        raise typer.Exit(_launch_torchrun(args, nproc_per_node, max_restarts))
    train_task(loaded, run_dir=run_dir, resume=resume, fresh=fresh)


def _launch_torchrun(args: list[str], nproc_per_node: int, max_restarts: int) -> int:
    """Runs `debiformer <args>` in `nproc_per_node` torchrun processes; returns the exit code."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}",
        "--no-python", sys.executable, "-c", "from debiformer.cli.main import main; main()", *args,
    ]  # fmt: skip
    return subprocess.call(command)
