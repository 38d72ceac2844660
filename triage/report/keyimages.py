"""Key images of a flagged study: the source slices through its region, the region map as a colour overlay.

Why Secondary Capture: every PACS viewer shows an RGB SC image, with no plug-in and no support for
parametric maps or overlays needed, next to the CT in the same study. Each key image is one source
slice at its own resolution, in a brain window (W 80 / L 40 HU), with the standardized log-ratio map of
the region score (``triage.model.voxelmap``: how many normal-study s.d. below normal each window is)
blended in where it is below ``-Z_SHOW``: yellow to red as it gets more abnormal. A ring marks the
region's centre on the slice nearest to it. The SR references these images from its region
measurement (``triage.report.sr``).

The map lives on the model's grid (block-averaged canonical grid); each source pixel is carried to
patient coordinates by its slice's ImagePositionPatient / ImageOrientationPatient / PixelSpacing, then
through the canonical grid (``grid``: origin, spacing, direction) to the model grid, and sampled there
(trilinear). So the overlay sits where the map is, whatever the source geometry (tilt, field of view).

A chest radiograph (``region_map["kind"] == "cxr"``) gets one key image: the scored frontal image
itself (displayed values: modality and VOI LUT, MONOCHROME1 inverted, its 1st-99th percentiles as the
grey range), block-averaged to at most ``MAX_SIDE`` pixels on its longer side, the map sampled at each
pixel through the canonical image's content box (:mod:`triage.model.radiomap`) and the ring around the
region's centre, whose place on the image is ``region_center_mm`` divided by the image's pixel spacing.

Determinism: the caller supplies every UID and the content date/time; nothing reads the clock.
Nothing here logs patient data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM
from scipy.ndimage import affine_transform, map_coordinates

from triage.assemble.common import TARGET_SHAPE, VolumeError
from triage.assemble.radiograph import _spacing as radiograph_spacing  # the spacing the assembly honoured
from triage.assemble.radiograph import displayed_values
from triage.model.radiomap import source_to_model_index
from triage.model.results import ModelSetInfo, ScoreResult
from triage.report.codes import ReportError, check_uid

__all__ = ["KEY_IMAGES_DESCRIPTION", "build_key_images", "overlay_rgb", "sample_map_on_slice"]

KEY_IMAGES_DESCRIPTION = "AI triage aid (not a diagnosis): abnormal region key images"  # LO: <= 64
Z_SHOW = 2.0  # overlay only where the window is more than 2 normal s.d. below normal
Z_FULL = 6.0  # full colour at 6 s.d.
ALPHA_MAX = 0.6
WINDOW_CENTER, WINDOW_WIDTH = 40.0, 80.0
MAX_SLICES = 5
MAX_SIDE = 1024  # a radiograph key image's longer side at most (a 3000-pixel RGB image is 27 MB)


def _slice_frame(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    """(position, row direction, column direction, (row spacing, column spacing)) of one slice."""
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    pos = np.asarray([float(v) for v in ds.ImagePositionPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return pos, iop[:3], iop[3:], (dr, dc)


def sample_map_on_slice(ds: Dataset, zmap: np.ndarray, grid: dict[str, Any]) -> np.ndarray:
    """The model-grid map ``zmap`` (z, y, x) sampled at every pixel of source slice ``ds`` (rows, cols);
    0 outside the grid.

    A pixel's place on the model grid is affine in its (row, column): the slice's plane carried through
    the canonical grid's origin, direction and spacing, then the model grid's block averaging. So the
    three vectors of that map are computed once and scipy's ``affine_transform`` interpolates (linear)
    without the per-pixel coordinate arrays: a 512x512 slice in a few milliseconds, the same values as
    sampling each pixel's patient coordinates (tests/unit/test_key_image_map.py)."""
    pos, row_dir, col_dir, (dr, dc) = _slice_frame(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    d = np.asarray(grid["direction"], dtype=float).reshape(3, 3)
    sp = np.asarray(grid["spacing"], dtype=float)
    origin = np.asarray(grid["origin"], dtype=float)
    factors = np.array([t / s for t, s in zip(TARGET_SHAPE, zmap.shape, strict=True)])

    def to_model(v: np.ndarray) -> np.ndarray:  # a patient-space vector in model-grid (z, y, x) steps
        return (np.linalg.solve(d, v) / sp)[::-1] / factors

    # PS3.3 C.7.6.2.1.1: column index moves along the row direction by the column spacing, and so on
    base = to_model(pos - origin) - (factors - 1) / 2 / factors
    matrix = np.column_stack([np.zeros(3), to_model(dr * col_dir), to_model(dc * row_dir)])
    vals = affine_transform(zmap.astype(np.float64), matrix, offset=base, output_shape=(1, rows, cols),
                            order=1, mode="constant", cval=0.0)
    return vals[0]


def overlay_rgb(hu: np.ndarray, z: np.ndarray, ring: tuple[float, float, float] | None = None,
                window: tuple[float, float] = (WINDOW_CENTER, WINDOW_WIDTH)) -> np.ndarray:
    """Brain-windowed grey image with the negative part of the z-map blended in (uint8 RGB, rows x
    cols x 3); ``ring`` = (row, col, radius in pixels) draws a cyan ring around the region's centre.
    ``window`` (centre, width) of ``hu``: the brain window for CT, (0.5, 1) for a grey range 0..1.

    The blend and the ring are computed only where they are (the map's abnormal windows, the ring's
    bounding box): a 512x512 slice is mostly plain grey, and five of them were 0.1 s of a flagged
    study's report."""
    lo = window[0] - window[1] / 2
    grey = np.round(np.clip((hu - lo) / window[1], 0.0, 1.0) * 255).astype(np.uint8)
    out = np.repeat(grey[..., None], 3, axis=2)
    show = -z > Z_SHOW
    if show.any():
        g = np.clip((hu[show] - lo) / window[1], 0.0, 1.0)[:, None]
        strength = np.clip((-z[show] - Z_SHOW) / (Z_FULL - Z_SHOW), 0.0, 1.0)
        alpha = (0.25 + (ALPHA_MAX - 0.25) * strength)[:, None]
        # yellow -> red as the window gets more abnormal
        colour = np.stack([np.ones_like(strength), 1.0 - strength, np.zeros_like(strength)], axis=-1)
        out[show] = np.round(((1.0 - alpha) * g + alpha * colour) * 255).astype(np.uint8)
    if ring is not None:
        width = max(1.0, hu.shape[0] / 256)
        reach = ring[2] + width + 1
        r0, r1 = max(0, math.floor(ring[0] - reach)), min(hu.shape[0], math.ceil(ring[0] + reach) + 1)
        c0, c1 = max(0, math.floor(ring[1] - reach)), min(hu.shape[1], math.ceil(ring[1] + reach) + 1)
        if r0 < r1 and c0 < c1:
            rr, cc = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
            on = np.abs(np.hypot(rr - ring[0], cc - ring[1]) - ring[2]) <= width
            out[r0:r1, c0:c1][on] = (0, 255, 255)
    return out


def _patient_orientation(row_dir: np.ndarray, col_dir: np.ndarray) -> tuple[str, str]:
    """Patient Orientation (0020,0020) of a slice: the main direction of its rows and columns."""
    def label(v: np.ndarray) -> str:
        names = (("R", "L"), ("A", "P"), ("F", "H"))
        out = ""
        for axis in np.argsort(-np.abs(v)):
            if abs(v[axis]) > 0.2:
                out += names[axis][int(v[axis] > 0)]
        return out[:3] or "L"
    return label(row_dir), label(col_dir)


def _hu(ds: Dataset) -> np.ndarray:
    arr = ds.pixel_array.astype(np.float64)
    return arr * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)


