"""Series selection and volume building: DICOM files of one study -> the 32x128x128 7-bit volume.

One code path for the daemon and for training (``training/data.py`` calls it too), so the volumes a
model was trained on and the volumes it scores can never disagree. Nothing here knows about the
store: the inputs are file paths and the headers read from them.

Selection (:func:`select_series`)
    Every series of a study is described from its headers and either rejected with a recorded reason
    or ranked. The checks, in order: image storage SOP class (CT Image; Enhanced CT multi-frame is
    rejected with a reason), modality, ImageType (all of ``required_image_type``, none of
    ``rejected_image_type``), head (BodyPartExamined, SeriesDescription or ProtocolName match
    ``head_patterns``; with no body part, a StudyDescription that matches is enough), slice
    thickness range, geometry present, orientation (slice normal within ``max_tilt_deg`` of the patient
    z axis), coverage along the normal. Candidates are ranked by kernel (soft, then unknown, then
    sharp), then slice thickness closest to 4-5 mm, then more coverage, then series UID, so the result
    is deterministic. A series whose instances have more than one orientation keeps its largest
    orientation group (the other instances are ignored with a warning); equal-sized groups are
    ambiguous and the series is rejected. :func:`build_volume` applies the same rule, so it can be
    handed all of a series' files.

Entry points
    :func:`assemble_study` (select, build, fall back to the next candidate when the best one cannot
    be built) is the path the daemon and training take; :func:`read_headers` and
    :func:`group_studies` turn a folder's files into its input. :func:`save_volume` /
    :func:`load_volume` keep volumes as .npz with JSON metadata and ``PREPROCESSING_VERSION``, so a
    cache built by an older version is recognised and rebuilt.

Pixels (why pydicom, not SimpleITK's ImageSeriesReader)
    Every file is decoded with pydicom (pylibjpeg and pyjpegls plug-ins: RLE, JPEG lossless,
    JPEG-LS and JPEG 2000 decode) and rescaled to HU with *its own* RescaleSlope/Intercept, after
    mapping PixelPaddingValue (and PixelPaddingRangeLimit) to air. ImageSeriesReader (GDCM) would
    sort the files by its own rules, take the geometry of the first file and the distance between
    positions as an orthogonal spacing (which silently shears a gantry-tilted series), and its errors
    do not say which file was bad. The unit tests check that SimpleITK/GDCM reads the same HU from
    the same files, compressed or not. Values below -1024 HU (out-of-FOV fill such as -2000 or
    -3024) are set to -1024 before any filtering, so they cannot darken the edge of the head.

Ordering and spacing
    Slices are ordered by ImagePositionPatient projected on the slice normal (row x column of
    ImageOrientationPatient), never by InstanceNumber. Two instances at one position are rejected.
    Consecutive steps must equal the median step within 10%; a step that is an integer multiple of it
    is a missing slice, rejected with both neighbours' positions named, or, with
    ``interpolate_gaps = true`` and at most ``max_gap_slices`` missing, filled by linear interpolation
    with a warning. Anything else is irregular spacing and rejected.

Geometry and gantry tilt
    With the slices uniform, the voxel (column k, row j, slice f) sits at
    ``P0 + k*dc*row + j*dr*col + f*step`` where ``step`` is the vector between consecutive
    positions. For a gantry-tilted acquisition ``step`` (table motion, along z) is not parallel to
    the slice normal: the grid is sheared. That map is affine and exact for any tilt, so every voxel
    of the output grid is mapped through its inverse into the source stack and sampled with trilinear
    interpolation (SimpleITK Resample with an AffineTransform). The output is a true axial grid in
    patient coordinates (LPS) whatever the tilt.

The canonical grid (fixed in physical units, so a voxel means the same tissue in every study)
    ``data[z, y, x]``, shape ``TARGET_SHAPE = (32, 128, 128)``.

    * x: increasing index towards the patient's left (+X in DICOM LPS); y: towards posterior (+Y),
      so a slice displays like a radiological axial image. z: index 0 is the most superior slice,
      increasing index goes inferiorly (-Z): the grid is anchored at the vertex.
    * In plane: a fixed 220 mm square field of view (the paper's 512 matrix at 0.43 mm), 128 pixels
      of 1.71875 mm, centred on the centroid of the head in the axial plane, so the position on the
      table does not matter.
    * z: 32 slices of 4.5 mm (144 mm: vertex to skull base in adults). The superior edge of slice 0
      lies ``VERTEX_MARGIN_MM`` (2 mm) above the vertex, the most superior point of the head.
    * The head is the largest connected component of tissue (> -500 HU) after a morphological
      opening of 2 pixels in plane (on a coarse axial grid of the whole acquisition), so the table,
      head holder and cables do not pull the centroid or the vertex; the centroid is taken over the
      144 mm that the grid covers.
    * The vertex is not the highest voxel above a threshold, which moves by up to a slice with the
      phase of 4-5 mm slices against the skull (the same head scanned twice would be anchored
      differently). Near the top the head is a dome, so the tissue volume above height z grows as
      (vertex - z)^2: a line fitted to its square root 4-24 mm below the highest tissue and
      extrapolated to zero gives a vertex reproducible to a few tenths of a millimetre whatever the
      slice phase or gantry tilt.
    * Voxels outside the acquired slab are air (-1024 HU, 0 after windowing). ``coverage_mm`` is the
      length of the grid's z extent that the acquisition covers on the vertical line through the head
      centroid; below ``min_coverage_mm`` the volume is rejected.

Resampling
    Done in HU. Before downsampling, a Gaussian with sigma = (factor - 1) / 2 source pixels per axis
    (factor = output spacing / source spacing; scikit-image's anti-aliasing rule) removes the
    frequencies the 1.72 mm grid cannot represent (0.45 mm pixels would otherwise alias skull edges
    into speckle); axes that are not downsampled are not smoothed. A Gaussian rather than block
    averaging because the factor is rarely an integer (0.43-0.49 mm pixels onto 1.71875 mm), and a
    block average would need a second interpolation anyway. Then trilinear interpolation onto the
    grid, then the paper's window :func:`window_7bit`: ``clip(rint(HU) + 14, 0, 127)`` (brain window
    [-14, 113] HU in 128 levels).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from triage.config import AssemblySettings
from triage.ops.logs import get_logger

PREPROCESSING_VERSION = "assemble-1"  # bump whenever a change here can change a voxel
TARGET_SHAPE: tuple[int, int, int] = (32, 128, 128)  # (z, y, x)
FOV_MM = 220.0
SLICE_MM = 4.5
PIXEL_MM = FOV_MM / TARGET_SHAPE[2]  # 1.71875
VERTEX_MARGIN_MM = 2.0
TISSUE_HU = -500.0
AIR_HU = -1024.0
WINDOW_OFFSET = 14  # the paper: clip(rint(HU) + 14, 0, 127)
WINDOW_MAX = 127
SPACING_TOLERANCE = 0.10  # relative deviation of a step from the median step
ORIENTATION_TOLERANCE = 0.01  # max abs difference of direction cosines within one orientation group
DUPLICATE_MM = 0.01  # two slices closer than this along the normal are at one position
MASK_Z_MM = 2.25  # z spacing of the coarse grid on which the head is found

NOT_PREFERRED = "not_preferred"  # category of an acceptable series ranked below the chosen one
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")

log = get_logger("assemble")


class VolumeError(Exception):
    """A series or file that cannot become a volume; the message names the series or file and why.

    ``category`` is a short name from a closed set (``invalid``, ``decode``, ``not_ct``, ``geometry``,
    ``tilt``, ``duplicate``, ``missing_slices``, ``too_few_slices``, ``not_head``, ``coverage``) for
    metric labels, where the message with its UIDs and positions would be unbounded.
    """

    def __init__(self, reason: str, category: str = "invalid"):
        self.reason = reason
        self.category = category
        super().__init__(reason)


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


# --------------------------------------------------------------------------------------------------
# series description


@dataclass(frozen=True)
class OrientationGroup:
    """Instances of one series that share an orientation (direction cosines within 0.01)."""

    orientation: tuple[float, ...]
    normal: tuple[float, float, float]
    headers: tuple[InstanceHeader, ...]

    @property
    def tilt_deg(self) -> float:
        """Angle between the slice normal and the patient z axis (0 for a plain axial slice)."""
        return math.degrees(math.acos(min(1.0, abs(self.normal[2]))))

    @property
    def label(self) -> str:
        return _orientation_label(self.normal)


def _orientation_label(n: Sequence[float]) -> str:
    a = np.abs(np.asarray(n, dtype=float))
    axis = int(np.argmax(a))
    if a[axis] < math.cos(math.radians(45)) + 1e-9 and sorted(a)[-2] > 0.5:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _orientation_groups(headers: Iterable[InstanceHeader]) -> list[OrientationGroup]:
    """Group by orientation, largest group first (ties: the more axial first, then first seen)."""
    groups: list[tuple[np.ndarray, list[InstanceHeader]]] = []
    for h in headers:
        if h.orientation is None or h.normal is None:
            continue
        v = np.asarray(h.orientation, dtype=float)
        for ref, members in groups:
            if np.max(np.abs(ref - v)) <= ORIENTATION_TOLERANCE:
                members.append(h)
                break
        else:
            groups.append((v, [h]))
    out = []
    for ref, members in groups:
        n = _normal(ref)
        assert n is not None
        out.append(OrientationGroup(tuple(float(x) for x in ref), tuple(float(x) for x in n), tuple(members)))
    out.sort(key=lambda g: (-len(g.headers), g.tilt_deg))
    return out


def _main_group(groups: list[OrientationGroup], series_uid: str) -> tuple[OrientationGroup, list[str]]:
    """The orientation group a series is built from, and the warnings that choice implies."""
    if not groups:
        raise VolumeError(
            f"series {series_uid}: no instance has a usable ImageOrientationPatient", "geometry"
        )
    main = groups[0]
    if len(groups) == 1:
        return main, []
    if len(groups[1].headers) == len(main.headers):
        sizes = ", ".join(f"{len(g.headers)} {g.label}" for g in groups)
        raise VolumeError(
            f"series {series_uid}: {len(groups)} orientations of equal size ({sizes}); "
            "cannot tell which is the scan",
            "geometry",
        )
    ignored = sum(len(g.headers) for g in groups[1:])
    others = ", ".join(f"{len(g.headers)} {g.label}" for g in groups[1:])
    return main, [
        f"series {series_uid} has {len(groups)} orientations: used the {len(main.headers)} {main.label} "
        f"instances, ignored {ignored} ({others})"
    ]


@dataclass(frozen=True)
class SeriesInfo:
    """A series as far as the headers tell: what selection ranks and what a rejection reason quotes."""

    series_uid: str
    study_uid: str
    n_instances: int
    modality: str
    sop_class_uids: tuple[str, ...]
    image_type: tuple[str, ...]  # the most common ImageType of the instances
    image_type_values: frozenset[str]  # every value that occurs in any instance's ImageType
    body_part: str
    study_description: str
    series_description: str
    protocol_name: str
    kernel: str
    slice_thickness: float | None  # median SliceThickness, else the median step between slices
    pixel_spacing: tuple[float, float] | None
    matrix: tuple[int, int] | None  # (rows, columns) when all instances agree
    orientations: tuple[OrientationGroup, ...]  # largest first
    orientation: str  # axial / coronal / sagittal / oblique / mixed / none (the largest group's)
    tilt_deg: float | None  # of the largest orientation group
    slice_spacing: float | None  # median step along the normal, largest group
    coverage_mm: float  # centre-to-centre extent along the normal, largest group
    n_frames: int  # the largest NumberOfFrames (1 for single-frame images)
    missing_geometry: int  # instances without position, orientation or pixel spacing
    problems: tuple[str, ...]


def _most_common(values: Iterable[Any], default: Any) -> Any:
    counts = Counter(v for v in values if v not in (None, "", ()))
    return counts.most_common(1)[0][0] if counts else default


def describe_series(headers: Sequence[InstanceHeader]) -> SeriesInfo:
    """Summarise one series' headers (all from the same SeriesInstanceUID)."""
    if not headers:
        raise VolumeError("describe_series: no instances")
    hs = list(headers)
    groups = _orientation_groups(hs)
    main = groups[0] if groups else None
    positions = []
    if main is not None:
        n = np.asarray(main.normal)
        positions = sorted(float(np.dot(h.position, n)) for h in main.headers if h.position is not None)
    steps = np.diff(np.unique(np.round(positions, 3))) if len(positions) > 1 else np.array([])
    spacing = float(np.median(steps)) if steps.size else None
    thick = [h.slice_thickness for h in hs if h.slice_thickness and h.slice_thickness > 0]
    matrices = {(h.rows, h.columns) for h in hs if h.rows and h.columns}
    if len(groups) > 1:
        label = "mixed" if len(groups[1].headers) == len(groups[0].headers) else groups[0].label
    else:
        label = main.label if main else "none"
    problems = sorted({f"{p}" for h in hs for p in h.problems})
    return SeriesInfo(
        series_uid=hs[0].series_uid,
        study_uid=hs[0].study_uid,
        n_instances=len({h.sop_instance_uid for h in hs}),
        modality=_most_common((h.modality for h in hs), ""),
        sop_class_uids=tuple(sorted({h.sop_class_uid for h in hs})),
        image_type=_most_common((h.image_type for h in hs), ()),
        image_type_values=frozenset(v for h in hs for v in h.image_type),
        body_part=_most_common((h.body_part for h in hs), ""),
        study_description=_most_common((h.study_description for h in hs), ""),
        series_description=_most_common((h.series_description for h in hs), ""),
        protocol_name=_most_common((h.protocol_name for h in hs), ""),
        kernel=_most_common((h.kernel for h in hs), ""),
        slice_thickness=float(np.median(thick)) if thick else spacing,
        pixel_spacing=_most_common((h.pixel_spacing for h in hs), None),
        matrix=next(iter(matrices)) if len(matrices) == 1 else None,
        orientations=tuple(groups),
        orientation=label,
        tilt_deg=main.tilt_deg if main else None,
        slice_spacing=spacing,
        coverage_mm=(positions[-1] - positions[0]) if len(positions) > 1 else 0.0,
        n_frames=max(h.number_of_frames for h in hs),
        missing_geometry=sum(
            1 for h in hs if h.position is None or h.orientation is None or h.pixel_spacing is None
        ),
        problems=tuple(problems),
    )


