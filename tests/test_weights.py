"""Weights from files: every kind of checkpoint loads, `create_model(pretrained=...)` and timm's
`pretrained_cfg_overlay=dict(file=...)` start a model with other classes or input channels from
the release's weights, and anything else that does not fit is a one-line error."""

import pytest
import safetensors.torch
import timm
import torch

import debiformer
from debiformer import weights
from debiformer.checkpoint import load_checkpoint, save_checkpoint
from debiformer.errors import UserError
from debiformer.official import rename_official_state_dict
from debiformer.weights import load_weights, read_state_dict
from tests.helpers.tensors import assert_same_tensors


@pytest.fixture(scope="module")
def release_file(official_state, tmp_path_factory):
    """The release fixture's DeBiFormer-T state dict (1000 classes) as a released file, and the
    same weights in this project's names and shapes."""
    path = tmp_path_factory.mktemp("release") / "debi_tiny.pth"
    torch.save({"model": dict(official_state)}, path)
    model = debiformer.create_model("debiformer_tiny")
    debiformer.load_official_state_dict(model, official_state)
    return path, model.state_dict()


def assert_backbone_equal(model: torch.nn.Module, expected: dict, classes: int) -> None:
    state = model.state_dict()
    backbone = [key for key in expected if not key.startswith("head.")]
    for key in backbone:
        assert torch.equal(state[key], expected[key]), key
    assert state["head.weight"].shape == (classes, 512) and state["head.bias"].shape == (classes,)


def test_pretrained_release_file_starts_a_ten_class_model(release_file, capsys):
    path, expected = release_file
    model = debiformer.create_model("debiformer_tiny", pretrained=path, num_classes=10)
    assert_backbone_equal(model, expected, 10)
    assert not model.head.weight.any() and not model.head.bias.any()  # a new head starts at zero
    assert "new 10-way head (the checkpoint's head has 1000 classes)" in capsys.readouterr().err


def test_timm_pretrained_cfg_overlay_file_starts_a_ten_class_model(release_file):
    path, expected = release_file
    model = timm.create_model(
        "debiformer_tiny",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path)},
        num_classes=10,
    )
    assert_backbone_equal(model, expected, 10)


def test_a_stem_for_other_input_channels_is_adapted(release_file):
    path, expected = release_file
    model = debiformer.create_model("debiformer_tiny", pretrained=path, in_chans=1)
    adapted = model.state_dict()["stem.0.weight"]
    assert adapted.shape == (32, 1, 3, 3)
    torch.testing.assert_close(adapted, expected["stem.0.weight"].sum(dim=1, keepdim=True))


@pytest.mark.slow
def test_every_kind_of_file_loads_the_same_weights(tmp_path):
    source = debiformer.create_model("debiformer_nano", num_classes=4).eval()
    state = source.state_dict()
    torch.save(state, tmp_path / "bare.pt")
    torch.save({"model": state}, tmp_path / "wrapped.pth")
    save_checkpoint({"model": state, "ema": state}, tmp_path / "train.pt")
    safetensors.torch.save_file(state, tmp_path / "weights.safetensors")
    images = torch.randn(2, 3, 32, 32)
    kinds = []
    for name in ("bare.pt", "wrapped.pth", "train.pt", "weights.safetensors"):
        model = debiformer.create_model(
            "debiformer_nano", num_classes=4, pretrained=tmp_path / name
        )
        torch.testing.assert_close(model.eval()(images), source(images), rtol=0, atol=0)
        kinds.append(read_state_dict(tmp_path / name)[1])
    assert kinds == ["state_dict", "state_dict", "model", "safetensors"]
    assert read_state_dict(tmp_path / "train.pt", use_ema=True)[1] == "ema"


def test_pretrained_ema_takes_the_checkpoints_ema_weights(tmp_path):
    trained = debiformer.create_model("debiformer_nano", num_classes=4).eval()
    averaged = debiformer.create_model("debiformer_nano", num_classes=4).eval()
    path = tmp_path / "last.pt"
    save_checkpoint({"model": trained.state_dict(), "ema": averaged.state_dict()}, path)
    images = torch.randn(2, 3, 32, 32)
    for use_ema, expected in ((False, trained), (True, averaged)):
        model = debiformer.create_model(
            "debiformer_nano", num_classes=4, pretrained=path, pretrained_ema=use_ema
        )
        torch.testing.assert_close(model.eval()(images), expected(images), rtol=0, atol=0)


