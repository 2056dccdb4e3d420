"""The oracle for routed attention: plain dense attention over every key of the image, with
the keys outside a query region's routed regions masked out. It shares no code with the
gather-based implementations it checks."""

import torch
from torch import Tensor


def masked_dense_attention(
    query_regions: Tensor,
    key_regions: Tensor,
    value_regions: Tensor,
    region_index: Tensor,
    num_heads: int,
    scale: float,
) -> Tensor:
    """Same contract as `debiformer.routing.routed_attention`."""
    batch, regions, query_len, channels = query_regions.shape
    key_len = key_regions.shape[2]
    head_dim = channels // num_heads
    routed = torch.zeros(batch, regions, regions, dtype=torch.bool)
    routed.scatter_(2, region_index, True)
    # (batch, query pixels, key pixels): True where the key lies in a routed region
    mask = routed.repeat_interleave(query_len, dim=1).repeat_interleave(key_len, dim=2)

    def heads(x: Tensor) -> Tensor:
        return x.reshape(batch, -1, num_heads, head_dim).transpose(1, 2)

    logits = (heads(query_regions) @ heads(key_regions).transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask[:, None], float("-inf"))
    output = logits.softmax(dim=-1) @ heads(value_regions)
    return output.transpose(1, 2).reshape(batch, regions, query_len, channels)
