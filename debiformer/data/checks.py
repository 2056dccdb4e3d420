"""Checks of a dense data split before any work: every sample's files and annotations, so a bad
one stops the run with one line naming it before the first training step (or evaluation).

What is checked is what is cheap: image headers (the file exists, is an image, its size, the
pixel limit), masks read whole (mode, 8 bits, size, values against the classes), COCO
annotations against their images (sizes, boxes, segmentations). What the files say is kept in a
cache (`default_cache_dir()`, one JSON file per folder) keyed by each file's size and mtime, so a
second run stats the files and reads none; the verdicts are drawn from it again every run, so
changed settings (classes, the pixel limit) count. What only a full decode finds (a file cut short
in its body) stops with the same kind of line where the loaders read it.

COCO boxes that reach partly outside their image are clipped to it (one warning counts them);
a box wholly outside, or left under a pixel by the clipping, is an error (docs/data.md says why).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from debiformer import runtime
from debiformer.data.coco import MIN_BOX_SIZE, DetectionData, is_finite_number
from debiformer.data.images import PixelLimit, check_pixels, image_header
from debiformer.data.segmentation import SegmentationData, read_mask
from debiformer.errors import UserError

CACHE_VERSION = 1
PROGRESS_FROM = 500  # files to read before a progress bar is worth showing


def default_cache_dir() -> Path:
    """Where checks keep what they read: `$XDG_CACHE_HOME/debiformer/checks`, by default
    `~/.cache/debiformer/checks`."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "debiformer" / "checks"


@dataclass(frozen=True)
class CheckSettings:
    """How a split is checked: the pixel limit, a progress bar on large sets, `workers` threads
    reading files, and the cache folder (None: no cache)."""

    limit: PixelLimit = field(default_factory=PixelLimit)
    progress: bool = False
    workers: int = 1
    cache: Path | None = None


def notice(text: str) -> None:
    """A one-line warning on rank 0's stderr."""
    console = Console(stderr=True, quiet=runtime.rank_and_world()[0] != 0, soft_wrap=True)
    console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False)


# ----------------------------------------------------------------------------- file facts


def file_facts(
    folder: Path,
    names: list[str],
    kind: str,
    read: Callable[[Path], list],
    settings: CheckSettings,
) -> dict[str, list]:
    """What `read` says of each file `folder/name` (a JSON list), from the cache where the file's
    size and mtime are those cached, else read (by `settings.workers` threads); a UserError of
    `read` stops at the first bad file in `names` order. The cache keeps what was read, even when
    a file stopped the check."""
    cache_path = _cache_path(settings.cache, kind, folder)
    cached = _read_cache(cache_path)
    facts, stamps, todo = {}, {}, []
    for name in dict.fromkeys(names):
        stamp = _stamp(folder / name)
        entry = cached.get(name)
        if stamp is not None and isinstance(entry, list) and entry[:2] == stamp:
            facts[name], stamps[name] = entry[2], stamp
        else:
            todo.append((name, stamp))
    try:
        for (name, stamp), value in zip(
            todo, _read_all(folder, todo, read, settings), strict=False
        ):
            facts[name] = value
            if stamp is not None:
                stamps[name] = stamp
    finally:
        if todo and cache_path is not None:
            read_now = {name: [*stamps[name], facts[name]] for name in stamps}
            _write_cache(cache_path, folder, {**cached, **read_now})
    return facts


def _read_all(
    folder: Path, todo: list[tuple[str, Any]], read: Callable[[Path], list], settings: CheckSettings
) -> Iterator[list]:
    """`read` of each file of `todo`, in order, with a transient progress bar when there are many."""
    enabled = settings.progress and len(todo) >= PROGRESS_FROM
    progress = Progress(
        TextColumn("[bold]checking {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=not enabled,
    )
    with progress, ThreadPoolExecutor(max(1, settings.workers)) as pool:
        bar = progress.add_task(str(folder), total=len(todo))
        results = pool.map(read, [folder / name for name, _ in todo])
        try:
            for value in results:
                progress.advance(bar)
                yield value
        finally:
            pool.shutdown(cancel_futures=True)


def _stamp(path: Path) -> list[int] | None:
    """[size, mtime in ns] of a file, None if it cannot be stat'ed."""
    try:
        status = path.stat()
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns]


