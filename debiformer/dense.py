"""The DeBiFormer backbone as dense-prediction heads take it: its four stage maps, each
layer-normalised (the release's detection and segmentation backbones' `extra_norms`).

    images -> stem, stages 1..4 (strides 4, 8, 16, 32) -> a LayerNorm2d per map -> a head

`build_body` makes the backbone of a model spec through `weights.build_model` (so a pretrained
start is the classifier's), `StageMaps` runs it. Detectors (`debiformer.detection`) put an FPN on
top, segmenters (`debiformer.segmentation`) a Semantic FPN or UperNet head.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from debiformer.model import DeBiFormer
from debiformer.weights import ModelSpec, Provenance, build_model


def build_body(
    spec: ModelSpec,
    *,
    pretrained: str | Path | None = None,
    ema: bool = False,
    console: Console | None = None,
) -> tuple[DeBiFormer, Provenance]:
    """The DeBiFormer of `spec` (a dense model's, or its `backbone()`) without head and final
    norm, started from `pretrained` (its classifier left out; `ema`: a training checkpoint's EMA
    weights) when given."""
    body, provenance = build_model(spec.backbone(), pretrained=pretrained, ema=ema, console=console)
    body.prune_intermediate_layers(indices=4, prune_norm=True, prune_head=True)
    return body, provenance


class StageMaps(nn.Module):
    """The maps of stages `stages` (0-based) of `body`, each through its own LayerNorm2d."""

    def __init__(self, body: DeBiFormer, stages: list[int]) -> None:
        super().__init__()
        self.body = body
        self.stages = stages
        self.channels = [body.feature_info[stage]["num_chs"] for stage in stages]
        self.norms = nn.ModuleList(LayerNorm2d(width) for width in self.channels)

    def forward(self, images: Tensor) -> list[Tensor]:
        maps = self.body.stage_maps(images, last_stage=self.stages[-1])
        return [norm(maps[stage]) for stage, norm in zip(self.stages, self.norms, strict=True)]
