"""Segmentation metrics on hand-made 4x4 class maps: the confusion matrix, mIoU, mAcc, aAcc and
per-class IoU/Acc worked out by hand as fractions, ignored pixels, classes absent from the ground
truth, and confusions of parts adding up to the confusion of the whole."""

from fractions import Fraction

import pytest
import torch

from debiformer.tasks.segmentation_metrics import confusion_matrix, segmentation_metrics

IGNORE = 255
CLASS_NAMES = ["road", "car", "tree", "absent"]  # "absent" is in neither prediction nor target

TARGET = torch.tensor(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 2, IGNORE],
        [2, 2, 1, 1],
    ]
)
PREDICTION = torch.tensor(
    [
        [0, 1, 1, 1],
        [0, 0, 1, 2],
        [2, 2, 0, 0],  # the last pixel is ignored: its 0 counts nowhere
        [2, 1, 1, 1],
    ]
)
# Rows ground truth, columns prediction, counted from the 15 labelled pixels above.
CONFUSION = [
    [3, 1, 0, 0],  # road: 4 pixels, 3 right, 1 taken for car
    [0, 5, 1, 0],  # car: 6 pixels, 5 right, 1 taken for tree
    [1, 1, 3, 0],  # tree: 5 pixels, 3 right
    [0, 0, 0, 0],
]
# IoU = intersection / (ground-truth area + predicted area - intersection)
ROAD_IOU = Fraction(3, 4 + 4 - 3)
CAR_IOU = Fraction(5, 6 + 7 - 5)
TREE_IOU = Fraction(3, 5 + 4 - 3)
# Acc = intersection / ground-truth area
ROAD_ACC, CAR_ACC, TREE_ACC = Fraction(3, 4), Fraction(5, 6), Fraction(3, 5)


def test_confusion_matrix_counts_labelled_pixels_by_truth_and_prediction():
    confusion = confusion_matrix(PREDICTION, TARGET, num_classes=4, ignore_index=IGNORE)
    assert confusion.dtype == torch.int64
    assert confusion.tolist() == CONFUSION


def test_ignored_pixels_count_nowhere():
    other_prediction = PREDICTION.clone()
    other_prediction[2, 3] = 1
    confusion = confusion_matrix(other_prediction, TARGET, num_classes=4, ignore_index=IGNORE)
    assert confusion.tolist() == CONFUSION
    assert confusion.sum() == 15


def test_metrics_equal_hand_computed_fractions():
    metrics = segmentation_metrics(torch.tensor(CONFUSION), CLASS_NAMES)
    assert metrics["class_iou"] == {
        "road": pytest.approx(float(ROAD_IOU)),
        "car": pytest.approx(float(CAR_IOU)),
        "tree": pytest.approx(float(TREE_IOU)),
        "absent": None,
    }
    assert metrics["class_acc"] == {
        "road": pytest.approx(float(ROAD_ACC)),
        "car": pytest.approx(float(CAR_ACC)),
        "tree": pytest.approx(float(TREE_ACC)),
        "absent": None,
    }
    # the absent class is left out of both means
    assert metrics["miou"] == pytest.approx(float((ROAD_IOU + CAR_IOU + TREE_IOU) / 3))
    assert metrics["macc"] == pytest.approx(float((ROAD_ACC + CAR_ACC + TREE_ACC) / 3))
    assert metrics["aacc"] == pytest.approx(float(Fraction(3 + 5 + 3, 15)))


def test_class_predicted_but_absent_from_ground_truth_has_iou_zero_and_no_acc():
    target = torch.zeros(2, 2, dtype=torch.int64)
    prediction = torch.tensor([[0, 0], [0, 1]])
    metrics = segmentation_metrics(confusion_matrix(prediction, target, 2), ["a", "b"])
    assert metrics["class_iou"] == {"a": pytest.approx(3 / 4), "b": 0.0}
    assert metrics["class_acc"] == {"a": pytest.approx(3 / 4), "b": None}
    assert metrics["miou"] == pytest.approx((3 / 4 + 0) / 2)
    assert metrics["macc"] == pytest.approx(3 / 4)


def test_nothing_labelled_gives_zero_metrics():
    target = torch.full((3, 3), IGNORE)
    confusion = confusion_matrix(torch.zeros(3, 3, dtype=torch.int64), target, 2)
    metrics = segmentation_metrics(confusion, ["a", "b"])
    assert (metrics["miou"], metrics["macc"], metrics["aacc"]) == (0.0, 0.0, 0.0)
    assert metrics["class_iou"] == {"a": None, "b": None}


def test_confusions_of_parts_add_up_to_the_whole():
    top = confusion_matrix(PREDICTION[:2], TARGET[:2], 4)
    bottom = confusion_matrix(PREDICTION[2:], TARGET[2:], 4)
    assert (top + bottom).tolist() == CONFUSION


def test_leading_dims_match_a_pixel_by_pixel_count():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 3, 5, 7), generator=generator)
    target[0, 1, 2] = IGNORE
    prediction = torch.randint(0, 3, (2, 3, 5, 7), generator=generator)
    expected = torch.zeros(3, 3, dtype=torch.int64)
    for truth, predicted in zip(
        target.flatten().tolist(), prediction.flatten().tolist(), strict=True
    ):
        if truth != IGNORE:
            expected[truth, predicted] += 1
    assert torch.equal(confusion_matrix(prediction, target, 3), expected)


@pytest.mark.parametrize(
    ("prediction", "target"),
    [
        (torch.tensor([0, 3]), torch.tensor([0, 1])),  # prediction out of range
        (torch.tensor([0, 1]), torch.tensor([0, 7])),  # target neither a class nor ignored
        (torch.tensor([0, 1]), torch.tensor([0, 1, 1])),  # shapes differ
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1])),  # not a class map
    ],
)
def test_bad_class_maps_are_rejected(prediction, target):
    with pytest.raises(ValueError):
        confusion_matrix(prediction, target, 3)


def test_class_names_must_match_the_confusion():
    with pytest.raises(ValueError):
        segmentation_metrics(torch.tensor(CONFUSION), CLASS_NAMES[:3])


@pytest.mark.cuda
def test_confusion_matrix_on_cuda():
    confusion = confusion_matrix(PREDICTION.cuda(), TARGET.cuda(), 4)
    assert confusion.device.type == "cuda"
    assert confusion.tolist() == CONFUSION
