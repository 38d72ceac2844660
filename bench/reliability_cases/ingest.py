"""Ingest under stress: ``kill -9`` at random moments while several associations send, and load
(C concurrent associations x M instances) with the daemon's peak memory.

The invariant of the kill cycles is the one a PACS relies on: every instance that got a success status
is in the store after the restart, file and row, with the bytes that were sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.filereader import read_file_meta_info

from training.harness.daemon import TriageProcess
from training.harness.sender import send_acked
from training.harness.series import write_ct_series
from training.harness.storescu import storescu_parallel
from triage.store.part10 import dataset_offset


def _sop(path: Path) -> str:
    return str(read_file_meta_info(path).MediaStorageSOPInstanceUID)


def _dataset_sha(path: Path) -> str:
    raw = Path(path).read_bytes()
    return hashlib.sha256(raw[dataset_offset(raw) :]).hexdigest()


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) in KiB, from /proc, of a process and its child processes (the
    daemon's receiver workers, ``[dicom] workers``), summed: the sum of the peaks bounds the peak of
    the sum. ``processes`` says how many were counted."""
    out = {"VmRSS": 0, "VmHWM": 0, "processes": 0}
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] += int(value.split()[0])
            out["processes"] += 1
        except OSError:
            pass
    return out if out["processes"] else {}


def _send_acked(port: int, files: Sequence[Path], acked: list[str], lock: threading.Lock) -> None:
    """One pynetdicom association sending ``files``; SOP UIDs answered 0x0000 go into ``acked``."""

    def ack(f: Path) -> None:
        with lock:
            acked.append(_sop(f))

    send_acked(port, files, ack, calling_ae="KILLSCU", timeout=10.0)


def kill_cycles_case(
    rx: TriageProcess,
    port: int,
    root: Path,
    work: Path,
    *,
    cycles: int,
    associations: int = 4,
    per_association: int = 40,
    size: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """``cycles`` times: ``associations`` senders start, SIGKILL at a random moment, restart; at the
    end every acknowledged instance must be in the store with the bytes that were sent."""
    from pynetdicom import _config

    from triage.store.db import Store

    rng = random.Random(seed)
    acked: list[str] = []
    lock = threading.Lock()
    sent_files: dict[str, Path] = {}
    restarts: list[float] = []
    _config.STORE_SEND_CHUNKED_DATASET = True
    for cycle in range(cycles):
        groups = []
        for a in range(associations):
            files = write_ct_series(
                work / f"c{cycle}" / f"a{a}", per_association, size, seed=seed + cycle * 10 + a
            )
            groups.append(files)
            sent_files.update({_sop(f): f for f in files})
        threads = [
            threading.Thread(target=_send_acked, args=(port, g, acked, lock), daemon=True) for g in groups
        ]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.05, 1.5))  # a random moment during the transfer
        rx.kill()
        for t in threads:
            t.join(timeout=30)
        t0 = time.perf_counter()
        rx.start(timeout=120)
        restarts.append(time.perf_counter() - t0)
    lost = corrupt = 0
    with Store(root) as store:
        for sop in set(acked):
            row = store.instance(sop)
            if row is None or not Path(row.path).exists():
                lost += 1
            elif _dataset_sha(row.path) != _dataset_sha(sent_files[sop]):
                corrupt += 1
        total = store.instance_total()
    return {
        "cycles": cycles,
        "associations": associations,
        "acknowledged": len(set(acked)),
        "acknowledged_lost": lost,
        "acknowledged_corrupt": corrupt,
        "stored_total": total,
        "restart_s_max": round(max(restarts, default=0.0), 2),
        "restart_s_median": round(sorted(restarts)[len(restarts) // 2], 2) if restarts else 0.0,
    }


def load_case(
    rx: TriageProcess,
    port: int,
    root: Path,
    work: Path,
    *,
    associations: int,
    per_association: int,
    size: int = 128,
) -> dict[str, Any]:
    """``associations`` storescu processes at once, ``per_association`` instances each; all must be
    stored; the daemon's RSS before and its peak (VmHWM) after."""
    from triage.store.db import Store

    assert rx.proc is not None
    groups = [
        write_ct_series(work / f"l{a}", per_association, size, seed=1000 + a) for a in range(associations)
    ]
    before = rss_kb(rx.proc.pid)
    seconds = storescu_parallel(port, groups, called="GLOWTRIAGE")
    after = rss_kb(rx.proc.pid)
    with Store(root) as store:
        missing = sum(1 for g in groups for f in g if store.instance(_sop(f)) is None)
    n = associations * per_association
    return {
        "associations": associations,
        "instances": n,
        "missing": missing,
        "seconds": round(seconds, 2),
        "instances_per_s": round(n / seconds, 1) if seconds else None,
        "rss_before_mb": round(before.get("VmRSS", 0) / 1024, 1),
        "rss_peak_mb": round(after.get("VmHWM", 0) / 1024, 1),
    }
