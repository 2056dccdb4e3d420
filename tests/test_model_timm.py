"""timm's model contract for every variant: the pretrained config timm's data tools read,
`features_only`, `forward_intermediates`, the head API, layer-wise lr decay groups, torch.fx, and
pretrained files read by this project's safe loader."""

import pytest
import safetensors.torch
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config
from timm.models import create_feature_extractor
from timm.optim import param_groups_layer_decay

import debiformer.model  # registers the variants with timm
from debiformer.errors import UserError
from tests.helpers.payloads import malicious_files

VARIANTS = ["debiformer_nano", "debiformer_tiny", "debiformer_small", "debiformer_base"]


@pytest.mark.parametrize(
    "name", [*VARIANTS[:-1], pytest.param("debiformer_base", marks=pytest.mark.slow)]
)
def test_features_only_gives_four_maps_at_strides_4_to_32(name):
    extractor = timm.create_model(name, features_only=True).eval()
    channels = extractor.feature_info.channels()
    assert extractor.feature_info.reduction() == [4, 8, 16, 32]
    for height, width in ((97, 131), (64, 64)):
        with torch.no_grad():
            maps = extractor(torch.randn(1, 3, height, width))
        assert [m.shape[1] for m in maps] == channels
        assert [m.shape[2:] for m in maps] == [
            (-(-height // s), -(-width // s)) for s in (4, 8, 16, 32)
        ]


def test_tiny_features_have_the_release_channels_and_take_out_indices():
    extractor = timm.create_model("debiformer_tiny", features_only=True, out_indices=(1, 3))
    assert extractor.feature_info.channels() == [128, 512]
    with torch.no_grad():
        maps = extractor.eval()(torch.randn(1, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [(1, 128, 28, 28), (1, 512, 7, 7)]


def test_data_config_is_the_release_evaluation_transform():
    config = resolve_data_config({}, model=debiformer.create_model("debiformer_tiny"))
    assert config["mean"] == IMAGENET_DEFAULT_MEAN and config["std"] == IMAGENET_DEFAULT_STD
    assert (config["crop_pct"], config["interpolation"]) == (0.875, "bicubic")
    assert config["input_size"] == (3, 224, 224)


def test_forward_features_head_and_intermediates_agree():
    model = debiformer.create_model("debiformer_nano", num_classes=7).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(images)
        maps = model.stage_maps(images)
        final, intermediates = model.forward_intermediates(images)
        last_two = model.forward_intermediates(images, indices=2, intermediates_only=True)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model(images)
    assert features.shape == (2, 256, 2, 2)
    assert torch.equal(features, model.norm(maps[-1])) and torch.equal(final, features)
    assert all(torch.equal(a, b) for a, b in zip(intermediates, maps, strict=True))
    assert [m.shape[1] for m in last_two] == [128, 256]
    assert pooled.shape == (2, 256) and torch.equal(logits, model.get_classifier()(pooled))


ALL_VARIANTS = [*VARIANTS[:-1], pytest.param("debiformer_base", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_pooling_and_config_names_hold_as_timm_tests_them(name):
    """At the config's input size: the unpooled map matches `pool_size`; without a head the
    output is pooled to `num_features`; with `global_pool=''` (from `create_model` or
    `reset_classifier`) it is the 4-d last map; the config's classifier and first conv exist."""
    model = timm.create_model(name).eval()
    cfg, state = model.pretrained_cfg, model.state_dict()
    images = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        features = model.forward_features(images)
        assert features.shape[-2:] == cfg["pool_size"]
        model.reset_classifier(0)
        assert model(images).shape == (1, model.num_features)
        model.reset_classifier(0, "")
        assert torch.equal(model(images), features)
        assert torch.equal(model.forward_head(features), features)
    unpooled = timm.create_model(name, num_classes=0, global_pool="")
    unpooled.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(unpooled.eval()(images), features)
    assert f"{cfg['classifier']}.weight" in state and f"{cfg['first_conv']}.weight" in state


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_every_parameter_gets_a_gradient_for_a_new_head(name):
    model = timm.create_model(name, num_classes=42).train()
    outputs = model(torch.randn(2, 3, 128, 128))
    outputs.mean().backward()
    assert outputs.shape == (2, 42) and not outputs.isnan().any()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_unpooled_head_gives_logits_at_every_position_that_average_to_the_pooled_ones():
    model = debiformer.create_model("debiformer_nano", num_classes=5).eval()
    images = torch.randn(2, 3, 64, 64)
    head = model.get_classifier().state_dict()
    with torch.no_grad():
        pooled_logits = model(images)
        model.reset_classifier(5, "")
        model.get_classifier().load_state_dict(head)
        position_logits = model(images)
    assert position_logits.shape == (2, 5, 2, 2)
    torch.testing.assert_close(position_logits.mean(dim=(2, 3)), pooled_logits)


def test_other_pooling_is_a_one_line_error():
    with pytest.raises(UserError, match="global_pool: expected 'avg'.*got 'max'"):
        timm.create_model("debiformer_nano", global_pool="max")
    model = debiformer.create_model("debiformer_nano")
    with pytest.raises(UserError, match="global_pool"):
        model.reset_classifier(0, "token")
    assert model.global_pool == "avg"


def test_reset_classifier_replaces_the_head():
    model = debiformer.create_model("debiformer_nano").eval()
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 256)


def test_no_weight_decay_names_the_position_bias_tables():
    model = debiformer.create_model("debiformer_tiny")
    names = model.no_weight_decay()
    assert names and all(name.endswith("rpe_table") for name in names)
    assert len(names) == sum(1 for name, _ in model.named_parameters() if "rpe_table" in name)


def test_layer_decay_groups_follow_depth():
    model = debiformer.create_model("debiformer_tiny")
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    covered = sum(len(group["params"]) for group in groups)
    assert covered == len(list(model.parameters()))
    scale = {id(p): group["lr_scale"] for group in groups for p in group["params"]}
    named = dict(model.named_parameters())
    stem = scale[id(named["stem.0.weight"])]
    first_block = scale[id(named["stages.0.0.mlp1.fc1.weight"])]
    last_block = scale[id(named["stages.3.0.mlp1.fc1.weight"])]
    head = scale[id(named["head.weight"])]
    assert stem < first_block < last_block < head == 1.0


@pytest.mark.slow
def test_torch_fx_extracts_features_and_the_model_trains_at_the_config_size():
    model = debiformer.create_model("debiformer_tiny", num_classes=5)
    extractor = create_feature_extractor(model.eval(), return_nodes={"norm": "features"})
    images = torch.randn(1, 3, *model.pretrained_cfg["input_size"][1:])
    with torch.no_grad():
        assert torch.equal(extractor(images)["features"], model.forward_features(images))
    model.train()
    model(torch.randn(2, *model.pretrained_cfg["input_size"])).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_timm_pretrained_files_go_through_the_safe_loader(tmp_path):
    """`pretrained_cfg_overlay=dict(file=...)` reads the file as `create_model(pretrained=...)`
    does: a damaged file or a pickled payload is our one-line refusal, never timm's advice to
    load with `weights_only=False`, and the payload never runs."""
    state = debiformer.create_model("debiformer_nano").state_dict()
    safetensors.torch.save_file(state, tmp_path / "whole.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "whole.safetensors").read_bytes()[:1000])
    payload = malicious_files(tmp_path)[0]
    for path, message in ((truncated, "not a readable safetensors file"), (payload, "refused")):
        with pytest.raises(UserError, match=message) as error:
            timm.create_model(
                "debiformer_nano", pretrained=True, pretrained_cfg_overlay={"file": str(path)}
            )
        assert str(path) in str(error.value) and "\n" not in str(error.value)
        assert "weights_only" not in str(error.value)
    assert not (tmp_path / "PWNED").exists()
