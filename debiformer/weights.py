"""Model weights from files and URLs, read without running code from them.

    read_state_dict   a file or URL -> state dict in this project's names, and its kind
    load_pretrained   start a model from such weights: a new head for other classes, the stem
                      adapted to other input channels (`create_model(pretrained=...)`)
    load_weights      a loaded checkpoint's weights into a model, exactly (`debiformer eval`)

Accepted: this tool's training checkpoints (model or EMA weights), bare state dicts (also under
`"model"`), the authors' released files (their key names are renamed on load) and `.safetensors`
files. `.pt`/`.pth` files go through `checkpoint.load_checkpoint` (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from rich.console import Console
from timm.models import adapt_input_conv
from torch import nn

from debiformer.checkpoint import is_training_checkpoint, load_checkpoint
from debiformer.errors import UserError
from debiformer.official import rename_official_state_dict

STEM_CONV = "stem.0"
CLASSIFIER = "head"


def is_official_state_dict(state: dict[str, Any]) -> bool:
    """True for the authors' released checkpoints, recognised by their key names."""
    weights = state.get("model", state)
    return isinstance(weights, dict) and "downsample_layers.0.0.weight" in weights


def local_file(source: str | Path) -> Path:
    """`source` as a local file: a path, or a URL downloaded once into the torch hub cache
    (`<hub dir>/checkpoints`), checked against the hash prefix its name carries
    (`name-<sha256 prefix>.pth`, torch.hub's convention) if any."""
    text = str(source)
    if "://" not in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UserError(f"checkpoint {path} does not exist")
        return path
    name = Path(text.split("?")[0]).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        hash_prefix = re.search(r"-([a-f0-9]{6,})\.", name)
        try:
            torch.hub.download_url_to_file(
                text, str(path), hash_prefix.group(1) if hash_prefix else None, progress=False
            )
        except (OSError, RuntimeError) as error:
            detail = " ".join(str(error).split())[:200]
            raise UserError(f"cannot download {text}: {detail}") from None
    return path


def _state_of(
    checkpoint: dict[str, Any], path: str | Path, use_ema: bool, official: bool | None = None
) -> tuple[dict, str]:
    """The weights a loaded checkpoint holds, in this project's names, and their kind. `official`
    True reads it as a released file, False as this tool's; None tells them by their key names."""
    if official is None:
        official = is_official_state_dict(checkpoint)
    if is_training_checkpoint(checkpoint) and not official:
        if use_ema and checkpoint.get("ema") is None:
            raise UserError(
                f"checkpoint {path} holds no EMA weights (it was trained with train.ema: false)"
            )
        weights, kind = (
            (checkpoint["ema"], "ema") if use_ema else (checkpoint.get("model"), "model")
        )
    else:
        weights, kind = (
            checkpoint.get("model", checkpoint),
            "official" if official else "state_dict",
        )
    if not isinstance(weights, dict) or not all(
        isinstance(value, torch.Tensor) for value in weights.values()
    ):
        raise UserError(
            f"checkpoint {path} holds no state dict (a dict of tensors, or one under 'model')"
        )
    return (rename_official_state_dict(weights) if official else weights), kind


def read_state_dict(source: str | Path, *, use_ema: bool = False) -> tuple[dict, str]:
    """(state dict in this project's names, kind) of a checkpoint file or URL; kind is
    "official", "ema", "model", "state_dict" or "safetensors"."""
    path = local_file(source)
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path), "safetensors"
        except Exception as error:  # safetensors raises its own error types for a damaged file
            detail = " ".join(str(error).split())[:200]
            raise UserError(
                f"checkpoint {path} is not a readable safetensors file: {detail}"
            ) from None
    return _state_of(load_checkpoint(path), path, use_ema)


