"""Training recipes: a YAML schema with defaults, `base:` inheritance, dotted overrides, validation.

A recipe file has the sections below (every key optional, defaults in the dataclasses):

    base: _imagenet          # another recipe (path relative to this file, `.yaml` optional)
    task: classification     # or detection, segmentation
    model:    {name, drop_path, arch, pretrained, freeze, ...}
    data:     the task's data section:
              classification {backend, train_path, val_path, train_source, image_size, ...}
              detection      {train_path, train_annotations, val_path, val_annotations, mosaics, ...}
              segmentation   {train_path, train_masks, val_path, val_masks, classes, ...}
    detection: {detector, fpn_channels, min_size, max_size, ...}   (task: detection only)
    segmentation: {head, channels, crop_size, eval_mode, ...}      (task: segmentation only)
    optim:    {lr, lr_base_batch, weight_decay, betas, eps, clip_grad, layer_decay, ...}
    schedule: {epochs or steps, warmup_epochs or warmup_steps, warmup_lr, min_lr, decay, ...}
    augment:  {hflip, scale, ratio, randaugment, random_erasing, mixup, cutmix, label_smoothing}
    train:    {batch_size, accum_steps, precision, device, channels_last, compile, ema, ...}
    output:   {dir, log_every, checkpoint_every, progress, tensorboard, trackers, wandb_project,
               mlflow_uri}

A field's range check stands beside it (`checked(default, Rule)`), as does the function whose
options a mapping holds (`options_of`: `data.mosaics` holds `write_mosaics`' options, checked by
its parameters' types and its own checks); checks between fields of one section are its `check`
method. Any mistake (unknown key, a key of another task, wrong type, out-of-range value) raises
`UserError` naming the key path; a recipe file must be UTF-8 YAML of sane size (`_load_yaml`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.resources
import inspect
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from debiformer.data.mosaics import check_mosaics_options, write_mosaics
from debiformer.errors import UserError, quoted
from debiformer.model import resolve_architecture

# The shipped recipes: the package `debiformer.recipes` (the top-level recipes/ folder of a clone).
RECIPES_DIR = Path(str(importlib.resources.files("debiformer.recipes")))
# What a recipe file (or a `--set` value) may hold: levels of mappings and lists, and values once
# its aliases (`*name`) are expanded; a YAML alias bomb expands to billions
MAX_NESTING = 16
MAX_VALUES = 100_000


class Rule(NamedTuple):
    """A range check of one value: `ok(value)` holds, else the error says `message`."""

    ok: Callable[[Any], bool]
    message: str


POSITIVE = Rule(lambda v: v > 0, "must be positive")
NOT_NEGATIVE = Rule(lambda v: v >= 0, "must be >= 0")


def at_least(low: int) -> Rule:
    """The value is `low` or more."""
    return Rule(lambda v: v >= low, f"must be at least {low}")


def pair(example: str) -> Rule:
    """The value is a list of two numbers."""
    return Rule(lambda v: len(v) == 2, f"expected two numbers {example}")


def checked(default: Any, rule: Rule) -> Any:
    """A dataclass field whose value, when not null, must pass `rule` (a list default is copied
    for each instance)."""
    metadata = {"rule": rule}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def options_of(function: Callable, check: Callable[[dict], None]) -> Any:
    """A mapping field of options for `function`: {} (the default) for none, else each key one
    of its parameters, each parameter without a default given, each value of its parameter's
    type, and `check(options)` passing (its errors' parameters read as keys of this field)."""
    return field(default_factory=dict, metadata={"options_of": (function, check)})


class Section:
    """A recipe section: a dataclass whose fields may carry a `Rule` (see `checked`)."""

    def check(self) -> None:
        """Checks between this section's fields; raises `UserError` naming the key."""


def _require(ok: bool, key: str, message: str) -> None:
    """Raises `UserError` "key: message" unless `ok`."""
    if not ok:
        raise UserError(f"{key}: {message}")


@dataclass
class ModelConfig(Section):
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

    def check(self) -> None:
        """The variant exists and the architecture overrides fit it."""
        resolve_architecture(self.name, self.drop_path, self.arch, prefix="model.arch.")


@dataclass
class ClassificationDataConfig(Section):
    """Where a classifier's images come from and at which size (task: classification)."""

    backend: Literal["ffcv", "torchvision", "synthetic"] = "ffcv"
    # .beton (ffcv), ImageFolder root or fashion-mnist:<dir> (torchvision)
    train_path: str | None = None
    val_path: str | None = None
    # ffcv only: sources converted into train_path/val_path when those files are missing
    train_source: str | None = None
    val_source: str | None = None
    # options for that conversion (max_resolution, write_mode, ...)
    ffcv_writer: dict = field(default_factory=dict)
    image_size: int = checked(224, at_least(32))
    # None: same as image_size
    val_image_size: int | None = None
    crop_ratio: float = checked(0.875, Rule(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    num_workers: int = checked(8, NOT_NEGATIVE)
    # None: taken from the data set
    num_classes: int | None = None
    synthetic_samples: int = checked(1024, POSITIVE)


@dataclass
class CocoDataConfig(Section):
    """A detector's images and COCO annotation files (task: detection)."""

    # image folders
    train_path: str | None = None
    val_path: str | None = None
    # the COCO annotation files (instances_*.json) of those folders
    train_annotations: str | None = None
    val_annotations: str | None = None
    # when set, the offline Fashion-MNIST mosaics are written on first use with these options of
    # `write_mosaics` (out, train_images, val_images, canvas_size, ...)
    mosaics: dict = options_of(write_mosaics, check_mosaics_options)
    num_workers: int = checked(8, NOT_NEGATIVE)
    # images above this many pixels stop the run (PIL's default limit, 89_478_485, as
    # debiformer.data.images.MAX_IMAGE_PIXELS); raise it for very large images
    max_image_pixels: int = checked(89_478_485, POSITIVE)


@dataclass
class MaskDataConfig(Section):
    """A segmenter's images and label masks (task: segmentation)."""

    # image folders
    train_path: str | None = None
    val_path: str | None = None
    # folders of label PNGs (one per image, same file stem) of those folders
    train_masks: str | None = None
    val_masks: str | None = None
    # the class names, label value k = the k-th name (after reduce_zero_label); a list, or a text
    # file with one name per line
    classes: list[str] | str | None = None
    # label 0 is "unlabelled" and ignored, label k is class k-1 (ADE20K)
    reduce_zero_label: bool = False
    # when set, the offline Fashion-MNIST mosaics are written on first use with these options of
    # `write_mosaics` (out, train_images, val_images, canvas_size, ...)
    mosaics: dict = options_of(write_mosaics, check_mosaics_options)
    num_workers: int = checked(8, NOT_NEGATIVE)
    # images above this many pixels stop the run (PIL's default limit, 89_478_485, as
    # debiformer.data.images.MAX_IMAGE_PIXELS); raise it for very large images
    max_image_pixels: int = checked(89_478_485, POSITIVE)


DataConfig = ClassificationDataConfig | CocoDataConfig | MaskDataConfig


@dataclass
class DetectionConfig(Section):
    """The detector around the backbone (task: detection): torchvision's Mask R-CNN or
    RetinaNet on an FPN of the backbone's stage maps."""

    detector: Literal["maskrcnn", "retinanet"] = "maskrcnn"
    # FPN width; Mask R-CNN's mask head convolutions use it too
    fpn_channels: int = checked(256, at_least(8))
    # Mask R-CNN's box head: two fully connected layers of this width
    representation_size: int = checked(1024, POSITIVE)
    # images are resized (keeping their ratio) so the shorter side is min_size, the longer at
    # most max_size, as the release's 1333x800
    min_size: int = checked(800, at_least(32))
    max_size: int = 1333
    # Mask R-CNN: proposals the RPN keeps per image after NMS (the release's 1000), and of
    # those, how many are sampled per image to train the box head
    rpn_proposals: int = checked(1000, POSITIVE)
    rois_per_image: int = checked(512, POSITIVE)
    # detections kept per image at evaluation
    detections_per_image: int = checked(100, POSITIVE)
    # validation images drawn with their predictions in predictions.png
    preview_images: int = checked(4, NOT_NEGATIVE)

    def check(self) -> None:
        """The longer side's limit is not below the shorter side's size."""
        _require(
            self.max_size >= self.min_size,
            "detection.max_size",
            "must be at least detection.min_size",
        )


@dataclass
class SegmentationConfig(Section):
    """The head on the backbone (task: segmentation), its training crops and its evaluation;
    the defaults are the release's ADE20K UperNet configs."""

    head: Literal["fpn", "upernet"] = "upernet"
    # Semantic FPN: the FPN's width
    fpn_channels: int = checked(256, at_least(8))
    # the decode head's width: Semantic FPN's per-level convolutions (the release's 128),
    # UperNet's (512)
    channels: int = checked(512, POSITIVE)
    # UperNet: the auxiliary FCN head on stage 3, its width and loss weight (0: none)
    aux_channels: int = checked(256, POSITIVE)
    aux_weight: float = checked(0.4, NOT_NEGATIVE)
    dropout: float = checked(0.1, Rule(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    # label value that no loss or metric counts (padding, "unlabelled")
    ignore_index: int = 255
    # training: rescale into (long, short) = scale * r, r drawn from ratio_range; a crop_size
    # crop with at most cat_max_ratio of it one class; flip; photometric distortion
    scale: list[int] = checked(
        [2048, 512],
        Rule(
            lambda v: len(v) == 2 and min(v) >= 32,
            "expected two sizes of at least 32, [long, short], e.g. [2048, 512]",
        ),
    )
    ratio_range: list[float] = checked(
        [0.5, 2.0],
        Rule(
            lambda v: len(v) == 2 and 0 < v[0] <= v[1],
            "expected two ratios [min, max], 0 < min <= max, e.g. [0.5, 2.0]",
        ),
    )
    crop_size: int = checked(512, at_least(32))
    cat_max_ratio: float = checked(0.75, Rule(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    # evaluation: each image resized to fit scale * ratio (sides rounded up to size_divisor),
    # inferred whole or in crop_size windows eval_stride apart, with its mirror image too when
    # eval_flip; the class probabilities averaged over all passes
    eval_mode: Literal["whole", "slide"] = "whole"
    eval_stride: int = 341
    eval_ratios: list[float] = checked(
        [1.0],
        Rule(
            lambda v: bool(v) and all(r > 0 for r in v),
            "expected positive ratios, e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]",
        ),
    )
    eval_flip: bool = False
    size_divisor: int = checked(32, POSITIVE)
    # validation images drawn beside their ground truth and prediction in predictions.png
    preview_images: int = checked(4, NOT_NEGATIVE)

    def check(self) -> None:
        """Sliding windows overlap or touch: the stride is at most the window."""
        _require(
            self.eval_mode == "whole" or 0 < self.eval_stride <= self.crop_size,
            "segmentation.eval_stride",
            "must be in (0, segmentation.crop_size] for sliding-window evaluation",
        )


@dataclass
class OptimConfig(Section):
    """AdamW; no weight decay on norms, biases and position-bias tables."""

    lr: float = checked(5e-4, POSITIVE)
    # lr is for this many images per step, scaled by the global batch (None: not scaled)
    lr_base_batch: int | None = 512
    weight_decay: float = checked(0.05, NOT_NEGATIVE)
    betas: list[float] = checked([0.9, 0.999], pair("[beta1, beta2]"))
    eps: float = 1e-8
    # max gradient norm (None: no clipping)
    clip_grad: float | None = checked(
        None, Rule(lambda v: v > 0, "must be positive (or null for no clipping)")
    )
    # layer-wise lr decay: each parameter group below the head scales the lr by this once more
    # (timm's param_groups_layer_decay; None: off)
    layer_decay: float | None = checked(
        None, Rule(lambda v: 0 < v <= 1, "must be in (0, 1] (or null for none)")
    )
    # with model.pretrained, the backbone it starts (a detector's or segmenter's DeBiFormer, a
    # classifier's all but its head) learns at this times the lr, the rest at the lr; no effect
    # without model.pretrained
    pretrained_lr_scale: float = checked(1.0, Rule(lambda v: 0 < v <= 1, "must be in (0, 1]"))

    def check(self) -> None:
        """One way of scaling the lr by layer: layer decay or the pretrained backbone's scale."""
        if self.layer_decay is not None and self.pretrained_lr_scale != 1:
            raise UserError(
                "optim.pretrained_lr_scale: set it to 1 with optim.layer_decay, or set "
                "optim.layer_decay to null"
            )


@dataclass
class ScheduleConfig(Section):
    """Linear warm-up, then cosine decay to min_lr, poly decay, or step decay at milestones;
    the lr changes every optimizer step. The length is `epochs` or `steps` (set the other to
    null)."""

    epochs: int | None = checked(300, at_least(1))
    # optimizer steps in all, instead of epochs (the last epoch stops part-way)
    steps: int | None = checked(None, at_least(1))
    warmup_epochs: float = checked(20.0, NOT_NEGATIVE)
    # warm-up length in optimizer steps, instead of warmup_epochs
    warmup_steps: int | None = checked(None, NOT_NEGATIVE)
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    decay: Literal["cosine", "poly", "step"] = "cosine"
    # poly decay: lr = (peak - min_lr) * (1 - step / steps) ** power + min_lr
    power: float = checked(1.0, POSITIVE)
    # step decay: when the lr is multiplied by gamma, in epochs (or steps when `steps` is set)
    milestones: list[float] = field(default_factory=list)
    gamma: float = checked(0.1, Rule(lambda v: 0 < v <= 1, "must be in (0, 1]"))

    def check(self) -> None:
        """One length (epochs or steps); milestones only for step decay, inside that length."""
        by_steps = self.steps is not None
        _require(
            (self.epochs is None) == by_steps,
            "schedule.steps",
            "give schedule.epochs or schedule.steps: set the other to null",
        )
        _require(
            self.decay == "step" or not self.milestones,
            "schedule.milestones",
            "only step decay has milestones: set schedule.decay=step",
        )
        length, unit = (self.steps, "steps") if by_steps else (self.epochs, "epochs")
        _require(
            all(0 < m < length for m in self.milestones),
            "schedule.milestones",
            f"expected {unit} between 0 and schedule.{unit}, e.g. [8, 11]",
        )


@dataclass
class AugmentConfig(Section):
    """Training augmentation and target smoothing."""

    hflip: bool = True
    scale: list[float] = checked([0.08, 1.0], pair("[min, max]"))
    ratio: list[float] = checked([0.75, 1.3333333], pair("[min, max]"))
    # timm string, e.g. rand-m9-mstd0.5-inc1
    randaugment: str | None = None
    random_erasing: float = checked(0.0, Rule(lambda v: 0 <= v <= 1, "must be in [0, 1]"))
    # mixup and cutmix alphas (0: off)
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    # epoch from which mixup/cutmix stop
    mixup_off_epoch: int | None = None
    label_smoothing: float = checked(0.0, Rule(lambda v: 0 <= v < 1, "must be in [0, 1)"))


@dataclass
class TrainConfig(Section):
    """How the optimisation runs."""

    # global: over all processes and accumulation steps
    batch_size: int = checked(2048, at_least(1))
    accum_steps: int = checked(1, at_least(1))
    # per process; None: the training batch per process
    eval_batch_size: int | None = None
    # fp32, or autocast to bf16 or fp16 (fp16 only on CUDA); auto: bf16 where the hardware
    # multiplies bf16 natively (a CPU with AMX, a recent GPU), else fp32
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: bool = False
    compile: bool = False
    # stages (1-4) recomputed in the backward pass
    grad_checkpointing: list[int] = checked(
        [], Rule(lambda v: set(v) <= {1, 2, 3, 4}, "expected a list of stages 1-4, e.g. [1, 3]")
    )
    ema: bool = False
    ema_decay: float = checked(0.9998, Rule(lambda v: 0 < v < 1, "must be in (0, 1)"))
    ema_warmup: bool = False
    # numpy's generators take no negative seed, its legacy one none from 2**32 (torch's 2**64)
    seed: int = checked(0, Rule(lambda v: 0 <= v < 2**32, "must be in [0, 2**32)"))
    # epochs between evaluations (the last epoch is always evaluated)
    eval_every: int = checked(1, at_least(1))


@dataclass
class OutputConfig(Section):
    """What is written and where."""

    # None: runs/<recipe name>
    dir: str | None = None
    # optimizer steps between metrics.jsonl lines
    log_every: int = checked(50, at_least(1))
    # optimizer steps between checkpoints (0: at epoch ends only)
    checkpoint_every: int = checked(0, NOT_NEGATIVE)
    progress: bool = True
    # also write the metrics.jsonl scalars as TensorBoard events in <run>/tensorboard
    # (needs the tensorboard package: the `tensorboard` extra); the same as trackers: [tensorboard]
    tensorboard: bool = False
    # experiment trackers fed the recipe, the metrics and the summary: tensorboard, wandb, mlflow
    # (the extras of those names; see debiformer/engine/trackers.py)
    trackers: list[str] = field(default_factory=list)
    # wandb: the project (None: the recipe's name); offline runs with WANDB_MODE=offline
    wandb_project: str | None = None
    # mlflow: the tracking URI (None: $MLFLOW_TRACKING_URI, else sqlite:///<run>/mlflow.db)
    mlflow_uri: str | None = None

    def check(self) -> None:
        """Every tracker is one this tool feeds."""
        from debiformer.engine.trackers import TRACKERS

        for name in self.trackers:
            _require(
                name in TRACKERS,
                "output.trackers",
                f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)}",
            )


@dataclass
class Recipe:
    """A complete, validated recipe; `data` is the task's data section, and `detection` and
    `segmentation` are set only in recipes of that task."""

    name: str = "recipe"
    description: str = ""
    task: Literal["classification", "detection", "segmentation"] = "classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=ClassificationDataConfig)
    detection: DetectionConfig | None = None
    segmentation: SegmentationConfig | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# each task's data section, and the sections only one task's recipes have (named as the task)
DATA_SECTIONS: dict[str, type] = {
    "classification": ClassificationDataConfig,
    "detection": CocoDataConfig,
    "segmentation": MaskDataConfig,
}
TASK_SECTIONS: dict[str, type] = {"detection": DetectionConfig, "segmentation": SegmentationConfig}
TOP_LEVEL_KEYS = ("base", *(f.name for f in dataclasses.fields(Recipe)))
# the top-level keys that hold a value, not a section
TOP_LEVEL_VALUES = ("name", "description", "task")
TASK_NAMES = typing.get_args(typing.get_type_hints(Recipe)["task"])
RENAMED_KEYS = {"train.amp": "train.precision (fp32, bf16 or fp16)"}
# what a resumed run cannot change: the model, the data and the batch (`fixed_on_resume`)
FIXED_ON_RESUME = ("task", "model", "data", "detection", "segmentation", "train.batch_size")


def recipe_sections(task: str) -> dict[str, type]:
    """The sections of a recipe of `task` and their dataclasses, in the order of `Recipe`."""
    sections = {}
    for f in dataclasses.fields(Recipe):
        if f.name == "data":
            sections["data"] = DATA_SECTIONS[task]
        elif f.name == task:
            sections[f.name] = TASK_SECTIONS[task]
        elif f.name not in (*TOP_LEVEL_VALUES, *TASK_SECTIONS):
            sections[f.name] = f.default_factory
    return sections


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
    raise UserError(
        f"recipe {quoted(name_or_path)} not found (a YAML file, or one of: {available})"
    )


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
    """Builds a validated `Recipe` from plain data (as read from YAML, `base:` already resolved);
    the task (default classification) decides which data keys and sections it may have."""
    raw = {k: v for k, v in raw.items() if k != "base"}
    _check_keys(raw, TOP_LEVEL_KEYS, prefix="")
    values: dict[str, Any] = {}
    for key in ("name", "description"):
        if key in raw:
            values[key] = _convert(raw[key], str, key)
    task = _task(raw.get("task", "classification"))
    values["task"] = task
    for section in TASK_SECTIONS:
        if section != task and raw.get(section) is not None:
            raise UserError(_belongs_to(section, [section], task))
    for section, cls in recipe_sections(task).items():
        content = raw.get(section) or {}
        if not isinstance(content, dict):
            raise UserError(f"{section}: expected a mapping of keys, got {quoted(content)}")
        if section == "data":
            _check_data_keys(content, task)
        values[section] = _build_section(cls, content, section)
    return Recipe(**values)


def recipe_from_stored(stored: dict, overrides: typing.Sequence[str] = ()) -> Recipe:
    """The recipe a training checkpoint stored (`recipe_to_dict`), with `section.key=value`
    overrides applied. Checkpoints of earlier versions stored every task's data keys and
    sections; those of other tasks are dropped."""
    task = stored.get("task", "classification")
    own = copy.deepcopy({k: v for k, v in stored.items() if k not in TASK_SECTIONS or k == task})
    if task in DATA_SECTIONS and isinstance(own.get("data"), dict):
        names = _field_names(DATA_SECTIONS[task])
        own["data"] = {k: v for k, v in own["data"].items() if k in names}
    for override in overrides:
        _apply_override(own, override)
    return recipe_from_dict(own)


def task_recipe(path: str | None, stored: dict | None, task: str, *, of: str) -> Recipe:
    """The recipe at `path`, else the one a checkpoint stores (`stored`), which must be a `task`
    recipe: a model of that task runs by its recipe's settings. `of` names the checkpoint in the
    one-line error when there is no such recipe."""
    recipe = load_recipe(path) if path is not None else None
    if recipe is None and stored is not None:
        recipe = recipe_from_stored(stored)
    if recipe is None or recipe.task != task:
        raise UserError(
            f"{of}: a {task} model needs its recipe's {task} settings; give the recipe it was "
            "trained with"
        )
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain data: every key of its task's sections, defaults included."""
    return {k: v for k, v in dataclasses.asdict(recipe).items() if v is not None}


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML that `load_recipe` reads back into an equal recipe."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


# the data keys a resumed run may change: they change how the data is read, not what it is
RESUMABLE_DATA_KEYS = ("num_workers", "max_image_pixels")


def fixed_on_resume(recipe: dict) -> dict[str, Any]:
    """The values of a recipe (as plain data) that a resumed run must keep, by key path; the
    data loader's worker count and the image pixel limit may change. Compare the current
    recipe's keys only: a stored recipe may have more (earlier versions stored every task's
    keys)."""
    values: dict[str, Any] = {}
    for key in FIXED_ON_RESUME:
        section, _, name = key.partition(".")
        content = recipe.get(section)
        if content is None:
            continue
        if not isinstance(content, dict):
            values[key] = content
        elif name:
            values[key] = content.get(name)
        else:
            values.update(
                {f"{section}.{k}": v for k, v in content.items() if k not in RESUMABLE_DATA_KEYS}
            )
    return values


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict:
    """Reads a YAML recipe and deep-merges it over the recipe named by its `base:` key."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(p.name for p in (*seen, path))
        raise UserError(f"recipe {path}: `base:` forms a cycle ({chain})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"recipe {path} is not UTF-8 text (byte {error.start}): save it as UTF-8"
        ) from None
    try:
        raw = _load_yaml(text, f"recipe {path}") or {}
    except yaml.YAMLError as error:
        raise UserError(f"recipe {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path}: expected a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise UserError(f"base: expected a recipe path, got {quoted(base)}")
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


def _load_yaml(text: str, source: str) -> Any:
    """The data of the YAML `text`, checked by `_check_size`; invalid YAML raises
    `yaml.YAMLError`."""
    try:
        data = yaml.safe_load(text)
    except RecursionError:  # the parser recurses once per level
        raise UserError(_too_deep(source)) from None
    _check_size(data, source)
    return data


def _check_size(data: Any, source: str) -> None:
    """A `UserError` starting with `source` when `data` nests more than `MAX_NESTING` levels or
    holds more than `MAX_VALUES` values once aliases are expanded (an alias bomb, an alias inside
    itself); counting stops at the limits."""
    values, pending = 0, [(data, 0)]
    while pending:
        value, depth = pending.pop()
        values += 1
        if values > MAX_VALUES:
            raise UserError(f"{source}: more than {MAX_VALUES} values (aliases, *name, expanded)")
        if depth > MAX_NESTING:
            raise UserError(_too_deep(source))
        if isinstance(value, dict):
            pending += [(item, depth + 1) for item in value.values()]
        elif isinstance(value, list):
            pending += [(item, depth + 1) for item in value]


def _too_deep(source: str) -> str:
    """The error for YAML nested too deeply."""
    return f"{source}: nested more than {MAX_NESTING} levels of mappings and lists"


def _apply_override(raw: dict, override: str) -> None:
    """Applies one `section.key=value` (or `task=...`, `name=...`, `description=...`) override,
    the value parsed as YAML, to the raw recipe."""
    key_path, sep, text = override.partition("=")
    if not sep or not key_path.strip():
        raise UserError(f"{quoted(override)}: expected section.key=value", about="overrides")
    keys = key_path.strip().split(".")
    if len(keys) < 2 and keys[0] not in TOP_LEVEL_VALUES:
        raise UserError(
            f"{quoted(override)}: expected section.key=value, e.g. optim.lr=1e-3",
            about="overrides",
        )
    try:
        value = _load_yaml(text, key_path.strip()) if text.strip() else None
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
    """Rejects an override whose key path exists in no task's schema (whether it fits this
    recipe's task is checked with the whole recipe)."""
    _check_keys({keys[0]: None}, TOP_LEVEL_KEYS, prefix="")
    if len(keys) == 1:
        return
    sections = {**recipe_sections("classification"), **TASK_SECTIONS}
    if keys[0] not in sections:
        raise UserError(f"unknown key {quoted('.'.join(keys))} ({keys[0]} has no sub-keys)")
    classes = DATA_SECTIONS.values() if keys[0] == "data" else [sections[keys[0]]]
    hints = {k: v for cls in classes for k, v in typing.get_type_hints(cls).items()}
    _check_keys({keys[1]: None}, hints, prefix=f"{keys[0]}.")
    if len(keys) == 2:
        return
    key = ".".join(keys[:2])
    if hints[keys[1]] is not dict:
        raise UserError(f"unknown key {quoted('.'.join(keys))} ({key} has no sub-keys)")
    fields = {f.name: f for cls in classes for f in dataclasses.fields(cls)}
    options_of = fields[keys[1]].metadata.get("options_of")
    if options_of is not None:
        _check_keys({keys[2]: None}, inspect.signature(options_of[0]).parameters, f"{key}.")
        if len(keys) > 3:
            raise UserError(f"unknown key {quoted('.'.join(keys))} ({key}.{keys[2]} is a value)")


def _check_keys(mapping: dict, allowed: typing.Iterable[str], prefix: str) -> None:
    """Raises for the first key of `mapping` not in `allowed`, suggesting the closest one."""
    allowed = list(allowed)
    for key in mapping:
        if f"{prefix}{key}" in RENAMED_KEYS:
            raise UserError(f"'{prefix}{key}' is now {RENAMED_KEYS[f'{prefix}{key}']}")
        if key not in allowed:
            raise UserError(
                f"unknown key {quoted(f'{prefix}{key}')}{_did_you_mean(key, allowed, prefix)}"
            )


def _did_you_mean(given: Any, allowed: typing.Iterable[str], prefix: str = "") -> str:
    """The hint naming the allowed name closest to `given` (after `prefix`), or "" if none is."""
    close = difflib.get_close_matches(str(given), list(allowed), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _task(given: Any) -> str:
    """The recipe's `task`, one of `TASK_NAMES`."""
    if given not in TASK_NAMES:
        hint = _did_you_mean(given, TASK_NAMES) or f" (choose {', '.join(TASK_NAMES)})"
        raise UserError(f"unknown task {quoted(given)}{hint}")
    return given


def _check_data_keys(content: dict, task: str) -> None:
    """Raises for the first data key that belongs to other tasks' data sections only."""
    own = _field_names(DATA_SECTIONS[task])
    for key in content:
        owners = [t for t, cls in DATA_SECTIONS.items() if key in _field_names(cls)]
        if key not in own and owners:
            raise UserError(_belongs_to(f"data.{key}", owners, task))


def _belongs_to(key: str, tasks: list[str], task: str) -> str:
    """The error for `key`, which only recipes of `tasks` have, in a recipe of `task`."""
    return (
        f"{key} belongs to {' and '.join(tasks)} recipes (task: {' or '.join(tasks)}); "
        f"this recipe's task is {task}"
    )


def _field_names(cls: type) -> list[str]:
    """The keys of a section."""
    return [f.name for f in dataclasses.fields(cls)]


def _build_section(cls: type, content: dict, section: str) -> Any:
    """Validates one section's keys, value types and ranges and returns its dataclass."""
    hints = typing.get_type_hints(cls)
    _check_keys(content, hints, prefix=f"{section}.")
    values = {
        key: _convert(value, hints[key], f"{section}.{key}") for key, value in content.items()
    }
    built = cls(**values)
    for f in dataclasses.fields(built):
        rule, value = f.metadata.get("rule"), getattr(built, f.name)
        if rule is not None and value is not None and not rule.ok(value):
            raise UserError(f"{section}.{f.name}: {rule.message}, got {quoted(value)}")
        if "options_of" in f.metadata and value:
            options = _checked_options(value, *f.metadata["options_of"], f"{section}.{f.name}")
            setattr(built, f.name, options)
    built.check()
    return built


def _checked_options(
    options: dict, function: Callable, check: Callable[[dict], None], key: str
) -> dict:
    """The options of an `options_of(function, check)` field at `key`, each value converted to
    its parameter's type; raises naming `key.<option>`."""
    parameters = inspect.signature(function).parameters
    hints = typing.get_type_hints(function)
    _check_keys(options, parameters, prefix=f"{key}.")
    for name, parameter in parameters.items():
        if parameter.default is parameter.empty and name not in options:
            raise UserError(f"{key}.{name}: missing (needed when {key} is set)")
    converted = {
        name: _convert(value, hints[name], f"{key}.{name}") for name, value in options.items()
    }
    try:
        check(converted)
    except UserError as error:
        raise UserError(error.render({name: f"{key}.{name}" for name in parameters})) from None
    return converted


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
    if typing.get_origin(kind) is tuple:
        kinds = typing.get_args(kind)
        return f"a list of {len(kinds)} {_describe(kinds[0]).split(' ', 1)[1]}s"
    return str(kind)


def _convert(value: Any, kind: Any, key: str) -> Any:
    """Checks `value` against the annotation `kind` (converting numeric strings), or raises."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        # a path (str | os.PathLike) is a string in a recipe
        options = [k for k in typing.get_args(kind) if k not in (type(None), os.PathLike)]
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
            raise UserError(f"{key}: expected {names}, got {quoted(value)}") from None
    fail = UserError(f"{key}: expected {_describe(kind)}, got {quoted(value)}")
    if origin is Literal:
        if value not in typing.get_args(kind):
            raise fail
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise fail
        return [_convert(v, typing.get_args(kind)[0], key) for v in value]
    if origin is tuple:
        kinds = typing.get_args(kind)
        if not isinstance(value, (list, tuple)) or len(value) != len(kinds):
            raise fail
        return [_convert(v, k, key) for v, k in zip(value, kinds, strict=True)]
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