# --------------------------------------------------------------------------------------------------
# selection


def _matches(text: str, patterns: Iterable[str]) -> str | None:
    up = text.upper()
    for p in patterns:
        if p and p.upper() in up:
            return p
    return None


def kernel_class(info: SeriesInfo, rules: AssemblySettings) -> str:
    """'soft', 'sharp' or 'unknown' from ConvolutionKernel, else from the series description.

    Sharp wins when both match: a bone-kernel series scored as brain would be out of distribution.
    """
    for text in (info.kernel, info.series_description):
        if not text:
            continue
        if _matches(text, rules.sharp_kernel_patterns):
            return "sharp"
        if _matches(text, rules.soft_kernel_patterns):
            return "soft"
    return "unknown"


def _is_head(info: SeriesInfo, rules: AssemblySettings) -> bool:
    for text in (info.body_part, info.series_description, info.protocol_name):
        if text and _matches(text, rules.head_patterns):
            return True
    if info.body_part:
        return False  # a body part that is not the head outranks a study description that mentions it
    return bool(_matches(info.study_description, rules.head_patterns))


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def rejection(info: SeriesInfo, rules: AssemblySettings) -> tuple[str, str] | None:
    """``(category, reason)`` when a series cannot be the scored one, None when it is a candidate.

    The category is one of a small closed set (``not_ct``, ``image_type``, ``not_head``,
    ``slice_thickness``, ``geometry``, ``tilt``, ``coverage``; the names :mod:`triage.ops.metrics` counts
    by), for labels; the reason is the full sentence, for people.
    """
    classes = set(info.sop_class_uids)
    if classes & set(ENHANCED_CT_STORAGE):
        return "not_ct", "Enhanced CT (multi-frame) images are not supported; export as CT Image Storage"
    if classes != {CT_IMAGE_STORAGE}:
        other = sorted(classes - {CT_IMAGE_STORAGE})
        return "not_ct", f"SOP class {', '.join(_sop_class_name(c) for c in other)} is not CT Image Storage"
    if info.n_frames > 1:
        return "not_ct", f"multi-frame CT image ({info.n_frames} frames) is not supported"
    allowed = [m.upper() for m in rules.modalities]
    if info.modality not in allowed:
        return "not_ct", f"modality {info.modality or '(none)'} is not one of {allowed}"
    shown = "\\".join(info.image_type) or "(none)"
    bad = [v for v in rules.rejected_image_type if v.upper() in info.image_type_values]
    if bad:
        return "image_type", f"ImageType {shown} contains {'/'.join(bad)}"
    lacking = [v for v in rules.required_image_type if v.upper() not in info.image_type_values]
    if lacking:
        return "image_type", f"ImageType {shown} lacks {'/'.join(lacking)}"
    if not _is_head(info, rules):
        seen = ", ".join(
            f"{k} {v!r}"
            for k, v in (
                ("BodyPartExamined", info.body_part),
                ("SeriesDescription", info.series_description),
                ("ProtocolName", info.protocol_name),
                ("StudyDescription", info.study_description),
            )
            if v
        )
        what = seen or "no body part or description"
        return "not_head", f"not a head series: {what} match none of head_patterns"
    if info.slice_thickness is None:
        return "slice_thickness", "no SliceThickness and no slice positions to derive it from"
    lo, hi = rules.min_slice_thickness_mm, rules.max_slice_thickness_mm
    if not lo <= info.slice_thickness <= hi:
        return "slice_thickness", f"slice thickness {info.slice_thickness:g} mm outside [{lo:g}, {hi:g}] mm"
    if info.missing_geometry:
        return "geometry", (
            f"{info.missing_geometry} of {info.n_instances} instances lack ImagePositionPatient, "
            "ImageOrientationPatient or PixelSpacing"
        )
    try:
        main, _ = _main_group(list(info.orientations), info.series_uid)
    except VolumeError as exc:
        return exc.category, exc.reason.split(": ", 1)[1]
    if main.tilt_deg > rules.max_tilt_deg:
        return "tilt", (
            f"orientation {main.label}: slice normal {main.tilt_deg:.1f} deg from the patient z axis "
            f"(max_tilt_deg {rules.max_tilt_deg:g})"
        )
    if info.matrix is None:
        return "geometry", "instances differ in Rows/Columns"
    if info.coverage_mm < rules.min_coverage_mm:
        return "coverage", (
            f"coverage {info.coverage_mm:.1f} mm along the slice normal is below min_coverage_mm "
            f"{rules.min_coverage_mm:g}"
        )
    return None


