"""`debiformer export` on the CPU with debiformer_nano at small sizes: ONNX and pt2 files match
PyTorch at batch 1 and 3 and at sizes every attention must pad, their graphs hold the inference
path only, safetensors files give the weights back bit for bit, a failed check leaves no file,
and bad input is one line. The exports come from `tests/tools/conftest.py`, one per format."""

import collections
import json
import re
from dataclasses import replace

import pytest
import safetensors.torch
import torch
from torch.utils.checkpoint import checkpoint

import debiformer
from debiformer.checkpoint import save_checkpoint
from debiformer.errors import UserError
from debiformer.routing import route, routed_attention
from debiformer.tools import export
from debiformer.tools.export import ExportOptions, export_model
from debiformer.weights import ModelSpec, exported_config, spec_entry
from tests.helpers.recipes import write_recipe
from tests.helpers.reference_attention import masked_dense_attention
from tests.helpers.tensors import assert_same_tensors


def relative_differences(run, model, input_size, batches=(1, 3)) -> list[float]:
    """The largest |run - model| over the spread of the model's logits, per batch size, on images
    other than those the export checked itself with."""
    generator = torch.Generator().manual_seed(123)
    differences = []
    with torch.no_grad():
        for batch in batches:
            images = torch.randn(batch, *input_size, generator=generator)
            expected = model(images)
            actual = run(images)
            assert actual.shape == expected.shape == (batch, 1000)
            spread = expected.max() - expected.min()
            differences.append(((actual - expected).abs().max() / spread).item())
    return differences


@pytest.mark.slow
def test_onnx_matches_pytorch_at_batch_1_and_3_at_a_padded_size(exported_onnx):
    out, options, result = exported_onnx.path, exported_onnx.options, exported_onnx.result
    assert result["check"]["batches"] == [1, 3]
    assert result["check"]["max_relative_difference"] <= 1e-4
    model, config = export.build_model(options)
    run = export.onnx_runner(out)
    differences = relative_differences(run, model, config["input_size"])
    assert max(differences) <= 1e-4, differences


@pytest.mark.slow
def test_onnx_graph_is_the_inference_graph(exported_onnx):
    import onnx

    out, result = exported_onnx.path, exported_onnx.result
    proto = onnx.load(out)
    assert [(opset.domain, opset.version) for opset in proto.opset_import] == [("", 18)]
    assert result["opset"] == 18
    (images,) = proto.graph.input
    dims = [dim.dim_param or dim.dim_value for dim in images.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 33, 33]
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert ops["GridSample"] == 12 and ops["TopK"] > 0  # DBRA's sampling, routing
    # no in-place slot writes (ScatterND) of the training path, nothing stochastic, no branches
    assert not {"ScatterND", "Dropout", "If", "Loop"} & set(ops)
    config = json.loads({prop.key: prop.value for prop in proto.metadata_props}["debiformer"])
    assert config["model"] == "debiformer_nano" and config["input_size"] == [3, 33, 33]


@pytest.mark.slow
def test_int8_quantises_the_matrix_products_and_keeps_the_config(exported_onnx, tmp_path):
    import onnx

    source = exported_onnx.path
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
    model, config = export.build_model(replace(exported_onnx.options, out=quantized))
    check = export.check_int8(quantized, model, config, dynamic_batch=True)
    # random weights: about 0.1 of the spread; what int8 costs a trained model is measured on
    # test images by benchmarks/quantize.py (docs/deployment.md)
    assert 1e-4 < check["max_relative_difference"] < 0.5


