"""Weights from files: the kind of checkpoint is recognised, and `create_model(pretrained=PATH)`
loads this tool's checkpoints, bare state dicts and released files alike."""

import pytest
import torch

import debiformer
from debiformer import weights
from debiformer.checkpoint import save_checkpoint
from debiformer.errors import UserError
from debiformer.weights import load_weights


def test_released_checkpoints_are_detected_by_key_names(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(
        weights, "load_official_state_dict", lambda model, state: calls.append(state)
    )
    model = debiformer.create_model("debiformer_nano", num_classes=4)
    released = {"model": {"downsample_layers.0.0.weight": torch.zeros(1)}}
    assert load_weights(model, released, tmp_path / "x.pth") == "official"
    assert calls == [released["model"]]
    assert load_weights(model, model.state_dict(), tmp_path / "y.pth") == "state_dict"


def test_create_model_loads_pretrained_weights_of_every_kind(tmp_path):
    source = debiformer.create_model("debiformer_nano", num_classes=4).eval()
    images = torch.randn(2, 3, 32, 32)
    expected = source(images)
    torch.save(source.state_dict(), tmp_path / "bare.pt")
    save_checkpoint({"model": source.state_dict(), "ema": None}, tmp_path / "train.pt")
    for name in ("bare.pt", "train.pt"):
        loaded = debiformer.create_model(
            "debiformer_nano", num_classes=4, pretrained=tmp_path / name
        )
        torch.testing.assert_close(loaded.eval()(images), expected, rtol=0, atol=0)


def test_pretrained_weights_of_another_shape_are_a_one_line_error(tmp_path):
    torch.save(debiformer.create_model("debiformer_nano").state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError, match="does not match the model") as error:
        debiformer.create_model("debiformer_nano", num_classes=4, pretrained=tmp_path / "w.pt")
    assert "\n" not in str(error.value)
