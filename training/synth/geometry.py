"""Where the primary series' slices lie: the planned stack for each acquisition pattern.

Why apart from the writers: the same stack drives the pixels, the headers (IPP, thickness, spacing),
the distractors that share the acquisition (the bone reconstruction) and the ground truth, so it is
computed once, as data (:class:`Stack`), for the standard protocol, a thin 0.625 mm series, the
two-stack GE protocol and the QA phantom scan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from training.synth.cylinder import CylinderPhantom
from training.synth.phantom import Phantom
from training.synth.render import _r

THIN_MM = 0.625
THIN_TILT_DEG = 8.5
THIN_SLICES = (200, 260)
TWO_STACK_TILT_DEG = 18.5
# (spacing = thickness, steps) of each stack, and the perpendicular step between the stacks.
TWO_STACKS = ((4.0, 13), (7.0, 13))
TWO_STACK_JOIN_MM = 1.08


@dataclass
class Stack:
    """The planned primary stack in spatial order (index 0 most inferior along the plane normal)."""

    iop: list[float]
    normal: np.ndarray
    centres: list[np.ndarray]  # plane centres (patient mm)
    ipps: list[np.ndarray]  # ImagePositionPatient of each plane (rounded as written)
    thicknesses: list[float]
    spacings: list[float]  # the nominal spacing of each plane's stack (SpacingBetweenSlices)
    tilt: float
    tilt_mode: str  # "none" | "normal" | "table"
    ps: tuple[float, float]
    rows: int
    cols: int

    @property
    def iop_a(self) -> np.ndarray:
        return np.asarray(self.iop)

    @property
    def thickness(self) -> float:
        return self.thicknesses[0]

    @property
    def spacing(self) -> float:
        return self.spacings[0]

    @property
    def step(self) -> np.ndarray:
        return self.centres[1] - self.centres[0]

    def __len__(self) -> int:
        return len(self.centres)


def _plan_primary(
    ph: Phantom, normal: np.ndarray, spacing: float, n_range: tuple[int, int] = (28, 40)
) -> tuple[float, int]:
    """Start distance along the normal and slice count covering skull base to vertex (28-40 slices)."""
    c_n = float(ph.center @ normal)
    ax, ay, az = (float(r) + ph.scalp for r in ph.radii)
    m = ph.rot.T @ normal
    top = c_n + math.sqrt((m[0] * ax) ** 2 + (m[1] * ay) ** 2 + (m[2] * az) ** 2) - 1.0
    floor = ph.head_to_patient(np.array([0.0, 35.0 * ph.scale[1], -58.0 * ph.scale[2]])) @ normal
    bottom = float(floor) - 3.0
    need = math.ceil((top - bottom) / spacing)
    n = int(np.clip(need, *n_range))
    # Spare slices go below the skull base (as in real scans), a shortfall is split between both ends.
    start = bottom - (n - need) * spacing if n >= need else bottom + (need - n) * spacing / 2.0
    return start, n


def _tilted_iop(tilt: float) -> tuple[list[float], np.ndarray]:
    t_rad = math.radians(tilt)
    iop = _r([1.0, 0.0, 0.0, 0.0, math.cos(t_rad), -math.sin(t_rad)], 6)
    iop_a = np.asarray(iop)
    normal = np.cross(iop_a[:3], iop_a[3:])
    return iop, normal / np.linalg.norm(normal)


def _stack(
    dists: list[float], iop: list[float], normal: np.ndarray, tilt: float, tilt_mode: str,
    ps: tuple[float, float], rows: int, cols: int, thicknesses: list[float], spacings: list[float],
) -> Stack:  # fmt: skip
    """Planes at signed distances ``dists`` along the normal; a "table" stack steps along z only."""
    fy = 0.0
    centres = []
    for d in dists:
        if tilt_mode == "table":
            centres.append(np.array([0.0, fy, (d - fy * normal[1]) / normal[2]]))
        else:
            f0 = np.array([0.0, fy, -fy * normal[1] / normal[2]])
            centres.append(f0 + d * normal)
    iop_a = np.asarray(iop)
    half = ((cols - 1) / 2.0) * ps[1] * iop_a[:3] + ((rows - 1) / 2.0) * ps[0] * iop_a[3:]
    ipps = [np.asarray(_r(c - half)) for c in centres]
    return Stack(iop, normal, centres, ipps, thicknesses, spacings, tilt, tilt_mode, ps, rows, cols)


def plan_standard(
    ph: Phantom, *, thickness: float, tilt: float, tilt_mode: str, ps: tuple[float, float], matrix: int
) -> Stack:
    """The routine head protocol: 28-40 contiguous slices of ``thickness`` from skull base to vertex."""
    iop, normal = _tilted_iop(tilt)
    start, n = _plan_primary(ph, normal, thickness)
    dists = [start + k * thickness for k in range(n)]
    return _stack(dists, iop, normal, tilt, tilt_mode, ps, matrix, matrix, [thickness] * n, [thickness] * n)


def plan_thin(ph: Phantom, *, fov: float, matrix: int) -> Stack:
    """A 0.625 mm series (200-260 slices) with the table stepping along z under an 8.5 degree tilt."""
    iop, normal = _tilted_iop(THIN_TILT_DEG)
    start, n = _plan_primary(ph, normal, THIN_MM, THIN_SLICES)
    ps = (fov / matrix, fov / matrix)
    dists = [start + k * THIN_MM for k in range(n)]
    thk = [THIN_MM] * n
    return _stack(dists, iop, normal, THIN_TILT_DEG, "table", ps, matrix, matrix, thk, list(thk))


def plan_two_stack(ph: Phantom, *, ps: tuple[float, float], matrix: int) -> Stack:
    """GE's classic head protocol: 4 mm over the posterior fossa, a short join, 7 mm above; 18.5 deg tilt."""
    iop, normal = _tilted_iop(TWO_STACK_TILT_DEG)
    start, _ = _plan_primary(ph, normal, TWO_STACKS[0][0])
    dists, thk = [start], [TWO_STACKS[0][0]]
    for j, (sp, steps) in enumerate(TWO_STACKS):
        if j:
            dists.append(dists[-1] + TWO_STACK_JOIN_MM)
            thk.append(sp)
        for _ in range(steps):
            dists.append(dists[-1] + sp)
            thk.append(sp)
    return _stack(dists, iop, normal, TWO_STACK_TILT_DEG, "table", ps, matrix, matrix, thk, list(thk))


def plan_cylinder(ph: CylinderPhantom, *, thickness: float, ps: tuple[float, float], matrix: int) -> Stack:
    """The QA scan: 28 axial slices from 10 mm above the cylinder down through it and the air below."""
    iop, normal = _tilted_iop(0.0)
    n = 28
    top = ph.top + 10.0
    dists = [top - (n - 1 - k) * thickness for k in range(n)]
    return _stack(dists, iop, normal, 0.0, "none", ps, matrix, matrix, [thickness] * n, [thickness] * n)
