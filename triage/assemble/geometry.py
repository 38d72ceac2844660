"""Slice geometry: orientation groups, ordering and spacing along the normal, the source voxel map.

Slices are ordered by ImagePositionPatient projected on the slice normal, never by InstanceNumber.
The source stack's voxel -> patient map is affine and exact for any gantry tilt (the slice step need
not be parallel to the normal), so resampling through its inverse gives a true axial grid.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from triage.assemble.common import (
    DUPLICATE_MM,
    ORIENTATION_TOLERANCE,
    SPACING_TOLERANCE,
    VolumeError,
)
from triage.assemble.headers import InstanceHeader, _normal
from triage.config import AssemblySettings

if TYPE_CHECKING:
    from triage.assemble.pixels import _Slice

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


def _order_slices(slices: list[_Slice], n: np.ndarray, uid: str) -> None:
    """Sort ``slices`` in place along the normal; two slices at one position are refused."""
    for s in slices:
        s.s = float(np.dot(s.header.position, n))
    slices.sort(key=lambda s: (s.s, s.header.key))
    for a, b in itertools.pairwise(slices):
        if b.s - a.s < DUPLICATE_MM:
            raise VolumeError(
                f"series {uid}: two slices at one position z={_z(a):.2f} mm "
                f"({_name(a)} and {_name(b)}); duplicate or overlapping acquisitions",
                "duplicate",
            )


def _z(s: _Slice) -> float:
    assert s.header.position is not None
    return s.header.position[2]


def _name(s: _Slice) -> str:
    h = s.header
    return h.path.name if h.frame_index is None else f"{h.path.name} frame {h.frame_index + 1}"


def gap_limit(rules: AssemblySettings, median_step: float) -> float:
    """The largest step between consecutive slices that is resampled rather than refused."""
    limit = rules.max_slice_gap_mm
    if rules.interpolate_gaps:  # the older rule, in slices: kept so a site that set it keeps it
        limit = max(limit, (rules.max_gap_slices + 1) * median_step * (1 + SPACING_TOLERANCE))
    return limit


def _check_gaps(slices: list[_Slice], rules: AssemblySettings, uid: str) -> None:
    """Refuse a hole: a step between consecutive (ordered) slices longer than :func:`gap_limit`.

    Steps are measured between slice positions (along the table for a tilted gantry), so a
    two-stack protocol (4 mm then 7 mm slices) or a thin series missing a slice passes and is
    resampled; only a step longer than the limit is refused, naming the two positions.
    """
    pos = np.array([s.header.position for s in slices], dtype=float)
    steps = np.linalg.norm(np.diff(pos, axis=0), axis=1)
    median = float(np.median(steps))
    limit = gap_limit(rules, median)
    for i in np.flatnonzero(steps > limit + 1e-6):
        step = float(steps[i])
        m = round(step / median)
        what = "gap"
        if m >= 2 and abs(step / median - m) <= SPACING_TOLERANCE:
            what = "missing slice" if m == 2 else f"{m - 1} missing slices"
        raise VolumeError(
            f"series {uid}: {what} between z={_z(slices[i]):.2f} and z={_z(slices[i + 1]):.2f} mm "
            f"(step {step:.2f} mm, spacing {median:.2f} mm): a hole longer than max_slice_gap_mm "
            f"{limit:g}",
            "missing_slices",
        )


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
    # ``positions`` are the z profile's evenly spaced sample planes (triage.assemble.zprofile), on the
    # line that line_of_positions already checked the source slices against: no second check here
    n_sl = positions.shape[0]
    step = (positions[-1] - positions[0]) / (n_sl - 1)
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