def rejection_reason(info: SeriesInfo, rules: AssemblySettings) -> str | None:
    """Why a series cannot be the scored one (the sentence of :func:`rejection`), or None."""
    found = rejection(info, rules)
    return None if found is None else found[1]


def _thickness_distance(t: float) -> float:
    return 0.0 if 4.0 <= t <= 5.0 else min(abs(t - 4.0), abs(t - 5.0))


@dataclass
class SelectionResult:
    """Which series of a study to score, and why each other series was not chosen.

    ``candidates`` lists every acceptable series best first (``chosen`` is the first): when
    :func:`build_volume` rejects the chosen one (a missing slice, say), a caller may try the next.
    """

    chosen: str | None
    skipped: dict[str, str]
    reason: str | None = None  # why nothing was chosen
    candidates: list[str] = field(default_factory=list)
    instances: list[InstanceHeader] = field(default_factory=list)  # the chosen series' usable instances
    warnings: list[str] = field(default_factory=list)
    series: dict[str, SeriesInfo] = field(default_factory=dict)
    categories: dict[str, str] = field(default_factory=dict)  # skipped series -> short category


def _summary(info: SeriesInfo, rules: AssemblySettings) -> str:
    klass = kernel_class(info, rules)
    kernel = f"{klass} kernel {info.kernel!r}" if info.kernel else f"{klass} kernel"
    return f"{kernel}, {info.slice_thickness:g} mm, {info.coverage_mm:.0f} mm coverage"


