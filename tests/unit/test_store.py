"""triage.store: durable puts, idempotent duplicates, re-opening, recovery, due series, concurrency."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from triage.store.db import Store
from triage.store.part10 import dataset_offset
from triage.store.schema import SCHEMA_VERSION, StoreError


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def part10(sop: str, study: str, series: str, pixel: int = 0, modality: str = "CT",
           pixel_data: bytes | None = None) -> bytes:
    """A minimal CT Part-10 file: 4x4 pixels of value ``pixel``, or one row holding ``pixel_data``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = modality
    ds.Rows, ds.Columns = (4, 4) if pixel_data is None else (1, len(pixel_data) // 2)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes([pixel % 256]) * 32 if pixel_data is None else pixel_data
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def put(store: Store, data: bytes, sop: str, study: str, series: str, aet: str = "PACS"):
    return store.put_instance(sop, study, series, CTImageStorage, ExplicitVRLittleEndian,
                              lambda f: f.write(data), aet, modality="CT")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock):
    s = Store(tmp_path / "var", clock=clock)
    yield s
    s.close()


def test_put_writes_file_and_row_atomically(store: Store) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    data = part10(sop, study, series)
    result = put(store, data, sop, study, series)

    assert not result.duplicate
    assert result.path == store.spool / study / series / f"{sop}.dcm"
    assert result.path.read_bytes() == data
    row = store.instance(sop)
    assert row is not None
    assert (row.study_uid, row.series_uid, row.calling_aet) == (study, series, "PACS")
    assert row.size == len(data)
    # sha256 covers the dataset bytes (what was on the wire), not the File Meta we wrote
    assert row.sha256 == hashlib.sha256(data[dataset_offset(data):]).hexdigest()
    assert dataset_offset(data) > 132
    assert list(store.tmp.iterdir()) == []
    s = store.series(series)
    assert s is not None and (s.state, s.instance_count, s.modality) == ("receiving", 1, "CT")
    st = store.study(study)
    assert st is not None and (st.state, st.instances) == ("receiving", 1)


def test_writer_failure_leaves_nothing(store: Store) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()

    def broken(f):
        f.write(b"partial")
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        store.put_instance(sop, study, series, CTImageStorage, ExplicitVRLittleEndian, broken, "PACS")
    assert list(store.tmp.iterdir()) == []
    assert store.instance(sop) is None
    assert not (store.spool / study).exists()


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "x" * 65])
def test_unsafe_uids_are_refused_before_writing(store: Store, bad: str) -> None:
    with pytest.raises(StoreError, match="not usable as a UID"):
        put(store, b"x", generate_uid(), bad, generate_uid())
    assert list(store.tmp.iterdir()) == []
    assert list(store.spool.iterdir()) == []


def test_duplicate_same_content_is_a_noop(store: Store, clock: FakeClock) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    data = part10(sop, study, series)
    first = put(store, data, sop, study, series)
    clock.t += 60
    again = put(store, data, sop, study, series, aet="OTHER")

    assert again.duplicate and again.path == first.path
    row = store.instance(sop)
    assert row is not None and row.calling_aet == "PACS" and row.received_at == clock.t - 60
    assert store.series(series).last_received_at == clock.t - 60  # a duplicate is not activity
    assert list(store.tmp.iterdir()) == []
    assert [e.kind for e in store.events(study)] == ["state"]


def test_duplicate_with_new_content_keeps_the_newest(store: Store, clock: FakeClock) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    put(store, part10(sop, study, series, pixel=1), sop, study, series)
    clock.t += 5
    newer = part10(sop, study, series, pixel=2)
    result = put(store, newer, sop, study, series)

    assert not result.duplicate and result.replaced
    assert result.path.read_bytes() == newer
    row = store.instance(sop)
    assert row is not None and row.sha256 == hashlib.sha256(newer[dataset_offset(newer):]).hexdigest()
    assert store.series(series).instance_count == 1
    replaced = [e for e in store.events(study) if e.kind == "instance replaced"]
    assert len(replaced) == 1 and replaced[0].sop_uid == sop


