"""`debiformer export` on the CPU with debiformer_nano at small sizes: ONNX and pt2 files match
PyTorch at batch 1 and 3 and at a size every attention must pad, their graphs hold the inference
path only, safetensors files give the weights back bit for bit, a failed check leaves no file,
and bad input is one line."""

import collections
import json

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import debiformer
from debiformer.errors import UserError
from debiformer.routing import route, routed_attention
from debiformer.tools import export
from debiformer.tools.export import ExportOptions, export_model
from tests.helpers.reference_attention import masked_dense_attention

# 33x47 maps to stage maps of 9x12, 5x6, 3x3 and 2x2: with nano's 2x2 regions every stage but the
# last pads, and so do the agent grids of DBRA
SIZE = "33x47"
INPUT_SIZE = [3, 33, 47]


def relative_differences(run, model, batches=(1, 3)) -> list[float]:
    """The largest |run - model| over the spread of the model's logits, per batch size, on images
    other than those the export checked itself with."""
    generator = torch.Generator().manual_seed(123)
    differences = []
    with torch.no_grad():
        for batch in batches:
            images = torch.randn(batch, *INPUT_SIZE, generator=generator)
            expected = model(images)
            actual = run(images)
            assert actual.shape == expected.shape == (batch, 1000)
            spread = expected.max() - expected.min()
            differences.append(((actual - expected).abs().max() / spread).item())
    return differences


def nano_options(out, **options) -> ExportOptions:
    return ExportOptions(out=out, model="debiformer_nano", resolution=SIZE, **options)


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    """nano at 33x47 with a dynamic batch, as ONNX: (path, result)."""
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("onnx") / "nano.onnx"
    return out, export_model(nano_options(out, dynamic_batch=True))


@pytest.fixture(scope="module")
def pt2_export(tmp_path_factory):
    """nano at 33x47 with a dynamic batch, as a torch.export program: (path, result)."""
    out = tmp_path_factory.mktemp("pt2") / "nano.pt2"
    return out, export_model(nano_options(out, format="pt2", dynamic_batch=True))


def test_onnx_matches_pytorch_at_batch_1_and_3_at_a_padded_size(onnx_export):
    out, result = onnx_export
    assert result["check"]["batches"] == [1, 3]
    assert result["check"]["max_relative_difference"] <= 1e-4
    model, _ = export.build_model(nano_options(out))
    differences = relative_differences(export.onnx_runner(out), model)
    assert max(differences) <= 1e-4, differences


def test_onnx_graph_is_the_inference_graph(onnx_export):
    import onnx

    out, result = onnx_export
    proto = onnx.load(out)
    assert [(opset.domain, opset.version) for opset in proto.opset_import] == [("", 18)]
    assert result["opset"] == 18
    (images,) = proto.graph.input
    dims = [dim.dim_param or dim.dim_value for dim in images.type.tensor_type.shape.dim]
    assert dims == ["batch", *INPUT_SIZE]
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert ops["GridSample"] == 12 and ops["TopK"] > 0  # DBRA's sampling, routing
    # no in-place slot writes (ScatterND) of the training path, nothing stochastic, no branches
    assert not {"ScatterND", "Dropout", "If", "Loop"} & set(ops)
    config = json.loads({prop.key: prop.value for prop in proto.metadata_props}["debiformer"])
    assert config["model"] == "debiformer_nano" and config["input_size"] == INPUT_SIZE


def test_int8_quantises_the_matrix_products_and_keeps_the_config(onnx_export, tmp_path):
    import onnx

    source, _ = onnx_export
    quantized = tmp_path / "nano_int8.onnx"
    quantized.write_bytes(source.read_bytes())
    with open(quantized, "r+b") as file:
        export.quantize_onnx(file)
    proto = onnx.load(quantized)
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert ops["MatMulInteger"] > 0 and ops["DynamicQuantizeLinear"] > 0
    assert ops["Conv"] > 0 and "ConvInteger" not in ops  # convolutions stay fp32
    assert "debiformer" in {prop.key for prop in proto.metadata_props}
    assert quantized.stat().st_size < 0.6 * source.stat().st_size
    model, config = export.build_model(nano_options(quantized))
    check = export.check_int8(quantized, model, config, dynamic_batch=True)
    # random weights: about 0.13 of the spread; what int8 costs a trained model is measured on
    # test images by benchmarks/quantize.py (docs/deployment.md)
    assert 1e-4 < check["max_relative_difference"] < 0.5


