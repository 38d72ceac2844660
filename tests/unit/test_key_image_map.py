"""The key image's overlay: the region map sampled on a source slice must be the map at each pixel's
patient position, whatever the slice's tilt, the canonical grid's direction or the model grid's size."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from scipy.ndimage import map_coordinates

from triage.assemble.common import TARGET_SHAPE
from triage.report.keyimages import sample_map_on_slice


def _rotation(axis: int, deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _slice(rows: int, cols: int, tilt_deg: float, pos: list[float], spacing: tuple[float, float]) -> Dataset:
    rot = _rotation(0, tilt_deg)
    ds = Dataset()
    ds.Rows, ds.Columns = rows, cols
    ds.ImageOrientationPatient = [*(rot @ [1.0, 0, 0]).tolist(), *(rot @ [0, 1.0, 0]).tolist()]
    ds.ImagePositionPatient = pos
    ds.PixelSpacing = list(spacing)
    return ds


def _brute_force(ds: Dataset, zmap: np.ndarray, grid: dict) -> np.ndarray:
    """Each pixel's patient point (PS3.3 C.7.6.2.1.1), into the canonical grid's index, then the model's."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    pos = np.asarray(ds.ImagePositionPatient, dtype=float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    out = np.empty((ds.Rows, ds.Columns))
    d = np.asarray(grid["direction"], dtype=float).reshape(3, 3)
    factors = np.array([t / s for t, s in zip(TARGET_SHAPE, zmap.shape, strict=True)])
    for r in range(ds.Rows):
        for c in range(ds.Columns):
            p = pos + c * dc * row_dir + r * dr * col_dir
            idx = np.linalg.solve(d, p - np.asarray(grid["origin"])) / np.asarray(grid["spacing"])
            m = (idx[::-1] - (factors - 1) / 2) / factors
            out[r, c] = map_coordinates(zmap, m[:, None], order=1, mode="constant", cval=0.0)[0]
    return out


@pytest.mark.parametrize("model_shape", [(8, 32, 32), (32, 64, 64), tuple(TARGET_SHAPE)])
@pytest.mark.parametrize("tilt", [0.0, 18.5])
def test_map_on_slice_is_the_map_at_each_pixels_patient_point(model_shape: tuple[int, int, int],
                                                             tilt: float) -> None:
    rng = np.random.default_rng(int(tilt) + model_shape[0])
    zmap = rng.normal(0.0, 3.0, model_shape)
    direction = _rotation(2, 7.0) @ _rotation(0, -12.0)  # an oblique canonical grid
    grid = {"origin": [-110.0, -95.0, -60.0], "spacing": [1.72, 1.72, 4.5],
            "direction": direction.ravel().tolist()}
    ds = _slice(48, 40, tilt, [-100.0, -90.0, rng.uniform(-40, 60)], (4.9, 5.3))
    got = sample_map_on_slice(ds, zmap, grid)
    want = _brute_force(ds, zmap, grid)
    assert got.shape == (48, 40)
    assert np.abs(want).max() > 1.0 and (want == 0).any()  # the slice crosses the map and leaves it
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def _overlay_reference(hu: np.ndarray, z: np.ndarray, ring: tuple[float, float, float] | None,
                       window: tuple[float, float]) -> np.ndarray:
    """The overlay computed for every pixel: grey, blended where the map is below -Z_SHOW, the ring."""
    from triage.report.keyimages import ALPHA_MAX, Z_FULL, Z_SHOW

    lo = window[0] - window[1] / 2
    grey = np.clip((hu - lo) / window[1], 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    strength = np.clip((-z - Z_SHOW) / (Z_FULL - Z_SHOW), 0.0, 1.0)
    alpha = np.where(-z > Z_SHOW, 0.25 + (ALPHA_MAX - 0.25) * strength, 0.0)[..., None]
    colour = np.stack([np.ones_like(strength), 1.0 - strength, np.zeros_like(strength)], axis=-1)
    rgb = (1.0 - alpha) * rgb + alpha * colour
    if ring is not None:
        rr, cc = np.meshgrid(np.arange(hu.shape[0]), np.arange(hu.shape[1]), indexing="ij")
        on = np.abs(np.hypot(rr - ring[0], cc - ring[1]) - ring[2]) <= max(1.0, hu.shape[0] / 256)
        rgb[on] = (0.0, 1.0, 1.0)
    return np.round(rgb * 255).astype(np.uint8)


@pytest.mark.parametrize("ring", [None, (30.0, 20.5, 9.0), (2.0, 60.0, 25.0), (-40.0, -40.0, 5.0),
                                  (90.0, 10.0, 200.0)])
def test_overlay_is_the_per_pixel_blend(ring: tuple[float, float, float] | None) -> None:
    from triage.report.keyimages import overlay_rgb

    rng = np.random.default_rng(11)
    hu = rng.normal(40.0, 60.0, (96, 80))
    z = rng.normal(-2.0, 3.0, (96, 80))
    for window in ((40.0, 80.0), (0.5, 1.0)):
        got = overlay_rgb(hu if window[1] > 1 else hu / 200.0, z, ring, window)
        want = _overlay_reference(hu if window[1] > 1 else hu / 200.0, z, ring, window)
        assert got.dtype == np.uint8 and got.shape == (96, 80, 3)
        assert np.array_equal(got, want), int((got != want).any(axis=2).sum())