@pytest.mark.slow
def test_pt2_matches_pytorch_and_holds_no_training_only_operators(exported_pt2):
    out, result = exported_pt2.path, exported_pt2.result
    assert result["check"]["batches"] == [1, 3]
    assert result["check"]["max_relative_difference"] <= 1e-4
    extra_files = {"debiformer": ""}
    with open(out, "rb") as file:
        program = torch.export.load(file, extra_files=extra_files)
    assert export.training_only_nodes(program) == []
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("autograd" in target or "checkpoint" in target for target in targets)
    assert json.loads(extra_files["debiformer"])["input_size"] == [3, 33, 47]
    model, config = export.build_model(exported_pt2.options)
    differences = relative_differences(program.module(), model, config["input_size"])
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
    """The gathered inference path that export traces, across a batch and with top-1 and top-2
    routing."""
    for batch, side, length, channels, heads, topk in ((2, 5, 16, 32, 2, 1), (1, 3, 8, 32, 2, 2)):
        assert heads * side * side * length > topk * channels  # else a dense path answers
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
    recipe = write_recipe(
        tmp_path / "nano7.yaml",
        {
            "model": {"name": "debiformer_nano", "arch": {"attn2_topks": [1, 1, 2, 2]}},
            "data": {"image_size": 40, "crop_ratio": 0.9},
        },
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
    config = exported_config(out)
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
    assert exported_config(again)["input_size"] == [3, 224, 224]


def test_a_training_checkpoint_exports_without_a_recipe_and_a_recipe_still_wins(tmp_path, run_main):
    spec = ModelSpec("debiformer_nano", num_classes=3, preprocessing={"input_size": [3, 48, 48]})
    trained = debiformer.create_model("debiformer_nano", num_classes=3)
    checkpoint = tmp_path / "last.pt"
    save_checkpoint({"model": trained.state_dict(), **spec_entry(spec)}, checkpoint)
    out = tmp_path / "nano.safetensors"
    args = ["export", "--checkpoint", str(checkpoint), "--format", "safetensors"]
    code, stdout, stderr = run_main(*args, "--out", str(out))
    assert code == 0, stderr
    config = exported_config(out)
    assert (config["num_classes"], config["input_size"]) == (3, [3, 48, 48])
    assert config["model_spec"]["num_classes"] == 3 and config["weights"].startswith("model ")
    reloaded = export.load_exported_weights(out)
    assert_same_tensors(reloaded.state_dict(), trained.state_dict())
    recipe = write_recipe(
        tmp_path / "nano40.yaml", {"model": {"name": "debiformer_nano"}, "data": {"image_size": 40}}
    )
    by_recipe = tmp_path / "by_recipe.safetensors"
    code, _, stderr = run_main(*args, "--recipe", str(recipe), "--out", str(by_recipe))
    assert code == 0, stderr
    assert exported_config(by_recipe)["input_size"] == [3, 40, 40]


def test_an_export_without_a_recorded_spec_still_loads(exported_safetensors, tmp_path):
    out = exported_safetensors.path
    state = safetensors.torch.load_file(out)
    config = exported_config(out)
    del config["model_spec"]
    older = tmp_path / "older.safetensors"
    safetensors.torch.save_file(state, older, metadata={"debiformer": json.dumps(config)})
    model = export.load_exported_weights(older)
    assert_same_tensors(model.state_dict(), state)


@pytest.mark.parametrize(
    ("format", "options"),
    [
        pytest.param("pt2", ["--resolution", "33x47", "--dynamic-batch"], marks=pytest.mark.slow),
        ("safetensors", ["--resolution", "33x47"]),
    ],
)
def test_a_failed_check_exits_non_zero_and_writes_nothing(
    tmp_path, run_main, monkeypatch, request, format, options
):
    """The writer writes the session's export of the same model, then the model changes: the
    check that follows must fail."""
    shared = request.getfixturevalue(f"exported_{format}")

    def write_then_change_the_model(model, config, dynamic_batch, file):
        assert config == shared.result["config"]  # the model that `shared` holds
        file.write(shared.path.read_bytes())
        with torch.no_grad():
            next(model.parameters()).add_(1.0)

    monkeypatch.setitem(export.WRITERS, format, write_then_change_the_model)
    export_nano = ["export", "--model", "debiformer_nano", *options, "--out"]
    fresh = tmp_path / f"fresh.{format}"
    code, stdout, stderr = run_main(*export_nano, str(fresh))
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("error: the ") and "nothing written" in stderr
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one
    if format == "safetensors":
        older = tmp_path / "older.safetensors"
        older.write_bytes(b"an older export")
        code, _, _ = run_main(*export_nano, str(older))
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
    with pytest.raises(UserError, match="does not record its model .* give a recipe or a model"):
        export_model(ExportOptions(out=tmp_path / "x.safetensors", checkpoint=str(state)))


def test_missing_onnx_packages_name_the_extra(monkeypatch):
    real_find_spec = export.importlib.util.find_spec
    monkeypatch.setattr(
        export.importlib.util,
        "find_spec",
        lambda name: None if name == "onnxscript" else real_find_spec(name),
    )
    with pytest.raises(UserError, match=r"needs onnxscript: .*pip install 'debiformer\[export\]'"):
        export.require_onnx_packages("format", "onnx")


@pytest.mark.parametrize(
    ("resolution", "available", "needed"),
    [("100000", None, r"about [\d.]+e\+\d+ GB"), ("48x64", 10**6, r"about 0\.\d+ GB")],
)
def test_an_input_size_beyond_the_memory_is_refused_before_any_tracing(
    tmp_path, run_main, monkeypatch, resolution, available, needed
):
    """A size whose estimate exceeds the available memory (the machine's, or 1 MB) is one line
    naming the size, the estimate and the memory, found before anything is traced or written."""
    if available is not None:
        monkeypatch.setattr(export, "available_memory", lambda: available)

    def no_tracing(*args):
        raise AssertionError("traced an export that cannot fit in memory")

    monkeypatch.setattr(export, "trace", no_tracing)
    out = tmp_path / "nano.pt2"
    args = ["--model", "debiformer_nano", "--resolution", resolution, "--dynamic-batch"]
    code, _, stderr = run_main("export", *args, "--out", str(out))
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    height, _, width = resolution.partition("x")
    size = f"{height}x{width or height}"
    assert stderr.startswith(f"error: --resolution {size}: exporting at this size needs "), stderr
    estimate = rf"needs {needed} of memory \(at batch 3\), but [\d.]+ GB is available; "
    assert re.search(estimate + r"give a smaller size, e\.g\. --resolution \d+", stderr), stderr
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A training checkpoint of the quick start's recipe (nano, Fashion-MNIST's ten classes,
    stage 4 without blocks) with its run's last evaluation, and the model it holds."""
    from debiformer.recipe import load_recipe, recipe_to_dict

    folder = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    model = debiformer.create_model("debiformer_nano", num_classes=10, depths=(1, 1, 2, 0))
    recipe = recipe_to_dict(load_recipe("quickstart", ["model.arch.depths=[1,1,2,0]"]))
    spec = ModelSpec("debiformer_nano", num_classes=10, arch={"depths": [1, 1, 2, 0]},
                     preprocessing={"input_size": [3, 32, 32], "crop_pct": 1.0,
                                    "interpolation": "bilinear"})  # fmt: skip
    last_eval = {"top1": 89.98, "top5": 99.8, "loss": 0.3543, "images": 10000}
    state = {"epoch": 3, "step": 351, "last_eval": last_eval}
    checkpoint = folder / "last.pt"
    torch.save({"format": "debiformer-train/2", "recipe": recipe, "model": model.state_dict(),
                "train_state": [state], **spec_entry(spec)}, checkpoint)  # fmt: skip
    return checkpoint, model.eval()


