"""The run directory of a training: its lock, the temporaries of killed writes, the recipe's
history, metrics.jsonl (and TensorBoard), summary.json and curves.png.

    <run_dir>/.lock  recipe.yaml  recipe.N.yaml  metrics.jsonl  tensorboard/  summary.json
             curves.png  checkpoints/last.pt  checkpoints/best.pt
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from debiformer import curves, runtime
from debiformer.engine.trackers import Tracker
from debiformer.errors import UserError, mention
from debiformer.recipe import Recipe, recipe_to_yaml

# bookkeeping fields of metrics.jsonl lines that are no curves
TENSORBOARD_SKIPPED = frozenset({"kind", "step", "epoch", "images"})


@contextmanager
def open_run(run_dir: Path, is_main: bool) -> Iterator[None]:
    """Holds the run directory's lock for the block (rank 0 only; every rank learns the outcome).

    A second training into a live run directory stops with one line naming the other process.
    The lock is an `fcntl` lock, which dies with its process, so a killed run's lock is simply
    taken over. Temporary files of writes a killed run left behind are removed. A run directory
    this call created is removed again if the block fails before anything was written into it.
    """
    created = is_main and not run_dir.exists()
    lock_file = None
    failure: UserError | None = None
    if is_main:
        lock_file, failure = _take_lock(run_dir)
    failure = runtime.broadcast(failure)
    if failure is not None:
        raise failure
    try:
        if is_main:
            for folder in (run_dir, run_dir / "checkpoints"):
                runtime.remove_stale_temporaries(folder)
        yield
    except BaseException:
        if created:
            _remove_if_unused(run_dir)
        raise
    finally:
        if lock_file is not None:
            lock_file.close()


def _remove_if_unused(run_dir: Path) -> None:
    """Removes `run_dir` when it holds nothing but its lock and an empty checkpoints folder."""
    checkpoints = run_dir / "checkpoints"
    unused = not checkpoints.is_dir() or not any(checkpoints.iterdir())
    if unused and {path.name for path in run_dir.iterdir()} <= {".lock", "checkpoints"}:
        (run_dir / ".lock").unlink(missing_ok=True)
        if checkpoints.is_dir():
            checkpoints.rmdir()
        run_dir.rmdir()


def _take_lock(run_dir: Path) -> tuple[IO[str] | None, UserError | None]:
    """(open lock file, None) when this process now holds the run directory's lock and can write
    its checkpoints, else (None, the error that says why, about `run_dir`)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock_file = open(run_dir / ".lock", "a+")  # noqa: SIM115 (held for the whole run)
    except OSError as error:
        return None, UserError(
            f"{run_dir}: cannot create the run directory ({error.strerror})", about="run_dir"
        )
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "another process"
        lock_file.close()
        return None, UserError(
            f"run directory {run_dir} is in use by {holder}: wait for it to finish, stop it, "
            f"or choose another {mention('run_dir')}"
        )
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"process {os.getpid()} on {os.uname().nodename}\n")
    lock_file.flush()
    try:
        runtime.check_writable(run_dir / "checkpoints" / "last.pt", "run_dir")
    except UserError as error:
        lock_file.close()
        return None, error
    return lock_file, None


def save_recipe_history(recipe: Recipe, run_dir: Path) -> None:
    """Writes recipe.yaml; a different earlier recipe.yaml is kept as recipe.N.yaml first."""
    path = run_dir / "recipe.yaml"
    text = recipe_to_yaml(recipe)
    if path.exists() and path.read_text() != text:
        number = 1
        while (run_dir / f"recipe.{number}.yaml").exists():
            number += 1
        os.replace(path, run_dir / f"recipe.{number}.yaml")
    runtime.write_text(path, text)


def summary_writer_class() -> type:
    """torch's TensorBoard `SummaryWriter`; a one-line error without the tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "output.tensorboard: needs the tensorboard package (pip install "
            "'debiformer[tensorboard]'), or set it to false"
        ) from None
    return SummaryWriter


class MetricsLog:
    """Appends JSON lines to metrics.jsonl; on resume, drops lines written after the checkpoint
    it resumes from. With `tensorboard_dir` (`output.tensorboard`) the same scalars go to
    TensorBoard event files there too, an earlier attempt's events after the resumed step purged;
    and every record goes to each of `trackers` (`engine.trackers`).
    Only rank 0's log is `enabled`; the other ranks' write nothing."""

    def __init__(
        self,
        path: Path,
        resume_step: int | None,
        enabled: bool,
        tensorboard_dir: Path | None = None,
        trackers: list[Tracker] | None = None,
    ) -> None:
        self.path = path
        self.enabled = enabled
        self.tensorboard = None
        self.trackers = list(trackers or [])
        if not enabled:
            return
        if tensorboard_dir is not None:
            purge_step = None if resume_step is None else resume_step + 1
            self.tensorboard = summary_writer_class()(str(tensorboard_dir), purge_step=purge_step)
        kept = []
        if resume_step is not None and path.exists():
            kept = [line for line in _lines(path) if _step(line) <= resume_step]
        runtime.write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Appends one record; its numbers also go to TensorBoard as `<kind>/<key>` at its step."""
        if not self.enabled:
            return
        runtime.append_line(self.path, json.dumps(record))
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in TENSORBOARD_SKIPPED and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            self.tensorboard.flush()
        for tracker in self.trackers:
            tracker.log(record)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """Closes the TensorBoard writer and ends the trackers' runs, handing them `summary` (a
        finished run's; None for a stopped or failed one)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        for tracker in self.trackers:
            tracker.finish(summary)
        self.trackers = []


def write_curves(run_dir: Path, metric: str, console: Console) -> None:
    """<run_dir>/curves.png (as `debiformer plot` draws the run), its validation curve `metric`;
    skipped with a one-line notice without matplotlib. Never fails the training: a drawing error
    is a one-line warning."""
    if importlib.util.find_spec("matplotlib") is None:
        console.print(
            "curves.png skipped: matplotlib is not installed (pip install 'debiformer[viz]')",
            highlight=False,
        )
        return
    try:
        curves.write_run_curves(run_dir, metric)
    except Exception as error:  # a figure must never fail a training that has finished
        detail = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        console.print(f"[yellow]warning:[/] curves.png not written ({detail})", highlight=False)


def _lines(path: Path) -> list[str]:
    """The lines of a metrics file; bytes that are not UTF-8 (a write cut short by a crash) are
    replaced, so their line fails to parse and is dropped."""
    return path.read_bytes().decode("utf-8", errors="replace").splitlines()


def _step(line: str) -> float:
    """The step of one metrics line; infinity for a line that is not a record (a blank line, a
    write cut short by a crash), so it is never kept."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf
