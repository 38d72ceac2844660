"""One writer per SOP Instance UID at a time, across threads *and* processes sharing a store.

Why: the receiver runs several worker processes on one port (``[dicom] workers``), each with its own
:class:`~triage.store.db.Store`. A PACS that times out and re-sends an instance on a new association
while the first is still being written makes two processes store the same SOP Instance UID at the same
instant: both see no row, both rename into the same spool path, both commit a row, and the row that
wins need not describe the file that won (its sha256 from one copy, its bytes from the other). A lock
per process could not see the other worker.

How: 64 stripes, chosen by a hash that is the same in every process (CRC-32 of the UID; Python's
``hash`` of a str is salted per process). A stripe is a ``threading.Lock`` (threads of one store) and
an *open-file-description* record lock on byte ``k`` of ``<root>/sop.lock`` (Linux ``F_OFD_SETLKW``):
unlike POSIX ``lockf`` locks these belong to the open file, not the process, so two stores in one
process exclude each other too, and closing one store's file cannot drop another's locks. The kernel
releases them when a process dies (``kill -9`` included), so a crashed worker never leaves a stripe held.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

STRIPES = 64
LOCK_FILE = "sop.lock"


def stripe_of(sop_uid: str) -> int:
    """The stripe of a SOP Instance UID, the same in every process."""
    return zlib.crc32(sop_uid.encode("ascii", "replace")) % STRIPES


def _flock(kind: int, start: int) -> bytes:
    """A ``struct flock`` for one byte at ``start`` (l_pid 0, as OFD locks require)."""
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, start, 1, 0)


class SopLocks:
    """Striped locks over SOP Instance UIDs for one store (see the module docstring)."""

    def __init__(self, root: Path):
        self._threads = [threading.Lock() for _ in range(STRIPES)]
        self._fd = os.open(Path(root) / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)

    @contextlib.contextmanager
    def hold(self, sop_uid: str) -> Iterator[None]:
        """Hold ``sop_uid``'s stripe: no other thread or process of this store root holds it meanwhile."""
        k = stripe_of(sop_uid)
        with self._threads[k]:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLKW, _flock(fcntl.F_WRLCK, k))
            try:
                yield
            finally:
                fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, k))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
