"""The spool's files, made durable: tmp/ writes, atomic placement, directory fsyncs, quarantine.

Why this shape: a PACS forgets an instance once it gets a success status, so a file must be
fsync'd, renamed into place and its directory fsync'd before it is answered (the store runs the
file's fsync beside the folder's and its commit, see :meth:`triage.store.db.Store.adopt_instance`).
Everything is written through ``tmp/`` (same filesystem as the spool, so ``os.replace`` is atomic),
refused bytes go to ``quarantine/`` with a ``.reason.json`` beside each. Nothing here touches the
database; the :class:`~triage.store.db.Store` pairs these file steps with its rows, and passes in
the time (its injectable clock) wherever a file's name or age depends on it.

The directory fsyncs that parallel associations would otherwise queue for are shared
(:class:`GroupSync`): one fsync of a folder covers every rename made in it before it started. The
same class shares the fsync of SQLite's write-ahead log among the ingest commits (see
:meth:`triage.store.db.Store._commit_index`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from triage.store.schema import BinaryWriter, StoreError

# Path components come from the sender. DICOM UIDs are digits and dots; we tolerate the letters,
# '-' and '_' that some vendors emit, and refuse anything that could walk the filesystem.
_SAFE_UID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")


def check_uid(kind: str, value: str) -> str:
    """``value`` if it is safe as one path component, else :class:`StoreError` naming ``kind``."""
    if not isinstance(value, str) or not _SAFE_UID.match(value) or ".." in value:
        raise StoreError(f"{kind} {value!r} is not usable as a UID (expected digits and dots, 1-64 chars)")
    return value


def safe_hint(hint: str) -> str:
    """A sender-supplied label made safe for a quarantine file name."""
    cleaned = re.sub(r"[^0-9A-Za-z._-]", "_", hint or "instance")[:64].lstrip(".")
    return cleaned or "instance"


def fsync_dir(path: Path) -> None:
    """Make the renames and creations in ``path`` durable (a file's own fsync does not)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupSync:
    """fsync of one directory (or file), shared by every change made to it before the fsync started.

    Instances of one series arriving on parallel associations land in the same folder; each must
    know its rename is durable before it is answered, but one directory fsync issued after several
    renames makes all of them durable, so a caller whose rename precedes a running leader's start
    waits for the next round instead of queueing its own. ``fsync`` may be another function of the
    path (the store passes one for SQLite's ``-wal`` file: one fsync makes every commit written to it
    before durable, whichever thread or process wrote it).
    """

    def __init__(self, path: Path, fsync: Callable[[Path], None] = fsync_dir) -> None:
        self.path = path
        self._fsync = fsync
        self.cond = threading.Condition()
        self.requested = 0  # tickets handed out (one per rename, taken after the rename)
        self.synced = 0  # every ticket up to this one is durable
        self.running = False

    @property
    def idle(self) -> bool:
        return not self.running and self.synced == self.requested

    def sync(self) -> None:
        with self.cond:
            self.requested += 1
            ticket = self.requested
            while self.synced < ticket:
                if self.running:
                    self.cond.wait()
                    continue
                self.running = True
                target = self.requested  # renames with these tickets happened before the fsync
                self.cond.release()
                try:
                    self._fsync(self.path)
                finally:  # on error the round does not count: the next caller leads a retry
                    self.cond.acquire()
                    self.running = False
                    self.cond.notify_all()
                self.synced = max(self.synced, target)


class Spool:
    """The folders under a storage root and the durable file steps on them. Thread-safe."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.spool = self.root / "spool"
        self.tmp = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        self.volumes = self.root / "volumes"
        made: list[Path] = []
        for d in (self.root, self.spool, self.tmp, self.quarantine_dir, self.volumes):
            missing = d
            while not missing.is_dir():  # a new root may need its own parents too
                made.append(missing)
                missing = missing.parent
            d.mkdir(parents=True, exist_ok=True)
        # the new folders' entries are durable only once their parents are fsync'd (a power cut after
        # start could otherwise take spool/ with the first instances in it; SQLite's first sync of its
        # journal happened to cover the root, not the root's own parent): once, at creation
        for parent in sorted({d.parent for d in made}, key=lambda q: len(q.parts), reverse=True):
            fsync_dir(parent)
        self._dir_syncs: dict[Path, GroupSync] = {}
        self._dir_syncs_lock = threading.Lock()
        self._durable_dirs: set[Path] = set()  # folders whose entry (and their parents') we fsync'd

    # ------------------------------------------------------------------------------------ names
    def new_tmp_path(self, suffix: str = ".dcm") -> Path:
        """A fresh name under ``tmp/`` (same filesystem as the spool, so renames are atomic)."""
        return self.tmp / f"{time.monotonic_ns():x}-{secrets.token_hex(6)}{suffix}"

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return (
            self.spool
            / check_uid("StudyInstanceUID", study_uid)
            / check_uid("SeriesInstanceUID", series_uid)
            / f"{check_uid('SOPInstanceUID', sop_uid)}.dcm"
        )

    def volume_path(self, study_uid: str, series_uid: str, generation: int) -> Path:
        return (
            self.volumes / check_uid("StudyInstanceUID", study_uid)
            / f"{check_uid('SeriesInstanceUID', series_uid)}-g{int(generation)}.npz"
        )

    def results_dir(self, study_uid: str) -> Path:
        d = self.root / "results" / check_uid("StudyInstanceUID", study_uid)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def free_bytes(self) -> int:
        """Bytes available to this (unprivileged) process on the spool's filesystem."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    # ----------------------------------------------------------------------------------- writes
    def write_tmp(self, writer: BinaryWriter, suffix: str = ".dcm", *, sync: bool = True) -> Path:
        """Write a new tmp/ file through ``writer`` (fsync'd when ``sync``); nothing left on error."""
        tmp = self.new_tmp_path(suffix)
        try:
            with open(tmp, "wb") as f:
                writer(f)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def write_file(self, path: Path, writer: BinaryWriter) -> Path:
        """Write a payload (SR, HL7) atomically: tmp/, fsync, rename, fsync the folder."""
        tmp = self.write_tmp(writer, path.suffix)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def place(self, tmp_path: Path, final: Path) -> None:
        """Rename into the spool, creating (and fsyncing) missing parent folders first.

        Returns once the rename is durable; the folder's fsync is shared with concurrent renames.
        """
        self.rename_into(tmp_path, final).sync()

    def rename_into(self, tmp_path: Path, final: Path) -> GroupSync:
        """Rename into the spool (missing parent folders created and made durable first); the rename
        itself is durable only after ``.sync()`` on the returned group, which the caller may run
        alongside other waits (the store overlaps it with its database commit)."""
        parent = final.parent
        with self._dir_syncs_lock:
            known = parent in self._durable_dirs
        if not known:
            # Every folder between the spool and ``parent`` is made durable in its parent before the
            # rename, whether this writer made it or found it: a folder another writer (a thread, or
            # another receiver process) has just made may still wait for that writer's fsync of its
            # parent, and an instance answered in it would go with it in a power cut (found by
            # tests/integration/test_powercut.py). Once per folder per process: two fsyncs a series.
            parent.mkdir(parents=True, exist_ok=True)
            top = self.spool if self.spool in parent.parents else self.root
            chain: list[Path] = []
            p = parent
            while p != top and top in p.parents:
                chain.append(p)
                p = p.parent
            for d in reversed(chain):
                fsync_dir(d.parent)
            with self._dir_syncs_lock:
                if len(self._durable_dirs) > 4096:
                    self._durable_dirs.clear()
                self._durable_dirs.add(parent)
        os.replace(tmp_path, final)
        with self._dir_syncs_lock:
            group = self._dir_syncs.get(parent)
            if group is None:
                group = self._dir_syncs[parent] = GroupSync(parent)
                if len(self._dir_syncs) > 1024:  # forget idle series folders
                    for d in [d for d, g in self._dir_syncs.items() if g.idle and d != parent]:
                        del self._dir_syncs[d]
        return group

    def remove(self, path: Path) -> None:
        """Delete a superseded spool file and make the deletion durable (best effort)."""
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            fsync_dir(path.parent)

    # ------------------------------------------------------------------------------- quarantine
    def quarantine_file(self, tmp_path: Path, reason: str, calling_aet: str, hint: str, now: float) -> Path:
        """Move a file (normally in tmp/) into quarantine/ with its ``.reason.json``, both durable."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        dest = self.quarantine_dir / f"{stamp}-{safe_hint(hint)}-{secrets.token_hex(4)}.dcm"
        fsync_file(tmp_path)
        try:
            os.replace(tmp_path, dest)
        except OSError:  # another filesystem (a caller's own temp file): copy instead
            shutil.copyfile(tmp_path, dest)
            tmp_path.unlink(missing_ok=True)
        size = dest.stat().st_size
        info: dict[str, Any] = {
            "reason": reason,
            "calling_aet": calling_aet,
            "hint": hint,
            "received_at": now,
            "size": size,
            "file": dest.name,
        }
        reason_path = dest.with_name(dest.name + ".reason.json")
        with open(reason_path, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.quarantine_dir)
        return dest

    # ---------------------------------------------------------------------------------- sweeping
    def sweep_tmp(self, older_than_s: float, now: float) -> int:
        """Delete tmp/ files last written before ``now - older_than_s`` (all of them when <= 0)."""
        removed = 0
        limit = now - older_than_s
        for p in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if older_than_s <= 0 or p.stat().st_mtime < limit:
                    p.unlink()
                    removed += 1
        return removed