def test_instance_after_assembly_reopens_series_and_study(store: Store, clock: FakeClock) -> None:
    study, series = generate_uid(), generate_uid()
    sop1 = generate_uid()
    put(store, part10(sop1, study, series), sop1, study, series)
    assert store.set_series_state(series, "stable", expected_state="receiving")
    assert not store.set_series_state(series, "stable", expected_state="receiving")  # claimed once
    assert store.set_series_state(series, "assembled", expected_generation=0)
    assert store.set_study_state(study, "assembled")

    clock.t += 100
    sop2 = generate_uid()
    result = put(store, part10(sop2, study, series), sop2, study, series)

    assert result.reopened
    s = store.series(series)
    assert s is not None
    assert (s.state, s.assembly_generation, s.instance_count) == ("receiving", 1, 2)
    assert s.opened_at == clock.t  # the force timer restarts for the new generation
    assert store.study(study).state == "receiving"
    kinds = [(e.kind, e.series_uid is not None) for e in store.events(study)]
    assert ("reopened", True) in kinds and ("reopened", False) in kinds

    # A worker finishing generation 0 late must not overwrite generation 1's state.
    assert not store.set_series_state(series, "assembled", expected_generation=0)
    assert store.series(series).state == "receiving"
    superseded = [e for e in store.events(study) if e.kind == "assembly superseded"]
    assert len(superseded) == 1 and superseded[0].generation == 1


def test_states_are_validated(store: Store) -> None:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    put(store, part10(sop, study, series), sop, study, series)
    with pytest.raises(StoreError, match="unknown study state"):
        store.set_study_state(study, "done")
    with pytest.raises(StoreError, match="unknown series state"):
        store.set_series_state(series, "scored")
    with pytest.raises(StoreError, match="no study"):
        store.set_study_state("1.2.3", "failed")
    assert store.set_study_state(study, "failed", reason="model missing")
    assert store.set_study_state(study, "failed", reason="model missing")
    st = store.study(study)
    assert st is not None and (st.state, st.reason, st.attempts) == ("failed", "model missing", 2)
    assert not store.set_study_state(study, "scored", expected_state="assembled")


def test_series_due_uses_the_clock_not_sleep(store: Store, clock: FakeClock) -> None:
    study = generate_uid()
    a, b = generate_uid(), generate_uid()
    t0 = clock.t
    sop = generate_uid()
    put(store, part10(sop, study, a), sop, study, a)
    clock.t = t0 + 5
    sop = generate_uid()
    put(store, part10(sop, study, b), sop, study, b)

    assert store.series_due(t0 + 7, quiet_s=10, force_s=300) == []
    assert [s.series_uid for s in store.series_due(t0 + 10, quiet_s=10, force_s=300)] == [a]
    assert [s.series_uid for s in store.series_due(t0 + 15, quiet_s=10, force_s=300)] == [a, b]

    # force: a series that never goes quiet is still due force_s after it opened
    for k in range(1, 8):
        clock.t = t0 + 5 + 50 * k
        sop = generate_uid()
        put(store, part10(sop, study, b), sop, study, b)
    due = store.series_due(clock.t + 1, quiet_s=10, force_s=300)
    assert [s.series_uid for s in due] == [a, b]
    store.set_series_state(a, "stable")
    assert [s.series_uid for s in store.series_due(clock.t + 1, quiet_s=10, force_s=300)] == [b]


def test_queue_counts_cover_every_state(store: Store) -> None:
    studies = []
    for _ in range(3):
        study, series, sop = generate_uid(), generate_uid(), generate_uid()
        put(store, part10(sop, study, series), sop, study, series)
        studies.append(study)
    store.set_study_state(studies[0], "scored")
    store.set_study_state(studies[1], "rejected", reason="not a head CT")
    counts = store.queue_counts()
    assert counts["receiving"] == 1 and counts["scored"] == 1 and counts["rejected"] == 1
    assert counts["sent"] == 0 and sum(counts.values()) == 3
    assert [s.study_uid for s in store.studies(limit=2)] != []
    assert len(store.studies(limit=2)) == 2


