"""Recipes: defaults, `base:` inheritance, overrides, one data section per task, and one-line
validation errors."""

import dataclasses

import pytest
import yaml

from debiformer.errors import UserError
from debiformer.recipe import (
    RECIPES_DIR,
    ClassificationDataConfig,
    CocoDataConfig,
    DetectionConfig,
    MaskDataConfig,
    SegmentationConfig,
    fixed_on_resume,
    load_recipe,
    recipe_from_dict,
    recipe_from_stored,
    recipe_to_dict,
    recipe_to_yaml,
)
from tests.helpers.recipes import write_recipe


def test_defaults_fill_missing_keys(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", {"optim": {"lr": 0.01}}))
    assert recipe.name == "r"
    assert recipe.optim.lr == 0.01
    assert recipe.optim.betas == [0.9, 0.999]
    assert recipe.train.precision == "fp32"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"optim": {"lrr": 1.0}}, "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ({"optimizer": {"lr": 1.0}}, "unknown key 'optimizer' (did you mean 'optim'?)"),
        ({"optim": {"lr": "abc"}}, "optim.lr: expected a number, got 'abc'"),
        ({"train": {"batch_size": 1.5}}, "train.batch_size: expected an integer, got 1.5"),
        ({"train": {"ema": "yes"}}, "train.ema: expected true or false, got 'yes'"),
        (
            {"train": {"precision": "off"}},
            "train.precision: expected one of 'fp32', 'bf16', 'fp16', 'auto', got 'off'",
        ),
        ({"augment": {"scale": 0.5}}, "augment.scale: expected a list of numbers, got 0.5"),
        ({"augment": {"scale": [0.5]}}, "augment.scale: expected two numbers"),
        ({"data": {"image_size": 16}}, "data.image_size: must be at least 32"),
        ({"train": {"grad_checkpointing": [0, 3]}}, "train.grad_checkpointing: expected a list"),
        ({"optim": 3}, "optim: expected a mapping of keys, got 3"),
    ],
)
def test_invalid_values_name_the_key(tmp_path, data, message):
    with pytest.raises(UserError) as error:
        load_recipe(write_recipe(tmp_path / "r.yaml", data))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_numeric_strings_are_numbers(tmp_path):
    """PyYAML reads `5e-4` (no dot) as a string; number fields accept it."""
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lr: 5e-4\n")
    assert load_recipe(path).optim.lr == 5e-4


def test_base_inheritance_deep_merges(tmp_path):
    write_recipe(
        tmp_path / "parent.yaml", {"optim": {"lr": 0.1, "weight_decay": 0.2}, "train": {"seed": 7}}
    )
    child = write_recipe(tmp_path / "child.yaml", {"base": "parent", "optim": {"lr": 0.3}})
    recipe = load_recipe(child)
    assert (recipe.optim.lr, recipe.optim.weight_decay, recipe.train.seed) == (0.3, 0.2, 7)
    assert recipe.name == "child"


