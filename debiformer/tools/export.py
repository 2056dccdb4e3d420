"""`debiformer export`: a DeBiFormer classifier written for deployment, and checked against
PyTorch before it replaces anything.

    onnx         torch.export's graph translated to ONNX opset 18 (`ONNX_OPSET`); checked by
                 running it in onnxruntime on the CPU
    pt2          the torch.export program itself (`torch.export.save`); checked by reloading it
                 with `torch.export.load` and running it
    safetensors  the weights, with the architecture and preprocessing in the file's metadata;
                 checked by reading every tensor back, which must equal the model's bit for bit.
                 `load_exported_weights(FILE)` (that is, `weights.build_model` with the
                 recorded spec and `checkpoint=FILE`) builds the model again
    hf           a timm / Hugging Face folder: timm's config.json, model.safetensors (as above)
                 and a model card (`tools.hf_folder`); checked by timm building the model from
                 the folder (`local-dir:`), which must give the same logits exactly

With `quantize="int8"` (ONNX only) the checked fp32 file is then quantised with onnxruntime's
dynamic int8 quantisation of its matrix products (`MatMul`, `Gemm`: int8 weights, activations
quantised per batch at run time; convolutions stay fp32: quantised, they ran 2.2-5.3x slower on
an AVX2 CPU). Its logits must be finite; their difference from PyTorch is reported, not limited:
int8 accuracy depends on the data (`benchmarks/quantize.py` measures it on Fashion-MNIST).

ONNX and pt2 files are checked on seeded random images at batch 1 (and 3 with `dynamic_batch`):
the largest |exported - PyTorch| over the spread of PyTorch's logits (max - min) must not exceed
`TOLERANCE`. Every format records the same JSON (`export_config`: variant, classes, input
channels, architecture overrides, timm's preprocessing fields, and the `weights.ModelSpec` under
"model_spec") under the key "debiformer":
in the ONNX model's metadata_props, as the pt2 archive's extra file "debiformer", in the
safetensors header's metadata.

The graph is traced in eval mode without autograd, so it holds the inference paths only: the
MLP's and the routed attention's plain paths instead of their custom autograd functions, no
recomputation, and routing's gathered inference path (`debiformer.routing`); an exported graph
with a higher-order operator left in it is refused (`training_only_nodes`). Spatial size is fixed
per file: the padding to the region grid and the choice of attention path depend on the map size.

Before anything is traced, the memory an ONNX or pt2 export needs at its input size is estimated
(`export_memory`: the model's activation peak, found by running it on the meta device, for each
forward the check holds at once, and copies of the weights) and a size that needs more than is
available is refused (`check_memory`): the activations of the routed attentions grow faster than
the pixel count.

The file is written beside `out` under a temporary name, checked there, and only then renamed
onto `out` (`runtime.atomic_writer`): a failed check leaves no file, and an older `out` stays.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from timm.data import resolve_data_config
from torch import Tensor, nn
from torch.export import ExportedProgram
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import debiformer
from debiformer import weights
from debiformer.data.class_names import known_class_names
from debiformer.errors import UserError, mention
from debiformer.model import VARIANTS, Architecture
from debiformer.recipe import Recipe, load_recipe
from debiformer.routing import implementation
from debiformer.runtime import atomic_writer, check_writable
from debiformer.tools.common import MIN_RESOLUTION, check_at_least
from debiformer.tools.hf_folder import check_folder, write_hf_folder
from debiformer.weights import (
    ModelSpec,
    WeightsFile,
    open_weights,
    spec_entry,
    spec_of_checkpoint,
)

FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "safetensors": ".safetensors", "hf": ""}
ONNX_OPSET = 18
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
TOLERANCE = 1e-4
CONFIG_KEY = weights.EXPORT_CONFIG_KEY
CONFIG_FORMAT = "debiformer-export/1"
QUANTIZATIONS = ("int8",)
QUANTIZED_OPS = ["MatMul", "Gemm"]
QUANTIZATION_NOTE = "dynamic int8 of MatMul and Gemm weights (onnxruntime)"
DEFAULT_RESOLUTION = 224
IMAGENET_CLASSES = 1000
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def require_onnx_packages(parameter: str, value: str) -> None:
    """A one-line `UserError` naming the extra to install when onnx, onnxruntime or onnxscript
    is missing, which the `parameter` set to `value` needs."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"{mention(parameter, value)} needs {', '.join(missing)}: install the extra with "
            "pip install 'debiformer[export]'"
        )