def test_released_checkpoints_are_detected_by_key_names(monkeypatch, tmp_path):
    model = debiformer.create_model("debiformer_nano", num_classes=4)
    calls = []

    def rename(state):
        calls.append(state)
        return model.state_dict()

    monkeypatch.setattr(weights, "rename_official_state_dict", rename)
    released = {"model": {"downsample_layers.0.0.weight": torch.zeros(1)}}
    assert load_weights(model, released, tmp_path / "x.pth") == "official"
    assert calls == [released["model"]]
    assert load_weights(model, model.state_dict(), tmp_path / "y.pth") == "state_dict"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("stages.0.0.mlp1.fc1.weight"), r"lacks 'stages\.0\.0\.mlp1\.fc1\.weight'"),
        (lambda s: s.update(extra=torch.zeros(1)), r"key 'extra' has no place in this model"),
        (
            lambda s: s.update({"stem.1.weight": torch.zeros(3)}),
            r"'stem\.1\.weight' has shape \(3,\)",
        ),
    ],
)
def test_other_mismatches_are_one_line_errors(tmp_path, change, message):
    state = debiformer.create_model("debiformer_nano").state_dict()
    change(state)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(UserError, match=message) as error:
        debiformer.create_model("debiformer_nano", num_classes=4, pretrained=tmp_path / "w.pt")
    assert "\n" not in str(error.value)


def test_a_missing_or_damaged_file_is_a_one_line_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    for path, message in (
        (tmp_path / "absent.pt", "does not exist"),
        (tmp_path / "bad.safetensors", "not a readable safetensors file"),
    ):
        with pytest.raises(UserError, match=message) as error:
            debiformer.create_model("debiformer_nano", pretrained=path)
        assert "\n" not in str(error.value)