def test_base_cycle_and_missing_base_are_errors(tmp_path):
    write_recipe(tmp_path / "a.yaml", {"base": "b"})
    write_recipe(tmp_path / "b.yaml", {"base": "a"})
    with pytest.raises(UserError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(UserError, match="base: recipe 'nowhere' not found"):
        load_recipe(write_recipe(tmp_path / "c.yaml", {"base": "nowhere"}))


def test_overrides_parse_yaml_values_and_validate(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {})
    recipe = load_recipe(
        path,
        [
            "optim.lr=1e-3",
            "train.ema=true",
            "augment.scale=[0.5, 1.0]",
            "model.arch.depths=[1,1,1,1]",
            "optim.clip_grad=null",
        ],  # fmt: skip
    )
    assert recipe.optim.lr == 1e-3
    assert recipe.train.ema is True
    assert recipe.augment.scale == [0.5, 1.0]
    assert recipe.model.arch == {"depths": [1, 1, 1, 1]}
    assert recipe.optim.clip_grad is None
    with pytest.raises(UserError, match=r"unknown key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_recipe(path, ["optim.lrr=1"])
    with pytest.raises(UserError, match="optim.lr: expected a number, got 'abc'"):
        load_recipe(path, ["optim.lr=abc"])
    with pytest.raises(UserError, match="expected section.key=value"):
        load_recipe(path, ["optim.lr"])


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(UserError, match="quickstart"):
        load_recipe("no-such-recipe")


@pytest.mark.parametrize("name", ["quickstart", "tiny", "small", "base"])
def test_shipped_recipes_load(name):
    recipe = load_recipe(name)
    assert recipe.model.name.startswith("debiformer_")


def test_imagenet_recipes_carry_the_release_hyperparameters():
    drop_paths = {}
    for name in ("tiny", "small", "base"):
        recipe = load_recipe(name)
        drop_paths[name] = recipe.model.drop_path
        assert (
            recipe.optim.lr * recipe.train.batch_size / recipe.optim.lr_base_batch
            == pytest.approx(2e-3)
        )
        assert (recipe.optim.weight_decay, recipe.optim.clip_grad) == (0.1, 5.0)
        assert (recipe.schedule.epochs, recipe.schedule.warmup_epochs) == (300, 20)
        assert recipe.augment.randaugment == "rand-m9-mstd0.5-inc1"
        assert (recipe.augment.mixup, recipe.augment.cutmix) == (0.8, 1.0)
        assert (recipe.augment.random_erasing, recipe.augment.label_smoothing) == (0.25, 0.1)
    assert drop_paths == {"tiny": 0.0, "small": 0.3, "base": 0.4}


def test_saved_recipe_reloads_identically(tmp_path):
    recipe = load_recipe(RECIPES_DIR / "quickstart.yaml", ["optim.lr=0.005"])
    (tmp_path / "saved.yaml").write_text(recipe_to_yaml(recipe))
    assert recipe_from_dict(yaml.safe_load((tmp_path / "saved.yaml").read_text())) == recipe
    assert load_recipe(tmp_path / "saved.yaml").optim.lr == 0.005


def test_the_old_amp_key_says_what_replaced_it(tmp_path):
    with pytest.raises(UserError, match=r"'train.amp' is now train.precision"):
        load_recipe(write_recipe(tmp_path / "r.yaml", {"train": {"amp": "bf16"}}))


def test_resume_keeps_model_data_and_batch_but_not_lr_or_workers():
    recipe = recipe_to_dict(load_recipe("quickstart"))
    fixed = fixed_on_resume(recipe)
    assert fixed["model.name"] == "debiformer_nano" and fixed["train.batch_size"] == 512
    assert "data.train_path" in fixed and "data.num_workers" not in fixed
    assert not any(key.startswith(("optim", "schedule", "output")) for key in fixed)


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        ("{depths: [1, 1]}", "model.arch.depths: expected 4 values"),
        ("{n_win: 0}", "model.arch.n_win"),
        ("{widths: [1]}", "unknown key 'model.arch.widths'"),
    ],
)
def test_architecture_overrides_are_checked_when_the_recipe_loads(arch, message):
    with pytest.raises(UserError, match=message):
        load_recipe("quickstart", [f"model.arch={arch}"])


