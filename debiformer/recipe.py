"""Training recipes: a YAML schema with defaults, `base:` inheritance, dotted overrides, validation.

A recipe file has the sections below (every key optional, defaults in the dataclasses):

    base: _imagenet          # another recipe (path relative to this file, `.yaml` optional)
    task: classification     # or detection, segmentation
    model:    {name, drop_path, arch, pretrained, freeze, ...}
    data:     {backend, train_path, val_path, train_source, val_source, image_size, ...}
    detection: {detector, fpn_channels, min_size, max_size, ...}   (task: detection)
    segmentation: {head, channels, crop_size, eval_mode, ...}      (task: segmentation)
    optim:    {lr, lr_base_batch, weight_decay, betas, eps, clip_grad, layer_decay}
    schedule: {epochs or steps, warmup_epochs or warmup_steps, warmup_lr, min_lr, decay, ...}
    augment:  {hflip, scale, ratio, randaugment, random_erasing, mixup, cutmix, label_smoothing}
    train:    {batch_size, accum_steps, precision, device, channels_last, compile, ema, ...}
    output:   {dir, log_every, checkpoint_every, progress, tensorboard}

Any mistake (unknown key, wrong type, out-of-range value) raises `UserError` naming the key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from debiformer.errors import UserError
from debiformer.model import resolve_architecture

# The shipped recipes: the package `debiformer.recipes` (the top-level recipes/ folder of a clone).
RECIPES_DIR = Path(str(importlib.resources.files("debiformer.recipes")))


@dataclass
class ModelConfig:
    """Which network to build."""

    name: str = "debiformer_tiny"
    # stochastic depth rate; None keeps the variant's default
    drop_path: float | None = None
    # architecture overrides for create_model (dims, depths, n_win, ...)
    arch: dict = field(default_factory=dict)
    # weights to start from: a checkpoint file or URL (this tool's, the release's, .safetensors);
    # a head for other classes starts fresh
    pretrained: str | None = None
    # with pretrained: take this tool's checkpoint's EMA weights instead of its trained ones
    pretrained_ema: bool = False
    # with pretrained: a fresh head even when the checkpoint's has as many classes (new labels)
    new_head: bool = False
    # modules kept fixed, weights and BatchNorm statistics alike, e.g. [stem, stages.0]
    freeze: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    """Where images come from and at which size."""

    backend: Literal["ffcv", "torchvision", "synthetic"] = "ffcv"
    # .beton (ffcv), ImageFolder root or fashion-mnist:<dir> (torchvision)
    train_path: str | None = None
    val_path: str | None = None
    # ffcv only: sources converted into train_path/val_path when those files are missing
    train_source: str | None = None
    val_source: str | None = None
    # options for that conversion (max_resolution, write_mode, ...)
    ffcv_writer: dict = field(default_factory=dict)
    image_size: int = 224
    # None: same as image_size
    val_image_size: int | None = None
    crop_ratio: float = 0.875
    num_workers: int = 8
    # None: taken from the data set
    num_classes: int | None = None
    synthetic_samples: int = 1024
    # detection: COCO annotation files (instances_*.json) of the image folders train_path/val_path
    train_annotations: str | None = None
    val_annotations: str | None = None
    # detection: when set, the offline Fashion-MNIST mosaics are written on first use with these
    # options of `write_mosaics` (out, train_images, val_images, canvas_size, ...)
    mosaics: dict = field(default_factory=dict)
    # segmentation: folders of label PNGs (one per image, same file stem) of train_path/val_path
    train_masks: str | None = None
    val_masks: str | None = None
    # segmentation: the class names, label value k = the k-th name (after reduce_zero_label); a
    # list, or a text file with one name per line
    classes: list[str] | str | None = None
    # segmentation: label 0 is "unlabelled" and ignored, label k is class k-1 (ADE20K)
    reduce_zero_label: bool = False


@dataclass
class DetectionConfig:
    """The detector around the backbone (task: detection): torchvision's Mask R-CNN or
    RetinaNet on an FPN of the backbone's stage maps."""

    detector: Literal["maskrcnn", "retinanet"] = "maskrcnn"
    # FPN width; Mask R-CNN's mask head convolutions use it too
    fpn_channels: int = 256
    # Mask R-CNN's box head: two fully connected layers of this width
    representation_size: int = 1024
    # images are resized (keeping their ratio) so the shorter side is min_size, the longer at
    # most max_size, as the release's 1333x800
    min_size: int = 800
    max_size: int = 1333
    # Mask R-CNN: proposals the RPN keeps per image after NMS (the release's 1000), and of
    # those, how many are sampled per image to train the box head
    rpn_proposals: int = 1000
    rois_per_image: int = 512
    # detections kept per image at evaluation
    detections_per_image: int = 100
    # validation images drawn with their predictions in predictions.png
    preview_images: int = 4


