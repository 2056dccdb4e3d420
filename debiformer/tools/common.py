"""What `bench`, `profile` and the loader benchmark share: range checks of their settings, the
name of the peak-memory figure, and tables that stay whole on a narrow console or in a pipe."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from rich import box
from rich.table import Table

from debiformer.errors import UserError

MIN_RESOLUTION = 32
CPU_MEMORY = "CPU peak RSS rise"
CUDA_MEMORY = "CUDA max allocated"


def check_at_least(about: str, value: int, least: int) -> None:
    """A one-line `UserError` about the parameter `about` when its `value` is below `least`."""
    if value < least:
        raise UserError(f"must be at least {least}, got {value}", about=about)


def memory_kind(device: torch.device) -> str:
    """What `runtime.peak_memory` measures on `device`, for records and captions."""
    return CUDA_MEMORY if device.type == "cuda" else CPU_MEMORY


def fitting_table(title: str, caption: str, columns: Iterable[tuple[str, str]]) -> Table:
    """A table that stays whole on a narrow console (80 columns, or a pipe): short headers, one
    space between columns, the units in `caption`; right-justified (number) columns never wrap,
    and text that does not fit wraps instead of being cut with "…".
    `columns` are (header, "left" or "right")."""
    table = Table(
        title=title,
        caption=caption,
        box=box.SIMPLE_HEAD,
        padding=0,
        show_edge=False,
        title_justify="left",
        caption_justify="left",
    )
    for header, justify in columns:
        table.add_column(header, justify=justify, overflow="fold", no_wrap=justify == "right")
    return table


def figure(value: float) -> str:
    """`value` with three significant digits or more, as few characters as that allows:
    4.08, 15.7, 509, 12346."""
    if abs(value) < 10:
        return f"{value:.2f}"
    if abs(value) < 100:
        return f"{value:.1f}"
    return f"{value:.0f}"
