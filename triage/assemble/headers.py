"""DICOM headers (no pixel data) -> :class:`InstanceHeader`, and instances grouped by study and series.

Tolerant on purpose: a malformed optional tag becomes None with a note, so one odd tag in one file
cannot lose a study; only a file without SOP class/instance or series UID is refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
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
    frame_index: int | None = None  # the frame of a multi-frame (Enhanced CT) instance this describes

    @property
    def key(self) -> str:
        """What one slice is known by: the SOP instance UID, with the frame for a multi-frame one."""
        if self.frame_index is None:
            return self.sop_instance_uid
        return f"{self.sop_instance_uid}[{self.frame_index}]"

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
    try:  # pydicom converts raw elements when read: a corrupt one raises here (any type)
        sop_class = _text(ds.get("SOPClassUID") or (fm.get("MediaStorageSOPClassUID") if fm else None))
        sop_instance = _text(
            ds.get("SOPInstanceUID") or (fm.get("MediaStorageSOPInstanceUID") if fm else None)
        )
        study = _text(ds.get("StudyInstanceUID"))
        series = _text(ds.get("SeriesInstanceUID"))
        syntax = _text(fm.get("TransferSyntaxUID")) if fm else ""
    except Exception as exc:
        raise VolumeError(f"{path}: corrupt DICOM file ({type(exc).__name__}: {exc})") from None
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
        transfer_syntax_uid=syntax,
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


def read_header_dataset(path: str | os.PathLike[str]) -> tuple[InstanceHeader, Dataset]:
    """:func:`read_header` and the pixel-free dataset it was read from: a caller that needs the
    dataset later (the daemon's report stage: the SR's evidence and patient module) keeps it instead of
    parsing the file a second time."""
    p = Path(path)
    ds = _dcmread(p, pixels=False)
    return _header_from_dataset(ds, p), ds


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


def frame_headers(ds: Dataset, base: InstanceHeader) -> list[InstanceHeader]:
    """One header a frame of a multi-frame (Enhanced CT) instance: position, orientation, pixel
    spacing, thickness and kernel from the per-frame functional groups, else the shared ones
    (PS3.3 C.7.6.16), so each frame goes through the same geometry rules as a single-frame slice."""
    out: list[InstanceHeader] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    for i in range(base.number_of_frames):
        problems = list(base.problems)

        def item(sequence: str, i: int = i, problems: list[str] = problems) -> Dataset | None:
            try:
                if i < len(per_frame) and per_frame[i].get(sequence):
                    return per_frame[i].get(sequence)[0]
                shared = ds.get("SharedFunctionalGroupsSequence")
                if shared and shared[0].get(sequence):
                    return shared[0].get(sequence)[0]
            except Exception as exc:  # a malformed group loses this value, not the instance
                problems.append(f"{sequence} unreadable ({type(exc).__name__})")
            return None

        def floats(it: Dataset | None, keyword: str, n: int) -> tuple[float, ...] | None:
            value = it.get(keyword) if it is not None else None
            if value is None:
                return None
            try:
                vals = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                return None
            return vals if len(vals) == n and all(math.isfinite(v) for v in vals) else None

        pos = floats(item("PlanePositionSequence"), "ImagePositionPatient", 3)
        iop = floats(item("PlaneOrientationSequence"), "ImageOrientationPatient", 6)
        measures = item("PixelMeasuresSequence")
        spacing = floats(measures, "PixelSpacing", 2)
        thick = floats(measures, "SliceThickness", 1)
        recon = item("CTReconstructionSequence")
        kernel = _text(recon.get("ConvolutionKernel")) if recon is not None else ""
        out.append(
            replace(
                base,
                position=pos if pos is not None else base.position,  # type: ignore[arg-type]
                orientation=iop if iop is not None else base.orientation,
                pixel_spacing=spacing if spacing is not None else base.pixel_spacing,  # type: ignore[arg-type]
                slice_thickness=thick[0] if thick else base.slice_thickness,
                kernel=base.kernel or kernel,
                frame_index=i,
                problems=tuple(problems),
            )
        )
    return out


def expand_frames(headers: Iterable[InstanceHeader]) -> list[InstanceHeader]:
    """Headers with every multi-frame instance replaced by one header a frame (re-reading its
    functional groups; no pixel data). A file that cannot be re-read keeps its one header."""
    out: list[InstanceHeader] = []
    for h in headers:
        if h.number_of_frames <= 1 or h.frame_index is not None:
            out.append(h)
            continue
        try:
            out.extend(frame_headers(_dcmread(h.path, pixels=False), h))
        except VolumeError:
            out.append(h)
    return out


def group_studies(headers: Iterable[InstanceHeader]) -> dict[str, dict[str, list[InstanceHeader]]]:
    """{study UID: {series UID: headers}}, the shape :func:`select_series` takes one study of."""
    out: dict[str, dict[str, list[InstanceHeader]]] = {}
    for h in headers:
        out.setdefault(h.study_uid, {}).setdefault(h.series_uid, []).append(h)
    return out
