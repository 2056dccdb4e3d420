"""The model equals the authors' released classifier on the shared fixture, and their
checkpoint files load through `load_official_checkpoint` with one-line errors."""

import pytest
import torch

import debiformer
from debiformer.errors import UserError
from tests.helpers.official_fixture import load_fixture, official_input
from tests.helpers.tensors import assert_same_tensors


@pytest.fixture(scope="module")
def fixture():
    return load_fixture()


@pytest.fixture(scope="module")
def official_model(official_state):
    model = debiformer.create_model("debiformer_tiny").eval()
    debiformer.load_official_state_dict(model, official_state)
    return model


@pytest.fixture(scope="module")
def outputs(fixture, official_model):
    with torch.no_grad():
        features = official_model.stage_maps(official_input(fixture))
        return features, official_model.forward_head(official_model.norm(features[-1]))


def test_logits_match_the_release(fixture, outputs):
    expected = torch.tensor(fixture["logits"])
    logits = outputs[1]
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max() <= 1e-3 * expected.std()


@pytest.mark.parametrize("stage", range(4))
def test_stage_outputs_match_the_release(fixture, outputs, stage):
    expected = fixture["stages"][stage]
    feature = outputs[0][stage].double()
    assert list(feature.shape) == expected["shape"]
    tolerance = 1e-3 * expected["std"]
    assert abs(feature.mean().item() - expected["mean"]) <= tolerance
    assert abs(feature.std().item() - expected["std"]) <= tolerance
    first = torch.tensor(expected["first"], dtype=torch.float64)
    assert (feature.flatten()[: len(first)] - first).abs().max() <= tolerance


@pytest.mark.slow
def test_checkpoint_files_load_raw_and_wrapped(official_state, official_model, tmp_path):
    state = dict(official_state)
    torch.save(state, tmp_path / "raw.pth")
    torch.save({"model": state, "epoch": 299}, tmp_path / "wrapped.pth")
    for name in ("raw.pth", "wrapped.pth"):
        model = debiformer.create_model("debiformer_tiny")
        debiformer.load_official_checkpoint(model, tmp_path / name)
        assert_same_tensors(model.state_dict(), official_model.state_dict())


def test_missing_key_is_named(official_state):
    state = dict(official_state)
    del state["stages.2.1.attn2.rpe_table"]
    with pytest.raises(UserError, match=r"lacks 'stages\.2\.1\.attn2\.rpe_table'"):
        debiformer.load_official_state_dict(debiformer.create_model("debiformer_tiny"), state)


def test_extra_key_is_named(official_state):
    state = dict(official_state)
    state["stages.0.0.attn1.extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"'stages\.0\.0\.attn1\.extra\.weight' has no place"):
        debiformer.load_official_state_dict(debiformer.create_model("debiformer_tiny"), state)


def test_wrong_shape_is_named(official_state):
    state = dict(official_state)
    with pytest.raises(UserError, match=r"'head\.weight' has shape \(1000, 512\)"):
        debiformer.load_official_state_dict(
            debiformer.create_model("debiformer_tiny", num_classes=10), state
        )


def test_corrupt_and_missing_files_are_one_line_errors(tmp_path):
    model = debiformer.create_model("debiformer_nano")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    for path, message in (
        (corrupt, "not a readable checkpoint"),
        (tmp_path / "absent.pth", "does not exist"),
    ):
        with pytest.raises(UserError, match=message) as error:
            debiformer.load_official_checkpoint(model, path)
        assert "\n" not in str(error.value)
