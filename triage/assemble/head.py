"""Resampling helpers and where the head is: anti-aliasing, the coarse axial grid, centroid and vertex.

See :func:`_find_head` for why the vertex is extrapolated from the dome of the skull rather than
taken as the highest tissue voxel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

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


def inplane_antialias(stack: np.ndarray, pixel_spacing: Sequence[float]) -> tuple[np.ndarray, list[float]]:
    """The stack Gaussian-smoothed in plane along the axes that will be downsampled: sigma =
    (factor - 1) / 2 source pixels (factor = output / source spacing); each slice on its own (along z
    see :mod:`triage.assemble.zprofile`). ``pixel_spacing`` is (between rows, between columns).
    Separable sampled Gaussians truncated at 4 sigma, edges repeated (scipy, float32, in place on a
    copy): 1.8x faster than SimpleITK's DiscreteGaussian on 512x512 slices, same smoothing."""
    dr, dc = (float(v) for v in pixel_spacing)
    factors = (PIXEL_MM / dc, PIXEL_MM / dr)
    # below a quarter pixel the sampled kernel is the identity anyway: record 0, skip the filter
    sigmas = [s if s >= 0.25 else 0.0 for s in ((f - 1.0) / 2.0 for f in factors)]
    if not any(sigmas):
        return stack, sigmas
    out = np.array(stack, dtype=np.float32, copy=True)
    for axis, sg in ((2, sigmas[0]), (1, sigmas[1])):  # x (columns), y (rows)
        if sg:
            ndimage.gaussian_filter1d(out, sg, axis=axis, mode="nearest", truncate=4.0, output=out)
    return out, sigmas


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


@cache
def _itk_ball(radius: tuple[int, int, int]) -> np.ndarray:
    """SimpleITK's ``sitkBall`` structuring element of ``radius`` (x, y, z) as a bool array (z, y, x):
    a single voxel dilated by it, so the element is ITK's own, whatever its rounding rule."""
    rx, ry, rz = radius
    one = np.zeros((2 * rz + 1, 2 * ry + 1, 2 * rx + 1), dtype=np.uint8)
    one[rz, ry, rx] = 1
    return sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray(one), list(radius), sitk.sitkBall,
                                                    0, 1)).astype(bool)


def binary_opening_itk(mask: np.ndarray, radius: tuple[int, int, int]) -> np.ndarray:
    """``sitk.BinaryMorphologicalOpening(mask, radius, sitkBall, 0, 1)`` with scipy, voxel for voxel
    (ITK's erosion counts outside the image as foreground, its dilation as background), 4x faster on
    the coarse grid of a head CT (0.14 -> 0.03 s on 2 busy cores; it was the assembly's largest single
    step). ITK's own dilation (:func:`_find_head`) is faster than scipy's and stays."""
    ball = _itk_ball(radius)
    eroded = ndimage.binary_erosion(mask, ball, border_value=1)
    return ndimage.binary_dilation(eroded, ball, border_value=0)


def _head_mask(coarse: sitk.Image, uid: str) -> np.ndarray:
    """The head on the coarse grid: the largest connected component of tissue after an in-plane
    opening (which cuts thin table tops, head holders and cables), as a bool array (z, y, x)."""
    tissue = sitk.GetArrayViewFromImage(coarse) > TISSUE_HU
    mask = sitk.GetImageFromArray(tissue.astype(np.uint8))
    mask.CopyInformation(coarse)
    opened = sitk.GetImageFromArray(binary_opening_itk(tissue, (2, 2, 0)).astype(np.uint8))
    opened.CopyInformation(coarse)
    for candidate in (opened, mask):
        cc = sitk.RelabelComponent(sitk.ConnectedComponent(candidate), sortByObjectSize=True)
        labels = sitk.GetArrayFromImage(cc) == 1
        if labels.any():
            return labels
    raise VolumeError(f"series {uid}: no head tissue (> {TISSUE_HU:g} HU) in the acquisition", "not_head")


VERTEX_Z_VAR_MM2 = 20.0  # the common z profile (variance, mm^2) on which the vertex is measured: sigma 4.5 mm
CANONICAL_Z_VAR_MM2 = SLICE_MM**2 / 4.0  # box(4.5) * triangle(4.5), the canonical slab: 5.06 mm^2


def _dome_vertex(
    hu: np.ndarray, footprint: np.ndarray, z: np.ndarray, rough: float, src_var: float, target_var: float
) -> float | None:
    """The dome's vertex measured on the HU brought to the z profile of variance ``target_var``:
    the zero of sqrt(V(z)), V the tissue fraction above z, fitted 4-24 mm below the rough top, then
    again 6-26 mm below the first fit. None when no fit is usable."""
    extra = target_var - src_var
    blurred = (
        hu
        if extra <= 0.01
        else ndimage.gaussian_filter1d(
            hu, math.sqrt(extra) / float(z[1] - z[0]), axis=0, mode="nearest", truncate=3.0
        )
    )
    area = (np.clip((blurred + 1000.0) / 1000.0, 0.0, 1.0) * footprint).sum(axis=(1, 2))
    above = (np.cumsum(area[::-1])[::-1] - area / 2) * float(z[1] - z[0])  # trapezoid: volume above
    root = np.sqrt(np.maximum(above, 0.0))
    first = _fit_vertex(z, root, rough - 24.0, rough - 4.0)
    if first is None or abs(first - rough) > 10.0:
        return None
    second = _fit_vertex(z, root, first - 26.0, first - 6.0)
    return second if second is not None and abs(second - rough) <= 10.0 else first


