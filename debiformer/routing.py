"""Bi-level routing: regions, region-to-region routing, and routed attention.

A feature map is cut into S×S regions. Each query region picks its top-k key regions
by the similarity of region means (`route`), then attends only to the pixels of those
regions (`routed_attention`). `attend_routed_regions` does all of it on NHWC maps.
`RegionGrid` describes how a padded map is cut; within `recording`, the attentions hand their
grids, routing and agents to a callback (`debiformer show` draws them).

The routed attention never builds the (regions × top-k) copy of the keys and values that
a gather on an expanded tensor makes (nor that copy's gradient, S² times larger). It takes
the cheapest of three exact paths:

- slot by slot (large regions, e.g. stage 1): each of the k slots gathers one key/value-sized
  tensor with `index_select`, and the backward pass scatters gradients back with `index_add_`,
  so memory stays at the size of the keys and values whatever k is;
- masked dense (few queries per image, such as DBRA's agents, or small regions): one attention
  product over all keys of the image with unrouted regions masked out, chosen when its
  attention matrix is no larger than the top-k copy would be;
- plain attention when every region is routed to every region (k = S²).

Without autograd (inference, export) the slot-by-slot path gathers all k regions at once and
runs one fused product instead (`_gathered_attention`): the copy is transient, and there is no
backward pass whose memory the slots bound.

`implementation("reference")` switches to the release's gather, for comparison.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from debiformer.regions import step


def pad_to_regions(x: Tensor, regions_per_side: int) -> Tensor:
    """Pad an NHWC map with zeros on the bottom and right so that S divides H and W."""
    height, width = x.shape[1:3]
    pad_h = -height % regions_per_side
    pad_w = -width % regions_per_side
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


@dataclass(frozen=True)
class RegionGrid:
    """How an attention cuts a map into S×S regions: `size` the map's (h, w), `padded_size` its
    (H, W) after `pad_to_regions`, S = `regions_per_side`; regions in `to_regions`' raster order."""

    size: tuple[int, int]
    padded_size: tuple[int, int]
    regions_per_side: int

    @property
    def region_size(self) -> tuple[int, int]:
        """The (h, w) of one region: H/S x W/S pixels, as `to_regions` cuts them."""
        height, width = self.padded_size
        return height // self.regions_per_side, width // self.regions_per_side

    def region_map(self) -> Tensor:
        """(h, w): the raster index of the region holding each pixel of the (unpadded) map."""
        region_h, region_w = self.region_size
        rows = torch.arange(self.size[0]) // region_h
        columns = torch.arange(self.size[1]) // region_w
        return rows[:, None] * self.regions_per_side + columns[None, :]

    def region_boxes(self) -> Tensor:
        """(S², 4) boxes (x0, y0, x1, y1) of the regions in map pixels, in raster order; the last
        row and column of regions reach into the padding."""
        region_h, region_w = self.region_size
        regions = torch.arange(self.regions_per_side**2)
        rows, columns = regions // self.regions_per_side, regions % self.regions_per_side
        return torch.stack(
            [columns * region_w, rows * region_h, (columns + 1) * region_w, (rows + 1) * region_h],
            dim=-1,
        )


