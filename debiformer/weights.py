"""The one way to get a model with weights: a `ModelSpec` says which network, a weights source
says where its weights come from, and `build_model` returns the model and its `Provenance`.

    ModelSpec           task, variant, classes, input channels, drop path, architecture
                        overrides, a dense head's recipe section, preprocessing; plain dicts
                        both ways (`to_dict`, `from_dict`), or made from a recipe
    build_model         spec + weights -> (model, Provenance): random, a pretrained start (a new
                        head for other classes, a stem adapted to other input channels), or a
                        checkpoint's exact weights
    spec_of_checkpoint  the spec a weights file records: a training checkpoint's "model_spec"
                        (`spec_entry` makes it), an export's metadata, else a training
                        checkpoint's recipe with the class count its weights have
    open_weights        a file or URL read once (`WeightsFile`), for both of the above
    load_pretrained     the pretrained start alone (`create_model(pretrained=...)` uses it)
    load_weights        a loaded checkpoint's weights into a model, exactly

Accepted files: this tool's training checkpoints (model or EMA weights), bare state dicts (also
under `"model"`), the authors' released files (their key names are renamed on load) and
`.safetensors` files. `.pt`/`.pth` files go through `checkpoint.load_checkpoint`
(`torch.load(weights_only=True)`), so no code runs from them.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import safetensors.torch
import torch
from rich.console import Console
from timm.models import adapt_input_conv
from torch import nn

from debiformer.checkpoint import existing_file, is_training_checkpoint, load_checkpoint
from debiformer.errors import UserError
from debiformer.official import rename_official_state_dict
from debiformer.runtime import PRECISIONS

if TYPE_CHECKING:
    from debiformer.recipe import Recipe

STEM_CONV = "stem.0"
CLASSIFIER = "head"
TASKS = ("classification", "detection", "segmentation")
# where a training checkpoint and an export's metadata keep the spec
SPEC_KEY = "model_spec"
# the key of an export's JSON config in a .safetensors file's metadata
EXPORT_CONFIG_KEY = "debiformer"
# how this tool's loaders resize: bilinear (torchvision) or area averaging (FFCV)
RECIPE_INTERPOLATION = "bilinear"
# what an export's config of the first format holds beside its preprocessing (no "model_spec")
OLD_EXPORT_KEYS = ("model", "num_classes", "in_chans")
# the weights file of a timm / Hugging Face folder
HF_WEIGHTS = "model.safetensors"
# the fix for an export whose config is damaged
REEXPORT = "export the model again, or give a recipe or a model name"

# ----------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a network again: the `task` ("classification", "detection",
    "segmentation"), the variant `name`, `num_classes` (0: no classifier), `in_chans`,
    `drop_path` (None: the variant's), `arch` (`Architecture` overrides), for dense tasks `head`
    (the recipe's `detection` or `segmentation` section as a dict), and the `preprocessing` its
    weights were trained with where known (timm's `input_size`, `crop_pct`, `interpolation`)."""

    name: str
    task: str = "classification"
    num_classes: int = 1000
    in_chans: int = 3
    drop_path: float | None = None
    arch: dict = field(default_factory=dict)
    head: dict = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain values (JSON and `torch.load(weights_only=True)` both take them)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "model spec") -> ModelSpec:
        """The spec `to_dict` wrote; anything else is a one-line `UserError` naming `source`."""
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise UserError(f"{source}: not a model spec (a dict with a variant 'name')")
        unknown = sorted(set(raw) - {spec.name for spec in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"{source}: unknown model spec key {unknown[0]!r}")
        spec = cls(**raw)
        problem = spec._problem()
        if problem:
            raise UserError(f"{source}: {problem}")
        return spec

    def _problem(self) -> str | None:
        """What makes this spec unbuildable at a glance, if anything."""
        if self.task not in TASKS:
            return f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}"
        for key, least in (("num_classes", 0), ("in_chans", 1)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                return f"{key} must be an integer of at least {least}, got {value!r}"
        for key in ("arch", "head", "preprocessing"):
            if not isinstance(getattr(self, key), dict):
                return f"{key} must be a mapping, got {getattr(self, key)!r}"
        drop_path = self.drop_path
        if drop_path is not None and (
            isinstance(drop_path, bool) or not isinstance(drop_path, (int, float))
        ):
            return f"drop_path must be a number or null, got {drop_path!r}"
        return _preprocessing_problem(self.preprocessing)

    @classmethod
    def from_recipe(cls, recipe: Recipe, num_classes: int, in_chans: int = 3) -> ModelSpec:
        """The network `recipe` trains, with `num_classes` classes: its `model` section, for a
        classifier its evaluation preprocessing, for a dense task its head section."""
        model = recipe.model
        head, preprocessing = {}, {}
        if recipe.task == "classification":
            size = recipe.data.val_image_size or recipe.data.image_size
            preprocessing = {
                "input_size": [in_chans, size, size],
                "crop_pct": recipe.data.crop_ratio,
                "interpolation": RECIPE_INTERPOLATION,
            }
        else:
            head = dataclasses.asdict(getattr(recipe, recipe.task))
        spec = cls(
            name=model.name,
            task=recipe.task,
            num_classes=num_classes,
            in_chans=in_chans,
            drop_path=model.drop_path,
            arch=dict(model.arch),
            head=head,
            preprocessing=preprocessing,
        )
        return cls.from_dict(spec.to_dict(), f"recipe {recipe.name}")

    def backbone(self) -> ModelSpec:
        """The DeBiFormer under this spec's head: a classifier spec without classes."""
        return dataclasses.replace(self, task="classification", num_classes=0, head={})

    def require_classifier(self, work: str) -> None:
        """A one-line `UserError` unless this is a classifier; `work` says what needs one."""
        if self.task != "classification":
            raise UserError(f"{work} takes classifiers; {self.name} here is a {self.task} model")


def _preprocessing_problem(preprocessing: dict) -> str | None:
    """What is wrong with a spec's preprocessing (timm's `input_size`, `crop_pct`,
    `interpolation`), if anything."""
    size = preprocessing.get("input_size", [1, 1, 1])
    if not (
        isinstance(size, list)
        and len(size) == 3
        and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in size)
    ):
        return f"preprocessing.input_size must be [channels, height, width], got {size!r}"
    crop = preprocessing.get("crop_pct", 1.0)
    if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1:
        return f"preprocessing.crop_pct must be a fraction in (0, 1], got {crop!r}"
    if not isinstance(preprocessing.get("interpolation", ""), str):
        return f"preprocessing.interpolation must be a name, got {preprocessing['interpolation']!r}"
    return None


