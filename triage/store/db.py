"""The spool and the one SQLite database: the only module that writes pipeline state.

Why this shape: a PACS that got a C-STORE success status deletes or forgets its copy, so an instance
must be on disk (file fsync'd, renamed into place, directory fsync'd) and indexed before the status
goes back. Every later stage (assemble, score, report, send) reads its input from here and records
its progress here, so a crash anywhere resumes where it was and nothing is processed twice:

* files: ``spool/<study_uid>/<series_uid>/<sop_uid>.dcm``, written through ``tmp/`` (same filesystem,
  so ``os.replace`` is atomic), bad instances in ``quarantine/`` with a ``.reason.json`` beside each;
* rows: ``state.db`` in WAL mode with ``synchronous=FULL`` (a commit is on disk before it returns).

One connection guarded by a lock serves every thread (pynetdicom runs a thread per association):
SQLite serialises writers anyway, and a single connection cannot deadlock against itself. Writing
and fsyncing the file happen outside that lock, and the two fsyncs that parallel associations would
otherwise queue for are shared: one directory fsync covers every rename made in that folder before
it started, and one commit (group commit) carries the rows of every put waiting for the lock. Each
put still returns only after its own file, rename and row are durable.

``sha256`` of an instance is the hash of its *dataset* bytes (everything after the File Meta group):
those are the bytes the sender put on the wire, so a test or an audit can compare them with the
sender's copy whatever File Meta either side wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import secrets
import shutil
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from triage.ops.logs import get_logger

log = get_logger("store")

BinaryWriter = Callable[[IO[bytes]], None]

# Study states (DESIGN.md): receiving -> stable -> assembled -> scored -> reported -> sent,
# or rejected(reason) / failed(reason, attempts).
STUDY_STATES = ("receiving", "stable", "assembled", "scored", "reported", "sent", "rejected", "failed")
# Series states: the assembler claims a quiet series (receiving -> stable) and settles it.
SERIES_STATES = ("receiving", "stable", "assembled", "skipped", "rejected", "failed")

# Path components come from the sender. DICOM UIDs are digits and dots; we tolerate the letters,
# '-' and '_' that some vendors emit, and refuse anything that could walk the filesystem.
_SAFE_UID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")

# Schema migrations: index i upgrades user_version i to i + 1. Append, never edit a shipped entry.
_MIGRATIONS: list[str] = [
    """
    CREATE TABLE instances (
        sop_uid          TEXT PRIMARY KEY,
        study_uid        TEXT NOT NULL,
        series_uid       TEXT NOT NULL,
        sop_class_uid    TEXT NOT NULL,
        transfer_syntax  TEXT NOT NULL,
        path             TEXT NOT NULL,
        size             INTEGER NOT NULL,
        sha256           TEXT NOT NULL,
        calling_aet      TEXT NOT NULL,
        received_at      REAL NOT NULL
    );
    CREATE INDEX instances_series ON instances(series_uid);
    CREATE INDEX instances_study ON instances(study_uid);
    CREATE TABLE series (
        series_uid           TEXT PRIMARY KEY,
        study_uid            TEXT NOT NULL,
        modality             TEXT NOT NULL DEFAULT '',
        first_received_at    REAL NOT NULL,
        last_received_at     REAL NOT NULL,
        opened_at            REAL NOT NULL,
        instance_count       INTEGER NOT NULL DEFAULT 0,
        state                TEXT NOT NULL,
        reason               TEXT,
        assembly_generation  INTEGER NOT NULL DEFAULT 0,
        updated_at           REAL NOT NULL
    );
    CREATE INDEX series_study ON series(study_uid);
    CREATE INDEX series_state ON series(state, last_received_at);
    CREATE TABLE studies (
        study_uid   TEXT PRIMARY KEY,
        state       TEXT NOT NULL,
        reason      TEXT,
        attempts    INTEGER NOT NULL DEFAULT 0,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );
    CREATE INDEX studies_state ON studies(state);
    CREATE INDEX studies_updated ON studies(updated_at);
    CREATE TABLE events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        at          REAL NOT NULL,
        study_uid   TEXT,
        series_uid  TEXT,
        sop_uid     TEXT,
        kind        TEXT NOT NULL,
        from_state  TEXT,
        to_state    TEXT,
        reason      TEXT,
        generation  INTEGER
    );
    CREATE INDEX events_study ON events(study_uid, id);
    CREATE TABLE quarantine (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        path         TEXT NOT NULL,
        reason       TEXT NOT NULL,
        calling_aet  TEXT NOT NULL,
        hint         TEXT NOT NULL,
        at           REAL NOT NULL
    );
    """,
    """
    CREATE TABLE assemblies (
        study_uid    TEXT PRIMARY KEY,
        series_uid   TEXT NOT NULL,
        generation   INTEGER NOT NULL,
        volume_path  TEXT NOT NULL,
        complete_at  REAL NOT NULL,
        warnings     TEXT NOT NULL DEFAULT '[]',
        created_at   REAL NOT NULL
    );
    CREATE TABLE scores (
        study_uid    TEXT PRIMARY KEY,
        generation   INTEGER NOT NULL,
        result       TEXT NOT NULL,
        scored_at    REAL NOT NULL
    );
    CREATE TABLE outbox (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        study_uid        TEXT NOT NULL,
        generation       INTEGER NOT NULL,
        kind             TEXT NOT NULL,
        destination      TEXT NOT NULL,
        target           TEXT NOT NULL,
        files            TEXT NOT NULL,
        dedupe           TEXT NOT NULL UNIQUE,
        state            TEXT NOT NULL DEFAULT 'pending',
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  REAL NOT NULL,
        last_error       TEXT,
        ack              TEXT,
        created_at       REAL NOT NULL,
        sent_at          REAL
    );
    CREATE INDEX outbox_due ON outbox(state, next_attempt_at);
    CREATE INDEX outbox_study ON outbox(study_uid);
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)


