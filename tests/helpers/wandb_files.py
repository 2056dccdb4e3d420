"""Reading back the records of an offline W&B run file (`run-<id>.wandb`): LevelDB's log format
as W&B writes it, a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of
records, each a 7-byte header (checksum, length, type: full, first, middle, last) and its bytes;
a full record is one `wandb_internal_pb2.Record`."""

import struct
from pathlib import Path

HEADER = b":W&B\xe1\xbe\x00"
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def record_bytes(path: Path) -> list[bytes]:
    """The serialised records of the file, fragments joined."""
    data = path.read_bytes()
    assert data.startswith(HEADER), f"{path} is not a W&B run file"
    records, pending, position = [], b"", len(HEADER)
    while position + 7 <= len(data):
        room = BLOCK - position % BLOCK
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:
            position += room
            continue
        body = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == FULL:
            records.append(body)
        elif kind in (FIRST, MIDDLE):
            pending += body
        elif kind == LAST:
            records.append(pending + body)
            pending = b""
    return records
