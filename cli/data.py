"""`debiformer data ...`: convert sources to FFCV, inspect FFCV files, benchmark the loaders, write
mosaics (detection and segmentation data)."""

from pathlib import Path

import typer

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report a Ctrl-C

app = typer.Typer(help="Convert, inspect and benchmark image data.", no_args_is_help=True)


@app.command()
def convert(
    source: str = typer.Argument(
        ...,
        help="ImageFolder root (class per folder), fashion-mnist:<dir> or fashion-mnist-items:<dir>.",
    ),
    out: Path = typer.Argument(..., help="FFCV file to write (written atomically)."),
    max_resolution: int = typer.Option(
        None, help="Resize so the longer side is at most this many pixels."
    ),
    write_mode: str = typer.Option("proportion", help="raw, jpg, proportion or smart."),
    jpeg_quality: int = typer.Option(90, help="JPEG quality of compressed images."),
    compress_probability: float = typer.Option(
        0.5, help="Share of images stored as JPEG (proportion mode)."
    ),
    subset: int = typer.Option(None, help="Keep this many images, chosen at random (seed 0)."),
    workers: int = typer.Option(2, help="Writer processes."),
    chunk_size: int = typer.Option(100, help="Images per writer work item."),
    split: str = typer.Option("train", help="Fashion-MNIST split: train or test."),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Skip unreadable images with a warning instead of stopping."
    ),
) -> None:
    """Write an FFCV file from an ImageFolder tree or the Fashion-MNIST idx files.

    Ctrl-C stops the conversion and all its processes (exit code 130; SIGTERM: 143) and leaves no
    file behind."""
    from debiformer.data import WriterOptions, convert_to_ffcv

    options = WriterOptions(
        max_resolution=max_resolution,
        write_mode=write_mode,
        jpeg_quality=jpeg_quality,
        compress_probability=compress_probability,
        subset=subset,
        num_workers=workers,
        chunk_size=chunk_size,
        on_bad_image="skip" if skip_bad else "stop",
        split=split,
    )
    try:
        convert_to_ffcv(source, out, options)
    except KeyboardInterrupt:
        raise typer.Exit(INTERRUPTED_EXIT_CODE) from None


@app.command()
def inspect(file: Path = typer.Argument(..., help="FFCV file.")) -> None:
    """Print the samples, classes (names where stored), per-class counts and image-size range of
    an FFCV file."""
    from debiformer.data import inspect_ffcv_file

    inspect_ffcv_file(file)


@app.command()
def bench(
    source: str = typer.Argument(..., help="ImageFolder root with the images to read."),
    image_size: int = typer.Option(224, help="Output crop size."),
    batch_size: int = typer.Option(64, help="Images per batch."),
    workers: int = typer.Option(2, help="Data workers for both pipelines."),
    device: str = typer.Option("cpu", help="Device the batches go to, e.g. cuda."),
    repeats: int = typer.Option(2, help="Timed epochs per figure; the best is kept."),
    ffcv_file: str = typer.Option(
        None, help="FFCV file of SOURCE: reused if present, else written here."
    ),
    json_path: str = typer.Option(None, "--json", help="Write the results to this JSON file."),
) -> None:
    """Images/s of the FFCV train pipeline against torchvision's on the same images."""
    from debiformer.data import WriterOptions
    from debiformer.tools.loader_bench import bench_loaders

    bench_loaders(
        source,
        image_size=image_size,
        batch_size=batch_size,
        num_workers=workers,
        device=device,
        repeats=repeats,
        ffcv_file=ffcv_file,
        writer=WriterOptions(num_workers=workers),
        json_path=json_path,
    )


@app.command()
def mosaics(
    out: Path = typer.Argument(..., help="Folder to write (renamed into place when complete)."),
    train: int = typer.Option(3000, help="Train canvases (items from the train split)."),
    val: int = typer.Option(500, help="Val canvases (items from the test split)."),
    size: int = typer.Option(128, help="Canvas width and height in pixels."),
    items: tuple[int, int] = typer.Option((2, 6), help="Fewest and most items per canvas."),
    scale: tuple[float, float] = typer.Option(
        (1.0, 2.0), help="Smallest and largest resize factor of the 28x28 items."
    ),
    seed: int = typer.Option(0, help="Seed: the same arguments always write the same files."),
    source: str | None = typer.Option(
        None, help="Folder of the Fashion-MNIST idx files (default: the Debian package's)."
    ),
) -> None:
    """Write COCO detection / instance-segmentation and semantic-segmentation data: Fashion-MNIST
    items scattered without overlap on dark canvases. Needs pycocotools (the extra "detection")."""
    from debiformer.data.mosaics import write_mosaics

    given = {} if source is None else {"source": source}
    write_mosaics(
        out,
        train_images=train,
        val_images=val,
        canvas_size=size,
        items=items,
        scale=scale,
        seed=seed,
        **given,
    )
