"""`debiformer train`: parse options, load the recipe, train (or launch torchrun to)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from debiformer.cli import options
from debiformer.errors import UserError

if TYPE_CHECKING:  # torch is imported when a command runs, not for --help
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


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
    """Runs `debiformer <args>` in `nproc_per_node` processes with torchrun's launcher (in this
    process); returns the exit code. The processes' `error:` messages are printed once each
    (`options.PROCESS_ERRORS_ENV`); torchrun's report of a failed process (its traceback and
    table) gives way to them, or to one line where a process failed without one."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # the machine's cores shared among the processes (torchrun's own default is 1 thread each)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (cores or 1) // nproc_per_node)))
    launch = torchrun.parse_args([
        "--standalone", f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}",
        "--no-python", sys.executable, "-c", "from debiformer.cli.main import main; main()", *args,
    ])  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="debiformer-errors-") as errors:
        os.environ[options.PROCESS_ERRORS_ENV] = errors
        try:
            torchrun.run(launch)
        except ChildFailedError as failed:
            return _failed_launch_exit(failed, Path(errors))
        except SignalException as stop:  # passed on to the processes, which saved a checkpoint
            return 128 + int(stop.sigval)
        finally:
            del os.environ[options.PROCESS_ERRORS_ENV]
    return 0


def _failed_launch_exit(failed: ChildFailedError, errors: Path) -> int:
    """The exit code of a launch whose processes failed: the user error's, after printing each
    different `error:` message the processes wrote to `errors`; where none wrote one, a
    `UserError` saying which process failed first and how."""
    messages = _process_errors(errors)
    for message in messages:
        options.print_error(message)
    if messages:
        return options.USER_ERROR_EXIT
    rank, failure = failed.get_first_failure()
    ended = (
        f"was killed by signal {failure.signal_name()}"
        if failure.exitcode < 0
        else f"exited with code {failure.exitcode}"
    )
    raise UserError(f"training process {rank} {ended}; its output is above") from None


def _process_errors(errors: Path) -> list[str]:
    """The different `error:` messages the processes wrote to `errors`, in the order of their
    ranks (a user error found by every process is one message)."""
    files = sorted(errors.iterdir(), key=lambda file: int(file.name))
    return list(dict.fromkeys(file.read_text() for file in files))
