"""Checkpoint files: atomic writes, readable load errors, and the RNG states exact resume needs."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from debiformer.errors import UserError

FORMAT = "debiformer-train/1"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Writes `state` to `path` atomically: a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:
            torch.save({"format": FORMAT, **state}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint onto the CPU; an unreadable file is a `UserError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch.load raises many types for a damaged file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"checkpoint {path} is not a readable checkpoint ({type(error).__name__}): {reason}"
        ) from None
    if not isinstance(state, dict):
        raise UserError(
            f"checkpoint {path} is not a readable checkpoint: it holds a {type(state).__name__}"
        )
    return state


def is_training_checkpoint(state: dict[str, Any]) -> bool:
    """True for files written by this tool's training loop (not a bare or released state dict)."""
    return state.get("format") == FORMAT


def rng_state() -> dict[str, Any]:
    """The states of every random generator a training step may draw from."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores generator states saved by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