class StoreError(Exception):
    """A request the store refuses (unsafe UID, unknown state); the message names what and why."""


@dataclass(frozen=True)
class PutResult:
    duplicate: bool  # the same SOP Instance UID with the same dataset bytes was already stored
    path: Path
    replaced: bool = False  # same SOP Instance UID, different bytes: the newer copy replaced the old
    size: int = 0  # bytes of the stored file
    reopened: bool = False  # the instance re-opened a series that had already left `receiving`


@dataclass(frozen=True)
class InstanceRow:
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    size: int
    sha256: str
    calling_aet: str
    received_at: float


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    modality: str
    first_received_at: float
    last_received_at: float
    opened_at: float  # when the current generation began receiving (force_s counts from here)
    instance_count: int
    state: str
    reason: str | None
    assembly_generation: int


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    state: str
    reason: str | None
    attempts: int
    created_at: float
    updated_at: float
    instances: int


@dataclass(frozen=True)
class EventRow:
    at: float
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    kind: str
    from_state: str | None
    to_state: str | None
    reason: str | None
    generation: int | None


class _GroupSync:
    """fsync of one directory, shared by every rename made in it before the fsync started.

    Instances of one series arriving on parallel associations land in the same folder; each must
    know its rename is durable before it is answered, but one directory fsync issued after several
    renames makes all of them durable, so a caller whose rename precedes a running leader's start
    waits for the next round instead of queueing its own.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
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
                    _fsync_dir(self.path)
                finally:  # on error the round does not count: the next caller leads a retry
                    self.cond.acquire()
                    self.running = False
                    self.cond.notify_all()
                self.synced = max(self.synced, target)


@dataclass
class _IndexJob:
    """One instance's rows waiting for a group commit."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    done: bool = False
    reopened: bool = False
    error: BaseException | None = None


@dataclass(frozen=True)
class AssemblyRow:
    study_uid: str
    series_uid: str
    generation: int
    volume_path: Path
    complete_at: float  # when the series was found complete: the start of the end-to-end latency
    warnings: list[str]


@dataclass(frozen=True)
class OutboxRow:
    id: int
    study_uid: str
    generation: int
    kind: str  # "dicom" | "hl7"
    destination: str  # name for logs/metrics: "PACS", "RIS", a routing rule
    target: str  # "AE@host:port"
    files: list[Path]
    state: str  # pending | sent | dead
    attempts: int
    next_attempt_at: float
    last_error: str | None
    ack: str | None


