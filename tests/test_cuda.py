"""On a CUDA GPU: a small DeBiFormer's forward and backward match the CPU's, bf16 autocast training
lowers the loss, torch.compile and channels-last inputs give the eager output, the engine trains a
classifier from an image folder, and the Mask R-CNN and Semantic FPN heads train. Every test is
marked `cuda` and skips without a GPU (tests/conftest.py); `pytest -m cuda` runs them, and
benchmarks/gpu_check.sh runs them first (the compile test, minutes of cold compiling, after the
eager bench)."""

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import debiformer
from debiformer import runtime
from debiformer.data import make_photo_folder
from debiformer.recipe import load_recipe, recipe_from_dict
from debiformer.tasks import build_task, train
from debiformer.weights import ModelSpec, build_model
from tests.helpers.recipes import (
    SMALL_BACKBONE,
    detection_recipe,
    segmentation_recipe,
    write_recipe,
)
from tests.helpers.toy_task import metrics_lines

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
NUM_CLASSES = 4
# fp32 with TF32 off (`exact_fp32`): CUDA and the CPU differ only in summation order, about 1e-6
# relative to the result; TF32's 10-bit mantissa would give about 1e-3, which this bound catches
FP32_RELATIVE_ERROR = 1e-4


@pytest.fixture
def exact_fp32():
    """fp32 matrix products and cuDNN convolutions without TF32 for the test (cuDNN allows it by
    default), the settings restored after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def small_model() -> nn.Module:
    """A 0.2 M-parameter DeBiFormer (nano with `SMALL_BACKBONE`) of `NUM_CLASSES` classes, seeded."""
    torch.manual_seed(0)
    return debiformer.create_model("debiformer_nano", num_classes=NUM_CLASSES, **SMALL_BACKBONE)


def batch(size: int = 64, images: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random CPU images of `size` pixels square and their labels."""
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(images, 3, size, size, generator=generator),
        torch.randint(0, NUM_CLASSES, (images,), generator=generator),
    )


def relative_error(
    actual: torch.Tensor, expected: torch.Tensor, scale: float | None = None
) -> float:
    """‖actual − expected‖ / ‖expected‖ in fp32 (or over `scale` instead of ‖expected‖)."""
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    return ((actual - expected).norm() / (expected.norm() if scale is None else scale)).item()


def forward_backward(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, run=None):
    """The logits of `images`, and each parameter's gradient of their cross-entropy, by name;
    `run` computes the logits with the model's parameters in its place (a compiled model)."""
    model.zero_grad(set_to_none=True)
    logits = (model if run is None else run)(images)
    F.cross_entropy(logits, labels).backward()
    return logits, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_same_results(actual, expected) -> None:
    """Two `forward_backward` results agree within `FP32_RELATIVE_ERROR`: the logits relative to
    their norm, each gradient relative to the whole gradient's norm (some gradients are zero in
    exact arithmetic, e.g. of a key bias under softmax, and hold only rounding noise)."""
    (logits, grads), (expected_logits, expected_grads) = actual, expected
    assert relative_error(logits, expected_logits) < FP32_RELATIVE_ERROR
    assert grads.keys() == expected_grads.keys()
    total = torch.cat([grad.flatten().cpu() for grad in expected_grads.values()]).norm().item()
    errors = {
        name: relative_error(grads[name], grad, total) for name, grad in expected_grads.items()
    }
    worst = max(errors, key=errors.get)
    assert errors[worst] < FP32_RELATIVE_ERROR, (worst, errors[worst])


def test_forward_and_backward_on_cuda_match_the_cpu_in_fp32(exact_fp32):
    model = small_model().eval()  # no dropout or drop path: both devices compute the same function
    images, labels = batch()
    on_cpu = forward_backward(model, images, labels)
    on_cuda = forward_backward(copy.deepcopy(model).to(CUDA), images.to(CUDA), labels.to(CUDA))
    assert on_cuda[0].device.type == CUDA.type
    assert_same_results(on_cuda, on_cpu)


def test_bf16_autocast_training_steps_lower_the_loss():
    model = small_model().to(CUDA).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    images, labels = (tensor.to(CUDA) for tensor in batch(images=8))
    losses = []
    for _ in range(8):
        with runtime.autocast(CUDA, "bf16"):
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
        assert logits.dtype == torch.bfloat16
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_torch_compile_gives_the_eager_forward_and_backward(exact_fp32):
    model = small_model().to(CUDA).eval()
    images, labels = (tensor.to(CUDA) for tensor in batch())
    eager = forward_backward(model, images, labels)
    compiled = forward_backward(model, images, labels, run=runtime.compile_model(model))
    assert_same_results(compiled, eager)