def _cache_path(cache: Path | None, kind: str, folder: Path) -> Path | None:
    """The cache file of one folder's facts of one kind."""
    if cache is None:
        return None
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:20]
    return cache / f"{kind}-{digest}.json"


def _read_cache(path: Path | None) -> dict[str, list]:
    """The cached entries (name -> [size, mtime_ns, facts]); none if missing or unreadable."""
    if path is None:
        return {}
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(content, dict) or content.get("version") != CACHE_VERSION:
        return {}
    files = content.get("files")
    return files if isinstance(files, dict) else {}


def _write_cache(path: Path, folder: Path, files: dict[str, list]) -> None:
    """Writes the cache file atomically; a cache that cannot be written is no error."""
    content = {"version": CACHE_VERSION, "folder": str(folder.resolve()), "files": files}
    with contextlib.suppress(OSError):
        runtime.write_text(path, json.dumps(content, separators=(",", ":")))


# ----------------------------------------------------------------------------- segmentation


def mask_facts(path: Path, limit: PixelLimit) -> list:
    """[width, height, values present] of a mask file read whole (`read_mask`)."""
    values = read_mask(path, limit)
    present = np.flatnonzero(np.bincount(values.ravel(), minlength=256)).tolist()
    return [values.shape[1], values.shape[0], present]


def header_facts(path: Path, limit: PixelLimit) -> list:
    """[width, height] of an image file from its header."""
    width, height, _ = image_header(path, max_pixels=limit.pixels, limit_name=limit.name)
    return [width, height]


def check_segmentation_data(
    data: SegmentationData, *, train: bool, settings: CheckSettings
) -> None:
    """Checks every (image, mask) pair of a split: the image's header and the pixel limit, the
    mask's mode, size (the image's) and values (classes or ignored); in training, that some
    pixel of some mask is a class. A UserError names the first bad file."""
    samples, limit = data.samples, settings.limit
    image_names = [image.name for image, _ in samples.pairs]
    mask_names = [mask.name for _, mask in samples.pairs]
    images = file_facts(
        data.images, image_names, "image", partial(header_facts, limit=limit), settings
    )
    masks = file_facts(data.masks, mask_names, "mask", partial(mask_facts, limit=limit), settings)
    seen: set[int] = set()
    labelled = False
    for image_path, mask_path in samples.pairs:
        width, height = images[image_path.name]
        check_pixels(image_path, width, height, max_pixels=limit.pixels, limit_name=limit.name)
        mask_width, mask_height, values = masks[mask_path.name]
        if (mask_width, mask_height) != (width, height):
            raise UserError(
                f"image {image_path} is {width}x{height} but its mask {mask_path} is "
                f"{mask_width}x{mask_height}: they must be the same size"
            )
        classes = samples.to_classes(np.array(values, dtype=np.uint8))
        wrong = (classes != samples.ignore_index) & (classes >= samples.num_classes)
        if wrong.any():
            value = int(np.array(values)[wrong][0])
            raise UserError(f"mask {mask_path}: {samples.not_a_class(value)}")
        labelled = labelled or bool((classes != samples.ignore_index).any())
        seen.update(values)
    if train and not labelled:
        shown = ", ".join(str(value) for value in sorted(seen))
        raise UserError(
            f"every training label is ignored: no mask of {data.masks} holds a class (they hold "
            f"only {shown}; {samples.value_rule()}); nothing to learn from"
        )


# ----------------------------------------------------------------------------- detection


