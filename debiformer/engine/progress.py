"""What a training shows while it runs: the rank-0 progress bar, and the window of steps whose
mean loss the next `train` metrics line reports."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class LossWindow:
    """The optimizer steps since the last `train` metrics line: their summed loss (on the
    device, read only when logged), count, seconds and images."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.steps, self.seconds, self.images = 0, 0.0, 0

    def add(self, loss: torch.Tensor, seconds: float, images: int) -> None:
        """Counts one step."""
        self.loss += loss
        self.steps += 1
        self.seconds += seconds
        self.images += images

    def reset(self) -> None:
        """Starts the next window."""
        self.loss.zero_()
        self.steps, self.seconds, self.images = 0, 0.0, 0


class ProgressBar:
    """The rank-0 progress bar over a run's optimizer steps: step count, loss, lr, images/s,
    elapsed and remaining time. Use it as a context manager."""

    def __init__(self, enabled: bool, console: Console, total: int, completed: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            disable=not enabled,
            console=console,
        )
        self.bar = self.progress.add_task(
            "train", total=total, completed=completed, loss="-", lr="-", ips="-"
        )

    def __enter__(self) -> ProgressBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Names the running epoch (0-based `epoch`)."""
        self.progress.update(self.bar, description=f"epoch {epoch + 1}/{epochs}")

    def advance(self) -> None:
        """One step done."""
        self.progress.advance(self.bar)

    def show(self, loss: float, lr: float, images_per_s: float) -> None:
        """The latest logged loss, lr and throughput."""
        self.progress.update(
            self.bar, loss=f"{loss:.4f}", lr=f"{lr:.2e}", ips=f"{images_per_s:.0f}"
        )
