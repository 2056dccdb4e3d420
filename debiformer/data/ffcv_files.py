"""FFCV files: atomic conversion from image sources, checks of existing files, and their summary."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import partial
from multiprocessing import Pool
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from debiformer.data.processes import (
    die_with_parent,
    one_line,
    report_failure,
    run_in_process_group,
)
from debiformer.data.sources import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_PREFIX,
    ImageFolder,
    fashion_mnist_root,
    open_source,
)
from debiformer.errors import UserError, mention
from debiformer.runtime import TEMP_MARK, check_writable, write_json

WRITE_MODES = ("raw", "jpg", "proportion", "smart")
ON_BAD_IMAGE = ("stop", "skip")


def import_ffcv():
    """The ffcv module and its submodules, or a UserError saying how to fix it. FFCV's pipeline
    compiler sets torch's thread count with numba's (to 1 on import, to a loader's worker count
    when the loader starts); from here on it sets numba's only (`_numba_threads_only`), so
    training keeps the threads it was given."""
    import torch

    threads = torch.get_num_threads()
    try:
        import ffcv
        import ffcv.fields.decoders  # noqa: F401
        import ffcv.loader  # noqa: F401
        import ffcv.transforms  # noqa: F401
        import ffcv.writer  # noqa: F401
        from ffcv.pipeline.compiler import Compiler
    except ImportError as error:
        raise UserError(
            f"FFCV is not available ({error}): install it with `pip install 'debiformer[ffcv]'` "
            "(needs libopencv-dev libturbojpeg0-dev pkg-config) or set data.backend: torchvision"
        ) from None
    if Compiler.set_num_threads.__func__ is not _numba_threads_only:
        Compiler.set_num_threads = classmethod(_numba_threads_only)
        torch.set_num_threads(threads)
    return ffcv


def _numba_threads_only(compiler: type, count: int) -> None:
    """FFCV's `Compiler.set_num_threads` without its `torch.set_num_threads`: a loader's worker
    count is the thread count of its compiled pipeline (numba's, in the thread that runs it), not
    torch's for the whole process. With torch's, two training processes on two cores ran with
    two torch threads each and trained 2-10x slower (docs/results.md). A count above numba's
    limit (the machine's cores) is capped there, where FFCV stopped with numba's ValueError."""
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    compiler.num_threads = min(count, limit) if count >= 1 else limit
    numba.set_num_threads(compiler.num_threads)


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
            raise UserError(
                f"must be a positive number of images, got {self.subset}", about="subset"
            )
        if self.max_resolution is not None and self.max_resolution < 1:
            raise UserError(
                f"must be at least 1 pixel, got {self.max_resolution}", about="max_resolution"
            )
        if self.num_workers < 1:
            raise UserError(f"must be at least 1, got {self.num_workers}", about="num_workers")
        if self.chunk_size < 1:
            raise UserError(f"must be at least 1 image, got {self.chunk_size}", about="chunk_size")


@dataclass
class Conversion:
    """What a conversion wrote: the file, each sample's source index, images left out, seconds,
    and the class names (stored beside the file, see `classes_path`)."""

    path: Path
    indices: np.ndarray
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    classes: list[str] = field(default_factory=list)


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


def _unreadable_images(
    dataset: ImageFolder, indices: np.ndarray, options: WriterOptions
) -> list[tuple[int, str]]:
    """(index, error) of the images of `indices` that do not decode (or a UserError naming the
    first one unless `options` skips them)."""
    paths = [dataset.samples[i][0] for i in indices]
    if options.num_workers > 1:
        with Pool(options.num_workers, die_with_parent, (os.getpid(),)) as pool:
            errors = pool.map(_check_image, paths, chunksize=64)
    else:
        errors = [_check_image(path) for path in paths]
    bad = [(int(i), error) for i, error in zip(indices, errors, strict=True) if error]
    if bad and options.on_bad_image == "stop":
        index, error = bad[0]
        raise UserError(
            f"cannot read image {dataset.samples[index][0]} ({error}): fix or remove it, "
            f"or skip unreadable images with {mention('on_bad_image', 'skip')}"
            + (f" ({len(bad) - 1} more unreadable)" if len(bad) > 1 else "")
        )
    return bad


def _writer_worker(report: Connection, parent_pid: int, *worker_args) -> None:
    """One FFCV writer process: dies with the conversion process; a failure is reported to the
    parent, which stops the whole conversion, instead of leaving FFCV waiting for its samples."""
    from ffcv.writer import worker_job_indexed_dataset

    die_with_parent(parent_pid)
    try:
        worker_job_indexed_dataset(*worker_args)
    except BaseException as error:
        report_failure(report, f"an FFCV writer process failed ({one_line(error)})")
        os._exit(1)


def _write_ffcv_file(
    report: Connection,
    dataset,
    indices: np.ndarray,
    partial_path: Path,
    options: WriterOptions,
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """In the conversion process: check the images of an ImageFolder, then write the readable ones
    of `indices` to `partial_path`. Returns the written indices and the (index, error) left out."""
    ffcv = import_ffcv()
    from ffcv.utils import chunks

    bad = _unreadable_images(dataset, indices, options) if isinstance(dataset, ImageFolder) else []
    if bad:
        indices = np.setdiff1d(indices, [index for index, _ in bad])
    if len(indices) == 0:
        raise UserError("no readable images to write")
    fields = {
        "image": ffcv.fields.RGBImageField(
            write_mode=options.write_mode,
            max_resolution=options.max_resolution,
            jpeg_quality=options.jpeg_quality,
            compress_probability=options.compress_probability,
        ),
        "label": ffcv.fields.IntField(),
    }
    writer = ffcv.writer.DatasetWriter(str(partial_path), fields, num_workers=options.num_workers)
    work = chunks(list(enumerate(indices.tolist())), options.chunk_size)
    worker = partial(_writer_worker, report, os.getpid())
    writer._write_common(len(indices), work, worker, (_ArrayDataset(dataset),))
    return indices, bad


def classes_path(path: str | os.PathLike) -> Path:
    """The JSON file beside the FFCV file `path` that holds its class names: `<path>.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _check_labels_fit_classes(dataset, source: str) -> None:
    """UserError if a label of `dataset` is not one of its classes."""
    labels = np.asarray(dataset.targets)
    if labels.min() < 0 or labels.max() >= len(dataset.classes):
        raise UserError(
            f"{source}: labels run from {labels.min()} to {labels.max()} but there are "
            f"{len(dataset.classes)} classes: fix the labels"
        )


def _warn_empty_classes(dataset, console: Console) -> None:
    """Warn about class folders without images: they stay classes (with no samples)."""
    empty = dataset.empty_classes if isinstance(dataset, ImageFolder) else []
    if empty:
        console.print(
            f"[yellow]warning:[/] class folder(s) without images kept as classes with no "
            f"samples: {', '.join(empty)}",
            highlight=False,
            soft_wrap=True,
        )


def _remove_stale_files(out_path: Path) -> None:
    """Remove the partial FFCV files and class-file temporaries that conversions into `out_path`
    by processes no longer running left behind."""
    stale = [
        *out_path.parent.glob(f"{out_path.name}.partial-*"),
        *out_path.parent.glob(f".{classes_path(out_path).name}{TEMP_MARK}*"),
    ]
    for path in stale:
        pid = path.name.rpartition("-")[2]
        if pid.isdigit() and not _process_exists(int(pid)):
            path.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    """True if a process `pid` is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def convert_to_ffcv(
    source: str,
    out_path: str | os.PathLike,
    options: WriterOptions | None = None,
    console: Console | None = None,
) -> Conversion:
    """Write `source` (an ImageFolder tree or Fashion-MNIST) to the FFCV file `out_path`, and its
    class names to `classes_path(out_path)`.

    Options, source and `out_path` are checked before any work. The writing runs in a process
    group of its own that is killed as a whole on Ctrl-C, SIGTERM, the death of this process or a
    failing writer process, and the file is written under a temporary name and renamed when
    complete, so an interrupted conversion never leaves a file at `out_path` (nor, unless this
    process is killed, a temporary one; the next conversion into `out_path` removes those).
    `options.subset` keeps a random subset (seed 0).
    """
    options = options or WriterOptions()
    options.check()
    import_ffcv()
    out_path = check_writable(out_path, "out_path")
    console = console or Console(stderr=True)
    start = time.perf_counter()
    dataset = open_source(source, options.split)
    _check_labels_fit_classes(dataset, source)
    _warn_empty_classes(dataset, console)
    indices = np.arange(len(dataset))
    if options.subset is not None and options.subset < len(indices):
        indices = np.sort(np.random.default_rng(0).choice(indices, options.subset, replace=False))
    _remove_stale_files(out_path)
    partial_path = out_path.with_name(f"{out_path.name}.partial-{os.getpid()}")
    try:
        indices, bad = run_in_process_group(
            _write_ffcv_file, dataset, indices, partial_path, options
        )
        write_json(classes_path(out_path), {"classes": dataset.classes, "samples": len(indices)})
        os.replace(partial_path, out_path)
    except UserError as error:
        raise UserError(f"cannot convert {source}: {error.message}") from None
    finally:
        partial_path.unlink(missing_ok=True)
    skipped = [dataset.samples[index][0] for index, _ in bad]
    for index, error in bad:
        console.print(
            f"[yellow]warning:[/] skipping unreadable image {dataset.samples[index][0]} ({error})",
            highlight=False,
            soft_wrap=True,
        )
    conversion = Conversion(
        out_path, indices, skipped, time.perf_counter() - start, list(dataset.classes)
    )
    dropped = f", {len(skipped)} unreadable images skipped" if skipped else ""
    console.print(
        f"wrote {out_path}: {len(indices)} samples of {len(dataset.classes)} classes in "
        f"{conversion.seconds:.1f} s{dropped}",
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
    unknown = set(writer_options) - set(WriterOptions.__dataclass_fields__)
    if unknown:
        raise UserError(f"unknown FFCV writer option(s): {', '.join(sorted(unknown))}")
    options = WriterOptions(**writer_options)
    options.check()
    out_path = Path(out_path)
    if out_path.exists():
        if not _is_ffcv_file(out_path):
            raise UserError(
                f"{out_path} exists but is not an FFCV image file: delete it or choose another path"
            )
        return out_path
    return convert_to_ffcv(source, out_path, options).path


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
    """Contents of an FFCV file: sample and class counts, image sizes and storage modes.

    `class_names` are those stored beside the file (None for files written without them, whose
    class count is then one more than their highest label); `label_range` is the lowest and
    highest label in the file.
    """

    path: Path
    num_samples: int
    num_classes: int
    class_counts: list[int]
    width_range: tuple[int, int]
    height_range: tuple[int, int]
    jpeg_fraction: float
    class_names: list[str] | None
    label_range: tuple[int, int]

    @property
    def source(self) -> str:
        """What the summary describes, for messages (as `Loader.source`)."""
        return str(self.path)


def _stored_classes(path: Path, num_samples: int) -> list[str] | None:
    """The class names stored beside the FFCV file `path`; None if there are none."""
    stored_path = classes_path(path)
    if not stored_path.is_file():
        return None
    try:
        stored = json.loads(stored_path.read_text())
        classes, samples = stored["classes"], stored["samples"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"{stored_path} is not the class list of {path} ({one_line(error)}): "
            "delete it or convert again"
        ) from None
    if not isinstance(classes, list) or samples != num_samples:
        raise UserError(
            f"{stored_path} does not describe {path} ({num_samples} samples): "
            "delete it or convert again"
        )
    return [str(name) for name in classes]


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
    class_names = _stored_classes(path, int(reader.num_samples))
    label_range = (int(labels.min()), int(labels.max())) if len(labels) else (0, -1)
    num_classes = len(class_names) if class_names is not None else max(label_range[1] + 1, 0)
    counts = np.bincount(labels[labels >= 0], minlength=num_classes)
    return FileSummary(
        path=path,
        num_samples=int(reader.num_samples),
        num_classes=num_classes,
        class_counts=counts.tolist(),
        width_range=(int(images["width"].min()), int(images["width"].max())),
        height_range=(int(images["height"].min()), int(images["height"].max())),
        jpeg_fraction=float(np.mean(images["mode"] == 0)) if len(images) else 0.0,
        class_names=class_names,
        label_range=label_range,
    )


def inspect_ffcv_file(path: str | os.PathLike, console: Console | None = None) -> FileSummary:
    """Print an FFCV file's sample count, classes (with their names where stored), per-class
    counts and image-size range."""
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
    names = summary.class_names
    table = Table("class", "name", "samples") if names is not None else Table("class", "samples")
    for label, count in enumerate(summary.class_counts):
        name = [names[label] if label < len(names) else "?"] if names is not None else []
        table.add_row(str(label), *name, str(count))
    console.print(table)
    return summary
