"""Load the authors' released DeBiFormer checkpoints (their key names) into `DeBiFormer`.

The release's 1×1 convolutions are `nn.Linear` layers here: their (out, in, 1, 1) weights load
as (out, in)."""

import re
from pathlib import Path

import torch
from torch import nn

from debiformer.checkpoint import load_checkpoint
from debiformer.errors import UserError

# (pattern in a released key, replacement in this project's key), applied in order.
_RENAMES = [
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d)\.", lambda m: f"downsamples.{int(m.group(1)) - 1}."),
    (r"\.qkv\.qkv\.", ".qkv."),
    (r"\.qkv_conv\.qkv\.", ".qkv."),
    (r"\.wo\.", ".proj."),
    (r"\.lepe1\.", ".lepe."),
    (r"\.unifyheads1\.", ".unify."),
    (r"\.conv_offset_q\.1\.norm\.", ".offset_net.1."),
    (r"\.conv_offset_q\.", ".offset_net."),
    (r"(\.attn\d)\.norm2\.", r"\1.agent_norm1."),
    (r"(\.attn\d)\.norm\.", r"\1.agent_norm2."),
    (r"(\.attn\d)\.mlp\.", r"\1.agent_mlp."),
    (r"\.linear1\.0\.", ".fc1."),
    (r"\.linear2\.0\.", ".fc2."),
    (r"\.dwc\.", ".dwconv."),
]


def official_key(name: str) -> str:
    """This project's parameter name for a key of the released checkpoints."""
    for pattern, replacement in _RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def load_official_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a state dict saved by the authors' release into `model`, checking every key and shape."""
    expected = model.state_dict()
    renamed = {official_key(name): (name, tensor) for name, tensor in state_dict.items()}
    for key, (name, tensor) in renamed.items():
        if key in expected and expected[key].ndim == 2 and tensor.shape[2:] == (1, 1):
            renamed[key] = (name, tensor.flatten(1))
    for key, (name, tensor) in renamed.items():
        if key not in expected:
            raise UserError(
                f"checkpoint key {name!r} has no place in this model: is it the right variant?"
            )
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(
                f"checkpoint key {name!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(expected[key].shape)}: is it the right variant and num_classes?"
            )
    missing = [key for key in expected if key not in renamed]
    if missing:
        raise UserError(
            f"checkpoint lacks {missing[0]!r} (and {len(missing) - 1} more): is it the right variant?"
        )
    model.load_state_dict({key: tensor for key, (_, tensor) in renamed.items()})


def load_official_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a released checkpoint file (a raw state dict or `{'model': state_dict}`) into `model`."""
    checkpoint = load_checkpoint(path)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, dict) or not all(
        isinstance(v, torch.Tensor) for v in checkpoint.values()
    ):
        raise UserError(
            f"checkpoint {path} holds no state dict (expected a dict of tensors or {{'model': ...}})"
        )
    load_official_state_dict(model, checkpoint)