@dataclass
class SegmentationConfig:
    """The head on the backbone (task: segmentation), its training crops and its evaluation;
    the defaults are the release's ADE20K UperNet configs."""

    head: Literal["fpn", "upernet"] = "upernet"
    # Semantic FPN: the FPN's width
    fpn_channels: int = 256
    # the decode head's width: Semantic FPN's per-level convolutions (the release's 128),
    # UperNet's (512)
    channels: int = 512
    # UperNet: the auxiliary FCN head on stage 3, its width and loss weight (0: none)
    aux_channels: int = 256
    aux_weight: float = 0.4
    dropout: float = 0.1
    # label value that no loss or metric counts (padding, "unlabelled")
    ignore_index: int = 255
    # training: rescale into (long, short) = scale * r, r drawn from ratio_range; a crop_size
    # crop with at most cat_max_ratio of it one class; flip; photometric distortion
    scale: list[int] = field(default_factory=lambda: [2048, 512])
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    crop_size: int = 512
    cat_max_ratio: float = 0.75
    # evaluation: each image resized to fit scale * ratio (sides rounded up to size_divisor),
    # inferred whole or in crop_size windows eval_stride apart, with its mirror image too when
    # eval_flip; the class probabilities averaged over all passes
    eval_mode: Literal["whole", "slide"] = "whole"
    eval_stride: int = 341
    eval_ratios: list[float] = field(default_factory=lambda: [1.0])
    eval_flip: bool = False
    size_divisor: int = 32
    # validation images drawn beside their ground truth and prediction in predictions.png
    preview_images: int = 4


@dataclass
class OptimConfig:
    """AdamW; no weight decay on norms, biases and position-bias tables."""

    lr: float = 5e-4
    # lr is for this many images per step, scaled by the global batch (None: not scaled)
    lr_base_batch: int | None = 512
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # max gradient norm (None: no clipping)
    clip_grad: float | None = None
    # layer-wise lr decay: each parameter group below the head scales the lr by this once more
    # (timm's param_groups_layer_decay; None: off)
    layer_decay: float | None = None


@dataclass
class ScheduleConfig:
    """Linear warm-up, then cosine decay to min_lr, poly decay, or step decay at milestones;
    the lr changes every optimizer step. The length is `epochs` or `steps` (set the other to
    null)."""

    epochs: int | None = 300
    # optimizer steps in all, instead of epochs (the last epoch stops part-way)
    steps: int | None = None
    warmup_epochs: float = 20.0
    # warm-up length in optimizer steps, instead of warmup_epochs
    warmup_steps: int | None = None
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    decay: Literal["cosine", "poly", "step"] = "cosine"
    # poly decay: lr = (peak - min_lr) * (1 - step / steps) ** power + min_lr
    power: float = 1.0
    # step decay: when the lr is multiplied by gamma, in epochs (or steps when `steps` is set)
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class AugmentConfig:
    """Training augmentation and target smoothing."""

    hflip: bool = True
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    # timm string, e.g. rand-m9-mstd0.5-inc1
    randaugment: str | None = None
    random_erasing: float = 0.0
    # mixup and cutmix alphas (0: off)
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    # epoch from which mixup/cutmix stop
    mixup_off_epoch: int | None = None
    label_smoothing: float = 0.0


