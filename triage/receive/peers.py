"""Open connections per peer IP across receiver workers: ``dicom.max_connections_per_peer`` for the
whole port, not per process.

Why a shared file mapping and not a lock or a socket: the check runs on each worker's handshake-gate
thread for every new connection and must never block on another process (a stuck worker would stop
the others admitting anyone). Each worker rewrites only its own row (at each connection its gate
admits, hands over or drops, and every 0.1 s) and reads the others' rows without a lock; a torn read
costs a count off by one for an instant.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct
from pathlib import Path


class PeerTable:
    """Open connections per peer IP, one row per worker, in a shared file mapping.

    A row is ``SLOTS`` entries of (8-byte key of the IP, 4-byte count); only its worker writes it,
    everyone reads all rows. A reader can see a row half rewritten; the cost is a count off by one
    for an instant, never a crash or a stuck slot (a restarted worker rewrites its row).
    """

    SLOTS = 256
    _ENTRY = struct.Struct("<QI4x")

    def __init__(self, path: Path, workers: int, *, create: bool = False) -> None:
        self.path = path
        self.workers = workers
        self._row = self.SLOTS * self._ENTRY.size
        size = self._row * workers
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(size)
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    @staticmethod
    def key(peer: str) -> int:
        return int.from_bytes(hashlib.blake2b(peer.encode(), digest_size=8).digest(), "little") or 1

    def publish(self, worker: int, counts: dict[str, int]) -> None:
        """Rewrite ``worker``'s row with ``counts`` (the busiest peers first if more than SLOTS)."""
        items = sorted(((k, v) for k, v in counts.items() if v > 0), key=lambda kv: -kv[1])[: self.SLOTS]
        buf = bytearray(self._row)
        for i, (peer, n) in enumerate(items):
            self._ENTRY.pack_into(buf, i * self._ENTRY.size, self.key(peer), n)
        start = worker * self._row
        self._map[start:start + self._row] = bytes(buf)

    def others(self, worker: int, peer: str) -> int:
        """Connections from ``peer`` held by the other workers, as they last published them."""
        key = self.key(peer)
        total = 0
        for w in range(self.workers):
            if w == worker:
                continue
            base = w * self._row
            for i in range(self.SLOTS):
                k, n = self._ENTRY.unpack_from(self._map, base + i * self._ENTRY.size)
                if k == 0:
                    break
                if k == key:
                    total += n
                    break
        return total

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
