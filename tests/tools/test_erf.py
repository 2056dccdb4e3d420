"""`debiformer show --erf`: the effective receptive field is the mean over images of each image's
input gradient, the contribution areas measure its spread, and the command writes the figure and
the arrays."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import debiformer
from debiformer.tools.erf import contribution_areas, log_scaled, receptive_field

pytest.importorskip("matplotlib")


def test_the_field_is_the_mean_of_each_images_central_unit_gradient():
    torch.manual_seed(0)
    model = debiformer.create_model("debiformer_nano", num_classes=3).eval()
    images = torch.randn(2, 3, 64, 64)
    field = receptive_field(model, images, stage=2)
    by_hand = []
    for image in images:
        image = image[None].clone().requires_grad_(True)
        stage_map = model.stage_maps(image, last_stage=1)[-1]  # 8x8 at stride 8
        stage_map[0, :, 4, 4].relu().sum().backward()
        by_hand.append(image.grad.abs().sum(dim=(0, 1)))
    np.testing.assert_allclose(field, torch.stack(by_hand).mean(0).numpy(), rtol=1e-5, atol=1e-9)
    assert field.shape == (64, 64) and field.min() >= 0 and field.max() > 0
    assert log_scaled(field).max() == pytest.approx(1.0)


def test_contribution_areas_grow_with_the_spread_of_the_field():
    point = np.zeros((21, 21))
    point[10, 10] = 1.0
    assert set(contribution_areas(point).values()) == {1 / 441}
    flat = contribution_areas(np.ones((21, 21)))
    assert flat["0.2"] < flat["0.5"] < flat["0.99"] <= 1.0
    assert flat["0.5"] == pytest.approx(15 * 15 / 441)  # the smallest centred square over half


def test_the_command_writes_the_figure_and_the_arrays(run_main, tmp_path):
    for index in range(3):
        Image.new("RGB", (40 + index, 36), (40 * index, 90, 160)).save(tmp_path / f"{index}.png")
    images = [str(tmp_path / f"{index}.png") for index in range(3)]
    figure, arrays = tmp_path / "erf.png", tmp_path / "erf.json"
    code, _, err = run_main(
        "show", *images, "--erf", "--stage", "3", "--model", "debiformer_nano",
        "--size", "64", "--out", str(figure), "--json", str(arrays),
    )  # fmt: skip
    assert code == 0, err
    assert figure.read_bytes().startswith(b"\x89PNG")
    written = json.loads(arrays.read_text())
    assert (written["stage"], written["images"], written["input_size"]) == (3, 3, [64, 64])
    assert np.asarray(written["erf"]).shape == (64, 64)
    assert set(written["contribution_areas"]) == {"0.2", "0.3", "0.5", "0.99"}


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--stage", "5"], "--stage must be 1-4, got 5"),
        (["--size", "64x48"], "with --erf give one side N"),
        (["--query", "3,3"], "--erf draws the receptive field alone"),
    ],
)
def test_bad_settings_are_one_line_before_the_model_is_built(
    run_main, tmp_path, arguments, message
):
    Image.new("RGB", (40, 36), "gray").save(tmp_path / "a.png")
    code, _, err = run_main(
        "show", str(tmp_path / "a.png"), "--erf", "--model", "debiformer_nano",
        "--out", str(tmp_path / "erf.png"), *arguments,
    )  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "erf.png").exists()
