"""`debiformer plot`: parse options, draw the curves of training runs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def plot(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (runs/NAME), overlaid."),
    out: Path = typer.Option(Path("curves.png"), "--out", help="Figure file (.png, .svg, .pdf)."),
) -> None:
    """Plot training loss, the validation metric (top1, bbox_ap or miou; percentages and
    fractions on separate axes), the learning rate and images/s against steps; several runs
    overlay, labelled by recipe name."""
    from debiformer.tools.plot import plot_runs

    path = plot_runs(run_dirs, out)
    Console(stderr=True, soft_wrap=True).print(f"wrote {path}", highlight=False)