def check_detection_data(data: DetectionData, settings: CheckSettings) -> None:
    """Checks every image a split reads and its annotations: the image's header, the pixel limit
    and its size against the file's `width` and `height`; each box inside the image, each
    segmentation (with masks) a valid polygon list or RLE of the image's size. Clips the boxes
    that reach partly outside their image in place, with one warning counting them. A UserError
    names the annotation file, the image and the annotation."""
    coco, limit = data.coco, settings.limit
    entries = {image_id: coco.imgs[image_id] for image_id in data.samples.image_ids}
    for image_id, entry in entries.items():
        if not isinstance(entry.get("file_name"), str):
            raise UserError(f"{data.annotations}: image {image_id} has no 'file_name'")
    names = [entry["file_name"] for entry in entries.values()]
    sizes = file_facts(data.images, names, "image", partial(header_facts, limit=limit), settings)
    clipped = []
    for image_id, entry in entries.items():
        path = data.images / entry["file_name"]
        width, height = sizes[entry["file_name"]]
        check_pixels(path, width, height, max_pixels=limit.pixels, limit_name=limit.name)
        stated = (entry.get("width"), entry.get("height"))
        if None not in stated and stated != (width, height):
            raise UserError(
                f"{data.annotations}: image {path} is {width}x{height} but the file says "
                f"{stated[0]}x{stated[1]} (image id {image_id}); fix the annotation file or the image"
            )
        for annotation in coco.imgToAnns[image_id]:
            where = f"{data.annotations}: annotation {annotation['id']} of image {path}"
            if _clip_box(annotation, width, height, where):
                clipped.append(annotation)
            if data.samples.masks:
                _check_segmentation(annotation["segmentation"], width, height, where)
    if clipped:
        first = clipped[0]
        notice(
            f"clipped {len(clipped)} box(es) that reach outside their images (first: "
            f"{entries[first['image_id']]['file_name']} annotation {first['id']}) in "
            f"{data.annotations}"
        )


def _clip_box(annotation: dict[str, Any], width: int, height: int, where: str) -> bool:
    """Clips the annotation's box to the width x height image if it reaches outside; whether it
    did. A UserError for a box wholly outside or under a pixel once clipped; boxes under a pixel
    to start with are left as they are (training drops them)."""
    x, y, w, h = annotation["bbox"]
    if w < MIN_BOX_SIZE or h < MIN_BOX_SIZE:
        return False
    left, top = max(x, 0), max(y, 0)
    right, bottom = min(x + w, width), min(y + h, height)
    if left <= x and top <= y and right >= x + w and bottom >= y + h:
        return False
    if right - left < MIN_BOX_SIZE or bottom - top < MIN_BOX_SIZE:
        inside = "lies outside" if right <= left or bottom <= top else "is mostly outside"
        raise UserError(
            f"{where}: box {annotation['bbox']} {inside} the {width}x{height} image; fix or "
            "remove the annotation"
        )
    annotation["bbox"] = [left, top, right - left, bottom - top]
    return True


def _check_segmentation(segmentation: Any, width: int, height: int, where: str) -> None:
    """A UserError unless `segmentation` is a list of polygons (each 3 or more x, y points) or an
    RLE of the width x height image whose runs cover it exactly."""
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if not (
                isinstance(polygon, list)
                and len(polygon) >= 6
                and len(polygon) % 2 == 0
                and all(is_finite_number(value) for value in polygon)
            ):
                raise UserError(
                    f"{where}: segmentation polygon {_shown(polygon)} is not a list of 3 or more "
                    "x, y points"
                )
        if not segmentation:
            raise UserError(f"{where}: segmentation is an empty list of polygons")
        return
    if not isinstance(segmentation, dict) or not {"size", "counts"} <= segmentation.keys():
        raise UserError(
            f"{where}: segmentation {_shown(segmentation)} is neither polygons nor an RLE "
            "({'size': [height, width], 'counts': ...})"
        )
    if segmentation["size"] != [height, width]:
        raise UserError(
            f"{where}: RLE size {segmentation['size']!r} is not the image's [height, width] "
            f"[{height}, {width}]"
        )
    counts = rle_counts(segmentation["counts"])
    if counts is None or sum(counts) != height * width:
        raise UserError(
            f"{where}: RLE counts {_shown(segmentation['counts'])} do not cover the "
            f"{width}x{height} image in non-negative runs"
        )


def rle_counts(counts: Any) -> list[int] | None:
    """The runs of COCO RLE counts: a list of non-negative integers as is, or pycocotools'
    compressed string decoded (as its `rleFrString`); None when they are neither."""
    if isinstance(counts, list):
        valid = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts)
        return counts if valid and counts else None
    if not isinstance(counts, str) or not counts:
        return None
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position == len(counts):
                return None
            digit = ord(counts[position]) - 48
            if not 0 <= digit < 64:
                return None
            value |= (digit & 0x1F) << shift
            more = bool(digit & 0x20)
            position, shift = position + 1, shift + 5
            if not more and digit & 0x10:
                value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
    return runs


def _shown(value: Any) -> str:
    """A JSON value as an error quotes it: at most 60 characters."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
