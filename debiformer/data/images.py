"""The one place that finds and opens image files: the files that inputs name (`image_files`),
header checks and fully loaded RGB images.

Every problem with a file is a one-line UserError naming it: missing, a folder, not an image,
truncated, or above a pixel limit. The limit is this module's own check: importing it sets PIL's
global `Image.MAX_IMAGE_PIXELS` to None, so PIL neither warns nor raises
`DecompressionBombError` and the limit (`MAX_IMAGE_PIXELS`, PIL's own default, or a caller's
setting) is said in the message with the name of the setting that raises it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from debiformer.errors import UserError, mention

MAX_IMAGE_PIXELS: int = 89_478_485  # PIL's default: 0.25 GiB of 24-bit pixels
DETAIL_CHARS = 120  # at most this much of an underlying error is quoted
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError)  # what PIL raises on a bad file

# what a folder's images are recognised by (files named directly are tried whatever they are)
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class PixelLimit:
    """The most pixels an image may have, and the setting that raises it (named in errors)."""

    pixels: int = MAX_IMAGE_PIXELS
    name: str = mention("max_pixels")


def short_detail(error: BaseException) -> str:
    """An error's message on one line, at most `DETAIL_CHARS` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 3] + "..."


def _opened(path: Path, what: str) -> Image.Image:
    """The image file at `path` opened lazily (header read); a UserError if it is none."""
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not an image file")
    try:
        return Image.open(path)
    except READ_ERRORS as error:
        raise UserError(
            f"{what} {path} is not a readable image ({short_detail(error)}); fix or remove it"
        ) from None


def check_pixels(
    path: str | os.PathLike,
    width: int,
    height: int,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    limit_name: str = mention("max_pixels"),
    what: str = "image",
) -> None:
    """A UserError naming the file if a width x height image has more than `max_pixels` pixels."""
    if width * height > max_pixels:
        raise UserError(
            f"{what} {path} is {width}x{height} ({width * height} pixels), above the limit of "
            f"{max_pixels} pixels; shrink it or raise {limit_name}"
        )


def image_header(
    path: str | os.PathLike,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    limit_name: str = mention("max_pixels"),
    what: str = "image",
) -> tuple[int, int, str]:
    """(width, height, mode) of an image file from its header only (the pixels are not read);
    a UserError naming the file (called `what`) if it is missing, a folder, not an image, or
    above `max_pixels` pixels (`limit_name` names the setting that raises the limit)."""
    path = Path(path)
    with _opened(path, what) as image:
        check_pixels(path, *image.size, max_pixels=max_pixels, limit_name=limit_name, what=what)
        return image.width, image.height, image.mode


def _loaded(
    path: Path, max_pixels: int, limit_name: str, what: str, mode: str | None
) -> Image.Image:
    """The image file fully loaded, converted to `mode` if given, else in its own mode."""
    with _opened(path, what) as image:
        check_pixels(path, *image.size, max_pixels=max_pixels, limit_name=limit_name, what=what)
        try:
            image.load()
        except READ_ERRORS as error:
            raise UserError(
                f"{what} {path} cannot be read ({short_detail(error)}); fix or remove it"
            ) from None
        return image.copy() if mode is None else image.convert(mode)


def read_image(
    path: str | os.PathLike,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    limit_name: str = mention("max_pixels"),
    what: str = "image",
) -> Image.Image:
    """The image file fully loaded, in its own mode; the errors of `image_header`, and a UserError
    naming the file when its body cannot be decoded (truncated, corrupt)."""
    return _loaded(Path(path), max_pixels, limit_name, what, None)


def read_rgb(
    path: str | os.PathLike,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    limit_name: str = mention("max_pixels"),
    what: str = "image",
) -> Image.Image:
    """The image file fully loaded as RGB (greyscale and palette images converted), with the
    errors of `read_image`."""
    return _loaded(Path(path), max_pixels, limit_name, what, "RGB")


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The files `inputs` name, in the order given, each once: a file as it is, a folder's image
    files (by suffix, recursively, sorted), a glob pattern's matching files (sorted). An input
    that names nothing is a one-line `UserError`, raised before any image is read."""
    files: dict[Path, None] = {}
    for text in map(str, inputs):
        path = Path(text)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
                raise UserError(f"{text}: a folder with no image files ({suffixes})")
        elif path.exists():
            found = [path]
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                raise UserError(f"{text}: no file matches this pattern")
        else:
            raise UserError(f"{text}: no such file or folder")
        files.update(dict.fromkeys(found))
    if not files:
        raise UserError("give at least one image file, folder or pattern", about="inputs")
    return list(files)


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """A name per path for the files written from it: its stem, with -2, -3, ... added where
    stems repeat."""
    stems, seen = [], set()
    for path in paths:
        stem, number = path.stem, 2
        while stem in seen:
            stem, number = f"{path.stem}-{number}", number + 1
        seen.add(stem)
        stems.append(stem)
    return stems


def readable_images(
    paths: Sequence[Path],
    *,
    max_pixels: int,
    on_failure: Callable[[Path, str], None],
    advance: Callable[[int], None] = lambda count: None,
) -> Iterator[tuple[Path, Image.Image]]:
    """(path, RGB image) of each file of `paths` that reads (`read_rgb`); for each that does not,
    `on_failure(path, the one-line reason)`, and the rest go on. `advance(1)` as each is read."""
    for path in paths:
        try:
            image = read_rgb(path, max_pixels=max_pixels)
        except UserError as error:
            on_failure(path, str(error))
            continue
        finally:
            advance(1)
        yield path, image
