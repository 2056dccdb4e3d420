"""FFCV files: atomic conversion from image sources, checks of existing files, and their summary."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from debiformer.data.sources import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_PREFIX,
    ImageFolder,
    fashion_mnist_root,
    open_source,
)
from debiformer.errors import UserError

WRITE_MODES = ("raw", "jpg", "proportion", "smart")
ON_BAD_IMAGE = ("stop", "skip")


def import_ffcv():
    """The ffcv module and its submodules, or a UserError saying how to fix it."""
    try:
        import ffcv
        import ffcv.fields.decoders  # noqa: F401
        import ffcv.loader  # noqa: F401
        import ffcv.transforms  # noqa: F401
        import ffcv.writer  # noqa: F401
    except ImportError as error:
        raise UserError(
            f"FFCV is not available ({error}): install it with `pip install 'debiformer[ffcv]'` "
            "(needs libopencv-dev libturbojpeg0-dev pkg-config) or set data.backend: torchvision"
        ) from None
    return ffcv


@dataclass
class WriterOptions:
    """How images are stored: FFCV's RGBImageField settings plus a subset and the worker count."""

    max_resolution: int | None = None
    write_mode: str = "proportion"
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    subset: int | None = None
    num_workers: int = 2
    chunk_size: int = 100
    on_bad_image: str = "stop"
    split: str = "train"

    def check(self) -> None:
        """UserError for out-of-range settings."""
        if self.write_mode not in WRITE_MODES:
            raise UserError(
                f"unknown write mode {self.write_mode!r}: use one of {', '.join(WRITE_MODES)}"
            )
        if self.on_bad_image not in ON_BAD_IMAGE:
            raise UserError(f"unknown bad-image policy {self.on_bad_image!r}: use stop or skip")
        if not 1 <= self.jpeg_quality <= 100 or not 0.0 <= self.compress_probability <= 1.0:
            raise UserError("jpeg quality must be in 1..100 and compress probability in 0..1")
        if self.split not in ("train", "test"):
            raise UserError(f"unknown Fashion-MNIST split {self.split!r}: use train or test")
        if self.subset is not None and self.subset < 1:
            raise UserError(f"subset must be a positive number of images, got {self.subset}")


@dataclass
class Conversion:
    """What a conversion wrote: the file, each sample's source index, images left out, seconds."""

    path: Path
    indices: np.ndarray
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _ArrayDataset:
    """Indexable (HxWx3 uint8 array, label) view of a source for FFCV's writer."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        image, label = self.dataset[index]
        return np.asarray(image, dtype=np.uint8), label


def _check_image(path: str) -> str | None:
    """None if the image at `path` decodes completely, else the error message."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))
            image.load()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def _readable_indices(
    dataset: ImageFolder, indices: np.ndarray, options: WriterOptions, console: Console
) -> tuple[np.ndarray, list[str]]:
    """The indices whose images decode, and the paths of those that do not (or a UserError)."""
    paths = [dataset.samples[i][0] for i in indices]
    if options.num_workers > 1:
        with Pool(options.num_workers) as pool:
            errors = pool.map(_check_image, paths, chunksize=64)
    else:
        errors = [_check_image(path) for path in paths]
    bad = [(path, error) for path, error in zip(paths, errors, strict=True) if error]
    if bad and options.on_bad_image == "stop":
        path, error = bad[0]
        raise UserError(
            f"cannot read image {path} ({error}): fix or remove it, or pass --skip-bad to skip it"
            + (f" ({len(bad) - 1} more unreadable)" if len(bad) > 1 else "")
        )
    for path, error in bad:
        console.print(
            f"[yellow]warning:[/] skipping unreadable image {path} ({error})",
            highlight=False,
            soft_wrap=True,
        )
    keep = np.array(
        [i for i, error in zip(indices, errors, strict=True) if not error], dtype=np.int64
    )
    return keep, [path for path, _ in bad]


