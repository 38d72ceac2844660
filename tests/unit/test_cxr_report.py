"""Reports of chest radiographs: the same SR with procedure "Plain chest X-ray" and site Chest, the same
ORU with the radiograph's diagnostic service; head-CT reports keep their codes."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import hl7
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from training.synth.cxr_dicom import CXR_VENDORS, write_cxr_study
from triage.config import HL7Settings
from triage.model.results import ModelSetInfo, ScoreResult
from triage.report.hl7 import build_oru
from triage.report.sr import build_sr

WHEN = datetime(2024, 1, 2, 10, 30, tzinfo=UTC)


def _info(kind: str) -> ModelSetInfo:
    return ModelSetInfo(version="20240101-0000-ab12cd", device_uid=generate_uid(), preset="test-tiny-2d",
                        preprocessing_version="radiograph-1", threshold=-3.5, threshold_method="youden",
                        kind=kind)


def _dx(tmp_path: Path, vendor: int = 2) -> pydicom.Dataset:
    write_cxr_study(tmp_path / "s", np.random.default_rng(0), lesion="effusion", patient_index=1,
                    vendor=CXR_VENDORS[vendor], lateral_fraction=0.0, synth_scale=8)
    return pydicom.dcmread(tmp_path / "s" / "frontal.dcm", stop_before_pixels=True)


def _result(src: pydicom.Dataset) -> ScoreResult:
    return ScoreResult(study_uid=str(src.StudyInstanceUID), series_uid=str(src.SeriesInstanceUID),
                       log_p_normal_model=-100.0, log_p_mixture_model=-90.0, log_posterior=-10.0,
                       threshold=-3.5, flagged=True, percentile=1.0, model_version="20240101-0000-ab12cd")


def _codes(sr: pydicom.Dataset) -> set[tuple[str, str]]:
    out = set()

    def walk(items: pydicom.Sequence) -> None:
        for it in items:
            for kw in ("ConceptCodeSequence", "ConceptNameCodeSequence"):
                for c in it.get(kw, []):
                    out.add((str(c.CodeValue), str(c.CodeMeaning)))
            walk(it.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return out


@pytest.mark.parametrize("vendor", [0, 2])  # CR MONOCHROME1, DX
def test_chest_sr_names_the_procedure_and_site_and_is_valid(tmp_path: Path, vendor: int) -> None:
    src = _dx(tmp_path, vendor)
    sr = build_sr(_result(src), [src], _info("cxr"), series_instance_uid="1.2.3.4.100",
                  sop_instance_uid="1.2.3.4.100.1", content_datetime=WHEN)
    codes = _codes(sr)
    assert ("399208008", "Plain chest X-ray") in codes and ("51185008", "Chest") in codes
    assert not any(v in ("303653007", "69536005") for v, _ in codes)
    ct = build_sr(_result(src), [src], _info("ct"), series_instance_uid="1.2.3.4.100",
                  sop_instance_uid="1.2.3.4.100.1", content_datetime=WHEN)
    assert ("303653007", "Computed tomography of head") in _codes(ct)
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy (dicom3tools) is not installed: scripts/bootstrap.sh installs it")
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    out = subprocess.run(["dciodvfy", "-new", str(tmp_path / "sr.dcm")], capture_output=True, text=True,
                         check=False)
    errors = [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("Error")]
    assert errors == []


def test_chest_oru_keeps_priority_and_names_the_radiograph(tmp_path: Path) -> None:
    src = _dx(tmp_path)
    raw = build_oru(_result(src), src, _info("cxr"), HL7Settings(), control_id="C1",
                    when=datetime(2024, 1, 2, 11, 0, tzinfo=UTC))
    obr = hl7.parse(raw).segment("OBR")
    assert str(obr[4]).startswith("399208008^Plain chest X-ray^SCT") and str(obr[24]) == "RX"
    assert str(obr[5]) == "S"  # flagged: STAT, as for head CT
    ct = hl7.parse(build_oru(_result(src), src, _info("ct"), HL7Settings(), control_id="C1",
                             when=datetime(2024, 1, 2, 11, 0, tzinfo=UTC))).segment("OBR")
    assert str(ct[24]) == "CT" and str(ct[4]).startswith("24725-4^CT Head^LN")