def _ranked_below(chosen: SeriesInfo, other: SeriesInfo, rules: AssemblySettings) -> str:
    return (
        f"candidate ranked below {chosen.series_uid} ({_summary(chosen, rules)}; "
        f"this one: {_summary(other, rules)})"
    )


def select_series(
    series: Mapping[str, Sequence[InstanceHeader]], rules: AssemblySettings | None = None
) -> SelectionResult:
    """Choose the axial soft-tissue head-CT series of one study; every other series gets a reason."""
    rules = rules or AssemblySettings()
    skipped: dict[str, str] = {}
    categories: dict[str, str] = {}
    infos: dict[str, SeriesInfo] = {}
    ranked: list[tuple[tuple[Any, ...], str]] = []
    for uid in sorted(series):
        headers = list(series[uid])
        if not headers:
            categories[uid], skipped[uid] = "invalid", "no instances"
            continue
        info = describe_series(headers)
        infos[uid] = info
        found = rejection(info, rules)
        if found:
            categories[uid], skipped[uid] = found
            continue
        klass = kernel_class(info, rules)
        assert info.slice_thickness is not None
        key = (
            {"soft": 0, "unknown": 1, "sharp": 2}[klass],
            round(_thickness_distance(info.slice_thickness), 3),
            -round(info.coverage_mm, 1),
            uid,
        )
        ranked.append((key, uid))
    ranked.sort()
    if not ranked:
        detail = "; ".join(f"{uid}: {why}" for uid, why in skipped.items()) or "the study has no series"
        return SelectionResult(
            chosen=None,
            skipped=skipped,
            reason=f"no axial head-CT series qualifies ({detail})",
            series=infos,
            categories=categories,
        )
    chosen = ranked[0][1]
    for _, uid in ranked[1:]:
        categories[uid], skipped[uid] = NOT_PREFERRED, _ranked_below(infos[chosen], infos[uid], rules)
    main, warnings = _main_group(list(infos[chosen].orientations), chosen)
    return SelectionResult(
        chosen=chosen,
        skipped=skipped,
        candidates=[uid for _, uid in ranked],
        instances=list(main.headers),
        warnings=warnings,
        series=infos,
        categories=categories,
    )


# --------------------------------------------------------------------------------------------------
# pixels


def window_7bit(hu: np.ndarray) -> np.ndarray:
    """The paper's brain window: ``clip(rint(HU) + 14, 0, 127)`` as uint8 (-14 HU -> 0, 113 -> 127)."""
    return np.clip(np.rint(hu) + WINDOW_OFFSET, 0, WINDOW_MAX).astype(np.uint8)


def _hu_from_dataset(ds: Dataset, path: Path) -> np.ndarray:
    """Stored values -> HU for one single-frame slice, padding -> air (float32, rows x columns)."""
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeError(f"{path}: SamplesPerPixel {ds.SamplesPerPixel} (a colour image, not CT)", "not_ct")
    if "PixelData" not in ds:
        raise VolumeError(f"{path}: no pixel data", "invalid")
    try:
        stored = ds.pixel_array
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise VolumeError(
            f"{path}: cannot decode pixel data (transfer syntax {_sop_class_name(str(ts))}): "
            f"{type(exc).__name__}: {exc}",
            "decode",
        ) from None
    if stored.ndim != 2:
        raise VolumeError(f"{path}: pixel data has shape {stored.shape}, expected one 2-D frame", "geometry")
    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{path}: unreadable RescaleSlope/RescaleIntercept ({exc})") from None
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        pad = _as_stored(int(padding), ds)
        limit = ds.get("PixelPaddingRangeLimit")
        if limit is not None:
            lo, hi = sorted((pad, _as_stored(int(limit), ds)))
            mask = (stored >= lo) & (stored <= hi)
        else:
            mask = stored == pad
        hu[mask] = AIR_HU
    np.maximum(hu, AIR_HU, out=hu)
    return hu


def _as_stored(value: int, ds: Dataset) -> int:
    """A padding value as the pixel array holds it (a signed image with the value written unsigned)."""
    bits = int(ds.get("BitsAllocated", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1 and value >= 2 ** (bits - 1):
        return value - 2**bits
    return value


def read_slice_hu(path: str | os.PathLike[str]) -> tuple[InstanceHeader, np.ndarray]:
    """One file's header and its pixels in HU (float32; padding and values below -1024 -> -1024)."""
    p = Path(path)
    ds = _dcmread(p, pixels=True)
    return _header_from_dataset(ds, p), _hu_from_dataset(ds, p)


# --------------------------------------------------------------------------------------------------
# volume


@dataclass
class AssembledVolume:
    """The canonical 7-bit volume and what it was made from.

    ``grid`` holds ``origin`` (LPS mm of the centre of voxel data[0, 0, 0]), ``spacing`` (x, y, z),
    ``direction`` (3x3 row-major, columns are the x, y, z index axes; ITK's convention), ``shape``
    (z, y, x), the head centroid and the vertex used to place it.
    """

    data: np.ndarray  # uint8, TARGET_SHAPE, data[z, y, x]
    hu_stats: dict[str, float]
    source_geometry: dict[str, Any]
    grid: dict[str, Any]
    coverage_mm: float
    warnings: list[str]
    zero_fraction: float
    study_uid: str = ""
    series_uid: str = ""
    sop_instance_uids: list[str] = field(default_factory=list)  # the slices used, in z order
    preprocessing_version: str = PREPROCESSING_VERSION

    def index_to_patient(self, index_zyx: Sequence[float]) -> np.ndarray:
        """Continuous voxel index (z, y, x) -> patient coordinates (LPS mm)."""
        z, y, x = index_zyx
        d = np.asarray(self.grid["direction"], dtype=float).reshape(3, 3)
        sp = np.asarray(self.grid["spacing"], dtype=float)
        return np.asarray(self.grid["origin"], dtype=float) + d @ (sp * np.array([x, y, z], dtype=float))

    def patient_to_index(self, point: Sequence[float]) -> np.ndarray:
        """Patient coordinates (LPS mm) -> continuous voxel index (z, y, x)."""
        d = np.asarray(self.grid["direction"], dtype=float).reshape(3, 3)
        sp = np.asarray(self.grid["spacing"], dtype=float)
        xyz = np.linalg.solve(d, np.asarray(point, dtype=float) - np.asarray(self.grid["origin"])) / sp
        return xyz[::-1].copy()

    def metadata(self) -> dict[str, Any]:
        return {
            "preprocessing_version": self.preprocessing_version,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "sop_instance_uids": self.sop_instance_uids,
            "hu_stats": self.hu_stats,
            "source_geometry": self.source_geometry,
            "grid": self.grid,
            "coverage_mm": self.coverage_mm,
            "warnings": self.warnings,
            "zero_fraction": self.zero_fraction,
        }


@dataclass
class _Slice:
    header: InstanceHeader
    ds: Dataset
    s: float = 0.0  # position along the normal


def _read_series(paths: Sequence[os.PathLike[str] | str]) -> list[_Slice]:
    out: list[_Slice] = []
    seen: set[str] = set()
    for raw in paths:
        p = Path(raw)
        ds = _dcmread(p, pixels=True)
        h = _header_from_dataset(ds, p)
        if h.sop_instance_uid in seen:  # the same instance twice (re-sent): not a conflict
            continue
        seen.add(h.sop_instance_uid)
        out.append(_Slice(h, ds))
    return out


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.1f}" for x in v) + ")"


