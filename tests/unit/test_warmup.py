"""The daemon's warm-up (triage.warmup): every part runs on the synthetic study, nothing is stored,
queued or left on disk, a failing part is logged and the daemon serves anyway, and the key turns it off.

Real daemon objects on a real store and registry (tiny untrained models for a head-CT and a chest set);
the DICOM listener runs in this process on a free port.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from training.harness.fixtures import tiny_model
from training.harness.ports import free_port
from triage.config import Config, parse
from triage.daemon import Daemon
from triage.model.registry import Registry
from triage.warmup import WARMUP_PATIENT_ID, phantom_series

TINY_2D = "test-tiny-2d"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with a current head-CT set and a current chest set (tiny, untrained)."""
    base = tmp_path_factory.mktemp("warmup-models")
    reg = Registry(base / "models")
    common: dict[str, Any] = {"threshold": 0.0, "method": "test", "normal_scores": [0.0, 1.0],
                              "provenance": {}, "software_version": "test"}
    ct = reg.create(tiny_model(base / "c0.pt", 1), tiny_model(base / "c1.pt", 2), preset="test-tiny",
                    preprocessing_version="assemble-2", **common)
    cxr = reg.create(tiny_model(base / "x0.pt", 3, TINY_2D), tiny_model(base / "x1.pt", 4, TINY_2D),
                     preset=TINY_2D, preprocessing_version="radiograph-1", **common)
    reg.promote(ct.version)
    reg.promote(cxr.version)
    return base / "models"


def _config(tmp_path: Path, models: Path, **sections: dict[str, Any]) -> Config:
    import shutil

    root = tmp_path / "var"
    shutil.copytree(models, root / "models", symlinks=True)
    data: dict[str, Any] = {
        "dicom": {"host": "127.0.0.1", "port": free_port(), "workers": 1},
        "storage": {"root": str(root), "min_free_mb": 1},
        "scoring": {"device": "cpu"},
        "metrics": {"enabled": False},
        "retrain": {"enabled": False},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse(data, None)


def _files(root: Path) -> set[str]:
    """Every file under the storage root except the model registry and SQLite's own files."""
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).parts[0] != "models" and not p.name.startswith("state.db")}


@pytest.fixture()
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tempfile's folder for this test alone, to see that the warm-up's folder is removed."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_phantom_is_a_head_ct_series_without_patient_data(tmp_path: Path) -> None:
    from pydicom import dcmread

    paths = phantom_series(tmp_path)
    ds = dcmread(paths[0])
    assert ds.Modality == "CT" and ds.PatientID == WARMUP_PATIENT_ID and str(ds.PatientName) == ""
    assert ds.pixel_array.shape == (256, 256)
    (tmp_path / "again").mkdir()
    again = phantom_series(tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]  # the same files every time


def test_warmup_runs_every_part_and_leaves_nothing(tmp_path: Path, models: Path, private_tmp: Path) -> None:
    import os
    import subprocess
    import sys

    # a warm-up folder left by a daemon killed during its warm-up goes; a living daemon's stays
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = private_tmp / f"glowtriage-warmup-{int(dead.stdout)}-abc"
    live = private_tmp / f"glowtriage-warmup-{os.getppid()}-def"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "000.dcm").write_bytes(b"x")
    cfg = _config(tmp_path, models)
    daemon = Daemon(cfg)
    try:
        before = _files(cfg.storage_root)
        with capture_logs() as logs:
            out = daemon.warmup()
        assert out is not None and "failed" not in out and "skipped" not in out, out
        assert set(out["seconds"]) == {"load_model_sets", "assemble", "score_ct", "score_cxr", "report"}
        done = [e for e in logs if e["event"] == "warmup_done"]
        assert len(done) == 1 and done[0]["seconds"] == out["seconds"] and done[0]["total_s"] > 0
        # nothing stored, queued or scored; no study in any log line; the temporary folder is gone
        assert daemon.store.studies(limit=10) == []
        assert daemon.store.outbox_due(1e12, limit=10) == [] and _files(cfg.storage_root) == before
        assert not any(e["event"].startswith(("study_", "outbox_")) for e in logs)
        assert list(private_tmp.iterdir()) == [live]
        # the models are loaded: the first scoring round reuses them
        assert daemon.scorer is not None and set(daemon.scorer.by_kind) == {"ct", "cxr"}
    finally:
        daemon.store.close()


def test_a_failing_part_is_logged_and_the_daemon_serves(tmp_path: Path, models: Path,
                                                        private_tmp: Path) -> None:
    # the phantom covers 180 mm: a site that asks for more rejects it, and the assembly part fails
    cfg = _config(tmp_path, models, assembly={"min_coverage_mm": 400.0})
    daemon = Daemon(cfg)
    with capture_logs() as logs:
        daemon.start()
    try:
        failed = [e for e in logs if e["event"] == "warmup_part_failed"]
        assert [e["part"] for e in failed] == ["assemble"] and "400" in failed[0]["reason"]
        done = next(e for e in logs if e["event"] == "warmup_done")
        assert set(done["failed"]) == {"assemble"} and done["skipped"] == ["report"]
        assert {"score_ct", "score_cxr"} <= set(done["seconds"])  # the model sets still ran
        events = [e["event"] for e in logs]
        assert events.index("warmup_done") < events.index("serving")  # ready after the warm-up
        assert daemon.receiver is not None and daemon.receiver.address[1] == cfg.settings.dicom.port
        assert all(t.is_alive() for t in daemon.threads) and len(daemon.threads) == 3
        assert list(private_tmp.iterdir()) == []
    finally:
        daemon.stop()


def test_warmup_off(tmp_path: Path, models: Path) -> None:
    cfg = _config(tmp_path, models, scoring={"warmup": False})
    daemon = Daemon(cfg)
    with capture_logs() as logs:
        daemon.start()
    try:
        events = [e["event"] for e in logs]
        assert "serving" in events and not any(e.startswith("warmup") for e in events)
    finally:
        daemon.stop()