def spec_entry(spec: ModelSpec) -> dict[str, dict]:
    """The entry a training checkpoint carries so that it alone rebuilds its model."""
    return {SPEC_KEY: spec.to_dict()}


@dataclass(frozen=True)
class Provenance:
    """Where a model's weights came from, as plain data: `kind` "random", "pretrained" (a start)
    or "checkpoint" (exact weights); `source`, the file or URL; `weights`, which of the file's:
    "model", "ema", "official", "state_dict" or "safetensors"; `adapted`, what did not come from
    the file as it is (a new head, an adapted stem)."""

    kind: str = "random"
    source: str | None = None
    weights: str | None = None
    adapted: tuple[str, ...] = ()

    @property
    def ema(self) -> bool:
        return self.weights == "ema"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "adapted": list(self.adapted)}

    def describe(self) -> str:
        """One phrase, e.g. "ema weights of runs/a/last.pt" or "started from debi_tiny.pth"."""
        if self.kind == "checkpoint":
            return f"{self.weights} weights of {self.source}"
        if self.kind == "pretrained":
            return f"started from {self.source}"
        return "random"


# ----------------------------------------------------------------------------- reading files


def is_official_state_dict(state: dict[str, Any]) -> bool:
    """True for the authors' released checkpoints, recognised by their key names."""
    weights = state.get("model", state)
    return isinstance(weights, dict) and "downsample_layers.0.0.weight" in weights