def build_volume(
    paths: Sequence[os.PathLike[str] | str], rules: AssemblySettings | None = None
) -> AssembledVolume:
    """Build the canonical volume from the files of one series (any order); see the module docstring.

    Raises :class:`VolumeError` naming the series (or file) and what was wrong.
    """
    rules = rules or AssemblySettings()
    if not paths:
        raise VolumeError("build_volume: no files given")
    slices = _read_series(paths)
    uid = slices[0].header.series_uid
    main, warnings = _check_series(slices, rules)
    slices = [s for s in slices if s.header.sop_instance_uid in {h.sop_instance_uid for h in main.headers}]
    n = np.asarray(main.normal)
    spacing, gaps = _order_and_space(slices, n, rules, uid)
    stack, positions = _decode_stack(slices, gaps, warnings)
    geom = _source_geometry(positions, main, slices[0].header, spacing, uid)

    sub = stack[:, ::4, ::4]
    hu_stats = {
        "source_min": float(stack.min()),
        "source_max": float(stack.max()),
        "source_mean": float(stack.mean()),
        "source_p01": float(np.percentile(sub, 1)),
        "source_p99": float(np.percentile(sub, 99)),
    }
    src, sigmas = _antialiased(stack, geom)
    fraction = sitk.GetImageFromArray(np.clip((stack + 1000.0) / 1000.0, 0.0, 1.0))
    del stack

    # where the head is: a coarse axial grid over the whole acquisition, then the vertex refined
    centroid_xy, vertex_z, cut = _find_head(_resample_coarse(src, geom), fraction, geom.transform(), uid)
    del fraction
    z_top_edge = vertex_z + VERTEX_MARGIN_MM
    nz, ny, nx = TARGET_SHAPE
    origin = [
        centroid_xy[0] - FOV_MM / 2 + PIXEL_MM / 2,
        centroid_xy[1] - FOV_MM / 2 + PIXEL_MM / 2,
        z_top_edge - SLICE_MM / 2,
    ]
    out = sitk.Resample(
        src,
        [nx, ny, nz],
        geom.transform(),
        sitk.sitkLinear,
        origin,
        [PIXEL_MM, PIXEL_MM, SLICE_MM],
        GRID_DIRECTION,
        AIR_HU,
        sitk.sitkFloat32,
    )
    hu_out = sitk.GetArrayFromImage(out)
    data = window_7bit(hu_out)

    # coverage on the vertical line through the head centroid: where 0 <= f <= n-1
    z_lo, z_hi = geom.z_range_at(centroid_xy)
    coverage = max(0.0, min(z_hi, z_top_edge) - max(z_lo, z_top_edge - nz * SLICE_MM))
    if coverage < rules.min_coverage_mm:
        raise VolumeError(
            f"series {uid}: the acquisition covers {coverage:.1f} mm of the {nz * SLICE_MM:g} mm below the "
            f"vertex (z={vertex_z:.1f} mm), less than min_coverage_mm {rules.min_coverage_mm:g}",
            "coverage",
        )
    if cut:
        warnings.append(
            f"the head is cut by the top of the scan (z={z_hi:.1f} mm): the vertex lies outside it, so the "
            "grid sits too low"
        )
    if coverage < nz * SLICE_MM - 1.0:
        warnings.append(
            f"acquisition covers {coverage:.1f} of {nz * SLICE_MM:g} mm of the grid; the rest is air"
        )
    if geom.tilt_deg > 0.5:
        warnings.append(f"gantry tilt {geom.tilt_deg:.1f} deg resampled onto an axial grid")

    tissue = hu_out > TISSUE_HU
    hu_stats["tissue_mean"] = float(hu_out[tissue].mean()) if tissue.any() else float("nan")
    hu_stats["above_window_fraction"] = float(np.mean(hu_out > WINDOW_MAX - WINDOW_OFFSET))
    first = slices[0].header
    source_geometry = {
        **geom.describe(),
        "n_files": len(slices),
        "slice_thickness_mm": first.slice_thickness,
        "gantry_detector_tilt": first.gantry_tilt,
        "kernel": first.kernel,
        "transfer_syntaxes": sorted({s.header.transfer_syntax_uid for s in slices}),
        "smoothing_sigma_px": sigmas,
    }
    grid = {
        "shape": list(TARGET_SHAPE),
        "origin": [float(v) for v in origin],
        "spacing": [PIXEL_MM, PIXEL_MM, SLICE_MM],
        "direction": list(GRID_DIRECTION),
        "axes": "data[z, y, x]: x -> patient left (+X), y -> posterior (+Y), z -> inferior (-Z); "
        "index 0 is the most superior slice",
        "head_centroid_mm": [float(centroid_xy[0]), float(centroid_xy[1])],
        "vertex_z_mm": float(vertex_z),
    }
    log.info(
        "volume_built",
        series_uid=uid,
        slices=geom.n_slices,
        coverage_mm=round(coverage, 1),
        tilt_deg=round(geom.tilt_deg, 2),
        warnings=len(warnings),
    )
    return AssembledVolume(
        data=data,
        hu_stats=hu_stats,
        source_geometry=source_geometry,
        grid=grid,
        coverage_mm=float(coverage),
        warnings=warnings,
        zero_fraction=float(np.mean(data == 0)),
        study_uid=first.study_uid,
        series_uid=uid,
        sop_instance_uids=[s.header.sop_instance_uid for s in slices],
    )


GRID_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # x -> +X, y -> +Y, z index -> -Z


