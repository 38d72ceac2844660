"""``state.db`` lost or corrupt: the daemon refuses to start naming the file and the command, the command
rebuilds the index from the spool, and every acknowledged instance is back."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread

from training.harness.daemon import REPO, TriageProcess
from training.harness.process import HarnessError
from training.harness.storescu import storescu


def _sop(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def damage(db: Path, how: str) -> None:
    """``lost``: the file and its WAL are gone; ``corrupt``: its pages are overwritten with junk."""
    for extra in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        extra.unlink(missing_ok=True)
    if how == "lost":
        db.unlink()
    else:
        size = max(db.stat().st_size, 8192)
        db.write_bytes(b"\x00glowtriage-junk" * (size // 16))


def state_db_case(
    rx: TriageProcess, port: int, root: Path, files: Sequence[Path], how: str
) -> dict[str, Any]:
    """Send ``files``, stop, damage ``state.db`` (``how``), start (must refuse), rebuild, start again."""
    out: dict[str, Any] = {"how": how, "sent": len(files)}
    done = storescu(port, list(files), timeout=300)
    out["acknowledged"] = len(files) if done.returncode == 0 else -1
    rx.stop()
    damage(root / "state.db", how)
    try:
        rx.start(timeout=60)
        out["refused"], out["message"] = False, ""
    except HarnessError as exc:
        text = str(exc)
        out["refused"] = True
        out["message"] = next((ln for ln in text.splitlines() if "triage store rebuild" in ln), text[-400:])
    t0 = time.perf_counter()
    argv = [sys.executable, "-m", "triage.cli", "store", "rebuild", "--config", str(rx.config)]
    rebuilt = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    out["rebuild_rc"], out["rebuild_s"] = rebuilt.returncode, round(time.perf_counter() - t0, 2)
    out["rebuild_output"] = (rebuilt.stdout.strip().splitlines() or [rebuilt.stderr[-400:]])[-1]
    rx.start(timeout=120)
    from triage.store.db import Store

    with Store(root) as s:
        out["lost"] = sum(1 for f in files if s.instance(_sop(f)) is None)
    return out
