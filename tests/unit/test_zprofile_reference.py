"""The reference z resolution (assemble-6, :mod:`triage.assemble.zprofile` step 4): every series is
brought to the canonical profile plus a 7.5 mm cell's box (the coarsest routine protocol), so 0.625 mm
and 5 mm series are as blurred along z as a 7.5 mm one, a 7.5 mm series is untouched, a 5 mm one gets
exactly the variance it lacks, and the top-up keeps the mean, makes no new extrema and leaves air as
air.

The stacks here are one column of HU along z (cell averages of an analytic profile, as a scanner's
reconstruction gives them), so each property is measured exactly and fast; the same head as DICOM
series is in test_real_series.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from triage.assemble.zprofile import (
    PROFILE_VAR_MM2,
    REFERENCE_CELL_MM,
    _box_weights,
    canonical_z,
)

UP = np.array([0.0, 0.0, 1.0])
PHASES = np.linspace(0.0, 1.0, 8, endpoint=False)


def _cells(step: float, hu_of_cell, z0: float = 0.0, z1: float = 120.0) -> tuple[np.ndarray, np.ndarray]:
    """A 2x2-pixel stack of slices every ``step`` mm from z0 to z1, each the average of its cell."""
    zs = np.arange(z0, z1 + 1e-9, step)
    hu = np.array([hu_of_cell(z - step / 2, z + step / 2) for z in zs])
    stack = np.repeat(hu[:, None, None], 2, axis=1).repeat(2, axis=2).astype(np.float32)
    return stack, np.column_stack([np.zeros_like(zs), np.zeros_like(zs), zs])


def _step(edge: float, lo: float = 0.0, hi: float = 1000.0):
    """Cell average of a step from ``lo`` (below ``edge``) to ``hi``."""
    return lambda a, b: lo + (hi - lo) * float(np.clip((b - edge) / (b - a), 0.0, 1.0))


def _profile(step: float, hu_of_cell, **kw) -> tuple[np.ndarray, np.ndarray, list[str], object]:
    stack, pos = _cells(step, hu_of_cell)
    source = stack.copy()
    warnings: list[str] = []
    zp = canonical_z(stack, pos, UP, "test", warnings, **kw)
    return zp.stack[:, 0, 0].astype(float), zp.positions[:, 2], warnings, (zp, source)


def _edge_variance(step: float, **kw) -> float:
    """The z profile's variance (mm^2) measured on a step edge (the spread of the profile's derivative),
    averaged over 8 phases of the edge within a cell."""
    out = []
    for f in PHASES:
        g, z, _, _ = _profile(step, _step(60.0 + f * step), **kw)
        d = np.diff(g)
        zm = (z[1:] + z[:-1]) / 2
        w = d / d.sum()
        out.append(float((w * (zm - (w * zm).sum()) ** 2).sum()))
    return float(np.mean(out))


def test_box_weights_have_exactly_the_missing_variance() -> None:
    for s in (0.0, 0.05, 0.3, 2 / 3, 1.0, 1.646, 2.0, 3.5):
        w = _box_weights(s)
        j = np.arange(len(w)) - (len(w) - 1) // 2
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
        assert float((w * j * j).sum()) == pytest.approx(s, abs=1e-12)
        np.testing.assert_allclose(w, w[::-1])


def test_a_thin_series_is_as_blurred_along_z_as_a_5mm_one() -> None:
    """Measured: 5 mm 10.30 mm^2 (own blur: 7.69); 0.625 mm 9.68 (own blur: 5.02, 2.7 mm^2 sharper)."""
    thick = _edge_variance(5.0)
    thin, thin_before = _edge_variance(0.625), _edge_variance(0.625, reference_cell_mm=0.0)
    thick_before = _edge_variance(5.0, reference_cell_mm=0.0)
    print(f"edge variance: 5 mm {thick:.2f} (before {thick_before:.2f}), 0.625 mm {thin:.2f} "
          f"(before {thin_before:.2f}) mm^2")
    assert thick - thin_before > 2.0  # what the rule is for
    assert abs(thick - thin) < 1.0
    # the stated model: K plus the reference cell's box (the samples lack the final interpolation's u^2/6)
    assert thin == pytest.approx(PROFILE_VAR_MM2 - 1.125**2 / 6 + REFERENCE_CELL_MM**2 / 12, abs=0.3)
    # the training series' thicknesses come closer to the 5 mm one too
    assert abs(_edge_variance(4.0) - thick) < abs(_edge_variance(4.0, reference_cell_mm=0.0) - thick)


def test_a_series_at_the_reference_is_untouched() -> None:
    """A 7.5 mm series gets K alone, bit for bit the profile without a reference."""
    for f in PHASES[:3]:
        new, _, warnings, (zp, _) = _profile(7.5, _step(60.0 + f * 7.5))
        old, _, _, _ = _profile(7.5, _step(60.0 + f * 7.5), reference_cell_mm=0.0)
        np.testing.assert_array_equal(new, old)
        assert zp.z_resolution_mm == pytest.approx(7.5) and not warnings


def test_a_5mm_series_gets_exactly_the_variance_it_lacks() -> None:
    """(7.5^2 - 5^2) / 12 = 2.60 mm^2 along z on top of its own blur; measured 2.604."""
    added = _edge_variance(5.0) - _edge_variance(5.0, reference_cell_mm=0.0)
    print(f"5 mm series: {added:.3f} mm^2 added")
    assert added == pytest.approx((REFERENCE_CELL_MM**2 - 5.0**2) / 12.0, abs=0.05)


def _bump(a: float, b: float) -> float:
    """Cell average of air with a 1000 HU slab on [50, 53] and 35 HU on [53, 70]."""
    def overlap(lo: float, hi: float) -> float:
        return max(0.0, min(b, hi) - max(a, lo))

    return -1024.0 + (2024.0 * overlap(50.0, 53.0) + 1059.0 * overlap(53.0, 70.0)) / (b - a)


@pytest.mark.parametrize("step", [0.625, 1.25, 3.0])
def test_the_top_up_keeps_the_mean_makes_no_extrema_and_air_stays_air(step: float) -> None:
    g, z, _, (zp, source) = _profile(step, _bump)
    u = float(np.diff(z).mean())
    total_in = float(((source[:, 0, 0].astype(float) + 1024.0) * step).sum())
    total_out = float(((g + 1024.0) * u).sum())
    assert total_out == pytest.approx(total_in, rel=1e-4)
    assert g.min() >= float(source.min()) - 1e-3 and g.max() <= float(source.max()) + 1e-3
    far = (z < 50.0 - 12.0) | (z > 70.0 + 12.0)  # beyond the slab, K and the top-up box
    assert (g[far] == -1024.0).all()
    assert zp.z_resolution_mm == pytest.approx(REFERENCE_CELL_MM)


def test_an_overlapping_reconstruction_counts_its_thickness() -> None:
    """7.5 mm slices every 2.5 mm: each slice already averages 7.5 mm, so nothing is added."""
    stack, pos = _cells(2.5, _step(61.3, hi=1000.0))
    thick = np.full(len(stack), 7.5)
    a = canonical_z(stack.copy(), pos, UP, "t", [], thick)
    b = canonical_z(stack.copy(), pos, UP, "t", [], thick, reference_cell_mm=0.0)
    c = canonical_z(stack.copy(), pos, UP, "t", [])  # thickness unknown: its 2.5 mm cell is topped up
    np.testing.assert_array_equal(a.stack, b.stack)
    assert not np.array_equal(a.stack, c.stack)


def test_a_coarse_series_is_left_as_it_is_and_warned_about() -> None:
    g, _, warnings, (zp, _) = _profile(10.0, _step(61.3))
    old, _, old_warnings, _ = _profile(10.0, _step(61.3), reference_cell_mm=0.0)
    np.testing.assert_array_equal(g, old)
    assert zp.z_resolution_mm == pytest.approx(10.0)
    assert any(w.startswith("coarse z resolution: slices up to 10.0 mm") for w in warnings), warnings
    assert not old_warnings
    _, _, warnings, (zp, _) = _profile(7.38, _step(61.3))  # GE's upper stack: topped up to 7.5 mm
    assert zp.z_resolution_mm == pytest.approx(REFERENCE_CELL_MM) and not warnings
    g, _, warnings, (zp, _) = _profile(8.5, _step(61.3))  # coarser, but under 1.2 x 7.5 = 9 mm
    old, _, _, _ = _profile(8.5, _step(61.3), reference_cell_mm=0.0)
    np.testing.assert_array_equal(g, old)
    assert zp.z_resolution_mm == pytest.approx(8.5) and not warnings
