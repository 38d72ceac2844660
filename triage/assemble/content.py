"""What the pixels say, whatever the headers say: is this a head, and how sharp is the reconstruction.

Header words (BodyPartExamined, descriptions, kernel names) are written by people and differ by
vendor, site and language: a thin-slice series named after a contrast protocol with no body part is
still a head, and a bone reconstruction whose kernel name no list knows is still sharp. So:

Head (:func:`head_content`, on the canonical HU volume)
    A slice shows a head when bone (> 300 HU) forms a closed-ish ring (closed with a 2-pixel disk)
    whose inside holds at least ``MIN_RING_MM2`` of tissue, and a head has such rings on at least
    ``MIN_RING_SLICES`` slices (18 mm). Inside the rings most tissue is brain density (0-80 HU). A
    phantom (water or air, no skull), another body part (no closed ring of bone around soft tissue)
    or a bone-window/bone-only image (a ring, but no brain-density inside) gets a reason naming what
    was found.

Sharpness (:func:`brain_noise`, on source slices)
    A bone or lung kernel shows as noise and edge energy inside brain tissue: the robust standard
    deviation (1.4826 x median absolute deviation) of the image minus its Gaussian-smoothed self
    (sigma 1.5 pixels; a Laplacian-like high pass) over brain-density pixels away from edges. Noise
    falls as one over the square root of the slice thickness, so it is scaled to the canonical 4.5 mm
    slab, which makes 0.625 mm and 5 mm soft reconstructions comparable; a series above
    ``sharp_noise_hu`` counts as sharp, and of two reconstructions of one acquisition the smoother
    wins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from triage.assemble.common import PIXEL_MM, SLICE_MM

BONE_HU = 300.0
BRAIN_HU = (0.0, 80.0)
MIN_RING_MM2 = 1500.0  # tissue enclosed by the skull on one slice (a 44 mm disk)
MIN_RING_SLICES = 4  # 18 mm of skull rings
MIN_BRAIN_FRACTION = 0.5  # of the tissue inside the rings
NOISE_SIGMA_PX = 1.5


@dataclass(frozen=True)
class HeadContent:
    """What the canonical volume shows: skull rings, brain-density tissue inside them, and a verdict."""

    ring_slices: int
    brain_ml: float  # brain-density tissue inside skull rings
    inside_ml: float  # all tissue (> -100 HU, < 300 HU) inside skull rings
    bone_ml: float
    tissue_ml: float  # everything above -500 HU
    extent_mm: tuple[float, float, float]  # bounding box of tissue (x, y, z)
    reason: str | None  # why this is not a head; None when it is

    @property
    def is_head(self) -> bool:
        return self.reason is None

    def describe(self) -> dict[str, Any]:
        return {
            "ring_slices": self.ring_slices,
            "brain_ml": round(self.brain_ml, 1),
            "inside_skull_ml": round(self.inside_ml, 1),
            "bone_ml": round(self.bone_ml, 1),
            "tissue_ml": round(self.tissue_ml, 1),
            "extent_mm": [round(v, 1) for v in self.extent_mm],
            "is_head": self.is_head,
        }


def head_content(hu: np.ndarray) -> HeadContent:
    """Judge the canonical HU volume (z, y, x; 1.72 x 1.72 x 4.5 mm voxels) for head content."""
    voxel_ml = PIXEL_MM * PIXEL_MM * SLICE_MM / 1000.0
    pixel_mm2 = PIXEL_MM * PIXEL_MM
    bone = hu > BONE_HU
    tissue = hu > -500.0
    soft = (hu > -100.0) & ~bone
    brain = (hu >= BRAIN_HU[0]) & (hu <= BRAIN_HU[1])
    disk = ndimage.generate_binary_structure(2, 1)
    disk = ndimage.iterate_structure(disk, 2)
    rings = 0
    brain_px = inside_px = 0
    for z in range(hu.shape[0]):
        if not bone[z].any():
            continue
        closed = ndimage.binary_closing(bone[z], structure=disk, border_value=0)
        inside = ndimage.binary_fill_holes(closed) & ~closed
        enclosed = int((soft[z] & inside).sum())
        if enclosed * pixel_mm2 >= MIN_RING_MM2:
            rings += 1
            inside_px += enclosed
            brain_px += int((brain[z] & inside).sum())
    zi, yi, xi = np.nonzero(tissue)
    extent = (
        (float(np.ptp(xi) + 1) * PIXEL_MM, float(np.ptp(yi) + 1) * PIXEL_MM, float(np.ptp(zi) + 1) * SLICE_MM)
        if zi.size
        else (0.0, 0.0, 0.0)
    )
    brain_ml, inside_ml = brain_px * voxel_ml, inside_px * voxel_ml
    bone_ml, tissue_ml = float(bone.sum()) * voxel_ml, float(tissue.sum()) * voxel_ml
    found = (
        f"{rings} slices with a skull ring, {brain_ml:.0f} ml brain-density tissue inside, "
        f"{bone_ml:.0f} ml bone (> {BONE_HU:g} HU), {tissue_ml:.0f} ml tissue, extent "
        f"{extent[0]:.0f} x {extent[1]:.0f} x {extent[2]:.0f} mm"
    )
    reason = None
    if rings < MIN_RING_SLICES:
        if bone_ml < 5.0:
            what = "no bone at all: a phantom or an object, not a head?"
        else:
            what = "bone that encloses no soft tissue: another body part?"
        reason = f"content is not a head: no skull ring around brain-density tissue ({found}; {what})"
    elif brain_ml < MIN_BRAIN_FRACTION * inside_ml:
        reason = (
            f"content is not a soft-tissue head image: only {100 * brain_ml / max(inside_ml, 1e-9):.0f}% "
            f"of the tissue inside the skull is brain density ({BRAIN_HU[0]:g}-{BRAIN_HU[1]:g} HU) "
            f"({found}; a bone-window or bone-only reconstruction?)"
        )
    return HeadContent(rings, brain_ml, inside_ml, bone_ml, tissue_ml, extent, reason)


def brain_noise(slices: Sequence[np.ndarray], thickness_mm: float | None) -> float | None:
    """High-frequency noise (HU) inside brain-density tissue of some source slices, scaled to a
    4.5 mm slab; None when the slices hold too little brain tissue to tell."""
    values: list[np.ndarray] = []
    for hu in slices:
        img = np.asarray(hu, dtype=np.float32)
        smooth = ndimage.gaussian_filter(img, NOISE_SIGMA_PX)
        mask = (smooth > 10.0) & (smooth < 60.0)
        mask = ndimage.binary_erosion(mask, iterations=4)
        if mask.sum() < 200:
            continue
        values.append((img - smooth)[mask])
    if not values:
        return None
    resid = np.concatenate(values)
    noise = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
    t = thickness_mm if thickness_mm and thickness_mm > 0 else SLICE_MM
    return noise * math.sqrt(min(t, SLICE_MM) / SLICE_MM)
