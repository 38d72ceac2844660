"""A water cylinder phantom (pattern "phantom"): what a QA scan through the head protocol looks like.

Why: a phantom scanned with the head protocol arrives with a head's headers, and a consumer that
trusts headers scores it like a patient.  This object has the same sampling interface as
:class:`training.synth.phantom.Phantom` (``sample``, ``sample_head``, ``center``, ``rot``), so every
renderer and distractor writer draws it unchanged: water (0 HU) in a thin acrylic wall, no skull
ring, no brain, and mostly air on a head-sized grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.synth.basics import _AIR, _BONE, _SOFT

# The canonical grid of triage.assemble (220 x 220 mm in plane, 144 mm along z, anchored at the top
# of the object).  The cylinder's length is chosen so that about this fraction of it is air, as in
# the QA scan issue 11 describes (92 % at 0 after the brain window).
CANONICAL_BOX_MM = (220.0, 220.0, 144.0)
TARGET_AIR_FRACTION = 0.92


@dataclass
class CylinderPhantom:
    """A water cylinder, axis along patient z, in an acrylic wall; duck-types ``Phantom`` for renderers."""

    center: np.ndarray  # centre of the cylinder (patient LPS, mm)
    radius: float  # outer radius of the wall (mm)
    length: float  # along z (mm)
    wall: float = 3.0  # acrylic (PMMA) wall thickness (mm)
    scalp: float = 0.0  # no skin: Phantom's margin around the radii
    water_hu: float = 0.0
    wall_hu: float = 120.0
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))
    lesion: None = None
    age: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def radii(self) -> np.ndarray:
        return np.array([self.radius, self.radius, self.length / 2.0])

    @property
    def top(self) -> float:
        return float(self.center[2]) + self.length / 2.0

    def to_head(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, np.float64).reshape(-1, 3) - self.center).astype(np.float32)

    def head_to_patient(self, q: np.ndarray) -> np.ndarray:
        return np.asarray(q, np.float64) + self.center

    def sample(self, points: np.ndarray, *, lesion: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """HU and tissue class at patient points (..., 3); ``lesion`` is accepted and ignored."""
        return self.sample_head(self.to_head(points))

    def sample_head(self, q: np.ndarray, *, lesion: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`sample` for points relative to the centre, (N, 3) float32."""
        q = np.asarray(q, np.float32)
        r = np.sqrt(q[:, 0] * q[:, 0] + q[:, 1] * q[:, 1])
        inside_z = np.abs(q[:, 2]) <= self.length / 2.0
        body = inside_z & (r <= self.radius)
        water = inside_z & (r <= self.radius - self.wall) & (np.abs(q[:, 2]) <= self.length / 2.0 - self.wall)
        hu = np.full(q.shape[0], -1000.0, np.float32)
        lab = np.full(q.shape[0], _AIR, np.uint8)
        hu[body] = self.wall_hu
        lab[body] = _BONE  # the wall is the only dense material; the class is nominal
        hu[water] = self.water_hu
        lab[water] = _SOFT
        return hu, lab

    def non_air_fraction(self) -> float:
        """Share of the canonical box (anchored at the cylinder's top) that the cylinder fills."""
        bx, by, bz = CANONICAL_BOX_MM
        area = math.pi * min(self.radius, bx / 2.0) ** 2
        return area * min(self.length, bz) / (bx * by * bz)


def make_cylinder(rng: np.random.Generator) -> CylinderPhantom:
    """A water cylinder of 18-21 cm diameter whose length leaves ~92 % of the canonical box air."""
    radius = float(rng.uniform(90.0, 105.0))
    bx, by, bz = CANONICAL_BOX_MM
    length = (1.0 - TARGET_AIR_FRACTION) * bx * by * bz / (math.pi * radius * radius)
    center = np.array([float(rng.normal(0, 3)), float(rng.uniform(-10, 10)), float(rng.uniform(-160, -90))])
    ph = CylinderPhantom(center=center, radius=radius, length=float(length))
    ph.meta = {
        "kind": "water_cylinder", "radius_mm": round(radius, 2), "length_mm": round(float(length), 2),
        "center_mm": [round(float(c), 2) for c in center], "wall_mm": ph.wall,
        "canonical_air_fraction": round(1.0 - ph.non_air_fraction(), 4),
    }  # fmt: skip
    return ph
