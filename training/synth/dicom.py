"""DICOM datasets of the synthetic studies: study/series identity, CT image headers, pixels, saving.

Why apart: every series writer (primary, distractors, patterns) builds its files through these few
functions, so header conventions (UIDs from the seed, rescale, vendor habits) stay in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from training.synth.basics import _RESCALE_INTERCEPT, _UID_PREFIX, CT_IMAGE_STORAGE
from training.synth.ljpeg import compress_sv1
from training.synth.vendors import _Vendor


@dataclass
class _Study:
    token: int
    vendor: _Vendor
    manufacturer: str
    model: str
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    study_uid: str
    study_date: str
    study_time: str
    accession: str
    description: str
    body_part: str | None  # None: BodyPartExamined absent (pattern no_head_words)
    frame_uid: str
    station: str
    kvp: float
    signed: bool
    uid_salt: str = ""  # SynthOptions.uid_salt: new UIDs for the same content


@dataclass
class _Series:
    role: str
    uid: str
    number: int
    description: str
    kernel: str
    image_type: list[str]
    window: tuple[float, float]
    folder: Path
    count: int = 0


def _uid(study: _Study, *parts: object) -> str:
    srcs = [str(study.token), *map(str, parts)]
    if study.uid_salt:
        srcs.append(study.uid_salt)
    return generate_uid(prefix=_UID_PREFIX, entropy_srcs=srcs)


def _new_dataset(study: _Study, series: _Series, sop_class: str, instance: int) -> Dataset:
    sop_uid = _uid(study, series.role, series.number, "sop", instance)
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "GLOWTRIAGE_SYN"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = study.study_time
    ds.AccessionNumber = study.accession
    ds.Modality = "CT"
    ds.Manufacturer = study.manufacturer
    ds.ManufacturerModelName = study.model
    ds.InstitutionName = "SYNTHETIC GENERAL HOSPITAL"
    ds.StationName = study.station
    ds.ReferringPhysicianName = "SYNTH^REFERRER"
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.PatientAge = study.age
    if study.body_part is not None:
        ds.BodyPartExamined = study.body_part
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series.uid
    ds.StudyID = study.accession[-6:]
    ds.SeriesNumber = series.number
    ds.InstanceNumber = instance
    ds.ImageType = list(series.image_type)
    return ds


def _set_pixels(ds: Dataset, raw: np.ndarray, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(raw.shape[0]), int(raw.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept = _RESCALE_INTERCEPT
    ds.RescaleSlope = 1.0
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(raw.astype("<i2" if signed else "<u2")).tobytes()


def _ct_image(
    study: _Study,
    series: _Series,
    *,
    instance: int,
    raw: np.ndarray,
    ipp: list[float],
    iop: list[float],
    ps: tuple[float, float],
    thickness: float,
    spacing: float | None,
    tilt: float,
    slice_location: float,
) -> Dataset:
    ds = _new_dataset(study, series, CT_IMAGE_STORAGE, instance)
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = study.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = 1
    ds.ImagePositionPatient = ipp
    ds.ImageOrientationPatient = iop
    ds.PixelSpacing = [float(ps[0]), float(ps[1])]
    ds.SliceThickness = float(thickness)
    if spacing is not None and study.vendor.spacing_between_slices:
        ds.SpacingBetweenSlices = float(spacing)
    ds.SliceLocation = round(float(slice_location), 4) + 0.0
    ds.KVP = study.kvp
    ds.ConvolutionKernel = series.kernel
    ds.GantryDetectorTilt = float(tilt)
    ds.ReconstructionDiameter = round(float(ps[1]) * raw.shape[1], 3)
    ds.DataCollectionDiameter = 500.0
    ds.XRayTubeCurrent = 280
    ds.ExposureTime = 1000
    ds.RotationDirection = "CW"
    ds.ScanOptions = "AXIAL MODE" if study.vendor.key in ("ge", "canon") else "HELICAL MODE"
    ds.ProtocolName = study.description
    ds.WindowCenter = series.window[0]
    ds.WindowWidth = series.window[1]
    _set_pixels(ds, raw, study.signed)
    return ds


def _save(ds: Dataset, series: _Series, name: int, syntax: str = ExplicitVRLittleEndian) -> None:
    if syntax == JPEGLosslessSV1:
        compress_sv1(ds)  # no encoder in pydicom for this one (see ljpeg.py)
    elif syntax != ExplicitVRLittleEndian:
        # Lossless, and keep the SOP Instance UID: it is part of the reproducible ground truth.
        ds.compress(syntax, generate_instance_uid=False)
    series.folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(series.folder / f"{name}.dcm", enforce_file_format=True)
    series.count += 1


def _available_syntaxes(preferred: tuple[str, ...]) -> list[str]:
    """Lossless encoders present here, in ``preferred`` order (RLE and JPEG Lossless SV1 need only numpy)."""
    from pydicom.pixels.encoders import (
        JPEG2000LosslessEncoder,
        JPEGLSLosslessEncoder,
        RLELosslessEncoder,
    )

    enc = {RLELossless: RLELosslessEncoder, JPEG2000Lossless: JPEG2000LosslessEncoder,
           JPEGLSLossless: JPEGLSLosslessEncoder}  # fmt: skip
    out = [s for s in preferred if s == JPEGLosslessSV1 or (s in enc and enc[s].is_available)]
    return out or [RLELossless]
