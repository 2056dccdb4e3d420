"""COCO detection metrics on hand-built annotation files: perfect predictions, AP computed by hand
for a shifted box and for misses and false positives, result conversion, annotation-file errors,
gathering across ranks."""

import datetime
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools import mask as coco_mask

from debiformer.data.coco import load_coco
from debiformer.errors import UserError
from debiformer.tasks.coco_metrics import (
    coco_metrics,
    gather_results,
    metric_names,
    to_coco_results,
)
from tests.helpers.coco_files import box_annotation, image, write_coco

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's AP averages over these
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # ... interpolating precision at these recalls


def prediction(boxes: list[list[float]], labels: list[int], scores: list[float]) -> dict:
    """A torchvision-style detection output for [x, y, w, h] boxes (converted to xyxy)."""
    xywh = torch.tensor(boxes, dtype=torch.float32)
    return {
        "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "scores": torch.tensor(scores, dtype=torch.float32),
    }


def interpolated_ap(hits: list[bool], num_objects: int) -> float:
    """COCO's 101-point AP of detections sorted by score (True: it matched an object): precision
    at recall r is the best precision at any recall >= r, and 0 beyond the highest recall."""
    true_positives = np.cumsum(hits)
    recall = true_positives / num_objects
    precision = true_positives / np.arange(1, len(hits) + 1)
    interpolated = [
        max((p for p, r in zip(precision, recall, strict=True) if r >= t), default=0.0)
        for t in RECALL_THRESHOLDS
    ]
    return float(np.mean(interpolated))


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("segmentation", ["polygon", "rle"])
def test_perfect_predictions_give_ap_one(tmp_path, segmentation):
    annotations = [
        box_annotation(1, 1, 1, [10, 10, 20, 20]),  # small
        box_annotation(2, 1, 1, [60, 30, 50, 40]),  # medium
        box_annotation(3, 1, 2, [30, 80, 120, 100]),  # large
        box_annotation(4, 2, 2, [5, 5, 150, 90]),
    ]
    path = write_coco(tmp_path, [image(1), image(2)], annotations)
    ground_truth = load_coco(path)
    if segmentation == "rle":
        for annotation in ground_truth.dataset["annotations"]:
            rle = ground_truth.annToRLE(annotation)
            annotation["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}

    results = []
    for image_id in (1, 2):
        objects = ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=image_id))
        output = prediction(
            [a["bbox"] for a in objects], [a["category_id"] for a in objects], [1.0] * len(objects)
        )
        masks = torch.stack([torch.from_numpy(ground_truth.annToMask(a)) for a in objects])
        output["masks"] = (0.1 + 0.8 * masks.float())[:, None]  # probabilities around 0.5
        results += to_coco_results(image_id, output)

    metrics = coco_metrics(ground_truth, results, iou_types=("bbox", "segm"))
    assert set(metrics) == set(metric_names("bbox") + metric_names("segm"))
    for iou_type in ("bbox", "segm"):
        for stat in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar100"):
            # pycocotools' precision is tp / (tp + fp + eps): 1 - 2e-16 at best
            assert metrics[f"{iou_type}_{stat}"] == pytest.approx(1.0), f"{iou_type}_{stat}"


def test_shifted_box_lowers_ap_to_the_thresholds_its_iou_passes(tmp_path, capsys):
    side, shift = 100, 19
    path = write_coco(tmp_path, [image(1)], [box_annotation(1, 1, 1, [20, 20, side, side])])
    ground_truth = load_coco(path)
    results = to_coco_results(1, prediction([[20 + shift, 20, side, side]], [1], [1.0]))

    metrics = coco_metrics(ground_truth, results)

    overlap = (side - shift) * side
    iou = overlap / (2 * side * side - overlap)  # 81/119 = 0.68: passes 0.50..0.65
    assert metrics["bbox_ap"] == pytest.approx(np.mean(iou >= IOU_THRESHOLDS))  # 0.4
    assert metrics["bbox_ap50"] == pytest.approx(float(iou >= 0.5))  # 1
    assert metrics["bbox_ap75"] == pytest.approx(float(iou >= 0.75))  # 0
    assert metrics["bbox_ap_large"] == pytest.approx(metrics["bbox_ap"])  # 100x100 > 96x96
    assert metrics["bbox_ap_small"] == metrics["bbox_ap_medium"] == -1.0  # no such objects
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced


def test_a_missed_object_lowers_ap_to_the_interpolated_precision(tmp_path):
    objects = [
        box_annotation(1, 1, 1, [10, 10, 100, 100]),
        box_annotation(2, 1, 1, [5, 120, 90, 70]),
    ]
    ground_truth = load_coco(write_coco(tmp_path, [image(1), image(2)], objects))
    results = to_coco_results(1, prediction([[10, 10, 100, 100]], [1], [0.9]))

    metrics = coco_metrics(ground_truth, results)

    expected = interpolated_ap([True], num_objects=2)  # recall 0.5: 51 of 101 points
    assert metrics["bbox_ap"] == pytest.approx(expected)
    assert metrics["bbox_ap50"] == pytest.approx(expected)
    assert metrics["bbox_ar100"] == pytest.approx(0.5)


