"""The authors' released DeBiFormer checkpoints: their key names, renamed to this project's.

The release's 1×1 convolutions are `nn.Linear` layers here: `weights.match_model` reshapes their
(out, in, 1, 1) weights to (out, in) when it loads them."""

import re

import torch

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


def rename_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A released state dict with this project's key names."""
    return {official_key(name): tensor for name, tensor in state_dict.items()}