# every range check, on the shipped recipe of its task: (recipe, override(s), message)
RANGE_CHECKS = [
    ("quickstart", "data.image_size=31", "data.image_size: must be at least 32"),
    ("quickstart", "data.num_workers=-1", "data.num_workers: must be >= 0"),
    ("quickstart", "data.crop_ratio=0", "data.crop_ratio: must be in (0, 1]"),
    ("quickstart", "data.crop_ratio=1.1", "data.crop_ratio: must be in (0, 1]"),
    ("quickstart", "data.synthetic_samples=0", "data.synthetic_samples: must be positive"),
    ("quickstart_detection", "data.num_workers=-1", "data.num_workers: must be >= 0"),
    ("quickstart_segmentation", "data.num_workers=-1", "data.num_workers: must be >= 0"),
    ("quickstart", "optim.lr=0", "optim.lr: must be positive"),
    ("quickstart", "optim.weight_decay=-0.1", "optim.weight_decay: must be >= 0"),
    ("quickstart", "optim.betas=[0.9]", "optim.betas: expected two numbers [beta1, beta2]"),
    ("quickstart", "optim.clip_grad=0", "optim.clip_grad: must be positive (or null"),
    ("quickstart", "optim.layer_decay=1.5", "optim.layer_decay: must be in (0, 1] (or null"),
    ("quickstart", "augment.ratio=[1, 2, 3]", "augment.ratio: expected two numbers [min, max]"),
    ("quickstart", "augment.label_smoothing=1", "augment.label_smoothing: must be in [0, 1)"),
    ("quickstart", "augment.random_erasing=1.5", "augment.random_erasing: must be in [0, 1]"),
    ("quickstart", "schedule.epochs=0", "schedule.epochs: must be at least 1"),
    ("quickstart_segmentation", "schedule.steps=0", "schedule.steps: must be at least 1"),
    ("quickstart", "schedule.steps=100", "give schedule.epochs or schedule.steps"),
    ("quickstart", "schedule.warmup_epochs=-1", "schedule.warmup_epochs: must be >= 0"),
    ("quickstart", "schedule.warmup_steps=-1", "schedule.warmup_steps: must be >= 0"),
    ("quickstart", "schedule.power=0", "schedule.power: must be positive"),
    ("quickstart", "schedule.gamma=0", "schedule.gamma: must be in (0, 1]"),
    ("quickstart", "schedule.milestones=[2]", "only step decay has milestones"),
    ("quickstart_detection", "schedule.milestones=[2]", "expected epochs between 0 and"),
    ("quickstart_detection", "detection.fpn_channels=4", "detection.fpn_channels: must be at"),
    ("quickstart_detection", "detection.representation_size=0", "representation_size: must be"),
    ("quickstart_detection", "detection.min_size=16", "detection.min_size: must be at least 32"),
    ("quickstart_detection", "detection.max_size=64", "must be at least detection.min_size"),
    ("quickstart_detection", "detection.rpn_proposals=0", "detection.rpn_proposals: must be"),
    ("quickstart_detection", "detection.rois_per_image=0", "detection.rois_per_image: must be"),
    ("quickstart_detection", "detection.detections_per_image=0", "detections_per_image: must"),
    ("quickstart_detection", "detection.preview_images=-1", "detection.preview_images: must be"),
    ("quickstart_segmentation", "segmentation.channels=0", "segmentation.channels: must be"),
    ("quickstart_segmentation", "segmentation.fpn_channels=4", "fpn_channels: must be at least 8"),
    ("quickstart_segmentation", "segmentation.aux_channels=0", "aux_channels: must be positive"),
    ("quickstart_segmentation", "segmentation.aux_weight=-1", "aux_weight: must be >= 0"),
    ("quickstart_segmentation", "segmentation.dropout=1", "segmentation.dropout: must be in [0"),
    ("quickstart_segmentation", "segmentation.scale=[512, 16]", "segmentation.scale: expected"),
    ("quickstart_segmentation", "segmentation.ratio_range=[2, 1]", "ratio_range: expected two"),
    ("quickstart_segmentation", "segmentation.crop_size=16", "crop_size: must be at least 32"),
    ("quickstart_segmentation", "segmentation.cat_max_ratio=0", "cat_max_ratio: must be in (0"),
    (
        "quickstart_segmentation",
        ["segmentation.eval_mode=slide", "segmentation.eval_stride=129"],
        "segmentation.eval_stride: must be in (0, segmentation.crop_size]",
    ),
    ("quickstart_segmentation", "segmentation.eval_ratios=[]", "eval_ratios: expected positive"),
    ("quickstart_segmentation", "segmentation.size_divisor=0", "size_divisor: must be positive"),
    ("quickstart_segmentation", "segmentation.preview_images=-1", "preview_images: must be >= 0"),
    ("quickstart", "train.batch_size=0", "train.batch_size: must be at least 1"),
    ("quickstart", "train.accum_steps=0", "train.accum_steps: must be at least 1"),
    ("quickstart", "train.eval_every=0", "train.eval_every: must be at least 1"),
    ("quickstart", "train.ema_decay=1", "train.ema_decay: must be in (0, 1)"),
    ("quickstart", "train.seed=-1", "train.seed: must be in [0, 2**32), got -1"),
    ("quickstart", "train.seed=4294967296", "train.seed: must be in [0, 2**32), got 4294967296"),
    ("quickstart", "output.log_every=0", "output.log_every: must be at least 1"),
    ("quickstart", "output.checkpoint_every=-1", "output.checkpoint_every: must be >= 0"),
]


