"""`debiformer data bench`: images/s of the FFCV train pipeline against the torchvision one on
the same images (`bench_loaders`, also importable from `debiformer.data`)."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console

from debiformer.data.ffcv_files import WriterOptions, convert_to_ffcv, ffcv_summary
from debiformer.data.loaders import Loader, build_loader
from debiformer.errors import UserError, mention
from debiformer.runtime import check_writable, write_json
from debiformer.tools.common import check_at_least, fitting_table


@dataclass
class LoaderBench:
    """Throughput of the two train pipelines and the settings they ran with.

    `*_uint8_images_per_s`: uint8 batches delivered to the device (what the data pipeline does);
    `*_images_per_s`: also normalised on the device, which here is the same CPU as the workers.
    """

    source: str
    ffcv_file: str
    num_images: int
    image_size: int
    batch_size: int
    num_workers: int
    repeats: int
    jpeg_fraction: float
    ffcv_uint8_images_per_s: float
    torchvision_uint8_images_per_s: float
    uint8_speedup: float
    ffcv_images_per_s: float
    torchvision_images_per_s: float
    speedup: float
    device: str
    torch_threads: int
    cpu_count: int
    date: str


def _epoch_rate(loader: Loader, epoch: int, normalised: bool) -> float:
    """Images/s of one full epoch: uint8 batches on the device, or normalised ones."""
    batches = loader.batches(epoch) if normalised else loader.uint8_batches(epoch)
    images = 0
    start = time.perf_counter()
    for batch, _ in batches:
        images += len(batch)
    return images / (time.perf_counter() - start)


def _rates(loader: Loader, repeats: int) -> tuple[float, float]:
    """(uint8, normalised) images/s, each the best of `repeats` epochs after one warm-up epoch
    (FFCV compiles its pipeline and the OS caches the files then)."""
    if len(loader) == 0:
        raise UserError(
            f"fewer images than one batch of {loader.batch_size}: "
            f"use a smaller {mention('batch_size')}"
        )
    _epoch_rate(loader, 0, normalised=True)
    uint8 = max(_epoch_rate(loader, 1 + 2 * r, normalised=False) for r in range(repeats))
    normalised = max(_epoch_rate(loader, 2 + 2 * r, normalised=True) for r in range(repeats))
    return uint8, normalised


def bench_loaders(
    source: str,
    *,
    image_size: int = 224,
    batch_size: int = 64,
    num_workers: int = 2,
    repeats: int = 2,
    device: str = "cpu",
    ffcv_file: str | None = None,
    writer: WriterOptions | None = None,
    json_path: str | None = None,
    console: Console | None = None,
) -> LoaderBench:
    """Measure both train pipelines (random resized crop, flip, uint8 to the device, normalisation)
    on the ImageFolder `source` at `image_size`, print both images/s and their ratio.

    The FFCV file is `ffcv_file` if it exists, else `source` converted with `writer` into it (or a
    temporary file). After a warm-up epoch, full epochs are timed as uint8 batches on the device
    and as normalised batches; each figure is the best of `repeats` epochs. The settings and
    `json_path` are checked before any work.
    """
    check_at_least("image_size", image_size, 1)
    check_at_least("batch_size", batch_size, 1)
    check_at_least("num_workers", num_workers, 0)
    check_at_least("repeats", repeats, 1)
    if json_path:
        check_writable(json_path, "json_path")
    console = console or Console()
    settings = {
        "image_size": image_size,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "seed": 0,
        "device": torch.device(device),
    }
    writer = writer or WriterOptions(num_workers=num_workers)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(ffcv_file) if ffcv_file else Path(scratch) / "bench.beton"
        if not path.exists():
            console.print(f"converting {source} to {path} ...", highlight=False, soft_wrap=True)
            convert_to_ffcv(source, path, writer, console)
        summary = ffcv_summary(path)
        rates = {
            backend: _rates(
                build_loader("train", backend=backend, path=location, **settings), repeats
            )
            for backend, location in (("torchvision", source), ("ffcv", str(path)))
        }
    result = LoaderBench(
        source=str(source),
        ffcv_file=str(path) if ffcv_file else "(temporary)",
        num_images=summary.num_samples,
        image_size=image_size,
        batch_size=batch_size,
        num_workers=num_workers,
        repeats=repeats,
        jpeg_fraction=summary.jpeg_fraction,
        ffcv_uint8_images_per_s=rates["ffcv"][0],
        torchvision_uint8_images_per_s=rates["torchvision"][0],
        uint8_speedup=rates["ffcv"][0] / rates["torchvision"][0],
        ffcv_images_per_s=rates["ffcv"][1],
        torchvision_images_per_s=rates["torchvision"][1],
        speedup=rates["ffcv"][1] / rates["torchvision"][1],
        device=str(settings["device"]),
        torch_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count() or 0,
        date=time.strftime("%Y-%m-%d"),
    )
    print_loader_bench(result, console)
    if json_path:
        write_json(json_path, asdict(result))
    return result


def print_loader_bench(result: LoaderBench, console: Console) -> None:
    """The two pipelines' images/s and their ratio as a table, and the settings below it."""
    table = fitting_table(
        f"train pipeline, {result.image_size}² output, device {result.device}",
        "uint8: batches delivered to the device; normalised: also converted to float and "
        "normalised there; both in images/s",
        (("pipeline", "left"), ("uint8", "right"), ("normalised", "right")),
    )
    table.add_row(
        "torchvision",
        f"{result.torchvision_uint8_images_per_s:.1f}",
        f"{result.torchvision_images_per_s:.1f}",
    )
    table.add_row(
        "ffcv", f"{result.ffcv_uint8_images_per_s:.1f}", f"{result.ffcv_images_per_s:.1f}"
    )
    table.add_row("ffcv / torchvision", f"{result.uint8_speedup:.2f}x", f"{result.speedup:.2f}x")
    console.print(table)
    console.print(
        f"{result.num_images} images, batch {result.batch_size}, {result.num_workers} workers, "
        f"{result.jpeg_fraction:.0%} of the FFCV file stored as JPEG",
        highlight=False,
        soft_wrap=True,
    )
