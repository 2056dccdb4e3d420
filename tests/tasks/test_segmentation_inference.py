"""Segmentation inference as mmseg tests: test sizes worked out by hand, the sliding-window grid,
sliding windows against whole images for a 1x1 convolution (which cannot tell the two apart) and
a 3x3 one (which can), flips, several test ratios."""

import pytest
import torch
from torch import nn

from debiformer.tasks import segmentation_inference as inference

NUM_CLASSES = 5


def conv_model(kernel_size: int) -> nn.Conv2d:
    """A seeded convolution from 3 channels to NUM_CLASSES logits at the input's size."""
    torch.manual_seed(0)
    return nn.Conv2d(3, NUM_CLASSES, kernel_size, padding=kernel_size // 2)


def images(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


class WindowRecorder:
    """A model recording the window of each call, read from images whose channels hold the
    row and column of each pixel; its logits are zeros."""

    def __init__(self) -> None:
        self.windows: list[tuple[int, int, int, int]] = []

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        rows, columns = window[0, 0], window[0, 1]
        self.windows.append(
            (int(rows.min()), int(rows.max()) + 1, int(columns.min()), int(columns.max()) + 1)
        )
        return window.new_zeros((window.shape[0], NUM_CLASSES, *window.shape[-2:]))


def coordinate_images(height: int, width: int) -> torch.Tensor:
    rows = torch.arange(height).view(height, 1).expand(height, width)
    columns = torch.arange(width).view(1, width).expand(height, width)
    return torch.stack([rows, columns, torch.zeros_like(rows)]).unsqueeze(0).float()


@pytest.mark.parametrize(
    ("height", "width", "scale", "ratio", "size_divisor", "expected"),
    [
        # f = min(2048/683, 512/512) = 1: 512 x 683, 683 rounded up to 22 * 32 = 704
        (512, 683, (2048, 512), 1.0, 32, (512, 704)),
        # scale (1024, 256): f = min(1024/683, 256/512) = 1/2: 256 x int(341.5 + 0.5) = 342 -> 352
        (512, 683, (2048, 512), 0.5, 32, (256, 352)),
        # very wide, limited by the long side: f = min(2048/1000, 512/100) = 2.048:
        # int(204.8 + 0.5) = 205 -> 224, 2048
        (100, 1000, (2048, 512), 1.0, 32, (224, 2048)),
        # small images grow: f = min(2048/256, 512/256) = 2
        (256, 256, (2048, 512), 1.0, 32, (512, 512)),
        # scale (int(614.4), int(153.6)) = (614, 153): f = 153/100, 153 x 153 (not 154 x 154)
        (100, 100, (2048, 512), 0.3, 1, (153, 153)),
    ],
)
def test_inference_size_by_hand(height, width, scale, ratio, size_divisor, expected):
    assert inference.inference_size(height, width, scale, ratio, size_divisor) == expected


def test_sliding_windows_follow_mmseg_grid():
    # rows: (70 - 32 + 20) // 21 + 1 = 3 windows at 0, 21, and 42 moved back to 70 - 32 = 38
    # columns: (95 - 32 + 20) // 21 + 1 = 4 windows at 0, 21, 42, 63 (63 + 32 = 95 fits)
    recorder = WindowRecorder()
    inference.slide_logits(recorder, coordinate_images(70, 95), 32, 21, NUM_CLASSES)
    row_spans = [(0, 32), (21, 53), (38, 70)]
    column_spans = [(0, 32), (21, 53), (42, 74), (63, 95)]
    assert recorder.windows == [(*rows, *columns) for rows in row_spans for columns in column_spans]


def test_image_smaller_than_the_crop_is_one_window():
    recorder = WindowRecorder()
    inference.slide_logits(recorder, coordinate_images(20, 25), 32, 21, NUM_CLASSES)
    assert recorder.windows == [(0, 20, 0, 25)]


def test_sliding_windows_equal_whole_image_for_1x1_conv():
    model = conv_model(1)
    batch = images(1, 3, 70, 95)
    with torch.no_grad():
        slid = inference.slide_logits(model, batch, 32, 21, NUM_CLASSES)
        torch.testing.assert_close(slid, model(batch), atol=1e-5, rtol=1e-5)


def test_sliding_windows_differ_from_whole_image_for_3x3_conv():
    model = conv_model(3)
    batch = images(1, 3, 70, 95)
    with torch.no_grad():
        slid = inference.slide_logits(model, batch, 32, 21, NUM_CLASSES)
        assert not torch.allclose(slid, model(batch), atol=1e-3)


def predict(model: nn.Module, batch: torch.Tensor, **options) -> torch.Tensor:
    """inference.predict at scale (256, 64), which resizes 70 x 95 images to 64 x 96, with
    32-pixel crops every 21 pixels in slide mode."""
    options = {"crop_size": 32, "stride": 21, **options}
    return inference.predict(model, batch, num_classes=NUM_CLASSES, scale=(256, 64), **options)


def test_predict_slide_equals_whole_for_1x1_conv():
    model, batch = conv_model(1), images(2, 3, 70, 95)
    torch.testing.assert_close(
        predict(model, batch, mode="slide"), predict(model, batch, mode="whole"), atol=1e-5, rtol=0
    )


def test_predict_slide_differs_from_whole_for_3x3_conv():
    model, batch = conv_model(3), images(2, 3, 70, 95)
    slide, whole = predict(model, batch, mode="slide"), predict(model, batch, mode="whole")
    assert not torch.allclose(slide, whole, atol=1e-3)


def test_predict_at_the_input_size_is_the_softmax_of_the_logits():
    # inference_size(64, 96, (96, 64)) = (64, 96): nothing is resized
    model, batch = conv_model(3), images(2, 3, 64, 96)
    probabilities = inference.predict(model, batch, num_classes=NUM_CLASSES, scale=(96, 64))
    with torch.no_grad():
        torch.testing.assert_close(probabilities, model(batch).softmax(dim=1))


def test_flip_changes_nothing_for_1x1_conv():
    model, batch = conv_model(1), images(2, 3, 70, 95)
    torch.testing.assert_close(
        predict(model, batch, flip=True), predict(model, batch, flip=False), atol=1e-5, rtol=0
    )


def test_flip_changes_a_3x3_conv_output():
    model, batch = conv_model(3), images(2, 3, 70, 95)
    assert not torch.allclose(predict(model, batch, flip=True), predict(model, batch), atol=1e-3)


def test_ratios_and_flips_are_averaged_probabilities_at_original_size():
    model, batch = conv_model(3), images(2, 3, 70, 95)
    probabilities = predict(model, batch, ratios=(0.5, 1.0, 1.5), flip=True, mode="slide")
    assert probabilities.shape == (2, NUM_CLASSES, 70, 95)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2, 70, 95))