@dataclass(frozen=True)
class RecoveryReport:
    tmp_removed: int
    reindexed: int
    quarantined: int
    missing_files: int


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_uid(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _SAFE_UID.match(value) or ".." in value:
        raise StoreError(f"{kind} {value!r} is not usable as a UID (expected digits and dots, 1-64 chars)")
    return value


def _safe_hint(hint: str) -> str:
    cleaned = re.sub(r"[^0-9A-Za-z._-]", "_", hint or "instance")[:64].lstrip(".")
    return cleaned or "instance"


class Store:
    """Spool folder plus ``state.db``. Thread-safe; ``clock`` is injectable so tests never sleep."""

    def __init__(self, root: Path | str, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.spool = self.root / "spool"
        self.tmp = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        self.volumes = self.root / "volumes"
        self.clock = clock
        for d in (self.root, self.spool, self.tmp, self.quarantine_dir, self.volumes):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # the connection (and so every transaction)
        self._pending_lock = threading.Lock()
        self._pending: list[_IndexJob] = []
        self._sop_locks = [threading.Lock() for _ in range(64)]
        self._dir_syncs: dict[Path, _GroupSync] = {}
        self._dir_syncs_lock = threading.Lock()
        self._db = sqlite3.connect(
            self.root / "state.db", isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    # ----------------------------------------------------------------------------------------- plumbing
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` under the store lock (for later stages' own tables)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one migration per transaction."""
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.root / 'state.db'}: schema version {version} is newer than this glowtriage "
                    f"({SCHEMA_VERSION}); refusing to touch it"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                script = _MIGRATIONS[target - 1]
                self._db.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {target};\nCOMMIT;"
                )

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def new_tmp_path(self, suffix: str = ".dcm") -> Path:
        """A fresh name under ``tmp/`` (same filesystem as the spool, so renames are atomic)."""
        return self.tmp / f"{time.monotonic_ns():x}-{secrets.token_hex(6)}{suffix}"

    def free_bytes(self) -> int:
        """Bytes available to this (unprivileged) process on the spool's filesystem."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return (
            self.spool
            / _check_uid("StudyInstanceUID", study_uid)
            / _check_uid("SeriesInstanceUID", series_uid)
            / f"{_check_uid('SOPInstanceUID', sop_uid)}.dcm"
        )

    # -------------------------------------------------------------------------------------- ingest
    def put_instance(
        self,
        sop_uid: str,
        study_uid: str,
        series_uid: str,
        sop_class_uid: str,
        transfer_syntax: str,
        writer: BinaryWriter,
        calling_aet: str,
        modality: str = "",
    ) -> PutResult:
        """Write a Part-10 file through ``writer`` into tmp/, then :meth:`adopt_instance` it.

        Returns only once the file and its row are durable; the caller may then answer success.
        """
        self.instance_path(study_uid, series_uid, sop_uid)  # refuse unsafe UIDs before writing
        tmp = self.new_tmp_path()
        try:
            with open(tmp, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:
            return self.adopt_instance(
                tmp, sop_uid, study_uid, series_uid, sop_class_uid, transfer_syntax, calling_aet, modality,
                synced=True,
            )
        finally:
            tmp.unlink(missing_ok=True)  # still there only if adopting failed

    def adopt_instance(
        self,
        tmp_path: Path,
        sop_uid: str,
        study_uid: str,
        series_uid: str,
        sop_class_uid: str,
        transfer_syntax: str,
        calling_aet: str,
        modality: str = "",
        *,
        synced: bool = False,
    ) -> PutResult:
        """Move a complete Part-10 file that already lies in tmp/ into the spool and index it.

        The caller owns ``tmp_path`` until this returns: on success it has been renamed into the
        spool (or deleted, for a duplicate); on an exception it is left where it was, so the caller
        can quarantine or delete it.

        Order (each step durable before the next): fsync file -> rename into spool -> fsync the
        directory -> one transaction for instance, series, study and events. A duplicate SOP
        Instance UID with the same dataset bytes is a no-op; with different bytes the newer copy
        wins and an ``instance replaced`` event records it. An instance for a series that already
        left ``receiving`` re-opens it (generation + 1, ``reopened`` event).
        """
        final = self.instance_path(study_uid, series_uid, sop_uid)
        if not synced:
            _fsync_file(tmp_path)
        sha, size = dataset_sha256(tmp_path)
        # Same SOP Instance UID: one at a time (duplicate decision, replacement). Different ones run
        # their renames and directory fsyncs in parallel, which lets the filesystem batch them.
        with self._sop_locks[hash(sop_uid) % len(self._sop_locks)]:
            with self._lock:
                old = self._db.execute(
                    "SELECT path, sha256 FROM instances WHERE sop_uid = ?", (sop_uid,)
                ).fetchone()
            if old is not None and old["sha256"] == sha and Path(old["path"]).exists():
                tmp_path.unlink(missing_ok=True)
                return PutResult(duplicate=True, path=Path(old["path"]), size=size)
            self._place(tmp_path, final)
            old_path = Path(old["path"]) if old is not None else None
            if old_path is not None and old_path != final:
                old_path.unlink(missing_ok=True)  # the same SOP instance re-sent under other UIDs
                with contextlib.suppress(OSError):
                    _fsync_dir(old_path.parent)
            reopened = self._commit_index(
                _IndexJob(
                    (sop_uid, study_uid, series_uid, sop_class_uid, transfer_syntax, final, size, sha,
                     calling_aet, modality, self.clock()),
                    {"replaced": old is not None},
                )
            )
        return PutResult(duplicate=False, path=final, replaced=old is not None, reopened=reopened, size=size)

    def _commit_index(self, job: _IndexJob) -> bool:
        """Group commit: whoever holds the database lock commits every job waiting for it.

        Each caller still returns only after the transaction holding its rows is committed (and,
        with ``synchronous=FULL``, fsync'd), but concurrent associations share one WAL fsync instead
        of queueing for one each.
        """
        with self._pending_lock:
            self._pending.append(job)
        with self._lock:
            if not job.done:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                self._run_batch(batch)
        if job.error is not None:
            raise job.error
        return job.reopened

    def _run_batch(self, batch: list[_IndexJob]) -> None:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                results = [self._index(*j.args, **j.kwargs) for j in batch]
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error, batch[0].done = exc, True
                return
            for j in batch:  # isolate the job that failed; the others still commit
                self._run_batch([j])
            return
        for j, reopened in zip(batch, results, strict=True):
            j.reopened, j.done = reopened, True

    def _place(self, tmp_path: Path, final: Path) -> None:
        """Rename into the spool, creating (and fsyncing) missing parent folders first."""
        parent = final.parent
        if not parent.is_dir():
            created: list[Path] = []
            p = parent
            while not p.is_dir():
                created.append(p)
                p = p.parent
            parent.mkdir(parents=True, exist_ok=True)
            for d in reversed(created):
                _fsync_dir(d.parent)
        os.replace(tmp_path, final)
        with self._dir_syncs_lock:
            group = self._dir_syncs.get(parent)
            if group is None:
                group = self._dir_syncs[parent] = _GroupSync(parent)
                if len(self._dir_syncs) > 1024:  # forget idle series folders
                    for d in [d for d, g in self._dir_syncs.items() if g.idle and d != parent]:
                        del self._dir_syncs[d]
        group.sync()

    def _index(
        self,
        sop_uid: str,
        study_uid: str,
        series_uid: str,
        sop_class_uid: str,
        transfer_syntax: str,
        path: Path,
        size: int,
        sha: str,
        calling_aet: str,
        modality: str,
        now: float,
        *,
        replaced: bool,
        kind_new: str | None = None,
    ) -> bool:
        """Rows for one instance: instance, series/study upsert (re-opening them), events.

        Runs inside the caller's transaction (see :meth:`_commit_index`).
        """
        db = self._db
        reopened = False
        db.execute(
            "INSERT INTO instances (sop_uid, study_uid, series_uid, sop_class_uid, transfer_syntax,"
            " path, size, sha256, calling_aet, received_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(sop_uid) DO UPDATE SET study_uid=excluded.study_uid,"
            " series_uid=excluded.series_uid, sop_class_uid=excluded.sop_class_uid,"
            " transfer_syntax=excluded.transfer_syntax, path=excluded.path, size=excluded.size,"
            " sha256=excluded.sha256, calling_aet=excluded.calling_aet,"
            " received_at=excluded.received_at",
            (sop_uid, study_uid, series_uid, sop_class_uid, transfer_syntax, str(path), size, sha,
             calling_aet, now),
        )
        if replaced:
            self._event(now, study_uid, series_uid, "instance replaced", sop_uid=sop_uid,
                        reason="same SOP Instance UID received with different content; kept the newest")
        if kind_new:
            self._event(now, study_uid, series_uid, kind_new, sop_uid=sop_uid)

        study = db.execute("SELECT state FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        if study is None:
            db.execute(
                "INSERT INTO studies (study_uid, state, created_at, updated_at) VALUES (?,?,?,?)",
                (study_uid, "receiving", now, now),
            )
            self._event(now, study_uid, None, "state", to_state="receiving", reason="first instance")
        elif study["state"] != "receiving":
            db.execute(
                "UPDATE studies SET state='receiving', reason=NULL, updated_at=? WHERE study_uid=?",
                (now, study_uid),
            )
            self._event(now, study_uid, None, "reopened", from_state=study["state"],
                        to_state="receiving", reason="new instance after the study left receiving")
        else:
            db.execute("UPDATE studies SET updated_at=? WHERE study_uid=?", (now, study_uid))

        series = db.execute(
            "SELECT state, assembly_generation, modality FROM series WHERE series_uid = ?",
            (series_uid,),
        ).fetchone()
        count_sql = "(SELECT COUNT(*) FROM instances WHERE series_uid = ?)"
        if series is None:
            db.execute(
                "INSERT INTO series (series_uid, study_uid, modality, first_received_at,"
                f" last_received_at, opened_at, instance_count, state, updated_at)"
                f" VALUES (?,?,?,?,?,?,{count_sql},'receiving',?)",
                (series_uid, study_uid, modality or "", now, now, now, series_uid, now),
            )
        elif series["state"] != "receiving":
            generation = int(series["assembly_generation"]) + 1
            db.execute(
                "UPDATE series SET state='receiving', reason=NULL, assembly_generation=?,"
                f" last_received_at=?, opened_at=?, instance_count={count_sql}, updated_at=?,"
                " modality=CASE WHEN modality='' THEN ? ELSE modality END WHERE series_uid=?",
                (generation, now, now, series_uid, now, modality or "", series_uid),
            )
            self._event(now, study_uid, series_uid, "reopened", from_state=series["state"],
                        to_state="receiving", generation=generation, sop_uid=sop_uid,
                        reason="instance arrived after the series left receiving")
            reopened = True
        else:
            db.execute(
                f"UPDATE series SET last_received_at=?, instance_count={count_sql}, updated_at=?,"
                " modality=CASE WHEN modality='' THEN ? ELSE modality END WHERE series_uid=?",
                (now, series_uid, now, modality or "", series_uid),
            )
        return reopened

    def _event(
        self,
        at: float,
        study_uid: str | None,
        series_uid: str | None,
        kind: str,
        *,
        sop_uid: str | None = None,
        from_state: str | None = None,
        to_state: str | None = None,
        reason: str | None = None,
        generation: int | None = None,
    ) -> None:
        self._db.execute(
            "INSERT INTO events (at, study_uid, series_uid, sop_uid, kind, from_state, to_state, reason,"
            " generation) VALUES (?,?,?,?,?,?,?,?,?)",
            (at, study_uid, series_uid, sop_uid, kind, from_state, to_state, reason, generation),
        )

    # ---------------------------------------------------------------------------------- quarantine
    def quarantine(self, raw_writer: BinaryWriter, reason: str, calling_aet: str, hint: str) -> Path:
        """Keep bytes we refused, with a ``.reason.json`` beside them, for a human to look at."""
        tmp = self.new_tmp_path(".bin")
        try:
            with open(tmp, "wb") as f:
                raw_writer(f)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.quarantine_file(tmp, reason, calling_aet, hint)

    def quarantine_file(self, tmp_path: Path, reason: str, calling_aet: str, hint: str) -> Path:
        """Move a file (normally in tmp/) into quarantine/ with its reason file."""
        now = self.clock()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        dest = self.quarantine_dir / f"{stamp}-{_safe_hint(hint)}-{secrets.token_hex(4)}.dcm"
        _fsync_file(tmp_path)
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
        _fsync_dir(self.quarantine_dir)
        with self._lock:
            self._db.execute(
                "INSERT INTO quarantine (path, reason, calling_aet, hint, at) VALUES (?,?,?,?,?)",
                (str(dest), reason, calling_aet, hint, now),
            )
        return dest

    def quarantined(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT path, reason, calling_aet, hint, at FROM quarantine ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [dict(r) for r in rows]

    # ------------------------------------------------------------------------------------ recovery
    def sweep_tmp(self, older_than_s: float = 0.0) -> int:
        """Delete tmp/ files older than ``older_than_s`` (all of them at start-up)."""
        removed = 0
        limit = time.time() - older_than_s
        for p in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if older_than_s <= 0 or p.stat().st_mtime < limit:
                    p.unlink()
                    removed += 1
        return removed

    def recover(self) -> RecoveryReport:
        """Run once at start-up, before the listener opens.

        * tmp/ leftovers are deleted: they never got a success status.
        * spool files without a row (crash between rename and commit) are re-indexed from their
          headers; they were complete and fsync'd before the rename, so keeping them is safe and
          idempotent.
        * rows whose file vanished are dropped with an event (the assembler could not use them).
        Quiet series need nothing: the normal ``series_due`` query picks them up.
        """
        tmp_removed = self.sweep_tmp(0.0)
        with self._lock:
            known = {r[0] for r in self._db.execute("SELECT path FROM instances")}
        reindexed = quarantined = 0
        for path in sorted(self.spool.glob("*/*/*.dcm")):
            if str(path) in known:
                continue
            try:
                self._reindex(path)
                reindexed += 1
            except Exception as exc:  # an unreadable file must not stop the daemon from starting
                quarantined += 1
                log.warning("recover_unreadable_spool_file", path=str(path), reason=str(exc))
                self.quarantine_file(path, f"unreadable spool file at recovery: {exc}", "", path.stem)
        missing = 0
        with self._lock:
            rows = self._db.execute("SELECT sop_uid, study_uid, series_uid, path FROM instances").fetchall()
            gone = [r for r in rows if not os.path.exists(r["path"])]
            if gone:
                self._db.execute("BEGIN IMMEDIATE")
                for r in gone:
                    self._db.execute("DELETE FROM instances WHERE sop_uid = ?", (r["sop_uid"],))
                    self._db.execute(
                        "UPDATE series SET instance_count = (SELECT COUNT(*) FROM instances"
                        " WHERE series_uid = ?) WHERE series_uid = ?",
                        (r["series_uid"], r["series_uid"]),
                    )
                    self._event(self.clock(), r["study_uid"], r["series_uid"], "instance missing",
                                sop_uid=r["sop_uid"], reason=f"file {r['path']} not found at recovery")
                self._db.execute("COMMIT")
                missing = len(gone)
        report = RecoveryReport(tmp_removed, reindexed, quarantined, missing)
        log.info("recovered", tmp_removed=tmp_removed, reindexed=reindexed, quarantined=quarantined,
                 missing_files=missing)
        return report

    def _reindex(self, path: Path) -> None:
        from pydicom import dcmread  # local: only recovery needs to parse headers here

        ds = dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                           "Modality"],
        )
        sop_uid = str(ds.SOPInstanceUID)
        study_uid = str(ds.StudyInstanceUID)
        series_uid = str(ds.SeriesInstanceUID)
        if self.instance_path(study_uid, series_uid, sop_uid) != path:
            raise StoreError(f"header UIDs do not match the spool location {path}")
        ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
        source = str(ds.file_meta.get("SourceApplicationEntityTitle", "")) if hasattr(ds, "file_meta") else ""
        sha, size = dataset_sha256(path)
        self._commit_index(
            _IndexJob(
                (sop_uid, study_uid, series_uid, str(ds.SOPClassUID), ts, path, size, sha, source.strip(),
                 str(ds.get("Modality", "") or ""), self.clock()),
                {"replaced": False, "kind_new": "recovered"},
            )
        )

    # ----------------------------------------------------------------------------- queries & states
    def series_due(self, now: float, quiet_s: float, force_s: float) -> list[SeriesRow]:
        """Series still ``receiving`` that have been quiet for ``quiet_s`` or open for ``force_s``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM series WHERE state = 'receiving' AND (last_received_at <= ?"
                " OR opened_at <= ?) ORDER BY last_received_at",
                (now - quiet_s, now - force_s),
            ).fetchall()
        return [self._series_row(r) for r in rows]

    def series(self, series_uid: str) -> SeriesRow | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return self._series_row(r) if r else None

    def series_instances(self, series_uid: str) -> list[InstanceRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM instances WHERE series_uid = ? ORDER BY sop_uid", (series_uid,)
            ).fetchall()
        return [self._instance_row(r) for r in rows]

    def instance(self, sop_uid: str) -> InstanceRow | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return self._instance_row(r) if r else None

    def study_series(self, study_uid: str) -> list[SeriesRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM series WHERE study_uid = ? ORDER BY first_received_at, series_uid",
                (study_uid,),
            ).fetchall()
        return [self._series_row(r) for r in rows]

    def study(self, study_uid: str) -> StudyRow | None:
        with self._lock:
            r = self._db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid)"
                " AS instances FROM studies s WHERE s.study_uid = ?",
                (study_uid,),
            ).fetchone()
        return self._study_row(r) if r else None

    def studies(self, limit: int = 100) -> list[StudyRow]:
        """Most recently updated first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid)"
                " AS instances FROM studies s ORDER BY s.updated_at DESC, s.study_uid LIMIT ?",
                (limit,),
            ).fetchall()
        return [self._study_row(r) for r in rows]

    def events(self, study_uid: str | None = None, limit: int = 1000) -> list[EventRow]:
        """History, oldest first (of one study, or of everything)."""
        with self._lock:
            if study_uid is None:
                rows = self._db.execute("SELECT * FROM events ORDER BY id LIMIT ?", (limit,)).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM events WHERE study_uid = ? ORDER BY id LIMIT ?", (study_uid, limit)
                ).fetchall()
        return [
            EventRow(r["at"], r["study_uid"], r["series_uid"], r["sop_uid"], r["kind"], r["from_state"],
                     r["to_state"], r["reason"], r["generation"])
            for r in rows
        ]

    def instance_total(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    def queue_counts(self) -> dict[str, int]:
        """Studies per state, every known state present (zeros included) for metrics and status."""
        counts = dict.fromkeys(STUDY_STATES, 0)
        with self._lock:
            for r in self._db.execute("SELECT state, COUNT(*) AS n FROM studies GROUP BY state"):
                counts[r["state"]] = int(r["n"])
        return counts

    def queue_oldest_age(self) -> dict[str, float]:
        """Seconds the longest-waiting study has been in each state (for the stalled-queue alert)."""
        now = self.clock()
        with self._lock:
            rows = self._db.execute(
                "SELECT state, MIN(updated_at) AS t FROM studies GROUP BY state"
            ).fetchall()
        return {r["state"]: max(0.0, now - float(r["t"])) for r in rows}

    def set_series_state(
        self,
        series_uid: str,
        state: str,
        reason: str | None = None,
        expected_generation: int | None = None,
        expected_state: str | None = None,
    ) -> bool:
        """Compare-and-set a series' state; False (and no change) when the expectation fails.

        A worker claims a series with ``expected_state`` and finishes with ``expected_generation``:
        if an instance re-opened the series meanwhile, its result is stale and the refusal is
        recorded as an ``assembly superseded`` event.
        """
        if state not in SERIES_STATES:
            raise StoreError(f"unknown series state {state!r} (expected one of {', '.join(SERIES_STATES)})")
        with self._lock:
            now = self.clock()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT study_uid, state, assembly_generation FROM series WHERE series_uid = ?",
                    (series_uid,),
                ).fetchone()
                if row is None:
                    self._db.execute("ROLLBACK")
                    raise StoreError(f"no series {series_uid!r}")
                gen = int(row["assembly_generation"])
                if expected_generation is not None and gen != expected_generation:
                    self._event(now, row["study_uid"], series_uid, "assembly superseded",
                                from_state=row["state"], to_state=state, generation=gen,
                                reason=f"result for generation {expected_generation} dropped: series is at "
                                f"generation {gen}")
                    self._db.execute("COMMIT")
                    return False
                if expected_state is not None and row["state"] != expected_state:
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute(
                    "UPDATE series SET state=?, reason=?, updated_at=? WHERE series_uid=?",
                    (state, reason, now, series_uid),
                )
                self._event(now, row["study_uid"], series_uid, "state", from_state=row["state"],
                            to_state=state, reason=reason, generation=gen)
                self._db.execute("COMMIT")
            except StoreError:
                raise
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return True

    def set_study_state(
        self,
        study_uid: str,
        state: str,
        reason: str | None = None,
        expected_state: str | None = None,
    ) -> bool:
        """Move a study to ``state`` (``failed`` also counts an attempt); False if the CAS fails."""
        if state not in STUDY_STATES:
            raise StoreError(f"unknown study state {state!r} (expected one of {', '.join(STUDY_STATES)})")
        with self.transaction() as db:
            row = db.execute("SELECT state FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
            if row is None:
                raise StoreError(f"no study {study_uid!r}")
            if expected_state is not None and row["state"] != expected_state:
                return False
            self._move_study(db, self.clock(), study_uid, state, reason)
        return True

    # ------------------------------------------------------------------ assemble / score / report / send
    # The later stages' outputs. Each method is one transaction that writes the output row and moves
    # the study's state together, so a crash leaves either both or neither.

    def volume_path(self, study_uid: str, series_uid: str, generation: int) -> Path:
        """Where the assembled volume of a series generation lives (also the retrain archive)."""
        return (
            self.volumes / _check_uid("StudyInstanceUID", study_uid)
            / f"{_check_uid('SeriesInstanceUID', series_uid)}-g{int(generation)}.npz"
        )

    def results_dir(self, study_uid: str) -> Path:
        d = self.root / "results" / _check_uid("StudyInstanceUID", study_uid)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def write_result_file(self, path: Path, writer: BinaryWriter) -> Path:
        """Write a payload (SR, HL7) atomically: tmp/, fsync, rename, fsync the folder."""
        tmp = self.new_tmp_path(path.suffix)
        try:
            with open(tmp, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def _move_study(self, db: sqlite3.Connection, now: float, study_uid: str, state: str,
                    reason: str | None = None) -> None:
        row = db.execute("SELECT state FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        if row is None:
            raise StoreError(f"no study {study_uid!r}")
        db.execute(
            "UPDATE studies SET state=?, reason=?, updated_at=?, attempts = attempts + ? WHERE study_uid=?",
            (state, reason, now, 1 if state == "failed" else 0, study_uid),
        )
        self._event(now, study_uid, None, "state", from_state=row["state"], to_state=state, reason=reason)

    def record_assembly(self, study_uid: str, series_uid: str, generation: int, volume_path: Path,
                        complete_at: float, warnings: list[str] | None = None) -> None:
        """The chosen series' volume is on disk: remember it and move the study to ``assembled``."""
        with self.transaction() as db:
            now = self.clock()
            db.execute(
                "INSERT OR REPLACE INTO assemblies (study_uid, series_uid, generation, volume_path,"
                " complete_at, warnings, created_at) VALUES (?,?,?,?,?,?,?)",
                (study_uid, series_uid, int(generation), str(volume_path), complete_at,
                 json.dumps(warnings or []), now),
            )
            self._move_study(db, now, study_uid, "assembled",
                             reason="; ".join(warnings) if warnings else None)

    def assembly(self, study_uid: str) -> AssemblyRow | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM assemblies WHERE study_uid = ?", (study_uid,)).fetchone()
        if r is None:
            return None
        return AssemblyRow(r["study_uid"], r["series_uid"], int(r["generation"]), Path(r["volume_path"]),
                           float(r["complete_at"]), json.loads(r["warnings"]))

    def studies_in_state(self, state: str, limit: int = 100) -> list[StudyRow]:
        """Oldest first, so the study waiting longest is served first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid)"
                " AS instances FROM studies s WHERE s.state = ? ORDER BY s.updated_at, s.study_uid LIMIT ?",
                (state, limit),
            ).fetchall()
        return [self._study_row(r) for r in rows]

    def record_score(self, study_uid: str, generation: int, result: dict[str, Any]) -> bool:
        """Store a score and move ``assembled -> scored``; False if the study moved on meanwhile."""
        with self.transaction() as db:
            now = self.clock()
            row = db.execute("SELECT state FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
            if row is None or row["state"] != "assembled":
                return False
            db.execute(
                "INSERT OR REPLACE INTO scores (study_uid, generation, result, scored_at) VALUES (?,?,?,?)",
                (study_uid, int(generation), json.dumps(result), now),
            )
            self._move_study(db, now, study_uid, "scored")
        return True

    def score(self, study_uid: str) -> dict[str, Any] | None:
        """The latest score of a study (the ScoreResult fields, plus ``generation`` and ``scored_at``)."""
        with self._lock:
            r = self._db.execute("SELECT * FROM scores WHERE study_uid = ?", (study_uid,)).fetchone()
        if r is None:
            return None
        return {**json.loads(r["result"]), "generation": int(r["generation"]), "scored_at": r["scored_at"]}

    def enqueue_results(self, study_uid: str, generation: int,
                        items: list[tuple[str, str, list[Path], str]]) -> int:
        """Outbox rows for one report, then ``scored -> reported`` (``sent`` when nothing is to go).

        Each row is unique per (study, generation, kind, destination): re-running the report stage
        after a crash adds nothing twice.
        """
        with self.transaction() as db:
            now = self.clock()
            row = db.execute("SELECT state FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
            if row is None or row["state"] != "scored":
                return 0
            added = 0
            for kind, destination, files, target in items:
                cur = db.execute(
                    "INSERT OR IGNORE INTO outbox (study_uid, generation, kind, destination, target, files,"
                    " dedupe, next_attempt_at, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                    (study_uid, int(generation), kind, destination, target,
                     json.dumps([str(f) for f in files]),
                     f"{study_uid}/{int(generation)}/{kind}/{destination}", now, now),
                )
                added += cur.rowcount
            self._move_study(db, now, study_uid, "reported" if items else "sent")
        return added

    def outbox_due(self, now: float, limit: int = 32) -> list[OutboxRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM outbox WHERE state = 'pending' AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at, id LIMIT ?",
                (now, limit),
            ).fetchall()
        return [self._outbox_row(r) for r in rows]

    def outbox(self, study_uid: str | None = None) -> list[OutboxRow]:
        with self._lock:
            if study_uid is None:
                rows = self._db.execute("SELECT * FROM outbox ORDER BY id").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM outbox WHERE study_uid = ? ORDER BY id", (study_uid,)
                ).fetchall()
        return [self._outbox_row(r) for r in rows]

    def outbox_counts(self) -> dict[str, int]:
        counts = {"pending": 0, "sent": 0, "dead": 0}
        with self._lock:
            for r in self._db.execute("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state"):
                counts[r["state"]] = int(r["n"])
        return counts

    def outbox_sent(self, outbox_id: int, ack: str) -> float | None:
        """Mark one row acknowledged. When it was the study's last pending row, the study is
        ``sent`` and the time its series became complete is returned (for the latency metric)."""
        with self.transaction() as db:
            now = self.clock()
            r = db.execute("SELECT * FROM outbox WHERE id = ?", (outbox_id,)).fetchone()
            if r is None or r["state"] != "pending":
                return None
            db.execute(
                "UPDATE outbox SET state='sent', sent_at=?, ack=?, attempts=attempts+1 WHERE id=?",
                (now, ack, outbox_id),
            )
            study_uid = r["study_uid"]
            left = db.execute(
                "SELECT COUNT(*) FROM outbox WHERE study_uid = ? AND state != 'sent'", (study_uid,)
            ).fetchone()[0]
            st = db.execute("SELECT state FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
            if left == 0 and st is not None and st["state"] == "reported":
                self._move_study(db, now, study_uid, "sent")
                a = db.execute("SELECT complete_at FROM assemblies WHERE study_uid = ?",
                               (study_uid,)).fetchone()
                return float(a["complete_at"]) if a else now
        return None

    def outbox_retry(self, outbox_id: int, error: str, next_attempt_at: float) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE outbox SET attempts=attempts+1, last_error=?, next_attempt_at=? WHERE id=?"
                " AND state='pending'",
                (error, next_attempt_at, outbox_id),
            )

    def outbox_dead(self, outbox_id: int, error: str) -> None:
        """Give up on one row: kept as a dead letter, the study ``failed`` with the reason."""
        with self.transaction() as db:
            now = self.clock()
            r = db.execute("SELECT * FROM outbox WHERE id = ?", (outbox_id,)).fetchone()
            if r is None or r["state"] != "pending":
                return
            db.execute(
                "UPDATE outbox SET state='dead', attempts=attempts+1, last_error=? WHERE id=?",
                (error, outbox_id),
            )
            self._move_study(db, now, r["study_uid"], "failed",
                             reason=f"delivery to {r['destination']} dead-lettered after "
                             f"{int(r['attempts']) + 1} attempts: {error}")

    def outbox_requeue(self, outbox_id: int) -> bool:
        """Operator action: give a dead letter a fresh set of attempts."""
        with self.transaction() as db:
            now = self.clock()
            r = db.execute("SELECT * FROM outbox WHERE id = ?", (outbox_id,)).fetchone()
            if r is None or r["state"] != "dead":
                return False
            db.execute("UPDATE outbox SET state='pending', attempts=0, next_attempt_at=? WHERE id=?",
                       (now, outbox_id))
            self._move_study(db, now, r["study_uid"], "reported", reason="dead letter re-queued")
        return True

    @staticmethod
    def _outbox_row(r: sqlite3.Row) -> OutboxRow:
        return OutboxRow(
            int(r["id"]), r["study_uid"], int(r["generation"]), r["kind"], r["destination"], r["target"],
            [Path(p) for p in json.loads(r["files"])], r["state"], int(r["attempts"]),
            float(r["next_attempt_at"]), r["last_error"], r["ack"],
        )

    # ------------------------------------------------------------------------------------- rows
    @staticmethod
    def _series_row(r: sqlite3.Row) -> SeriesRow:
        return SeriesRow(
            r["series_uid"], r["study_uid"], r["modality"], r["first_received_at"], r["last_received_at"],
            r["opened_at"], int(r["instance_count"]), r["state"], r["reason"], int(r["assembly_generation"]),
        )

    @staticmethod
    def _instance_row(r: sqlite3.Row) -> InstanceRow:
        return InstanceRow(
            r["sop_uid"], r["study_uid"], r["series_uid"], r["sop_class_uid"], r["transfer_syntax"],
            Path(r["path"]), int(r["size"]), r["sha256"], r["calling_aet"], r["received_at"],
        )

    @staticmethod
    def _study_row(r: sqlite3.Row) -> StudyRow:
        return StudyRow(
            r["study_uid"], r["state"], r["reason"], int(r["attempts"]), r["created_at"], r["updated_at"],
            int(r["instances"]),
        )
