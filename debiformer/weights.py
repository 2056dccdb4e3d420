"""Model weights from files: this tool's checkpoints, bare state dicts and the authors' release.

    load_weights       a loaded checkpoint's weights into a model, whichever kind it is
    load_weights_file  the same from a file path (`create_model(pretrained=PATH)`)

Every file is read by `checkpoint.load_checkpoint`, which never runs code from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from debiformer.checkpoint import is_training_checkpoint, load_checkpoint
from debiformer.errors import UserError
from debiformer.official import load_official_state_dict


def is_official_state_dict(state: dict[str, Any]) -> bool:
    """True for the authors' released checkpoints, recognised by their key names."""
    weights = state.get("model", state)
    return isinstance(weights, dict) and "downsample_layers.0.0.weight" in weights


def load_weights(
    model: nn.Module,
    state: dict[str, Any],
    path: str | Path,
    *,
    use_ema: bool = False,
    official: bool | None = None,
) -> str:
    """Loads the weights of checkpoint `state` (read from `path`) into `model`; returns which
    weights were used: "official", "ema", "model" or "state_dict". `official` None detects the
    release's files by their key names."""
    if official if official is not None else is_official_state_dict(state):
        load_official_state_dict(model, state.get("model", state))
        return "official"
    if is_training_checkpoint(state):
        if use_ema and state.get("ema") is None:
            raise UserError(
                f"checkpoint {path} holds no EMA weights (it was trained with train.ema: false)"
            )
        weights, kind = (state["ema"], "ema") if use_ema else (state.get("model"), "model")
    else:
        weights, kind = state.get("model", state), "state_dict"
    if not isinstance(weights, dict):
        raise UserError(f"checkpoint {path} holds no state dict (a dict of tensors)")
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise UserError(f"checkpoint {path} does not match the model: {detail}") from None
    return kind


def load_weights_file(model: nn.Module, path: str | Path, *, use_ema: bool = False) -> str:
    """Loads the weights of the checkpoint file `path` into `model` (see `load_weights`)."""
    return load_weights(model, load_checkpoint(path), path, use_ema=use_ema)
