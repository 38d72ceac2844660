"""The outbox: results waiting to be delivered, their retries, acknowledgements and dead letters.

Why a mixin of :class:`~triage.store.db.Store` rather than its own store: a delivery's row and the
study's state move in one transaction (the study is ``sent`` in the same commit that records the
last acknowledgement), so the outbox must share the Store's connection, lock and clock. Keeping
its SQL here lets the send stage's contract be read apart from ingest and assembly.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from triage.store.schema import OutboxRow, outbox_row


class OutboxMixin:
    """Outbox methods of the Store; relies on the attributes and methods declared below."""

    _db: sqlite3.Connection
    _lock: threading.RLock
    clock: Callable[[], float]

    if TYPE_CHECKING:  # provided by Store

        def transaction(self) -> AbstractContextManager[sqlite3.Connection]: ...

        def _move_study(self, db: sqlite3.Connection, now: float, study_uid: str, state: str,
                        reason: str | None = None) -> None: ...

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
        return [outbox_row(r) for r in rows]

    def outbox_next_attempt(self, after: float) -> float | None:
        """When the next pending row falls due later than ``after`` (store clock), or None: the sender
        sleeps till then (rows due already were just tried; new ones wake it)."""
        with self._lock:
            r = self._db.execute(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending' AND next_attempt_at > ?",
                (after,),
            ).fetchone()
        return None if r is None or r[0] is None else float(r[0])

    def outbox(self, study_uid: str | None = None) -> list[OutboxRow]:
        with self._lock:
            if study_uid is None:
                rows = self._db.execute("SELECT * FROM outbox ORDER BY id").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM outbox WHERE study_uid = ? ORDER BY id", (study_uid,)
                ).fetchall()
        return [outbox_row(r) for r in rows]

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
