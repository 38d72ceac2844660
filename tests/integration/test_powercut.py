"""Power cuts during ingest (issue 15's one-wait ingest): no acknowledged instance is lost, and start-up
recovery reports what a cut leaves instead of crashing on it.

``kill -9`` (test_reliability.py) never loses a byte that reached the page cache, so it cannot show that
the store fsyncs the right things. Here the daemon's storage root is a power-cut filesystem
(:mod:`training.harness.powercut`): a FUSE passthrough that keeps, beside the live state, only what a
strict POSIX filesystem must keep after a power cut (a file's bytes once it is fsync'd, a folder's
entries once the folder is fsync'd). Each cut freezes it, kills the daemon and its workers, and leaves
the durable state; the daemon restarts on that, as after a real power cut.

The simulator's own tests come first: what vanishes, what stays, and SQLite (locks, ``mmap`` of the
``-shm`` file, the ``-wal`` file's folder entry) on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from training.harness.config import write_config
from training.harness.daemon import TriageProcess
from training.harness.ports import free_port
from training.harness.powercut import PowerCut, fuse_problem
from training.harness.process import wait_for
from training.harness.sender import send_acked
from training.harness.series import write_ct_series
from triage.store.part10 import dataset_offset
from triage.store.spool import fsync_file

integration = pytest.mark.integration


def _write(path: Path, data: bytes, *, sync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def _dataset_sha(path: Path) -> str:
    raw = Path(path).read_bytes()
    return hashlib.sha256(raw[dataset_offset(raw) :]).hexdigest()


@pytest.fixture
def powercut(tmp_path: Path) -> Iterator[PowerCut]:
    """A mounted power-cut filesystem over ``tmp_path/backing`` at ``tmp_path/mnt`` (skips where this
    sandbox cannot mount FUSE; fails where the packages bootstrap installs are missing)."""
    problem = fuse_problem()
    if problem.startswith("mfusepy") or problem.startswith("fusermount3"):
        pytest.fail(problem)
    if problem:
        pytest.skip(problem)
    pc = PowerCut(tmp_path / "backing", tmp_path / "mnt")
    try:
        pc.mount()
    except OSError as exc:  # no mount permission in this sandbox
        pytest.skip(f"cannot mount the power-cut filesystem: {exc}")
    try:
        yield pc
    finally:
        pc.unmount()


# ------------------------------------------------------------------------------ the simulator itself
@integration
def test_simulator_keeps_only_what_was_fsynced(powercut: PowerCut) -> None:
    m, b = powercut.mount_point, powercut.backing
    _write(m / "unsynced", b"never fsync'd", sync=False)
    _write(m / "synced", b"fsync'd", sync=True)
    _write(m / "later", b"first", sync=True)
    with open(m / "later", "ab") as f:  # appended after its fsync: the append is lost
        f.write(b" second")
    (m / "new").mkdir()
    _write(m / "new" / "inside", b"fsync'd, folder entry not", sync=True)
    _write(m / "tmp", b"renamed", sync=True)
    os.replace(m / "tmp", m / "renamed")  # durable only once the folder is fsync'd
    fsync_file(m)  # the root's entries as they are now: unsynced, synced, later, new, renamed
    os.replace(m / "renamed", m / "renamed-again")  # after the folder's fsync: not durable
    _write(m / "after", b"created after the folder's fsync", sync=True)
    assert sorted(os.listdir(m)) == ["after", "later", "new", "renamed-again", "synced", "unsynced"]

    got = powercut.cut()

    assert sorted(os.listdir(b)) == ["later", "new", "renamed", "synced", "unsynced"]
    assert (b / "unsynced").read_bytes() == b""  # its name was durable, its bytes never were
    assert (b / "synced").read_bytes() == b"fsync'd"
    assert (b / "later").read_bytes() == b"first"
    assert os.listdir(b / "new") == []  # a synced file in a folder never fsync'd after it appeared
    assert (b / "renamed").read_bytes() == b"renamed"
    assert "after" in got["vanished"] and "new/inside" in got["vanished"]
    assert "renamed" in got["resurrected"]


@integration
def test_simulator_rename_is_durable_only_after_the_folders_fsync(powercut: PowerCut) -> None:
    m = powercut.mount_point
    (m / "tmp").mkdir()
    (m / "spool").mkdir()
    fsync_file(m)
    _write(m / "tmp" / "a", b"a", sync=True)
    _write(m / "tmp" / "b", b"b", sync=True)
    fsync_file(m / "tmp")  # both durable in tmp/
    os.replace(m / "tmp" / "a", m / "spool" / "a")
    os.replace(m / "tmp" / "b", m / "spool" / "b")
    fsync_file(m / "spool")  # the new names are durable; tmp/ still names both (never fsync'd since)
    os.replace(m / "spool" / "b", m / "spool" / "c")  # not durable: b stays, c vanishes
    powercut.cut()
    b = powercut.backing
    assert sorted(os.listdir(b / "spool")) == ["a", "b"]
    assert sorted(os.listdir(b / "tmp")) == ["a", "b"]  # the old names too (strict POSIX allows it)
    assert os.stat(b / "spool" / "a").st_ino == os.stat(b / "tmp" / "a").st_ino  # one inode, two names
    assert (b / "spool" / "b").read_bytes() == b"b"


@integration
def test_simulator_torn_cut_keeps_synced_bytes_and_a_prefix_of_the_rest(powercut: PowerCut) -> None:
    m = powercut.mount_point
    synced = os.urandom(10000)
    tail = os.urandom(50000)
    with open(m / "f", "wb") as f:
        f.write(synced)
        f.flush()
        os.fsync(f.fileno())
        f.write(tail)
    fsync_file(m)
    powercut.cut(torn=True, seed=5)
    got = (powercut.backing / "f").read_bytes()
    assert got[:10000] == synced  # never less than what was fsync'd
    assert 10000 <= len(got) <= 60000 and got[10000:] == tail[: len(got) - 10000]


@integration
def test_sqlite_in_wal_mode_keeps_every_full_commit_across_a_cut(powercut: PowerCut) -> None:
    """SQLite on the mount: two connections (POSIX locks, the mmapped ``-shm``), commits with
    synchronous=FULL survive the cut, and SQLite made its new ``-wal`` file's folder entry durable
    itself (it fsyncs the folder at the first sync of a log it created)."""
    m = powercut.mount_point
    db = sqlite3.connect(m / "t.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (x INTEGER)")
    other = sqlite3.connect(m / "t.db", isolation_level=None, timeout=10)
    for i in range(40):
        (db if i % 2 else other).execute("INSERT INTO t VALUES (?)", (i,))
    assert other.execute("SELECT COUNT(*) FROM t").fetchone() == (40,)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("INSERT INTO t VALUES (99)")  # never synced: may be lost
    got = powercut.cut()
    for conn in (db, other):  # their descriptors died with the mount: nothing is left to write
        with contextlib.suppress(sqlite3.Error):
            conn.close()
    assert "t.db-wal" not in got["vanished"]
    check = sqlite3.connect(powercut.backing / "t.db")
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    rows = [r[0] for r in check.execute("SELECT x FROM t ORDER BY x")]
    assert rows[:40] == list(range(40)) and rows[40:] in ([], [99])
    check.close()


# ------------------------------------------------------------------------------ the store
def _put(store: Any, path: Path) -> Any:
    from pydicom import dcmread

    ds = dcmread(path, stop_before_pixels=True)
    return store.put_instance(str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                              str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID),
                              lambda out: out.write(path.read_bytes()), "POWERSCU", "CT")


@integration
def test_an_instance_answered_in_a_series_folder_another_writer_just_made_survives_a_cut(
    powercut: PowerCut, tmp_path: Path
) -> None:
    """Two writers, one new series: A makes the series folder and fsyncs its parents (spool/, then the
    study folder, which makes the series folder's entry durable); B finds the folder there and stores
    its instance in it. If B is answered before A's fsync of the study folder has run, a power cut then
    takes the series folder, and B's acknowledged file with it, unless B makes the folder's entry
    durable itself (found by this simulator: the study folder's fsync is stalled to widen the window)."""
    from pydicom import dcmread

    from triage.store.db import Store

    m = powercut.mount_point
    a_file, b_file = write_ct_series(tmp_path / "ct", 2, 32, seed=9)
    ds = dcmread(b_file, stop_before_pixels=True)
    study, series, b_sop = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    store = Store(m)
    powercut.stall("fsyncdir", f"/spool/{study}", 3.0)  # A's fsync that makes the series folder durable
    a_errors: list[BaseException] = []

    def put_a() -> None:
        try:
            _put(store, a_file)
        except BaseException as exc:  # the cut makes its stalled fsync fail: A is never answered
            a_errors.append(exc)

    a = threading.Thread(target=put_a, daemon=True)
    a.start()
    wait_for(lambda: (m / "spool" / study / series).is_dir(), 10, "A's series folder", every=0.01)
    _put(store, b_file)  # B answered (before the fix, while A's fsync of the study folder still waited)
    powercut.cut()
    a.join(10)
    with contextlib.suppress(Exception):
        store.close()
    b_path = powercut.backing / "spool" / study / series / f"{b_sop}.dcm"
    assert b_path.exists(), "B was answered, but its file did not survive the power cut"
    powercut.mount()
    with Store(m) as again:
        again.recover()
        row = again.instance(b_sop)
        assert row is not None and _dataset_sha(row.path) == _dataset_sha(b_file)


@integration
def test_a_new_store_is_durable_before_anything_is_written_to_it(powercut: PowerCut) -> None:
    """A storage root made on first start (and its parent) survives a power cut right after: the
    folders' entries are fsync'd where they were made, not left to a later, unrelated sync."""
    from triage.store.spool import Spool

    Spool(powercut.mount_point / "var" / "glowtriage")
    powercut.cut()
    root = powercut.backing / "var" / "glowtriage"
    assert sorted(os.listdir(root)) == ["quarantine", "spool", "tmp", "volumes"]


# ------------------------------------------------------------------------------ the daemon
def _send(port: int, files: list[Path], acked: set[str], lock: threading.Lock, timeout: float = 30.0) -> None:
    """One association sending ``files`` in order (:func:`training.harness.sender.send_acked`); every
    SOP Instance UID answered 0x0000 goes in ``acked`` the moment the status arrives."""
    from pydicom.filereader import read_file_meta_info

    def ack(f: Path) -> None:
        with lock:
            acked.add(str(read_file_meta_info(f).MediaStorageSOPInstanceUID))

    send_acked(port, files, ack, calling_ae="POWERSCU", timeout=timeout)


def _durable_leftovers(root: Path, work: Path, sent_sha: dict[str, str]) -> dict[str, Any]:
    """What start-up recovery should find in the durable tree (read before the daemon starts, from a
    copy of the database so that nothing on the tree changes): tmp/ files, spool files without a row
    (complete ones to re-index, the others to quarantine), rows whose file is gone or not its bytes."""
    copy = work / "db-copy"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for name in ("state.db", "state.db-wal"):
        if (root / name).exists():
            shutil.copyfile(root / name, copy / name)
    db = sqlite3.connect(copy / "state.db")
    rows = db.execute("SELECT path, size, sha256 FROM instances").fetchall()
    db.close()
    indexed = {r[0] for r in rows}
    spool = sorted((root / "spool").glob("*/*/*.dcm"))
    rowless = [p for p in spool if str(p) not in indexed]
    complete = 0
    for p in rowless:
        with contextlib.suppress(OSError, ValueError):
            complete += _dataset_sha(p) in sent_sha.values()
    bad_rows = 0
    for path, size, sha in rows:
        p = Path(path)
        if not p.exists() or p.stat().st_size != size or _dataset_sha(p) != sha:
            bad_rows += 1
    return {
        "tmp": len(list((root / "tmp").iterdir())) if (root / "tmp").exists() else 0,
        "rows": len(rows),
        "rowless": len(rowless),
        "rowless_complete": complete,
        "bad_rows": bad_rows,
    }


def _recovered(daemon: TriageProcess, offset: int) -> dict[str, Any]:
    events = [e for e in daemon.events(offset) if e.get("event") == "recovered"]
    assert len(events) == 1, f"one recovery report per start, got {events}:\n{daemon.tail()}"
    return events[0]


def _check_acked(root: Path, acked: set[str], sent: dict[str, Path], sent_sha: dict[str, str]) -> None:
    from triage.store.db import Store

    with Store(root) as store:
        for sop in sorted(acked):
            row = store.instance(sop)
            assert row is not None, f"acknowledged {sop} has no row after the power cut"
            assert Path(row.path).exists(), f"acknowledged {sop}: {row.path} is gone after the power cut"
            assert row.sha256 == sent_sha[sop], f"acknowledged {sop}: indexed hash differs from what was sent"
            assert _dataset_sha(row.path) == sent_sha[sop], (sop, sent[sop].name)


# (torn, trigger) per cycle: cuts at random moments (strict, then torn: unsynced bytes kept up to a
# random offset, folders with unsynced changes as fsync'd or as live); and cuts right after one step
# of the one-wait ingest, where the other two fsyncs of the same instance may not have run: after a
# series folder's fsync (a spool file empty, or without its row), after a spool file's own fsync (its
# name or row not durable), after a log fsync (a row whose file is not all there), torn.
CYCLES: list[tuple[bool, tuple[str, str] | None]] = [
    (False, None),
    (False, ("fsyncdir", "/spool/")),
    (True, None),
    (False, ("fsync", "/spool/")),
    (True, ("fsync", "/state.db-wal")),
]


@integration
def test_power_cuts_during_ingest_lose_no_acknowledged_instance(powercut: PowerCut, tmp_path: Path) -> None:
    from pydicom.filereader import read_file_meta_info

    t_start = time.monotonic()
    rng = random.Random(1515)
    root = powercut.mount_point
    port = free_port()
    cfg = write_config(tmp_path / "config.toml", {
        "dicom": {"ae_title": "GLOWTRIAGE", "host": "127.0.0.1", "port": port, "acse_timeout": 10.0,
                  "dimse_timeout": 30.0, "network_timeout": 30.0, "workers": 2},
        "storage": {"root": str(root), "min_free_mb": 1},
        "assembly": {"quiet_seconds": 2.0, "non_head_content": "warn"},
        "scoring": {"warmup": False},
        "logging": {"level": "info", "format": "json"},
        "metrics": {"enabled": False},
    })
    daemon = TriageProcess(cfg, tmp_path / "daemon.log", ready_event="listening", start_timeout=60,
                           stop_grace=15)
    # one study, three series (one per association) of 5 mm axial slices
    study_uid = "1.2.826.0.1.3680043.8.498.1515"
    groups = [
        write_ct_series(tmp_path / "ct" / f"s{k}", 40, 128, study_uid=study_uid, seed=k, prefix=f"s{k}-")
        for k in range(3)
    ]
    sent: dict[str, Path] = {}
    for g in groups:
        for f in g:
            sent[str(read_file_meta_info(f).MediaStorageSOPInstanceUID)] = f
    sent_sha = {sop: _dataset_sha(f) for sop, f in sent.items()}
    acked: set[str] = set()
    lock = threading.Lock()
    cycles: list[dict[str, Any]] = []

    daemon.start()
    try:
        for cycle, (torn, trigger) in enumerate(CYCLES):
            t0 = time.monotonic()
            pending = [[f for f in g if str(read_file_meta_info(f).MediaStorageSOPInstanceUID) not in acked]
                       for g in groups]
            todo = sum(len(g) for g in pending)
            before = len(acked)
            if trigger is not None:  # the cut lands right after the k-th such operation
                powercut.arm(*trigger, count=rng.randint(3, 12), torn=torn, seed=cycle)
            threads = [threading.Thread(target=_send, args=(port, g, acked, lock, 2.0), daemon=True)
                       for g in pending if g]
            for t in threads:
                t.start()
            if trigger is None:  # a random moment: once a random share of what is left is answered
                target = before + max(1, int(todo * rng.uniform(0.1, 0.4)))
                wait_for(lambda target=target, threads=threads: len(acked) >= target
                         or not any(t.is_alive() for t in threads),
                         30, "instances answered before the cut", every=0.005)
                time.sleep(rng.uniform(0.0, 0.05))
            assert daemon.proc is not None
            cut = powercut.cut([daemon.proc.pid], torn=torn, seed=cycle, wait=30.0 if trigger else 0.0)
            daemon.proc.wait(10)
            for t in threads:
                t.join(30)
            t_cut = time.monotonic()
            # the rows name files under the mount point: look at the durable tree through the mount
            powercut.mount()
            expected = _durable_leftovers(root, tmp_path, sent_sha)
            offset = daemon.log.stat().st_size
            t_mount = time.monotonic()
            daemon.start()
            t_up = time.monotonic()
            rec = _recovered(daemon, offset)
            assert rec["tmp_removed"] == expected["tmp"], (rec, expected)
            assert rec["reindexed"] == expected["rowless_complete"], (rec, expected)
            assert rec["quarantined"] == expected["rowless"] - expected["rowless_complete"], (rec, expected)
            assert rec["missing_files"] == expected["bad_rows"], (rec, expected)
            _check_acked(root, acked, sent, sent_sha)
            cycles.append({"cycle": cycle, "torn": torn, "trigger": cut["trigger"],
                           "acked_in_cycle": len(acked) - before, "acked_total": len(acked),
                           "vanished": len(cut["vanished"]), "not_synced": len(cut["not_synced"]),
                           "killed": len(cut["killed"]), "durable": expected, "cut_s": cut["seconds"],
                           "recovered": {k: rec[k] for k in ("tmp_removed", "reindexed", "quarantined",
                                                             "missing_files")},
                           "s": {"ingest_and_cut": round(t_cut - t0, 1), "mount": round(t_mount - t_cut, 1),
                                 "start": round(t_up - t_mount, 1),
                                 "check": round(time.monotonic() - t_up, 1)}})
        # power stays on: the sender resends what was never acknowledged, the study completes
        rest = [[f for f in g if str(read_file_meta_info(f).MediaStorageSOPInstanceUID) not in acked]
                for g in groups]
        threads = [threading.Thread(target=_send, args=(port, g, acked, lock), daemon=True)
                   for g in rest if g]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert acked == set(sent), f"{len(set(sent) - acked)} instances never acknowledged"
        _check_acked(root, acked, sent, sent_sha)

        def settled() -> Any:
            from triage.store.db import Store

            with Store(root) as store:
                study = store.study(study_uid)
                series = store.study_series(study_uid)
                if study is None or study.state in ("receiving", "stable"):
                    return None
                return SimpleNamespace(state=study.state, series={s.series_uid: s.state for s in series},
                                       instances=sum(s.instance_count for s in series))

        done = wait_for(settled, 30, "the study assembled after the power cuts", every=0.5)
        assert done.state == "assembled", (done, daemon.tail())
        assert done.instances == len(sent)
        assert sorted(done.series.values()) == ["assembled", "skipped", "skipped"], done
        assert "Traceback" not in daemon.log_text()
    finally:
        daemon.stop()
    elapsed = time.monotonic() - t_start
    print({"cycles": cycles, "acknowledged": len(acked), "sent": len(sent), "seconds": round(elapsed, 1)})
    assert len(cycles) == len(CYCLES) and all(c["killed"] >= 1 for c in cycles)
    assert all(c["trigger"] for c, (_, trig) in zip(cycles, CYCLES, strict=True) if trig), cycles
    assert sum(c["acked_in_cycle"] for c in cycles) > 0