def to_regions(x: Tensor, regions_per_side: int) -> Tensor:
    """(N, H, W, C) -> (N, S², H/S · W/S, C): the pixels of each region, regions in raster order."""
    n, height, width, channels = x.shape
    s = regions_per_side
    x = x.reshape(n, s, height // s, s, width // s, channels).transpose(2, 3)
    return x.reshape(n, s * s, (height // s) * (width // s), channels)


def from_regions(x: Tensor, regions_per_side: int, height: int, width: int) -> Tensor:
    """Inverse of `to_regions`: (N, S², h·w, C) -> (N, H, W, C)."""
    n, _, _, channels = x.shape
    s = regions_per_side
    x = x.reshape(n, s, s, height // s, width // s, channels).transpose(2, 3)
    return x.reshape(n, height, width, channels)


@torch.no_grad()
def route(query_regions: Tensor, key_regions: Tensor, topk: int, scale: float) -> Tensor:
    """Indices (N, R, k) of the k key regions whose mean key best matches each region's mean query."""
    query_means = query_regions.mean(dim=2)
    key_means = key_regions.mean(dim=2)
    affinity = (query_means * scale) @ key_means.transpose(-1, -2)
    return torch.topk(affinity, k=topk, dim=-1).indices


def split_heads(regions: Tensor, num_heads: int) -> Tensor:
    """(N, R, L, C) -> (N·R, M, L, C/M), contiguous."""
    n, r, length, channels = regions.shape
    heads = regions.reshape(n * r, length, num_heads, channels // num_heads)
    return heads.transpose(1, 2).contiguous()


def merge_heads(heads: Tensor, batch: int) -> Tensor:
    """(N·R, M, L, d) -> (N, R, L, M·d)."""
    nr, num_heads, length, head_dim = heads.shape
    merged = heads.transpose(1, 2).reshape(batch, nr // batch, length, num_heads * head_dim)
    return merged


class _RoutedAttention(torch.autograd.Function):
    """Softmax attention of each query region over the pixels of its routed key regions.

    Shapes: queries (B, M, Lq, d), keys and values (B, M, Lk, d), where B counts
    (image, region) pairs; `slots` (B, k) holds, for each query region, the flat index
    into B of each of its k routed key regions.
    """

    @staticmethod
    def forward(ctx, queries: Tensor, keys: Tensor, values: Tensor, slots: Tensor, scale: float):
        batch, heads, query_len, _ = queries.shape
        key_len = keys.shape[2]
        topk = slots.shape[1]
        scaled_queries = queries * scale
        logits = queries.new_empty(batch, heads, query_len, topk, key_len)
        for slot in range(topk):
            with step("routed_gather"):
                slot_keys = keys.index_select(0, slots[:, slot])
            logits[:, :, :, slot] = scaled_queries @ slot_keys.transpose(-1, -2)
        # in the queries' dtype: CUDA's autocast computes softmax in fp32, and the backward pass
        # (which runs outside autocast) multiplies the attention by bf16 gradients
        attention = logits.view(batch, heads, query_len, topk * key_len).softmax(dim=-1)
        attention = attention.to(queries.dtype).view(batch, heads, query_len, topk, key_len)
        output = torch.zeros_like(queries)
        for slot in range(topk):
            with step("routed_gather"):
                slot_values = values.index_select(0, slots[:, slot])
            output += attention[:, :, :, slot] @ slot_values
        ctx.save_for_backward(scaled_queries, keys, values, slots, attention)
        ctx.scale = scale
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):
        scaled_queries, keys, values, slots, attention = ctx.saved_tensors
        topk = slots.shape[1]
        grad_output = grad_output.contiguous()
        grad_attention = torch.empty_like(attention)
        grad_values = torch.zeros_like(values)
        for slot in range(topk):
            index = slots[:, slot]
            with step("routed_gather"):
                slot_values = values.index_select(0, index)
            grad_attention[:, :, :, slot] = grad_output @ slot_values.transpose(-1, -2)
            with step("routed_gather"):
                grad_values.index_add_(
                    0, index, attention[:, :, :, slot].transpose(-1, -2) @ grad_output
                )
        flat_attention = attention.flatten(-2)
        flat_grad = grad_attention.flatten(-2)
        row_dot = (flat_grad * flat_attention).sum(dim=-1, keepdim=True)
        grad_logits = (flat_attention * (flat_grad - row_dot)).view_as(attention)
        grad_queries = torch.zeros_like(scaled_queries)
        grad_keys = torch.zeros_like(keys)
        for slot in range(topk):
            index = slots[:, slot]
            with step("routed_gather"):
                slot_keys = keys.index_select(0, index)
            grad_queries += grad_logits[:, :, :, slot] @ slot_keys
            with step("routed_gather"):
                grad_keys.index_add_(
                    0, index, grad_logits[:, :, :, slot].transpose(-1, -2) @ scaled_queries
                )
        return grad_queries * ctx.scale, grad_keys, grad_values, None, None


def _gathered_attention(
    queries: Tensor, keys: Tensor, values: Tensor, slots: Tensor, scale: float
) -> Tensor:
    """`_RoutedAttention` without autograd (inference, export): the keys and values of all k
    routed regions gathered at once and one fused attention product over them. With no backward
    pass to keep small, one product is 1.2-2.7x faster on the CPU than k slot products."""
    batch, heads, _, head_dim = queries.shape
    topk = slots.shape[1]

    def routed(regions: Tensor) -> Tensor:
        with step("routed_gather"):
            selected = regions.index_select(0, slots.flatten())
        return selected.view(batch, topk, heads, -1, head_dim).transpose(1, 2).flatten(2, 3)

    return F.scaled_dot_product_attention(queries, routed(keys), routed(values), scale=scale)


IMPLEMENTATIONS = ("fast", "reference")
_implementation = "fast"


@contextmanager
def implementation(name: str) -> Iterator[None]:
    """Run routed attention with `name`: "fast" (the default) or "reference" (the release's gather)."""
    global _implementation
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown routed-attention implementation {name!r}; choose from {IMPLEMENTATIONS}"
        )
    previous, _implementation = _implementation, name
    try:
        yield
    finally:
        _implementation = previous


# what `record` hands values to inside a `recording` block; None outside one
_recorder: Callable[[str, Tensor | RegionGrid], None] | None = None


@contextmanager
def recording(recorder: Callable[[str, Tensor | RegionGrid], None]) -> Iterator[None]:
    """Within the block the attentions hand what they compute to `recorder(name, value)`:
    "region_grid" (the `RegionGrid` of BRA's and DBRA's input map), "region_index" (the routing
    of BRA and of DBRA's agents), and for DBRA "reference_points" (the agents' grid cell centres
    (Hk, Wk, 2), (y, x) in [-1, 1]), "agent_positions" (those plus offsets, where the input is
    sampled), "agent_grid" (the `RegionGrid` of the agent map) and "query_agent_attention".
    Outside one, `record` returns at once: the model keeps no reference and computes nothing
    extra (`debiformer show` records through this)."""
    global _recorder
    previous, _recorder = _recorder, recorder
    try:
        yield
    finally:
        _recorder = previous


def record(name: str, tensor: Tensor) -> None:
    """Hands `tensor` to the recorder of the active `recording` block, if any."""
    if _recorder is not None:
        _recorder(name, tensor)


def record_grid(name: str, size: tuple[int, int], padded: Tensor, regions_per_side: int) -> None:
    """Hands the `RegionGrid` of a map of `size` (h, w) that `pad_to_regions` made the NHWC
    `padded` to the recorder of the active `recording` block, if any."""
    if _recorder is not None:
        _recorder(name, RegionGrid(tuple(size), tuple(padded.shape[1:3]), regions_per_side))


def routed_attention(
    query_regions: Tensor,
    key_regions: Tensor,
    value_regions: Tensor,
    region_index: Tensor,
    num_heads: int,
    scale: float,
) -> Tensor:
    """Multi-head attention of each query region over the pixels of its routed key regions.

    query_regions (N, R, Lq, C); key_regions, value_regions (N, R, Lk, C);
    region_index (N, R, k) from `route`. Returns (N, R, Lq, C).
    When every region is routed to every region (k = R) this is plain attention.
    """
    if _implementation == "reference":
        return gather_routed_attention(
            query_regions, key_regions, value_regions, region_index, num_heads, scale
        )
    batch, num_regions, query_len, channels = query_regions.shape
    topk = region_index.shape[-1]
    if topk >= num_regions:
        return _dense_attention(query_regions, key_regions, value_regions, num_heads, scale)
    if num_heads * num_regions * query_len <= topk * channels:
        return _masked_dense_attention(
            query_regions, key_regions, value_regions, region_index, num_heads, scale
        )
    queries = split_heads(query_regions, num_heads)
    keys = split_heads(key_regions.to(queries.dtype), num_heads)
    values = split_heads(value_regions.to(queries.dtype), num_heads)
    offsets = torch.arange(batch, device=region_index.device).view(batch, 1, 1) * num_regions
    slots = (region_index + offsets).flatten(0, 1)
    if torch.is_grad_enabled():
        output = _RoutedAttention.apply(queries, keys, values, slots, scale)
    else:
        output = _gathered_attention(queries, keys, values, slots, scale)
    return merge_heads(output, batch)


def attend_routed_regions(
    query_map: Tensor,
    key_map: Tensor,
    value_map: Tensor,
    regions_per_side: int,
    topk: int,
    num_heads: int,
    scale: float,
    attention_step: str,
    routing_step: str,
) -> Tensor:
    """Bi-level routing on NHWC maps whose sides divide by S: cut them into S×S regions, route
    each query region to its top-k key regions (k at most S²), attend to their pixels and stitch
    the query regions back into a map. The query map may be smaller than the key map (DBRA's
    agents). The two step names label the work for `debiformer profile`."""
    height, width = query_map.shape[1:3]
    with step(attention_step):
        query_regions = to_regions(query_map, regions_per_side)
        key_regions = to_regions(key_map, regions_per_side)
        value_regions = to_regions(value_map, regions_per_side)
    with step(routing_step):
        region_index = route(query_regions, key_regions, min(topk, regions_per_side**2), scale)
    record("region_index", region_index)
    with step(attention_step):
        output = routed_attention(
            query_regions, key_regions, value_regions, region_index, num_heads, scale
        )
        return from_regions(output, regions_per_side, height, width)


def _image_heads(regions: Tensor, num_heads: int) -> Tensor:
    """(N, R, L, C) -> (N, M, R·L, C/M): all pixels of an image, per head."""
    batch, _, _, channels = regions.shape
    return regions.reshape(batch, -1, num_heads, channels // num_heads).transpose(1, 2)


def _from_image_heads(heads: Tensor, num_regions: int) -> Tensor:
    """(N, M, R·L, d) -> (N, R, L, M·d)."""
    batch, num_heads, length, head_dim = heads.shape
    return heads.transpose(1, 2).reshape(
        batch, num_regions, length // num_regions, num_heads * head_dim
    )


def _dense_attention(
    query_regions: Tensor, key_regions: Tensor, value_regions: Tensor, num_heads: int, scale: float
) -> Tensor:
    """Every query attends to every key of its image (routing to all regions)."""
    output = F.scaled_dot_product_attention(
        _image_heads(query_regions, num_heads),
        _image_heads(key_regions, num_heads),
        _image_heads(value_regions, num_heads),
        scale=scale,
    )
    return _from_image_heads(output, query_regions.shape[1])


def _masked_dense_attention(
    query_regions: Tensor,
    key_regions: Tensor,
    value_regions: Tensor,
    region_index: Tensor,
    num_heads: int,
    scale: float,
) -> Tensor:
    """Attention over every key of the image with unrouted regions masked out. Chosen when the
    attention matrix is no larger than the routed copy of the keys would be: few queries per
    image (agents) or small regions make one dense product cheaper than k gathers."""
    batch, num_regions, query_len, _ = query_regions.shape
    key_len = key_regions.shape[2]
    routed = torch.zeros(
        batch, num_regions, num_regions, dtype=torch.bool, device=region_index.device
    )
    routed.scatter_(2, region_index, True)
    mask = routed[:, None, :, None, :, None].expand(-1, -1, -1, query_len, -1, key_len)
    output = F.scaled_dot_product_attention(
        _image_heads(query_regions, num_heads),
        _image_heads(key_regions, num_heads),
        _image_heads(value_regions, num_heads),
        attn_mask=mask.reshape(batch, 1, num_regions * query_len, num_regions * key_len),
        scale=scale,
    )
    return _from_image_heads(output, num_regions)


def gather_routed_attention(
    query_regions: Tensor,
    key_regions: Tensor,
    value_regions: Tensor,
    region_index: Tensor,
    num_heads: int,
    scale: float,
) -> Tensor:
    """Routed attention as the authors' release computes it, for comparison: `torch.gather` on
    the keys and values expanded to every region copies the top-k regions for each query
    region, and its backward pass materialises an S²-times larger gradient."""
    batch, regions, query_len, channels = query_regions.shape
    key_len = key_regions.shape[2]
    topk = region_index.shape[-1]

    def gather(kv: Tensor) -> Tensor:
        expanded = kv.view(batch, 1, regions, key_len, channels).expand(-1, regions, -1, -1, -1)
        index = region_index.view(batch, regions, topk, 1, 1).expand(-1, -1, -1, key_len, channels)
        selected = torch.gather(expanded, 2, index).reshape(
            batch, regions, topk * key_len, channels
        )
        return split_heads(selected, num_heads)

    queries = split_heads(query_regions, num_heads)
    with step("routed_gather"):
        routed_keys = gather(key_regions)
    attention = ((queries * scale) @ routed_keys.transpose(-1, -2)).softmax(dim=-1)
    with step("routed_gather"):
        routed_values = gather(value_regions)
    return merge_heads(attention @ routed_values, batch)
