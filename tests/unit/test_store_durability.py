"""The store's one-wait ingest (issue 15): what is durable when adopt returns, and what recovery does with
what a power cut may leave behind (a spool file renamed before its bytes were all on disk).

The file's fsync, the folder's and the database's run at the same time after the rename
(:meth:`triage.store.db.Store.adopt_instance`), so these tests check the two halves of that bargain:
every answered instance has all three on disk (fsyncs observed, and a ``kill -9`` in a loop of puts
loses none), and a torn file that was never answered is never kept as if it were whole.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

import triage.store.db as db_module
from tests.unit.test_store import part10 as store_part10
from triage.store.db import Store
from triage.store.part10 import dataset_offset

REPO = Path(__file__).resolve().parents[2]


def part10(sop: str, study: str, series: str, pixels: int = 4096) -> bytes:
    """A CT Part-10 file with ``pixels`` random bytes (every instance hashes differently)."""
    return store_part10(sop, study, series, pixel_data=os.urandom(pixels))


def adopt(store: Store, data: bytes, sop: str, study: str, series: str) -> Path:
    """What the receiver does: the bytes land in tmp/ unsynced, then adopt_instance."""
    tmp = store.new_tmp_path()
    tmp.write_bytes(data)
    return store.adopt_instance(tmp, sop, study, series, CTImageStorage, ExplicitVRLittleEndian, "PACS").path


def test_file_folder_and_log_are_fsynced_before_adopt_returns(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "var")
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    adopt(store, part10(generate_uid(), study, series), generate_uid(), study, series)  # folders exist
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", spy)
    final = adopt(store, part10(sop, study, series), sop, study, series)
    done = list(synced)  # what had finished when adopt returned
    monkeypatch.undo()
    assert str(final) in done, "the instance's own bytes"
    assert str(final.parent) in done, "its name in the series folder"
    assert str(store.root / "state.db-wal") in done, "its row"
    store.close()


def test_a_failed_file_fsync_leaves_neither_row_nor_file(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "var")
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    real = db_module.fsync_file

    def failing(path: Path) -> None:
        if str(path).startswith(str(store.spool)):
            raise OSError(errno.EIO, "injected I/O error")
        real(path)

    monkeypatch.setattr(db_module, "fsync_file", failing)
    with pytest.raises(OSError, match="injected"):
        adopt(store, part10(sop, study, series), sop, study, series)
    assert store.instance(sop) is None
    assert not store.instance_path(study, series, sop).exists()
    assert "instance withdrawn" in {e.kind for e in store.events(study)}
    monkeypatch.undo()
    adopt(store, part10(sop, study, series), sop, study, series)  # the sender's retry is stored
    assert store.instance(sop) is not None
    store.close()


def test_recovery_drops_a_row_whose_file_was_cut_short(tmp_path: Path) -> None:
    root = tmp_path / "var"
    store = Store(root)
    study, series = generate_uid(), generate_uid()
    kept, torn = generate_uid(), generate_uid()
    adopt(store, part10(kept, study, series), kept, study, series)
    path = adopt(store, part10(torn, study, series), torn, study, series)
    store.close()
    with open(path, "r+b") as f:  # what ext4 shows after a power cut before the bytes were written
        f.truncate(path.stat().st_size // 2)

    store = Store(root)
    report = store.recover()
    assert report.missing_files == 1
    assert store.instance(torn) is None and not path.exists()
    assert store.instance(kept) is not None
    assert store.series(series).instance_count == 1
    assert any(e.kind == "instance missing" and "bytes" in (e.reason or "") for e in store.events(study))
    store.close()


def test_recovery_hashes_the_newest_rows(tmp_path: Path) -> None:
    """Same size, other bytes (a filesystem that shows the size before the data): the newest rows are
    hashed, so such a file is dropped too."""
    root = tmp_path / "var"
    store = Store(root)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    path = adopt(store, part10(sop, study, series), sop, study, series)
    store.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size - 1024)
        f.write(b"\0" * 1024)
    store = Store(root)
    assert store.recover().missing_files == 1
    assert store.instance(sop) is None and not path.exists()
    store.close()


def test_recovery_quarantines_a_cut_short_file_without_a_row(tmp_path: Path) -> None:
    root = tmp_path / "var"
    store = Store(root)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    adopt(store, part10(generate_uid(), study, series), generate_uid(), study, series)
    store.close()
    data = part10(sop, study, series)
    orphan = root / "spool" / study / series / f"{sop}.dcm"
    orphan.write_bytes(data[: len(data) - 100])  # renamed, bytes partly on disk, no row: never answered

    store = Store(root)
    report = store.recover()
    assert (report.reindexed, report.quarantined) == (0, 1)
    assert store.instance(sop) is None and not orphan.exists()
    assert "truncated" in store.quarantined()[0]["reason"]
    store.close()


_WRITER = r"""
import os, sys
sys.path.insert(0, sys.argv[2])
from tests.unit.test_store_durability import adopt, part10
from triage.store.db import Store
store = Store(sys.argv[1])
study, series = sys.argv[3], sys.argv[4]
k = 0
while True:
    sop = f"1.2.826.0.1.{os.getpid()}.{k}"
    adopt(store, part10(sop, study, series), sop, study, series)
    print(sop, flush=True)  # acknowledged: the receiver would answer success now
    k += 1
"""


def _acked_until_killed(root: Path, study: str, series: str, after: int) -> list[str]:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(REPO), study, series],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    acked: list[str] = []
    assert proc.stdout is not None
    try:
        killer = threading.Timer(30.0, proc.kill)  # never hang the suite
        killer.start()
        for line in proc.stdout:
            acked.append(line.strip())
            if len(acked) >= after:
                os.kill(proc.pid, 9)
                break
        killer.cancel()
    finally:
        proc.kill()
        proc.wait()
    return acked


def test_kill_9_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    root = tmp_path / "var"
    study, series = generate_uid(), generate_uid()
    rng = random.Random(15)
    acked: list[str] = []
    for _cycle in range(3):
        acked += _acked_until_killed(root, study, series, rng.randint(5, 40))
        time.sleep(rng.random() * 0.01)
        store = Store(root)
        store.recover()
        for sop in acked:
            row = store.instance(sop)
            assert row is not None, f"acknowledged {sop} lost"
            data = Path(row.path).read_bytes()
            assert hashlib.sha256(data[dataset_offset(data):]).hexdigest() == row.sha256
        store.close()
    assert len(acked) >= 15
