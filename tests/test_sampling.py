"""DBRA's bilinear sampling: ATen's kernel as an opaque operator under torch.compile on a CPU,
F.grid_sample everywhere else, with the same values and gradients."""

import torch
import torch.nn.functional as F

from debiformer.sampling import _aten_bilinear_sample, bilinear_sample


def _table_and_grid(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, 2, 9, 9) table expanded to 3 images, as the position bias expands `rpe_table`, and
    points reaching past the border, where grid sampling reads zeros."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(1, 2, 9, 9, dtype=dtype, generator=generator).expand(3, -1, -1, -1)
    grid = torch.rand(3, 5, 4, 2, dtype=dtype, generator=generator) * 2.4 - 1.2
    return table, grid


def test_the_aten_operator_equals_grid_sample_with_its_gradients():
    table, grid = _table_and_grid()
    table.requires_grad_()
    grid.requires_grad_()
    expected = F.grid_sample(table, grid, mode="bilinear", align_corners=True)
    sampled = _aten_bilinear_sample(table, grid)
    torch.testing.assert_close(sampled, expected, rtol=0, atol=0)
    weights = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), (table, grid))
    grads = torch.autograd.grad((sampled * weights).sum(), (table, grid))
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
    assert torch.autograd.gradcheck(_aten_bilinear_sample, (table.contiguous(), grid))


def test_the_operators_registration_passes_torchs_checks():
    """Its fake (shape) function, autograd and schema, as torch.compile relies on them."""
    table, grid = _table_and_grid(torch.float32)
    torch.library.opcheck(_aten_bilinear_sample, (table.contiguous().requires_grad_(), grid))


def test_under_bf16_autocast_it_samples_in_fp32_like_grid_sample_also_compiled():
    """Compiled, autocast is applied when the graph is traced: without the operator's own fp32
    rule it would meet the fp32 table and the bf16 grid together and fail."""
    table, grid = _table_and_grid(torch.float32)

    def sample(table: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return bilinear_sample(table, grid.bfloat16())

    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.grid_sample(table, grid.bfloat16(), mode="bilinear", align_corners=True)
        sampled = _aten_bilinear_sample(table, grid.bfloat16())
    torch._dynamo.reset()
    compiled = torch.compile(sample, backend="aot_eager", fullgraph=True)(table, grid)
    for result in (sampled, compiled):
        assert result.dtype == expected.dtype == torch.float32
        torch.testing.assert_close(result, expected, rtol=0, atol=0)


def _graph_targets(function, *args) -> set:
    """The operators in the graphs that torch.compile captures from `function(*args)`."""
    targets = set()

    def recording_backend(graph_module: torch.fx.GraphModule, example_inputs):
        targets.update(node.target for node in graph_module.graph.nodes)
        return graph_module.forward

    torch._dynamo.reset()
    torch.compile(function, backend=recording_backend, fullgraph=True)(*args)
    return targets


def test_compiled_on_a_cpu_it_is_atens_kernel_and_eager_it_is_grid_sample():
    table, grid = _table_and_grid(torch.float32)
    assert torch.ops.debiformer.bilinear_sample.default in _graph_targets(
        bilinear_sample, table, grid
    )
    torch.testing.assert_close(
        bilinear_sample(table, grid),
        F.grid_sample(table, grid, mode="bilinear", align_corners=True),
        rtol=0,
        atol=0,
    )


def test_torch_export_sees_grid_sample():
    """`debiformer export` writes programs and ONNX files that need no debiformer to load."""

    class Sampler(torch.nn.Module):
        def forward(self, table: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
            return bilinear_sample(table, grid)

    program = torch.export.export(Sampler(), _table_and_grid(torch.float32))
    targets = {str(node.target) for node in program.graph.nodes}
    assert "aten.grid_sampler.default" in targets
    assert not any("debiformer" in target for target in targets)
