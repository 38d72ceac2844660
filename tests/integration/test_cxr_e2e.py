"""A chest radiograph end to end with real peers: Orthanc sends a synthetic DX study (frontal PA and a
lateral) to `triage serve` while a head-CT set and a chest set are both current; the study is scored by
the chest set and ends as exactly one SR in Orthanc (procedure "Plain chest X-ray", valid for dciodvfy)
and one ORU^R01 (OBR-24 RX); the lateral is skipped with its reason. Plumbing only: the models are
untrained (ActNorm initialised), accuracy is `training experiment --kind cxr`'s business."""

from __future__ import annotations

import subprocess
from pathlib import Path

import hl7
import numpy as np
import pydicom
import pytest

from training.harness.config import write_config
from training.harness.daemon import TriageProcess
from training.harness.fixtures import tiny_model
from training.harness.mllp import MLLPListener
from training.harness.orthanc import Orthanc
from training.harness.ports import free_port
from training.harness.process import stop_all, wait_for
from training.synth.cxr_dicom import CXR_VENDORS, write_cxr_study
from triage.model.registry import Registry

TINY_2D = "test-tiny-2d"  # the radiograph tests' tiny preset

pytestmark = pytest.mark.integration



def test_dx_study_is_scored_by_the_chest_set_and_reported_once(tmp_path: Path) -> None:
    study = tmp_path / "dx"
    write_cxr_study(study, np.random.default_rng(3), lesion="effusion", patient_index=3,
                    vendor=CXR_VENDORS[2], lateral_fraction=1.0, synth_scale=5)
    files = sorted(study.glob("*.dcm"))
    assert len(files) == 2
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    reg = Registry(tmp_path / "var" / "models")
    ct = reg.create(tiny_model(tmp_path / "c0.pt", 1), tiny_model(tmp_path / "c1.pt", 2), preset="test-tiny",
                    preprocessing_version="assemble-2", threshold=0.0, method="test", normal_scores=[0.0],
                    provenance={}, software_version="test")
    cxr = reg.create(tiny_model(tmp_path / "x0.pt", 3, TINY_2D), tiny_model(tmp_path / "x1.pt", 4, TINY_2D),
                     preset="test-tiny-2d",
                     preprocessing_version="radiograph-1", threshold=1e9, method="test: flag everything",
                     normal_scores=[0.0], provenance={}, software_version="test")
    reg.promote(ct.version)
    reg.promote(cxr.version)

    glow_port, mllp = free_port(), MLLPListener()
    orthanc = Orthanc(tmp_path / "orthanc", name="cxr",
                      modalities={"GLOWTRIAGE": ["GLOWTRIAGE", "127.0.0.1", glow_port]})
    cfg = write_config(tmp_path / "config.toml", {
        "dicom": {"ae_title": "GLOWTRIAGE", "host": "127.0.0.1", "port": glow_port},
        "storage": {"root": "var", "min_free_mb": 1},
        "assembly": {"quiet_seconds": 2.0, "force_seconds": 60.0},
        "scoring": {"device": "cpu"},
        "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
        "hl7": {"enabled": True, "host": "127.0.0.1", "port": mllp.port},
        "outbox": {"max_attempts": 20, "backoff_initial_s": 0.5, "backoff_max_s": 2.0, "poll_s": 0.2},
        "metrics": {"host": "127.0.0.1", "port": free_port()},
        "logging": {"level": "info", "format": "json"},
    })
    daemon = TriageProcess(cfg, tmp_path / "daemon.log", start_timeout=60, stop_grace=30)
    try:
        orthanc.start(timeout=30)
        daemon.start()
        orthanc.upload(files)
        orthanc.store_to("GLOWTRIAGE", orthanc.get("/studies"), timeout=300)
        wait_for(lambda: {s["state"] for s in daemon.status(timeout=60)["studies"]} == {"sent"}, 180,
                 "the chest study sent")
        wait_for(lambda: len(mllp.messages) >= 1, 60, "one ORU^R01")
        srs = orthanc.sr_instances(study_uid)
        assert len(srs) == 1, f"{len(srs)} SR instances"
        sr_file = tmp_path / "sr.dcm"
        sr_file.write_bytes(orthanc.get(f"/instances/{srs[0]}/file"))
    finally:
        stop_all(mllp, orthanc, daemon)
    sr = pydicom.dcmread(sr_file)
    assert sr.StudyInstanceUID == study_uid
    frontal = pydicom.dcmread(study / "frontal.dcm", stop_before_pixels=True)
    evidence = [s.SeriesInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence[0]
                .ReferencedSeriesSequence]
    assert evidence == [frontal.SeriesInstanceUID]  # the frontal view was scored, the lateral skipped
    v = subprocess.run(["dciodvfy", str(sr_file)], capture_output=True, text=True)
    assert not [ln for ln in (v.stdout + v.stderr).splitlines() if ln.startswith("Error")]
    d = subprocess.run(["dsrdump", str(sr_file)], capture_output=True, text=True, check=True).stdout
    assert "Plain chest X-ray" in d and '"Abnormal"' in d and cxr.version in d
    assert len(mllp.messages) == 1
    obr = hl7.parse(mllp.messages[0]).segment("OBR")
    assert str(obr[24]) == "RX" and str(obr[5]) == "S"
