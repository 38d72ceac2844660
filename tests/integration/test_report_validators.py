"""The SR checked by validators that are not ours: dciodvfy (dicom3tools) and dsrdump (dcmtk).

The source is a tiny but valid CT series written with pydicom (dciodvfy checks it too, so a finding in
the SR is not an artefact of a broken fixture); the SR is built from the headers read back with
``stop_before_pixels``, as the pipeline does.
"""

from __future__ import annotations

import re
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from triage.model.results import ModelSetInfo, ScoreResult
from triage.report.sr import build_sr

pytestmark = pytest.mark.integration

# Warnings dciodvfy (dicom3tools 2022) gives for the SR, each understood:
KNOWN_WARNINGS = (
    # PS3.16 8.2: private coding schemes start with "99"; we declare it in the Coding Scheme
    # Identification Sequence, but a validator cannot know a private designator.
    re.compile(r"Unrecognized defined term <99GLOWTRIAGE> for value 1 of attribute "
               r"<Coding Scheme Designator>"),
    # Device UID (0018,1002) is type 3 in the Contributing Equipment Sequence of the current SOP Common
    # module (highdicom's bundled standard has it); the 2022 dicom3tools tables predate that.
    re.compile(r"Attribute is not present in standard DICOM IOD - \(0x0018,0x1002\) UI Device UID"),
    re.compile(r"Dicom dataset contains attributes not present in standard DICOM IOD"),
)


def write_ct_series(folder: Path, n: int = 3) -> list[Path]:
    """A small, valid axial head CT (Patient, General Study, Series, Equipment, Image, CT Image)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20240102"
        ds.StudyTime, ds.SeriesTime = "101500", "101600"
        ds.AcquisitionTime, ds.ContentTime = "101650", "101700"
        ds.AccessionNumber, ds.StudyID, ds.Modality = "ACC123", "S1", "CT"
        ds.Manufacturer, ds.ManufacturerModelName = "ACME", "Scanner 1"
        ds.ReferringPhysicianName = "REF^DOC"
        ds.StudyDescription, ds.SeriesDescription = "CT HEAD", "AXIAL BRAIN"
        ds.PatientName, ds.PatientID = "DOE^JANE", "PID001"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = 2, i + 1, 1
        ds.PositionReferenceIndicator, ds.PatientPosition, ds.BodyPartExamined = "", "HFS", "HEAD"
        ds.ImagePositionPatient = [-100.0, -100.0, 5.0 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness, ds.SliceLocation = [12.5, 12.5], 5.0, 5.0 * i
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.Rows, ds.Columns = 1, "MONOCHROME2", 16, 16
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.KVP = -1024, 1, 120
        ds.PixelData = np.full((16, 16), 1064, np.uint16).tobytes()
        path = folder / f"ct{i:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dciodvfy(tools, path: Path) -> tuple[list[str], list[str]]:
    out = subprocess.run([tools.require_tool("dciodvfy"), str(path)], capture_output=True, text=True,
                         timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


@pytest.mark.parametrize(("flagged", "finding"), [(True, "Abnormal"), (False, "Normal")])
def test_sr_passes_dciodvfy_and_dsrdump_shows_finding_and_score(tools, tmp_path: Path, flagged: bool,
                                                                 finding: str) -> None:
    files = write_ct_series(tmp_path / "ct")
    errors, _ = dciodvfy(tools, files[0])
    assert errors == [], f"the CT fixture itself is invalid: {errors}"
    source = [dcmread(f, stop_before_pixels=True) for f in files]
    lp0, lp1 = (-1000.5, -990.25) if flagged else (-980.125, -981.0)
    result = ScoreResult(study_uid=source[0].StudyInstanceUID, series_uid=source[0].SeriesInstanceUID,
                         log_p_normal_model=lp0, log_p_mixture_model=lp1, log_posterior=lp0 - lp1,
                         threshold=-3.5, flagged=flagged, percentile=1.5 if flagged else 62.5,
                         model_version="20240101-0000-ab12cd")
    model = ModelSetInfo(version="20240101-0000-ab12cd", device_uid=generate_uid(), preset="cpu-small",
                         preprocessing_version="pp1", threshold=-3.5, threshold_method="youden")
    sr = build_sr(result, source, model, series_instance_uid=generate_uid(), sop_instance_uid=generate_uid(),
                  content_datetime=datetime(2024, 1, 2, 11, 0))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)

    errors, warnings = dciodvfy(tools, path)
    assert errors == [], "\n".join(errors)
    unknown = [w for w in warnings if not any(p.search(w) for p in KNOWN_WARNINGS)]
    assert unknown == [], "new dciodvfy warnings:\n" + "\n".join(unknown)

    out = subprocess.run([tools.require_tool("dsrdump"), "+Pt", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == ""  # dcmtk found nothing to warn about in the content tree
    text = out.stdout
    assert "Comprehensive 3D SR Document" in text and "TID 1500 (DCMR)" in text
    code = "263654008" if flagged else "17621005"
    assert f'"Normality")=({code},SCT,"{finding}")' in text, text
    score = f"{result.log_posterior:g}"  # -10.25 / 0.875
    assert re.search(rf'"Log posterior of normal, log p\(normal\|x\)"\)="{re.escape(score)}" \(\{{nat\}}',
                     text), text
