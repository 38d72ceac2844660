"""Start-up recovery: make the spool folder and ``state.db`` agree again after a crash.

Why a mixin of :class:`~triage.store.db.Store`: recovery re-indexes orphan files through the same
group commit as ingest (so a recovered instance gets exactly the rows a received one would) and
stamps its events with the Store's clock, so it needs the Store's connection, lock and clock.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from triage.ops.logs import get_logger
from triage.store.part10 import dataset_sha256
from triage.store.schema import IndexJob, RecoveryReport, StoreError
from triage.store.structure import Malformed, check_file

log = get_logger("store")

# Rows received this many seconds (store clock) before the newest row get their file hashed at start-up,
# not only its size compared: the instances that may have been in flight when the power went.
VERIFY_RECENT_S = 10.0


def _file_problem(row: sqlite3.Row, verify_after: float) -> str:
    """Why an indexed instance's file cannot be kept ("" when it can)."""
    path = row["path"]
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "not found"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if size != int(row["size"]):
        return f"is {size} bytes, not the {int(row['size'])} indexed"
    if float(row["received_at"]) >= verify_after:
        try:
            sha, _ = dataset_sha256(Path(path))
        except OSError as exc:
            return f"unreadable ({exc.strerror})"
        if sha != row["sha256"]:
            return "does not hash to its indexed sha256"
    return ""


class RecoveryMixin:
    """``recover()`` of the Store; relies on the attributes and methods declared below."""

    _db: sqlite3.Connection
    _lock: threading.RLock
    spool: Path
    clock: Callable[[], float]

    if TYPE_CHECKING:  # provided by Store

        def sweep_tmp(self, older_than_s: float = 0.0) -> int: ...

        def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path: ...

        def quarantine_file(self, tmp_path: Path, reason: str, calling_aet: str, hint: str) -> Path: ...

        def _commit_index(self, job: IndexJob) -> bool: ...

        def _event(self, at: float, study_uid: str | None, series_uid: str | None, kind: str, *,
                   sop_uid: str | None = None, from_state: str | None = None, to_state: str | None = None,
                   reason: str | None = None, generation: int | None = None) -> None: ...

    def recover(self) -> RecoveryReport:
        """Run once at start-up, before the listener opens.

        * tmp/ leftovers are deleted: they never got a success status.
        * spool files without a row (crash before the commit) are re-indexed from their headers, once
          their dataset is walked to its end: the store renames a file into the spool while its fsync
          runs (:meth:`~triage.store.db.Store.adopt_instance`), so after a power cut a file that was
          never answered may be cut short; such a file is quarantined, not indexed.
        * rows whose file vanished are dropped with an event (the assembler could not use them), and
          so are rows whose file is not the size the row recorded, or, for rows received in the last
          :data:`VERIFY_RECENT_S` seconds before the newest, does not hash to the row's sha256 (bytes
          not yet on disk when the power went, on a filesystem that shows the size first): never
          answered, so the sender sends them again. The file goes with the row.
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
            rows = self._db.execute(
                "SELECT sop_uid, study_uid, series_uid, path, size, sha256, received_at FROM instances"
            ).fetchall()
            newest = max((float(r["received_at"]) for r in rows), default=0.0)
            gone = [(r, why) for r in rows if (why := _file_problem(r, newest - VERIFY_RECENT_S))]
            if gone:
                self._db.execute("BEGIN IMMEDIATE")
                for r, why in gone:
                    self._db.execute("DELETE FROM instances WHERE sop_uid = ?", (r["sop_uid"],))
                    self._db.execute(
                        "UPDATE series SET instance_count = (SELECT COUNT(*) FROM instances"
                        " WHERE series_uid = ?) WHERE series_uid = ?",
                        (r["series_uid"], r["series_uid"]),
                    )
                    self._event(self.clock(), r["study_uid"], r["series_uid"], "instance missing",
                                sop_uid=r["sop_uid"], reason=f"file {r['path']} {why} at recovery")
                self._db.execute("COMMIT")
                for r, why in gone:
                    if why != "not found":
                        with contextlib.suppress(OSError):
                            os.unlink(r["path"])
                missing = len(gone)
        reclaimed = self._release_claims()
        report = RecoveryReport(tmp_removed, reindexed, quarantined, missing, reclaimed)
        log.info("recovered", tmp_removed=tmp_removed, reindexed=reindexed, quarantined=quarantined,
                 missing_files=missing, released_claims=reclaimed)
        return report

    def _release_claims(self) -> int:
        """Series the assembler had claimed (``stable``) when the process died go back to ``receiving``.

        Found by the reliability bench (issue 14): a ``kill -9`` between the claim and the assembly's
        end left the study ``stable`` for ever, so its result was never produced. At start-up no worker
        runs yet, so every claim is a dead process's; assembling again is safe (volumes are per
        generation, and a finished series is ``assembled``, not ``stable``).
        """
        now = self.clock()
        with self._lock:
            rows = self._db.execute(
                "SELECT series_uid, study_uid FROM series WHERE state = 'stable'"
            ).fetchall()
            studies = {r[0] for r in self._db.execute("SELECT study_uid FROM studies WHERE state = 'stable'")}
            if not rows and not studies:
                return 0
            self._db.execute("BEGIN IMMEDIATE")
            for r in rows:
                self._db.execute("UPDATE series SET state = 'receiving', updated_at = ? WHERE series_uid = ?",
                                 (now, r["series_uid"]))
                self._event(now, r["study_uid"], r["series_uid"], "state", from_state="stable",
                            to_state="receiving", reason="claim of a process that died released at recovery")
            for study in studies:
                self._db.execute("UPDATE studies SET state = 'receiving', updated_at = ? WHERE study_uid = ?",
                                 (now, study))
                self._event(now, study, None, "state", from_state="stable", to_state="receiving",
                            reason="claim of a process that died released at recovery")
            self._db.execute("COMMIT")
        return len(rows)

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
        try:
            check_file(path, ts)  # cut short by a power cut before its fsync ended: never answered
        except Malformed as exc:
            raise StoreError(exc.reason) from None
        sha, size = dataset_sha256(path)
        self._commit_index(
            IndexJob(
                (sop_uid, study_uid, series_uid, str(ds.SOPClassUID), ts, path, size, sha, source.strip(),
                 str(ds.get("Modality", "") or ""), self.clock()),
                {"replaced": False, "kind_new": "recovered"},
            )
        )