def local_file(source: str | Path) -> Path:
    """`source` as a local file: a path (a timm / Hugging Face folder: its model.safetensors), or
    a URL downloaded once into the torch hub cache
    (`<hub dir>/checkpoints`), checked against the hash prefix its name carries
    (`name-<sha256 prefix>.pth`, torch.hub's convention) if any."""
    text = str(source)
    if "://" not in text:
        path = Path(text).expanduser()
        if path.is_dir() and (path / HF_WEIGHTS).is_file():
            return path / HF_WEIGHTS  # a timm / Hugging Face folder (`export --format hf`)
        return existing_file(path)
    name = Path(text.split("?")[0]).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        hash_prefix = re.search(r"-([a-f0-9]{6,})\.", name)
        try:
            torch.hub.download_url_to_file(
                text, str(path), hash_prefix.group(1) if hash_prefix else None, progress=False
            )
        except (OSError, RuntimeError) as error:
            detail = " ".join(str(error).split())[:200]
            raise UserError(f"cannot download {text}: {detail}") from None
    return path


@dataclass(frozen=True)
class WeightsFile:
    """A weights file read once: `contents` is a loaded checkpoint (a dict) or a .safetensors
    file's tensors, `metadata` a .safetensors file's header metadata."""

    path: Path
    contents: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def is_safetensors(self) -> bool:
        return self.path.suffix == ".safetensors"

    @property
    def recipe(self) -> dict | None:
        """The recipe a training checkpoint of this tool stores (as a dict), if any."""
        stored = self.contents.get("recipe") if is_training_checkpoint(self.contents) else None
        return stored if isinstance(stored, dict) else None


def _name(source: str | Path | WeightsFile) -> str:
    """How a weights source is named in messages and records: its path or URL."""
    return str(source.path if isinstance(source, WeightsFile) else source)


def _unreadable_safetensors(path: Path, error: Exception) -> UserError:
    detail = " ".join(str(error).split())[:200]
    return UserError(f"checkpoint {path} is not a readable safetensors file: {detail}")


def open_weights(source: str | Path | WeightsFile) -> WeightsFile:
    """The file or URL `source`, read onto the CPU without running code from it."""
    if isinstance(source, WeightsFile):
        return source
    path = local_file(source)
    if path.suffix != ".safetensors":
        return WeightsFile(path, load_checkpoint(path))
    try:  # safetensors raises its own error types for a damaged file
        with safetensors.safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        return WeightsFile(path, safetensors.torch.load_file(path), metadata)
    except Exception as error:
        raise _unreadable_safetensors(path, error) from None


def _damaged_config(path: Path, problem: str) -> UserError:
    """The one line for a .safetensors file whose export config is damaged."""
    return UserError(f"checkpoint {path}: its {EXPORT_CONFIG_KEY!r} metadata {problem}; {REEXPORT}")


def exported_config(source: str | Path | WeightsFile) -> dict | None:
    """The JSON config an export recorded in a .safetensors file's metadata; None without. Text
    that is not a JSON object is a one-line `UserError`."""
    file = open_weights(source)
    text = file.metadata.get(EXPORT_CONFIG_KEY)
    if text is None:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        problem = f"is not JSON ({error.msg} at character {error.pos})"
        raise _damaged_config(file.path, problem) from None
    if not isinstance(config, dict):
        raise _damaged_config(file.path, "is not a JSON object")
    return config


def _exported_spec(file: WeightsFile, config: dict) -> ModelSpec:
    """The spec an export's `config` records, checked down to its architecture: its
    "model_spec", or in the first format its model, classes, channels, overrides and
    preprocessing."""
    if SPEC_KEY in config:
        raw = config[SPEC_KEY]
    else:
        missing = [key for key in OLD_EXPORT_KEYS if key not in config]
        if missing:
            raise _damaged_config(file.path, f"lacks {missing[0]!r} (and {SPEC_KEY!r})")
        keys = ("input_size", "crop_pct", "interpolation")
        raw = {
            "name": config["model"],
            "num_classes": config["num_classes"],
            "in_chans": config["in_chans"],
            "arch": config.get("arch", {}),
            "preprocessing": {key: config[key] for key in keys if key in config},
        }
    from debiformer.model import resolve_architecture  # the model module imports this one

    try:
        spec = ModelSpec.from_dict(raw, "a bad model spec")
        resolve_architecture(spec.name, spec.drop_path, spec.arch, prefix="arch.")
    except UserError as error:
        raise _damaged_config(file.path, f"holds {error}") from None
    return spec


