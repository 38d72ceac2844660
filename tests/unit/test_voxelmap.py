"""Region score from log-ratio maps: windows, per-position calibration, where the minimum lands."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from triage.model.voxelmap import (
    RegionCalibration,
    RegionScorer,
    _box_mean_torch,
    box_mean,
    fit_region_calibration,
    load_region_calibration,
    model_index_to_canonical,
    model_spacing_mm,
    search_mask,
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


@pytest.mark.parametrize("path", [box_mean, _box_mean_torch], ids=["cpu-scipy", "torch-cumsum"])
def test_box_mean_matches_brute_force_at_the_borders_too(path) -> None:
    """Both implementations (scipy's running sum on the CPU, torch's pooling on a GPU) against the
    definition, a box wider than the axis included."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn((2, 5, 7, 6), generator=g, dtype=torch.float64)
    size = (3, 5, 9)
    got = path(m, size)
    want = torch.empty_like(got)
    for b in range(2):
        for z in range(5):
            for y in range(7):
                for x in range(6):
                    box = m[b, max(0, z - 1):z + 2, max(0, y - 2):y + 3, max(0, x - 4):x + 5]
                    want[b, z, y, x] = box.mean()
    assert torch.allclose(got, want, atol=1e-12)
    m32 = m.float()
    assert path(m32, size).dtype == torch.float32
    assert torch.allclose(path(m32, size), want.float(), atol=1e-5)


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
    assert np.array_equal(back.min_mean, cal.min_mean) and np.array_equal(back.min_sd, cal.min_sd)
    assert back.sha256() == cal.sha256()
    assert (back.sd > 0).all()


def test_too_few_normals_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        fit_region_calibration(noise_maps(2, seed=4), SPACING, specificity=0.9)


def test_model_index_maps_to_canonical_voxel_centres() -> None:
    # cpu-small: 32x64x64 -> 32x128x128; model voxel 0 covers canonical 0..1, centred at 0.5
    assert model_index_to_canonical((0, 0, 0), (32, 64, 64)) == (0.0, 0.5, 0.5)
    assert model_index_to_canonical((31, 63, 10), (32, 64, 64)) == (31.0, 126.5, 20.5)


def skull_phantom(ring: bool = True, gap: int = 0) -> np.ndarray:
    """Canonical 7-bit volume: air, scalp, a 4-pixel skull ring (grey 127) around brain (grey 50) in the
    middle 20 slices; ``gap`` pixels cut out of the ring; ``ring=False``: soft tissue only."""
    v = np.zeros((32, 128, 128), dtype=np.uint8)
    yy, xx = np.meshgrid(np.arange(128) - 64, np.arange(128) - 64, indexing="ij")
    r = np.sqrt(yy**2 + xx**2)
    for k in range(6, 26):
        v[k][r < 56] = 60  # scalp
        v[k][r < 52] = 127 if ring else 60
        v[k][r < 48] = 50
        if gap:
            v[k][(np.abs(xx) < gap / 2 + 0.5) & (yy < -40)] = 0
    return v


def test_search_mask_is_the_cranial_cavity() -> None:
    m = search_mask(skull_phantom(), (32, 64, 64))
    assert m.shape == (32, 64, 64)
    assert m[15, 32, 32] and m[15, 32, 32 + 23]  # brain, up to the skull (a model pixel: 2 canonical)
    assert not m[15, 32, 32 + 25]  # the skull: saturated in the 7-bit window, not searched
    assert not m[15, 32, 32 + 27] and not m[15, 0, 0]  # scalp and air
    assert not m[2].any() and not m[30].any()  # slices without a head
    # a one-pixel gap in the ring (a suture, a burr hole) is closed
    assert search_mask(skull_phantom(gap=1), (32, 64, 64))[15, 32, 32]
    # no closed ring anywhere: the tissue, not the air
    t = search_mask(skull_phantom(ring=False), (32, 64, 64))
    assert t[15, 32, 32] and t[15, 32, 32 + 26] and not t[15, 0, 0]
    assert search_mask(np.zeros((32, 128, 128), np.uint8), (32, 64, 64)).all()  # nothing: everywhere
    assert search_mask(np.zeros((64, 64), np.uint8), (64, 64)).all()  # a radiograph: everywhere