def _check_series(slices: list[_Slice], rules: AssemblySettings) -> tuple[OrientationGroup, list[str]]:
    """One series of single-frame CT images with geometry, an axial main orientation, one matrix."""
    series_uids = sorted({s.header.series_uid for s in slices})
    if len(series_uids) > 1:
        raise VolumeError(
            f"files belong to {len(series_uids)} series ({', '.join(series_uids)}); give one series",
            "invalid",
        )
    uid = series_uids[0]
    wrong = sorted({s.header.sop_class_uid for s in slices} - {CT_IMAGE_STORAGE})
    if wrong:
        names = ", ".join(_sop_class_name(c) for c in wrong)
        raise VolumeError(f"series {uid}: SOP class {names} is not CT Image Storage", "not_ct")
    for s in slices:
        h = s.header
        if h.position is None or h.orientation is None or h.pixel_spacing is None:
            bad = "; ".join(h.problems) or "no ImagePositionPatient, ImageOrientationPatient or PixelSpacing"
            raise VolumeError(f"series {uid}: {h.path}: no usable geometry ({bad})", "geometry")
        if h.number_of_frames > 1:
            raise VolumeError(f"series {uid}: {h.path}: {h.number_of_frames} frames, expected one", "not_ct")
    main, warnings = _main_group(_orientation_groups(s.header for s in slices), uid)
    if main.tilt_deg > rules.max_tilt_deg:
        raise VolumeError(
            f"series {uid}: not axial: orientation {main.label}, slice normal {main.tilt_deg:.1f} deg from "
            f"the patient z axis (max_tilt_deg {rules.max_tilt_deg:g})",
            "tilt",
        )
    first = main.headers[0]
    for h in main.headers[1:]:
        if (h.rows, h.columns) != (first.rows, first.columns):
            raise VolumeError(
                f"series {uid}: {h.path.name} is {h.rows}x{h.columns} pixels, "
                f"{first.path.name} is {first.rows}x{first.columns}",
                "geometry",
            )
        assert h.pixel_spacing is not None and first.pixel_spacing is not None
        if not np.allclose(h.pixel_spacing, first.pixel_spacing, rtol=1e-3, atol=1e-4):
            raise VolumeError(
                f"series {uid}: PixelSpacing differs: {h.path.name} {h.pixel_spacing}, "
                f"{first.path.name} {first.pixel_spacing}",
                "geometry",
            )
    if len(main.headers) < 2:
        raise VolumeError(
            f"series {uid}: only {len(main.headers)} slice; a volume needs at least 2", "too_few_slices"
        )
    return main, warnings


def _order_and_space(
    slices: list[_Slice], n: np.ndarray, rules: AssemblySettings, uid: str
) -> tuple[float, dict[int, int]]:
    """Sort ``slices`` in place along the normal; check spacing. Returns the spacing and the gaps to
    fill ({index of the slice before the gap: slices missing})."""
    for s in slices:
        s.s = float(np.dot(s.header.position, n))
    slices.sort(key=lambda s: (s.s, s.header.sop_instance_uid))

    def z(s: _Slice) -> float:
        assert s.header.position is not None
        return s.header.position[2]

    for a, b in itertools.pairwise(slices):
        if b.s - a.s < DUPLICATE_MM:
            raise VolumeError(
                f"series {uid}: two slices at one position z={z(a):.2f} mm "
                f"({a.header.path.name} and {b.header.path.name}); duplicate or overlapping acquisitions",
                "duplicate",
            )
    steps = np.diff([s.s for s in slices])
    spacing = float(np.median(steps))
    gaps: dict[int, int] = {}
    for i, step in enumerate(steps):
        ratio = step / spacing
        m = round(ratio)
        where = f"between z={z(slices[i]):.2f} and z={z(slices[i + 1]):.2f} mm"
        how = f"step {step:.2f} mm, spacing {spacing:.2f} mm"
        if m < 1 or abs(ratio - m) > SPACING_TOLERANCE:
            raise VolumeError(f"series {uid}: irregular slice spacing {where} ({how})", "missing_slices")
        if m == 1:
            continue
        what = "missing slice" if m == 2 else f"{m - 1} missing slices"
        if not rules.interpolate_gaps:
            raise VolumeError(
                f"series {uid}: {what} {where} ({how}); interpolate_gaps is off", "missing_slices"
            )
        if m - 1 > rules.max_gap_slices:
            raise VolumeError(
                f"series {uid}: {what} {where} ({how}): more than max_gap_slices {rules.max_gap_slices}",
                "missing_slices",
            )
        gaps[i] = m - 1
    return spacing, gaps


