"""Loading never runs code hidden in a checkpoint: a malicious pickle, saved with torch.save or as a
plain pickle, at the top level or nested in a dict, is refused by every way in with one line."""

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import debiformer
from debiformer.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from debiformer.errors import UserError
from tests.helpers.payloads import malicious_files
from tests.helpers.recipes import write_recipe

SYNTHETIC = {
    "model": {"name": "debiformer_nano", "arch": {"dims": [32] * 4, "depths": [1] * 4}},
    "data": {"backend": "synthetic", "image_size": 32, "num_classes": 4,
             "synthetic_samples": 16, "num_workers": 0},
    "schedule": {"epochs": 1},
    "train": {"batch_size": 8, "device": "cpu"},
    "output": {"progress": False},
}  # fmt: skip


@pytest.fixture
def recipe(tmp_path) -> Path:
    return write_recipe(tmp_path / "recipe.yaml", SYNTHETIC)


@pytest.mark.parametrize("way", ["eval", "eval --official", "train --resume"])
def test_the_cli_never_runs_a_payload(way, recipe, tmp_path, run_main):
    for file in malicious_files(tmp_path):
        command, *flags = way.split()
        if command == "eval":
            args = ["eval", str(recipe), "--checkpoint", str(file), *flags]
        else:
            args = ["train", str(recipe), "--resume", str(file), "--out", str(tmp_path / "run")]
        code, _, err = run_main(*args)
        assert not (tmp_path / "PWNED").exists(), f"{way} {file.name} ran the payload"
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "refused" in lines[0] and file.name in lines[0], err


def test_a_crafted_training_checkpoint_is_a_one_line_error(recipe, tmp_path, run_main):
    crafted = tmp_path / "crafted.pt"
    torch.save({"format": "debiformer-train/2"}, crafted)
    for args in (
        ["eval", str(recipe), "--checkpoint", str(crafted)],
        ["train", str(recipe), "--resume", str(crafted), "--out", str(tmp_path / "run")],
    ):
        code, _, err = run_main(*args)
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and str(crafted) in lines[0], err
        assert "holds no state dict" in lines[0] or "damaged training checkpoint" in lines[0]
    assert not (tmp_path / "run").exists()


def test_the_library_loaders_never_run_a_payload(tmp_path):
    model = debiformer.create_model("debiformer_nano")
    for file in malicious_files(tmp_path):
        with pytest.raises(UserError, match="refused") as error:
            load_checkpoint(file)
        if file.suffix == ".pt":
            assert "posix.system" in str(error.value)
        with pytest.raises(UserError, match="refused"):
            debiformer.load_official_checkpoint(model, file)
        with pytest.raises(UserError, match="refused"):
            debiformer.create_model("debiformer_nano", pretrained=file)
        assert not (tmp_path / "PWNED").exists()


def test_rng_states_survive_a_safe_round_trip(tmp_path):
    torch.manual_seed(5)
    state = rng_state()
    expected = (torch.rand(3), __import__("numpy").random.rand(3), __import__("random").random())
    save_checkpoint({"rng": state}, tmp_path / "c.pt")
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    again = (torch.rand(3), __import__("numpy").random.rand(3), __import__("random").random())
    assert torch.equal(expected[0], again[0])
    assert (expected[1] == again[1]).all() and expected[2] == again[2]


def test_older_checkpoints_with_numpy_rng_arrays_still_load(tmp_path):
    import numpy as np

    old_style = {"format": "debiformer-train/1", "rng": {"numpy": np.random.get_state()}}
    torch.save(old_style, tmp_path / "old.pt")
    state = load_checkpoint(tmp_path / "old.pt")
    assert (state["rng"]["numpy"][1] == np.random.get_state()[1]).all()


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 1 MB tmpfs mounted for the test (skipped where mounting is not permitted)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs is not permitted here")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_checkpoint_that_fills_the_disk_is_one_line_and_keeps_the_earlier_one(small_disk):
    """torch's zip writer reports a full disk as a RuntimeError raised while handling the
    OSError: the run stops with one line naming the folder, the space needed and the space left,
    and the earlier checkpoint stays whole."""
    path = small_disk / "checkpoints" / "last.pt"
    save_checkpoint({"model": {"weight": torch.ones(1000)}}, path)
    with pytest.raises(UserError, match="no space left") as error:
        save_checkpoint({"model": {"weight": torch.ones(500_000)}}, path)
    message = str(error.value)
    assert "\n" not in message and str(path.parent) in message
    assert (
        "(about 2.0 MB)" in message and " free;" in message and "earlier last.pt is kept" in message
    )
    assert torch.equal(load_checkpoint(path)["model"]["weight"], torch.ones(1000))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