def test_a_false_positive_of_another_class_lowers_that_class_ap(tmp_path):
    cat_box, dog_box = [10, 10, 100, 100], [40, 50, 120, 110]
    objects = [box_annotation(1, 1, 1, cat_box), box_annotation(2, 2, 2, dog_box)]
    ground_truth = load_coco(write_coco(tmp_path, [image(1), image(2)], objects))
    # image 1: the cat found, and also called a dog with a higher score; image 2: the dog found
    results = to_coco_results(1, prediction([cat_box, cat_box], [1, 2], [0.8, 0.9]))
    results += to_coco_results(2, prediction([dog_box], [2], [0.7]))

    metrics = coco_metrics(ground_truth, results)

    cat_ap = interpolated_ap([True], num_objects=1)
    dog_ap = interpolated_ap([False, True], num_objects=1)  # the false dog ranks first
    assert (cat_ap, dog_ap) == (1.0, 0.5)
    assert metrics["bbox_ap"] == pytest.approx((cat_ap + dog_ap) / 2)


def test_no_results_give_zeros(tmp_path):
    ground_truth = load_coco(
        write_coco(tmp_path, [image(1)], [box_annotation(1, 1, 1, [0, 0, 9, 9])])
    )
    metrics = coco_metrics(ground_truth, [], iou_types=("bbox", "segm"))
    assert metrics == dict.fromkeys(metric_names("bbox") + metric_names("segm"), 0.0)


def test_segm_metrics_need_ground_truth_segmentations(tmp_path):
    annotation = box_annotation(7, 1, 1, [0, 0, 9, 9])
    del annotation["segmentation"]
    ground_truth = load_coco(write_coco(tmp_path, [image(1)], [annotation]))
    output = prediction([[0, 0, 9, 9]], [1], [1.0])
    output["masks"] = torch.ones(1, 1, 200, 200)
    with pytest.raises(UserError, match=r"annotations\[0\] \(id 7\): no 'segmentation'"):
        coco_metrics(ground_truth, to_coco_results(1, output), iou_types=("segm",))


# ----------------------------------------------------------------------------- conversion


def test_to_coco_results_converts_boxes_and_encodes_masks():
    probabilities = torch.rand(2, 1, 12, 16, generator=torch.Generator().manual_seed(0))
    output = {
        "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.5, 5.5, 7.25]]),
        "scores": torch.tensor([0.75, 0.5]),
        "labels": torch.tensor([3, 1]),
        "masks": probabilities,
    }

    results = to_coco_results(42, output, mask_threshold=0.6)

    assert [r["bbox"] for r in results] == [[10.0, 20.0, 20.0, 40.0], [0.0, 0.5, 5.5, 6.75]]
    assert [(r["image_id"], r["category_id"], r["score"]) for r in results] == [
        (42, 3, 0.75),
        (42, 1, 0.5),
    ]
    for result, mask in zip(results, probabilities[:, 0], strict=True):
        decoded = coco_mask.decode(
            {**result["segmentation"], "counts": result["segmentation"]["counts"].encode()}
        )
        np.testing.assert_array_equal(decoded, (mask > 0.6).numpy())
    json.dumps(results)  # serialisable as a COCO results file


def test_to_coco_results_without_masks_or_detections():
    output = prediction([[1, 2, 3, 4]], [2], [0.5])
    assert to_coco_results(1, output) == [
        {"image_id": 1, "category_id": 2, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}
    ]
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}
    assert to_coco_results(1, empty) == []


# ----------------------------------------------------------------------------- gather_results


def test_gather_results_without_distributed_returns_the_list():
    results = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]
    assert gather_results(results) is results


def gather_on_rank(rank: int, world_size: int, port: int, out: Path) -> None:
    """One gloo rank: gathers its own entry and writes what it got."""
    address = f"tcp://127.0.0.1:{port}"
    timeout = datetime.timedelta(seconds=30)  # a lost rank fails the test instead of hanging it
    dist.init_process_group(
        "gloo", init_method=address, rank=rank, world_size=world_size, timeout=timeout
    )
    try:
        gathered = gather_results([{"image_id": rank, "score": rank / 10}])
        (out / f"rank{rank}.json").write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_gather_results_collects_every_rank_on_rank_0(tmp_path):
    """Two gloo ranks, forked: spawned ones would each import torch and timm again (over 10 s on
    a small machine); forked ones share this process's imports, like DataLoader workers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(gather_on_rank, args=(2, port, tmp_path), nprocs=2, start_method="fork")
    assert json.loads((tmp_path / "rank0.json").read_text()) == [
        {"image_id": 0, "score": 0.0},
        {"image_id": 1, "score": 0.1},
    ]
    assert json.loads((tmp_path / "rank1.json").read_text()) == []