def as_model_shape(tensor: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """The release's (out, in, 1, 1) pointwise weight as the (out, in) weight of this project's
    Linear layer (`expected` is the model's tensor); any other tensor as it is."""
    if expected.ndim == 2 and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
        return tensor.flatten(1)
    return tensor


def match_model(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> dict:
    """`state` checked key by key against `model`: the release's (out, in, 1, 1) pointwise weights
    reshaped to the Linear layers' (out, in); any extra, missing or mis-shaped key is a one-line
    `UserError` naming it."""
    expected = model.state_dict()
    matched = {}
    for key, tensor in state.items():
        if key not in expected:
            raise UserError(
                f"checkpoint {source}: key {key!r} has no place in this model (is it the right "
                "variant?)"
            )
        tensor = as_model_shape(tensor, expected[key])
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(
                f"checkpoint {source}: key {key!r} has shape {tuple(tensor.shape)}, the model "
                f"expects {tuple(expected[key].shape)} (is it the right variant and num_classes?)"
            )
        matched[key] = tensor
    # FrozenBatchNorm2d (a frozen model's) keeps no batch count; the count never affects outputs
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in matched:
            matched[key] = expected[key]
    missing = [key for key in expected if key not in matched]
    if missing:
        raise UserError(
            f"checkpoint {source} lacks {missing[0]!r} (and {len(missing) - 1} more): is it the "
            "right variant?"
        )
    return matched


def adapt_to_model(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    new_head: bool = False,
    console: Console | None = None,
) -> dict[str, torch.Tensor]:
    """`state` made to fit a model with other classes or input channels: a head of another size
    (or any head, with `new_head`) is left out, so the model keeps its freshly initialised one,
    with a one-line notice; a stem convolution for other input channels is adapted as timm's
    `adapt_input_conv` does."""
    state = dict(state)
    expected = model.state_dict()
    head = f"{CLASSIFIER}.weight"
    fits = head in state and head in expected and state[head].shape == expected[head].shape
    if head in state and (new_head or not fits):
        classes = state[head].shape[0]
        for key in (head, f"{CLASSIFIER}.bias"):
            state.pop(key, None)
        notice = (
            f"new {expected[head].shape[0]}-way head (the checkpoint's head has {classes} classes)"
            if head in expected
            else f"the checkpoint's {classes}-class head is left out (the model has none)"
        )
        (console or Console(stderr=True)).print(f"pretrained weights: {notice}", highlight=False)
    stem = f"{STEM_CONV}.weight"
    if stem in state and stem in expected and state[stem].shape[1] != expected[stem].shape[1]:
        state[stem] = adapt_input_conv(expected[stem].shape[1], state[stem])
    return state


def load_pretrained(
    model: nn.Module,
    source: str | Path,
    *,
    use_ema: bool = False,
    new_head: bool = False,
    console: Console | None = None,
) -> str:
    """Starts `model` from the weights of `source` (a file or URL; see `read_state_dict`).

    A head for other classes (or any head, with `new_head`) starts at zero: its logits start
    equal, the first steps train the head before any gradient reaches the backbone, and it
    cannot carry the checkpoint's classes over (a random head drawn from the seed the checkpoint
    was trained with would start where that run's head started). Returns the kind of weights."""
    state, kind = read_state_dict(source, use_ema=use_ema)
    state = adapt_to_model(model, state, new_head=new_head, console=console)
    head_keys = {f"{CLASSIFIER}.weight", f"{CLASSIFIER}.bias"}
    current = model.state_dict()
    new_head_state = {
        key: torch.zeros_like(current[key])
        for key in head_keys
        if key in current and key not in state
    }
    model.load_state_dict(match_model(model, {**state, **new_head_state}, source))
    return kind


def load_weights(
    model: nn.Module,
    checkpoint: dict[str, Any],
    path: str | Path,
    *,
    use_ema: bool = False,
    official: bool | None = None,
) -> str:
    """Loads the weights of `checkpoint` (read from `path`) into `model` exactly; returns their
    kind. `official` True reads it as a released file; None tells one by its key names."""
    state, kind = _state_of(checkpoint, path, use_ema, official)
    model.load_state_dict(match_model(model, state, path))
    return kind


def load_official_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads a state dict saved by the authors' release into `model`, checking every key and
    shape."""
    model.load_state_dict(match_model(model, rename_official_state_dict(state_dict), "checkpoint"))


def load_official_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Loads a released checkpoint file (a state dict, or one under `'model'`) into `model`."""
    load_weights(model, load_checkpoint(path), path, official=True)
