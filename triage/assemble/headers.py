"""DICOM headers (no pixel data) -> :class:`InstanceHeader`, and instances grouped by study and series.

Tolerant on purpose: a malformed optional tag becomes None with a note, so one odd tag in one file
cannot lose a study; only a file without SOP class/instance or series UID is refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from triage.assemble.common import VolumeError

# --------------------------------------------------------------------------------------------------
# headers


@dataclass(frozen=True)
class InstanceHeader:
    """What selection and geometry need from one file (no pixel data); ``problems`` lists bad tags."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    modality: str = ""
    image_type: tuple[str, ...] = ()
    body_part: str = ""
    study_description: str = ""
    series_description: str = ""
    protocol_name: str = ""
    kernel: str = ""
    slice_thickness: float | None = None
    pixel_spacing: tuple[float, float] | None = None  # (between rows, between columns) in mm
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient, 6 direction cosines
    position: tuple[float, float, float] | None = None  # ImagePositionPatient (LPS, mm)
    rows: int | None = None
    columns: int | None = None
    instance_number: int | None = None
    number_of_frames: int = 1
    transfer_syntax_uid: str = ""
    frame_of_reference_uid: str = ""
    gantry_tilt: float | None = None
    problems: tuple[str, ...] = ()

    @property
    def normal(self) -> np.ndarray | None:
        """Unit slice normal row x column, or None without a usable orientation."""
        if self.orientation is None:
            return None
        return _normal(self.orientation)


def _normal(iop: Sequence[float]) -> np.ndarray | None:
    r = np.asarray(iop[:3], dtype=float)
    c = np.asarray(iop[3:6], dtype=float)
    n = np.cross(r, c)
    norm = float(np.linalg.norm(n))
    return None if norm < 1e-6 else n / norm


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _header_from_dataset(ds: Dataset, path: Path) -> InstanceHeader:
    problems: list[str] = []

    def get(keyword: str, convert: Any, expected: int | None = None) -> Any:
        try:
            value = ds.get(keyword)
            if value is None or value == "":
                return None
            if expected is not None:
                items = (
                    list(value) if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value]
                )
                if len(items) != expected:
                    problems.append(f"{keyword} has {len(items)} values, expected {expected}")
                    return None
                out = tuple(convert(v) for v in items)
                if not all(math.isfinite(v) for v in out):
                    problems.append(f"{keyword} is not finite")
                    return None
                return out
            return convert(value)
        except Exception as exc:  # a malformed optional tag must not lose the whole instance
            problems.append(f"{keyword} unreadable ({type(exc).__name__}: {exc})")
            return None

    fm = getattr(ds, "file_meta", None)
    sop_class = _text(ds.get("SOPClassUID") or (fm.get("MediaStorageSOPClassUID") if fm else None))
    sop_instance = _text(ds.get("SOPInstanceUID") or (fm.get("MediaStorageSOPInstanceUID") if fm else None))
    study = _text(ds.get("StudyInstanceUID"))
    series = _text(ds.get("SeriesInstanceUID"))
    missing = [
        k
        for k, v in (
            ("SOPClassUID", sop_class),
            ("SOPInstanceUID", sop_instance),
            ("SeriesInstanceUID", series),
        )
        if not v
    ]
    if missing:
        raise VolumeError(f"{path}: not a DICOM instance this can use: no {', '.join(missing)}")
    image_type = get(
        "ImageType",
        lambda v: (
            tuple(str(x).strip().upper() for x in v)
            if not isinstance(v, str)
            else tuple(p.strip().upper() for p in v.split("\\"))
        ),
    )
    frames = get("NumberOfFrames", int)
    return InstanceHeader(
        path=Path(path),
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        study_uid=study,
        series_uid=series,
        modality=(get("Modality", _text) or "").upper(),
        image_type=image_type or (),
        body_part=get("BodyPartExamined", _text) or "",
        study_description=get("StudyDescription", _text) or "",
        series_description=get("SeriesDescription", _text) or "",
        protocol_name=get("ProtocolName", _text) or "",
        kernel=get("ConvolutionKernel", _text) or "",
        slice_thickness=get("SliceThickness", float),
        pixel_spacing=get("PixelSpacing", float, 2),
        orientation=get("ImageOrientationPatient", float, 6),
        position=get("ImagePositionPatient", float, 3),
        rows=get("Rows", int),
        columns=get("Columns", int),
        instance_number=get("InstanceNumber", int),
        number_of_frames=frames if frames and frames > 0 else 1,
        transfer_syntax_uid=_text(fm.get("TransferSyntaxUID")) if fm else "",
        frame_of_reference_uid=get("FrameOfReferenceUID", _text) or "",
        gantry_tilt=get("GantryDetectorTilt", float),
        problems=tuple(problems),
    )


def _dcmread(path: Path, *, pixels: bool) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels, force=True)
    except FileNotFoundError:
        raise VolumeError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise VolumeError(f"{path}: is a folder, not a DICOM file") from None
    except OSError as exc:
        raise VolumeError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except InvalidDicomError as exc:
        raise VolumeError(f"{path}: not a DICOM file: {exc}") from None
    except Exception as exc:  # truncated or corrupt files raise many kinds of errors inside pydicom
        raise VolumeError(f"{path}: corrupt DICOM file ({type(exc).__name__}: {exc})") from None


def read_header(path: str | os.PathLike[str]) -> InstanceHeader:
    """Read one file's header (no pixel data). Tolerant: malformed optional tags become None with a
    note in ``problems``; an unreadable file, or one without SOP class/instance or series UID,
    raises :class:`VolumeError` naming the file and the reason."""
    p = Path(path)
    return _header_from_dataset(_dcmread(p, pixels=False), p)


def read_headers(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[InstanceHeader], dict[Path, str]]:
    """Headers of many files; a file that cannot be read is reported, not raised (one bad file in a
    folder must not lose the study)."""
    headers: list[InstanceHeader] = []
    errors: dict[Path, str] = {}
    for raw in paths:
        try:
            headers.append(read_header(raw))
        except VolumeError as exc:
            errors[Path(raw)] = exc.reason
    return headers, errors


def group_studies(headers: Iterable[InstanceHeader]) -> dict[str, dict[str, list[InstanceHeader]]]:
    """{study UID: {series UID: headers}}, the shape :func:`select_series` takes one study of."""
    out: dict[str, dict[str, list[InstanceHeader]]] = {}
    for h in headers:
        out.setdefault(h.study_uid, {}).setdefault(h.series_uid, []).append(h)
    return out