def test_pt2_matches_pytorch_and_holds_no_training_only_operators(pt2_export):
    out, result = pt2_export
    assert result["check"]["batches"] == [1, 3]
    assert result["check"]["max_relative_difference"] <= 1e-4
    extra_files = {"debiformer": ""}
    with open(out, "rb") as file:
        program = torch.export.load(file, extra_files=extra_files)
    assert export.training_only_nodes(program) == []
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("autograd" in target or "checkpoint" in target for target in targets)
    assert json.loads(extra_files["debiformer"])["input_size"] == INPUT_SIZE
    model, _ = export.build_model(nano_options(out))
    differences = relative_differences(program.module(), model)
    assert max(differences) <= 1e-4, differences


def test_training_only_nodes_finds_a_grad_mode_switch():
    class NoGradInside(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            with torch.no_grad():
                scale = x.abs().mean()
            return checkpoint(self.linear, x * scale, use_reentrant=False)

    program = torch.export.export(NoGradInside(), (torch.randn(2, 4),))
    assert export.training_only_nodes(program) == ["wrap_with_set_grad_enabled"]


def test_routed_attention_without_autograd_equals_the_oracle():
    """The gathered inference path that export traces (slot-by-slot cases of test_routing)."""
    for batch, side, length, channels, heads, topk in ((2, 7, 64, 64, 2, 1), (1, 3, 8, 32, 2, 2)):
        generator = torch.Generator().manual_seed(0)
        query, key, value = (
            torch.randn(batch, side * side, length, channels, generator=generator).double()
            for _ in range(3)
        )
        index = route(query, key, topk, channels**-0.5)
        with torch.no_grad():
            output = routed_attention(query, key, value, index, heads, channels**-0.5)
        expected = masked_dense_attention(query, key, value, index, heads, channels**-0.5)
        torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-10)


def test_safetensors_round_trip_is_bit_identical_with_a_recipe_and_checkpoint(tmp_path):
    recipe = tmp_path / "nano7.yaml"
    recipe.write_text(
        "model:\n  name: debiformer_nano\n  arch: {attn2_topks: [1, 1, 2, 2]}\n"
        "data:\n  image_size: 40\n  crop_ratio: 0.9\n"
    )
    trained = debiformer.create_model(
        "debiformer_nano", num_classes=7, in_chans=1, attn2_topks=(1, 1, 2, 2)
    )
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.normal_()
    torch.save(trained.state_dict(), tmp_path / "trained.pt")
    out = tmp_path / "exported" / "nano7.safetensors"
    result = export_model(
        ExportOptions(out=out, recipe=str(recipe), checkpoint=str(tmp_path / "trained.pt"))
    )
    assert result["check"] == {"tensors": len(trained.state_dict()), "bit_identical": True}
    config = export.exported_config(out)
    assert config["arch"] == {"attn2_topks": [1, 1, 2, 2]}
    assert (config["num_classes"], config["in_chans"], config["input_size"]) == (7, 1, [1, 40, 40])
    assert (config["crop_pct"], config["interpolation"]) == (0.9, "bilinear")
    reloaded = debiformer.create_model(
        config["model"],
        num_classes=config["num_classes"],
        in_chans=config["in_chans"],
        pretrained=out,
        **config["arch"],
    )
    for model in (reloaded, export.load_exported_weights(out)):
        loaded = model.state_dict()
        assert loaded.keys() == trained.state_dict().keys()
        for key, tensor in trained.state_dict().items():
            assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key


