"""Recipes: defaults, `base:` inheritance, `--set` overrides and one-line validation errors."""

from pathlib import Path

import pytest
import yaml

from debiformer.errors import UserError
from debiformer.recipe import (
    RECIPES_DIR,
    fixed_on_resume,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    recipe_to_yaml,
)


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_fill_missing_keys(tmp_path):
    recipe = load_recipe(write(tmp_path / "r.yaml", {"optim": {"lr": 0.01}}))
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
            "train.precision: expected one of 'fp32', 'bf16', 'fp16', got 'off'",
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
        load_recipe(write(tmp_path / "r.yaml", data))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_numeric_strings_are_numbers(tmp_path):
    """PyYAML reads `5e-4` (no dot) as a string; number fields accept it."""
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lr: 5e-4\n")
    assert load_recipe(path).optim.lr == 5e-4


def test_base_inheritance_deep_merges(tmp_path):
    write(
        tmp_path / "parent.yaml", {"optim": {"lr": 0.1, "weight_decay": 0.2}, "train": {"seed": 7}}
    )
    child = write(tmp_path / "child.yaml", {"base": "parent", "optim": {"lr": 0.3}})
    recipe = load_recipe(child)
    assert (recipe.optim.lr, recipe.optim.weight_decay, recipe.train.seed) == (0.3, 0.2, 7)
    assert recipe.name == "child"


def test_base_cycle_and_missing_base_are_errors(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b"})
    write(tmp_path / "b.yaml", {"base": "a"})
    with pytest.raises(UserError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(UserError, match="base: recipe 'nowhere' not found"):
        load_recipe(write(tmp_path / "c.yaml", {"base": "nowhere"}))


def test_overrides_parse_yaml_values_and_validate(tmp_path):
    path = write(tmp_path / "r.yaml", {})
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
        load_recipe(write(tmp_path / "r.yaml", {"train": {"amp": "bf16"}}))


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