def _fit_vertex(z: np.ndarray, root: np.ndarray, lo: float, hi: float) -> float | None:
    """Zero of the line fitted to sqrt(V(z)) for z in [lo, hi]; None when the fit is unusable."""
    sel = (z >= lo) & (z <= hi)
    if sel.sum() < 4:
        return None
    slope, intercept = np.polyfit(z[sel], root[sel], 1)
    return float(-intercept / slope) if slope < 0 else None


def _find_head(
    coarse: sitk.Image,
    hu_image: sitk.Image,
    transform: sitk.Transform,
    uid: str,
    z_profile: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[tuple[float, float], float, bool]:
    """Head centroid (x, y), vertex z (mm), and whether the top of the head looks cut off.

    The vertex is not the highest voxel above a threshold: with 4.5 mm slices that moves by up to a
    slice with the phase of the slices against the skull, so the same head scanned twice would be
    anchored differently. Near the top the skull is a dome, so the tissue volume above height z
    grows as (vertex - z)^2 and its square root is linear in z; a line fitted to sqrt(V(z)) between
    6 and 26 mm below the vertex (found once from the rough top, then again from the first fit),
    extrapolated to zero, gives the vertex to a fraction of a millimetre whatever the slice phase.
    V(z) integrates the tissue fraction clip((HU+1000)/1000, 0, 1) interpolated between slices.

    Blur-proof: the fraction saturates at 0 HU, so where bone (1000 HU, or the skull under a thin
    scalp) meets air the measured top rises with the z blur of the series, by about the mean absolute
    deviation of its slice profile: 7 mm slices put it 1 mm higher than 5 mm ones. So the vertex is
    measured on common z profiles: a Gaussian along z adds what the series' own profile at the top of the
    head lacks (``z_profile``: per slice its plane and profile variance,
    :attr:`triage.assemble.zprofile.ZProfile.z_var`: the canonical profile plus the box of the source
    cell, or of the reference cell it was topped up to) to reach ``VERTEX_Z_VAR_MM2`` (20 mm^2; 9.6 mm^2
    in the 7.4 mm stack), and again twice that. The rise is about linear in the profile's sigma, so the
    line through the two vertices, taken at the sigma of the canonical slab (``CANONICAL_Z_VAR_MM2``),
    gives the vertex a series with the canonical profile would have: the same (within 0.15 mm on the
    synthetic head) for 0.625 mm, 5 mm and two-stack 4/7 mm series.

    A dome's cross-section 2 mm below its top is a small fraction (about a tenth) of the one 20 mm
    below; a head cut by the top of the scan has nearly the same cross-section at both levels.
    """
    labels = _head_mask(coarse, uid)
    origin = np.asarray(coarse.GetOrigin())
    spacing = np.asarray(coarse.GetSpacing())
    zi, yi, xi = np.nonzero(labels)
    z_mm = origin[2] + zi * spacing[2]
    rough = float(z_mm.max())

    # the HU on a fine axial grid around the top of the head, restricted to the (dilated) head
    near = z_mm >= rough - 40.0
    top_xy = origin[:2] + np.array([xi[near].mean(), yi[near].mean()]) * spacing[:2]
    lo_xy = origin[:2] + (np.array([xi[near].min(), yi[near].min()]) - 4) * spacing[:2]
    hi_xy = origin[:2] + (np.array([xi[near].max(), yi[near].max()]) + 4) * spacing[:2]
    dz = 0.5
    below, above_top = 56.0, 24.0
    fine_origin = [float(lo_xy[0]), float(lo_xy[1]), rough - below]
    fine_spacing = [float(spacing[0]), float(spacing[1]), dz]
    n_fine = int((below + above_top) / dz) + 1
    size = [int((hi_xy[i] - lo_xy[i]) / spacing[i]) + 1 for i in range(2)] + [n_fine]
    identity = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    hu = sitk.GetArrayFromImage(
        sitk.Resample(
            hu_image,
            size,
            transform,
            sitk.sitkLinear,
            fine_origin,
            fine_spacing,
            identity,
            AIR_HU,
            sitk.sitkFloat32,
        )
    )
    src_var = _top_variance(z_profile, top_xy, rough)
    head_img = _dilated_near(labels, coarse, fine_origin, fine_spacing, size)
    head_fine = sitk.GetArrayFromImage(
        sitk.Resample(
            head_img, size, sitk.Transform(), sitk.sitkNearestNeighbor, fine_origin, fine_spacing, identity, 0
        )
    )
    # the head's footprint in every fine slice: the blur spreads tissue above the head's own voxels,
    # and a mask that cut it there would make the measure depend on the blur again
    footprint = head_fine.max(axis=0)[None] * float(spacing[0] * spacing[1])
    z = fine_origin[2] + dz * np.arange(n_fine)
    v1 = _dome_vertex(hu, footprint, z, rough, src_var, VERTEX_Z_VAR_MM2)
    v2 = _dome_vertex(hu, footprint, z, rough, src_var, 2.0 * VERTEX_Z_VAR_MM2)
    vertex = rough
    if v1 is not None and v2 is not None:
        # back to the canonical profile: the vertex rises about linearly with the profile's sigma
        s1, s2, sc = (math.sqrt(v) for v in (VERTEX_Z_VAR_MM2, 2.0 * VERTEX_Z_VAR_MM2, CANONICAL_Z_VAR_MM2))
        fitted = v1 - (v2 - v1) * (s1 - sc) / (s2 - s1)
        vertex = fitted if abs(fitted - rough) <= 10.0 else v1
    elif v1 is not None:
        vertex = v1
    vertex = round(vertex, 3)  # to a micrometre: tissue far below the top must not move the grid by 1e-9 mm

    a_z = (head_fine * np.clip((hu + 1000.0) / 1000.0, 0.0, 1.0)).sum(axis=(1, 2))
    a_top = float(np.interp(rough - 2.0, z, a_z))
    a_below = float(np.interp(rough - 20.0, z, a_z))
    cut = a_below > 0 and a_top > 0.5 * a_below

    inside = z_mm >= vertex + VERTEX_MARGIN_MM - TARGET_SHAPE[0] * SLICE_MM
    cx = float(origin[0] + xi[inside].mean() * spacing[0])
    cy = float(origin[1] + yi[inside].mean() * spacing[1])
    return (cx, cy), vertex, cut


HEAD_DILATION = (3, 3, 1)  # voxels (x, y, z) of the coarse grid: the head's footprint near its top


def _dilated_near(labels: np.ndarray, coarse: sitk.Image, fine_origin: Sequence[float],
                  fine_spacing: Sequence[float], fine_size: Sequence[int]) -> sitk.Image:
    """The head mask dilated by ``HEAD_DILATION`` (ITK's ball), on the part of the coarse grid that the
    fine grid near the top of the head samples (nearest neighbour) and the dilation's reach around it.

    Why a crop: dilating the whole acquisition (the neck and a long scan range included) was a
    third of the head finder's time, and only the top 80 mm is looked at. Every sampled voxel keeps its
    whole ball inside the crop (or beyond the image's own edge, as before), so the sampled values are
    those of the whole grid's dilation, voxel for voxel (tests/unit/test_head_morphology.py)."""
    origin = np.asarray(coarse.GetOrigin())
    spacing = np.asarray(coarse.GetSpacing())
    dims = np.asarray(coarse.GetSize())  # (x, y, z)
    fo, fs, n = np.asarray(fine_origin), np.asarray(fine_spacing), np.asarray(fine_size)
    first = np.floor((fo - origin) / spacing).astype(int) - 1 - np.asarray(HEAD_DILATION)
    last = np.ceil((fo + (n - 1) * fs - origin) / spacing).astype(int) + 1 + np.asarray(HEAD_DILATION)
    lo, hi = np.maximum(first, 0), np.minimum(last, dims - 1)
    img = sitk.GetImageFromArray(labels[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1].astype(np.uint8))
    img.SetSpacing(coarse.GetSpacing())
    img.SetOrigin((origin + lo * spacing).tolist())
    img.SetDirection(coarse.GetDirection())
    return sitk.BinaryDilate(img, list(HEAD_DILATION), sitk.sitkBall, 0, 1)  # ITK's is the faster here


def _top_variance(z_profile: tuple[np.ndarray, np.ndarray] | None, xy: np.ndarray, rough: float) -> float:
    """The mean z-profile variance (mm^2) of the slices whose plane crosses the vertical line through
    ``xy`` within 40 mm below to 10 mm above the rough top of the head."""
    if z_profile is None:
        return VERTEX_Z_VAR_MM2
    planes, var = z_profile  # planes: (n, 4) = normal (3) and offset d of n . X = d
    n, d = planes[:, :3], planes[:, 3]
    zc = (d - n[:, 0] * xy[0] - n[:, 1] * xy[1]) / np.where(np.abs(n[:, 2]) > 1e-6, n[:, 2], 1e-6)
    sel = (zc >= rough - 40.0) & (zc <= rough + 10.0)
    if not sel.any():
        sel = np.abs(zc - rough) == np.abs(zc - rough).min()
    return float(var[sel].mean())
