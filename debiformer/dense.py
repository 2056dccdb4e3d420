"""The DeBiFormer backbone as dense-prediction heads take it: its four stage maps, each
layer-normalised (the release's detection and segmentation backbones' `extra_norms`).

    images -> stem, stages 1..4 (strides 4, 8, 16, 32) -> a LayerNorm2d per map -> a head

`build_body` makes the backbone a recipe names, started from `model.pretrained` when set;
`StageMaps` runs it. Detectors (`debiformer.detection`) put an FPN on top, segmenters
(`debiformer.segmentation`) a Semantic FPN or UperNet head.
"""

from __future__ import annotations

from timm.layers import LayerNorm2d
from torch import Tensor, nn

from debiformer.model import DeBiFormer, create_model
from debiformer.recipe import ModelConfig
from debiformer.weights import load_pretrained


def build_body(model: ModelConfig) -> DeBiFormer:
    """The recipe's DeBiFormer without head and final norm, started from `model.pretrained`
    (its classifier left out) when set."""
    body = create_model(model.name, num_classes=0, drop_path_rate=model.drop_path, **model.arch)
    if model.pretrained is not None:
        load_pretrained(body, model.pretrained, use_ema=model.pretrained_ema)
    body.prune_intermediate_layers(indices=4, prune_norm=True, prune_head=True)
    return body


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
