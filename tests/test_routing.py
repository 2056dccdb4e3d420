"""The fast routed attention equals the plain oracle, and never allocates top-k copies."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from debiformer.routing import (
    RegionGrid,
    from_regions,
    gather_routed_attention,
    implementation,
    pad_to_regions,
    record_grid,
    recording,
    route,
    routed_attention,
    to_regions,
)
from tests.helpers.reference_attention import masked_dense_attention

CASES = [
    # batch, regions per side, query len, key len, channels, heads, top-k
    (1, 7, 64, 16, 64, 2, 1),  # slot-by-slot gather
    (2, 7, 16, 16, 128, 4, 4),  # slot-by-slot gather
    (1, 3, 8, 8, 32, 2, 2),  # slot-by-slot gather
    (2, 7, 1, 64, 64, 2, 4),  # masked dense: one agent per region
    (1, 7, 4, 16, 128, 4, 8),  # masked dense: small regions
    (3, 2, 9, 4, 32, 1, 3),  # masked dense
    (2, 7, 1, 1, 64, 2, 49),  # every region routed: plain attention
]


def _inputs(batch, side, query_len, key_len, channels, seed=0):
    generator = torch.Generator().manual_seed(seed)
    regions = side * side

    def rand(length):
        return torch.randn(
            batch, regions, length, channels, generator=generator, dtype=torch.float64
        )

    return rand(query_len), rand(key_len), rand(key_len)


@pytest.mark.parametrize(
    ("batch", "side", "query_len", "key_len", "channels", "heads", "topk"), CASES
)
def test_implementations_equal_the_oracle_outputs_and_gradients(
    batch, side, query_len, key_len, channels, heads, topk
):
    query, key, value = _inputs(batch, side, query_len, key_len, channels)
    scale = channels**-0.5
    index = route(query, key, topk, scale)
    grad_out = torch.randn(batch, side * side, query_len, channels, dtype=torch.float64)

    results = []
    for attention in (routed_attention, gather_routed_attention, masked_dense_attention):
        leaves = [t.clone().requires_grad_() for t in (query, key, value)]
        output = attention(*leaves, index, heads, scale)
        output.backward(grad_out)
        results.append((output.detach(), *(leaf.grad for leaf in leaves)))

    fast, gather, oracle = results
    for tensors in (fast, gather):
        for tensor, expected in zip(tensors, oracle, strict=True):
            torch.testing.assert_close(tensor, expected, rtol=1e-10, atol=1e-10)


def test_reference_implementation_is_selectable():
    query, key, value = _inputs(1, 7, 1, 64, 64)
    index = route(query, key, 4, 0.125)
    with implementation("reference"), _LargestAllocation() as tracker:
        routed_attention(query, key, value, index, 2, 0.125)
    assert tracker.largest >= 4 * key.numel()
    with (
        pytest.raises(ValueError, match="unknown routed-attention implementation"),
        implementation("fused"),
    ):
        pass


def test_route_picks_the_most_similar_regions():
    key = torch.zeros(1, 4, 1, 2)
    key[0, :, 0, 0] = torch.tensor([1.0, 3.0, 2.0, -1.0])
    query = torch.ones(1, 4, 1, 2)
    index = route(query, key, topk=2, scale=1.0)
    assert index[0, 0].tolist() == [1, 2]


def test_regions_round_trip_and_padding():
    x = torch.randn(2, 10, 13, 3)
    padded = pad_to_regions(x, 7)
    assert padded.shape == (2, 14, 14, 3)
    assert torch.equal(padded[:, :10, :13], x) and padded[:, 10:].abs().sum() == 0
    regions = to_regions(padded, 7)
    assert regions.shape == (2, 49, 4, 3)
    assert torch.equal(from_regions(regions, 7, 14, 14), padded)
    assert torch.equal(regions[0, 1, 0], padded[0, 0, 2])


def test_region_grid_is_the_layout_of_to_regions():
    """The recorded grid of a padded map puts each pixel in the region `to_regions` cuts it into,
    and its boxes bound exactly the pixels of each region; nothing is recorded outside `recording`."""
    x = torch.zeros(1, 10, 13, 1)
    padded = pad_to_regions(x, 7)
    recorded = []
    record_grid("region_grid", (10, 13), padded, 7)
    with recording(lambda name, value: recorded.append((name, value))):
        record_grid("region_grid", (10, 13), padded, 7)
    assert recorded == [("region_grid", RegionGrid((10, 13), (14, 14), 7))]
    grid = recorded[0][1]
    assert grid.region_size == (2, 2)
    pixel_ids = torch.arange(14 * 14).view(1, 14, 14, 1)
    region_map, boxes = grid.region_map(), grid.region_boxes()
    assert region_map.shape == (10, 13) and boxes.shape == (49, 4)
    for region, pixels in enumerate(to_regions(pixel_ids, 7)[0, :, :, 0]):
        rows, columns = pixels // 14, pixels % 14
        inside = (rows < 10) & (columns < 13)
        assert (region_map[rows[inside], columns[inside]] == region).all()
        x0, y0, x1, y1 = boxes[region].tolist()
        assert (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1) == (x0, y0, x1, y1)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any operator produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return result


def _largest_tensor(attention, query_len, heads, topk):
    batch, side, key_len, channels = 1, 7, 64, 64
    query, key, value = (
        t.requires_grad_() for t in _inputs(batch, side, query_len, key_len, channels)
    )
    index = route(query, key, topk, channels**-0.5)
    with _LargestAllocation() as tracker:
        attention(query, key, value, index, heads, channels**-0.5).sum().backward()
    return tracker.largest, key.numel()


@pytest.mark.parametrize(("query_len", "heads"), [(16, 2), (1, 2)])
def test_fast_path_allocates_no_topk_copies(query_len, heads):
    largest, key_size = _largest_tensor(routed_attention, query_len, heads, topk=8)
    assert largest < 8 * key_size


def test_reference_path_allocates_topk_copies():
    largest, key_size = _largest_tensor(gather_routed_attention, 16, 2, topk=8)
    assert largest >= 8 * key_size
