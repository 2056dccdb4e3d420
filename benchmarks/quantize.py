"""What onnxruntime's dynamic int8 quantisation does to a Fashion-MNIST DeBiFormer: test accuracy
and speed of the PyTorch model, its fp32 ONNX export and the int8 quantised file.

Exports the checkpoint with `debiformer.tools.export` (checked against PyTorch), quantises the
file with `onnxruntime.quantization.quantize_dynamic` (int8 weights, activations quantised per
batch at run time) twice: every op it can quantise (its default: convolutions too), and the
matrix products only (`MatMul`, `Gemm`). Then evaluates all four on the Fashion-MNIST test
images of the classes the model was trained on (read from the idx files, resized and normalised
as the recipe's evaluation does), and times them at each batch size with the same thread count,
in alternating rounds (the median round is reported), so that drifting machine load hits all.

    python benchmarks/quantize.py --checkpoint runs/quickstart/checkpoints/best.pt \
        --out runs/quantize --json runs/quantize/quantize.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from debiformer.data import FASHION_MNIST_DIR, build_loader
from debiformer.runtime import write_json
from debiformer.tools.bench import time_steps
from debiformer.tools.export import ExportOptions, build_model, export_model, onnx_session

CPU = torch.device("cpu")


def evaluation_images(
    data: str, config: dict, classes: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST test images of `classes` (labelled 0, 1, ... in that order), as the model's
    recipe evaluates them: resized to its input size, centre crop `crop_pct`, ImageNet mean/std."""
    loader = build_loader(
        "val",
        backend="torchvision",
        path=f"fashion-mnist:{data}",
        image_size=config["input_size"][-1],
        batch_size=500,
        num_workers=0,
        seed=0,
        device=CPU,
        crop_ratio=config["crop_pct"],
    )
    images, labels = zip(*loader, strict=True)
    images, labels = torch.cat(images), torch.cat(labels)
    keep = torch.isin(labels, torch.tensor(classes))
    relabel = {label: rank for rank, label in enumerate(classes)}
    return images[keep], torch.tensor([relabel[int(label)] for label in labels[keep]])


def onnx_logits(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """The file as a function of an image batch (numpy), in onnxruntime on the CPU."""
    session = onnx_session(path, threads=threads)
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def torch_logits(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """The PyTorch model as a function of an image batch (numpy), without autograd."""

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(images)).numpy()

    return run


def accuracy(run: Callable[[np.ndarray], np.ndarray], images: torch.Tensor, labels: torch.Tensor):
    """Top-1 accuracy in percent, over batches of 250."""
    predictions = [run(batch.numpy()).argmax(axis=1) for batch in images.split(250)]
    return float((np.concatenate(predictions) == labels.numpy()).mean() * 100)


def images_per_second(
    runs: dict[str, Callable[[np.ndarray], np.ndarray]],
    images: torch.Tensor,
    batch: int,
    iterations: int,
    rounds: int = 3,
) -> dict[str, float]:
    """Images/s of each run at `batch`: per round, the median of `iterations` timed calls after 3
    untimed ones; the runs alternate within each round; the median round is reported."""
    inputs = images[:batch].numpy()
    figures: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            seconds = time_steps(lambda run=run: run(inputs), 3, iterations, CPU)
            figures[name].append(batch / statistics.median(seconds))
    return {name: statistics.median(values) for name, values in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="this tool's training checkpoint")
    parser.add_argument("--out", type=Path, default=Path("runs/quantize"), help="folder")
    parser.add_argument("--data", default=FASHION_MNIST_DIR, help="Fashion-MNIST idx folder")
    parser.add_argument("--classes", help="the labels it was trained on, e.g. 0,1,2,3,4")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    threads = torch.get_num_threads()
    files = {name: args.out / f"{name}.onnx" for name in ("fp32", "int8", "int8_matmul")}
    options = ExportOptions(out=files["fp32"], checkpoint=args.checkpoint, dynamic_batch=True)
    exported = export_model(options)
    quantize_dynamic(files["fp32"], files["int8"], weight_type=QuantType.QInt8)
    quantize_dynamic(
        files["fp32"],
        files["int8_matmul"],
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
    )
    model, config = build_model(options)
    classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    images, labels = evaluation_images(
        args.data, config, classes or list(range(config["num_classes"]))
    )
    runs = {"pytorch": torch_logits(model)}
    runs.update({f"onnx_{name}": onnx_logits(path, threads) for name, path in files.items()})
    result = {
        "checkpoint": args.checkpoint,
        "images": len(labels),
        "threads": threads,
        "export_check": exported["check"],
        "mb": {f"onnx_{name}": path.stat().st_size / 2**20 for name, path in files.items()},
        "top1": {name: accuracy(run, images, labels) for name, run in runs.items()},
        "images_per_s": {
            batch: images_per_second(runs, images, int(batch), args.iterations)
            for batch in args.batch_sizes.split(",")
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
