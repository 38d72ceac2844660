"""``state.db`` lost or corrupt: refuse to start, and rebuild the index from the spool on request.

Why refuse instead of carrying on: the spool files are the truth for *instances*, but ``state.db`` is
the only record of what the pipeline already did (assembled, scored, reported, sent). A daemon that
silently started on a fresh or damaged database would either crash later at an unpredictable point or
re-send a month of results to the PACS and the RIS. So the daemon checks the file before it opens it
(:func:`state_db_problem`) and stops with a message naming the file and the command to run; the
operator decides, and ``triage store rebuild`` (:func:`rebuild`) does the rest:

* the damaged ``state.db`` (with its ``-wal``/``-shm``) is moved aside, never deleted;
* a fresh database is created and every spool file is indexed from its own header (the same
  ``_reindex`` start-up recovery uses), so no acknowledged instance is lost; a file that cannot be
  read is quarantined with its reason, as at any start-up;
* studies whose newest file is older than ``reprocess_hours`` are indexed but closed (series
  ``skipped``, study ``rejected`` with the reason), so they are not scored and sent again; newer ones
  go through the pipeline as if just received. A new instance for a closed series re-opens it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from triage.ops.logs import get_logger
from triage.store.schema import StoreError

log = get_logger("store")

STATE_DB = "state.db"
CLOSED_REASON = "index rebuilt from the spool; received before the reprocess window, not re-scored or re-sent"


class StateDbError(StoreError):
    """``state.db`` cannot be used; the message names the file and the command that rebuilds it."""


def _spool_has_instances(root: Path) -> bool:
    return next((root / "spool").glob("*/*/*.dcm"), None) is not None


def state_db_problem(root: Path) -> str | None:
    """None when ``root/state.db`` is usable (or absent on a store that never received anything);
    otherwise what is wrong, in one sentence. Opens nothing for writing."""
    db = Path(root) / STATE_DB
    has_instances = _spool_has_instances(root)
    if not db.exists():
        return f"{db} is missing but the spool holds received instances" if has_instances else None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30.0)
    except sqlite3.Error as exc:
        return f"{db} cannot be opened ({exc})"
    try:
        version = int(con.execute("PRAGMA user_version").fetchone()[0])
        if version == 0:
            if has_instances:
                return f"{db} holds no index (empty or not initialised) but the spool holds instances"
            return None
        check = [str(r[0]) for r in con.execute("PRAGMA quick_check").fetchall()]
        if check != ["ok"]:
            return f"{db} is corrupt (quick_check: {'; '.join(check[:3])})"
        con.execute("SELECT COUNT(*) FROM instances").fetchone()
    except sqlite3.DatabaseError as exc:
        return f"{db} is corrupt ({exc})"
    finally:
        con.close()
    return None  # a schema newer than ours: Store refuses it itself, with its own message


def refusal_message(problem: str, config_path: str | None) -> str:
    """What the daemon prints when it will not start on ``state.db``."""
    cfg = f" --config {config_path}" if config_path else ""
    return (
        f"{problem}. glowtriage will not start on it. The spool files are the truth: stop anything using "
        f"this storage root, then rebuild the index from them with `triage store rebuild{cfg}` "
        f"(the old file is kept beside it as {STATE_DB}.broken-<time>)."
    )


def check_or_raise(root: Path, config_path: str | None = None) -> None:
    """Raise :class:`StateDbError` with :func:`refusal_message` when ``state.db`` is not usable."""
    problem = state_db_problem(root)
    if problem is not None:
        raise StateDbError(refusal_message(problem, config_path))


@dataclass
class RebuildReport:
    moved_aside: list[str]
    indexed: int
    quarantined: int
    studies: int
    studies_closed: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rebuild(root: Path, reprocess_hours: float = 24.0, now: float | None = None) -> RebuildReport:
    """Move ``state.db`` aside and index every spool file into a fresh one (see the module docstring).

    The caller must make sure no daemon runs on ``root`` (the CLI says so); two writers on one spool
    would race, whatever this does.
    """
    from triage.store.db import Store  # the store imports this module's checks; build it lazily

    t0 = time.perf_counter()
    root = Path(root)
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    moved = []
    for suffix in ("", "-wal", "-shm"):
        src = root / f"{STATE_DB}{suffix}"
        if src.exists():
            dst = root / f"{STATE_DB}.broken-{stamp}{suffix}"
            os.replace(src, dst)
            moved.append(dst.name)
    with Store(root) as store:
        report = store.recover()
        cutoff = now - reprocess_hours * 3600.0
        newest: dict[str, float] = {}
        for row in store._db.execute("SELECT study_uid, path FROM instances"):
            with contextlib.suppress(OSError):
                mtime = os.stat(row["path"]).st_mtime
                newest[row["study_uid"]] = max(newest.get(row["study_uid"], 0.0), mtime)
        old = sorted(s for s, t in newest.items() if t < cutoff)
        with store.transaction() as db:
            for study in old:
                for table, state in (("series", "skipped"), ("studies", "rejected")):
                    sql = f"UPDATE {table} SET state = ?, reason = ?, updated_at = ? WHERE study_uid = ?"
                    db.execute(sql, (state, CLOSED_REASON, now, study))
    out = RebuildReport(moved, report.reindexed, report.quarantined, len(newest), len(old),
                        round(time.perf_counter() - t0, 3))
    log.info("state_db_rebuilt", **out.as_dict())
    return out