@dataclass
class TrainConfig:
    """How the optimisation runs."""

    # global: over all processes and accumulation steps
    batch_size: int = 2048
    accum_steps: int = 1
    # per process; None: the training batch per process
    eval_batch_size: int | None = None
    # fp32, or autocast to bf16 or fp16 (fp16 only on CUDA)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: bool = False
    compile: bool = False
    # stages (1-4) recomputed in the backward pass
    grad_checkpointing: list[int] = field(default_factory=list)
    ema: bool = False
    ema_decay: float = 0.9998
    ema_warmup: bool = False
    seed: int = 0
    # epochs between evaluations (the last epoch is always evaluated)
    eval_every: int = 1


@dataclass
class OutputConfig:
    """What is written and where."""

    # None: runs/<recipe name>
    dir: str | None = None
    # optimizer steps between metrics.jsonl lines
    log_every: int = 50
    # optimizer steps between checkpoints (0: at epoch ends only)
    checkpoint_every: int = 0
    progress: bool = True
    # also write the metrics.jsonl scalars as TensorBoard events in <run>/tensorboard
    # (needs the tensorboard package: the `tensorboard` extra)
    tensorboard: bool = False


@dataclass
class Recipe:
    """A complete, validated recipe."""

    name: str = "recipe"
    description: str = ""
    task: Literal["classification", "detection", "segmentation"] = "classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


SECTIONS: dict[str, type] = {
    f.name: f.default_factory
    for f in dataclasses.fields(Recipe)
    if f.name not in ("name", "description", "task")
}
TOP_LEVEL_KEYS = ("base", "name", "description", "task", *SECTIONS)
RENAMED_KEYS = {"train.amp": "train.precision (fp32, bf16 or fp16)"}
# what a resumed run cannot change: the model, the data and the batch (`fixed_on_resume`)
FIXED_ON_RESUME = ("task", "model", "data", "detection", "segmentation", "train.batch_size")