@pytest.mark.parametrize(("name", "override", "message"), RANGE_CHECKS)
def test_every_range_check_names_its_key(name, override, message):
    with pytest.raises(UserError) as error:
        load_recipe(name, override if isinstance(override, list) else [override])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("quickstart", ["data.image_size=32", "data.crop_ratio=1", "optim.clip_grad=null"]),
        ("quickstart", ["optim.layer_decay=1", "augment.random_erasing=1", "train.ema_decay=0.5"]),
        ("quickstart", ["schedule.decay=step", "schedule.milestones=[1, 3.5]"]),
        ("quickstart", ["train.seed=4294967295"]),
        ("quickstart_detection", ["detection.min_size=32", "detection.max_size=32"]),
        (
            "quickstart_segmentation",
            ["segmentation.eval_mode=slide", "segmentation.eval_stride=128"],
        ),
        ("quickstart_segmentation", ["segmentation.ratio_range=[1, 1]", "segmentation.dropout=0"]),
    ],
)
def test_values_at_the_edge_of_a_range_are_accepted(name, overrides):
    load_recipe(name, overrides)


@pytest.mark.parametrize(
    ("task", "data_class", "own_section"),
    [
        ("classification", ClassificationDataConfig, None),
        ("detection", CocoDataConfig, "detection"),
        ("segmentation", MaskDataConfig, "segmentation"),
    ],
)
def test_the_task_chooses_the_data_section_and_its_own_section(task, data_class, own_section):
    recipe = recipe_from_dict({"task": task})
    assert type(recipe.data) is data_class
    assert (recipe.detection is not None, recipe.segmentation is not None) == (
        own_section == "detection",
        own_section == "segmentation",
    )
    saved = recipe_to_dict(recipe)
    assert set(saved["data"]) == {f.name for f in dataclasses.fields(data_class)}
    assert ("detection" in saved, "segmentation" in saved) == (
        own_section == "detection",
        own_section == "segmentation",
    )
    assert recipe_from_dict(yaml.safe_load(recipe_to_yaml(recipe))) == recipe


@pytest.mark.parametrize(
    ("name", "override", "message"),
    [
        (
            "quickstart_detection",
            "data.train_masks=labels",
            "data.train_masks belongs to segmentation recipes (task: segmentation); "
            "this recipe's task is detection",
        ),
        (
            "quickstart",
            "data.mosaics={out: x}",
            "data.mosaics belongs to detection and segmentation recipes "
            "(task: detection or segmentation); this recipe's task is classification",
        ),
        (
            "quickstart_segmentation",
            "data.image_size=64",
            "data.image_size belongs to classification recipes (task: classification); "
            "this recipe's task is segmentation",
        ),
        (
            "quickstart",
            "detection.min_size=64",
            "detection belongs to detection recipes (task: detection); "
            "this recipe's task is classification",
        ),
        (
            "quickstart_detection",
            "segmentation.head=fpn",
            "segmentation belongs to segmentation recipes (task: segmentation); "
            "this recipe's task is detection",
        ),
    ],
)
def test_a_key_of_another_task_names_that_task(name, override, message):
    with pytest.raises(UserError) as error:
        load_recipe(name, [override])
    assert str(error.value) == message


