"""Detectors on a DeBiFormer backbone: torchvision's Mask R-CNN and RetinaNet, nothing rewritten.

    images -> DeBiFormer stage maps, a LayerNorm per map (`debiformer.dense`) -> torchvision's
    FeaturePyramidNetwork -> the detector

- Mask R-CNN: the FPN over all four maps plus a max-pooled level, P2-P6 (LastLevelMaxPool).
- RetinaNet: the FPN over the last three maps plus P6 and P7 computed from C5 (LastLevelP6P7),
  P3-P7, as the release's `add_extra_convs='on_input'`.

Anchors, samplers, heads and losses are torchvision's defaults, which follow the same papers as
the release's mmdetection configs; images are normalised with the ImageNet mean and std and
resized so the shorter side is `min_size` (the longer at most `max_size`).
"""

from __future__ import annotations

from collections import OrderedDict

from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from debiformer.dense import StageMaps
from debiformer.model import DeBiFormer
from debiformer.recipe import DetectionConfig

# the stage maps each detector's FPN reads
FPN_STAGES = {"maskrcnn": [0, 1, 2, 3], "retinanet": [1, 2, 3]}
# the weights whose rows are (object classes + background) x anchors per location
CLASS_LOGITS = {
    "maskrcnn": "roi_heads.box_predictor.cls_score.weight",
    "retinanet": "head.classification_head.cls_logits.weight",
}
# torchvision's default RetinaNet anchors per location: 3 sizes x 3 aspect ratios
RETINANET_ANCHORS = 9


class FeaturePyramidBackbone(StageMaps):
    """DeBiFormer's stage maps, each layer-normalised, through an FPN: an ordered dict of maps
    with `out_channels` channels, as torchvision's detectors take a backbone."""

    def __init__(
        self,
        body: DeBiFormer,
        stages: list[int],
        out_channels: int,
        extra_blocks: ExtraFPNBlock | None = None,
    ) -> None:
        super().__init__(body, stages)
        self.fpn = FeaturePyramidNetwork(self.channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        maps = super().forward(images)
        return self.fpn(OrderedDict(zip(map(str, self.stages), maps, strict=True)))


def build_detector(body: DeBiFormer, detection: DetectionConfig, num_classes: int) -> nn.Module:
    """torchvision's Mask R-CNN or RetinaNet on `body` (`dense.build_body`), for `num_classes`
    object classes (labels 1..num_classes; 0 is the background)."""
    width = detection.fpn_channels
    common = dict(
        min_size=detection.min_size,
        max_size=detection.max_size,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )
    if detection.detector == "retinanet":
        last_channels = body.feature_info[3]["num_chs"]
        backbone = FeaturePyramidBackbone(
            body, FPN_STAGES["retinanet"], width, LastLevelP6P7(last_channels, width)
        )
        return RetinaNet(
            backbone,
            num_classes=num_classes + 1,
            detections_per_img=detection.detections_per_image,
            **common,
        )
    backbone = FeaturePyramidBackbone(body, FPN_STAGES["maskrcnn"], width, LastLevelMaxPool())
    classes = num_classes + 1
    return MaskRCNN(
        backbone,
        num_classes=None,
        box_head=TwoMLPHead(width * 7 * 7, detection.representation_size),
        box_predictor=FastRCNNPredictor(detection.representation_size, classes),
        rpn_post_nms_top_n_train=detection.rpn_proposals,
        rpn_post_nms_top_n_test=detection.rpn_proposals,
        box_batch_size_per_image=detection.rois_per_image,
        box_detections_per_img=detection.detections_per_image,
        mask_head=MaskRCNNHeads(width, [width] * 4, 1),
        mask_predictor=MaskRCNNPredictor(width, width, classes),
        **common,
    )


def detector_classes(state: dict[str, Tensor], detector: str) -> int:
    """The object classes (background not counted) of a `detector`'s weights in `state`; 0 for
    weights without its classifier."""
    if CLASS_LOGITS[detector] not in state:
        return 0
    rows = state[CLASS_LOGITS[detector]].shape[0]
    anchors = RETINANET_ANCHORS if detector == "retinanet" else 1
    return rows // anchors - 1