def test_quarantine_keeps_bytes_and_reason(store: Store) -> None:
    path = store.quarantine(lambda f: f.write(b"garbage"), "truncated: cut short", "MODALITY", "1.2.3")
    assert path.parent == store.quarantine_dir and path.read_bytes() == b"garbage"
    reason = json.loads(path.with_name(path.name + ".reason.json").read_text())
    assert reason["reason"] == "truncated: cut short" and reason["calling_aet"] == "MODALITY"
    assert store.quarantined()[0]["reason"] == "truncated: cut short"
    assert list(store.tmp.iterdir()) == []


def test_recover_cleans_tmp_and_reindexes_orphans(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "var"
    store = Store(root, clock=clock)
    study, series = generate_uid(), generate_uid()
    kept = generate_uid()
    put(store, part10(kept, study, series), kept, study, series)
    # 1: a crash between rename and commit leaves a spool file without a row
    orphan = generate_uid()
    orphan_bytes = part10(orphan, study, series, pixel=7)
    (store.spool / study / series / f"{orphan}.dcm").write_bytes(orphan_bytes)
    # 2: a crash mid-write leaves tmp files
    (store.tmp / "half-written.dcm").write_bytes(b"\0" * 100)
    # 3: an unreadable file in the spool
    junk_series = generate_uid()
    (store.spool / study / junk_series).mkdir()
    (store.spool / study / junk_series / "1.2.3.dcm").write_bytes(b"not dicom at all")
    # 4: a row whose file vanished
    gone = generate_uid()
    put(store, part10(gone, study, series), gone, study, series)
    (store.spool / study / series / f"{gone}.dcm").unlink()
    store.close()

    store = Store(root, clock=clock)
    report = store.recover()
    assert (report.tmp_removed, report.reindexed, report.quarantined, report.missing_files) == (1, 1, 1, 1)
    assert list(store.tmp.iterdir()) == []
    row = store.instance(orphan)
    assert row is not None and row.series_uid == series
    assert row.sha256 == hashlib.sha256(orphan_bytes[dataset_offset(orphan_bytes):]).hexdigest()
    assert store.instance(gone) is None and store.instance(kept) is not None
    assert store.series(series).instance_count == 2
    assert any("unreadable spool file" in q["reason"] for q in store.quarantined())
    kinds = {e.kind for e in store.events(study)}
    assert {"recovered", "instance missing"} <= kinds
    # idempotent: a second recovery finds nothing to do
    again = store.recover()
    assert (again.tmp_removed, again.reindexed, again.quarantined, again.missing_files) == (0, 0, 0, 0)
    store.close()


def test_concurrent_puts_from_threads(store: Store) -> None:
    study, series = generate_uid(), generate_uid()
    errors: list[BaseException] = []
    shared = generate_uid()
    shared_bytes = part10(shared, study, series)

    def worker(k: int) -> None:
        try:
            for _ in range(15):
                sop = generate_uid()
                put(store, part10(sop, study, series, pixel=k), sop, study, series, aet=f"AE{k}")
            put(store, shared_bytes, shared, study, series)  # everyone sends this one too
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.series(series).instance_count == 61
    assert store.instance_total() == 61
    assert len(list((store.spool / study / series).iterdir())) == 61
    assert list(store.tmp.iterdir()) == []


def test_schema_is_versioned(tmp_path: Path) -> None:
    root = tmp_path / "var"
    Store(root).close()
    s = Store(root)  # reopening migrates nothing and keeps the version
    assert s.schema_version == SCHEMA_VERSION
    s.close()
    db = sqlite3.connect(root / "state.db")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this glowtriage"):
        Store(root)
    db = sqlite3.connect(root / "state.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_directory_fsync_group_retries_after_a_failure(tmp_path: Path) -> None:
    from triage.store.spool import GroupSync

    group = GroupSync(tmp_path / "not-yet")
    with pytest.raises(FileNotFoundError):
        group.sync()
    assert group.synced == 0 and not group.running  # the failed round does not count
    (tmp_path / "not-yet").mkdir()
    results: list[BaseException | None] = []

    def call() -> None:
        try:
            group.sync()
            results.append(None)
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [None] * 8 and group.idle and group.synced == group.requested == 9


def test_queue_oldest_age_per_state(tmp_path: Path) -> None:
    now = [100.0]
    store = Store(tmp_path / "var", clock=lambda: now[0])
    for i, t in enumerate((100.0, 130.0)):
        now[0] = t
        store.put_instance(f"1.2.{i}.1.1", f"1.2.{i}", f"1.2.{i}.1", "1.2.840.10008.5.1.4.1.1.2",
                           "1.2.840.10008.1.2.1", lambda f: f.write(b"\0" * 128 + b"DICM"), "T")
    now[0] = 200.0
    assert store.queue_oldest_age() == {"receiving": 100.0}
    store.set_study_state("1.2.1", "stable")
    assert store.queue_oldest_age() == {"receiving": 100.0, "stable": 0.0}


def test_recovery_and_tmp_sweeps_use_the_injected_clock(tmp_path: Path) -> None:
    """Every time recovery records or compares with comes from ``clock``, not the wall clock.

    The clock sits in 1970, so a wall-clock read anywhere would show up as a wrong time (or, in the
    tmp/ sweep, as a fresh file judged ancient).
    """
    clock = FakeClock(86_400.0 * 3 + 0.5)
    root = tmp_path / "var"
    store = Store(root, clock=clock)
    study, series = generate_uid(), generate_uid()
    gone = generate_uid()
    put(store, part10(gone, study, series), gone, study, series)
    (store.spool / study / series / f"{gone}.dcm").unlink()
    orphan = generate_uid()
    (store.spool / study / series / f"{orphan}.dcm").write_bytes(part10(orphan, study, series, pixel=3))
    (store.spool / study / series / "1.2.3.dcm").write_bytes(b"not dicom")
    store.close()

    clock.t += 3600.0
    store = Store(root, clock=clock)
    report = store.recover()
    assert (report.reindexed, report.quarantined, report.missing_files) == (1, 1, 1)
    row = store.instance(orphan)
    assert row is not None and row.received_at == clock.t
    at = {e.kind: e.at for e in store.events(study) if e.kind in ("recovered", "instance missing")}
    assert at == {"recovered": clock.t, "instance missing": clock.t}
    q = store.quarantined()[0]
    assert q["at"] == clock.t
    assert Path(q["path"]).name.startswith("19700104T010000-")  # the quarantine name's stamp too

    # The periodic sweep judges a tmp/ file's age against the same clock.
    old, fresh = store.tmp / "old.dcm", store.tmp / "fresh.dcm"
    for p, age in ((old, 120.0), (fresh, 10.0)):
        p.write_bytes(b"partial")
        os.utime(p, (clock.t - age, clock.t - age))
    assert store.sweep_tmp(older_than_s=60.0) == 1
    assert not old.exists() and fresh.exists()
    store.close()


# ------------------------------------------------------------------ state.db lost or corrupt (issue 14)
def _filled_store(root: Path, studies: int = 3, per_series: int = 4) -> set[str]:
    """A store with ``studies`` studies of one series each; returns the SOP UIDs acknowledged."""
    sops: set[str] = set()
    with Store(root) as s:
        for _ in range(studies):
            study, series = generate_uid(), generate_uid()
            for i in range(per_series):
                sop = generate_uid()
                put(s, part10(sop, study, series, pixel=i), sop, study, series)
                sops.add(sop)
    return sops


def test_state_db_problem_names_missing_empty_and_corrupt_files(tmp_path: Path) -> None:
    from triage.store.rebuild import StateDbError, check_or_raise, state_db_problem

    fresh = tmp_path / "fresh"
    assert state_db_problem(fresh) is None  # a new install: nothing to protect
    root = tmp_path / "var"
    _filled_store(root, 1, 2)
    assert state_db_problem(root) is None
    db = root / "state.db"
    original = db.read_bytes()

    db.unlink()
    assert "is missing" in (state_db_problem(root) or "")
    db.write_bytes(b"")
    assert "holds no index" in (state_db_problem(root) or "")
    db.write_bytes(b"this is not a database at all" * 200)
    assert "is corrupt" in (state_db_problem(root) or "")
    broken = bytearray(original)  # a real database with its page 2 (a table's b-tree) overwritten
    broken[4096:8192] = b"\xff" * 4096
    db.write_bytes(bytes(broken))
    assert "is corrupt" in (state_db_problem(root) or ""), state_db_problem(root)
    with pytest.raises(StateDbError) as err:
        check_or_raise(root, "/etc/glowtriage/config.toml")
    msg = str(err.value)
    assert str(db) in msg and "triage store rebuild --config /etc/glowtriage/config.toml" in msg


def test_rebuild_indexes_every_spool_file_and_closes_old_studies(tmp_path: Path) -> None:
    from triage.store.rebuild import CLOSED_REASON, rebuild, state_db_problem

    root = tmp_path / "var"
    sops = _filled_store(root, 3, 4)
    (root / "state.db").write_bytes(b"garbage" * 1000)
    (root / "state.db-wal").write_bytes(b"")
    # age one study's files past the reprocess window
    study_dirs = sorted((root / "spool").iterdir())
    old_study = study_dirs[0].name
    for f in study_dirs[0].glob("*/*.dcm"):
        os.utime(f, (1_000_000.0, 1_000_000.0))
    report = rebuild(root, reprocess_hours=24.0)
    assert report.indexed == len(sops) and report.quarantined == 0
    assert report.studies == 3 and report.studies_closed == 1
    assert any(n.startswith("state.db.broken-") for n in report.moved_aside)
    assert (root / f"{report.moved_aside[0]}").read_bytes().startswith(b"garbage")  # kept, not deleted
    assert state_db_problem(root) is None
    with Store(root) as s:
        assert s.instance_total() == len(sops)
        assert all(s.instance(sop) is not None for sop in sops)
        assert s.study(old_study).state == "rejected" and s.study(old_study).reason == CLOSED_REASON
        others = [d.name for d in study_dirs[1:]]
        assert {s.study(u).state for u in others} == {"receiving"}


def test_recover_releases_assembly_claims_of_a_dead_process(tmp_path: Path, clock: FakeClock) -> None:
    """kill -9 between the assembler's claim (receiving -> stable) and the end of the assembly left the
    study 'stable' for ever (found by bench/reliability.py's kill-during-results case)."""
    root = tmp_path / "var"
    study, series = generate_uid(), generate_uid()
    with Store(root, clock=clock) as s:
        for i in range(3):
            sop = generate_uid()
            put(s, part10(sop, study, series, pixel=i), sop, study, series)
        assert s.set_series_state(series, "stable", expected_state="receiving")
        s.set_study_state(study, "stable")
    clock.t += 100.0
    with Store(root, clock=clock) as s:  # the restarted process
        report = s.recover()
        assert report.released_claims == 1
        assert s.series(series).state == "receiving" and s.study(study).state == "receiving"
        assert [r.series_uid for r in s.series_due(clock(), 10.0, 300.0)] == [series]
        assert s.recover().released_claims == 0  # nothing left to release


def test_next_series_due_is_the_next_future_moment_a_receiving_series_completes(
    store: Store, clock: FakeClock
) -> None:
    """What the daemon's assembler sleeps until (instead of polling): the earliest quiet-period or
    force end still in the future; a series already due is left out (it may wait for a sibling)."""
    t0 = clock.t
    assert store.next_series_due(10.0, 300.0, after=t0) is None  # nothing receiving
    put(store, part10("1.2.3.1", "1.2.3", "1.2.3.4"), "1.2.3.1", "1.2.3", "1.2.3.4")
    assert store.next_series_due(10.0, 300.0, after=t0) == pytest.approx(t0 + 10.0)
    clock.t += 4.0
    put(store, part10("1.2.3.2", "1.2.3", "1.2.3.5"), "1.2.3.2", "1.2.3", "1.2.3.5")
    assert store.next_series_due(10.0, 300.0, after=clock.t) == pytest.approx(t0 + 10.0)
    assert store.next_series_due(10.0, 300.0, after=t0 + 11.0) == pytest.approx(t0 + 14.0)
    assert store.next_series_due(10.0, 5.0, after=clock.t) == pytest.approx(t0 + 5.0)  # forced earlier
    store.set_series_state("1.2.3.4", "stable", expected_state="receiving")
    store.set_series_state("1.2.3.5", "stable", expected_state="receiving")
    assert store.next_series_due(10.0, 300.0, after=clock.t) is None
