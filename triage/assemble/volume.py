"""Series selection and volume building: DICOM files of one study -> the 32x128x128 7-bit volume.

One code path for the daemon and for training (``training/data.py`` calls it too), so the volumes a
model was trained on and the volumes it scores can never disagree. Nothing here knows about the
store: the inputs are file paths and the headers read from them.

The steps live in their own modules: :mod:`~triage.assemble.headers` (headers, grouping),
:mod:`~triage.assemble.select` (which series), :mod:`~triage.assemble.geometry` (ordering, spacing,
the source voxel map), :mod:`~triage.assemble.pixels` (decode to HU), :mod:`~triage.assemble.head`
(anti-aliasing, where the head is). This module builds the volume from them and keeps it.

Entry points
    :func:`assemble_study` (select, build, fall back to the next candidate when the best one cannot
    be built) is the path the daemon and training take; :func:`read_headers` and
    :func:`group_studies` turn a folder's files into its input. :func:`save_volume` /
    :func:`load_volume` keep volumes as .npz with JSON metadata and ``PREPROCESSING_VERSION``, so a
    cache built by an older version is recognised and rebuilt.


Ordering and spacing
    Slices (frames of an Enhanced CT instance count one each) are ordered by ImagePositionPatient
    projected on the slice normal (row x column of ImageOrientationPatient), never by
    InstanceNumber. Two instances at one position are rejected. Any step up to ``max_slice_gap_mm``
    (8 mm) between consecutive positions is accepted (GE's two-stack protocol, a missing thin slice,
    gaps recorded as warnings); a longer step is a hole and refused, naming both neighbours'
    positions.

Along z: one rule for every spacing (:mod:`triage.assemble.zprofile`)
    A canonical voxel holds the HU integrated over the canonical z profile (a 4.5 mm slab, with the
    triangle that interpolation onto the 4.5 mm grid gives a 4.5 mm series). Each slice is taken as the
    average of its cell (between the midpoints to its neighbours), the profile in between is
    reconstructed conservatively and without new extrema (piecewise parabolas with the PPM limiter,
    edge values from PCHIP's weighted harmonic mean), and integrated over the slab every 1.125 mm
    along the line of positions, before anything else; where the source slices (or their
    SliceThickness) are finer than a 7.5 mm reference cell (the coarsest routine protocol), each
    sample's z blur is topped up to it. So a 0.625 mm series, a 5 mm series and a two-stack 4/7 mm
    series of one head give the same volume (measured on the synthetic head, noise-free: within 0.38
    and 1.00 grey levels of the 5 mm one inside the head),
    and one 5 mm series at five slice phases within 0.5.

Content
    The built volume must show a head (:mod:`triage.assemble.content`: a skull ring around
    brain-density tissue), else it is refused with what was found (or scored with a warning when
    ``non_head_content = "warn"``); a sharp reconstruction (brain noise) is scored with a warning.

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
      slice phase or gantry tilt. It is measured on two common z profiles (the HU blurred along z
      from each profile slice's own variance at the top of the head: the canonical profile plus the
      box of the source cell it lies in) and extrapolated to the canonical slab's, so 0.625 mm, 5 mm
      and 7 mm slices give the same vertex (within 0.15 mm on the synthetic head; measured on its
      own profile a 7 mm stack put it 1 mm higher: tissue counted as a fraction saturating at 0 HU
      rises with the blur where bone meets air).
    * Voxels outside the acquired slab are air (-1024 HU, 0 after windowing). ``coverage_mm`` is the
      length of the grid's z extent that the acquisition covers on the vertical line through the head
      centroid; below ``min_coverage_mm`` the volume is rejected.

Resampling
    Done in HU. Along z see above. In plane, before downsampling, a Gaussian with sigma =
    (factor - 1) / 2 source pixels per axis (factor = output spacing / source spacing;
    scikit-image's anti-aliasing rule) removes the
    frequencies the 1.72 mm grid cannot represent (0.45 mm pixels would otherwise alias skull edges
    into speckle); axes that are not downsampled are not smoothed. A Gaussian rather than block
    averaging because the factor is rarely an integer (0.43-0.49 mm pixels onto 1.71875 mm), and a
    block average would need a second interpolation anyway; it runs on whichever of the source stack
    and the z-profile stack has fewer slices (the two filters are linear and act on separate axes, so
    the order does not change the result). Then trilinear interpolation onto the
    grid, then the paper's window :func:`window_7bit`: ``clip(rint(HU) + 14, 0, 127)`` (brain window
    [-14, 113] HU in 128 levels).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from triage.assemble.common import (
    AIR_HU,
    CT_IMAGE_STORAGE,
    ENHANCED_CT_STORAGE,
    FOV_MM,
    GRID_DIRECTION,
    PIXEL_MM,
    PREPROCESSING_VERSION,
    SLICE_MM,
    TARGET_SHAPE,
    TISSUE_HU,
    VERTEX_MARGIN_MM,
    WINDOW_MAX,
    WINDOW_OFFSET,
    VolumeError,
    _sop_class_name,
    log,
    window_7bit,
)
from triage.assemble.content import HeadContent, brain_noise, head_content
from triage.assemble.geometry import (
    OrientationGroup,
    _check_gaps,
    _main_group,
    _order_slices,
    _orientation_groups,
    _source_geometry,
)
from triage.assemble.head import _find_head, _resample_coarse, inplane_antialias
from triage.assemble.headers import InstanceHeader, group_studies, read_header, read_headers
from triage.assemble.pixels import _decode_stack, _read_series, _Slice, read_slice_hu
from triage.assemble.select import (
    SelectionResult,
    SeriesInfo,
    _matches,
    _ranked_below,
    _summary,
    describe_series,
    kernel_class,
    rejection,
    rejection_reason,
    select_series,
)
from triage.assemble.zprofile import canonical_z, profile_slices
from triage.config import AssemblySettings

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
    keep = {h.key for h in main.headers}
    slices = [s for s in slices if s.header.key in keep]
    n = np.asarray(main.normal)
    _order_slices(slices, n, uid)
    _check_gaps(slices, rules, uid)
    first = slices[0].header
    used_uids = list(dict.fromkeys(s.header.sop_instance_uid for s in slices))
    stack, positions = _decode_stack(slices)
    noise = _stack_noise(stack, first.slice_thickness)
    sub = stack[:, ::4, ::4]
    hu_stats = {
        "source_min": float(stack.min()),
        "source_max": float(stack.max()),
        "source_mean": float(stack.mean()),
        "source_p01": float(np.percentile(sub, 1)),
        "source_p99": float(np.percentile(sub, 99)),
    }
    del sub
    # in plane and along z are separate linear filters: the in-plane one runs on the shorter stack
    assert first.pixel_spacing is not None
    smooth_first = len(stack) < profile_slices(positions, n, uid)
    if smooth_first:
        stack, sigmas = inplane_antialias(stack, first.pixel_spacing)
    thickness = np.array([s.header.slice_thickness or 0.0 for s in slices])
    zp = canonical_z(stack, positions, n, uid, warnings, thickness)
    del stack
    profile = zp.stack
    if not smooth_first:
        profile, sigmas = inplane_antialias(profile, first.pixel_spacing)
    geom = _source_geometry(zp.positions, main, first, zp.spacing, uid)
    src = sitk.GetImageFromArray(profile)
    del profile
    # each profile slice's plane and z profile, for measuring the vertex on one common profile
    planes = np.column_stack([np.tile(n, (len(zp.positions), 1)), zp.positions @ n])

    # where the head is: a coarse axial grid over the whole acquisition, then the vertex refined
    centroid_xy, vertex_z, cut = _find_head(
        _resample_coarse(src, geom), src, geom.transform(), uid, (planes, zp.z_var)
    )
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
    content = head_content(hu_out)
    _judge_content(content, first, noise, rules, uid, warnings)

    tissue = hu_out > TISSUE_HU
    hu_stats["tissue_mean"] = float(hu_out[tissue].mean()) if tissue.any() else float("nan")
    hu_stats["above_window_fraction"] = float(np.mean(hu_out > WINDOW_MAX - WINDOW_OFFSET))
    source_steps = np.diff(positions @ n)
    source_geometry = {
        **geom.describe(),
        # the source slices (geom describes the z-profile stack the grid was sampled from)
        "n_slices": len(slices),
        "slice_spacing_mm": float(np.median(source_steps)),
        "first_position": [float(v) for v in positions[0]],
        "last_position": [float(v) for v in positions[-1]],
        "step_mm": [float(v) for v in (positions[-1] - positions[0]) / max(len(positions) - 1, 1)],
        "z_profile_slices": geom.n_slices,
        "n_files": len(slices),
        "slice_thickness_mm": first.slice_thickness,
        "gantry_detector_tilt": first.gantry_tilt,
        "kernel": first.kernel,
        "transfer_syntaxes": sorted({s.header.transfer_syntax_uid for s in slices}),
        # each source slice (frame) in z order with its SOP UID: the region score names the slice nearest
        # to its centre (triage.model.voxelmap.nearest_source_slice) and key images are drawn on them
        "slice_positions_mm": [[float(v) for v in (s.header.position or ())] for s in slices],
        "slice_sop_instance_uids": [s.header.sop_instance_uid for s in slices],
        "smoothing_sigma_px": sigmas,
        "z_profile": zp.describe(),
        "brain_noise_hu": None if noise is None else round(noise, 2),
        "content": content.describe(),
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
        sop_instance_uids=used_uids,
    )


def _stack_noise(stack: np.ndarray, thickness: float | None) -> float | None:
    """Brain noise (:func:`brain_noise`) of five slices from the middle third of the stack."""
    n = stack.shape[0]
    picks = sorted({int(v + 0.5) for v in np.linspace(n / 3, 2 * n / 3, 5)} & set(range(n)))
    return brain_noise([stack[i] for i in picks], thickness)


def _judge_content(
    content: HeadContent,
    first: InstanceHeader,
    noise: float | None,
    rules: AssemblySettings,
    uid: str,
    warnings: list[str],
) -> None:
    """Refuse (or, with ``non_head_content = "warn"``, warn about) content that is not a head; warn
    where the headers disagree with the content, and about a sharp reconstruction."""
    if content.reason is not None:
        if rules.non_head_content == "reject":
            raise VolumeError(f"series {uid}: {content.reason}", "not_head")
        warnings.append(f"scored anyway (non_head_content = warn): {content.reason}")
    elif first.body_part and not _matches(first.body_part, rules.head_patterns):
        warnings.append(f"BodyPartExamined {first.body_part!r} names no head, but the content is a head")
    if noise is not None and noise > rules.sharp_noise_hu:
        warnings.append(
            f"sharp reconstruction: brain noise {noise:.1f} HU (4.5 mm slab equivalent) above "
            f"sharp_noise_hu {rules.sharp_noise_hu:g}; a bone or lung kernel scored as brain"
        )


def _check_series(slices: list[_Slice], rules: AssemblySettings) -> tuple[OrientationGroup, list[str]]:
    """One series of single-frame CT images with geometry, an axial main orientation, one matrix."""
    series_uids = sorted({s.header.series_uid for s in slices})
    if len(series_uids) > 1:
        raise VolumeError(
            f"files belong to {len(series_uids)} series ({', '.join(series_uids)}); give one series",
            "invalid",
        )
    uid = series_uids[0]
    wrong = sorted({s.header.sop_class_uid for s in slices} - {CT_IMAGE_STORAGE, *ENHANCED_CT_STORAGE})
    if wrong:
        names = ", ".join(_sop_class_name(c) for c in wrong)
        raise VolumeError(f"series {uid}: SOP class {names} is not CT Image Storage", "not_ct")
    for s in slices:
        h = s.header
        if h.position is None or h.orientation is None or h.pixel_spacing is None:
            bad = "; ".join(h.problems) or "no ImagePositionPatient, ImageOrientationPatient or PixelSpacing"
            raise VolumeError(f"series {uid}: {h.path}: no usable geometry ({bad})", "geometry")
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
            f"series {uid}: {len(main.headers)} image: no volume (a volume needs at least 2 slices)",
            "too_few_slices",
        )
    return main, warnings


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
            vol = build_volume(list(dict.fromkeys(h.path for h in main.headers)), rules)
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
            sel.why = f"{_summary(sel.series[uid], rules)}; the better-ranked candidates could not be built"
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