def test_a_directory_given_as_a_weights_file_is_named_as_one(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save(
        debiformer.create_model("debiformer_nano").state_dict(), run_dir / "checkpoints" / "last.pt"
    )
    for load in (
        lambda: weights.open_weights(run_dir),
        lambda: weights.build_model(nano_spec(), pretrained=run_dir),
        lambda: weights.build_model(nano_spec(), checkpoint=run_dir),
        lambda: load_checkpoint(run_dir),
    ):
        with pytest.raises(
            UserError, match=f"{run_dir} is a directory, not a weights file"
        ) as error:
            load()
        assert "\n" not in str(error.value) and "checkpoints/last.pt" in str(error.value)


def test_weights_with_nan_or_infinite_values_are_refused_naming_the_first_tensor(tmp_path):
    state = debiformer.create_model("debiformer_nano", num_classes=4).state_dict()
    state["stages.1.0.mlp1.fc1.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "broken.pt")
    save_checkpoint({"model": state}, tmp_path / "last.pt")
    state["stages.1.0.mlp1.fc1.weight"][0, 0] = float("inf")
    safetensors.torch.save_file(state, tmp_path / "broken.safetensors")
    loads = (
        lambda path: debiformer.create_model("debiformer_nano", num_classes=4, pretrained=path),
        lambda path: weights.build_model(nano_spec(), checkpoint=path),
    )
    for name in ("broken.pt", "last.pt", "broken.safetensors"):
        path = tmp_path / name
        for load in loads:
            with pytest.raises(UserError, match="holds NaN or infinite values") as error:
                load(path)
            message = str(error.value)
            assert str(path) in message and "'stages.1.0.mlp1.fc1.weight'" in message
            assert "\n" not in message


def test_half_precision_weights_are_converted_with_one_notice(tmp_path, capsys):
    state = debiformer.create_model("debiformer_nano", num_classes=4).state_dict()
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        half = {
            key: value.to(dtype) if value.is_floating_point() else value
            for key, value in state.items()
        }
        path = tmp_path / f"{name}.safetensors"
        safetensors.torch.save_file(half, path)
        notice = f"{name} tensors converted to the model's fp32"
        model = debiformer.create_model("debiformer_nano", num_classes=4, pretrained=path)
        assert capsys.readouterr().err.strip() == f"pretrained weights: {notice}"
        assert_same_tensors(model.state_dict(), {k: v.to(state[k].dtype) for k, v in half.items()})
        _, provenance = weights.build_model(nano_spec(), checkpoint=path)
        assert capsys.readouterr().err.strip() == f"checkpoint weights: {notice}"
        assert provenance.adapted == (notice,)


def test_a_url_is_downloaded_once_into_the_hub_cache_with_its_hash_checked(tmp_path, monkeypatch):
    state = debiformer.create_model("debiformer_nano").state_dict()
    source = tmp_path / "served.pt"
    torch.save(state, source)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    downloads = []

    def download(url, destination, hash_prefix=None, progress=True):
        downloads.append((url, hash_prefix))
        destination_path = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
        assert str(destination_path) == destination
        destination_path.write_bytes(source.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    url = "https://example.org/weights/nano-1a2b3c4d.pt"
    for _ in range(2):
        debiformer.create_model("debiformer_nano", pretrained=url)
    assert downloads == [(url, "1a2b3c4d")]


def test_release_names_are_renamed_to_this_projects():
    renamed = rename_official_state_dict({"downsample_layers.1.0.weight": torch.zeros(1)})
    assert list(renamed) == ["downsamples.0.0.weight"]


# ----------------------------------------------------------------------------- the model service


def nano_spec(**changes) -> weights.ModelSpec:
    return weights.ModelSpec("debiformer_nano", **{"num_classes": 4, **changes})


def test_a_spec_goes_through_plain_dicts_and_a_malformed_one_is_one_line():
    spec = nano_spec(in_chans=1, drop_path=0.1, arch={"attn2_topks": (1, 1, 2, 2)})
    again = weights.ModelSpec.from_dict(spec.to_dict())
    assert again == weights.ModelSpec.from_dict(again.to_dict())
    assert again.arch == {"attn2_topks": [1, 1, 2, 2]} and again.in_chans == 1
    for raw, message in (
        ({"num_classes": 3}, "not a model spec"),
        ({"name": "debiformer_nano", "colour": 1}, "unknown model spec key 'colour'"),
        ({"name": "debiformer_nano", "task": "pose"}, "unknown task 'pose'"),
        ({"name": "debiformer_nano", "num_classes": -1}, "num_classes must be an integer"),
    ):
        with pytest.raises(UserError, match=message) as error:
            weights.ModelSpec.from_dict(raw, "checkpoint x.pt")
        assert str(error.value).startswith("checkpoint x.pt: ") and "\n" not in str(error.value)


def test_build_model_records_where_its_weights_came_from(release_file, tmp_path):
    path, expected = release_file
    model, provenance = weights.build_model(
        weights.ModelSpec("debiformer_tiny", num_classes=10, in_chans=1), pretrained=path
    )
    assert provenance.kind == "pretrained" and provenance.weights == "official"
    assert provenance.adapted == (
        "new 10-way head (the checkpoint's head has 1000 classes)",
        "stem adapted from 3 to 1 input channels",
    )
    random_model, random = weights.build_model(nano_spec())
    assert random == weights.Provenance() and random.describe() == "random"
    trained = random_model.state_dict()
    averaged = debiformer.create_model("debiformer_nano", num_classes=4).state_dict()
    save_checkpoint({"model": trained, "ema": averaged}, tmp_path / "last.pt")
    model, provenance = weights.build_model(nano_spec(), checkpoint=tmp_path / "last.pt", ema=True)
    assert provenance.describe() == f"ema weights of {tmp_path / 'last.pt'}" and provenance.ema
    assert_same_tensors(model.state_dict(), averaged)


def test_create_model_and_build_model_start_from_the_same_weights(release_file):
    path, _ = release_file
    built, _ = weights.build_model(
        weights.ModelSpec("debiformer_tiny", num_classes=10), pretrained=path
    )
    created = debiformer.create_model("debiformer_tiny", num_classes=10, pretrained=path)
    assert_same_tensors(built.state_dict(), created.state_dict())


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ("{model: nano}", "is not JSON"),
        ('["debiformer_nano"]', "is not a JSON object"),
        ('{"model": "debiformer_nano"}', "lacks 'num_classes'"),
        ('{"model_spec": {"name": "debiformer_nano", "num_classes": "4"}}', "num_classes must be"),
        ('{"model_spec": {"name": "debiformer_nano", "arch": {"dims": 64}}}', "arch.dims"),
    ],
)
def test_damaged_export_metadata_is_one_line_naming_the_file(tmp_path, metadata, problem):
    path = tmp_path / "exported.safetensors"
    state = debiformer.create_model("debiformer_nano", num_classes=4).state_dict()
    safetensors.torch.save_file(state, path, metadata={weights.EXPORT_CONFIG_KEY: metadata})
    with pytest.raises(UserError, match=problem) as error:
        weights.spec_of_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"checkpoint {path}: its 'debiformer' metadata ")
    assert message.endswith("export the model again, or give a recipe or a model name")
    assert "\n" not in message
    assert weights.spec_of_checkpoint(path, model="debiformer_nano").num_classes == 4


