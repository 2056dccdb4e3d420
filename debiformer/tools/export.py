"""`debiformer export`: a DeBiFormer classifier written for deployment, and checked against
PyTorch before it replaces anything.

    onnx         torch.export's graph translated to ONNX opset 18 (`ONNX_OPSET`); checked by
                 running it in onnxruntime on the CPU
    pt2          the torch.export program itself (`torch.export.save`); checked by reloading it
                 with `torch.export.load` and running it
    safetensors  the weights, with the architecture and preprocessing in the file's metadata;
                 checked by reading every tensor back, which must equal the model's bit for bit.
                 `load_exported_weights(FILE)` (that is, `create_model(NAME, ...,
                 pretrained=FILE)` with the recorded arguments) builds the model again

With `quantize="int8"` (ONNX only) the checked fp32 file is then quantised with onnxruntime's
dynamic int8 quantisation of its matrix products (`MatMul`, `Gemm`: int8 weights, activations
quantised per batch at run time; convolutions stay fp32: quantised, they ran 2.2-5.3x slower on
an AVX2 CPU). Its logits must be finite; their difference from PyTorch is reported, not limited:
int8 accuracy depends on the data (`benchmarks/quantize.py` measures it on Fashion-MNIST).

ONNX and pt2 files are checked on seeded random images at batch 1 (and 3 with `dynamic_batch`):
the largest |exported - PyTorch| over the spread of PyTorch's logits (max - min) must not exceed
`TOLERANCE`. Every format records the same JSON (`export_config`: variant, classes, input
channels, architecture overrides, and timm's preprocessing fields) under the key "debiformer":
in the ONNX model's metadata_props, as the pt2 archive's extra file "debiformer", in the
safetensors header's metadata.

The graph is traced in eval mode without autograd, so it holds the inference paths only: the
MLP's and the routed attention's plain paths instead of their custom autograd functions, no
recomputation, and routing's gathered inference path (`debiformer.routing`); an exported graph
with a higher-order operator left in it is refused (`training_only_nodes`). Spatial size is fixed
per file: the padding to the region grid and the choice of attention path depend on the map size.

The file is written beside `out` under a temporary name, checked there, and only then renamed
onto `out` (`runtime.atomic_writer`): a failed check leaves no file, and an older `out` stays.

For tests: with the environment variable DEBIFORMER_EXPORT_PERTURB=1 the first weight of the
PyTorch model is changed after the file is written, so the check must fail.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from timm.data import resolve_data_config
from torch import Tensor, nn
from torch.export import ExportedProgram

import debiformer
from debiformer.checkpoint import is_training_checkpoint, load_checkpoint
from debiformer.errors import UserError
from debiformer.model import VARIANTS, Architecture
from debiformer.recipe import Recipe, load_recipe, recipe_from_dict
from debiformer.routing import implementation
from debiformer.runtime import atomic_writer, check_writable
from debiformer.tools.common import MIN_RESOLUTION, check_at_least
from debiformer.weights import local_file, match_model, read_state_dict

FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "safetensors": ".safetensors"}
ONNX_OPSET = 18
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
TOLERANCE = 1e-4
CONFIG_KEY = "debiformer"
CONFIG_FORMAT = "debiformer-export/1"
PERTURB_ENV = "DEBIFORMER_EXPORT_PERTURB"
QUANTIZATIONS = ("int8",)
QUANTIZED_OPS = ["MatMul", "Gemm"]
QUANTIZATION_NOTE = "dynamic int8 of MatMul and Gemm weights (onnxruntime)"
DEFAULT_RESOLUTION = 224
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# This tool's loaders resize with bilinear interpolation (torchvision) or area averaging (FFCV),
# then normalise with ImageNet's mean and std.
RECIPE_INTERPOLATION = "bilinear"


def require_onnx_packages(option: str) -> None:
    """A one-line `UserError` naming the extra to install when onnx, onnxruntime or onnxscript
    is missing."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"{option} needs {', '.join(missing)}: install the extra with "
            "pip install 'debiformer[export]'"
        )