def test_an_unknown_data_key_suggests_one_of_the_tasks_keys():
    with pytest.raises(UserError, match=r"unknown key 'data.imagesize' \(did you mean"):
        load_recipe("quickstart", ["data.imagesize=64"])
    with pytest.raises(UserError, match=r"unknown key 'data.train_mask'.*'data.train_masks'"):
        recipe_from_dict({"task": "segmentation", "data": {"train_mask": "x"}})


def stored_with_every_task(recipe) -> dict:
    """The recipe as checkpoints of earlier versions stored it: every task's data keys (the
    defaults of the other tasks) and both task sections."""
    stored = recipe_to_dict(recipe)
    other_data = {}
    for data_class in (MaskDataConfig, CocoDataConfig, ClassificationDataConfig):
        other_data.update(dataclasses.asdict(data_class()))
    stored["data"] = {**other_data, **stored["data"]}
    return {
        "detection": dataclasses.asdict(DetectionConfig()),
        "segmentation": dataclasses.asdict(SegmentationConfig()),
        **stored,
    }


@pytest.mark.parametrize("name", ["quickstart", "quickstart_detection", "quickstart_segmentation"])
def test_a_recipe_stored_with_every_tasks_keys_still_loads_and_resumes(name):
    recipe = load_recipe(name)
    stored = stored_with_every_task(recipe)
    with pytest.raises(UserError, match="belongs to"):
        recipe_from_dict(stored)
    assert recipe_from_stored(stored) == recipe
    assert recipe_from_stored(recipe_to_dict(recipe)) == recipe
    before, now = fixed_on_resume(stored), fixed_on_resume(recipe_to_dict(recipe))
    assert set(now) < set(before)
    assert [key for key in now if before[key] != now[key]] == []


def test_a_recipe_file_that_is_not_utf8_says_to_save_it_as_utf8(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes("description: Café\n".encode("latin-1"))
    with pytest.raises(UserError) as error:
        load_recipe(path)
    assert str(error.value) == f"recipe {path} is not UTF-8 text (byte 16): save it as UTF-8"


def alias_bomb(levels: int) -> str:
    """YAML whose last anchor expands to 9**levels strings ("billion laughs")."""
    lines = ['- &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"- &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    return f"description: {{laughs: {lines[0][2:]}}}\n" if levels == 1 else "\n".join(lines)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model:\n  arch: " + "[" * 1000 + "]" * 1000, "nested more than 16 levels"),
        ("model:\n  arch: " + "[" * 17 + "]" * 17, "nested more than 16 levels"),
        ("model: &loop\n  arch: *loop\n", "nested more than 16 levels"),
        (
            "laughs:\n"
            + "\n".join(f"  {line}" for line in alias_bomb(9).splitlines())
            + "\naugment:\n  scale: *a8\n",
            "more than 100000 values (aliases, *name, expanded)",
        ),
    ],
    ids=["deeper-than-the-parser-recurses", "deeper-than-a-recipe", "alias-loop", "alias-bomb"],
)
def test_yaml_nested_too_deep_or_expanding_too_far_is_one_short_line(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    for load in (
        lambda: load_recipe(path),
        lambda: load_recipe("quickstart", [f"model.arch={text}"]),
    ):
        with pytest.raises(UserError) as error:
            load()
        assert message in str(error.value)
        assert "\n" not in str(error.value) and len(str(error.value)) < 200


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        (["augment.scale=" + "x" * 10**5], "augment.scale: expected a list of numbers, got 'xxx"),
        (["optim.lr=[" + "1, " * 10**4 + "]"], "optim.lr: expected a number, got [1, 1, 1"),
        (["data=[" + "1, " * 10**4 + "]"], "overrides 'data=[1, 1, 1"),
        (["train.ema_decay=1", "description=" + "x" * 10**5], "train.ema_decay: must be in (0, 1)"),
        (["task=" + "x" * 10**5], "unknown task 'xxx"),
    ],
    ids=["type", "number", "override", "range", "task"],
)
def test_an_error_quotes_a_short_prefix_of_a_huge_value(overrides, start):
    with pytest.raises(UserError) as error:
        load_recipe("quickstart", overrides)
    assert str(error.value).startswith(start) and len(str(error.value)) < 150