def require_finite(weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """A one-line `UserError` naming the first tensor of `weights` (read from `path`) that holds
    a NaN or an infinity: no training or evaluation can start from such weights."""
    for key, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(
                f"checkpoint {path}: tensor {key!r} holds NaN or infinite values, so its weights "
                "are broken: refused; use another file (an earlier checkpoint of its run, say)"
            )


def _state_of(
    checkpoint: dict[str, Any], path: str | Path, use_ema: bool, official: bool | None = None
) -> tuple[dict, str]:
    """The weights a loaded checkpoint holds, in this project's names, and their kind. `official`
    True reads it as a released file, False as this tool's; None tells them by their key names."""
    if official is None:
        official = is_official_state_dict(checkpoint)
    if is_training_checkpoint(checkpoint) and not official:
        if use_ema and checkpoint.get("ema") is None:
            raise UserError(
                f"checkpoint {path} holds no EMA weights (it was trained with train.ema: false)"
            )
        weights, kind = (
            (checkpoint["ema"], "ema") if use_ema else (checkpoint.get("model"), "model")
        )
    else:
        weights, kind = (
            checkpoint.get("model", checkpoint),
            "official" if official else "state_dict",
        )
    if not isinstance(weights, dict) or not all(
        isinstance(value, torch.Tensor) for value in weights.values()
    ):
        raise UserError(
            f"checkpoint {path} holds no state dict (a dict of tensors, or one under 'model')"
        )
    require_finite(weights, path)
    return (rename_official_state_dict(weights) if official else weights), kind


def state_of(
    file: WeightsFile, *, use_ema: bool = False, official: bool | None = None
) -> tuple[dict, str]:
    """(state dict in this project's names, kind) of a read file; kind is "official", "ema",
    "model", "state_dict" or "safetensors"."""
    if not file.is_safetensors:
        return _state_of(file.contents, file.path, use_ema, official)
    if use_ema:
        raise UserError(f"checkpoint {file.path} holds no EMA weights (a .safetensors file)")
    require_finite(file.contents, file.path)
    return file.contents, "safetensors"


def read_state_dict(source: str | Path, *, use_ema: bool = False) -> tuple[dict, str]:
    """(state dict in this project's names, kind) of a checkpoint file or URL."""
    return state_of(open_weights(source), use_ema=use_ema)


# ----------------------------------------------------------------------------- the spec a file records


def _classifier_classes(state: dict[str, torch.Tensor]) -> int:
    """The class count of a classifier's weights (0 without a head)."""
    head = state.get(f"{CLASSIFIER}.weight")
    return int(head.shape[0]) if head is not None else 0


def weights_classes(state: dict[str, torch.Tensor], task: str, head: dict) -> int:
    """How many classes the weights of a `task` model with `head` (its recipe section) have."""
    if task == "detection":
        from debiformer.detection import detector_classes

        return detector_classes(state, head.get("detector", "maskrcnn"))
    if task == "segmentation":
        from debiformer.segmentation import segmenter_classes

        return segmenter_classes(state)
    return _classifier_classes(state)


def weights_in_chans(state: dict[str, torch.Tensor]) -> int:
    """The input channels of a classifier's stem in `state` (3 where it has none)."""
    stem = state.get(f"{STEM_CONV}.weight")
    return int(stem.shape[1]) if stem is not None else 3


def recorded_spec(file: WeightsFile) -> ModelSpec | None:
    """The spec `file` records: a training checkpoint's "model_spec" or an export's config
    (older exports: its model, classes, channels, overrides and preprocessing); for training
    checkpoints without one, their recipe with the class count of their weights. None else."""
    if file.is_safetensors:
        config = exported_config(file)
        return None if config is None else _exported_spec(file, config)
    if not is_training_checkpoint(file.contents):
        return None
    if SPEC_KEY in file.contents:
        return ModelSpec.from_dict(file.contents[SPEC_KEY], f"checkpoint {file.path}")
    if file.recipe is None:
        return None
    from debiformer.recipe import recipe_from_stored  # the recipe module imports the model's

    return _spec_with_weights(recipe_from_stored(file.recipe), file)


def _spec_with_weights(recipe: Recipe, file: WeightsFile) -> ModelSpec:
    """The recipe's network with the class count and input channels of `file`'s weights."""
    state, _ = state_of(file)
    head = ModelSpec.from_recipe(recipe, 0).head
    classes = weights_classes(state, recipe.task, head)
    in_chans = weights_in_chans(state) if recipe.task == "classification" else 3
    return ModelSpec.from_recipe(recipe, classes, in_chans)


def spec_of_checkpoint(
    source: str | Path | WeightsFile, *, recipe: Recipe | None = None, model: str | None = None
) -> ModelSpec:
    """The spec of the network whose weights `source` holds. `model` (a variant name) or
    `recipe`, where given, name the network, and the weights give its class count and input
    channels; else what the file records (`recorded_spec`). A file that records nothing is a
    one-line `UserError` asking for a recipe or a model name."""
    file = open_weights(source)
    if model is not None:
        state, _ = state_of(file)
        classes, in_chans = _classifier_classes(state), weights_in_chans(state)
        return ModelSpec.from_dict({"name": model, "num_classes": classes, "in_chans": in_chans})
    if recipe is not None:
        return _spec_with_weights(recipe, file)
    spec = recorded_spec(file)
    if spec is None:
        raise UserError(
            f"checkpoint {file.path} does not record its model (this tool's training "
            "checkpoints and exported .safetensors files do): give a recipe or a model name"
        )
    return spec


# ----------------------------------------------------------------------------- loading weights


def as_model_shape(tensor: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """The release's (out, in, 1, 1) pointwise weight as the (out, in) weight of this project's
    Linear layer (`expected` is the model's tensor); any other tensor as it is."""
    if expected.ndim == 2 and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
        return tensor.flatten(1)
    return tensor


def match_model(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> dict:
    """`state` checked key by key against `model`: the release's (out, in, 1, 1) pointwise weights
    reshaped to the Linear layers' (out, in); any extra, missing or mis-shaped key is a one-line
    `UserError` naming it."""
    expected = model.state_dict()
    matched = {}
    for key, tensor in state.items():
        if key not in expected:
            raise UserError(
                f"checkpoint {source}: key {key!r} has no place in this model (is it the right "
                "variant?)"
            )
        tensor = as_model_shape(tensor, expected[key])
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(
                f"checkpoint {source}: key {key!r} has shape {tuple(tensor.shape)}, the model "
                f"expects {tuple(expected[key].shape)} (is it the right variant and num_classes?)"
            )
        matched[key] = tensor
    # FrozenBatchNorm2d (a frozen model's) keeps no batch count; the count never affects outputs
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in matched:
            matched[key] = expected[key]
    missing = [key for key in expected if key not in matched]
    if missing:
        raise UserError(
            f"checkpoint {source} lacks {missing[0]!r} (and {len(missing) - 1} more): is it the "
            "right variant?"
        )
    return matched


def conversion_notices(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """The notice for `state`'s floating-point tensors of another type than the model's (fp16 or
    bf16 weights loaded into an fp32 model), which loading converts; none if there are none."""
    expected = model.state_dict()
    names = {dtype: name for name, dtype in PRECISIONS.items()}
    converted = {
        (names.get(tensor.dtype, str(tensor.dtype)), names.get(target.dtype, str(target.dtype)))
        for key, tensor in state.items()
        if (target := expected.get(key)) is not None
        and tensor.is_floating_point()
        and tensor.dtype != target.dtype
    }
    if not converted:
        return []
    sources = ", ".join(sorted({source for source, _ in converted}))
    targets = ", ".join(sorted({target for _, target in converted}))
    return [f"{sources} tensors converted to the model's {targets}"]


def _print_notices(what: str, notices: list[str], console: Console | None) -> None:
    """Prints each notice as one line, "`what`: notice", to `console` (else stderr), never
    wrapped."""
    for notice in notices:
        (console or Console(stderr=True)).print(
            f"{what}: {notice}", highlight=False, soft_wrap=True
        )


def adapt_to_model(
    model: nn.Module, state: dict[str, torch.Tensor], *, new_head: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`state` made to fit a model with other classes or input channels, and a notice for each
    change: a head of another size (or any head, with `new_head`) is left out, so the model
    keeps a fresh one; a stem convolution for other input channels is adapted as timm's
    `adapt_input_conv` does."""
    state = dict(state)
    expected = model.state_dict()
    notices = []
    head = f"{CLASSIFIER}.weight"
    fits = head in state and head in expected and state[head].shape == expected[head].shape
    if head in state and (new_head or not fits):
        classes = state[head].shape[0]
        for key in (head, f"{CLASSIFIER}.bias"):
            state.pop(key, None)
        notices.append(
            f"new {expected[head].shape[0]}-way head (the checkpoint's head has {classes} classes)"
            if head in expected
            else f"the checkpoint's {classes}-class head is left out (the model has none)"
        )
    stem = f"{STEM_CONV}.weight"
    if stem in state and stem in expected and state[stem].shape[1] != expected[stem].shape[1]:
        channels = (state[stem].shape[1], expected[stem].shape[1])
        state[stem] = adapt_input_conv(expected[stem].shape[1], state[stem])
        notices.append(f"stem adapted from {channels[0]} to {channels[1]} input channels")
    return state, notices


def load_pretrained(
    model: nn.Module,
    source: str | Path | WeightsFile,
    *,
    use_ema: bool = False,
    new_head: bool = False,
    console: Console | None = None,
) -> Provenance:
    """Starts `model` from the weights of `source` (a file or URL; see `open_weights`), printing
    a one-line notice for each part adapted to the model and for tensors of another type
    (fp16, bf16) converted to the model's.

    A head for other classes (or any head, with `new_head`) starts at zero: its logits start
    equal, the first steps train the head before any gradient reaches the backbone, and it
    cannot carry the checkpoint's classes over (a random head drawn from the seed the checkpoint
    was trained with would start where that run's head started)."""
    file = open_weights(source)
    state, kind = state_of(file, use_ema=use_ema)
    state, notices = adapt_to_model(model, state, new_head=new_head)
    notices += conversion_notices(model, state)
    _print_notices("pretrained weights", notices, console)
    current = model.state_dict()
    new_head_state = {
        key: torch.zeros_like(current[key])
        for key in (f"{CLASSIFIER}.weight", f"{CLASSIFIER}.bias")
        if key in current and key not in state
    }
    model.load_state_dict(match_model(model, {**state, **new_head_state}, file.path))
    return Provenance("pretrained", _name(source), kind, tuple(notices))


def load_weights(
    model: nn.Module,
    checkpoint: dict[str, Any],
    path: str | Path,
    *,
    use_ema: bool = False,
    official: bool | None = None,
) -> str:
    """Loads the weights of `checkpoint` (read from `path`) into `model` exactly; returns their
    kind. `official` True reads it as a released file; None tells one by its key names."""
    state, kind = _state_of(checkpoint, path, use_ema, official)
    model.load_state_dict(match_model(model, state, path))
    return kind


def load_official_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads a state dict saved by the authors' release into `model`, checking every key and
    shape."""
    model.load_state_dict(match_model(model, rename_official_state_dict(state_dict), "checkpoint"))


def load_official_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Loads a released checkpoint file (a state dict, or one under `'model'`) into `model`."""
    load_weights(model, load_checkpoint(path), path, official=True)


# ----------------------------------------------------------------------------- building


def _network(spec: ModelSpec) -> nn.Module:
    """The spec's classifier, randomly initialised."""
    from debiformer.model import create_model  # the model module imports this one

    return create_model(
        spec.name,
        num_classes=spec.num_classes,
        in_chans=spec.in_chans,
        drop_path_rate=spec.drop_path,
        **spec.arch,
    )


def _dense_network(
    spec: ModelSpec, pretrained: str | Path | None, ema: bool, console: Console | None
) -> tuple[nn.Module, Provenance]:
    """The spec's detector or segmenter on its backbone, the backbone started from `pretrained`."""
    from debiformer.dense import build_body
    from debiformer.recipe import TASK_SECTIONS

    section = TASK_SECTIONS[spec.task]
    unknown = sorted(set(spec.head) - {item.name for item in dataclasses.fields(section)})
    if unknown:
        raise UserError(f"model spec: unknown key '{spec.task}.{unknown[0]}'")
    head = section(**spec.head)
    body, provenance = build_body(spec, pretrained=pretrained, ema=ema, console=console)
    if pretrained is not None:
        fresh = (
            f"only the backbone's stem and stages come from it: {_fresh_parts(spec)} start fresh"
        )
        _print_notices("pretrained weights", [fresh], console)
        provenance = dataclasses.replace(provenance, adapted=(*provenance.adapted, fresh))
    if spec.task == "detection":
        from debiformer.detection import build_detector

        return build_detector(body, head, spec.num_classes), provenance
    from debiformer.segmentation import build_segmenter

    return build_segmenter(body, head, spec.num_classes), provenance


# the parts of a dense model that a classifier's weights do not hold, by (task, head kind)
FRESH_PARTS = {
    ("detection", "maskrcnn"): "the stage-map norms, FPN, RPN and box and mask heads",
    ("detection", "retinanet"): "the stage-map norms, FPN and RetinaNet head",
    ("segmentation", "fpn"): "the stage-map norms and Semantic FPN head",
    ("segmentation", "upernet"): "the stage-map norms and UperNet heads",
}


def _fresh_parts(spec: ModelSpec) -> str:
    """What of the dense model of `spec` starts from random weights under a pretrained backbone."""
    from debiformer.recipe import TASK_SECTIONS

    kind_key = "detector" if spec.task == "detection" else "head"
    default = getattr(TASK_SECTIONS[spec.task](), kind_key)
    return FRESH_PARTS[(spec.task, spec.head.get(kind_key, default))]


def build_model(
    spec: ModelSpec,
    *,
    pretrained: str | Path | WeightsFile | None = None,
    checkpoint: str | Path | WeightsFile | None = None,
    ema: bool = False,
    new_head: bool = False,
    official: bool | None = None,
    console: Console | None = None,
) -> tuple[nn.Module, Provenance]:
    """The network `spec` describes and where its weights came from.

    Weights: random without a source; `pretrained` (a file or URL) starts the model, or a dense
    model's backbone, from it (`load_pretrained`: a new head for other classes, or any head with
    `new_head`; an adapted stem); `checkpoint` (a file or URL) gives it exactly that file's
    weights. `ema` takes a training checkpoint's EMA weights; `official` True reads `checkpoint`
    as the authors' release (None: told by its key names). Notices go to `console`."""
    if pretrained is not None and checkpoint is not None:
        raise UserError("pretrained and checkpoint: give one (weights to start from, or exact)")
    if spec.task == "classification":
        model, provenance = _network(spec), Provenance()
        if pretrained is not None:
            provenance = load_pretrained(
                model, pretrained, use_ema=ema, new_head=new_head, console=console
            )
    else:
        model, provenance = _dense_network(spec, pretrained, ema, console)
    if checkpoint is not None:
        file = open_weights(checkpoint)
        state, kind = state_of(file, use_ema=ema, official=official)
        notices = conversion_notices(model, state)
        _print_notices("checkpoint weights", notices, console)
        model.load_state_dict(match_model(model, state, file.path))
        provenance = Provenance("checkpoint", _name(checkpoint), kind, tuple(notices))
    return model, provenance
