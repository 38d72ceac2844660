"""Disk full mid-transfer: the instance in flight is answered out-of-resources, nothing half-written
reaches the spool, every instance answered success is stored intact, and once space is back the
refused ones are accepted on a resend."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info

from triage.store.part10 import dataset_offset

OUT_OF_RESOURCES = (0xA700, 0xA701)


@contextlib.contextmanager
def tmpfs(folder: Path, size_mb: int) -> Iterator[Path]:
    """A ``size_mb`` tmpfs mounted on ``folder`` (needs root; ``OSError`` when it cannot be mounted)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise OSError(f"cannot mount a tmpfs on {folder}: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def grow(folder: Path, size_mb: int) -> None:
    """Give the tmpfs on ``folder`` more room (space is back)."""
    subprocess.run(["mount", "-o", f"remount,size={size_mb}m", str(folder)], check=True, capture_output=True)


def _dataset_sha(path: Path) -> str:
    raw = Path(path).read_bytes()
    return hashlib.sha256(raw[dataset_offset(raw) :]).hexdigest()


def disk_full_case(
    port: int, root: Path, mount: Path, files: Sequence[Path], send: Any, echo: Any
) -> dict[str, Any]:
    """Send ``files`` onto a store whose filesystem fills up; ``send(port, files)`` returns a result
    with per-SOP ``statuses`` (the test suite's pynetdicom SCU); ``echo(port)`` a C-ECHO status."""
    from triage.store.db import Store

    result = send(port, list(files))
    sops = {str(read_file_meta_info(f).MediaStorageSOPInstanceUID): f for f in files}
    statuses = dict(result.statuses)
    out: dict[str, Any] = {
        "sent": len(files),
        "answered": len(statuses),
        "success": sum(1 for s in statuses.values() if s == 0),
        "out_of_resources": sum(1 for s in statuses.values() if s in OUT_OF_RESOURCES),
        "other_statuses": sorted({hex(s) for s in statuses.values() if s != 0 and s not in OUT_OF_RESOURCES}),
    }
    with Store(root) as store:
        rows = {sop: store.instance(sop) for sop in sops}
        out["acknowledged_missing"] = sum(1 for sop, s in statuses.items() if s == 0 and rows[sop] is None)
        out["acknowledged_corrupt"] = sum(
            1
            for sop, s in statuses.items()
            if s == 0 and rows[sop] is not None and _dataset_sha(rows[sop].path) != _dataset_sha(sops[sop])
        )
        indexed = {str(r.path) for r in rows.values() if r is not None}
        spool_files = [p for p in (root / "spool").glob("*/*/*.dcm")]
        out["spool_files_without_row"] = sum(1 for p in spool_files if str(p) not in indexed)
        out["tmp_leftovers"] = sum(1 for _ in store.tmp.iterdir())
    out["echo_while_full"] = echo(port)
    grow(mount, 256)
    refused = [sops[sop] for sop, s in statuses.items() if s != 0]
    again = send(port, refused) if refused else None
    out["resent"] = len(refused)
    out["resent_success"] = sum(1 for s in (again.statuses.values() if again else []) if s == 0)
    return out
