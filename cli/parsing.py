"""Parsers of option strings that several commands share: lists and image sizes."""

from __future__ import annotations

from collections.abc import Sequence


def names(values: Sequence[str]) -> list[str]:
    """Flattens repeated and comma-separated option values: ["a,b", "c"] -> ["a", "b", "c"]."""
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def sides(text: str) -> tuple[int, ...] | None:
    """The whole numbers of "N" or "HxW" (an "X" too), as (N,) or (H, W); None for anything
    else."""
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(part.strip().isdigit() for part in parts):
        return None
    return tuple(int(part) for part in parts)
