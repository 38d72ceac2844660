"""Along the slices: every series brought to one z profile, the canonical slab, whatever its spacing.

The rule (issue 11: a 0.625 mm series, a 5 mm series and GE's two-stack 4/7 mm series of one head must
give the same volume). A canonical voxel holds the head's HU integrated along z over the canonical
profile ``K``: the 4.5 mm slab (a box) convolved with a 4.5 mm triangle (the blur that linear
interpolation onto the 4.5 mm grid gives a 4.5 mm series on average over slice phases: the profile the
models were first trained on). Variance of ``K``: 4.5^2/12 + 4.5^2/6 = 5.06 mm^2 along z.

A series does not hold the head's HU along z, it holds one average per slice. So:

1. **Each slice is a cell average.** Slice i stands for the mean HU over its cell, the interval between
   the midpoints to its neighbours along the line of slice positions (the ends: half a step out). For
   contiguous reconstructions (thickness = spacing: 0.625 mm helical, 5 mm axial, each stack of GE's
   4/7 mm protocol) that is exactly what the scanner wrote; a missing thin slice widens its neighbours'
   cells; an overlapping reconstruction (thickness > spacing) keeps the extra blur of its thickness.
2. **The continuous profile between is reconstructed conservatively and without new extrema**: in
   each cell a quadratic with the cell's mean (so every slice's average is reproduced exactly: the
   reconstruction conserves what each slice says) and edge values from PCHIP's (Fritsch-Carlson)
   weighted harmonic mean of the two neighbouring cells (0 next to air: air stays air), limited as in
   Colella and Woodward's piecewise parabolic method so the quadratic has no extremum inside the cell
   (a cell that is itself a local extremum is flat). Its integral ``F`` of ``HU + 1024`` is a
   monotone piecewise cubic. For cells much thinner than the slab this is the slab average of the
   slices with partial cells at its ends (the old thin-series rule); for cells as thick as the slab
   or thicker (5 mm, the 7.4 mm upper stack) it places each slice's content within its cell from its
   neighbours, where linear interpolation between slice centres added a triangle of the cell's width
   on top of the cell's own box (13.6 mm^2 for the 7.4 mm stack against 5.06 for ``K``: the skull's
   tail reached several millimetres further into the brain window). Without the limiter (PCHIP of
   ``F`` alone) the profile rang under the skull: brain 30 HU too dark below a 7.4 mm bone cell.
3. **It is integrated over ``K``**: the box as a difference of ``F`` at +-2.25 mm, sampled every
   ``SLICE_MM / 4`` (1.125 mm) along the line of positions, then the triangle as the discrete
   ``(1, 2, 3, 4, 3, 2, 1) / 16`` on those samples; the trilinear interpolation onto the 4.5 mm grid that
   follows adds u^2/6 on average, so discrete triangle plus interpolation have the continuous triangle's
   variance (2.5 u^2 + u^2/6 = 4.5^2/6).

4. **It is brought to a reference z resolution** (assemble-5; the 7.5 mm reference since assemble-6). What
   no reconstruction can do is put back what a cell averaged away: a slice says nothing about where in its
   cell its content lies, so every series keeps its cells' own box (cell^2/12) on top of ``K``: 0.03 mm^2
   for 0.625 mm slices, 2.08 for 5 mm, 4.5 for the 7.4 mm stack. A model trained on 4-5 mm series learnt
   one blur, and its score follows the blur (bench/assembly_bench.py --equivalence: a 0.625 mm series of
   the same head scored 41-56 nats below the 5 mm one, the two-stack one 50-68 above, against a repeat s.d.
   of 9-13). So every sample is brought to ``K`` plus the box of ``REFERENCE_CELL_MM``: 7.5 mm, the
   coarsest routine protocol (the upper stack of GE's 4/7 mm two-stack protocol is 7.4 mm along z), not the
   commonest 5 mm. Coarse cells cannot be sharpened, only fine ones blurred, so only the coarsest routine
   cell gives every series up to 7.5 mm one z resolution and a score that does not depend on the protocol:
   with the 5 mm reference (assemble-5) the two-stack series still scored +46.6 nats against the 5 mm one
   (s.d. 13), "more normal", its lesions under-flagged; with a 7.38 mm reference both scored -557.4 and
   -559.9, inside the spread (that fp32 model set; with a better-trained bf16 set a -167 nats gap remains,
   which is not z blur but the vertex seen through 7.4 mm cells: docs/measurements.md, equivalence). The
   price: every study is a little blurrier along z, the effective profile's variance 7.1 -> 9.8 mm^2 (on a
   grid of 4.5 mm slices anyway), and the models are retrained on the new volumes. A sample's own source
   blur is the variance of the boxes of the cells under its ``K`` (each cell's box, or its SliceThickness
   where that is wider: an overlapping reconstruction, thickness > spacing, already averages its thickness
   and the cell reconstruction cannot undo it), and what it lacks of 7.5^2/12 mm^2 is added as a discrete
   box on the 1.125 mm samples (a centred box of ``beta`` samples, its partial end samples weighted by
   their overlap, ``beta`` solved so its variance is exactly the missing one; convolved with the triangle
   into one kernel per sample). Its weights are non-negative and sum to 1: the mean is kept, no new
   extrema, air stays air (all-air samples are exactly 0 in ``F``'s differences). A 7.5 mm series needs
   nothing and gets ``K`` alone; a 5 mm series gets (7.5^2 - 5^2)/12 = 2.60 mm^2 more (a 5.6 mm box), a
   0.625 mm series a 7.5 mm box, the 7.4 mm upper stack almost nothing. Where the source is coarser than
   the reference nothing is added or can be taken away: ``z_resolution_mm`` (in ``describe()``, the
   volume's ``source_geometry.z_profile``) records the coarsest effective slice; such a series is blurrier
   along z than the models expect, and one wider than ``COARSE_FACTOR`` (1.2: 9 mm, beyond any routine
   protocol) reference cells is a warning carried into the JSON and the SR.

Nothing here depends on the series being thin or thick: one rule for every spacing from 0.5 to 8 mm,
uniform or not. Measured on the synthetic head (tests/unit/test_real_series.py, noise-free): 0.625 mm
and two-stack series within 0.38 and 1.00 grey levels of the 5 mm one inside the head (assemble-6; the
5 mm reference of assemble-5: 0.40 and 1.19; without step 4, assemble-4: 0.91 and 1.26).

The slab is 4.5 mm along a vertical line: along the line of positions (direction ``d``, the table's
motion; slice normal ``n``) that is ``4.5 |n_z| / |d . n|`` (4.5 mm for a gantry tilt with the table
along z; 4.5 cos(tilt) for slices stepped along a tilted normal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from triage.assemble.common import AIR_HU, SLICE_MM, SPACING_TOLERANCE, VolumeError, _fmt

SLAB_SAMPLES = 4  # samples of the profile stack per slab width (every 1.125 mm along z)
TRIANGLE = np.array([1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0]) / 16.0  # a triangle of half-width 4 samples
# variance along z (mm^2) of K as this module applies it, the final linear interpolation included
PROFILE_VAR_MM2 = SLICE_MM**2 / 12.0 + (2.5 + 1.0 / 6.0) * (SLICE_MM / SLAB_SAMPLES) ** 2
# the reference z resolution (module docstring, step 4): every sample's own blur is topped up to this
# cell's box (REFERENCE_CELL_MM^2 / 12 on top of K) where the source is finer
REFERENCE_CELL_MM = 7.5  # the coarsest routine protocol (step 4), not the commonest
MIN_EXTRA_SAMPLES2 = 1e-4  # a top-up below this (samples^2; 1.3e-4 mm^2) is float noise: none
COARSE_FACTOR = 1.2  # an effective slice wider than this many reference cells (9 mm) is warned about


@dataclass(frozen=True)
class ZProfile:
    """A stack on the canonical z profile, and what it came from."""

    stack: np.ndarray  # float32 (slices, rows, columns), HU, uniform steps along the line of positions
    positions: np.ndarray  # (slices, 3) ImagePositionPatient of each profile slice
    spacing: float  # step along the slice normal (mm)
    z_var: np.ndarray  # per profile slice: variance (mm^2, along a vertical line) of its z profile
    slab_slices: float  # the slab in source slices of the median step
    cells_mm: tuple[float, float]  # thinnest and thickest source cell along a vertical line (mm)
    z_resolution_mm: float = 0.0  # the coarsest effective slice (mm along z): the reference cell or more

    def describe(self) -> dict[str, object]:
        return {
            "rule": "cell averages -> PPM-limited parabolas -> 4.5 mm box * 4.5 mm triangle, topped up to "
            f"a {REFERENCE_CELL_MM:g} mm cell's box",
            "sample_mm": round(float(self.spacing), 4),
            "slab_source_slices": round(self.slab_slices, 3),
            "source_cells_mm": [round(v, 3) for v in self.cells_mm],
            "z_resolution_mm": round(self.z_resolution_mm, 3),
        }


def line_of_positions(positions: np.ndarray, uid: str) -> tuple[np.ndarray, np.ndarray]:
    """Where each (ordered) slice lies along the straight line of positions (mm from the first), and
    the line's direction; refused when a position is off the line (not one acquisition)."""
    p0 = positions[0]
    span = positions[-1] - p0
    length = float(np.linalg.norm(span))
    direction = span / length
    t = (positions - p0) @ direction
    off = np.linalg.norm(positions - (p0 + np.outer(t, direction)), axis=1)
    median = float(np.median(np.diff(t)))
    if float(off.max()) > SPACING_TOLERANCE * median + 0.05:
        worst = int(np.argmax(off))
        raise VolumeError(
            f"series {uid}: slice positions do not lie on a line (slice at {_fmt(positions[worst])} is "
            f"{off[worst]:.2f} mm off)",
            "geometry",
        )
    return t, direction