def test_search_mask_treats_each_slice_alone_the_first_and_last_too() -> None:
    """The mask is computed for the whole volume in one call with a structure flat in z: it must equal
    closing and filling each axial slice on its own, also in the first and last slice (the array's
    border), and a ring in one slice must not fill the next one."""
    from scipy import ndimage

    v = skull_phantom()
    v[0], v[31] = v[15], v[15]  # rings in the border slices
    v[20][:, :] = 0  # a slice without a head between two with one
    shape = (32, 64, 64)
    got = search_mask(v, shape)
    small = v.astype(np.float32).reshape(32, 1, 64, 2, 64, 2).mean(axis=(1, 3, 5))
    ring = ndimage.generate_binary_structure(2, 1)
    want = np.stack([ndimage.binary_fill_holes(ndimage.binary_closing(sl >= 100, structure=ring))
                     for sl in small]) & (small < 100) & (small > 5)
    assert np.array_equal(got, want)
    assert got[0].any() and got[31].any() and not got[20].any()


def test_region_is_searched_only_inside_the_mask() -> None:
    cal = fit_region_calibration(noise_maps(30, seed=5), SPACING, specificity=0.9)
    d = noise_maps(1, seed=6)[0]
    d[0:3, 0:4, 0:4] -= 5.0  # a strong change in a corner (air around a head)
    d[8:11, 14:18, 14:18] -= 1.0  # a weaker one in the middle
    mask = np.zeros(SHAPE, dtype=bool)
    mask[4:14, 8:24, 8:24] = True
    scorer = RegionScorer(cal)
    everywhere = scorer(d)
    inside = scorer(d, mask)
    assert max(everywhere.index_zyx) <= 4  # the corner wins when everything is searched
    assert np.abs(np.array(inside.index_zyx) - np.array((9, 15.5, 15.5))).max() <= 2
    assert (inside.zmap[~mask] == 0).all()  # the overlay shows only where it searched


def test_levels_are_standardized_each_in_its_own_units() -> None:
    """A change in a quiet level is found although a noisy level's raw variance is 100x larger: added
    raw, the noisy level would hide it (what the finest level of a flow does to the raw map)."""
    rng = np.random.default_rng(7)

    def two_levels(n: int) -> np.ndarray:
        return np.stack([5.0 * rng.standard_normal((n, *SHAPE)), 0.05 * rng.standard_normal((n, *SHAPE))], 1)

    cal = fit_region_calibration(two_levels(30), SPACING, specificity=0.9)
    assert cal.levels == 2 and cal.mean.shape == (3, 2, *SHAPE)
    scorer = RegionScorer(cal)
    normals = np.array([scorer(m).score for m in two_levels(30)])
    d = two_levels(1)[0]
    d[1, 4:8, 20:26, 6:12] -= 0.25  # 5 s.d. of the quiet level, 0.05 s.d. of the noisy one
    reg = scorer(d)
    assert reg.score < normals.min()
    assert np.abs(np.array(reg.index_zyx) - np.array((5.5, 22.5, 8.5))).max() <= 2
    with pytest.raises(ValueError, match="calibrated for"):
        scorer(d[:1])


def test_an_older_rules_calibration_is_ignored_not_fatal(tmp_path) -> None:
    import hashlib
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, format=np.array("glowtriage.region/1"), mean=np.zeros((1, *SHAPE)))
    raw = buf.getvalue()
    (tmp_path / "region").mkdir()
    (tmp_path / "region" / "old.npz").write_bytes(raw)
    entry = {"file": "region/old.npz", "sha256": hashlib.sha256(raw).hexdigest()}
    manifest = {"calibration": {"region": entry}}
    assert load_region_calibration(tmp_path / "set", manifest) is None
    manifest["calibration"]["region"]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="hash"):
        load_region_calibration(tmp_path / "set", manifest)
