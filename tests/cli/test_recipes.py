"""`debiformer recipes` lists the shipped recipes and `recipes show` prints one fully resolved;
recipe names and paths work from any directory."""

import dataclasses
import importlib.resources
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from debiformer.cli.main import app
from debiformer.errors import UserError
from debiformer.recipe import (
    DATA_SECTIONS,
    RECIPES_DIR,
    find_recipe,
    list_recipes,
    load_recipe,
)

SHIPPED = (
    "ade20k_fpn_base",
    "ade20k_fpn_small",
    "ade20k_upernet_base",
    "ade20k_upernet_small",
    "base",
    "coco_maskrcnn_base",
    "coco_maskrcnn_small",
    "coco_maskrcnn_tiny",
    "coco_retinanet_base",
    "coco_retinanet_small",
    "coco_retinanet_tiny",
    "quickstart",
    "quickstart_detection",
    "quickstart_items",
    "quickstart_segmentation",
    "small",
    "tiny",
)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_the_recipes_are_the_package_debiformer_recipes():
    assert Path(str(importlib.resources.files("debiformer.recipes"))) == RECIPES_DIR
    assert (RECIPES_DIR / "tiny.yaml").is_file() and (RECIPES_DIR / "_imagenet.yaml").is_file()


def test_list_recipes_names_the_shipped_ones_without_the_bases():
    recipes = dict(list_recipes())
    assert tuple(recipes) == SHIPPED
    assert recipes["tiny"].startswith("DeBiFormer-Tiny, ImageNet-1K")
    assert all(recipes.values())


def test_recipes_command_lists_names_and_descriptions():
    result = invoke("recipes")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(SHIPPED)
    assert "_imagenet" not in result.output
    for name, description in list_recipes():
        assert any(line.startswith(name) and line.endswith(description) for line in lines)


@pytest.mark.parametrize("name", SHIPPED)
def test_show_prints_yaml_that_loads_back_into_the_same_recipe(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    result = invoke("recipes", "show", name)
    assert result.exit_code == 0, result.output
    saved = tmp_path / "resolved.yaml"
    saved.write_text(result.output)
    assert load_recipe(saved) == load_recipe(name)
    assert "base:" not in result.output  # bases merged in


@pytest.mark.parametrize(
    ("name", "task"),
    [
        ("tiny", "classification"),
        ("coco_retinanet_tiny", "detection"),
        ("ade20k_upernet_small", "segmentation"),
    ],
)
def test_show_prints_only_the_keys_of_the_recipes_task(name, task):
    result = invoke("recipes", "show", name)
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["task"] == task
    assert set(shown["data"]) == {f.name for f in dataclasses.fields(DATA_SECTIONS[task])}
    sections = {"classification", "detection", "segmentation"} & set(shown)
    assert sections == ({task} - {"classification"})


def test_show_applies_overrides_and_fills_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("recipes", "show", "tiny", "--set", "optim.lr=0.001", "--set", "train.seed=3")
    assert result.exit_code == 0, result.output
    saved = tmp_path / "resolved.yaml"
    saved.write_text(result.output)
    expected = load_recipe("tiny", ["optim.lr=0.001", "train.seed=3"])
    assert load_recipe(saved) == expected
    assert expected.optim.lr == 0.001 and expected.train.seed == 3
    assert "eval_every: 1" in result.output  # a default no recipe file sets


def test_show_of_a_file_path_and_of_a_mistake(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "exp.yaml").write_text("model:\n  name: debiformer_nano\n")
    result = invoke("recipes", "show", "mine/exp")
    assert result.exit_code == 0, result.output
    assert "name: debiformer_nano" in result.output
    result = invoke("recipes", "show", "tiny", "--set", "optim.lrr=1")
    assert isinstance(result.exception, UserError) and "optim.lrr" in str(result.exception)


def test_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_recipe("tiny") == RECIPES_DIR / "tiny.yaml"
    assert find_recipe("tiny.yaml") == RECIPES_DIR / "tiny.yaml"
    assert load_recipe("tiny").model.name == "debiformer_tiny"  # its base, _imagenet, is found


def test_relative_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny.yaml").write_text("base: ../local\n")
    (tmp_path / "local.yaml").write_text("description: here\n")
    assert find_recipe("runs/tiny.yaml") == Path("runs/tiny.yaml")
    assert find_recipe("runs/tiny") == Path("runs/tiny.yaml")
    assert load_recipe("runs/tiny").description == "here"
    with pytest.raises(UserError, match="recipe 'other/tiny.yaml' not found"):
        find_recipe("other/tiny.yaml")  # a path is never replaced by a shipped recipe
    (tmp_path / "tiny.yaml").write_text("description: mine\n")
    assert find_recipe("tiny") == Path("tiny.yaml")  # a file given by name comes first


def test_an_unknown_name_lists_the_shipped_recipes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as error:
        find_recipe("tinyy")
    assert str(error.value) == (
        f"recipe 'tinyy' not found (a YAML file, or one of: {', '.join(SHIPPED)})"
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["tiny.yaml", "--set", "task=segmentaton"],
            "unknown task 'segmentaton' (did you mean 'segmentation'?)",
        ),
        (["quickstart", "--set", "train.seed=-1"], "train.seed: must be in [0, 2**32), got -1"),
        (
            ["quickstart_detection", "--set", "data.mosaics.items=3"],
            "data.mosaics.items: expected a list of 2 integers, got 3",
        ),
        (["latin.yaml"], "recipe {tmp}/latin.yaml is not UTF-8 text (byte 16): save it as UTF-8"),
    ],
)
def test_recipe_mistakes_are_one_line_errors(run_main, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text("optim:\n  lr: 0.01\n")
    (tmp_path / "latin.yaml").write_bytes("description: Café\n".encode("latin-1"))
    code, out, err = run_main("recipes", "show", *args)
    assert (code, out) == (2, "")
    assert err.strip() == f"error: {expected.format(tmp=tmp_path)}"


def test_show_with_another_task_prints_that_tasks_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("optim:\n  lr: 0.01\n")
    result = invoke("recipes", "show", "mine", "--set", "task=segmentation")
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["task"] == "segmentation" and "segmentation" in shown
    assert set(shown["data"]) == {f.name for f in dataclasses.fields(DATA_SECTIONS["segmentation"])}
