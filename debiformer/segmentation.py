"""Semantic segmenters on a DeBiFormer backbone: Semantic FPN and UperNet, as the release's
mmsegmentation configs build them.

    images -> DeBiFormer stage maps, a LayerNorm per map (`debiformer.dense`) -> a head
           -> class logits at stride 4 -> upsampled (bilinear) to the input size

- Semantic FPN (Kirillov et al. 2019): torchvision's FeaturePyramidNetwork (256 channels, the
  release's `FPN` neck) over the four maps; per level, 3x3 conv-BN-ReLU blocks each followed by
  a 2x upsampling until stride 4 (one block at stride 4); the levels summed; dropout; a 1x1
  classifier (mmseg's `FPNHead`, 128 channels).
- UperNet (Xiao et al. 2018): a pyramid pooling module (bins 1, 2, 3, 6) on stage 4, lateral
  1x1 convs on stages 1-3 merged top-down, 3x3 convs, all levels upsampled to stride 4 and
  fused by a 3x3 conv (mmseg's `UPerHead`, 512 channels); during training an auxiliary FCN head
  on stage 3 (one 3x3 conv of 256 channels, mmseg's `FCNHead`), its loss weighted 0.4.

segmentation_models_pytorch's FPN and UPerNet decoders were not used: its FPN decoder has no
3x3 output convolutions in the pyramid and normalises with GroupNorm, and its UPerNet has no
auxiliary FCN head; both would change the heads the release's numbers come from.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from debiformer.dense import StageMaps
from debiformer.detection import FeaturePyramidBackbone
from debiformer.model import DeBiFormer
from debiformer.recipe import SegmentationConfig

ALL_STAGES = [0, 1, 2, 3]
STRIDES = [4, 8, 16, 32]
# the segmenter's class logits: rows = classes
CLASS_LOGITS = "head.classifier.1.weight"


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
    """mmcv's ConvModule with BN and ReLU: a bias-free conv ('same' padding), BatchNorm, ReLU."""
    return Conv2dNormActivation(in_channels, out_channels, kernel_size, bias=False)


def upsample(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """`x` resized bilinearly to `size` (align_corners=False, as the release's heads)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Classifier(nn.Sequential):
    """mmseg's `cls_seg`: 2-D dropout, then a 1x1 conv to class logits."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float) -> None:
        super().__init__(nn.Dropout2d(dropout), nn.Conv2d(in_channels, num_classes, 1))


class SemanticFPNHead(nn.Module):
    """Semantic FPN's head on FPN maps of strides 4-32: each level brought to stride 4 by
    conv-BN-ReLU + 2x upsampling blocks, summed, classified."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for stride in STRIDES:
            blocks: list[nn.Module] = []
            for k in range(max(1, int(math.log2(stride) - 2))):
                blocks.append(conv_bn_relu(in_channels if k == 0 else channels, channels, 3))
                if stride != STRIDES[0]:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear"))
            self.scale_heads.append(nn.Sequential(*blocks))
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, maps: list[Tensor]) -> Tensor:
        fused = self.scale_heads[0](maps[0])
        for scale_head, level in zip(self.scale_heads[1:], maps[1:], strict=True):
            fused = fused + upsample(scale_head(level), fused.shape[-2:])
        return self.classifier(fused)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling on one map: average-pooled to each bin count, 1x1 conv-BN-ReLU,
    upsampled back, concatenated with the map, fused by a 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, channels: int, bins: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.pools = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(bin_count), conv_bn_relu(in_channels, channels, 1))
            for bin_count in bins
        )
        self.bottleneck = conv_bn_relu(in_channels + len(bins) * channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        pooled = [upsample(pool(x), x.shape[-2:]) for pool in self.pools]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperNetHead(nn.Module):
    """UperNet's head on the four stage maps: pyramid pooling on the last, an FPN over all,
    every level upsampled to stride 4, fused, classified."""

    def __init__(
        self, in_channels: list[int], channels: int, num_classes: int, dropout: float
    ) -> None:
        super().__init__()
        self.pyramid_pooling = PyramidPooling(in_channels[-1], channels)
        self.laterals = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(
            conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1]
        )
        self.fuse = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, maps: list[Tensor]) -> Tensor:
        levels = [lateral(m) for lateral, m in zip(self.laterals, maps, strict=False)]
        levels.append(self.pyramid_pooling(maps[-1]))
        for i in range(len(levels) - 1, 0, -1):
            levels[i - 1] = levels[i - 1] + upsample(levels[i], levels[i - 1].shape[-2:])
        outputs = [conv(level) for conv, level in zip(self.fpn_convs, levels, strict=False)]
        outputs.append(levels[-1])
        size = outputs[0].shape[-2:]
        fused = self.fuse(torch.cat([upsample(out, size) for out in outputs], dim=1))
        return self.classifier(fused)


class FCNHead(nn.Sequential):
    """The auxiliary head: one 3x3 conv-BN-ReLU and a classifier (mmseg's FCNHead with
    num_convs=1, concat_input=False)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float):
        super().__init__(
            conv_bn_relu(in_channels, channels, 3), Classifier(channels, num_classes, dropout)
        )


class Segmenter(nn.Module):
    """Backbone + decode head (+ auxiliary head): `forward(images)` gives a dict with "out", the
    class logits at the input size, and in training with an auxiliary head also "aux"."""

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        aux_head: nn.Module | None = None,
        aux_stage: int = 2,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.aux_stage = aux_stage

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        maps = self.backbone(images)
        if isinstance(maps, dict):
            maps = list(maps.values())
        size = images.shape[-2:]
        outputs = {"out": upsample(self.head(maps), size)}
        if self.aux_head is not None and self.training:
            outputs["aux"] = upsample(self.aux_head(maps[self.aux_stage]), size)
        return outputs


def build_segmenter(
    body: DeBiFormer, segmentation: SegmentationConfig, num_classes: int
) -> Segmenter:
    """The recipe's Semantic FPN or UperNet on `body` (`dense.build_body`), for `num_classes`
    classes."""
    dropout = segmentation.dropout
    if segmentation.head == "fpn":
        width = segmentation.fpn_channels
        backbone = FeaturePyramidBackbone(body, ALL_STAGES, width)
        head = SemanticFPNHead(width, segmentation.channels, num_classes, dropout)
        return Segmenter(backbone, head)
    backbone = StageMaps(body, ALL_STAGES)
    head = UperNetHead(backbone.channels, segmentation.channels, num_classes, dropout)
    aux_head = None
    if segmentation.aux_weight > 0:
        aux_head = FCNHead(backbone.channels[2], segmentation.aux_channels, num_classes, dropout)
    return Segmenter(backbone, head, aux_head)


def segmenter_classes(state: dict[str, Tensor]) -> int:
    """The class count of a segmenter's weights in `state`: the rows of its head's classifier
    (0 for weights without one)."""
    return state[CLASS_LOGITS].shape[0] if CLASS_LOGITS in state else 0
