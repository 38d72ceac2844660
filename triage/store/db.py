"""The Store: the spool and the one SQLite database, the only thing that writes pipeline state.

Why this shape: a PACS that got a C-STORE success status deletes or forgets its copy, so an instance
must be on disk (its bytes fsync'd, its name in the spool made durable by a directory fsync) and
indexed (its row committed and the log fsync'd) before the status goes back. Every later stage
(assemble, score, report, send) reads its input from here and records its progress here, so a crash
anywhere resumes where it was and nothing is processed twice:

* files: ``spool/<study_uid>/<series_uid>/<sop_uid>.dcm``, written through ``tmp/`` (same filesystem,
  so ``os.replace`` is atomic), bad instances in ``quarantine/`` with a ``.reason.json`` beside each;
* rows: ``state.db`` in WAL mode with ``synchronous=FULL`` (a commit is on disk before it returns);
  the ingest's group commits run with ``synchronous=NORMAL`` and are followed by our own fsync of
  the ``-wal`` file, shared by every commit before it (:meth:`Store._commit_index`).

One connection guarded by a lock serves every thread (pynetdicom runs a thread per association):
SQLite serialises writers anyway, and a single connection cannot deadlock against itself. Writing
and fsyncing the file happen outside that lock, and the fsyncs that parallel associations would
otherwise queue for are shared: one directory fsync covers every rename made in that folder before
it started, and one commit (group commit) carries the rows of every put waiting for the lock, its log
fsync shared across threads and processes (several receiver workers write one database). The file's
fsync, the folder's and the log's run at the same time, after the rename (on ext4 they share one
journal commit), so an instance costs one wait on the disk instead of two or three (issue 15: 14.8 ->
5.7 ms per instance on one association, ``bench/ingest_stages.py``); start-up recovery is what makes
that order safe for the instances a crash caught half-way (see :meth:`Store.adopt_instance`). Each put
still returns only after its own bytes, name and row are durable.

``sha256`` of an instance is the hash of its *dataset* bytes (everything after the File Meta group):
those are the bytes the sender put on the wire, so a test or an audit can compare them with the
sender's copy whatever File Meta either side wrote.

Where the parts live: the schema and row types in :mod:`triage.store.schema`, the durable file steps
in :mod:`triage.store.spool`, Part-10 offsets and hashes in :mod:`triage.store.part10`, start-up
recovery in :mod:`triage.store.recovery`, the later stages' outputs in :mod:`triage.store.stages`
and the outbox SQL in :mod:`triage.store.outbox`; this module keeps the state machine (ingest with
its group commit, state moves) and the queries.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from triage.store.outbox import OutboxMixin
from triage.store.part10 import dataset_sha256
from triage.store.recovery import RecoveryMixin
from triage.store.schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SERIES_STATES,
    STUDY_STATES,
    BinaryWriter,
    EventRow,
    IndexJob,
    InstanceRow,
    PutResult,
    SeriesRow,
    StoreError,
    StudyRow,
    event_row,
    instance_row,
    series_row,
    study_row,
)
from triage.store.soplock import SopLocks
from triage.store.spool import GroupSync, Spool, fsync_file
from triage.store.stages import StageOutputsMixin

__all__ = ["Store"]


class Store(StageOutputsMixin, OutboxMixin, RecoveryMixin):
    """Spool folder plus ``state.db``. Thread-safe; ``clock`` is injectable so tests never sleep.

    Every "now" the store records or compares with (row times, events, quarantine names, the age of
    tmp/ files) comes from ``clock``.
    """

    def __init__(self, root: Path | str, clock: Callable[[], float] = time.time) -> None:
        self.files = Spool(root)
        self.root = self.files.root
        self.spool = self.files.spool
        self.tmp = self.files.tmp
        self.quarantine_dir = self.files.quarantine_dir
        self.volumes = self.files.volumes
        self.clock = clock
        self._lock = threading.RLock()  # the connection (and so every transaction)
        self._pending_lock = threading.Lock()
        self._pending: list[IndexJob] = []
        self._sop_locks = SopLocks(self.root)  # one writer per SOP UID, across worker processes too
        self._db = sqlite3.connect(
            self.root / "state.db", isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        self._wal = GroupSync(self.root / "state.db-wal", fsync=self._fsync_wal)
        self._dir_pool: ThreadPoolExecutor | None = None  # file and folder fsyncs beside the commit (lazy)
        self._dir_pool_lock = threading.Lock()

    def _fsync_wal(self, wal: Path) -> None:
        """fsync the write-ahead log (by name: always the current file). Gone means every frame was
        checkpointed into ``state.db`` (SQLite fsyncs it then) and no connection is open; syncing
        the database file then costs little and keeps the rule simple."""
        try:
            fsync_file(wal)
        except FileNotFoundError:
            fsync_file(self.root / "state.db")

    def _dir_syncer(self) -> ThreadPoolExecutor:
        with self._dir_pool_lock:
            if self._dir_pool is None:
                self._dir_pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="store-fsync")
            return self._dir_pool

    # ----------------------------------------------------------------------------------------- plumbing
    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._sop_locks.close()
        if self._dir_pool is not None:
            self._dir_pool.shutdown(wait=True)

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
                script = MIGRATIONS[target - 1]
                self._db.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {target};\nCOMMIT;"
                )

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    # ------------------------------------------------------------------------------------ files
    def new_tmp_path(self, suffix: str = ".dcm") -> Path:
        """A fresh name under ``tmp/`` (same filesystem as the spool, so renames are atomic)."""
        return self.files.new_tmp_path(suffix)

    def free_bytes(self) -> int:
        """Bytes available to this (unprivileged) process on the spool's filesystem."""
        return self.files.free_bytes()

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.files.instance_path(study_uid, series_uid, sop_uid)

    def sweep_tmp(self, older_than_s: float = 0.0) -> int:
        """Delete tmp/ files older than ``older_than_s`` by the store's clock (all of them at start-up)."""
        return self.files.sweep_tmp(older_than_s, self.clock())

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
        tmp = self.files.write_tmp(writer)
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

        Returns only once the file's bytes, its name in the spool and its rows are all durable, and
        pays one wait on the disk for the three: the file is renamed into the spool first, then its
        fsync, the folder's fsync (shared by every rename in that folder before it started) and the
        transaction for instance, series, study and events (a group commit, its log fsync shared by
        every commit before it) run at the same time. On ext4 they land in one journal commit;
        measured on the bench disk, three waits in a row cost three flushes where these cost about one
        (bench/ingest_stages.py). A crash before all three are done may leave a spool file whose bytes
        are not all on disk, with or without its row; no success was answered for it, and start-up
        recovery finds it: a row whose file is shorter (or, for the last seconds of ingest, hashes
        differently) is dropped with its file, a file without a row is walked to its end before it is
        re-indexed (:meth:`triage.store.recovery.RecoveryMixin.recover`).

        A replacement (same SOP Instance UID, different bytes, same path) keeps the older order: file
        fsync'd, then renamed, so that the answered copy it overwrites is never traded for bytes that
        are not on disk yet. A duplicate with the same dataset bytes is a no-op; with different bytes
        the newer copy wins and an ``instance replaced`` event records it. An instance for a series
        that already left ``receiving`` re-opens it (generation + 1, ``reopened`` event).
        """
        final = self.instance_path(study_uid, series_uid, sop_uid)
        sha, size = dataset_sha256(tmp_path)
        # Same SOP Instance UID: one at a time, in every worker process (duplicate decision,
        # replacement). Different ones run their renames and fsyncs in parallel, which lets the
        # filesystem batch them.
        with self._sop_locks.hold(sop_uid):
            with self._lock:
                old = self._db.execute(
                    "SELECT path, sha256 FROM instances WHERE sop_uid = ?", (sop_uid,)
                ).fetchone()
            if old is not None and old["sha256"] == sha and Path(old["path"]).exists():
                tmp_path.unlink(missing_ok=True)
                return PutResult(duplicate=True, path=Path(old["path"]), size=size)
            if old is not None and not synced:
                fsync_file(tmp_path)  # a replacement: bytes on disk before the name (see above)
                synced = True
            group = self.files.rename_into(tmp_path, final)
            old_path = Path(old["path"]) if old is not None else None
            committed = False
            waits: list[Future[None]] = []
            try:
                if old_path is not None and old_path != final:
                    self.files.remove(old_path)  # the same SOP instance re-sent under other UIDs
                job = IndexJob(
                    (sop_uid, study_uid, series_uid, sop_class_uid, transfer_syntax, final, size, sha,
                     calling_aet, modality, self.clock()),
                    {"replaced": old is not None},
                )
                try:
                    # Rows first (written to the log, not yet flushed), then the three fsyncs at once:
                    # every change they cover is then in the filesystem's running journal transaction
                    # before any of them commits it, so they tend to share one journal commit.
                    self._write_rows(job)
                    committed = True
                    pool = self._dir_syncer()
                    waits.append(pool.submit(group.sync))
                    if not synced:
                        waits.append(pool.submit(fsync_file, final))
                    self._wal.sync()
                    reopened = job.reopened
                finally:
                    for w in waits:  # every wait ends before we decide (one may have failed)
                        with contextlib.suppress(BaseException):
                            w.result()
                for w in waits:
                    w.result()  # the rename and the bytes are durable too (or this raises)
            except BaseException:
                # No acknowledgement (e.g. the disk filled at commit, or an fsync failed): the sender
                # will retry, so neither the spool nor the index may keep an instance it was not told of.
                if old is None:
                    if committed:
                        with contextlib.suppress(Exception):
                            self._withdraw(sop_uid, study_uid, series_uid)
                    with contextlib.suppress(OSError):
                        self.files.remove(final)
                raise
        return PutResult(duplicate=False, path=final, replaced=old is not None, reopened=reopened, size=size)

    def _withdraw(self, sop_uid: str, study_uid: str, series_uid: str) -> None:
        """Remove the row of an instance whose file could not be made durable (never answered)."""
        with self.transaction() as db:
            db.execute("DELETE FROM instances WHERE sop_uid = ?", (sop_uid,))
            db.execute("UPDATE series SET instance_count = (SELECT COUNT(*) FROM instances"
                       " WHERE series_uid = ?) WHERE series_uid = ?", (series_uid, series_uid))
            self._event(self.clock(), study_uid, series_uid, "instance withdrawn", sop_uid=sop_uid,
                        reason="its file could not be made durable; not acknowledged")

    def _commit_index(self, job: IndexJob) -> bool:
        """Group commit: whoever holds the database lock commits every job waiting for it.

        Each caller still returns only after the transaction holding its rows is committed and the
        log holding it fsync'd. The commit itself runs with ``synchronous=NORMAL`` (written to the
        log, not yet synced) so that the database lock is not held across a disk flush; the fsync of
        the ``-wal`` file afterwards is a :class:`GroupSync`: one flush covers every commit made
        before it started, this process's and other workers' alike.
        """
        self._write_rows(job)
        self._wal.sync()
        return job.reopened

    def _write_rows(self, job: IndexJob) -> None:
        """The first half of :meth:`_commit_index`: ``job``'s rows committed (in a batch with every job
        waiting for the lock), written to the log but not yet flushed; ``self._wal.sync()`` is the
        second half."""
        with self._pending_lock:
            self._pending.append(job)
        with self._lock:
            if not job.done:
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                self._run_batch(batch)
        if job.error is not None:
            raise job.error

    def _run_batch(self, batch: list[IndexJob]) -> None:
        db = self._db
        try:
            db.execute("PRAGMA synchronous=NORMAL")  # the caller fsyncs the log (see _commit_index)
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    results = [self._index(*j.args, **j.kwargs) for j in batch]
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            finally:
                db.execute("PRAGMA synchronous=FULL")
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error, batch[0].done = exc, True
                return
            for j in batch:  # isolate the job that failed; the others still commit
                self._run_batch([j])
            return
        for j, reopened in zip(batch, results, strict=True):
            j.reopened, j.done = reopened, True

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
        tmp = self.files.write_tmp(raw_writer, ".bin", sync=False)  # quarantine_file fsyncs it
        return self.quarantine_file(tmp, reason, calling_aet, hint)

    def quarantine_file(self, tmp_path: Path, reason: str, calling_aet: str, hint: str) -> Path:
        """Move a file (normally in tmp/) into quarantine/ with its reason file, and list it."""
        now = self.clock()
        dest = self.files.quarantine_file(tmp_path, reason, calling_aet, hint, now)
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

    # ----------------------------------------------------------------------------- queries & states
    def series_due(self, now: float, quiet_s: float, force_s: float) -> list[SeriesRow]:
        """Series still ``receiving`` that have been quiet for ``quiet_s`` or open for ``force_s``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM series WHERE state = 'receiving' AND (last_received_at <= ?"
                " OR opened_at <= ?) ORDER BY last_received_at",
                (now - quiet_s, now - force_s),
            ).fetchall()
        return [series_row(r) for r in rows]

    def next_series_due(self, quiet_s: float, force_s: float, after: float) -> float | None:
        """When the next series still ``receiving`` becomes due for :meth:`series_due` (store clock),
        later than ``after``, or None: the assembler sleeps until then instead of polling. Series
        already due are left out: one that waits for a sibling series still arriving becomes workable
        only when that sibling is due, and a wait computed from it would be zero (a busy loop)."""
        with self._lock:
            r = self._db.execute(
                "SELECT MIN(d) FROM (SELECT MIN(last_received_at + ?, opened_at + ?) AS d FROM series"
                " WHERE state = 'receiving') WHERE d > ?",
                (quiet_s, force_s, after),
            ).fetchone()
        return None if r is None or r[0] is None else float(r[0])

    def series(self, series_uid: str) -> SeriesRow | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return series_row(r) if r else None

    def series_instances(self, series_uid: str) -> list[InstanceRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM instances WHERE series_uid = ? ORDER BY sop_uid", (series_uid,)
            ).fetchall()
        return [instance_row(r) for r in rows]

    def instance(self, sop_uid: str) -> InstanceRow | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM instances WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return instance_row(r) if r else None

    def study_series(self, study_uid: str) -> list[SeriesRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM series WHERE study_uid = ? ORDER BY first_received_at, series_uid",
                (study_uid,),
            ).fetchall()
        return [series_row(r) for r in rows]

    def study(self, study_uid: str) -> StudyRow | None:
        with self._lock:
            r = self._db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid)"
                " AS instances FROM studies s WHERE s.study_uid = ?",
                (study_uid,),
            ).fetchone()
        return study_row(r) if r else None

    def studies(self, limit: int = 100) -> list[StudyRow]:
        """Most recently updated first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid)"
                " AS instances FROM studies s ORDER BY s.updated_at DESC, s.study_uid LIMIT ?",
                (limit,),
            ).fetchall()
        return [study_row(r) for r in rows]

    def events(self, study_uid: str | None = None, limit: int = 1000) -> list[EventRow]:
        """History, oldest first (of one study, or of everything)."""
        with self._lock:
            if study_uid is None:
                rows = self._db.execute("SELECT * FROM events ORDER BY id LIMIT ?", (limit,)).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM events WHERE study_uid = ? ORDER BY id LIMIT ?", (study_uid, limit)
                ).fetchall()
        return [event_row(r) for r in rows]

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

    # ----------------------------------------------------------------------------- stage moves
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

    def studies_in_state(self, state: str, limit: int = 100) -> list[StudyRow]:
        """Oldest first, so the study waiting longest is served first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid)"
                " AS instances FROM studies s WHERE s.state = ? ORDER BY s.updated_at, s.study_uid LIMIT ?",
                (state, limit),
            ).fetchall()
        return [study_row(r) for r in rows]
