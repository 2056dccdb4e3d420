"""Depthwise convolutions on NHWC maps whose training stays fast on maps smaller than the kernel.

At small resolutions (the quick start's 32×32 images) the late stages' maps are 2×2 or 4×4,
smaller than their 3×3 and 5×5 depthwise kernels. oneDNN's weight gradient for such a
convolution (and its bias gradient, which it computes on the same path) is slow on CPUs with
AVX2 only: for [512, 384, 2, 2] with a 3×3 kernel, 65-114 ms against 0.3 ms for the forward pass
and 0.4 ms for the input gradient. There the weight gradient is computed instead as one sum per
kernel tap, `sum over n, h, w of grad[n, h, w, c] · input_padded[n, h + i, w + j, c]`, over only
the pixels where the tap meets the map (2 ms; taps that reach only padding are zero), and the
bias gradient as a sum; elsewhere oneDNN computes both as before.

`with_identity_tap` makes `x + conv(x)` one convolution (the MLP's and the position embeddings'
residual depthwise convolutions), which saves a pass over the map each way.
"""

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor


def smaller_than_kernel(x: Tensor, kernel_size: int) -> bool:
    """Whether the NHWC map `x` is smaller than the kernel in height or width."""
    return x.shape[1] < kernel_size or x.shape[2] < kernel_size


def depthwise_conv(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The depthwise convolution of the NHWC map `x` (stride 1, odd kernel, same-size output),
    in `x`'s dtype."""
    output = F.conv2d(
        x.permute(0, 3, 1, 2),
        weight.to(x.dtype),
        bias.to(x.dtype),
        padding=weight.shape[-1] // 2,
        groups=weight.shape[0],
    )
    return output.permute(0, 2, 3, 1)


def with_identity_tap(weight: Tensor) -> Tensor:
    """The depthwise kernel (C, 1, k, k) of `x + conv(x)`: `weight` with 1 added at its centre
    tap, so that one convolution computes the residual sum, and its input gradient includes
    the residual's. Saves a pass over the map in the forward pass and one in the backward pass;
    the result differs from the sum by rounding only."""
    half = weight.shape[-1] // 2
    return weight + F.pad(weight.new_ones(1, 1, 1, 1), (half, half, half, half))


def depthwise_conv_backward(
    grad_output: Tensor, x: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `depthwise_conv(x, weight, bias)` (stride 1, odd kernel, same-size output)
    for its input, weight and bias; all maps NHWC, computed in `x`'s dtype."""
    channels, _, kernel, _ = weight.shape
    padding = kernel // 2
    small = smaller_than_kernel(x, kernel)
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_output.permute(0, 3, 1, 2),
        x.permute(0, 3, 1, 2),
        weight.to(x.dtype),
        [channels],
        [1, 1],
        [padding, padding],
        [1, 1],
        False,
        [0, 0],
        channels,
        [True, not small, not small],
    )
    if small:
        grad_weight = _tapwise_weight_grad(grad_output, x, kernel)
        grad_bias = grad_output.sum(dim=(0, 1, 2))
    return grad_input.permute(0, 2, 3, 1), grad_weight, grad_bias


def _tapwise_weight_grad(grad_output: Tensor, x: Tensor, kernel: int) -> Tensor:
    """The depthwise weight gradient (C, 1, k, k) as one product-and-sum per kernel tap, over
    the pixels where the tap meets the map; a tap that reads only padding has gradient 0."""
    padding = kernel // 2
    height, width = x.shape[1:3]
    grad_weight = x.new_zeros(x.shape[3], kernel, kernel)
    for i, j in itertools.product(range(kernel), repeat=2):
        rows, columns = _tap_overlap(i - padding, height), _tap_overlap(j - padding, width)
        if rows and columns:
            products = grad_output[:, rows[0], columns[0]] * x[:, rows[1], columns[1]]
            grad_weight[:, i, j] = products.sum(dim=(0, 1, 2))
    return grad_weight.reshape(-1, 1, kernel, kernel)


def _tap_overlap(offset: int, size: int) -> tuple[slice, slice] | None:
    """For a kernel tap `offset` pixels from the kernel's centre, along a map side of `size`
    pixels: the output pixels at which it reads the map, and the input pixels it reads there;
    None where it reads only padding."""
    start, stop = max(0, -offset), min(size, size - offset)
    return (slice(start, stop), slice(start + offset, stop + offset)) if start < stop else None


class DepthwiseConvNHWC(torch.autograd.Function):
    """`depthwise_conv(x, weight, bias)`, differentiated by `depthwise_conv_backward`. Computes
    in `x`'s dtype, or autocast's where autocast is on."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
        ctx.save_for_backward(x, weight)
        return depthwise_conv(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, weight = ctx.saved_tensors
        return depthwise_conv_backward(grad_output.to(x.dtype), x, weight)
