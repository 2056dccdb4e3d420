"""The segmenters: Semantic FPN and UperNet built as the release's mmseg configs describe them,
logits at the input's size for any size, the auxiliary head only in training, pretrained
backbones loaded."""

import pytest
import torch
from torch import nn

import debiformer
from debiformer.segmentation import SemanticFPNHead, UperNetHead
from debiformer.weights import ModelSpec, build_model

SMALL_BACKBONE = {"dims": [32, 32, 32, 32], "depths": [1, 1, 1, 1], "offset_groups": [1, 1, 1, 1]}


def segmenter(head: str, pretrained: str | None = None) -> nn.Module:
    """A nano segmenter of 5 classes on a small backbone, through `weights.build_model`."""
    spec = ModelSpec(
        "debiformer_nano",
        task="segmentation",
        num_classes=5,
        arch=SMALL_BACKBONE,
        head={"head": head, "fpn_channels": 16, "channels": 24, "aux_channels": 8},
    )
    return build_model(spec, pretrained=pretrained)[0]


@pytest.mark.parametrize("head", ["fpn", "upernet"])
@pytest.mark.parametrize("size", [(64, 64), (70, 97)])
def test_logits_come_at_the_input_size(head, size):
    torch.manual_seed(0)
    model = segmenter(head).eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, *size))
    assert set(outputs) == {"out"}
    assert outputs["out"].shape == (2, 5, *size)


def test_upernet_adds_the_auxiliary_logits_in_training_only():
    model = segmenter("upernet").train()
    outputs = model(torch.randn(2, 3, 64, 64))
    assert set(outputs) == {"out", "aux"} and outputs["aux"].shape == (2, 5, 64, 64)
    (outputs["out"].mean() + outputs["aux"].mean()).backward()
    assert model.aux_head[0][0].weight.grad is not None
    assert set(segmenter("fpn").train()(torch.randn(2, 3, 64, 64))) == {"out"}


def test_semantic_fpn_head_brings_each_level_to_stride_4_as_mmseg_does():
    head = SemanticFPNHead(in_channels=16, channels=8, num_classes=3, dropout=0.1)
    convs = [sum(isinstance(m, nn.Conv2d) for m in level.modules()) for level in head.scale_heads]
    upsamples = [
        sum(isinstance(m, nn.Upsample) for m in level.modules()) for level in head.scale_heads
    ]
    assert convs == [1, 1, 2, 3] and upsamples == [0, 1, 2, 3]
    maps = [torch.randn(1, 16, 32 // s, 32 // s) for s in (1, 2, 4, 8)]
    assert head(maps).shape == (1, 3, 32, 32)
    assert all(
        conv.bias is None for conv in head.scale_heads.modules() if isinstance(conv, nn.Conv2d)
    )


def test_upernet_head_pools_at_bins_1_2_3_6_and_fuses_four_levels():
    head = UperNetHead([8, 16, 24, 32], channels=12, num_classes=3, dropout=0.1)
    bins = [pool[0].output_size for pool in head.pyramid_pooling.pools]
    assert bins == [1, 2, 3, 6]
    assert head.fuse[0].in_channels == 4 * 12
    maps = [
        torch.randn(2, c, 32 // s, 32 // s)
        for c, s in zip([8, 16, 24, 32], (1, 2, 4, 8), strict=True)
    ]
    assert head(maps).shape == (2, 3, 32, 32)


def test_a_classifier_checkpoint_starts_the_backbone(tmp_path):
    classifier = debiformer.create_model("debiformer_nano", num_classes=7, **SMALL_BACKBONE)
    path = tmp_path / "classifier.pt"
    torch.save({"model": classifier.state_dict()}, path)
    model = segmenter("upernet", pretrained=str(path))
    body = model.backbone.body.state_dict()
    for name, tensor in classifier.state_dict().items():
        if name in body:
            assert torch.equal(body[name], tensor), name
    assert not any(name.startswith(("head.", "norm.")) for name in body)
