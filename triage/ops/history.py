"""The nightly retrain's history file and work folders: what the scheduler (daemon side) and the
retrain job (``training.train.retrain``, a child process on the training side) both read and write.

Kept here, below both, so the daemon can report the last retrain and the job can append to it
without the daemon importing the training code.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

HISTORY = "retrain.jsonl"
WORKDIR_PREFIX = ".retrain-"
RESULT = "result.json"


def history_path(models_dir: Path) -> Path:
    return Path(models_dir) / HISTORY


def read_history(models_dir: Path) -> list[dict[str, Any]]:
    """Every run recorded under ``models_dir``, oldest first; a damaged line is skipped, not fatal."""
    p = history_path(models_dir)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if isinstance(rec, dict):
                out.append(rec)
    return out


def append_history(models_dir: Path, record: dict[str, Any]) -> None:
    """One JSON line per run, fsync'd: the record survives a crash right after the run."""
    Path(models_dir).mkdir(parents=True, exist_ok=True)
    with history_path(models_dir).open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def last_success(models_dir: Path) -> float | None:
    """Unix time of the newest promoted retrain in the history, or None."""
    for rec in reversed(read_history(models_dir)):
        if rec.get("outcome") == "promoted" and isinstance(rec.get("finished_at"), (int, float)):
            return float(rec["finished_at"])
    return None


def new_workdir(models_dir: Path) -> Path:
    """``<models>/.retrain-<UTC time>-<random>``: a fresh, unique work folder name (not created)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return Path(models_dir) / f"{WORKDIR_PREFIX}{stamp}-{os.urandom(3).hex()}"


