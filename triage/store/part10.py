"""Just enough DICOM Part-10 parsing to find where a file's dataset starts, and to hash it.

Why its own module: the store hashes the *dataset* bytes (what the sender put on the wire, whatever
File Meta either side wrote) and the receiver walks those same bytes to check an instance before
answering; both need the same answer to "where does the dataset begin", without a pydicom parse.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from pathlib import Path

# Explicit-VR value representations with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)


def dataset_offset(buf: bytes | bytearray | memoryview | mmap.mmap) -> int:
    """Byte offset where the dataset starts in a Part-10 file (0 when there is no File Meta).

    Walks the explicit-VR-little-endian group 0002 elements after ``DICM`` rather than trusting
    (0002,0000) alone, so a meta group written without a group length is handled too.
    """
    if len(buf) < 132 or bytes(buf[128:132]) != b"DICM":
        return 0
    pos = 132
    while pos + 8 <= len(buf):
        group = struct.unpack_from("<H", buf, pos)[0]
        if group != 0x0002:
            break
        vr = bytes(buf[pos + 4 : pos + 6])
        if vr in LONG_VRS:
            if pos + 12 > len(buf):  # a long-VR header cut short at the end of the buffer
                break
            length = struct.unpack_from("<I", buf, pos + 8)[0]
            pos += 12 + length
        else:
            length = struct.unpack_from("<H", buf, pos + 6)[0]
            pos += 8 + length
    return min(pos, len(buf))


def dataset_sha256(path: Path) -> tuple[str, int]:
    """sha256 of the dataset bytes of a Part-10 file, and the file's size."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return hashlib.sha256(b"").hexdigest(), 0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            start = dataset_offset(mm)
            return hashlib.sha256(memoryview(mm)[start:]).hexdigest(), size