def parse_resolution(value: str | int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from "224", "33x47", 224 or (33, 47); each side at least 32 pixels."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) > 2 or not all(part.strip().isdigit() for part in parts):
            raise UserError(
                f"--resolution takes H or HxW in pixels, e.g. 224 or 33x47; got {value!r}"
            )
        value = tuple(int(part) for part in parts)
    sides = (value, value) if isinstance(value, int) else tuple(value)
    if len(sides) == 1:
        sides = sides * 2
    for side in sides:
        check_at_least("--resolution", side, MIN_RESOLUTION)
    return sides


def format_of(path: str | Path) -> str:
    """The format whose suffix `path` has; a `UserError` for any other name."""
    for name, suffix in FORMATS.items():
        if Path(path).suffix == suffix:
            return name
    raise UserError(f"--out {path}: name it .onnx, .pt2 or .safetensors (or give --format)")


@dataclass(frozen=True)
class ExportOptions:
    """What `debiformer export` writes. Checked when made: a bad value is a one-line `UserError`
    before any work.

    The model: `model` (a variant name) or `recipe` (its `model` section and preprocessing), or
    else what `checkpoint` records (a training checkpoint's recipe, an exported .safetensors
    file's config). The weights: `checkpoint`, loaded exactly as `debiformer eval` does (classes
    and input channels are read from it; `ema`: its EMA weights), or `pretrained`, as
    `create_model(pretrained=...)` starts from it (a head for other classes starts at zero), or
    neither (random weights, seed 0). `format`: None takes it from `out`'s suffix. `resolution`:
    H or (H, W), default the recipe's image size, else 224. `dynamic_batch`: ONNX and pt2 files
    take any batch (else batch 1). `quantize`: "int8" for onnxruntime's dynamic int8 quantisation
    of an ONNX file's matrix products."""

    out: Path
    format: str | None = None
    model: str | None = None
    recipe: str | None = None
    checkpoint: str | None = None
    pretrained: str | None = None
    ema: bool = False
    resolution: str | int | tuple[int, int] | None = None
    dynamic_batch: bool = False
    quantize: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.format is None:
            object.__setattr__(self, "format", format_of(self.out))
        if self.format not in FORMATS:
            raise UserError(
                f"--format: unknown format {self.format!r}; choose one of {', '.join(FORMATS)}"
            )
        if self.model is not None and self.recipe is not None:
            raise UserError("--model and --recipe: give one (the recipe names its model)")
        if self.model is not None and self.model not in debiformer.list_models():
            raise UserError(
                f"--model: unknown model {self.model!r}; "
                f"choose from {', '.join(debiformer.list_models())}"
            )
        if self.checkpoint is not None and self.pretrained is not None:
            raise UserError("--checkpoint and --pretrained: give one")
        if self.ema and self.checkpoint is None:
            raise UserError("--ema reads the EMA weights of a --checkpoint; give one")
        if self.model is None and self.recipe is None and self.checkpoint is None:
            raise UserError("name the model: --model NAME, --recipe RECIPE or a --checkpoint")
        if self.resolution is not None:
            object.__setattr__(self, "resolution", parse_resolution(self.resolution))
        if self.dynamic_batch and self.format == "safetensors":
            raise UserError("--dynamic-batch: safetensors files hold weights only, not a graph")
        suffix = FORMATS[self.format]
        if self.out.suffix != suffix:
            raise UserError(f"--out {self.out}: a {self.format} file's name ends in {suffix}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise UserError(f"--quantize: unknown quantisation {self.quantize!r}; choose int8")
        if self.quantize is not None and self.format != "onnx":
            raise UserError("--quantize int8 quantises ONNX files only: use --format onnx")
        if self.format == "onnx":
            require_onnx_packages("--format onnx")
        check_writable(self.out, "--out")


@dataclass(frozen=True)
class ModelSpec:
    """The network to build: a variant, its `Architecture` overrides, and the preprocessing its
    weights were trained with where that is known (timm's field names: `input_size`, `crop_pct`,
    `interpolation`)."""

    name: str
    arch: dict
    preprocessing: dict


def recipe_spec(recipe: Recipe) -> ModelSpec:
    """The model and evaluation preprocessing of a classification recipe."""
    if recipe.task != "classification":
        raise UserError(
            f"recipe {recipe.name} trains a {recipe.task} model; export writes classifiers only"
        )
    size = recipe.data.val_image_size or recipe.data.image_size
    preprocessing = {
        "input_size": (3, size, size),
        "crop_pct": recipe.data.crop_ratio,
        "interpolation": RECIPE_INTERPOLATION,
    }
    return ModelSpec(recipe.model.name, dict(recipe.model.arch), preprocessing)


def exported_config(path: str | Path) -> dict | None:
    """The config an export recorded in a .safetensors file (see `export_config`); None for a
    file without one."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for a damaged file
        detail = " ".join(str(error).split())[:200]
        raise UserError(f"checkpoint {path} is not a readable safetensors file: {detail}") from None
    return json.loads(metadata[CONFIG_KEY]) if CONFIG_KEY in metadata else None


def recorded_spec(checkpoint: str) -> ModelSpec:
    """What a checkpoint records about its model: a training checkpoint's recipe, or the config
    an export wrote into a .safetensors file."""
    path = local_file(checkpoint)
    if path.suffix == ".safetensors":
        config = exported_config(path)
        if config is not None:
            keys = ("input_size", "crop_pct", "interpolation")
            return ModelSpec(config["model"], config["arch"], {key: config[key] for key in keys})
    else:
        state = load_checkpoint(path)
        if is_training_checkpoint(state) and isinstance(state.get("recipe"), dict):
            return recipe_spec(recipe_from_dict(state["recipe"]))
    raise UserError(
        f"--checkpoint {checkpoint} does not record its model (only this tool's training "
        "checkpoints and exported .safetensors files do): add --model NAME or --recipe RECIPE"
    )


def model_spec(options: ExportOptions) -> ModelSpec:
    """The network `options` name: `model`, `recipe`, or what the checkpoint records."""
    if options.model is not None:
        return ModelSpec(options.model, {}, {})
    if options.recipe is not None:
        return recipe_spec(load_recipe(options.recipe))
    return recorded_spec(options.checkpoint)


def architecture_overrides(model: nn.Module, name: str) -> dict[str, Any]:
    """The `Architecture` fields in which `model` differs from variant `name`, as JSON values
    that `create_model(name, **overrides)` takes back (drop path, which inference skips, left out).
    """
    overrides = {}
    for spec in fields(Architecture):
        value = getattr(model.arch, spec.name)
        if spec.name != "drop_path_rate" and value != getattr(VARIANTS[name], spec.name):
            overrides[spec.name] = list(value) if isinstance(value, tuple) else value
    return overrides


def export_config(
    model: nn.Module, spec: ModelSpec, resolution: tuple[int, int], weights: str
) -> dict[str, Any]:
    """What a deployment needs to know beside the graph or weights: how to build the model again
    (`model`, `num_classes`, `in_chans`, `arch`) and how to prepare its input (timm's
    pretrained_cfg fields `input_size`, `mean`, `std`, `interpolation`, `crop_pct`)."""
    data = resolve_data_config({}, model=model)
    in_chans = model.stem[0].in_channels
    return {
        "format": CONFIG_FORMAT,
        "model": spec.name,
        "num_classes": model.num_classes,
        "in_chans": in_chans,
        "arch": architecture_overrides(model, spec.name),
        "input_size": [in_chans, *resolution],
        "mean": [float(value) for value in data["mean"]],
        "std": [float(value) for value in data["std"]],
        "interpolation": spec.preprocessing.get("interpolation", data["interpolation"]),
        "crop_pct": spec.preprocessing.get("crop_pct", data["crop_pct"]),
        "weights": weights,
    }


def build_model(options: ExportOptions) -> tuple[nn.Module, dict[str, Any]]:
    """The model `options` describe, its weights loaded and in eval mode, and its export config."""
    spec = model_spec(options)
    torch.manual_seed(0)
    if options.checkpoint is not None:
        state, kind = read_state_dict(options.checkpoint, use_ema=options.ema)
        num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
        in_chans = state["stem.0.weight"].shape[1] if "stem.0.weight" in state else 3
        model = debiformer.create_model(
            spec.name, num_classes=num_classes, in_chans=in_chans, **spec.arch
        )
        model.load_state_dict(match_model(model, state, options.checkpoint))
        weights = f"{kind} weights of {options.checkpoint}"
    elif options.pretrained is not None:
        model = debiformer.create_model(spec.name, pretrained=options.pretrained, **spec.arch)
        weights = f"started from {options.pretrained}"
    else:
        model = debiformer.create_model(spec.name, **spec.arch)
        weights = "random (seed 0)"
    default_size = spec.preprocessing.get("input_size", (3, DEFAULT_RESOLUTION, DEFAULT_RESOLUTION))
    resolution = options.resolution or tuple(default_size[1:])
    return model.eval(), export_config(model, spec, resolution, weights)


def load_exported_weights(path: str | Path) -> nn.Module:
    """The model of a .safetensors file that `export_model` wrote: `create_model` with the
    recorded name, classes, input channels and overrides, `pretrained=path`."""
    config = exported_config(path)
    if config is None:
        raise UserError(f"{path} holds no '{CONFIG_KEY}' metadata: it was not written by export")
    return debiformer.create_model(
        config["model"],
        num_classes=config["num_classes"],
        in_chans=config["in_chans"],
        pretrained=path,
        **config["arch"],
    )


# ----------------------------------------------------------------------------- graphs


def check_images(config: dict, batches: tuple[int, ...]) -> list[Tensor]:
    """Seeded random images of the exported size, one tensor per batch size."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, *config["input_size"], generator=generator) for batch in batches]


def check_batches(dynamic_batch: bool) -> tuple[int, ...]:
    """The batch sizes a file is checked at: 1, and 3 (not the traced 2) for a dynamic batch."""
    return (1, 3) if dynamic_batch else (1,)


def training_only_nodes(program: ExportedProgram) -> list[str]:
    """The higher-order operators left in an exported graph, which an inference graph has no use
    for: torch.export records grad-mode switches (a `torch.no_grad` region inside `forward`, when
    traced with autograd on) and, in strict tracing, custom autograd functions and checkpointed
    regions as such operators. Empty for a clean inference graph."""
    return [
        str(node.target)
        for node in program.graph.nodes
        if isinstance(node.target, torch._ops.HigherOrderOperator)
    ]


def trace(model: nn.Module, config: dict, dynamic_batch: bool) -> ExportedProgram:
    """`torch.export` of the model's inference path (eval mode, no autograd, the fast routed
    attention) at the config's input size; the batch is dynamic with `dynamic_batch`."""
    (example,) = check_images(config, (2 if dynamic_batch else 1,))
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with torch.no_grad(), implementation("fast"):
        program = torch.export.export(model.eval(), (example,), dynamic_shapes=shapes)
    leftovers = training_only_nodes(program)
    if leftovers:
        raise RuntimeError(f"the exported graph holds training-only operators: {leftovers}")
    return program


def write_onnx(model: nn.Module, config: dict, dynamic_batch: bool, file: IO[bytes]) -> None:
    """The traced model as ONNX (opset `ONNX_OPSET`, input "images", output "logits"), the config
    in its metadata_props."""
    import onnx

    program = trace(model, config, dynamic_batch)
    onnx_program = torch.onnx.export(
        program,
        dynamo=True,
        opset_version=ONNX_OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: "batch"},) if dynamic_batch else None,  # names the batch axis
        verbose=False,
    )
    proto = onnx_program.model_proto
    onnx.helper.set_model_props(proto, {CONFIG_KEY: json.dumps(config)})
    onnx.save_model(proto, file)


