"""Geometry and rendering: pixel centres from headers, slab-averaged images of the phantom, noise.

Why: every image is the phantom evaluated at the patient-space centre of each pixel (averaged across
the slice thickness), so the headers describe the pixels exactly, whatever the tilt or plane.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from training.synth.basics import _EDEMA, _LESION, _RESCALE_INTERCEPT
from training.synth.phantom import Phantom


def pixel_points(ipp: Any, iop: Any, pixel_spacing: Any, rows: int, cols: int) -> np.ndarray:
    """Patient coordinates (rows, cols, 3) of pixel centres, per DICOM C.7.6.2.1.1.

    PixelSpacing is [row spacing (between rows), column spacing]; IOP is [row direction (along a
    row, i.e. increasing column), column direction].
    """
    ipp = np.asarray(ipp, dtype=np.float64)
    iop = np.asarray(iop, dtype=np.float64)
    rowdir, coldir = iop[:3], iop[3:]
    r = np.arange(rows, dtype=np.float64)[:, None, None] * float(pixel_spacing[0])
    c = np.arange(cols, dtype=np.float64)[None, :, None] * float(pixel_spacing[1])
    return ipp + c * rowdir + r * coldir


def _render(
    ph: Phantom,
    ipps: list[np.ndarray],
    iop: np.ndarray,
    ps: tuple[float, float],
    rows: int,
    cols: int,
    thickness: float,
    nsub: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free HU stack (slab-averaged across the thickness) and a per-pixel lesion mask."""
    normal = np.cross(iop[:3], iop[3:])
    # Pixel centres are affine in (row, col), so build head coordinates directly from the plane's
    # origin and steps (float32 broadcasting) instead of transforming every patient point.
    rt = ph.rot.T
    e_c = (rt @ (iop[:3] * float(ps[1]))).astype(np.float32)
    e_r = (rt @ (iop[3:] * float(ps[0]))).astype(np.float32)
    rel = (np.arange(rows, dtype=np.float32)[:, None, None] * e_r
           + np.arange(cols, dtype=np.float32)[None, :, None] * e_c).reshape(-1, 3)  # fmt: skip
    offs = ((np.arange(nsub) + 0.5) / nsub - 0.5) * thickness
    out = np.empty((len(ipps), rows, cols), np.float32)
    les = np.zeros((len(ipps), rows, cols), bool)
    for k, ipp in enumerate(ipps):
        acc = np.zeros(rows * cols, np.float32)
        lk = np.zeros(rows * cols, bool)
        for o in offs:
            q0 = (rt @ (np.asarray(ipp, np.float64) + o * normal - ph.center)).astype(np.float32)
            h, lab = ph.sample_head(rel + q0)
            acc += h
            lk |= lab == _LESION
            lk |= lab == _EDEMA
        out[k] = (acc / nsub).reshape(rows, cols)
        les[k] = lk.reshape(rows, cols)
    return out, les


def _blur(x: np.ndarray) -> np.ndarray:
    """3x3 binomial blur over the last two axes (edge-replicated); numpy-only on purpose."""
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    y = p[..., :-2, :] + 2 * p[..., 1:-1, :] + p[..., 2:, :]
    return (y[..., :-2] + 2 * y[..., 1:-1] + y[..., 2:]) / 16.0


def _soft_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Correlated noise like a soft-tissue kernel's (blurred white noise rescaled to sigma)."""
    if sigma <= 0:
        return np.zeros(shape, np.float32)
    white = rng.standard_normal(shape, dtype=np.float32)
    return (_blur(white) * np.float32(sigma / 0.375)).astype(np.float32)


def _to_raw(hu: np.ndarray, signed: bool) -> np.ndarray:
    raw = np.rint(hu - _RESCALE_INTERCEPT)
    if signed:
        return np.clip(raw, -32768, 32767).astype(np.int16)
    return np.clip(raw, 0, 4095).astype(np.uint16)


def _r(x: Any, nd: int = 4) -> list[float]:
    """Round for DS (max 16 chars); the rounded values are also what gets sampled, so truth stays exact."""
    return [round(float(v), nd) + 0.0 for v in np.ravel(x)]
