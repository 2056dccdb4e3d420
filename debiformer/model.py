"""DeBiFormer: a four-stage vision transformer whose blocks pair Bi-level Routing Attention
(BRA) with Deformable Bi-level Routing Attention (DBRA).

Reading order: `Mlp`, `BiLevelRoutingAttention`, `DeformableBiLevelRoutingAttention`,
`Block`, `DeBiFormer`, then the variants and `create_model` at the end. Every module inside
the network works on NHWC maps: pointwise layers are `nn.Linear` over the channels and
spatial convolutions run in channels-last memory (`Conv2dNHWC`), so no layout copies are made
between them. Inputs of any size work: each attention pads its input on the bottom and right
to the region grid and crops its output back.
"""

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, register_notrace_function, register_notrace_module, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from debiformer.depthwise import (
    DepthwiseConvNHWC,
    depthwise_conv,
    depthwise_conv_backward,
    smaller_than_kernel,
    with_identity_tap,
)
from debiformer.errors import UserError
from debiformer.official import rename_official_state_dict
from debiformer.regions import step
from debiformer.routing import attend_routed_regions, pad_to_regions, record, record_grid
from debiformer.sampling import bilinear_sample
from debiformer.weights import as_model_shape, is_official_state_dict, load_pretrained


@register_notrace_module  # chooses its backward by the map's size: a leaf for torch.fx
class Conv2dNHWC(nn.Conv2d):
    """A `Conv2d` that takes and returns NHWC maps: the NCHW view of an NHWC tensor is
    channels-last memory, which the convolution keeps, so neither permute copies. In training,
    a depthwise one (stride 1, same-size output) on a map smaller than its kernel is
    differentiated by `DepthwiseConvNHWC`, whose weight gradient is fast there."""

    def forward(self, x: Tensor) -> Tensor:
        return self._convolve(x, self.weight)

    def _convolve(self, x: Tensor, weight: Tensor) -> Tensor:
        """The convolution of the NHWC map `x` with `weight` (this layer's, or one derived
        from it) and this layer's bias and settings."""
        if self._on_small_map_in_training(x):
            return DepthwiseConvNHWC.apply(x, weight, self.bias)
        return self._conv_forward(x.permute(0, 3, 1, 2), weight, self.bias).permute(0, 2, 3, 1)

    def _on_small_map_in_training(self, x: Tensor) -> bool:
        kernel = self.kernel_size[0]
        depthwise_same_size = (
            self.groups == self.in_channels == self.out_channels
            and self.kernel_size == (kernel, kernel)
            and self.stride == (1, 1)
            and self.padding == (kernel // 2, kernel // 2)
            and self.dilation == (1, 1)
            and self.bias is not None
        )
        return (
            depthwise_same_size
            and torch.is_grad_enabled()
            and self.weight.requires_grad
            and smaller_than_kernel(x, kernel)
        )


# the device types autocast exists for (not "meta"), read once: torch.compile cannot trace
# `torch.amp.is_autocast_available`, and a graph break in every attention made compiled inference
# slower than eager on a GPU
_AUTOCAST_DEVICES = frozenset(
    device for device in ("cpu", "cuda", "mps", "xpu") if torch.amp.is_autocast_available(device)
)


class Fp32Conv2dNHWC(Conv2dNHWC):
    """A `Conv2dNHWC` that computes in fp32 under autocast and returns its input's dtype. For
    the 5×5 and strided depthwise convolutions of the attentions: their bf16 backward is slower
    than their fp32 one on CPUs (oneDNN: 1.4x for the 5×5, 10-24x for the strided, with
    DeBiFormer-T's shapes on AVX-512) and on GPUs (DeBiFormer-T's bf16 training step on an H200
    is 1.29x faster with them in fp32, the casts included), and they are a small share of the
    work either way."""

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        if not (device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device)):
            return super().forward(x)
        with torch.autocast(device, enabled=False):
            return super().forward(x.float()).to(x.dtype)


@register_notrace_module  # a `Conv2dNHWC`: a leaf for torch.fx
class ResidualConv2dNHWC(Conv2dNHWC):
    """`x + conv(x)` for a depthwise same-size convolution (the blocks' position embeddings),
    computed as one convolution whose kernel has 1 added at its centre tap
    (`with_identity_tap`); the parameters are the convolution's own."""

    def forward(self, x: Tensor) -> Tensor:
        return self._convolve(x, with_identity_tap(self.weight))


