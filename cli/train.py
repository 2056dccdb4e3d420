"""`debiformer train` and `debiformer eval`: parse options, load the recipe, call the library."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer
from rich.console import Console

from debiformer.recipe import load_recipe

RECIPE_HELP = "Recipe YAML file, or the name of one in recipes/ (e.g. quickstart, tiny)."
SET_HELP = "Override a recipe value: section.key=value (repeatable), e.g. --set optim.lr=1e-3."


def train(
    recipe: str = typer.Argument(..., help=RECIPE_HELP),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP, metavar="SECTION.KEY=VALUE"),
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
    from debiformer.train import train as run_training

    loaded = load_recipe(recipe, overrides)
    run_dir = out or Path(loaded.output.dir or Path("runs") / loaded.name)
    if nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        args = ["train", recipe, *(f"--set={item}" for item in overrides), "--out", str(run_dir)]
        args += ["--resume", str(resume)] if resume else []
        args += ["--fresh"] if fresh else []
        raise typer.Exit(_launch_torchrun(args, nproc_per_node, max_restarts))
    run_training(loaded, out_dir=run_dir, resume=resume, fresh=fresh)


def evaluate(
    recipe: str = typer.Argument(..., help=RECIPE_HELP),
    checkpoint: Path = typer.Option(
        ..., "--checkpoint", help="This tool's checkpoint or a released one."
    ),
    json_path: Path | None = typer.Option(
        None, "--json", help="Also write the results to this JSON file."
    ),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP, metavar="SECTION.KEY=VALUE"),
    ema: bool = typer.Option(False, "--ema", help="Evaluate the checkpoint's EMA weights."),
    official: bool | None = typer.Option(
        None,
        "--official/--no-official",
        help="Treat as the authors' release (default: detect by key names).",
    ),
) -> None:
    """Top-1, top-5, loss and images/s of a checkpoint on the recipe's validation set."""
    from debiformer.evaluate import evaluate_checkpoint
    from debiformer.train import fall_back_without_ffcv, prepare_ffcv_files

    loaded = fall_back_without_ffcv(load_recipe(recipe, overrides), Console(stderr=True))
    prepare_ffcv_files(loaded, splits=("val",))
    result = evaluate_checkpoint(
        loaded, checkpoint, use_ema=ema, official=official, json_path=json_path
    )
    Console().print(
        f"{result['model']} ({result['weights']} weights) on {result['images']} images: "
        f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
        f"{result['images_per_s']:.0f} img/s",
        highlight=False,
    )


def _launch_torchrun(args: list[str], nproc_per_node: int, max_restarts: int) -> int:
    """Runs `debiformer <args>` in `nproc_per_node` torchrun processes; returns the exit code."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}",
        "--no-python", sys.executable, "-c", "from cli.main import main; main()", *args,
    ]  # fmt: skip
    return subprocess.call(command)