def convert_to_ffcv(
    source: str,
    out_path: str | os.PathLike,
    options: WriterOptions | None = None,
    console: Console | None = None,
) -> Conversion:
    """Write `source` (an ImageFolder tree or Fashion-MNIST) to the FFCV file `out_path`.

    The file is written under a temporary name and renamed when complete, so an interrupted
    conversion never leaves a file at `out_path`. `options.subset` keeps a random subset (seed 0).
    """
    options = options or WriterOptions()
    options.check()
    console = console or Console(stderr=True)
    ffcv = import_ffcv()
    start = time.perf_counter()
    out_path = Path(out_path)
    dataset = open_source(source, options.split)
    indices = np.arange(len(dataset))
    if options.subset is not None and options.subset < len(indices):
        indices = np.sort(np.random.default_rng(0).choice(indices, options.subset, replace=False))
    skipped: list[str] = []
    if isinstance(dataset, ImageFolder):
        indices, skipped = _readable_indices(dataset, indices, options, console)
    if len(indices) == 0:
        raise UserError(f"no readable images in {source}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f"{out_path.name}.partial-{os.getpid()}")
    fields = {
        "image": ffcv.fields.RGBImageField(
            write_mode=options.write_mode,
            max_resolution=options.max_resolution,
            jpeg_quality=options.jpeg_quality,
            compress_probability=options.compress_probability,
        ),
        "label": ffcv.fields.IntField(),
    }
    try:
        writer = ffcv.writer.DatasetWriter(str(partial), fields, num_workers=options.num_workers)
        writer.from_indexed_dataset(
            _ArrayDataset(dataset), indices=indices.tolist(), chunksize=options.chunk_size
        )
        os.replace(partial, out_path)
    finally:
        partial.unlink(missing_ok=True)
    conversion = Conversion(out_path, indices, skipped, time.perf_counter() - start)
    dropped = f", {len(skipped)} unreadable images skipped" if skipped else ""
    console.print(
        f"wrote {out_path}: {len(indices)} samples in {conversion.seconds:.1f} s{dropped}",
        highlight=False,
        soft_wrap=True,
    )
    return conversion


def _is_ffcv_file(path: Path) -> bool:
    """True if `path` opens as an FFCV file with image and label fields."""
    from ffcv.reader import Reader

    try:
        reader = Reader(str(path))
    except Exception:
        return False
    return {"image", "label"} <= set(reader.field_names) and len(
        reader.metadata
    ) == reader.num_samples


def ensure_ffcv_file(source: str, out_path: str | os.PathLike, **writer_options) -> Path:
    """Convert `source` (ImageFolder dir, Fashion-MNIST idx folder or "fashion-mnist:<dir>") to FFCV
    at `out_path` unless a complete file is already there.

    `writer_options` are `WriterOptions` fields.
    """
    import_ffcv()
    out_path = Path(out_path)
    if out_path.exists():
        if not _is_ffcv_file(out_path):
            raise UserError(
                f"{out_path} exists but is not an FFCV image file: delete it or choose another path"
            )
        return out_path
    unknown = set(writer_options) - set(WriterOptions.__dataclass_fields__)
    if unknown:
        raise UserError(f"unknown FFCV writer option(s): {', '.join(sorted(unknown))}")
    return convert_to_ffcv(source, out_path, WriterOptions(**writer_options)).path


def fashion_mnist_paths(
    backend: str, data_dir: str | os.PathLike, root: str = FASHION_MNIST_DIR
) -> tuple[str, str]:
    """(train, val) `path` arguments of `build_loader` for Fashion-MNIST read with `backend`.

    For "ffcv" the idx files are converted on first use to data_dir/fashion-mnist-{train,test}.beton
    (stored raw: the images are tiny); other backends read the idx files directly.
    """
    source = FASHION_MNIST_PREFIX + str(root)
    fashion_mnist_root(source)
    if backend != "ffcv":
        return source, source
    data_dir = Path(data_dir)
    train = ensure_ffcv_file(
        source, data_dir / "fashion-mnist-train.beton", split="train", write_mode="raw"
    )
    val = ensure_ffcv_file(
        source, data_dir / "fashion-mnist-test.beton", split="test", write_mode="raw"
    )
    return str(train), str(val)


@dataclass
class FileSummary:
    """Contents of an FFCV file: sample and class counts, image sizes and storage modes."""

    path: Path
    num_samples: int
    num_classes: int
    class_counts: list[int]
    width_range: tuple[int, int]
    height_range: tuple[int, int]
    jpeg_fraction: float


def ffcv_summary(path: str | os.PathLike) -> FileSummary:
    """Read the metadata of the FFCV file at `path` (no image is decoded)."""
    import_ffcv()
    from ffcv.reader import Reader

    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"FFCV file {path} does not exist: make it with `debiformer data convert SOURCE {path}`"
        )
    if not _is_ffcv_file(path):
        raise UserError(f"{path} is not an FFCV file with image and label fields")
    reader = Reader(str(path))
    names = reader.metadata.dtype.names
    images = reader.metadata[names[reader.field_names.index("image")]]
    labels = np.asarray(reader.metadata[names[reader.field_names.index("label")]]).astype(np.int64)
    counts = np.bincount(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    return FileSummary(
        path=path,
        num_samples=int(reader.num_samples),
        num_classes=len(counts),
        class_counts=counts.tolist(),
        width_range=(int(images["width"].min()), int(images["width"].max())),
        height_range=(int(images["height"].min()), int(images["height"].max())),
        jpeg_fraction=float(np.mean(images["mode"] == 0)) if len(images) else 0.0,
    )


def inspect_ffcv_file(path: str | os.PathLike, console: Console | None = None) -> FileSummary:
    """Print an FFCV file's sample count, classes, per-class counts and image-size range."""
    summary = ffcv_summary(path)
    console = console or Console()
    console.print(
        f"{summary.path}: {summary.num_samples} samples, {summary.num_classes} classes, "
        f"width {summary.width_range[0]}-{summary.width_range[1]}, "
        f"height {summary.height_range[0]}-{summary.height_range[1]}, "
        f"{summary.jpeg_fraction:.0%} stored as JPEG",
        highlight=False,
        soft_wrap=True,
    )
    table = Table("class", "samples")
    for label, count in enumerate(summary.class_counts):
        table.add_row(str(label), str(count))
    console.print(table)
    return summary