def spacing_warnings(t: np.ndarray, positions: np.ndarray, sample_mm: float) -> list[str]:
    """A warning per hole (a step half again as long as the longer of its neighbours: a missing slice,
    not a stack of a coarser spacing such as the upper stack of a two-stack protocol), and one for
    variable spacing otherwise; none for uniform steps."""
    steps = np.diff(t)
    median = float(np.median(steps))
    irregular = int(np.sum(np.abs(steps - median) > SPACING_TOLERANCE * median))
    if not irregular:
        return []
    padded = np.concatenate([[-np.inf], steps, [-np.inf]])
    neighbours = np.maximum(padded[:-2], padded[2:])
    neighbours = np.where(np.isfinite(neighbours), neighbours, median)  # the ends: the median
    holes = [i for i, st in enumerate(steps) if st > 1.5 * neighbours[i]]
    out = [
        f"interpolated across a {steps[i]:.2f} mm gap between z={positions[i][2]:.2f} and "
        f"z={positions[i + 1][2]:.2f} mm (slice spacing {median:.2f} mm)"
        for i in holes
    ]
    if len(holes) < irregular:
        out.append(
            f"variable slice spacing ({steps.min():.2f}-{steps.max():.2f} mm between positions) "
            f"resampled to {sample_mm:.2f} mm steps"
        )
    return out