def _residual_depthwise(hidden: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """h + depthwise conv(h) on an NHWC map (odd kernel, same-size output), in h's dtype, as one
    convolution (`with_identity_tap`)."""
    return depthwise_conv(hidden, with_identity_tap(weight), bias)


class _MlpTail(torch.autograd.Function):
    """`linear(GELU(h + dwconv(h)))` that keeps only `h` for the backward pass and recomputes
    the depthwise convolution and GELU there: one hidden-sized tensor saved instead of three,
    for two cheap memory-bound ops of recompute. Computes in the dtype of `h` (autocast's dtype
    under autocast); the backward pass is written with aten ops, which torch.compile traces."""

    @staticmethod
    def forward(ctx, hidden, conv_weight, conv_bias, weight, bias):
        ctx.save_for_backward(hidden, conv_weight, conv_bias, weight)
        activated = F.gelu(_residual_depthwise(hidden, conv_weight, conv_bias))
        return F.linear(activated, weight.to(hidden.dtype), bias.to(hidden.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        hidden, conv_weight, conv_bias, weight = ctx.saved_tensors
        dtype = hidden.dtype
        residual_weight = with_identity_tap(conv_weight)
        pre_activation = depthwise_conv(hidden, residual_weight, conv_bias)
        activated = F.gelu(pre_activation)
        grad_output = grad_output.to(dtype)
        flat_grad_output = grad_output.reshape(-1, grad_output.shape[-1])
        grad_weight = flat_grad_output.mT @ activated.reshape(-1, activated.shape[-1])
        grad_bias = flat_grad_output.sum(dim=0)
        grad_pre_activation = torch.ops.aten.gelu_backward(
            grad_output @ weight.to(dtype), pre_activation
        )
        grad_hidden, grad_conv_weight, grad_conv_bias = depthwise_conv_backward(
            grad_pre_activation, hidden, residual_weight
        )
        return grad_hidden, grad_conv_weight, grad_conv_bias, grad_weight, grad_bias


class Mlp(nn.Module):
    """Pointwise expansion, a depthwise 3×3 residual, GELU, pointwise projection. In training
    the hidden map is stored once (see `_MlpTail`)."""

    def __init__(self, dim: int, expansion: float):
        super().__init__()
        hidden = int(dim * expansion)
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = Conv2dNHWC(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.fc1(x)
        if not torch.is_grad_enabled():
            return self.fc2(
                F.gelu(_residual_depthwise(hidden, self.dwconv.weight, self.dwconv.bias))
            )
        return _MlpTail.apply(
            hidden, self.dwconv.weight, self.dwconv.bias, self.fc2.weight, self.fc2.bias
        )


@register_notrace_module  # pads to its region grid by shape: a leaf for torch.fx
class BiLevelRoutingAttention(nn.Module):
    """BRA: each region's pixels attend to the pixels of its top-k most related regions.

    Region routing uses region means of queries and keys; attention and routing are
    scaled by C^-0.5 (the full channel count, as the released weights expect). A 5×5
    depthwise convolution of the values (LePE) is added before the output projection.
    """

    def __init__(self, dim: int, num_heads: int, n_win: int, topk: int):
        super().__init__()
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = topk
        self.scale = dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.lepe = Fp32Conv2dNHWC(dim, dim, 5, padding=2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        _, height, width, _ = x.shape
        x = pad_to_regions(x, self.n_win)
        record_grid("region_grid", (height, width), x, self.n_win)
        with step("bra/qkv_projection"):
            query, key, value = self.qkv(x).chunk(3, dim=-1)
        output = attend_routed_regions(
            query,
            key,
            value,
            self.n_win,
            self.topk,
            self.num_heads,
            self.scale,
            attention_step="bra/routed_attention",
            routing_step="bra/region_routing",
        )
        with step("bra/lepe"):
            output = output + self.lepe(value)
        with step("bra/output_projection"):
            return self.proj(output[:, :height, :width])


@register_notrace_module  # pads to its region grid by shape: a leaf for torch.fx
class DeformableBiLevelRoutingAttention(nn.Module):
    """DBRA: deformable agents gather routed context, then every pixel attends to the agents.

    1. An offset network on the queries places one sampling point per cell of a coarse
       (stride s) grid; the input map is sampled there: these are the agents.
    2. Agent queries are routed, BRA-style, to the top-k regions of the full-resolution
       keys and attend to their pixels; an agent MLP refines the result.
    3. Every pixel's query attends to all agents, with a relative position bias read from
       `rpe_table` at the pixel-to-agent displacement (as in DAT).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_win: int,
        topk: int,
        offset_groups: int,
        offset_kernel: int,
        offset_stride: int,
        agent_mlp_ratio: float,
        rpe_size: int,
        two_channel_offsets: bool = False,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = topk
        self.offset_groups = offset_groups
        self.scale = dim**-0.5
        group_dim = dim // offset_groups
        self.qkv = nn.Linear(dim, 3 * dim)
        self.lepe = Fp32Conv2dNHWC(dim, dim, 5, stride=offset_stride, padding=2, groups=dim)
        self.offset_net = nn.Sequential(
            Fp32Conv2dNHWC(
                group_dim,
                group_dim,
                offset_kernel,
                stride=offset_stride,
                padding=offset_kernel // 2,
                groups=group_dim,
                bias=False,
            ),
            nn.LayerNorm(group_dim, eps=1e-5),
            nn.GELU(),
            nn.Linear(group_dim, 2 if two_channel_offsets else 1, bias=False),
        )
        self.proj_q = nn.Linear(dim, dim)
        self.proj_k = nn.Linear(dim, dim)
        self.proj_v = nn.Linear(dim, dim)
        self.proj_out = nn.Linear(dim, dim)
        self.unify = nn.Linear(dim, dim)
        self.agent_norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.agent_mlp = Mlp(dim, agent_mlp_ratio)
        self.agent_norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.rpe_table = nn.Parameter(torch.zeros(num_heads, 2 * rpe_size - 1, 2 * rpe_size - 1))

    def forward(self, x: Tensor) -> Tensor:
        _, height, width, _ = x.shape
        x = pad_to_regions(x, self.n_win)
        record_grid("region_grid", (height, width), x, self.n_win)
        with step("dbra/qkv_projection"):
            query, key, value = self.qkv(x).chunk(3, dim=-1)
        with step("dbra/offset_network"):
            positions = self._sampling_positions(query)
        record("agent_positions", positions)
        with step("dbra/agent_sampling"):
            agents = self._sample(x, positions)
        agent_context = self._routed_agent_attention(agents, key, value)
        with step("dbra/agent_mlp"):
            agents = agents + self.unify(agent_context + self.lepe(value))
            agents = agents + self.agent_mlp(self.agent_norm1(agents))
            agents = self.agent_norm2(agents)
        with step("dbra/query_agent_attention"):
            output = self._query_agent_attention(query, agents, positions)
        with step("dbra/output_projection"):
            return self.proj_out(output[:, :height, :width])

    def _groups(self, x: Tensor) -> Tensor:
        """(N, H, W, C) -> (N·G, H, W, C/G): the channels of each offset group as its own map."""
        batch, height, width, channels = x.shape
        grouped = x.reshape(batch, height, width, self.offset_groups, -1).permute(0, 3, 1, 2, 4)
        return grouped.reshape(batch * self.offset_groups, height, width, -1)

    def _sampling_positions(self, query: Tensor) -> Tensor:
        """(N·G, Hk, Wk, 2) sampling points (y, x) in [-1, 1]: grid cell centres plus offsets."""
        offsets = self.offset_net(self._groups(query))
        agent_height, agent_width = offsets.shape[1:3]
        ys = (
            torch.arange(agent_height, device=query.device, dtype=offsets.dtype) + 0.5
        ) / agent_height
        xs = (
            torch.arange(agent_width, device=query.device, dtype=offsets.dtype) + 0.5
        ) / agent_width
        reference = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1) * 2 - 1
        record("reference_points", reference)
        return (reference + offsets).clamp(-1, 1)

    def _sample(self, x: Tensor, positions: Tensor) -> Tensor:
        """Bilinear samples of the input map at the agent positions, per offset group: (N, Hk, Wk, C)."""
        grouped = self._groups(x).permute(0, 3, 1, 2)
        sampled = bilinear_sample(grouped, positions.flip(-1))
        batch_groups, group_channels, agent_height, agent_width = sampled.shape
        sampled = sampled.reshape(-1, self.offset_groups, group_channels, agent_height, agent_width)
        # made contiguous: a linear layer on the strided view would run as a batched product
        # with its weight copied for every image row
        return sampled.permute(0, 3, 4, 1, 2).flatten(3).contiguous()

    def _routed_agent_attention(self, agents: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """Agent queries attend to the full-resolution pixels of their top-k routed regions."""
        agent_height, agent_width = agents.shape[1:3]
        with step("dbra/agent_attention"):
            agent_queries = pad_to_regions(self.proj_q(agents), self.n_win)
        record_grid("agent_grid", (agent_height, agent_width), agent_queries, self.n_win)
        context = attend_routed_regions(
            agent_queries,
            key,
            value,
            self.n_win,
            self.topk,
            self.num_heads,
            self.scale,
            attention_step="dbra/agent_attention",
            routing_step="dbra/region_routing",
        )
        return context[:, :agent_height, :agent_width]

    def _query_agent_attention(self, query: Tensor, agents: Tensor, positions: Tensor) -> Tensor:
        """Every pixel attends to all agents with a DAT-style relative position bias: (N, H, W, C)."""
        batch, height, width, channels = query.shape

        def heads(x: Tensor) -> Tensor:
            return x.reshape(batch, -1, self.num_heads, channels // self.num_heads).transpose(1, 2)

        queries = heads(query)
        agent_keys = heads(self.proj_k(agents))
        agent_values = heads(self.proj_v(agents))
        logits = (queries @ agent_keys.transpose(-1, -2)) * self.scale
        attention = (logits + self._position_bias(positions, height, width)).softmax(dim=-1)
        record("query_agent_attention", attention)
        output = attention @ agent_values
        return output.transpose(1, 2).reshape(batch, height, width, channels)

    def _position_bias(self, positions: Tensor, height: int, width: int) -> Tensor:
        """(N, M, H·W, agents): `rpe_table` sampled at half the pixel-to-agent displacement.
        The halving and grid_sample's (x, y) order are applied to the pixel grid and the agent
        positions, so that the (H·W × agents) displacement is made by one subtraction (halving
        is exact in floating point)."""
        groups = self.offset_groups
        batch = positions.shape[0] // groups
        ys = torch.arange(height, device=positions.device, dtype=positions.dtype) / (height - 1)
        xs = torch.arange(width, device=positions.device, dtype=positions.dtype) / (width - 1)
        half_pixel_grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1) - 0.5
        half_positions = positions.flip(-1).flatten(1, 2) * 0.5
        displacement_xy = half_pixel_grid.reshape(1, -1, 1, 2) - half_positions[:, None]
        table = self.rpe_table.reshape(groups, self.num_heads // groups, *self.rpe_table.shape[1:])
        table = table.expand(batch, -1, -1, -1, -1).flatten(0, 1)
        bias = bilinear_sample(table, displacement_xy)
        return bias.reshape(batch, self.num_heads, height * width, -1)


def _normed(norm: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
    """layer(norm(x)): the body of a pre-norm residual branch."""
    return layer(norm(x))


class Block(nn.Module):
    """Two residual attention + MLP pairs, each led by a depthwise-conv position embedding added
    to its input (`ResidualConv2dNHWC`; NHWC maps).
    With `grad_checkpointing` on, each attention and MLP branch stores only its input and is
    recomputed in the backward pass, one branch at a time."""

    def __init__(
        self, dim: int, mlp_ratio: float, drop_path: float, attn1: nn.Module, attn2: nn.Module
    ):
        super().__init__()
        self.pos_embed1 = ResidualConv2dNHWC(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn1 = attn1
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp1 = Mlp(dim, mlp_ratio)
        self.pos_embed2 = ResidualConv2dNHWC(dim, dim, 3, padding=1, groups=dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.attn2 = attn2
        self.norm4 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp2 = Mlp(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.grad_checkpointing = False

    def _branch(self, norm: nn.Module, layer: nn.Module, x: Tensor) -> Tensor:
        """drop_path(layer(norm(x))), recomputed in the backward pass when checkpointing."""
        if self.grad_checkpointing and x.requires_grad:
            return self.drop_path(checkpoint(_normed, norm, layer, x, use_reentrant=False))
        return self.drop_path(_normed(norm, layer, x))

    def forward(self, x: Tensor) -> Tensor:
        with step("block/pos_embed1"):
            x = self.pos_embed1(x)
        with step("block/attn1"):
            x = x + self._branch(self.norm1, self.attn1, x)
        with step("block/mlp1"):
            x = x + self._branch(self.norm2, self.mlp1, x)
        with step("block/pos_embed2"):
            x = self.pos_embed2(x)
        with step("block/attn2"):
            x = x + self._branch(self.norm3, self.attn2, x)
        with step("block/mlp2"):
            x = x + self._branch(self.norm4, self.mlp2, x)
        return x


@dataclass(frozen=True)
class Architecture:
    """Everything that shapes a DeBiFormer; per-stage tuples have four entries."""

    dims: tuple[int, ...] = (64, 128, 256, 512)
    depths: tuple[int, ...] = (1, 1, 4, 1)
    mlp_ratios: tuple[float, ...] = (3, 3, 3, 3)
    head_dim: int = 32
    n_win: int = 7
    attn1_deformable: tuple[bool, ...] = (False, False, False, True)
    attn1_topks: tuple[int, ...] = (1, 4, 16, 49)
    attn2_topks: tuple[int, ...] = (4, 8, 16, 49)
    offset_groups: tuple[int, ...] = (1, 2, 4, 8)
    offset_kernels: tuple[int, ...] = (9, 7, 5, 3)
    offset_strides: tuple[int, ...] = (8, 4, 2, 1)
    agent_mlp_ratios: tuple[float, ...] = (3, 3, 3, 3)
    rpe_sizes: tuple[int, ...] = (56, 28, 14, 7)
    two_channel_offsets: bool = False
    drop_path_rate: float = 0.0


class DeBiFormer(nn.Module):
    """Convolutional stem, four stages of `Block`s joined by strided-conv downsampling, a
    BatchNorm + global average pool + linear head.

    timm's model contract: `forward_features` is the normed last map (NCHW), `forward_head` pools
    and classifies it, `forward_intermediates` gives the stage maps (strides 4, 8, 16, 32) that
    dense prediction and `features_only=True` use; `stage_maps` returns all four.
    """

    def __init__(
        self,
        arch: Architecture = Architecture(),
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
    ):
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.global_pool = _checked_global_pool(global_pool)
        dims = arch.dims
        self.num_features = self.head_hidden_size = dims[-1]
        self.feature_info = [
            {"num_chs": dims[i], "reduction": 4 * 2**i, "module": f"stages.{i}"} for i in range(4)
        ]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0] // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(dims[0] // 2),
            nn.GELU(),
            nn.Conv2d(dims[0] // 2, dims[0], 3, stride=2, padding=1),
            nn.BatchNorm2d(dims[0]),
        )
        self.downsamples = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dims[i - 1], dims[i], 3, stride=2, padding=1), nn.BatchNorm2d(dims[i])
            )
            for i in range(1, 4)
        )
        drop_rates = torch.linspace(0, arch.drop_path_rate, sum(arch.depths)).tolist()
        self.stages = nn.ModuleList()
        for i in range(4):
            rates, drop_rates = drop_rates[: arch.depths[i]], drop_rates[arch.depths[i] :]
            self.stages.append(nn.Sequential(*(self._block(i, rate) for rate in rates)))
        self.norm = nn.BatchNorm2d(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        for module in self.modules():
            if isinstance(module, DeformableBiLevelRoutingAttention):
                nn.init.zeros_(module.offset_net[-1].weight)
                trunc_normal_(module.rpe_table, std=0.01)

    def _block(self, stage: int, drop_path: float) -> Block:
        arch = self.arch
        dim = arch.dims[stage]
        num_heads = dim // arch.head_dim

        def deformable(topk: int) -> DeformableBiLevelRoutingAttention:
            return DeformableBiLevelRoutingAttention(
                dim,
                num_heads,
                arch.n_win,
                topk,
                arch.offset_groups[stage],
                arch.offset_kernels[stage],
                arch.offset_strides[stage],
                arch.agent_mlp_ratios[stage],
                arch.rpe_sizes[stage],
                arch.two_channel_offsets,
            )

        if arch.attn1_deformable[stage]:
            attn1 = deformable(arch.attn1_topks[stage])
        else:
            attn1 = BiLevelRoutingAttention(dim, num_heads, arch.n_win, arch.attn1_topks[stage])
        return Block(
            dim, arch.mlp_ratios[stage], drop_path, attn1, deformable(arch.attn2_topks[stage])
        )

    def stage_maps(self, x: Tensor, last_stage: int = 3) -> list[Tensor]:
        """The outputs of stages 0..`last_stage` (strides 4, 8, 16, 32): NCHW tensors in
        channels-last memory."""
        check_input(x, self.stem[0].in_channels)
        maps = []
        for i, stage in enumerate(self.stages[: last_stage + 1]):
            with step("model/stem" if i == 0 else f"model/downsample{i + 1}"):
                if i == 0:
                    x = self.stem(x.contiguous(memory_format=torch.channels_last))
                else:
                    x = self.downsamples[i - 1](x)
                x = x.permute(0, 2, 3, 1)
            with step(f"model/stage{i + 1}"):
                x = stage(x).permute(0, 3, 1, 2)
            maps.append(x)
        return maps

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature API: the maps of stages `indices` (None: all four; an int n: the last
        n), and unless `intermediates_only` the normed last map too. `norm` applies the final
        norm to the last stage's map when it is among them."""
        if output_fmt != "NCHW":
            raise UserError(f"output_fmt: DeBiFormer gives NCHW maps, not {output_fmt!r}")
        take, last = feature_take_indices(len(self.stages), indices)
        maps = self.stage_maps(x, last_stage=last if intermediates_only or stop_early else 3)
        intermediates = [maps[i] for i in take]
        if norm and take and take[-1] == 3:
            intermediates[-1] = self.norm(intermediates[-1])
        if intermediates_only:
            return intermediates
        return self.norm(maps[-1]), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drops the stages after the last of `indices` (and the norm and head) for feature
        extraction; returns the kept indices."""
        take, last = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: last + 1]
        self.downsamples = self.downsamples[:last]
        if prune_norm or last < 3:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's map after the final norm, NCHW."""
        last_map = self.stage_maps(x)[-1]
        with step("model/norm"):
            return self.norm(last_map)

    @torch.jit.ignore
    def set_grad_checkpointing(
        self, enable: bool = True, stages: Iterable[int] = (1, 2, 3, 4)
    ) -> None:
        """Recompute the attention and MLP branches of the blocks of `stages` (numbered 1-4) in
        the backward pass instead of storing their activations (timm's API, plus a choice of
        stages). With every stage, training memory falls to about the weights, the branch
        inputs and one branch's activations, for about one extra forward pass of compute;
        stages 1 (the highest resolution) and 3 (the deepest) hold most of the activations of
        the released variants."""
        stages = frozenset(stages)
        if not stages <= {1, 2, 3, 4}:
            raise UserError(f"gradient checkpointing stages must be 1-4, got {sorted(stages)}")
        for number, stage in enumerate(self.stages, start=1):
            for block in stage:
                block.grad_checkpointing = enable and number in stages

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool and classifier on `forward_features`' map (`pre_logits`: the
        pooled features only). With `global_pool=''` nothing is pooled: the map itself, or with
        a head, its logits at every position (N, classes, H, W)."""
        with step("model/head"):
            if self.global_pool == "avg":
                pooled = x.mean(dim=(2, 3))
                return pooled if pre_logits else self.head(pooled)
            if pre_logits or self.num_classes == 0:
                return x
            return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classification head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, freshly initialised head for `num_classes` (0: none, `forward` gives the pooled
        features); `global_pool` "avg" or "" (no pooling, see `forward_head`), None keeps it."""
        if global_pool is not None:
            self.global_pool = _checked_global_pool(global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        """Parameter-name fragments that take no weight decay (timm's convention)."""
        return {"rpe_table"}

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that take no weight decay: the position-bias tables."""
        keywords = self.no_weight_decay_keywords()
        return {name for name, _ in self.named_parameters() if any(k in name for k in keywords)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups in depth order for timm's layer-wise lr decay: the stem, then each
        stage's blocks (each block its own group unless `coarse`), each downsampling layer
        after the stage before it, the final norm last."""
        return {
            "stem": r"^stem",
            "blocks": [
                (r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)", None),
                (r"^downsamples\.(\d+)", (99999,)),
                (r"^norm", (99999,)),
            ],
        }

    @torch.jit.ignore
    def load_pretrained(self, path: str) -> None:
        """timm's `custom_load` hook: the file (or downloaded URL) of a pretrained config, read by
        this project's safe loader (`weights.load_pretrained`) rather than timm's."""
        load_pretrained(self, path)


def _checked_global_pool(global_pool: str) -> str:
    """`global_pool` if this model can pool that way: "avg" or "" (timm's pass-through)."""
    if global_pool not in ("avg", ""):
        raise UserError(
            f"global_pool: expected 'avg' (global average) or '' (the unpooled map), "
            f"got {global_pool!r}"
        )
    return global_pool


@register_notrace_function
def check_input(x: Tensor, in_chans: int) -> None:
    """A one-line error for input that is not a batch of `in_chans`-channel images."""
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise UserError(f"expected images of shape (N, {in_chans}, H, W), got {tuple(x.shape)}")


def _init_weights(module: nn.Module) -> None:
    """Truncated-normal weights and zero biases for linear and convolution layers."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


VARIANTS: dict[str, Architecture] = {
    "debiformer_nano": Architecture(
        dims=(32, 64, 128, 256),
        depths=(1, 1, 2, 1),
        n_win=2,
        attn1_topks=(1, 2, 2, 4),
        attn2_topks=(2, 2, 4, 4),
        offset_groups=(1, 1, 2, 4),
        offset_kernels=(3, 3, 3, 3),
        offset_strides=(2, 1, 1, 1),
        rpe_sizes=(8, 4, 2, 1),
    ),
    "debiformer_tiny": Architecture(),
    "debiformer_small": Architecture(
        depths=(2, 2, 9, 3),
        mlp_ratios=(3, 3, 3, 2),
        agent_mlp_ratios=(3, 3, 3, 1),
        drop_path_rate=0.3,
    ),
    "debiformer_base": Architecture(
        dims=(96, 192, 384, 768),
        depths=(2, 2, 9, 2),
        offset_groups=(1, 2, 3, 6),
        drop_path_rate=0.4,
    ),
}


def list_models() -> list[str]:
    """Names accepted by `create_model`."""
    return list(VARIANTS)


def resolve_architecture(
    name: str, drop_path_rate: float | None = None, overrides: dict | None = None, prefix: str = ""
) -> Architecture:
    """The `Architecture` of variant `name` with `overrides` (field name -> value) applied,
    checked; a `UserError` naming `prefix` + the field for anything a model cannot be built from."""
    if name not in VARIANTS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)}")
    known = {field.name for field in fields(Architecture)}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise UserError(
            f"unknown key '{prefix}{unknown[0]}'; known options: {', '.join(sorted(known))}"
        )
    values = {
        key: tuple(value) if isinstance(value, (list, tuple)) else value
        for key, value in (overrides or {}).items()
    }
    if drop_path_rate is not None:
        values["drop_path_rate"] = drop_path_rate
    arch = replace(VARIANTS[name], **values)
    _check_architecture(arch, prefix)
    return arch


def _check_architecture(arch: Architecture, prefix: str) -> None:
    """Raises for the first field of `arch` that no model could be built from."""

    def fail(key: str, expected: str) -> UserError:
        return UserError(f"{prefix}{key}: expected {expected}, got {getattr(arch, key)!r}")

    for spec in fields(Architecture):
        value = getattr(arch, spec.name)
        if isinstance(spec.default, tuple):
            if not isinstance(value, tuple) or len(value) != 4:
                raise fail(spec.name, "4 values (one per stage)")
            if not all(isinstance(v, (int, float)) and v >= 0 for v in value):
                raise fail(spec.name, "non-negative numbers")
    positive = ("dims", "mlp_ratios", "attn1_topks", "attn2_topks", "offset_groups",
                "offset_kernels", "offset_strides", "agent_mlp_ratios", "rpe_sizes")  # fmt: skip
    for key in positive:
        if not all(v > 0 for v in getattr(arch, key)):
            raise fail(key, "positive values")
    if not isinstance(arch.head_dim, int) or arch.head_dim < 1:
        raise fail("head_dim", "a positive integer")
    if not isinstance(arch.n_win, int) or arch.n_win < 1:
        raise fail("n_win", "a positive integer")
    if any(dim % arch.head_dim for dim in arch.dims):
        raise fail("dims", f"multiples of head_dim ({arch.head_dim})")
    if any(dim % groups for dim, groups in zip(arch.dims, arch.offset_groups, strict=True)):
        raise fail("offset_groups", f"divisors of dims {arch.dims}")
    regions = arch.n_win**2
    for key in ("attn1_topks", "attn2_topks"):
        if any(k > regions for k in getattr(arch, key)):
            raise fail(key, f"at most n_win² = {regions} regions per stage")
    if not 0 <= arch.drop_path_rate < 1:
        raise fail("drop_path_rate", "a rate in [0, 1)")


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: "DeBiFormer") -> dict[str, Tensor]:
    """timm's hook for pretrained files: the release's key names renamed to this project's, and its
    (out, in, 1, 1) pointwise weights reshaped for the Linear layers."""
    if is_official_state_dict(state_dict):
        state_dict = rename_official_state_dict(state_dict)
    expected = model.state_dict()
    return {
        key: as_model_shape(tensor, expected[key]) if key in expected else tensor
        for key, tensor in state_dict.items()
    }


def _cfg() -> dict:
    """timm's pretrained config of a variant: the release's evaluation transform (bicubic resize
    to 256/224 of the crop, centre crop, ImageNet mean and std) and its stem and head names."""
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0",
        "classifier": "head",
        "license": "mit",
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in VARIANTS})


def _build(variant: str, arch: Architecture, pretrained: bool, **kwargs) -> DeBiFormer:
    """The model of `arch` through timm's builder: its pretrained config, timm's pretrained
    loading (`pretrained_cfg_overlay=dict(file=PATH)`) and `features_only`."""
    return build_model_with_cfg(
        DeBiFormer,
        variant,
        pretrained,
        arch=arch,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={"out_indices": (0, 1, 2, 3), "feature_cls": "getter"},
        **kwargs,
    )


def _create(variant: str, pretrained: bool = False, **kwargs) -> DeBiFormer:
    """timm's entry point for `variant`: `kwargs` holds `Architecture` fields, `drop_path_rate`,
    and what `build_model_with_cfg` and the model take (`num_classes`, `in_chans`,
    `features_only`, `out_indices`, `pretrained_cfg_overlay`, ...). A pretrained file or URL
    always goes through `DeBiFormer.load_pretrained` (timm's `custom_load`, which timm resets
    when an overlay names a file), so timm's own loader never reads it."""
    if pretrained:
        overlay = kwargs.get("pretrained_cfg_overlay") or {}
        kwargs["pretrained_cfg_overlay"] = {**overlay, "custom_load": True}
    arch_keys = {spec.name for spec in fields(Architecture)} - {"drop_path_rate"}
    overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in arch_keys}
    arch = resolve_architecture(variant, kwargs.pop("drop_path_rate", None), overrides)
    return _build(variant, arch, pretrained, **kwargs)


def create_model(
    name: str,
    num_classes: int = 1000,
    in_chans: int = 3,
    drop_path_rate: float | None = None,
    pretrained: str | Path | None = None,
    pretrained_ema: bool = False,
    **overrides,
) -> DeBiFormer:
    """Build a DeBiFormer variant; `overrides` replace fields of its `Architecture`.

    `pretrained` is a checkpoint file or URL to start from: this tool's checkpoints (their EMA
    weights with `pretrained_ema`), the authors' released files or `.safetensors` (read without
    running code from them). A head for other classes stays freshly initialised; a stem for
    other input channels is adapted.
    """
    arch = resolve_architecture(name, drop_path_rate, overrides)
    model = _build(name, arch, False, num_classes=num_classes, in_chans=in_chans)
    if pretrained is not None:
        load_pretrained(model, pretrained, use_ema=pretrained_ema)
    return model


@register_model
def debiformer_nano(pretrained: bool = False, **kwargs) -> DeBiFormer:
    """A small DeBiFormer for CPUs and small images (2×2 regions)."""
    return _create("debiformer_nano", pretrained, **kwargs)


@register_model
def debiformer_tiny(pretrained: bool = False, **kwargs) -> DeBiFormer:
    """The release's DeBiFormer-T."""
    return _create("debiformer_tiny", pretrained, **kwargs)


@register_model
def debiformer_small(pretrained: bool = False, **kwargs) -> DeBiFormer:
    """The release's DeBiFormer-S."""
    return _create("debiformer_small", pretrained, **kwargs)


@register_model
def debiformer_base(pretrained: bool = False, **kwargs) -> DeBiFormer:
    """The release's DeBiFormer-B."""
    return _create("debiformer_base", pretrained, **kwargs)


__all__ = ["Architecture", "DeBiFormer", "create_model", "list_models"]
