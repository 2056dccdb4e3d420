"""COCO detection metrics with pycocotools (the optional extra `detection`).

to_coco_results    one image's torchvision detections as COCO result entries (boxes, RLE masks)
gather_results     every rank's result entries on rank 0 under torch.distributed
coco_metrics       COCOeval's AP/AR numbers by name: bbox_ap, bbox_ap50, ..., segm_ap, ...

Nothing here prints: pycocotools' own output is silenced, and the caller reports the numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from debiformer.data.coco import check_segm_ground_truth, pycocotools_module, silenced_stdout

if TYPE_CHECKING:
    from pycocotools.coco import COCO


# COCOeval.stats index of each reported number (bbox and segm share the layout). An entry is -1
# where it is undefined, e.g. ap_small when the ground truth has no small objects: COCO's own
# convention, passed on as is.
STAT_INDEX = {
    "ap": 0,  # AP averaged over IoU 0.50:0.95, all areas, 100 detections per image
    "ap50": 1,
    "ap75": 2,
    "ap_small": 3,  # area < 32^2
    "ap_medium": 4,  # 32^2 <= area < 96^2
    "ap_large": 5,  # area >= 96^2
    "ar100": 8,  # recall averaged over IoU 0.50:0.95, 100 detections per image
}
IOU_TYPES = ("bbox", "segm")


# ----------------------------------------------------------------------------- predictions


def to_coco_results(
    image_id: int, prediction: dict[str, torch.Tensor], mask_threshold: float = 0.5
) -> list[dict]:
    """COCO result entries for one image's detections as torchvision's detectors return them:
    `boxes` (N, 4) xyxy pixels, `scores` (N,), `labels` (N,) category ids, and optionally `masks`
    (N, 1, H, W) probabilities, kept where > mask_threshold and encoded as compressed RLE with
    `counts` as str (JSON-serialisable)."""
    boxes = prediction["boxes"].detach().cpu().double()
    if len(boxes) == 0:
        return []
    boxes_xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
    results = [
        {"image_id": image_id, "category_id": label, "bbox": box, "score": score}
        for box, score, label in zip(
            boxes_xywh.tolist(),
            prediction["scores"].detach().cpu().double().tolist(),
            prediction["labels"].detach().cpu().tolist(),
            strict=True,
        )
    ]
    if "masks" in prediction:
        masks = prediction["masks"].detach()[:, 0] > mask_threshold
        for result, rle in zip(results, encode_masks(masks), strict=True):
            result["segmentation"] = rle
    return results


def encode_masks(masks: torch.Tensor) -> list[dict]:
    """Compressed RLEs of boolean masks (N, H, W), their `counts` decoded to str."""
    mask_module = pycocotools_module("mask")
    stacked = np.asfortranarray(masks.cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    rles = mask_module.encode(stacked)
    return [{"size": rle["size"], "counts": rle["counts"].decode("ascii")} for rle in rles]


def gather_results(results: list[dict]) -> list[dict]:
    """All ranks' result entries on rank 0 (other ranks get []) when torch.distributed is
    initialised; `results` itself otherwise. Under NCCL the current CUDA device must be set."""
    if not (dist.is_available() and dist.is_initialized()):
        return results
    is_main = dist.get_rank() == 0
    per_rank = [None] * dist.get_world_size() if is_main else None
    dist.gather_object(results, per_rank, dst=0)
    return [result for rank_results in per_rank for result in rank_results] if is_main else []


# ----------------------------------------------------------------------------- metrics


def metric_names(iou_type: str) -> list[str]:
    """The names coco_metrics reports for one iou type: bbox_ap, bbox_ap50, ..., bbox_ar100."""
    return [f"{iou_type}_{stat}" for stat in STAT_INDEX]


def coco_metrics(
    ground_truth: COCO, results: list[dict], iou_types: tuple[str, ...] = ("bbox",)
) -> dict[str, float]:
    """COCOeval's numbers (fractions 0-1) for `results` against `ground_truth`, over all of its
    images (those without detections count as misses), per iou type ("bbox", "segm"): named
    <type>_ap, _ap50, _ap75, _ap_small, _ap_medium, _ap_large, _ar100 (see STAT_INDEX; -1 where
    the ground truth has no objects of a size). With no results every number is 0.0."""
    unknown = [iou_type for iou_type in iou_types if iou_type not in IOU_TYPES]
    if unknown:
        raise ValueError(f"iou types {unknown}: COCO metrics support {IOU_TYPES}")
    unknown_images = {result["image_id"] for result in results} - set(ground_truth.getImgIds())
    if unknown_images:
        raise ValueError(f"results for image ids not in the ground truth: {sorted(unknown_images)}")
    if "segm" in iou_types:
        check_segm_ground_truth(ground_truth)
    metrics = {}
    for iou_type in iou_types:
        stats = evaluate(ground_truth, results_for(iou_type, results), iou_type)
        for name, stat in zip(metric_names(iou_type), stats, strict=True):
            metrics[name] = stat
    return metrics


def results_for(iou_type: str, results: list[dict]) -> list[dict]:
    """Copies of the entries COCOeval reads for `iou_type` (loadRes writes into its input).
    For segm the boxes are left out, so that loadRes takes a detection's area from its mask, not
    its box (as the ground truth's areas do), when sorting detections into small/medium/large."""
    if iou_type == "bbox":
        return [dict(result) for result in results]
    if any("segmentation" not in result for result in results):
        raise ValueError("segm metrics need a 'segmentation' (mask) in every result entry")
    return [{key: value for key, value in result.items() if key != "bbox"} for result in results]


def evaluate(ground_truth: COCO, results: list[dict], iou_type: str) -> list[float]:
    """The STAT_INDEX entries of COCOeval.stats for one iou type; zeros when there are no
    results (pycocotools' loadRes cannot take an empty list)."""
    if not results:
        return [0.0] * len(STAT_INDEX)
    cocoeval_module = pycocotools_module("cocoeval")
    with silenced_stdout():
        detections = ground_truth.loadRes(results)
        evaluation = cocoeval_module.COCOeval(ground_truth, detections, iouType=iou_type)
        # every ground-truth image, those without detections too (COCOeval's default, made explicit)
        evaluation.params.imgIds = sorted(ground_truth.getImgIds())
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [float(evaluation.stats[index]) for index in STAT_INDEX.values()]
