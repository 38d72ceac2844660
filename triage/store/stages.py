"""The later stages' outputs: assembled volumes, scores, result files (SR, HL7).

Why a mixin of :class:`~triage.store.db.Store`: each method is one transaction that writes the
output row and moves the study's state together, so a crash leaves either both or neither; that
needs the Store's connection, lock and clock. The file paths come from the Store's spool.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage.store.schema import AssemblyRow, BinaryWriter
from triage.store.spool import Spool


class StageOutputsMixin:
    """Assemble / score / report outputs of the Store; relies on the attributes declared below."""

    _db: sqlite3.Connection
    _lock: threading.RLock
    files: Spool
    clock: Callable[[], float]

    if TYPE_CHECKING:  # provided by Store

        def transaction(self) -> AbstractContextManager[sqlite3.Connection]: ...

        def _move_study(self, db: sqlite3.Connection, now: float, study_uid: str, state: str,
                        reason: str | None = None) -> None: ...

    def volume_path(self, study_uid: str, series_uid: str, generation: int) -> Path:
        """Where the assembled volume of a series generation lives (also the retrain archive)."""
        return self.files.volume_path(study_uid, series_uid, generation)

    def results_dir(self, study_uid: str) -> Path:
        return self.files.results_dir(study_uid)

    def write_result_file(self, path: Path, writer: BinaryWriter) -> Path:
        """Write a payload (SR, HL7) atomically: tmp/, fsync, rename, fsync the folder."""
        return self.files.write_file(path, writer)

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

    def scored_by_model_version(self) -> dict[str, int]:
        """How many studies each model set version scored (their latest score), for ``triage status``:
        the registry tells each version's kind, so this gives the studies scored per kind."""
        with self._lock:
            rows = self._db.execute(
                "SELECT json_extract(result, '$.model_version') AS v, COUNT(*) AS n FROM scores GROUP BY v"
            ).fetchall()
        return {str(r["v"]): int(r["n"]) for r in rows if r["v"] is not None}
