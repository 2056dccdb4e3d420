"""Image files that tests need and PIL cannot easily write."""

import struct
import zlib
from pathlib import Path


def huge_png(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height (its pixels are missing): an image a decompression
    bomb check must stop from the header alone."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = [(b"IHDR", header), (b"IEND", b"")]
    data = b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        for kind, body in chunks
    )
    path.write_bytes(data)
