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


def region_result(source) -> ScoreResult:
    """A flagged result with a region at the middle slice of :func:`write_ct_series`'s geometry."""
    return ScoreResult(study_uid=source[0].StudyInstanceUID, series_uid=source[0].SeriesInstanceUID,
                       log_p_normal_model=-1000.5, log_p_mixture_model=-990.25, log_posterior=-10.25,
                       threshold=-3.5, flagged=True, percentile=1.5, model_version="20240101-0000-ab12cd",
                       region_score=-7.25, region_percentile=0.0, region_threshold=-4.5, region_flagged=True,
                       region_window_mm=40.0, region_center_mm=[0.0, 0.0, 5.0],
                       region_sop_instance_uid=str(source[1].SOPInstanceUID), global_flagged=True,
                       flag_policy="either")


def region_map_and_grid() -> tuple[dict, dict]:
    """A model-grid z-map (8 x 16 x 16 over the canonical 32 x 128 x 128) that is -8 in a ball around
    the region's centre and 0 elsewhere, and a canonical grid placed over the fixture's slices."""
    from triage.assemble.common import PIXEL_MM, SLICE_MM

    grid = {"origin": [-109.14, -109.14, 50.0], "spacing": [PIXEL_MM, PIXEL_MM, SLICE_MM],
            "direction": [1, 0, 0, 0, 1, 0, 0, 0, -1]}
    zz, yy, xx = np.meshgrid(np.arange(8), np.arange(16), np.arange(16), indexing="ij")
    # model voxel (k, j, i) -> canonical (4k+1.5, 8j+3.5, 8i+3.5) -> patient mm
    px = -109.14 + (8 * xx + 3.5) * PIXEL_MM
    py = -109.14 + (8 * yy + 3.5) * PIXEL_MM
    pz = 50.0 - (4 * zz + 1.5) * SLICE_MM
    zmap = np.where(np.sqrt(px**2 + py**2 + (pz - 5.0) ** 2) < 30.0, -8.0, 0.0)
    return {"zmap": zmap, "image_shape": [8, 16, 16]}, grid


def test_key_images_and_region_sr_pass_dciodvfy(tools, tmp_path: Path) -> None:
    """Key images (RGB Secondary Capture, highdicom) of the slices through the region, and the SR with
    the region group (score referencing them, SCOORD3D point, nearest source slice): no dciodvfy
    errors on either; dsrdump shows the region's score and the point."""
    from triage.report.keyimages import build_key_images

    files = write_ct_series(tmp_path / "ct")
    full = [dcmread(f) for f in files]
    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    result = region_result(headers)
    model = ModelSetInfo(version="20240101-0000-ab12cd", device_uid=generate_uid(), preset="cpu-small",
                         preprocessing_version="pp1", threshold=-3.5, threshold_method="youden")
    region_map, grid = region_map_and_grid()
    series = generate_uid()
    kis = build_key_images(result, full, region_map, grid, model, series_instance_uid=series,
                           sop_instance_uid=lambda i: generate_uid(entropy_srcs=["ki", str(i)]),
                           content_datetime=datetime(2024, 1, 2, 11, 0))
    assert 1 <= len(kis) <= 3
    for i, ki in enumerate(kis):
        path = tmp_path / f"ki{i}.dcm"
        ki.save_as(path, enforce_file_format=True)
        errors, _ = dciodvfy(tools, path)
        assert errors == [], "\n".join(errors)
        back = dcmread(path)
        assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and back.PhotometricInterpretation == "RGB"
        assert back.StudyInstanceUID == headers[0].StudyInstanceUID and back.SeriesInstanceUID == series
        rgb = back.pixel_array
        assert rgb.shape == (16, 16, 3)
        # the overlay is where the map is: reddish (R > G) in the middle, grey at the corner
        assert rgb[8, 8, 0] > rgb[8, 8, 1] and rgb[0, 0, 0] == rgb[0, 0, 1] == rgb[0, 0, 2]

    sr = build_sr(result, headers, model, series_instance_uid=generate_uid(), sop_instance_uid=generate_uid(),
                  content_datetime=datetime(2024, 1, 2, 11, 0), key_images=kis)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy(tools, path)
    assert errors == [], "\n".join(errors)
    unknown = [w for w in warnings if not any(p.search(w) for p in KNOWN_WARNINGS)]
    assert unknown == [], "new dciodvfy warnings:\n" + "\n".join(unknown)
    out = subprocess.run([tools.require_tool("dsrdump"), "+Pt", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Region score" in text and '"-7.25"' in text, text
    assert "SCOORD3D" in text and "POINT" in text, text
    assert text.count("(SC image,)") == len(kis), text
    refs = {str(r.ReferencedSOPInstanceUID)
            for e in sr.CurrentRequestedProcedureEvidenceSequence
            for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert {str(k.SOPInstanceUID) for k in kis} <= refs