def test_a_training_checkpoint_alone_rebuilds_its_model(tmp_path):
    spec = nano_spec(arch={"attn2_topks": [1, 1, 2, 2]})
    model, _ = weights.build_model(spec)
    save_checkpoint({"model": model.state_dict(), **weights.spec_entry(spec)}, tmp_path / "a.pt")
    assert weights.spec_of_checkpoint(tmp_path / "a.pt") == spec
    rebuilt, provenance = weights.build_model(spec, checkpoint=tmp_path / "a.pt")
    assert provenance.kind == "checkpoint" and provenance.weights == "model"
    assert_same_tensors(rebuilt.state_dict(), model.state_dict())


def test_older_checkpoints_fall_back_to_their_recipe_and_head_or_ask_for_one(tmp_path):
    from debiformer.recipe import load_recipe, recipe_to_dict

    recipe = load_recipe("quickstart")
    model = debiformer.create_model("debiformer_nano", num_classes=7, in_chans=1)
    stored = {"model": model.state_dict(), "recipe": recipe_to_dict(recipe)}
    save_checkpoint(stored, tmp_path / "old.pt")
    spec = weights.spec_of_checkpoint(tmp_path / "old.pt")
    assert (spec.name, spec.num_classes, spec.in_chans) == ("debiformer_nano", 7, 1)
    assert spec.preprocessing["input_size"] == [1, 32, 32]
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    named = weights.spec_of_checkpoint(tmp_path / "bare.pt", model="debiformer_nano")
    assert (named.num_classes, named.in_chans) == (7, 1)
    with pytest.raises(UserError, match="give a recipe or a model name") as error:
        weights.spec_of_checkpoint(tmp_path / "bare.pt")
    assert "\n" not in str(error.value) and "--" not in str(error.value)


@pytest.mark.parametrize(
    ("task", "options"), [("detection", "retinanet"), ("segmentation", "upernet")]
)
def test_an_older_dense_checkpoint_gives_its_class_count(tmp_path, task, options):
    import dataclasses

    from debiformer.recipe import load_recipe, recipe_to_dict

    recipe = load_recipe(f"quickstart_{task}")
    key = "detector" if task == "detection" else "head"
    section = dataclasses.replace(getattr(recipe, task), **{key: options})
    recipe = dataclasses.replace(recipe, **{task: section})
    model, _ = weights.build_model(weights.ModelSpec.from_recipe(recipe, 6))
    stored = {"model": model.state_dict(), "recipe": recipe_to_dict(recipe)}
    save_checkpoint(stored, tmp_path / "old.pt")
    spec = weights.spec_of_checkpoint(tmp_path / "old.pt")
    assert (spec.task, spec.num_classes, spec.head[key]) == (task, 6, options)
    rebuilt, _ = weights.build_model(spec, checkpoint=tmp_path / "old.pt")
    assert type(rebuilt) is type(model)


@pytest.mark.parametrize(
    ("task", "head", "fresh"),
    [
        ("detection", {"detector": "retinanet", "fpn_channels": 16}, "FPN and RetinaNet head"),
        ("segmentation", {"head": "fpn", "fpn_channels": 16, "channels": 16}, "Semantic FPN"),
    ],
)
def test_a_dense_model_starts_its_backbone_from_a_classifier_and_says_what_starts_fresh(
    tmp_path, capsys, task, head, fresh
):
    """The user's two-step path: a classifier's training checkpoint (10 classes) starts the
    backbone of a detector or segmenter; its head and final norm are left out, and one notice
    names the parts that start fresh."""
    classifier = debiformer.create_model("debiformer_nano", num_classes=10)
    save_checkpoint({"model": classifier.state_dict()}, tmp_path / "best.pt")
    spec = weights.ModelSpec("debiformer_nano", num_classes=5, task=task, head=head)
    model, provenance = weights.build_model(spec, pretrained=tmp_path / "best.pt")
    notices = capsys.readouterr().err.strip().splitlines()
    assert (
        notices[0]
        == "pretrained weights: the checkpoint's 10-class head is left out (the model has none)"
    )
    assert notices[1].startswith("pretrained weights: only the backbone's stem and stages come")
    assert fresh in notices[1] and provenance.adapted[-1] in notices[1]
    body = {
        key.split("body.", 1)[1]: value
        for key, value in model.state_dict().items()
        if "body." in key
    }
    stages = {key: value for key, value in classifier.state_dict().items() if key in body}
    assert stages and any(key.startswith("stages.") for key in stages)
    assert_same_tensors(stages, {key: body[key] for key in stages})