def test_each_ratio_and_flip_runs_at_its_test_size():
    sizes = []

    def recording_model(batch: torch.Tensor) -> torch.Tensor:
        sizes.append(tuple(batch.shape[-2:]))
        return batch.new_zeros((batch.shape[0], NUM_CLASSES, *batch.shape[-2:]))

    predict(recording_model, images(1, 3, 70, 95), ratios=(0.5, 1.0), flip=True)
    # ratio 0.5: scale (128, 32), f = 32/70: int(32.5) = 32, int(43.93) = 43 -> 32 x 64
    assert sizes == [(32, 64), (32, 64), (64, 96), (64, 96)]


def test_predict_needs_no_gradients():
    probabilities = predict(conv_model(1), images(1, 3, 70, 95))
    assert not probabilities.requires_grad


@pytest.mark.parametrize(
    ("model", "options"),
    [
        (conv_model(1), {"mode": "tiles"}),
        (conv_model(1), {"ratios": ()}),
        (conv_model(1), {"mode": "slide", "stride": 40}),  # windows 32 wide would leave gaps
        (nn.Conv2d(3, NUM_CLASSES + 1, 1), {}),  # more logits than classes
    ],
)
def test_bad_options_are_rejected(model, options):
    with pytest.raises(ValueError):
        predict(model, images(1, 3, 70, 95), **options)