def choose_slices(source: Sequence[Dataset], centre_mm: Sequence[float], window_mm: float) -> list[Dataset]:
    """The source slices whose planes lie within half a window of the region's centre (at least the
    nearest one, at most MAX_SLICES, nearest first then in z order). Radiographs (images without a
    patient plane, ImageOrientationPatient) are all kept, up to MAX_SLICES: the region is on the scored
    image, which :func:`build_key_images` picks by ``region_sop_instance_uid``."""
    flat = [ds for ds in source if "ImageOrientationPatient" not in ds]
    if flat:
        return flat[:MAX_SLICES]
    planes = []
    c = np.asarray(centre_mm, dtype=float)
    for ds in source:
        pos, row_dir, col_dir, _ = _slice_frame(ds)
        normal = np.cross(row_dir, col_dir)
        planes.append((abs(float((c - pos) @ normal)), float(pos @ normal), ds))
    if not planes:
        return []
    planes.sort(key=lambda t: t[0])
    keep = [p for p in planes if p[0] <= window_mm / 2][:MAX_SLICES] or planes[:1]
    return [p[2] for p in sorted(keep, key=lambda t: -t[1])]  # superior first


def build_key_images(
    result: ScoreResult,
    source: Sequence[Dataset],
    region_map: dict[str, Any],
    grid: dict[str, Any],
    model: ModelSetInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: Callable[[int], str],
    series_number: int = 9902,
    content_datetime: datetime,
) -> list[Dataset]:
    """Secondary Capture key images of the slices through ``result``'s region (with pixels: ``source``
    must be full datasets of the scored series). Empty when the result has no located region."""
    if result.region_center_mm is None or result.region_window_mm is None:
        return []
    check_uid(series_instance_uid, "series_instance_uid")
    if region_map.get("kind") == "cxr":
        image = next((ds for ds in source if str(ds.SOPInstanceUID) == result.region_sop_instance_uid), None)
        if image is None:
            return []
        sc = _radiograph_key_image(result, image, region_map, model, series_instance_uid=series_instance_uid,
                                   sop_instance_uid=sop_instance_uid(1), series_number=series_number)
        _finish(sc, image, result, model, content_datetime, "radiograph")
        return [sc]
    zmap = np.asarray(region_map["zmap"], dtype=np.float64)
    centre = np.asarray(result.region_center_mm, dtype=float)
    picked = choose_slices(source, centre, float(result.region_window_mm))
    nearest = choose_slices(picked, centre, 0.0)[0] if picked else None
    out = []
    for i, ds in enumerate(picked, start=1):
        if "PixelData" not in ds:
            raise ReportError(f"study {result.study_uid}: key images need the source pixels "
                              f"(instance {ds.SOPInstanceUID} was read without them)")
        pos, row_dir, col_dir, (dr, dc) = _slice_frame(ds)
        z = sample_map_on_slice(ds, zmap, grid)
        ring = None
        if ds is nearest:
            off = centre - pos
            radius = float(result.region_window_mm) / 2 / dc
            ring = (float(off @ col_dir) / dr, float(off @ row_dir) / dc, radius)
        rgb = overlay_rgb(_hu(ds), z, ring)
        sop = sop_instance_uid(i)
        check_uid(sop, "sop_instance_uid")
        sc = SCImage.from_ref_dataset(
            ref_dataset=ds, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=series_instance_uid,
            series_number=series_number, sop_instance_uid=sop, instance_number=i,
            manufacturer=model.manufacturer, pixel_spacing=(dr, dc),
            patient_orientation=_patient_orientation(row_dir, col_dir),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
        _finish(sc, ds, result, model, content_datetime, "CT slice")
        out.append(sc)
    return out


def _finish(sc: Dataset, ds: Dataset, result: ScoreResult, model: ModelSetInfo, when: datetime,
            what: str) -> None:
    """The attributes every key image shares: series description, derivation, dates, the source."""
    sc.SeriesDescription = KEY_IMAGES_DESCRIPTION
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.ContentDate, sc.ContentTime = DA(when.date()), TM(when.time())
    sc.SeriesDate, sc.SeriesTime = DA(when.date()), TM(when.time())
    sc.InstanceCreationDate, sc.InstanceCreationTime = DA(when.date()), TM(when.time())
    # highdicom stamps the capture date/time and its own Contributing Equipment item from the clock: a
    # rebuilt key image (after a crash before its SR) must be byte-identical to the first, as the SR is
    sc.DateOfSecondaryCapture, sc.TimeOfSecondaryCapture = DA(when.date()), TM(when.time())
    for item in sc.get("ContributingEquipmentSequence") or []:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(when)
    sc.DerivationDescription = (
        f"Source {what} with the glowtriage region map (model set {model.version}): colour where a "
        f"{result.region_window_mm:g} mm window is more than {Z_SHOW:g} normal s.d. below normal"
    )[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    sc.BurnedInAnnotation = "NO"
    if "Laterality" not in sc and "ImageLaterality" not in sc:
        sc.Laterality = ""  # General Series type 2C: empty, neither the head nor the chest is paired


_ORIENTATION_LETTERS = set("APRLHF")


def _radiograph_orientation(ds: Dataset) -> tuple[str, str]:
    """The source's Patient Orientation when it is a valid pair, else a frontal chest as displayed
    (rows toward the patient's left, columns toward the feet)."""
    po = ds.get("PatientOrientation")
    try:
        if po is not None and len(po) == 2 and all(str(v) and set(str(v)) <= _ORIENTATION_LETTERS
                                                   for v in po):
            return str(po[0]), str(po[1])
    except TypeError:
        pass
    return "L", "F"


def _radiograph_key_image(result: ScoreResult, ds: Dataset, region_map: dict[str, Any], model: ModelSetInfo,
                          *, series_instance_uid: str, sop_instance_uid: str, series_number: int) -> Dataset:
    """One SC image: the scored radiograph (reduced to MAX_SIDE) with the map and the region's ring."""
    if "PixelData" not in ds:
        raise ReportError(f"study {result.study_uid}: key images need the source pixels "
                          f"(instance {ds.SOPInstanceUID} was read without them)")
    geometry = region_map.get("geometry")
    if not geometry:
        raise ReportError(f"study {result.study_uid}: the region map keeps no image geometry")
    try:
        values = displayed_values(ds, Path(str(ds.SOPInstanceUID)))
    except VolumeError as exc:
        raise ReportError(f"study {result.study_uid}: key image: {exc.reason}") from None
    rows, cols = values.shape
    if [rows, cols] != [int(v) for v in geometry["source_shape"]]:
        raise ReportError(f"study {result.study_uid}: image {ds.SOPInstanceUID} is {rows}x{cols}, the region "
                          f"was found on a {geometry['source_shape']} image")
    k = max(1, math.ceil(max(rows, cols) / MAX_SIDE))
    padded = np.pad(values, ((0, -rows % k), (0, -cols % k)), mode="edge")
    small = padded.reshape(padded.shape[0] // k, k, padded.shape[1] // k, k).mean(axis=(1, 3))
    lo, hi = np.percentile(values, [1.0, 99.0])
    grey = (small - lo) / max(float(hi - lo), 1e-9)
    rr, cc = np.meshgrid(np.arange(small.shape[0]) * k + (k - 1) / 2.0,
                         np.arange(small.shape[1]) * k + (k - 1) / 2.0, indexing="ij")
    zmap = np.asarray(region_map["zmap"], dtype=np.float64)
    mr, mc = source_to_model_index(rr, cc, geometry, zmap.shape)
    z = map_coordinates(zmap, [mr.ravel(), mc.ravel()], order=1, mode="constant", cval=0.0)
    z = z.reshape(small.shape)
    dr, dc = radiograph_spacing(ds)
    assert result.region_center_mm is not None and result.region_window_mm is not None
    col, row = result.region_center_mm[0] / dc, result.region_center_mm[1] / dr  # SCOORD: corner origin
    ring = (row / k - 0.5, col / k - 0.5, float(result.region_window_mm) / 2 / (dc * k))
    rgb = overlay_rgb(grey, z, ring, window=(0.5, 1.0))
    check_uid(sop_instance_uid, "sop_instance_uid")
    return SCImage.from_ref_dataset(
        ref_dataset=ds, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_instance_uid, series_number=series_number,
        sop_instance_uid=sop_instance_uid, instance_number=1, manufacturer=model.manufacturer,
        pixel_spacing=(dr * k, dc * k), patient_orientation=_radiograph_orientation(ds),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