def test_a_task_override_changes_the_task_and_a_misspelt_one_suggests_the_closest(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {"optim": {"lr": 0.01}})
    recipe = load_recipe(path, ["task=segmentation", "segmentation.head=fpn"])
    assert (recipe.task, type(recipe.data), recipe.segmentation.head) == (
        "segmentation",
        MaskDataConfig,
        "fpn",
    )
    with pytest.raises(UserError) as error:
        load_recipe(path, ["task=segmentaton"])
    assert str(error.value) == "unknown task 'segmentaton' (did you mean 'segmentation'?)"
    with pytest.raises(UserError) as error:
        load_recipe(write_recipe(tmp_path / "q.yaml", {"task": "vision"}))
    assert (
        str(error.value) == "unknown task 'vision' (choose classification, detection, segmentation)"
    )
    with pytest.raises(UserError, match="detection belongs to detection recipes"):
        load_recipe("quickstart_detection", ["task=segmentation"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.mosaics.items=3", "data.mosaics.items: expected a list of 2 integers, got 3"),
        ("data.mosaics.scale=[1, x]", "data.mosaics.scale: expected a number, got 'x'"),
        ("data.mosaics.train_images=abc", "data.mosaics.train_images: expected an integer"),
        ("data.mosaics.canvas_size=1.5", "data.mosaics.canvas_size: expected an integer, got 1.5"),
        ("data.mosaics.source=3", "data.mosaics.source: expected a string, got 3"),
        ("data.mosaics.seed=-1", "data.mosaics.seed must be 0 or more, got -1"),
        ("data.mosaics.val_images=0", "data.mosaics.train_images and data.mosaics.val_images must"),
        ("data.mosaics.items=[3, 1]", "data.mosaics.items 3 1: give the fewest and most items"),
        ("data.mosaics.scale=[0, 1]", "data.mosaics.scale 0.0 1.0: give the smallest and largest"),
        (
            "data.mosaics.canvas_size=40",
            "data.mosaics.canvas_size 40: the canvas must hold the largest item (56 px at scale "
            "2.0); use data.mosaics.canvas_size 56 or more, or a smaller data.mosaics.scale",
        ),
        ("data.mosaics={out: x}", "data.mosaics.train_images: missing (needed when data.mosaics"),
        ("data.mosaics.canvas=64", "unknown key 'data.mosaics.canvas' (did you mean 'data.mosa"),
        ("data.mosaics.items.low=1", "unknown key 'data.mosaics.items.low' (data.mosaics.items"),
    ],
)
def test_the_mosaics_options_are_checked_when_the_recipe_loads(override, message):
    for name in ("quickstart_detection", "quickstart_segmentation"):
        with pytest.raises(UserError) as error:
            load_recipe(name, [override])
        assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_the_mosaics_options_take_write_mosaics_types():
    options = ["data.mosaics.items=[1, 3]", "data.mosaics.scale=[1, 1.5]", "data.mosaics.seed=2"]
    recipe = load_recipe("quickstart_detection", options)
    assert recipe.data.mosaics == {
        "out": "data/mosaics",
        "train_images": 3000,
        "val_images": 500,
        "canvas_size": 128,
        "items": [1, 3],
        "scale": [1.0, 1.5],
        "seed": 2,
    }
    assert recipe_from_dict(yaml.safe_load(recipe_to_yaml(recipe))) == recipe
    assert load_recipe("quickstart_detection", ["data.mosaics={}"]).data.mosaics == {}
