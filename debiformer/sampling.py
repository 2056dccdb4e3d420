"""Bilinear sampling of a map at continuous points, as DBRA's agents and position bias need it.

`bilinear_sample(input, grid)` is `F.grid_sample(input, grid, mode="bilinear",
align_corners=True)` (zeros outside the map). In eager mode it is exactly that call. Under
`torch.compile` on a CPU it runs as ATen's own kernel, an opaque operator of the graph
(`debiformer::bilinear_sample`): inductor would otherwise replace it by its decomposition into
per-point gathers, which is several times slower than ATen's vectorised kernel on a CPU, and
its partitioner would recompute the (pixels × agents) position bias in the backward pass
instead of keeping it. `torch.export` (the `export` command) sees `F.grid_sample`, which ONNX
knows.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

_BILINEAR, _ZEROS, _ALIGN_CORNERS = 0, 0, True


@torch.library.custom_op("debiformer::bilinear_sample", mutates_args=())
def _aten_bilinear_sample(input: Tensor, grid: Tensor) -> Tensor:
    """ATen's `grid_sampler_2d`, bilinear, zeros outside, corners aligned: (N, C, Hg, Wg)."""
    return torch.grid_sampler_2d(input, grid, _BILINEAR, _ZEROS, _ALIGN_CORNERS)


@_aten_bilinear_sample.register_fake
def _(input: Tensor, grid: Tensor) -> Tensor:
    """The output's shape and dtype, for tracing: contiguous, as ATen's kernel makes it."""
    return input.new_empty(input.shape[0], input.shape[1], grid.shape[1], grid.shape[2])


def _save_inputs(ctx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
    """Keeps the map and the grid for the backward pass."""
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """ATen's gradients for the map (where it needs one) and the grid."""
    input, grid = ctx.saved_tensors
    return torch.ops.aten.grid_sampler_2d_backward(
        grad_output,
        input,
        grid,
        _BILINEAR,
        _ZEROS,
        _ALIGN_CORNERS,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1]],
    )


_aten_bilinear_sample.register_autograd(_backward, setup_context=_save_inputs)
# CPU autocast runs grid sampling in fp32, as it does for `F.grid_sample`
torch.library.register_autocast("debiformer::bilinear_sample", "cpu", torch.float32)


def bilinear_sample(input: Tensor, grid: Tensor) -> Tensor:
    """Samples of the NCHW `input` at `grid` (N, Hg, Wg, 2), (x, y) in [-1, 1] with the corner
    pixels' centres at ±1, zeros outside: (N, C, Hg, Wg)."""
    if (
        input.device.type == "cpu"
        and torch.compiler.is_compiling()
        and not torch.compiler.is_exporting()
    ):
        return _aten_bilinear_sample(input, grid)
    return F.grid_sample(input, grid, mode="bilinear", align_corners=_ALIGN_CORNERS)
