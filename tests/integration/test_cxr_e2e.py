"""A chest radiograph end to end with real peers: Orthanc sends a synthetic DX study (frontal PA and a
lateral) to `triage serve` while a head-CT set and a chest set are both current; the study is scored by
the chest set and ends as exactly one SR in Orthanc (procedure "Plain chest X-ray", valid for dciodvfy)
and one ORU^R01 (OBR-24 RX); the lateral is skipped with its reason. The chest set keeps a region
calibration (three synthetic normals), so the flagged study's SR carries the region as an SCOORD point on
the frontal image and a key image (the radiograph with the map) goes to Orthanc beside it, both valid for
dciodvfy. Plumbing only: the models are untrained (ActNorm initialised), accuracy is `training experiment
--kind cxr`'s business."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import hl7
import numpy as np
import pydicom
import pytest
import torch

from training.harness.config import write_config
from training.harness.daemon import TriageProcess
from training.harness.fixtures import tiny_model
from training.harness.mllp import MLLPListener
from training.harness.orthanc import Orthanc
from training.harness.ports import free_port
from training.harness.process import stop_all, wait_for
from training.synth.cxr_dicom import CXR_VENDORS, write_cxr_study
from triage.assemble.folders import folder_studies
from triage.config import AssemblySettings
from triage.model.radiomap import FORMAT_2D, WINDOWS_SIDE, model_spacing_side
from triage.model.registry import Registry
from triage.model.score import ModelPair
from triage.model.voxelmap import fit_region_calibration, save_region_calibration, search_mask

TINY_2D = "test-tiny-2d"  # the radiograph tests' tiny preset
SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage: the key image

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
    x0, x1 = tiny_model(tmp_path / "x0.pt", 3, TINY_2D), tiny_model(tmp_path / "x1.pt", 4, TINY_2D)
    rng = np.random.default_rng(11)
    for i in range(3):
        write_cxr_study(tmp_path / "normals" / str(i), rng, lesion=None, patient_index=10 + i,
                        vendor=CXR_VENDORS[i], lateral_fraction=0.0, synth_scale=5)
    studies = folder_studies([tmp_path / "normals"], AssemblySettings())
    normals = [st.volume.data for st in studies if st.volume]
    pair = ModelPair.load(x0, x1, torch.device("cpu"))
    # the chest rule on three normals, its threshold raised so that the study's region is flagged
    maps = [pair.log_likelihood_maps(v)[2].numpy() for v in normals]
    cal = fit_region_calibration(maps, model_spacing_side((16, 16)), specificity=0.9, windows_mm=WINDOWS_SIDE,
                                 fmt=FORMAT_2D, masks=[search_mask(v, (16, 16)) for v in normals])
    cal.threshold = 1e9
    region = save_region_calibration(reg.root, cal)
    cxr = reg.create(x0, x1, preset="test-tiny-2d",
                     preprocessing_version="radiograph-1", threshold=1e9, method="test: flag everything",
                     normal_scores=[0.0], provenance={}, software_version="test",
                     calibration_extra={"region": region})
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
        found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}})
        assert len(found) == 4, f"{len(found)} instances: frontal, lateral, SR and one key image expected"
        key_file = tmp_path / "key.dcm"
        for oid in found:
            raw = orthanc.get(f"/instances/{oid}/file")
            if pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True).SOPClassUID == SC:
                key_file.write_bytes(raw)
    finally:
        stop_all(mllp, orthanc, daemon)
    sr = pydicom.dcmread(sr_file)
    assert sr.StudyInstanceUID == study_uid
    frontal = pydicom.dcmread(study / "frontal.dcm", stop_before_pixels=True)
    key = pydicom.dcmread(key_file)
    evidence = [s.SeriesInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence[0]
                .ReferencedSeriesSequence]
    # the frontal view was scored, the lateral skipped; the key image is evidence too
    assert sorted(evidence) == sorted([frontal.SeriesInstanceUID, key.SeriesInstanceUID])
    assert key.SourceImageSequence[0].ReferencedSOPInstanceUID == frontal.SOPInstanceUID
    assert key.pixel_array.shape == (frontal.Rows, frontal.Columns, 3)
    for f in (sr_file, key_file):
        v = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
        assert not [ln for ln in (v.stdout + v.stderr).splitlines() if ln.startswith("Error")], f.name
    d = subprocess.run(["dsrdump", str(sr_file)], capture_output=True, text=True, check=True).stdout
    assert "Plain chest X-ray" in d and '"Abnormal"' in d and cxr.version in d
    assert 'SCOORD:(,,"Image Region")=(POINT,' in d  # the region, a point on the frontal image
    assert "SCOORD3D" not in d
    assert len(mllp.messages) == 1
    obr = hl7.parse(mllp.messages[0]).segment("OBR")
    assert str(obr[24]) == "RX" and str(obr[5]) == "S"
