"""`debiformer export`: parses the options into an `ExportOptions` (checked before any work),
writes and checks the file, and prints what was written and how closely it matches PyTorch."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from debiformer.cli import options
from debiformer.cli.parsing import sides
from debiformer.errors import UserError


def parse_resolution(text: str) -> int | tuple[int, int]:
    """--resolution "H" (a square) or "HxW" in pixels."""
    parsed = sides(text)
    if parsed is None:
        raise UserError(f"--resolution takes H or HxW in pixels, e.g. 224 or 33x47; got {text!r}")
    return parsed[0] if len(parsed) == 1 else (parsed[0], parsed[1])


def summary(result: dict) -> str:
    """One line on the written file and its check."""
    config, check = result["config"], result["check"]
    size = "x".join(map(str, config["input_size"]))
    megabytes = result["bytes"] / 2**20
    if result["format"] == "hf":
        return (
            f"wrote {result['out']} (timm / Hugging Face folder: config.json, model.safetensors, "
            f"README.md; {size}, {megabytes:.1f} MB): timm loads it and gives the same logits"
        )
    if result["format"] == "safetensors":
        return (
            f"wrote {result['out']} ({check['tensors']} tensors, {size}, {megabytes:.1f} MB): "
            "read back bit-identical"
        )
    kind = f"ONNX opset {result['opset']}" if result["format"] == "onnx" else "torch.export .pt2"
    batch = "dynamic batch" if result["dynamic_batch"] else "batch 1"
    batches = ", ".join(map(str, check["batches"]))
    line = (
        f"wrote {result['out']} ({kind}, {batch}, {size}, {megabytes:.1f} MB): largest "
        f"difference from PyTorch {check['max_relative_difference']:.1e} of the logits' spread "
        f"(batch {batches}; limit 1e-04)"
    )
    if result["quantize"]:
        int8 = check["int8"]["max_relative_difference"]
        line += f", then quantised to {result['quantize']}: {int8:.1e} of the spread"
    return line


def export(
    out: Path = typer.Option(
        ...,
        "--out",
        help="What to write: NAME.onnx, NAME.pt2, NAME.safetensors, or a folder (hf).",
    ),
    format: str | None = typer.Option(
        None,
        "--format",
        help="onnx, pt2, safetensors or hf (a timm / Hugging Face folder with a model card); "
        "default: from --out's suffix, hf for a name without one.",
    ),
    model: str | None = options.MODEL,
    recipe: str | None = options.MODEL_RECIPE,
    checkpoint: str | None = options.CHECKPOINT,
    pretrained: str | None = options.PRETRAINED,
    ema: bool = typer.Option(False, "--ema", help="Export the checkpoint's EMA weights."),
    resolution: str | None = typer.Option(
        None,
        "--resolution",
        help="H or HxW in pixels (default: the recipe's image size, else 224).",
    ),
    dynamic_batch: bool = typer.Option(
        False, "--dynamic-batch", help="ONNX and pt2 files take any batch size (else batch 1)."
    ),
    quantize: str | None = typer.Option(
        None,
        "--quantize",
        help="int8: onnxruntime's dynamic int8 quantisation of the matrix products (ONNX only).",
    ),
) -> None:
    """Write a model as ONNX, a torch.export program (.pt2), safetensors weights with its
    architecture and preprocessing, or a timm / Hugging Face folder (config.json,
    model.safetensors, README.md model card); what is written is checked against PyTorch before it
    is put in place."""
    from debiformer.tools.export import ExportOptions, export_model

    options = ExportOptions(
        out=out,
        format=format,
        model=model,
        recipe=recipe,
        checkpoint=checkpoint,
        pretrained=pretrained,
        ema=ema,
        resolution=parse_resolution(resolution) if resolution is not None else None,
        dynamic_batch=dynamic_batch,
        quantize=quantize,
    )
    Console().print(summary(export_model(options)), highlight=False, soft_wrap=True)