def write_pt2(model: nn.Module, config: dict, dynamic_batch: bool, file: IO[bytes]) -> None:
    """The torch.export program, the config as its extra file "debiformer"."""
    program = trace(model, config, dynamic_batch)
    torch.export.save(program, file, extra_files={CONFIG_KEY: json.dumps(config)})


def write_safetensors(model: nn.Module, config: dict, dynamic_batch: bool, file: IO[bytes]) -> None:
    """The state dict, the config in the header's metadata."""
    state = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    file.write(safetensors.torch.save(state, metadata={CONFIG_KEY: json.dumps(config)}))


WRITERS: dict[str, Callable[[nn.Module, dict, bool, IO[bytes]], None]] = {
    "onnx": write_onnx,
    "pt2": write_pt2,
    "safetensors": write_safetensors,
}


# ----------------------------------------------------------------------------- checks


def relative_difference(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / (max(expected) - min(expected)): the largest error as a share of
    the spread of the reference logits."""
    spread = (expected.max() - expected.min()).item()
    return (actual - expected).abs().max().item() / max(spread, torch.finfo(torch.float32).tiny)


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session of the file; `threads` intra-op threads (None: its default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: no notes on how it placed the nodes
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_runner(path: Path) -> Callable[[Tensor], Tensor]:
    """The ONNX file as a function of an image batch, run by onnxruntime on the CPU."""
    session = onnx_session(path)

    def run(images: Tensor) -> Tensor:
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        return torch.from_numpy(np.asarray(logits))

    return run


def pt2_runner(path: Path) -> Callable[[Tensor], Tensor]:
    """The .pt2 file, reloaded with `torch.export.load`, as a function of an image batch."""
    with open(path, "rb") as file:  # a file object: load() wants a path ending in .pt2
        return torch.export.load(file).module()


def check_outputs(
    runner: Callable[[Path], Callable[[Tensor], Tensor]],
    path: Path,
    model: nn.Module,
    config: dict,
    dynamic_batch: bool,
) -> dict[str, Any]:
    """Runs the written file and the model on the check images; a `UserError` when the largest
    relative difference exceeds `TOLERANCE`."""
    run = runner(path)
    batches = check_batches(dynamic_batch)
    with torch.no_grad():
        difference = max(
            relative_difference(run(images), model(images))
            for images in check_images(config, batches)
        )
    if not difference <= TOLERANCE:
        raise UserError(
            f"the exported file's logits differ from PyTorch's by {difference:.2e} of their "
            f"spread (limit {TOLERANCE:.0e}); nothing written"
        )
    return {"max_relative_difference": difference, "batches": list(batches)}


def check_onnx(path: Path, model: nn.Module, config: dict, dynamic_batch: bool) -> dict:
    """onnxruntime's outputs against PyTorch's."""
    return check_outputs(onnx_runner, path, model, config, dynamic_batch)


def check_pt2(path: Path, model: nn.Module, config: dict, dynamic_batch: bool) -> dict:
    """The reloaded program's outputs against PyTorch's."""
    return check_outputs(pt2_runner, path, model, config, dynamic_batch)


def check_safetensors(path: Path, model: nn.Module, config: dict, dynamic_batch: bool) -> dict:
    """Every tensor read back equals the model's, bit for bit (same dtype, shape and bytes)."""
    written = safetensors.torch.load_file(path)
    state = model.state_dict()
    differing = [
        key
        for key, tensor in state.items()
        if key not in written
        or written[key].dtype != tensor.dtype
        or not torch.equal(written[key], tensor)
    ]
    if differing or set(written) != set(state):
        raise UserError(
            f"the safetensors file does not give back the weights bit for bit "
            f"({len(differing)} of {len(state)} tensors differ, e.g. {differing[:1]}); "
            "nothing written"
        )
    return {"tensors": len(state), "bit_identical": True}


CHECKS: dict[str, Callable[[Path, nn.Module, dict, bool], dict]] = {
    "onnx": check_onnx,
    "pt2": check_pt2,
    "safetensors": check_safetensors,
}


def quantize_onnx(file: IO[bytes]) -> None:
    """Rewrites the ONNX file open in `file` as onnxruntime's dynamic int8 quantisation of its
    matrix products (`QUANTIZED_OPS`); its metadata stays."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # quantize_dynamic advises pre-processing as a warning
    try:
        with tempfile.TemporaryDirectory() as folder:
            quantized = Path(folder) / "int8.onnx"
            quantize_dynamic(
                Path(file.name),
                quantized,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=QUANTIZED_OPS,
            )
            file.seek(0)
            file.truncate()
            file.write(quantized.read_bytes())
            file.flush()
    finally:
        root_logger.setLevel(level)


def check_int8(path: Path, model: nn.Module, config: dict, dynamic_batch: bool) -> dict:
    """Runs the quantised file on the check images: a `UserError` unless its logits are finite;
    their largest difference from PyTorch's, relative to their spread, is reported."""
    run = onnx_runner(path)
    differences = []
    with torch.no_grad():
        for images in check_images(config, check_batches(dynamic_batch)):
            logits = run(images)
            if not torch.isfinite(logits).all():
                raise UserError("the int8 file's logits are not all finite; nothing written")
            differences.append(relative_difference(logits, model(images)))
    return {"max_relative_difference": max(differences)}


def _perturb_if_asked(model: nn.Module) -> None:
    """The test hook: with DEBIFORMER_EXPORT_PERTURB=1, adds 1 to the model's first weight."""
    if os.environ.get(PERTURB_ENV) == "1":
        with torch.no_grad():
            next(model.parameters()).add_(1.0)


def export_model(options: ExportOptions) -> dict[str, Any]:
    """Builds the model `options` describe, writes it in `options.format`, checks the file
    against the model, and only then puts it at `options.out`. Returns what was written and
    checked (`check`: the largest relative difference and the batches, or the bit-identical
    tensor count; with `quantize`, `check["int8"]` for the quantised file)."""
    model, config = build_model(options)
    if options.quantize is not None:
        config = {**config, "quantization": QUANTIZATION_NOTE}
    with atomic_writer(options.out, "wb") as file:
        WRITERS[options.format](model, config, options.dynamic_batch, file)
        file.flush()
        _perturb_if_asked(model)
        check = CHECKS[options.format](Path(file.name), model, config, options.dynamic_batch)
        if options.quantize is not None:
            quantize_onnx(file)
            check["int8"] = check_int8(Path(file.name), model, config, options.dynamic_batch)
    return {
        "out": str(options.out),
        "format": options.format,
        "opset": ONNX_OPSET if options.format == "onnx" else None,
        "quantize": options.quantize,
        "dynamic_batch": options.dynamic_batch,
        "bytes": options.out.stat().st_size,
        "config": config,
        "check": check,
    }