def _sampling(t: np.ndarray, direction: np.ndarray, normal: np.ndarray) -> tuple[float, float, float, int]:
    """(mm along a vertical line per mm along the line, slab width along the line, sample step, samples)."""
    n_z = max(abs(float(normal[2])), 1e-6)
    to_vertical = max(abs(float(direction @ normal)), 1e-6) / n_z
    width = SLICE_MM / to_vertical
    u = width / SLAB_SAMPLES
    n_out = math.floor(float(t[-1] - t[0]) / u + 1e-9) + 1
    return to_vertical, width, u, n_out


def profile_slices(positions: np.ndarray, normal: np.ndarray, uid: str) -> int:
    """How many slices :func:`canonical_z` will return for these (ordered) positions."""
    t, direction = line_of_positions(positions, uid)
    return _sampling(t, direction, normal)[3]


def canonical_z(
    stack: np.ndarray,
    positions: np.ndarray,
    normal: np.ndarray,
    uid: str,
    warnings: list[str],
    thickness: np.ndarray | None = None,
    reference_cell_mm: float = REFERENCE_CELL_MM,
) -> ZProfile:
    """The stack (slices ordered along ``normal``, HU, float32; consumed: it holds HU + 1024 after) on
    the canonical z profile at the reference z resolution (module docstring), sampled every 1.125 mm
    along z on the line of positions; spacing warnings, and one for a series coarser than the
    reference, appended to ``warnings``. ``thickness``: each slice's SliceThickness (mm along the
    normal; 0 or NaN where unknown): an overlapping reconstruction's slice is blurred by its thickness,
    not by its cell. ``reference_cell_mm`` 0 leaves every series its own blur (the assemble-4 profile)."""
    t, direction = line_of_positions(positions, uid)
    to_vertical, width, u, n_out = _sampling(t, direction, normal)
    length = float(t[-1] - t[0])
    start = float(t[0]) + (length - (n_out - 1) * u) / 2.0  # centred: at most u/2 lost at each end
    steps = np.diff(t)
    edges = np.concatenate([[t[0] - steps[0] / 2], (t[:-1] + t[1:]) / 2, [t[-1] + steps[-1] / 2]])
    cells = np.diff(edges)
    warnings.extend(spacing_warnings(t, positions, u * to_vertical))
    vert_cells = cells * to_vertical
    blur = _source_blur_mm(vert_cells, thickness, normal)

    # each sample's source blur (variance of the boxes of the cells its K covers), and the discrete
    # box that tops it up to the reference cell's (module docstring, step 4)
    pad0 = (len(TRIANGLE) - 1) // 2 + SLAB_SAMPLES // 2
    x0 = start + (np.arange(n_out + 2 * pad0) - pad0) * u
    cell_var = _under_k(_cell_at(blur, edges, x0) ** 2 / 12.0, n_out)
    missing = np.maximum(reference_cell_mm**2 / 12.0 - cell_var, 0.0) / (SLICE_MM / SLAB_SAMPLES) ** 2
    missing[missing < MIN_EXTRA_SAMPLES2] = 0.0
    extra = [_box_weights(float(s)) for s in missing]
    reach = max((len(e) - 1) // 2 for e in extra)

    # F is needed at start + (k - 5 - reach) u, k = 0 .. n_out + 9 + 2 reach: the box around each
    # sample of the triangle (and of the top-up box)
    pad = pad0 + reach
    x = start + (np.arange(n_out + 2 * pad) - pad) * u
    profile = _CellProfile(stack, edges)
    f_x = [profile.integral(float(xk)) for xk in x]
    del profile
    box = [(f_x[k + SLAB_SAMPLES] - f_x[k]) / np.float32(width) for k in range(len(x) - SLAB_SAMPLES)]
    del f_x
    out = np.empty((n_out, *stack.shape[1:]), dtype=np.float32)
    for q in range(n_out):
        acc = out[q]
        # K's triangle convolved with the sample's top-up box ([1.0] at or coarser than the reference:
        # K alone, exactly the assemble-4 profile)
        e = (len(extra[q]) - 1) // 2
        weights = [np.float32(v) for v in np.convolve(TRIANGLE, extra[q])]
        first = q + reach - e
        np.multiply(box[first], weights[0], out=acc)
        for m in range(1, len(weights)):
            acc += weights[m] * box[first + m]
        acc += np.float32(AIR_HU)
    new_t = start + np.arange(n_out) * u
    new_positions = positions[0] + np.outer(new_t - t[0], direction)
    # the vertex is measured on a common profile (triage.assemble.head): K, plus the box of the source
    # cells under each sample (cell^2 / 12: what a cell's average cannot say about where in the cell
    # its content lies; 4.5 mm^2 for the 7.4 mm stack) or the reference cell's box that tops it up.
    # Counting it puts the vertices of 0.625 mm, 5 mm and two-stack series of one head within 0.15 mm
    effective = np.maximum(cell_var, reference_cell_mm**2 / 12.0)
    z_resolution = float(np.sqrt(12.0 * effective.max()))
    if reference_cell_mm > 0 and z_resolution > COARSE_FACTOR * reference_cell_mm:
        warnings.append(
            f"coarse z resolution: slices up to {z_resolution:.1f} mm (effective, along z), blurrier than "
            f"the {reference_cell_mm:g} mm the models expect; nothing can restore what they averaged away"
        )
    return ZProfile(
        stack=out,
        positions=new_positions,
        spacing=u * abs(float(direction @ normal)),
        z_var=PROFILE_VAR_MM2 + effective,
        slab_slices=float(width / np.median(steps)),
        cells_mm=(float(vert_cells.min()), float(vert_cells.max())),
        z_resolution_mm=z_resolution,
    )


def _source_blur_mm(
    vert_cells: np.ndarray, thickness: np.ndarray | None, normal: np.ndarray
) -> np.ndarray:
    """Each source slice's own blur along a vertical line, as a box width (mm): its cell, or its
    SliceThickness where that is wider (an overlapping reconstruction, thickness > spacing: each slice
    already averages more than its cell, and the cell reconstruction cannot undo that)."""
    if thickness is None:
        return vert_cells
    th = np.nan_to_num(np.asarray(thickness, dtype=float), nan=0.0)
    return np.maximum(vert_cells, th / max(abs(float(normal[2])), 1e-6))


def _cell_at(values: np.ndarray, edges: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``values`` (one per cell) at positions ``x`` along the line (the end cells beyond the ends)."""
    return values[np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(values) - 1)]


def _under_k(v: np.ndarray, n_out: int) -> np.ndarray:
    """A quantity ``v`` at the ``n_out + 10`` points F is taken at, averaged with K's weights around
    each of the ``n_out`` samples: over each box (trapezoid rule on its 5 points), then the triangle."""
    trapezoid = np.array([0.5, 1.0, 1.0, 1.0, 0.5]) / SLAB_SAMPLES
    return np.convolve(np.convolve(v, trapezoid, mode="valid"), TRIANGLE, mode="valid")[:n_out]


def _box_weights(s: float) -> np.ndarray:
    """Weights on consecutive samples of a box of ``beta`` samples (centred; its partial end samples
    weighted by their overlap) whose variance is exactly ``s`` (samples^2): the discrete top-up box.
    Non-negative, summing to 1: a convex combination (mean kept, no new extrema, air stays air).
    Between ``beta = 2n - 1`` and ``2n + 1`` the variance is ``(A + n^2 (beta - 2n + 1)) / beta`` with
    ``A = (n - 1) n (2n - 1) / 3``, solved for ``beta``; ``[1.0]`` for ``s = 0``."""
    if s <= 0.0:
        return np.ones(1)
    n = 1
    while s > ((n - 1) * n * (2 * n - 1) / 3.0 + 2 * n * n) / (2 * n + 1):
        n += 1
    a = (n - 1) * n * (2 * n - 1) / 3.0
    beta = (n * n * (2 * n - 1) - a) / (n * n - s)
    w = np.full(2 * n + 1, 1.0 / beta)
    w[0] = w[-1] = (beta - (2 * n - 1)) / (2.0 * beta)
    return w


class _CellProfile:
    """The piecewise quadratic z profile of every pixel column of a stack of cell averages, and its
    integral F. Edge values (:meth:`edge`) and each cell's limited pair (:meth:`limited`) are computed
    only for the cells F is asked about, once each (a thin series has more cells than samples)."""

    def __init__(self, stack: np.ndarray, edges: np.ndarray):
        # g = HU + 1024 >= 0, in place: the stack (float32) is consumed. float32: F over a slab differs
        # by < 0.01 HU from float64
        np.subtract(stack, np.float32(AIR_HU), out=stack)
        np.maximum(stack, np.float32(0.0), out=stack)
        self.g = stack
        self.edges = edges
        self.cells = np.diff(edges)
        self.f = np.empty((len(self.cells) + 1, *stack.shape[1:]), dtype=np.float32)
        self.f[0] = 0.0
        for k, c in enumerate(self.cells):
            np.add(self.f[k], np.float32(c) * self.g[k], out=self.f[k + 1])
        self._edge: dict[int, np.ndarray] = {}
        self._limited: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def edge(self, i: int) -> np.ndarray:
        """The profile's value at edge i: PCHIP's (Fritsch-Carlson) weighted harmonic mean of the two
        cells' values (0 where either is 0: air stays air); the end cells' own values at the ends."""
        if i not in self._edge:
            n = len(self.cells)
            if i == 0 or i == n:
                self._edge[i] = self.g[min(i, n - 1)]
            else:
                a, b = self.g[i - 1], self.g[i]
                h0, h1 = float(self.cells[i - 1]), float(self.cells[i])
                w1, w2 = np.float32(2 * h1 + h0), np.float32(h1 + 2 * h0)
                den = w1 * b + w2 * a
                num = np.float32(w1 + w2) * a * b
                self._edge[i] = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        return self._edge[i]

    def limited(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Cell j's left and right edge values, limited so its quadratic has no extremum inside the
        cell (Colella and Woodward's PPM monotonicity constraint): a cell that is itself a local
        extremum is flat; where the quadratic through the shared edge values would overshoot, the far
        edge is moved so it does not. The cell's mean is kept, so every slice's average is still
        reproduced, and the profile never dips below the brain under the skull (the ringing a cubic of
        the cumulative integral alone gave: 30 HU too dark under 7.4 mm slices)."""
        if j not in self._limited:
            g = self.g[j]
            a_l, a_r = self.edge(j), self.edge(j + 1)
            flat = (a_r - g) * (g - a_l) <= 0
            a_l = np.where(flat, g, a_l)
            a_r = np.where(flat, g, a_r)
            diff = a_r - a_l
            curv = diff * (g - (a_l + a_r) * np.float32(0.5))
            sq = diff * diff * np.float32(1.0 / 6.0)
            new_l = np.where(curv > sq, 3 * g - 2 * a_r, a_l)
            new_r = np.where(-sq > curv, 3 * g - 2 * a_l, a_r)
            self._limited[j] = (new_l, new_r)
        return self._limited[j]

    def integral(self, x: float) -> np.ndarray:
        """F(x): the integral of the profile from the first edge; before the first and after the last
        edge it continues with the end cells' values (the end slices repeated, as padding would)."""
        edges, n = self.edges, len(self.cells)
        if x <= edges[0]:
            return self.g[0] * np.float32(x - edges[0])
        if x >= edges[-1]:
            return self.f[-1] + self.g[-1] * np.float32(x - edges[-1])
        j = min(int(np.searchsorted(edges, x, side="right")) - 1, n - 1)
        c = float(self.cells[j])
        s = (x - float(edges[j])) / c
        h01, h10, h11 = s * s * (3 - 2 * s), s * (1 - s) ** 2, s * s * (s - 1)
        a_l, a_r = self.limited(j)
        out = self.g[j] * np.float32(c * h01)
        out += a_l * np.float32(c * h10)
        out += a_r * np.float32(c * h11)
        out += self.f[j]
        return out
