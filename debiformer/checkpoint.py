"""Checkpoint files: safe loading, atomic writes, and the RNG states exact resume needs.

Loading never runs code from the file. Every file goes through `torch.load(weights_only=True)`,
which rebuilds only tensors and plain containers; the few other types this tool's older
checkpoints and the authors' release hold (numpy RNG arrays, argparse namespaces) are
allow-listed by name. A file that needs anything else is refused with one line naming the type.
"""

from __future__ import annotations

import argparse
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from debiformer.errors import UserError
from debiformer.runtime import atomic_writer

# the layout of training checkpoints; /1 files (RNG states as numpy arrays) load for evaluation
FORMAT = "debiformer-train/2"


def _numpy_array_globals() -> list:
    """What a pickled numpy array refers to: older checkpoints kept numpy's RNG state as one."""
    multiarray = getattr(np, "_core", None) or np.core
    dtypes = [type(np.dtype(kind)) for kind in ("uint32", "float64", "int64")]
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


SAFE_GLOBALS = [*_numpy_array_globals(), argparse.Namespace]


def tensor_bytes(value: Any) -> int:
    """The bytes of the tensors in `value` (nested in dicts, lists and tuples): about what
    `torch.save` writes of it."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Writes `state` to `path` atomically: a temporary file in the same folder, fsync, rename.
    A disk that fills on the way is a one-line `UserError` naming the folder, the space the
    checkpoint needs and the space left; the file at `path` stays as it was."""
    with atomic_writer(path, "wb", size=tensor_bytes(state)) as file:
        torch.save({"format": FORMAT, **state}, file)


def _refusal(path: Path, error: Exception) -> UserError:
    """The one-line error for a file that `torch.load(weights_only=True)` would not rebuild."""
    message = str(error)
    fix = "save its state dict (tensors only) or a .safetensors file"
    named_global = re.search(r"GLOBAL ([\w.]+)", message)
    if message.startswith("Weights only load failed") and named_global:
        return UserError(
            f"checkpoint {path} holds Python objects that are not weights "
            f"({named_global.group(1)}): refused, because loading them could run code; {fix}"
        )
    if message.startswith("Weights only load failed"):
        return UserError(
            f"checkpoint {path} is not a readable checkpoint: it is damaged or holds pickled "
            f"Python objects (refused, because loading them could run code); {fix}"
        )
    reason = message.splitlines()[0] if message else type(error).__name__
    return UserError(
        f"checkpoint {path} is not a readable checkpoint ({type(error).__name__}): {reason}"
    )


def existing_file(path: Path) -> Path:
    """`path`, a file; a missing path or a directory is a one-line `UserError`."""
    if path.is_dir():
        last = path / "checkpoints" / "last.pt"
        hint = f" (a run's: {last})" if last.is_file() else ""
        raise UserError(f"{path} is a directory, not a weights file: give a file in it{hint}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint onto the CPU without running code from it; an unreadable or unsafe file
    is a `UserError` naming it."""
    path = existing_file(Path(path))
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a damaged or unsafe file
        raise _refusal(path, error) from None
    if not isinstance(state, dict):
        raise UserError(
            f"checkpoint {path} is not a readable checkpoint: it holds a {type(state).__name__}"
        )
    return state


def is_training_checkpoint(state: dict[str, Any]) -> bool:
    """True for files written by this tool's training loop (not a bare or released state dict)."""
    return str(state.get("format", "")).startswith("debiformer-train/")


def rng_state() -> dict[str, Any]:
    """The states of every random generator a training step may draw from, as tensors and plain
    Python values (loadable with `weights_only=True`)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            position,
            has_gauss,
            cached_gaussian,
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores generator states saved by `rng_state` (or by older checkpoints, as numpy arrays)."""
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    keys = np.asarray(keys.numpy() if isinstance(keys, torch.Tensor) else keys, dtype=np.uint32)
    np.random.set_state((kind, keys, position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
