"""Resampling helpers and where the head is: anti-aliasing, the coarse axial grid, centroid and vertex.

See :func:`_find_head` for why the vertex is extrapolated from the dome of the skull rather than
taken as the highest tissue voxel.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import SimpleITK as sitk

from triage.assemble.common import (
    AIR_HU,
    MASK_Z_MM,
    PIXEL_MM,
    SLICE_MM,
    TARGET_SHAPE,
    TISSUE_HU,
    VERTEX_MARGIN_MM,
    VolumeError,
)
from triage.assemble.geometry import _Geometry

SLAB_MIN_FACTOR = 1.5  # slices per canonical slab from which thin slices are averaged into slabs


def slab_weights(width: float) -> np.ndarray:
    """Weights of the samples -K..K of the canonical slice profile, ``width`` samples = one slab.

    A box ``width`` samples wide (each sample stands for the unit interval around it and weighs
    the part of it inside the box: the slab integrated, not point-sampled), convolved with a
    triangle of half-width ``width``: the blur that linear interpolation onto the 4.5 mm grid gives
    a 4.5 mm series on average over slice phases (variance h^2/6). So a thin series averaged here
    has the profile of the thick series the models were trained on, not a sharper one.
    """
    half = width / 2.0
    k_max = math.ceil(half - 0.5 - 1e-9)
    ks = np.arange(-k_max, k_max + 1, dtype=float)
    box = np.clip(np.minimum(ks + 0.5, half) - np.maximum(ks - 0.5, -half), 0.0, 1.0)
    t_max = math.ceil(width - 1e-9)
    tri = np.maximum(0.0, 1.0 - np.abs(np.arange(-t_max, t_max + 1, dtype=float)) / width)
    w = np.convolve(box, tri)
    return w / w.sum()


SLAB_SAMPLE_MM = 1.25  # the averaged stack is kept every this many mm at most (it is smooth in z)


def _slab_average(stack: np.ndarray, width: float, every: int = 1) -> np.ndarray:
    """Average thin slices into slabs ``width`` slices thick (the canonical 4.5 mm slab), centred on
    every ``every``-th slice (0, every, 2*every, ...); the ends repeat the first and last slice.
    Integrating over the slab gives the slice profile of a thick reconstruction, where
    point-sampling a thin stack would not. Computed as a weighted sum of strided views (no copies
    of the stack per output slice), in float32."""
    w = slab_weights(width).astype(np.float32)
    k_max = (len(w) - 1) // 2
    n = stack.shape[0]
    m = (n - 1) // every + 1
    padded = np.concatenate(
        [np.repeat(stack[:1], k_max, axis=0), stack, np.repeat(stack[-1:], k_max, axis=0)]
    )
    out = np.zeros((m, *stack.shape[1:]), dtype=np.float32)
    for k, wk in enumerate(w):
        # output j sits on source slice j*every; its tap k reads padded[j*every + k]
        out += wk * padded[k : k + (m - 1) * every + 1 : every]
    return out


def slab_profile(stack: np.ndarray, geom: _Geometry) -> tuple[np.ndarray, _Geometry, float]:
    """A series with at least 1.5 slices per 4.5 mm slab averaged over the slab profile
    (:func:`_slab_average`) and kept every ``SLAB_SAMPLE_MM`` at most (the profile is several mm
    wide, so nothing is lost, and everything after runs on fewer slices); thicker series as they are
    (their own profile is already a slab). Returns the stack, its geometry and the slab width in
    source slices (0 when not averaged). Done before the head is looked for, so the vertex of a
    thin series is found on the same profile as a thick one's."""
    step = max(abs(float(geom.step[2])), 1e-6)
    slab = SLICE_MM / step
    if slab < SLAB_MIN_FACTOR:
        return stack, geom, 0.0
    every = max(1, int(SLAB_SAMPLE_MM / step + 1e-6))
    out = _slab_average(stack, slab, every)
    if every == 1:
        return out, geom, slab
    m = geom.m.copy()
    m[:, 2] *= every
    coarser = replace(geom, m=m, n_slices=out.shape[0], slice_spacing=geom.slice_spacing * every)
    return out, coarser, slab


def _antialiased(stack: np.ndarray, geom: _Geometry) -> tuple[sitk.Image, list[float]]:
    """The stack as a SimpleITK image in index space, Gaussian-smoothed in plane along the axes that
    will be downsampled: sigma = (factor - 1) / 2 source pixels (factor = output / source spacing).
    Along the slices see :func:`slab_profile`."""
    dr, dc = geom.pixel_spacing
    factors = (PIXEL_MM / dc, PIXEL_MM / dr)
    # below a quarter pixel the sampled kernel is the identity anyway: record 0, skip the filter
    sigmas = [s if s >= 0.25 else 0.0 for s in ((f - 1.0) / 2.0 for f in factors)]
    img = sitk.GetImageFromArray(stack)
    if any(sigmas):
        img = sitk.DiscreteGaussian(img, [sg * sg for sg in (*sigmas, 0.0)], 32, 0.01, False)
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
