"""Region score from log-ratio maps: windows, per-position calibration, where the minimum lands."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from triage.model.voxelmap import (
    RegionCalibration,
    RegionScorer,
    box_mean,
    fit_region_calibration,
    model_index_to_canonical,
    model_spacing_mm,
    window_voxels,
)

SHAPE = (16, 32, 32)
SPACING = model_spacing_mm(SHAPE)  # 9 x 6.875 x 6.875 mm


def noise_maps(n: int, seed: int) -> np.ndarray:
    """Normals' log-ratio maps: position-dependent offset and spread (like air vs brain) plus noise."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    offset = 0.3 * xx - 0.2 * zz
    spread = 0.05 + 0.5 * np.exp(-(xx**2 + yy**2 + zz**2) * 2)
    return offset + spread * rng.standard_normal((n, *SHAPE))


def test_window_voxels_are_odd_and_physical() -> None:
    assert model_spacing_mm((32, 64, 64)) == (4.5, 3.4375, 3.4375)
    assert window_voxels(10, (4.5, 3.4375, 3.4375)) == (3, 3, 3)
    assert window_voxels(40, (4.5, 3.4375, 3.4375)) == (9, 11, 11)
    assert window_voxels(1, (4.5, 3.4375, 3.4375)) == (1, 1, 1)
    for w in (5.0, 13.0, 27.0, 80.0):
        assert all(k % 2 == 1 for k in window_voxels(w, SPACING))


def test_box_mean_matches_brute_force_at_the_borders_too() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn((1, 5, 7, 6), generator=g, dtype=torch.float64)
    size = (3, 5, 1)
    got = box_mean(m, size)[0]
    want = torch.empty_like(got)
    for z in range(5):
        for y in range(7):
            for x in range(6):
                want[z, y, x] = m[0, max(0, z - 1):z + 2, max(0, y - 2):y + 3, x].mean()
    assert torch.allclose(got, want, atol=1e-12)


def test_region_minimum_is_found_where_the_change_was_put() -> None:
    """An analytic check of the whole chain: a negative blob inserted into a new normal-like map is the
    region (centre within a voxel or two), its score is far below the calibrated threshold, and fresh
    normals' percentiles are spread over 0..100 (the leave-one-out calibration is not optimistic)."""
    cal = fit_region_calibration(noise_maps(40, seed=1), SPACING, specificity=0.9)
    scorer = RegionScorer(cal)
    fresh = noise_maps(60, seed=2)
    normal_scores = np.array([scorer(torch.from_numpy(m)).score for m in fresh])
    share_flagged = float(np.mean(normal_scores < cal.threshold))
    assert 0.0 <= share_flagged <= 0.3  # about 1 - specificity on normals never seen
    d = fresh[0].copy()
    centre = (4, 22, 9)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    r2 = ((zz - centre[0]) * SPACING[0]) ** 2 + ((yy - centre[1]) * SPACING[1]) ** 2 \
        + ((xx - centre[2]) * SPACING[2]) ** 2
    d[r2 < 12.0**2] -= 1.5  # a 24 mm lesion that lowers log p(normal|x) per voxel
    reg = scorer(torch.from_numpy(d))
    assert reg.score < cal.threshold
    assert reg.score < normal_scores.min()
    assert np.abs(np.array(reg.index_zyx) - np.array(centre)).max() <= 2
    assert reg.zmap.shape == SHAPE


def test_calibration_round_trips_through_bytes() -> None:
    cal = fit_region_calibration(noise_maps(5, seed=3), SPACING, specificity=0.8, windows_mm=(20.0,))
    back = RegionCalibration.from_bytes(cal.to_bytes())
    assert back.windows_mm == (20.0,)
    assert back.spacing_mm == pytest.approx(SPACING)
    assert np.array_equal(back.mean, cal.mean) and np.array_equal(back.sd, cal.sd)
    assert back.normal_scores == cal.normal_scores and back.threshold == cal.threshold
    assert back.sha256() == cal.sha256()
    assert (back.sd > 0).all()


def test_too_few_normals_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        fit_region_calibration(noise_maps(2, seed=4), SPACING, specificity=0.9)


def test_model_index_maps_to_canonical_voxel_centres() -> None:
    # cpu-small: 32x64x64 -> 32x128x128; model voxel 0 covers canonical 0..1, centred at 0.5
    assert model_index_to_canonical((0, 0, 0), (32, 64, 64)) == (0.0, 0.5, 0.5)
    assert model_index_to_canonical((31, 63, 10), (32, 64, 64)) == (31.0, 126.5, 20.5)