def find_recipe(name_or_path: str) -> Path:
    """Resolves a recipe argument: a YAML file (relative to the working directory, `.yaml`
    optional), or the bare name of a shipped recipe (`tiny`)."""
    path = Path(name_or_path).expanduser()
    candidates = [path, Path(f"{path}.yaml")]
    if len(path.parts) == 1 and not path.is_absolute():
        candidates += [RECIPES_DIR / path.name, RECIPES_DIR / f"{path.name}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = ", ".join(name for name, _ in list_recipes())
    raise UserError(f"recipe '{name_or_path}' not found (a YAML file, or one of: {available})")


def list_recipes() -> list[tuple[str, str]]:
    """The shipped recipes as (name, description), by name; names starting with `_` are bases."""
    recipes = []
    for path in sorted(RECIPES_DIR.glob("[!_]*.yaml")):
        description = _read_with_bases(path, seen=()).get("description") or ""
        recipes.append((path.stem, str(description)))
    return recipes


def load_recipe(name_or_path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Loads a recipe file (following `base:`), applies `section.key=value` overrides, validates."""
    path = find_recipe(str(name_or_path))
    raw = _read_with_bases(path, seen=())
    raw.setdefault("name", path.stem)
    for override in overrides:
        _apply_override(raw, override)
    return recipe_from_dict(raw)


def recipe_from_dict(raw: dict) -> Recipe:
    """Builds a validated `Recipe` from plain data (as read from YAML, `base:` already resolved)."""
    raw = {k: v for k, v in raw.items() if k != "base"}
    _check_keys(raw, TOP_LEVEL_KEYS, prefix="")
    values: dict[str, Any] = {}
    for key in ("name", "description"):
        if key in raw:
            values[key] = _convert(raw[key], str, key)
    if "task" in raw:
        values["task"] = _convert(raw["task"], typing.get_type_hints(Recipe)["task"], "task")
    for section, cls in SECTIONS.items():
        content = raw.get(section) or {}
        if not isinstance(content, dict):
            raise UserError(f"{section}: expected a mapping of keys, got {content!r}")
        values[section] = _build_section(cls, content, section)
    recipe = Recipe(**values)
    _check_values(recipe)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain data (every key, defaults included)."""
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML that `load_recipe` reads back into an equal recipe."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def fixed_on_resume(recipe: dict) -> dict[str, Any]:
    """The values of a recipe (as plain data) that a resumed run must keep, by key path; the
    data loader's worker count may change."""
    values: dict[str, Any] = {}
    for key in FIXED_ON_RESUME:
        section, _, name = key.partition(".")
        content = recipe.get(section, {})
        if not isinstance(content, dict):
            values[key] = content
        elif name:
            values[key] = content.get(name)
        else:
            values.update({f"{section}.{k}": v for k, v in content.items() if k != "num_workers"})
    return values


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict:
    """Reads a YAML recipe and deep-merges it over the recipe named by its `base:` key."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(p.name for p in (*seen, path))
        raise UserError(f"recipe {path}: `base:` forms a cycle ({chain})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"recipe {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path}: expected a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise UserError(f"base: expected a recipe path, got {base!r}")
    base_path = next(
        (p for p in (path.parent / base, path.parent / f"{base}.yaml") if p.is_file()), None
    )
    if base_path is None:
        raise UserError(f"base: recipe '{base}' not found next to {path}")
    merged = _read_with_bases(base_path, seen=(*seen, path))
    merged.pop("name", None)
    return _deep_merge(merged, raw)


def _deep_merge(base: dict, update: dict) -> dict:
    """Returns `base` with `update` merged in, recursing into nested mappings."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict, override: str) -> None:
    """Applies one `section.key=value` override (value parsed as YAML) to the raw recipe."""
    key_path, sep, text = override.partition("=")
    if not sep or not key_path.strip():
        raise UserError(f"--set {override!r}: expected section.key=value")
    keys = key_path.strip().split(".")
    if len(keys) < 2 and keys[0] not in ("name", "description"):
        raise UserError(f"--set {override!r}: expected section.key=value, e.g. optim.lr=1e-3")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    _check_override_path(keys)
    target = raw
    for key in keys[:-1]:
        if not isinstance(target.get(key), dict):
            target[key] = {}
        target = target[key]
    target[keys[-1]] = value


def _check_override_path(keys: list[str]) -> None:
    """Rejects an override whose key path does not exist in the schema."""
    _check_keys({keys[0]: None}, TOP_LEVEL_KEYS, prefix="")
    if len(keys) == 1:
        return
    cls = SECTIONS[keys[0]]
    names = [f.name for f in dataclasses.fields(cls)]
    _check_keys({keys[1]: None}, names, prefix=f"{keys[0]}.")
    if len(keys) > 2 and typing.get_type_hints(cls)[keys[1]] is not dict:
        raise UserError(f"unknown key '{'.'.join(keys)}' ({keys[0]}.{keys[1]} has no sub-keys)")


def _check_keys(mapping: dict, allowed: typing.Iterable[str], prefix: str) -> None:
    """Raises for the first key of `mapping` not in `allowed`, suggesting the closest one."""
    allowed = list(allowed)
    for key in mapping:
        if f"{prefix}{key}" in RENAMED_KEYS:
            raise UserError(f"'{prefix}{key}' is now {RENAMED_KEYS[f'{prefix}{key}']}")
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise UserError(f"unknown key '{prefix}{key}'{hint}")


def _build_section(cls: type, content: dict, section: str) -> Any:
    """Validates one section's keys and value types and returns its dataclass."""
    hints = typing.get_type_hints(cls)
    _check_keys(content, hints, prefix=f"{section}.")
    values = {
        key: _convert(value, hints[key], f"{section}.{key}") for key, value in content.items()
    }
    return cls(**values)


def _describe(kind: Any) -> str:
    """A human name for a type annotation."""
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        dict: "a mapping",
    }
    if kind in names:
        return names[kind]
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return f"a list of {_describe(typing.get_args(kind)[0]).split(' ', 1)[1]}s"
    return str(kind)


def _convert(value: Any, kind: Any, key: str) -> Any:
    """Checks `value` against the annotation `kind` (converting numeric strings), or raises."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None:
            return None
        for option in options[:-1]:
            try:
                return _convert(value, option, key)
            except UserError:
                pass
        try:
            return _convert(value, options[-1], key)
        except UserError:
            if len(options) == 1:
                raise
            names = " or ".join(_describe(option) for option in options)
            raise UserError(f"{key}: expected {names}, got {value!r}") from None
    fail = UserError(f"{key}: expected {_describe(kind)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(kind):
            raise fail
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise fail
        return [_convert(v, typing.get_args(kind)[0], key) for v in value]
    if kind is bool:
        if not isinstance(value, bool):
            raise fail
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail
        return value
    if kind is float:
        if isinstance(value, bool):
            raise fail
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise fail from None
    if kind is str:
        if not isinstance(value, str):
            raise fail
        return value
    if kind is dict:
        if not isinstance(value, dict):
            raise fail
        return value
    raise TypeError(f"unsupported annotation {kind!r} for {key}")


def _check_values(recipe: Recipe) -> None:
    """Range checks that types alone cannot express."""
    checks = [
        ("data.image_size", recipe.data.image_size >= 32, "must be at least 32"),
        ("data.num_workers", recipe.data.num_workers >= 0, "must be >= 0"),
        ("data.crop_ratio", 0 < recipe.data.crop_ratio <= 1, "must be in (0, 1]"),
        ("data.synthetic_samples", recipe.data.synthetic_samples > 0, "must be positive"),
        ("optim.lr", recipe.optim.lr > 0, "must be positive"),
        ("optim.weight_decay", recipe.optim.weight_decay >= 0, "must be >= 0"),
        ("optim.betas", len(recipe.optim.betas) == 2, "expected two numbers [beta1, beta2]"),
        ("augment.scale", len(recipe.augment.scale) == 2, "expected two numbers [min, max]"),
        ("augment.ratio", len(recipe.augment.ratio) == 2, "expected two numbers [min, max]"),
        ("augment.label_smoothing", 0 <= recipe.augment.label_smoothing < 1, "must be in [0, 1)"),
        ("augment.random_erasing", 0 <= recipe.augment.random_erasing <= 1, "must be in [0, 1]"),
        *_schedule_checks(recipe.schedule),
        ("detection.fpn_channels", recipe.detection.fpn_channels >= 8, "must be at least 8"),
        (
            "detection.representation_size",
            recipe.detection.representation_size >= 1,
            "must be positive",
        ),
        ("detection.min_size", recipe.detection.min_size >= 32, "must be at least 32"),
        (
            "detection.max_size",
            recipe.detection.max_size >= recipe.detection.min_size,
            "must be at least detection.min_size",
        ),
        ("detection.rois_per_image", recipe.detection.rois_per_image >= 1, "must be positive"),
        ("detection.rpn_proposals", recipe.detection.rpn_proposals >= 1, "must be positive"),
        (
            "detection.detections_per_image",
            recipe.detection.detections_per_image >= 1,
            "must be positive",
        ),
        ("detection.preview_images", recipe.detection.preview_images >= 0, "must be >= 0"),
        *_segmentation_checks(recipe.segmentation),
        ("train.batch_size", recipe.train.batch_size >= 1, "must be at least 1"),
        ("train.accum_steps", recipe.train.accum_steps >= 1, "must be at least 1"),
        ("train.eval_every", recipe.train.eval_every >= 1, "must be at least 1"),
        ("train.ema_decay", 0 < recipe.train.ema_decay < 1, "must be in (0, 1)"),
        (
            "train.grad_checkpointing",
            set(recipe.train.grad_checkpointing) <= {1, 2, 3, 4},
            "expected a list of stages 1-4, e.g. [1, 3]",
        ),
        ("output.log_every", recipe.output.log_every >= 1, "must be at least 1"),
        ("output.checkpoint_every", recipe.output.checkpoint_every >= 0, "must be >= 0"),
    ]
    for key, ok, message in checks:
        if not ok:
            raise UserError(f"{key}: {message}")
    if recipe.optim.clip_grad is not None and recipe.optim.clip_grad <= 0:
        raise UserError("optim.clip_grad: must be positive (or null for no clipping)")
    if recipe.optim.layer_decay is not None and not 0 < recipe.optim.layer_decay <= 1:
        raise UserError("optim.layer_decay: must be in (0, 1] (or null for none)")
    resolve_architecture(
        recipe.model.name, recipe.model.drop_path, recipe.model.arch, prefix="model.arch."
    )


def _schedule_checks(schedule: ScheduleConfig) -> list[tuple[str, bool, str]]:
    """(key, ok, message) range checks of the schedule section."""
    by_steps = schedule.steps is not None
    length = schedule.steps if by_steps else schedule.epochs
    unit = "steps" if by_steps else "epochs"
    return [
        (
            "schedule.steps",
            (schedule.epochs is None) == by_steps,
            "give schedule.epochs or schedule.steps: set the other to null",
        ),
        (f"schedule.{unit}", length is None or length >= 1, "must be at least 1"),
        ("schedule.warmup_epochs", schedule.warmup_epochs >= 0, "must be >= 0"),
        ("schedule.warmup_steps", (schedule.warmup_steps or 0) >= 0, "must be >= 0"),
        ("schedule.power", schedule.power > 0, "must be positive"),
        ("schedule.gamma", 0 < schedule.gamma <= 1, "must be in (0, 1]"),
        (
            "schedule.milestones",
            schedule.decay == "step" or not schedule.milestones,
            "only step decay has milestones: set schedule.decay=step",
        ),
        (
            "schedule.milestones",
            length is None or all(0 < m < length for m in schedule.milestones),
            f"expected {unit} between 0 and schedule.{unit}, e.g. [8, 11]",
        ),
    ]


def _segmentation_checks(segmentation: SegmentationConfig) -> list[tuple[str, bool, str]]:
    """(key, ok, message) range checks of the segmentation section."""
    low, high = (segmentation.ratio_range + [0, 0])[:2]
    return [
        ("segmentation.channels", segmentation.channels >= 1, "must be positive"),
        ("segmentation.fpn_channels", segmentation.fpn_channels >= 8, "must be at least 8"),
        ("segmentation.aux_channels", segmentation.aux_channels >= 1, "must be positive"),
        ("segmentation.aux_weight", segmentation.aux_weight >= 0, "must be >= 0"),
        ("segmentation.dropout", 0 <= segmentation.dropout < 1, "must be in [0, 1)"),
        (
            "segmentation.scale",
            len(segmentation.scale) == 2 and min(segmentation.scale) >= 32,
            "expected two sizes of at least 32, [long, short], e.g. [2048, 512]",
        ),
        (
            "segmentation.ratio_range",
            len(segmentation.ratio_range) == 2 and 0 < low <= high,
            "expected two ratios [min, max], 0 < min <= max, e.g. [0.5, 2.0]",
        ),
        ("segmentation.crop_size", segmentation.crop_size >= 32, "must be at least 32"),
        ("segmentation.cat_max_ratio", 0 < segmentation.cat_max_ratio <= 1, "must be in (0, 1]"),
        (
            "segmentation.eval_stride",
            segmentation.eval_mode == "whole"
            or 0 < segmentation.eval_stride <= segmentation.crop_size,
            "must be in (0, segmentation.crop_size] for sliding-window evaluation",
        ),
        (
            "segmentation.eval_ratios",
            bool(segmentation.eval_ratios) and all(r > 0 for r in segmentation.eval_ratios),
            "expected positive ratios, e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]",
        ),
        ("segmentation.size_divisor", segmentation.size_divisor >= 1, "must be positive"),
        ("segmentation.preview_images", segmentation.preview_images >= 0, "must be >= 0"),
    ]
