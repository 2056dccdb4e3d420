"""`debiformer show`: parse options, draw what DBRA does on each image."""

from __future__ import annotations

from pathlib import Path

import typer

from debiformer.cli import options
from debiformer.cli.parsing import names, sides
from debiformer.errors import UserError


def parse_point(text: str) -> tuple[float, float]:
    """--query "X,Y" as (x, y) pixels."""
    try:
        x, y = (float(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--query {text!r}: expected X,Y in pixels, e.g. 120,80") from None
    return x, y


def parse_size(text: str) -> int | tuple[int, int]:
    """--size "N" (the shorter side, keeping the aspect ratio) or "HxW"."""
    parsed = sides(text)
    if parsed is None or min(parsed) < 1:
        raise UserError(f"--size {text!r}: expected N (the shorter side) or HxW, e.g. 64 or 97x131")
    return parsed[0] if len(parsed) == 1 else (parsed[0], parsed[1])


def show(
    images: list[Path] = typer.Argument(
        ..., help="Image files (PNG, JPEG, ...; any size); with --erf also folders and globs."
    ),
    out: Path = typer.Option(
        ..., "--out", help="Figure file; with several images, OUT-<image stem>.png each."
    ),
    model: str | None = options.MODEL,
    recipe: str | None = options.MODEL_RECIPE,
    checkpoint: Path | None = options.CHECKPOINT,
    pretrained: str | None = options.PRETRAINED,
    query: str | None = typer.Option(
        None, "--query", help="Query point X,Y in the image's pixels (default: the centre)."
    ),
    blocks: list[str] = typer.Option(
        [],
        "--blocks",
        help="Blocks STAGE.BLOCK, e.g. 1.1,3.2, or all (default: each stage's last).",
    ),
    size: str | None = typer.Option(
        None, "--size", help="Model input: N (shorter side) or HxW (default: the recipe's size)."
    ),
    json_path: Path | None = typer.Option(
        None, "--json", help="Also write the arrays (pixels, region indices, weights, CAM)."
    ),
    max_pixels: int | None = options.MAX_PIXELS,
    erf: bool = typer.Option(
        False,
        "--erf",
        help="Instead: the effective receptive field of --stage averaged over the images, in one "
        "figure (the paper's Figure 5; images resized and centre-cropped to --size N).",
    ),
    stage: int = typer.Option(4, "--stage", help="With --erf: the stage (1-4) whose map is used."),
) -> None:
    """Draw a classifier's view of images: top-5 classes, a Grad-CAM, and for chosen blocks DBRA's
    agents (reference grid, sampled positions, offsets), the regions BRA and DBRA route a query
    point to, and its attention over the agents."""
    if erf:
        from debiformer.tools.erf import show_erf

        if query is not None or blocks:
            raise UserError("--erf draws the receptive field alone: drop --query and --blocks")
        parsed = parse_size(size) if size is not None else None
        if isinstance(parsed, tuple):
            raise UserError(f"--size {size!r}: with --erf give one side N (a square input)")
        show_erf(
            images,
            out,
            stage=stage,
            model_name=model,
            recipe=recipe,
            checkpoint=checkpoint,
            pretrained=pretrained,
            size=parsed,
            json_path=json_path,
            max_pixels=options.pixel_limit(max_pixels),
        )
        return
    from debiformer.tools.show import show as show_images

    show_images(
        images,
        out,
        model_name=model,
        recipe=recipe,
        checkpoint=checkpoint,
        pretrained=pretrained,
        query=parse_point(query) if query is not None else None,
        blocks=names(blocks),
        size=parse_size(size) if size is not None else None,
        json_path=json_path,
        max_pixels=options.pixel_limit(max_pixels),
    )