def test_channels_last_inputs_give_the_same_output(exact_fp32):
    model = small_model().to(CUDA).eval()
    images = batch()[0].to(CUDA)
    with torch.no_grad():
        expected = model(images)
        model.to(memory_format=torch.channels_last)
        actual = model(images.contiguous(memory_format=torch.channels_last))
    assert relative_error(actual, expected) < FP32_RELATIVE_ERROR


@pytest.mark.slow
def test_the_engine_trains_a_classifier_from_an_image_folder_for_two_epochs(tmp_path):
    """torchvision's loader (no FFCV), bf16 autocast and channels-last, as on a real GPU run."""
    photos = make_photo_folder(tmp_path / "photos", 24, size=(40, 30), num_classes=3)
    recipe = {
        "model": {"name": "debiformer_nano", "arch": SMALL_BACKBONE},
        "data": {
            "backend": "torchvision",
            "train_path": str(photos),
            "val_path": str(photos),
            "image_size": 32,
            "num_workers": 0,
        },
        "optim": {"lr": 2e-3, "lr_base_batch": None},
        "schedule": {"epochs": 2, "warmup_epochs": 0.5, "warmup_lr": 1e-5, "min_lr": 1e-5},
        "train": {"batch_size": 8, "device": "cuda", "precision": "bf16", "channels_last": True},
        "output": {"log_every": 1, "progress": False},
    }
    run_dir = tmp_path / "run"
    summary = train(load_recipe(write_recipe(tmp_path / "cuda.yaml", recipe)), run_dir=run_dir)
    assert (summary["device"], summary["epochs"], summary["steps"]) == ("cuda", 2, 6)
    losses = [line["loss"] for line in metrics_lines(run_dir, "train")]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses), losses
    assert math.isfinite(summary["top1"])
    assert (run_dir / "checkpoints" / "last.pt").is_file()


def detection_batch(images: int = 2, size: int = 64) -> tuple[list, list]:
    """CUDA images in [0, 1] with two boxed, masked objects each, as `DetectionLoader` gives."""
    generator = torch.Generator().manual_seed(2)
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [28.0, 20.0, 60.0, 58.0]])
    masks = torch.zeros(len(boxes), size, size, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
        mask[y0:y1, x0:x1] = 1
    target = {"boxes": boxes, "labels": torch.tensor([1, 3]), "masks": masks}
    return (
        [torch.rand(3, size, size, generator=generator).to(CUDA) for _ in range(images)],
        [{key: value.to(CUDA) for key, value in target.items()} for _ in range(images)],
    )


def segmentation_batch(images: int = 2, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA crops and their label maps (`NUM_CLASSES` classes), as `SegmentationLoader` gives."""
    generator = torch.Generator().manual_seed(2)
    crops = torch.randn(images, 3, size, size, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (images, size, size), generator=generator)
    return crops.to(CUDA), labels.to(CUDA)


DENSE = {
    "maskrcnn": (detection_recipe, "detection", detection_batch),
    "fpn": (segmentation_recipe, "segmentation", segmentation_batch),
}


@pytest.mark.slow
@pytest.mark.parametrize("head", DENSE)
def test_a_dense_head_trains_on_cuda(tmp_path: Path, head):
    """The tests' small detection and segmentation recipes (their files are never read): the
    network the recipe builds takes AdamW steps on the task's own loss, from batches shaped as the
    task's loader gives them (its data needs Fashion-MNIST and pycocotools, which GPU hosts may
    lack)."""
    make_recipe, task_name, make_batch = DENSE[head]
    recipe = recipe_from_dict({"name": task_name, **make_recipe(tmp_path, head)})
    model = build_model(ModelSpec.from_recipe(recipe, NUM_CLASSES))[0].to(CUDA).train()
    start = copy.deepcopy(model.state_dict())
    task, data = build_task(recipe), make_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = task.loss(model, data)
        assert loss.device.type == CUDA.type and math.isfinite(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    unmoved = [name for name, p in model.named_parameters() if torch.equal(p.detach(), start[name])]
    assert not unmoved, unmoved  # every part of the network, backbone and head, took the steps