def _decode_stack(
    slices: list[_Slice], gaps: dict[int, int], warnings: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """HU stack (slices, rows, columns) in order, gaps filled by linear interpolation; positions."""
    first = slices[0].header
    rows, cols = int(first.rows or 0), int(first.columns or 0)
    n_out = len(slices) + sum(gaps.values())
    stack = np.empty((n_out, rows, cols), dtype=np.float32)
    positions = np.empty((n_out, 3))
    index: list[int] = []  # output index of each source slice
    k = 0
    for i, s in enumerate(slices):
        hu = _hu_from_dataset(s.ds, s.header.path)
        if hu.shape != (rows, cols):
            raise VolumeError(
                f"series {first.series_uid}: {s.header.path}: pixel data {hu.shape}, header {rows}x{cols}",
                "geometry",
            )
        stack[k] = hu
        positions[k] = s.header.position
        s.ds = None  # type: ignore[assignment]  # release the file's bytes early
        index.append(k)
        k += 1 + gaps.get(i, 0)
    for i, missing in sorted(gaps.items()):
        a, b = index[i], index[i + 1]
        for q in range(1, missing + 1):
            t = q / (missing + 1)
            stack[a + q] = (1 - t) * stack[a] + t * stack[b]
            positions[a + q] = (1 - t) * positions[a] + t * positions[b]
        at = ", ".join(f"{positions[a + q][2]:.2f}" for q in range(1, missing + 1))
        warnings.append(
            f"interpolated {missing} missing slice{'s' if missing > 1 else ''} at z={at} mm "
            f"(between z={positions[a][2]:.2f} and z={positions[b][2]:.2f} mm)"
        )
    return stack, positions


@dataclass(frozen=True)
class _Geometry:
    """The source stack's voxel -> patient map ``X = p0 + M @ (column, row, slice)``."""

    p0: np.ndarray
    m: np.ndarray  # columns: one column step, one row step, one slice step (mm, LPS)
    normal: np.ndarray
    n_slices: int
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    orientation: tuple[float, ...]
    label: str
    normal_tilt_deg: float  # slice normal vs patient z
    shear_deg: float  # slice step vs slice normal (gantry tilt with table motion along z)

    @property
    def step(self) -> np.ndarray:
        return self.m[:, 2]

    @property
    def tilt_deg(self) -> float:
        return max(self.normal_tilt_deg, self.shear_deg)

    def transform(self) -> sitk.AffineTransform:
        """Patient point -> continuous source index, as SimpleITK's Resample wants it."""
        inv = np.linalg.inv(self.m)
        t = sitk.AffineTransform(3)
        t.SetMatrix(inv.ravel().tolist())
        t.SetTranslation((-inv @ self.p0).tolist())
        return t

    def corners(self) -> np.ndarray:
        ks = (0, self.columns - 1)
        js = (0, self.rows - 1)
        fs = (0, self.n_slices - 1)
        return np.array([self.p0 + self.m @ np.array([a, b, c]) for a in ks for b in js for c in fs])

    def z_range_at(self, xy: Sequence[float]) -> tuple[float, float]:
        """Patient z interval in which the vertical line through (x, y) is inside the acquired slab."""
        inv = np.linalg.inv(self.m)
        a = float(inv[2] @ (np.array([xy[0], xy[1], 0.0]) - self.p0))
        b = float(inv[2, 2])
        lo, hi = sorted(((0 - a) / b, (self.n_slices - 1 - a) / b))
        return lo, hi

    def describe(self) -> dict[str, Any]:
        return {
            "n_slices": self.n_slices,
            "rows": self.rows,
            "columns": self.columns,
            "pixel_spacing_mm": list(self.pixel_spacing),
            "slice_spacing_mm": self.slice_spacing,
            "orientation": list(self.orientation),
            "orientation_label": self.label,
            "normal": [float(v) for v in self.normal],
            "tilt_deg": self.tilt_deg,
            "normal_tilt_deg": self.normal_tilt_deg,
            "shear_deg": self.shear_deg,
            "first_position": [float(v) for v in self.p0],
            "last_position": [float(v) for v in self.p0 + (self.n_slices - 1) * self.step],
            "step_mm": [float(v) for v in self.step],
        }


def _source_geometry(
    positions: np.ndarray, main: OrientationGroup, first: InstanceHeader, spacing: float, uid: str
) -> _Geometry:
    n_sl = positions.shape[0]
    step = (positions[-1] - positions[0]) / (n_sl - 1)
    off = np.linalg.norm(positions - (positions[0] + np.outer(np.arange(n_sl), step)), axis=1)
    if float(off.max()) > SPACING_TOLERANCE * spacing + 0.05:
        worst = int(np.argmax(off))
        raise VolumeError(
            f"series {uid}: slice positions do not lie on a line (slice at {_fmt(positions[worst])} is "
            f"{off[worst]:.2f} mm off)",
            "geometry",
        )
    iop = np.asarray(main.orientation, dtype=float)
    row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    assert first.pixel_spacing is not None
    dr, dc = first.pixel_spacing
    n = np.asarray(main.normal)
    if abs(float(n[2])) < 1e-6:
        raise VolumeError(f"series {uid}: slices are parallel to the patient z axis", "tilt")
    cos_shear = min(1.0, abs(float(step @ n)) / float(np.linalg.norm(step)))
    return _Geometry(
        p0=positions[0].copy(),
        m=np.column_stack([dc * row_dir, dr * col_dir, step]),
        normal=n,
        n_slices=n_sl,
        rows=int(first.rows or 0),
        columns=int(first.columns or 0),
        pixel_spacing=(float(dr), float(dc)),
        slice_spacing=spacing,
        orientation=tuple(float(v) for v in main.orientation),
        label=main.label,
        normal_tilt_deg=main.tilt_deg,
        shear_deg=math.degrees(math.acos(cos_shear)),
    )


def _antialiased(stack: np.ndarray, geom: _Geometry) -> tuple[sitk.Image, list[float]]:
    """The stack as a SimpleITK image in index space, Gaussian-smoothed along the axes that will be
    downsampled: sigma = (factor - 1) / 2 source pixels (factor = output / source spacing)."""
    dr, dc = geom.pixel_spacing
    factors = (PIXEL_MM / dc, PIXEL_MM / dr, SLICE_MM / max(abs(float(geom.step[2])), 1e-6))
    # below a quarter pixel the sampled kernel is the identity anyway: record 0, skip the filter
    sigmas = [s if s >= 0.25 else 0.0 for s in ((f - 1.0) / 2.0 for f in factors)]
    img = sitk.GetImageFromArray(stack)
    if any(sigmas):
        img = sitk.DiscreteGaussian(img, [sg * sg for sg in sigmas], 32, 0.01, False)
    return img, sigmas


def _resample_coarse(src: sitk.Image, geom: _Geometry) -> sitk.Image:
    """The whole acquisition on an axial grid of 1.72 x 1.72 x 2.25 mm (identity direction)."""
    corners = geom.corners()
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    spacing = [PIXEL_MM, PIXEL_MM, MASK_Z_MM]
    size = [math.floor((hi[i] - lo[i]) / spacing[i]) + 1 for i in range(3)]
    return sitk.Resample(
        src,
        size,
        geom.transform(),
        sitk.sitkLinear,
        lo.tolist(),
        spacing,
        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        AIR_HU,
        sitk.sitkFloat32,
    )


def _head_mask(coarse: sitk.Image, uid: str) -> np.ndarray:
    """The head on the coarse grid: the largest connected component of tissue after an in-plane
    opening (which cuts thin table tops, head holders and cables), as a bool array (z, y, x)."""
    mask = sitk.Cast(coarse > TISSUE_HU, sitk.sitkUInt8)
    opened = sitk.BinaryMorphologicalOpening(mask, [2, 2, 0], sitk.sitkBall, 0, 1)
    for candidate in (opened, mask):
        cc = sitk.RelabelComponent(sitk.ConnectedComponent(candidate), sortByObjectSize=True)
        labels = sitk.GetArrayFromImage(cc) == 1
        if labels.any():
            return labels
    raise VolumeError(f"series {uid}: no head tissue (> {TISSUE_HU:g} HU) in the acquisition", "not_head")


def _find_head(
    coarse: sitk.Image, fraction: sitk.Image, transform: sitk.Transform, uid: str
) -> tuple[tuple[float, float], float, bool]:
    """Head centroid (x, y), vertex z (mm), and whether the top of the head looks cut off.

    The vertex is not the highest voxel above a threshold: with 4.5 mm slices that moves by up to a
    slice with the phase of the slices against the skull, so the same head scanned twice would be
    anchored differently. Near the top the skull is a dome, so the tissue volume above height z
    grows as (vertex - z)^2 and its square root is linear in z; a line fitted to sqrt(V(z)) between
    4 and 24 mm below the rough vertex, extrapolated to zero, gives the vertex to a fraction of a
    millimetre whatever the slice phase. V(z) integrates the tissue fraction clip((HU+1000)/1000, 0,
    1) interpolated between slices, which conserves tissue volume where a thresholded mask does not.

    A dome's cross-section 2 mm below its top is a small fraction (about a tenth) of the one 20 mm
    below; a head cut by the top of the scan has nearly the same cross-section at both levels.
    """
    labels = _head_mask(coarse, uid)
    origin = np.asarray(coarse.GetOrigin())
    spacing = np.asarray(coarse.GetSpacing())
    zi, yi, xi = np.nonzero(labels)
    z_mm = origin[2] + zi * spacing[2]
    rough = float(z_mm.max())

    # V(z) on a fine axial grid around the top of the head, restricted to the (dilated) head
    near = z_mm >= rough - 40.0
    lo_xy = origin[:2] + (np.array([xi[near].min(), yi[near].min()]) - 4) * spacing[:2]
    hi_xy = origin[:2] + (np.array([xi[near].max(), yi[near].max()]) + 4) * spacing[:2]
    dz = 0.5
    fine_origin = [float(lo_xy[0]), float(lo_xy[1]), rough - 32.0]
    fine_spacing = [float(spacing[0]), float(spacing[1]), dz]
    size = [int((hi_xy[i] - lo_xy[i]) / spacing[i]) + 1 for i in range(2)] + [int(40.0 / dz) + 1]
    identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    frac = sitk.Resample(
        fraction, size, transform, sitk.sitkLinear, fine_origin, fine_spacing, identity, 0.0, sitk.sitkFloat32
    )
    head_img = sitk.GetImageFromArray(labels.astype(np.uint8))
    head_img.CopyInformation(coarse)
    head_img = sitk.BinaryDilate(head_img, [3, 3, 1], sitk.sitkBall, 0, 1)
    head_fine = sitk.Resample(
        head_img, size, sitk.Transform(), sitk.sitkNearestNeighbor, fine_origin, fine_spacing, identity, 0
    )
    f = sitk.GetArrayFromImage(frac) * sitk.GetArrayFromImage(head_fine)
    area = f.sum(axis=(1, 2)) * spacing[0] * spacing[1]  # mm^2 per fine slice, z increasing
    above = np.cumsum(area[::-1])[::-1] - area / 2  # trapezoid: volume above each sample / dz
    z = fine_origin[2] + dz * np.arange(area.size)
    root = np.sqrt(np.maximum(above * dz, 0.0))
    sel = (z >= rough - 24.0) & (z <= rough - 4.0)
    vertex = rough
    if sel.sum() >= 4:
        slope, intercept = np.polyfit(z[sel], root[sel], 1)
        if slope < 0:
            fitted = -intercept / slope
            if abs(fitted - rough) <= 10.0:
                vertex = float(fitted)

    a_top = float(np.interp(rough - 2.0, z, area))
    a_below = float(np.interp(rough - 20.0, z, area))
    cut = a_below > 0 and a_top > 0.5 * a_below

    inside = z_mm >= vertex + VERTEX_MARGIN_MM - TARGET_SHAPE[0] * SLICE_MM
    cx = float(origin[0] + xi[inside].mean() * spacing[0])
    cy = float(origin[1] + yi[inside].mean() * spacing[1])
    return (cx, cy), vertex, cut


def assemble_study(
    series: Mapping[str, Sequence[InstanceHeader]], rules: AssemblySettings | None = None
) -> tuple[SelectionResult, AssembledVolume | None]:
    """Select, then build; when the best candidate cannot be built (a missing slice, say), try the
    next. The one path the daemon and training take from a study's headers to its volume.

    Returns the selection (``chosen`` is the series actually built, ``skipped`` says why every other
    series was not, build failures included) and the volume, or None with ``reason`` set.
    """
    rules = rules or AssemblySettings()
    sel = select_series(series, rules)
    failures: list[str] = []
    for rank, uid in enumerate(sel.candidates):
        main, warnings = _main_group(list(sel.series[uid].orientations), uid)
        try:
            vol = build_volume([h.path for h in main.headers], rules)
        except VolumeError as exc:
            sel.skipped[uid] = f"cannot build the volume: {exc.reason}"
            sel.categories[uid] = exc.category
            failures.append(f"{uid}: {exc.reason}")
            continue
        if rank > 0:  # fell back: the reasons of the lower-ranked ones now name this one
            sel.skipped.pop(uid, None)
            sel.categories.pop(uid, None)
            for other in sel.candidates[rank + 1 :]:
                sel.skipped[other] = _ranked_below(sel.series[uid], sel.series[other], rules)
        sel.chosen, sel.instances, sel.warnings = uid, list(main.headers), warnings
        return sel, vol
    if sel.candidates:
        sel.chosen, sel.instances, sel.warnings = None, [], []
        sel.reason = "no candidate series could be built (" + "; ".join(failures) + ")"
    return sel, None


# --------------------------------------------------------------------------------------------------
# persistence


def save_volume(vol: AssembledVolume, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` and the JSON metadata (with PREPROCESSING_VERSION) to an .npz, atomically.

    Atomic (temporary file + rename in the same folder) because the daemon may be killed at any
    moment, and a half-written cache file would otherwise be read back as a volume.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(vol.metadata(), sort_keys=True, allow_nan=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, data=vol.data, meta=np.array(meta))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


def load_volume(path: str | os.PathLike[str]) -> AssembledVolume:
    """Read a volume written by :func:`save_volume`. ``preprocessing_version`` is what it was built
    with; a cache compares it with :data:`PREPROCESSING_VERSION` and rebuilds when they differ."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as npz:
            data = npz["data"]
            meta = json.loads(str(npz["meta"]))
    except FileNotFoundError:
        raise VolumeError(f"{p}: no such volume file") from None
    except (OSError, ValueError, KeyError) as exc:
        raise VolumeError(f"{p}: not a volume file written by save_volume ({exc})") from None
    if data.dtype != np.uint8 or data.shape != TARGET_SHAPE:
        raise VolumeError(f"{p}: volume is {data.dtype} {data.shape}, expected uint8 {TARGET_SHAPE}")
    return AssembledVolume(
        data=data,
        hu_stats=meta.get("hu_stats", {}),
        source_geometry=meta.get("source_geometry", {}),
        grid=meta.get("grid", {}),
        coverage_mm=float(meta.get("coverage_mm", 0.0)),
        warnings=list(meta.get("warnings", [])),
        zero_fraction=float(meta.get("zero_fraction", 0.0)),
        study_uid=meta.get("study_uid", ""),
        series_uid=meta.get("series_uid", ""),
        sop_instance_uids=list(meta.get("sop_instance_uids", [])),
        preprocessing_version=meta.get("preprocessing_version", ""),
    )


__all__ = [
    "PREPROCESSING_VERSION",
    "TARGET_SHAPE",
    "AssembledVolume",
    "InstanceHeader",
    "OrientationGroup",
    "SelectionResult",
    "SeriesInfo",
    "VolumeError",
    "assemble_study",
    "build_volume",
    "describe_series",
    "group_studies",
    "kernel_class",
    "load_volume",
    "read_header",
    "read_headers",
    "read_slice_hu",
    "rejection",
    "rejection_reason",
    "save_volume",
    "select_series",
    "window_7bit",
]