def test_an_hf_folder_loads_in_timm_and_here_with_names_and_a_model_card(
    trained_checkpoint, tmp_path, run_main
):
    import timm

    from debiformer.tools.classifier import load_classifier

    checkpoint, model = trained_checkpoint
    folder = tmp_path / "nano-fashion"
    code, stdout, stderr = run_main("export", "--checkpoint", str(checkpoint), "--out", str(folder))
    assert code == 0, stderr
    assert "timm loads it and gives the same logits" in stdout
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json",
                                                         "model.safetensors"]  # fmt: skip
    images = torch.randn(2, 3, 32, 32)
    from_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    from_here = debiformer.create_model(
        "debiformer_nano", num_classes=10, depths=(1, 1, 2, 0), pretrained=folder
    ).eval()
    with torch.no_grad():
        assert torch.equal(from_timm(images), model(images))
        assert torch.equal(from_here(images), model(images))
    names = from_timm.pretrained_cfg["label_names"]
    assert names[:2] == ["T-shirt/top", "Trouser"] and len(names) == 10
    assert list(from_timm.pretrained_cfg["input_size"]) == [3, 32, 32]
    assert load_classifier(checkpoint=folder).class_names == names
    card = (folder / "README.md").read_text()
    assert "Recipe `quickstart`" in card and "| top1 | 89.98 |" in card
    assert "after 351 steps" in card and "baolong2024debiformer" in card
    assert "license: mit" in card and '`{"depths": [1, 1, 2, 0]}`' in card


def test_an_hf_export_replaces_an_earlier_one_and_refuses_other_folders(
    trained_checkpoint, tmp_path
):
    checkpoint, _ = trained_checkpoint
    folder = tmp_path / "export"
    options = ExportOptions(out=folder, checkpoint=str(checkpoint), format="hf")
    export_model(options)
    (folder / "README.md").write_text("edited")
    export_model(options)
    assert (folder / "README.md").read_text() != "edited"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging folder left
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files than an export's"):
        ExportOptions(out=folder, checkpoint=str(checkpoint), format="hf")
    with pytest.raises(UserError, match="is a file; an hf export is a folder"):
        ExportOptions(out=folder / "notes.txt", checkpoint=str(checkpoint), format="hf")
    with pytest.raises(UserError, match="hold weights only"):
        ExportOptions(out=tmp_path / "x", model="debiformer_nano", dynamic_batch=True)
