"""`debiformer predict`: a classifier's top-k classes for image files, to CSV, JSON or a table."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from debiformer.cli import options


def predict(
    inputs: list[str] = typer.Argument(
        ..., help="Image files, folders (their images, recursively) or glob patterns."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Classifiers: one row per image in NAME.csv or NAME.json. Segmenters: the folder of "
        "the label PNGs. Detectors: the COCO results NAME.json.",
    ),
    model: str | None = options.MODEL,
    recipe: str | None = options.MODEL_RECIPE,
    checkpoint: Path | None = options.CHECKPOINT,
    pretrained: str | None = options.PRETRAINED,
    top_k: int = typer.Option(5, "--top-k", help="Classes per image, most probable first."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    device: str = options.DEVICE,
    precision: str = options.PRECISION,
    max_pixels: int | None = options.MAX_PIXELS,
    overlay: bool = typer.Option(
        False, "--overlay", help="Segmenters: also NAME-overlay.png, the colours over the image."
    ),
    runtime: str = typer.Option(
        "eager",
        "--runtime",
        help="eager (PyTorch) or onnxruntime (an exported --checkpoint FILE.onnx, CPU, fp32).",
    ),
) -> None:
    """A classifier's top-k classes (names and probabilities) of each image, through the model's
    own evaluation transform (the recipe's resize and centre crop); a segmenter's label PNG per
    image (pixel value = class), by the recipe's evaluation inference: as `eval` computes them.
    Files that cannot be read get a one-line notice and the exit code 1; the rest are predicted."""
    from debiformer.tools.predict import predict as predict_images

    console = Console()
    predictions, failures = predict_images(
        inputs,
        out=out,
        model_name=model,
        recipe=recipe,
        checkpoint=checkpoint,
        pretrained=pretrained,
        top_k=top_k,
        batch_size=batch_size,
        device=device,
        precision=precision,
        max_pixels=options.pixel_limit(max_pixels),
        overlay=overlay,
        runtime_name=runtime,
    )
    if predictions and isinstance(predictions[0], Path):
        console.print(f"wrote {len(predictions)} label PNGs to {out}", highlight=False)
    elif predictions and isinstance(predictions[0], dict):
        console.print(
            f"wrote {len(predictions)} detections (COCO results) to {out}", highlight=False
        )
    elif out is None:
        table = Table("image", "classes (probability)", box=None, pad_edge=False)
        for p in predictions:
            top = ", ".join(f"{n} ({q:.3f})" for n, q in zip(p.names, p.probabilities, strict=True))
            table.add_row(p.image, top)
        console.print(table)
    else:
        console.print(f"wrote {len(predictions)} predictions to {out}", highlight=False)
    if failures:
        console.print(f"{len(failures)} of {len(predictions) + len(failures)} files not read")
        raise typer.Exit(1)
