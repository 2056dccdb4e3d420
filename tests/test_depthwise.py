"""Depthwise convolutions on maps smaller than their kernel: the tap-by-tap weight gradient
gives the convolution's own gradients, and is used exactly where it applies; a residual one
(`x + conv(x)` as one convolution) gives the sum's outputs and gradients."""

import pytest
import torch

from debiformer.model import Conv2dNHWC, ResidualConv2dNHWC


def _conv(channels: int, kernel: int, stride: int = 1, kind: type = Conv2dNHWC) -> Conv2dNHWC:
    torch.manual_seed(0)
    return kind(
        channels, channels, kernel, stride=stride, padding=kernel // 2, groups=channels
    ).double()


def _assert_same_gradients(output: torch.Tensor, plain: torch.Tensor, inputs: list) -> None:
    """`output` and `plain` have the same gradients for `inputs` under one random upstream."""
    upstream = torch.randn_like(output)
    for ours, reference in zip(
        torch.autograd.grad(output, inputs, upstream),
        torch.autograd.grad(plain, inputs, upstream),
        strict=True,
    ):
        torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize(
    ("size", "kernel"),
    [((1, 1), 5), ((1, 6), 3), ((2, 2), 3), ((2, 3), 5), ((4, 4), 5), ((8, 6), 3)],
)
def test_gradients_equal_the_plain_convolutions(size, kernel):
    conv = _conv(6, kernel)
    x = torch.randn(3, *size, 6, dtype=torch.double, requires_grad=True)
    output = conv(x)
    plain = torch.nn.Conv2d.forward(conv, x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(output, plain)
    small = min(size) < kernel
    assert ("DepthwiseConvNHWC" in type(output.grad_fn).__name__) == small
    _assert_same_gradients(output, plain, [x, conv.weight, conv.bias])


def test_only_same_size_depthwise_convolutions_in_training_take_the_tapwise_path():
    x = torch.randn(2, 2, 2, 4, dtype=torch.double)
    strided = _conv(4, 3, stride=2)
    assert "DepthwiseConvNHWC" not in type(strided(x).grad_fn).__name__
    with torch.no_grad():
        assert _conv(4, 3)(x).grad_fn is None  # inference: the plain convolution


def test_bf16_autocast_computes_as_the_plain_convolution_does():
    conv = _conv(8, 3).float()
    x = torch.randn(2, 2, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = conv(x)
        plain = torch.nn.Conv2d.forward(conv, x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert output.dtype == plain.dtype == torch.bfloat16
    assert torch.equal(output, plain)
    output.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32


@pytest.mark.parametrize(("size", "kernel"), [((2, 2), 3), ((8, 6), 3), ((9, 7), 5)])
def test_a_residual_convolution_is_its_input_plus_the_convolution(size, kernel):
    """One convolution whose kernel has 1 added at its centre: the same output and gradients as
    the sum, on maps smaller and larger than the kernel."""
    conv = _conv(6, kernel, kind=ResidualConv2dNHWC)
    weight = conv.weight.detach().clone()
    x = torch.randn(3, *size, 6, dtype=torch.double, requires_grad=True)
    output = conv(x)
    plain = x + torch.nn.Conv2d.forward(conv, x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(output, plain)
    _assert_same_gradients(output, plain, [x, conv.weight, conv.bias])
    assert torch.equal(conv.weight, weight)  # the parameter itself is untouched