def test_the_command_writes_safetensors_that_name_their_model(tmp_path, run_main):
    out = tmp_path / "nano.safetensors"
    code, stdout, _ = run_main("export", "--model", "debiformer_nano", "--out", str(out))
    assert code == 0
    assert "read back bit-identical" in stdout
    again = tmp_path / "again.safetensors"
    code, _, _ = run_main("export", "--checkpoint", str(out), "--out", str(again))
    assert code == 0
    assert export.exported_config(again)["input_size"] == [3, 224, 224]


@pytest.mark.parametrize("format", ["pt2", "safetensors"])
def test_a_failed_check_exits_non_zero_and_writes_nothing(tmp_path, run_main, monkeypatch, format):
    monkeypatch.setenv(export.PERTURB_ENV, "1")
    fresh = tmp_path / f"fresh.{format}"
    code, stdout, stderr = run_main(
        "export", "--model", "debiformer_nano", "--resolution", "32", "--out", str(fresh)
    )
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("error: the ") and "nothing written" in stderr
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one
    if format == "safetensors":
        older = tmp_path / "older.safetensors"
        older.write_bytes(b"an older export")
        code, _, _ = run_main("export", "--model", "debiformer_nano", "--out", str(older))
        assert code == 2 and older.read_bytes() == b"an older export"
        assert list(tmp_path.iterdir()) == [older]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "tflite"], "error: --format: unknown format 'tflite'; choose one of onnx,"),
        (["--resolution", "224x"], "error: --resolution takes H or HxW in pixels"),
        (["--resolution", "16x64"], "error: --resolution must be at least 32, got 16"),
        (["--checkpoint", "{tmp}/missing.pt"], "error: checkpoint {tmp}/missing.pt does not exist"),
        (["--recipe", "quickstart"], "error: --model and --recipe: give one"),
        (["--ema"], "error: --ema reads the EMA weights of a --checkpoint"),
        (["--quantize", "int4"], "error: --quantize: unknown quantisation 'int4'; choose int8"),
        (
            ["--quantize", "int8", "--out", "{tmp}/nano.pt2"],
            "error: --quantize int8 quantises ONNX",
        ),
        (["--out", "{tmp}/nano.tflite"], "error: --out {tmp}/nano.tflite: name it .onnx, .pt2 or"),
    ],
)
def test_bad_input_is_one_line(tmp_path, run_main, args, message):
    args = [arg.format(tmp=tmp_path) for arg in args]
    out = ["--out", str(tmp_path / "nano.safetensors")] if "--out" not in args else []
    code, stdout, stderr = run_main("export", "--model", "debiformer_nano", *out, *args)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith(message.format(tmp=tmp_path)), stderr
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_that_does_not_name_its_model_needs_one(tmp_path):
    state = tmp_path / "bare.pt"
    torch.save({"head.weight": torch.zeros(2, 2)}, state)
    with pytest.raises(UserError, match="does not record its model .* add --model NAME"):
        export_model(ExportOptions(out=tmp_path / "x.safetensors", checkpoint=str(state)))


def test_resolution_strings():
    assert export.parse_resolution("224") == (224, 224)
    assert export.parse_resolution("33X47") == (33, 47)
    assert export.parse_resolution(64) == (64, 64)
    for bad in ("", "x", "224x224x3", "-32", "32.5"):
        with pytest.raises(UserError, match="--resolution takes H or HxW"):
            export.parse_resolution(bad)


def test_missing_onnx_packages_name_the_extra(monkeypatch):
    real_find_spec = export.importlib.util.find_spec
    monkeypatch.setattr(
        export.importlib.util,
        "find_spec",
        lambda name: None if name == "onnxscript" else real_find_spec(name),
    )
    with pytest.raises(UserError, match=r"needs onnxscript: .*pip install 'debiformer\[export\]'"):
        export.require_onnx_packages("--format onnx")