def resolution_sides(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from 224 or (33, 47); each side at least 32 pixels."""
    sides = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    for side in sides:
        check_at_least("resolution", side, MIN_RESOLUTION)
    return sides


def format_of(path: str | Path) -> str:
    """The format whose suffix `path` (the `out` option) has; a `UserError` for any other name."""
    for name, suffix in FORMATS.items():
        if Path(path).suffix == suffix:
            return name
    raise UserError(
        f"{path}: name it .onnx, .pt2 or .safetensors, or a folder without a suffix for hf (or "
        f"give {mention('format')})",
        about="out",
    )


@dataclass(frozen=True)
class ExportOptions:
    """What `debiformer export` writes. Checked when made: a bad value is a one-line `UserError`
    before any work.

    The model: `model` (a variant name) or `recipe` (its `model` section and preprocessing), or
    else what `checkpoint` records (`weights.spec_of_checkpoint`: a training checkpoint's model
    spec or recipe, an exported .safetensors file's config). The weights: `checkpoint`, loaded
    exactly as `debiformer eval` does (classes and input channels are read from it; `ema`: its
    EMA weights), or `pretrained`, as `create_model(pretrained=...)` starts from it (a head for
    other classes starts at zero), or neither (random weights, seed 0). `format`: None takes it
    from `out`'s suffix. `resolution`: H or (H, W), default the recipe's image size, else 224. `dynamic_batch`: ONNX and pt2 files
    take any batch (else batch 1). `quantize`: "int8" for onnxruntime's dynamic int8 quantisation
    of an ONNX file's matrix products."""

    out: Path
    format: str | None = None
    model: str | None = None
    recipe: str | None = None
    checkpoint: str | None = None
    pretrained: str | None = None
    ema: bool = False
    resolution: int | tuple[int, int] | None = None
    dynamic_batch: bool = False
    quantize: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.format is None:
            object.__setattr__(self, "format", format_of(self.out))
        if self.format not in FORMATS:
            raise UserError(
                f": unknown format {self.format!r}; choose one of {', '.join(FORMATS)}",
                about="format",
            )
        self._check_model()
        if self.resolution is not None:
            object.__setattr__(self, "resolution", resolution_sides(self.resolution))
        if self.dynamic_batch and self.format in ("safetensors", "hf"):
            raise UserError(
                f": {self.format} exports hold weights only, not a graph", about="dynamic_batch"
            )
        suffix = FORMATS[self.format]
        if self.format == "hf":
            check_folder(self.out)
        elif self.out.suffix != suffix:
            raise UserError(
                f"{self.out}: a {self.format} file's name ends in {suffix}", about="out"
            )
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise UserError(
                f": unknown quantisation {self.quantize!r}; choose int8", about="quantize"
            )
        if self.quantize is not None and self.format != "onnx":
            raise UserError(
                f"{mention('quantize', 'int8')} quantises ONNX files only: use "
                f"{mention('format', 'onnx')}"
            )
        if self.format == "onnx":
            require_onnx_packages("format", "onnx")
        if self.format != "hf":
            check_writable(self.out, "out")

    def _check_model(self) -> None:
        """One way to name the model, and one source of weights."""
        if self.model is not None and self.recipe is not None:
            raise UserError(
                f"{mention('model')} and {mention('recipe')}: give one (the recipe names its model)"
            )
        if self.model is not None and self.model not in debiformer.list_models():
            raise UserError(
                f": unknown model {self.model!r}; choose from {', '.join(debiformer.list_models())}",
                about="model",
            )
        if self.checkpoint is not None and self.pretrained is not None:
            raise UserError(f"{mention('checkpoint')} and {mention('pretrained')}: give one")
        if self.ema and self.checkpoint is None:
            raise UserError(
                f"reads the EMA weights of a {mention('checkpoint')}; give one", about="ema"
            )
        if self.model is None and self.recipe is None and self.checkpoint is None:
            raise UserError(
                f"name the model: {mention('model', 'NAME')}, {mention('recipe', 'RECIPE')} or a "
                f"{mention('checkpoint')}"
            )


def model_spec(
    options: ExportOptions, file: WeightsFile | None, recipe: Recipe | None = None
) -> ModelSpec:
    """The network `options` name: `model` or `recipe` (the loaded `options.recipe`; with a
    checkpoint, its weights' class count and input channels), else what the checkpoint `file`
    records; a classifier's."""
    if file is not None:
        spec = spec_of_checkpoint(file, recipe=recipe, model=options.model)
    elif recipe is not None:
        spec = ModelSpec.from_recipe(recipe, IMAGENET_CLASSES)
    else:
        spec = ModelSpec(options.model)
    spec.require_classifier("export")
    return spec


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
    model: nn.Module,
    spec: ModelSpec,
    resolution: tuple[int, int],
    weights: str,
    label_names: list[str],
) -> dict[str, Any]:
    """What a deployment needs to know beside the graph or weights: how to build the model again
    (`model`, `num_classes`, `in_chans`, `arch`, and the whole `ModelSpec` under "model_spec"),
    how to prepare its input (timm's pretrained_cfg fields `input_size`, `mean`, `std`,
    `interpolation`, `crop_pct`) and what its outputs are (`label_names`, one per class)."""
    data = resolve_data_config({}, model=model)
    in_chans = model.stem[0].in_channels
    preprocessing = {
        "input_size": [in_chans, *resolution],
        "interpolation": spec.preprocessing.get("interpolation", data["interpolation"]),
        "crop_pct": spec.preprocessing.get("crop_pct", data["crop_pct"]),
    }
    return {
        "format": CONFIG_FORMAT,
        "model": spec.name,
        "num_classes": model.num_classes,
        "in_chans": in_chans,
        "arch": architecture_overrides(model, spec.name),
        "input_size": preprocessing["input_size"],
        "mean": [float(value) for value in data["mean"]],
        "std": [float(value) for value in data["std"]],
        "interpolation": preprocessing["interpolation"],
        "crop_pct": preprocessing["crop_pct"],
        "weights": weights,
        "label_names": label_names,
        **spec_entry(replace(spec, preprocessing=preprocessing)),
    }


def build_model(
    options: ExportOptions, file: WeightsFile | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The model `options` describe, its weights loaded (`weights.build_model`; `file`: the
    checkpoint already read) and in eval mode, and its export config."""
    if file is None and options.checkpoint is not None:
        file = open_weights(options.checkpoint)
    recipe = load_recipe(options.recipe) if options.recipe is not None else None
    spec = model_spec(options, file, recipe)
    torch.manual_seed(0)
    model, provenance = weights.build_model(
        spec, checkpoint=file, pretrained=options.pretrained, ema=options.ema
    )
    described = "random (seed 0)" if provenance.kind == "random" else provenance.describe()
    default_size = spec.preprocessing.get("input_size", (3, DEFAULT_RESOLUTION, DEFAULT_RESOLUTION))
    resolution = options.resolution or tuple(default_size[1:])
    names = known_class_names(recipe, file, model.num_classes) if model.num_classes else []
    return model.eval(), export_config(model, spec, resolution, described, names)


def load_exported_weights(path: str | Path) -> nn.Module:
    """The model of a .safetensors file that `export_model` wrote, built from the spec it records
    with exactly its weights."""
    file = open_weights(path)
    return weights.build_model(spec_of_checkpoint(file), checkpoint=file)[0]


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


# ----------------------------------------------------------------------------- memory


class LiveBytes(TorchDispatchMode):
    """Within the block, `peak` is the most bytes that the tensors its operators create held at
    once (each storage counted once, until it is freed)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        """Runs the operator and counts the storages of its outputs."""
        output = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(output):
            if isinstance(leaf, Tensor):
                self._count(leaf.untyped_storage())
        return output

    def _count(self, storage: torch.UntypedStorage) -> None:
        """Adds a storage not counted yet; it is taken off again when freed."""
        key, size = id(storage), storage.nbytes()
        if key in self._counted:
            return
        self._counted.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        """Takes a freed storage off the live bytes."""
        self._counted.discard(key)
        self.live -= size


def forward_peak_bytes(model: nn.Module, input_size: tuple[int, ...]) -> float:
    """The most bytes the activations of `model`'s inference forward (as traced: eval mode, no
    autograd, the fast routed attention) hold at once on a batch of `input_size` (N, C, H, W),
    the batch included. Run on the meta device, which computes shapes only: no memory, a fraction
    of a second at any size. Infinite when a tensor's size overflows 64 bits."""
    state = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
    }
    images = torch.empty(input_size, device="meta")
    try:
        with torch.no_grad(), implementation("fast"), LiveBytes() as live:
            functional_call(model, state, (images,))
    except RuntimeError as error:
        if "overflow" not in str(error):
            raise
        return math.inf
    return images.untyped_storage().nbytes() + live.peak


def available_memory() -> int | None:
    """Bytes of memory that new allocations can take now: /proc/meminfo's MemAvailable (Linux),
    else the free physical pages `os.sysconf` counts; None where neither is known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


# how many forwards' activation peaks a graph format's check holds at once: onnxruntime keeps its
# arena at its peak while PyTorch runs; a reloaded pt2 program's activations are freed first
OVERLAPPING_FORWARDS = {"onnx": 2, "pt2": 1}
WEIGHT_COPIES = 3  # the model's, the written file's and the checking runtime's


def export_memory(model: nn.Module, config: dict, format: str, dynamic_batch: bool) -> float:
    """Bytes an export of `model` in the graph `format` needs at the config's input size,
    roughly: `WEIGHT_COPIES` of the weights and `OVERLAPPING_FORWARDS` forward peaks at the
    largest batch the file is checked at (`forward_peak_bytes`)."""
    weight_bytes = sum(tensor.nbytes for tensor in model.state_dict().values())
    batch = max(check_batches(dynamic_batch))
    peak = forward_peak_bytes(model, (batch, *config["input_size"]))
    return WEIGHT_COPIES * weight_bytes + OVERLAPPING_FORWARDS[format] * peak


def smaller_resolution(height: int, width: int, share: float) -> str:
    """A resolution whose pixels are about `share` (< 1) of height x width, as `resolution`
    takes it ("H" or "HxW"), each side a multiple of 32 (at least `MIN_RESOLUTION`): memory
    grows at least with the pixel count, so the export fits at this size or near it."""
    scale = math.sqrt(share)
    sides = [max(MIN_RESOLUTION, int(side * scale) // 32 * 32) for side in (height, width)]
    return str(sides[0]) if sides[0] == sides[1] else f"{sides[0]}x{sides[1]}"


def check_memory(model: nn.Module, config: dict, options: ExportOptions) -> None:
    """A one-line `UserError` about `resolution` when writing and checking a graph file at the
    config's input size needs more memory than is available (`export_memory`), found before any
    tracing; nothing where the available memory is unknown. A safetensors file runs no model."""
    available = available_memory()
    if options.format not in OVERLAPPING_FORWARDS or available is None:
        return
    needed = export_memory(model, config, options.format, options.dynamic_batch)
    if needed <= available:
        return
    height, width = config["input_size"][1:]
    amount = f"about {needed / 1e9:.3g} GB" if math.isfinite(needed) else "more than 2^63 bytes"
    suggestion = smaller_resolution(height, width, available / needed)
    raise UserError(
        f"{height}x{width}: exporting at this size needs {amount} of memory (at batch "
        f"{max(check_batches(options.dynamic_batch))}), but {available / 1e9:.3g} GB is "
        f"available; give a smaller size, e.g. {mention('resolution', suggestion)}",
        about="resolution",
    )


def export_model(options: ExportOptions) -> dict[str, Any]:
    """Builds the model `options` describe, refuses an input size it has not the memory to
    export at (`check_memory`), writes it in `options.format`, checks the file against the model,
    and only then puts it at `options.out`. Returns what was written and
    checked (`check`: the largest relative difference and the batches, or the bit-identical
    tensor count; with `quantize`, `check["int8"]` for the quantised file)."""
    file = open_weights(options.checkpoint) if options.checkpoint is not None else None
    model, config = build_model(options, file)
    if options.format == "hf":
        check = write_hf_folder(options.out, model, config, file)
        size = sum(path.stat().st_size for path in options.out.iterdir())
        return _result(options, config, check, size)
    check_memory(model, config, options)
    if options.quantize is not None:
        config = {**config, "quantization": QUANTIZATION_NOTE}
    with atomic_writer(options.out, "wb") as file:
        WRITERS[options.format](model, config, options.dynamic_batch, file)
        file.flush()
        check = CHECKS[options.format](Path(file.name), model, config, options.dynamic_batch)
        if options.quantize is not None:
            quantize_onnx(file)
            check["int8"] = check_int8(Path(file.name), model, config, options.dynamic_batch)
    return _result(options, config, check, options.out.stat().st_size)


def _result(options: ExportOptions, config: dict, check: dict, size: int) -> dict[str, Any]:
    """What `export_model` returns about what it wrote (`size`: bytes in all)."""
    return {
        "out": str(options.out),
        "format": options.format,
        "opset": ONNX_OPSET if options.format == "onnx" else None,
        "quantize": options.quantize,
        "dynamic_batch": options.dynamic_batch,
        "bytes": size,
        "config": config,
        "check": check,
    }
