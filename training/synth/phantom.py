"""The synthetic head: an analytic function of patient coordinates (:class:`Phantom`, :func:`make_phantom`).

Every structure is an implicit surface (ellipsoids, capsules, level sets of smooth random fields) in
a head frame that is shifted and rotated per subject; every image is made by evaluating the phantom
at the patient-space centre of each pixel, so geometry in the headers is exact by construction.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from training.synth.basics import (
    _AIR,
    _BONE,
    _CALC,
    _CSF,
    _FALX,
    _FAT,
    _GM,
    _SOFT,
    _WM,
    _jsonable,
    _rotation,
    _waves,
)
from training.synth.lesions import LesionSpec, _apply_lesion, _draw_lesion, _parse_lesion


@dataclass
class Phantom:
    """One subject's head as an analytic function of patient coordinates.

    Head frame: u = patient left, v = posterior, w = superior (mm), origin near the thalami.
    ``sample`` maps patient-space points to (HU, tissue class); it is the single source of every
    image this module writes, which is what keeps all series mutually and geometrically consistent.
    """

    center: np.ndarray
    rot: np.ndarray
    radii: np.ndarray  # outer-table half-axes (u, v, w-up)
    az_down: float  # lower half of the vault is stretched so the skull base slices stay wide
    scalp: float
    skull_t: float
    scale: np.ndarray  # landmark scale relative to a reference head
    hu: dict[str, float]
    csf_w: float
    sulc_hw: float
    sulc_depth: float
    gm_thk: float
    ihf_hw: float
    syl_hw: float
    vent_f: float
    gyri: tuple[np.ndarray, np.ndarray]
    texture: tuple[np.ndarray, np.ndarray]
    lowfreq: tuple[np.ndarray, np.ndarray]
    segments: list[tuple[np.ndarray, np.ndarray, float, float]]  # ventricle capsules
    calcs: list[tuple[list[float], float, float]]  # (centre, radius, HU)
    age: float
    lesion: LesionSpec | None
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- helpers in head coordinates -------------------------------------------------------------

    def to_head(self, points: np.ndarray) -> np.ndarray:
        """Head coordinates (N, 3) float32 of patient points (..., 3).

        Column-wise float32 arithmetic: an (N,3)@(3,3) float64 matmul is several times slower
        and sub-micrometre precision is irrelevant here.
        """
        pts = np.asarray(points).reshape(-1, 3)
        d = [(pts[:, i] - self.center[i]).astype(np.float32) for i in range(3)]
        r = self.rot.astype(np.float32)
        q = np.empty((pts.shape[0], 3), np.float32)
        for j in range(3):
            q[:, j] = d[0] * r[0, j] + d[1] * r[1, j] + d[2] * r[2, j]
        return q

    def head_to_patient(self, q: np.ndarray) -> np.ndarray:
        return np.asarray(q, dtype=np.float64) @ self.rot.T + self.center

    def _base(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Skull-base height: anterior fossa high, middle fossa dips laterally, posterior fossa low."""
        sx, sy, sz = self.scale
        vn, un = v / sy, np.abs(u) / sx
        base = -40.0 - 15.0 / (1 + np.exp(-(vn - 15.0) / 8.0)) + 20.0 / (1 + np.exp(-(-vn - 30.0) / 6.0))
        base -= 8.0 / (1 + np.exp(-(un - 25.0) / 5.0)) * np.exp(-(((vn + 5.0) / 18.0) ** 2))
        # Orbital roofs dome upwards either side of the (lower) cribriform plate.
        base += 5.0 * np.exp(-(((un - 28.0) / 16.0) ** 2)) / (1 + np.exp(-(-vn - 35.0) / 6.0))
        return (base * sz).astype(np.float32)

    def _thickness(self, u: np.ndarray, qn: np.ndarray) -> np.ndarray:
        """Skull thickness: thinner over the temporal squama (lateral), as in real skulls."""
        lat = u / np.maximum(qn, 1e-3)
        return (self.skull_t * (1.0 - 0.35 * lat * lat)).astype(np.float32)

    # ---- sampling -------------------------------------------------------------------------------

    def sample(self, points: np.ndarray, *, lesion: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """HU (float32) and tissue class (uint8) at patient-space points of shape (..., 3)."""
        return self.sample_head(self.to_head(points), lesion=lesion)

    def sample_head(self, q: np.ndarray, *, lesion: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`sample` but for head-frame points (N, 3) float32 (the renderers' fast path)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        n = q.shape[0]
        hu = np.full(n, -1000.0, np.float32)
        lab = np.zeros(n, np.uint8)
        u, v, w = (np.ascontiguousarray(q[:, i]) for i in range(3))
        ax, ay, az = (float(r) for r in self.radii)
        azw = np.where(w >= 0, np.float32(az), np.float32(az * self.az_down))
        rho = np.sqrt((u / ax) ** 2 + (v / ay) ** 2 + (w / azw) ** 2)
        qn = np.sqrt(u * u + v * v + w * w)
        # Radial distance to the outer table along the ray from the head origin (negative inside).
        # Exact for spheres and within a few % for these mildly eccentric ellipsoids and thin shells.
        d_o = qn - qn / np.maximum(rho, 1e-6)
        neck_top = -0.7 * az * self.az_down
        neck = (w < neck_top) & ((u / (0.62 * ax)) ** 2 + ((v - 0.1 * ay) / (0.7 * ay)) ** 2 < 1)
        body = (d_o < self.scalp) | neck
        bi = np.flatnonzero(body)
        if bi.size == 0:
            return hu, lab
        self._sample_body(q[bi], d_o[bi], qn[bi], hu, lab, bi, lesion)
        return hu, lab

    def _sample_body(
        self,
        q: np.ndarray,
        d_o: np.ndarray,
        qn: np.ndarray,
        hu_out: np.ndarray,
        lab_out: np.ndarray,
        idx: np.ndarray,
        with_lesion: bool,
    ) -> None:
        H = self.hu
        sz = float(self.scale[2])
        u, v, w = q[:, 0], q[:, 1], q[:, 2]
        hu = np.full(len(u), H["scalp"], np.float32)
        lab = np.full(len(u), _SOFT, np.uint8)
        # Subcutaneous fat: a thin hypodense layer under the skin, present in real scalps.
        fat = (d_o > 0.45 * self.scalp) & (d_o < 0.75 * self.scalp)
        hu[fat] = -60.0
        lab[fat] = _FAT

        base = self._base(u, v)
        t = self._thickness(u, qn)
        inside = d_o <= -t
        shell = (d_o < 0) & ~inside & (w > base - 20 * sz)
        if shell.any():
            frac = -d_o[shell] / t[shell]
            compact = (frac < 0.3) | (frac > 0.78)
            jitter = 60.0 * np.cos(0.35 * u[shell]) * np.cos(0.31 * v[shell] + 0.2 * w[shell])
            hu[shell] = np.where(compact, H["compact"], H["diploe"]) + jitter
            lab[shell] = _BONE
        plate_thk = 4.0 * sz
        plate = inside & (w <= base) & (w > base - plate_thk)
        hu[plate] = H["compact"] * 0.8 + 80.0 * np.cos(0.4 * u[plate] + 0.3 * v[plate])
        lab[plate] = _BONE
        below = inside & (w <= base - plate_thk)
        if below.any():
            self._skull_base_contents(u, v, w, base, plate_thk, below, hu, lab)

        ic = inside & (w > base)
        ii = np.flatnonzero(ic)
        if ii.size:
            hu_i, lab_i = self._intracranial(q[ii], d_o[ii], t[ii], base[ii], with_lesion)
            hu[ii] = hu_i
            lab[ii] = lab_i
        hu_out[idx] = hu
        lab_out[idx] = lab

    def _skull_base_contents(
        self,
        u: np.ndarray,
        v: np.ndarray,
        w: np.ndarray,
        base: np.ndarray,
        plate_thk: float,
        below: np.ndarray,
        hu: np.ndarray,
        lab: np.ndarray,
    ) -> None:
        """Sinuses, mastoid air cells and orbits: the bright/dark clutter of the lowest slices."""
        sx, sz = float(self.scale[0]), float(self.scale[2])
        ax, ay, _ = (float(r) for r in self.radii)
        ub, vb, wb = u[below], v[below], w[below]
        depth = base[below] - plate_thk - wb
        h = hu[below]
        lb = lab[below]
        sinus = (vb < -0.45 * ay) & (np.abs(ub) < 0.28 * ax) & (depth > 2.0)
        h[sinus] = -950.0
        lb[sinus] = _AIR
        mast = (np.abs(ub) > 0.62 * ax) & (vb > -0.05 * ay) & (vb < 0.35 * ay) & (depth < 22 * sz)
        cells = (np.cos(0.9 * ub) + np.cos(0.9 * vb) + np.cos(0.9 * wb)) > 0.8
        h[mast] = np.where(cells[mast], -800.0, 650.0)
        lb[mast] = np.where(cells[mast], _AIR, _BONE)
        for side in (-1.0, 1.0):
            c = np.array([side * 31 * sx, -0.74 * ay, 0.0], np.float32)
            cz = base[below] - plate_thk - 12 * sz
            d2 = (ub - c[0]) ** 2 + (vb - c[1]) ** 2 + (wb - cz) ** 2
            orbit_fat = d2 < (17 * sx) ** 2
            globe = d2 < (11.5 * sx) ** 2
            h[orbit_fat] = -85.0
            lb[orbit_fat] = _FAT
            h[globe] = 12.0
            lb[globe] = _SOFT
        hu[below] = h
        lab[below] = lb

    def _intracranial(
        self, q: np.ndarray, d_o: np.ndarray, t: np.ndarray, base: np.ndarray, with_lesion: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        H = self.hu
        sx, sy, sz = (float(s) for s in self.scale)
        ax, _, _ = (float(r) for r in self.radii)
        u, v, w = (np.ascontiguousarray(q[:, i]) for i in range(3))
        n = len(u)
        d_i = -d_o - t  # depth below the inner table
        ds = np.minimum(d_i, w - base)  # depth below the nearest dural surface
        dc = ds - self.csf_w  # depth into the brain

        # Smooth fields: medium texture (gray/white heterogeneity), low-frequency inhomogeneity and
        # beam-hardening-like brightening next to the skull -- so intensities are never constant.
        tk, tp = self.texture
        lk, lp = self.lowfreq
        field_ = _wave_sum(u, v, w, tk, tp) * np.float32(H["texture_amp"])
        field_ += _wave_sum(u, v, w, lk, lp) * np.float32(H["lowfreq_amp"])
        field_ += np.float32(H["cupping"]) * np.exp(-np.maximum(d_i, 0) / 6.0)

        gm = dc < self.gm_thk
        csf = ds < self.csf_w
        sulc_dist = np.full(n, np.inf, np.float32)
        # Sulci are cut relative to a depth that discounts the skull base, otherwise every axial slice
        # just above the (nearly horizontal) fossa floors would be a maze of sulci.
        dsul = np.minimum(d_i, 2.0 * (w - base)) - self.csf_w
        near = np.flatnonzero(dsul < self.sulc_depth + self.gm_thk)
        if near.size:
            gk, gp = self.gyri
            un, vn, wn = u[near], v[near], w[near]
            g = np.zeros(near.size, np.float32)
            gx, gy, gz = np.zeros_like(g), np.zeros_like(g), np.zeros_like(g)
            for (k0, k1, k2), ph0 in zip(gk.tolist(), gp.tolist(), strict=True):
                arg = un * k0 + vn * k1 + wn * k2 + ph0
                g += np.cos(arg)
                sn = np.sin(arg)
                gx -= sn * k0
                gy -= sn * k1
                gz -= sn * k2
            # |g| / |grad g| approximates the distance to the zero level set: even-width sulci.
            sulc_dist[near] = np.abs(g) / np.maximum(np.sqrt(gx * gx + gy * gy + gz * gz), 1e-3)
            dcn = dsul[near]
            sd = sulc_dist[near]
            gm[near] |= (sd < self.sulc_hw + self.gm_thk) & (dcn < self.sulc_depth + self.gm_thk)
            csf[near] |= (sd < self.sulc_hw) & (dcn < self.sulc_depth)

        # Interhemispheric fissure (above the corpus callosum, in front of the genu, behind the
        # splenium) with the falx in it; Sylvian fissures laterally with the insular cortex.
        fiss = (w > 18 * sz) | (v < -30 * sy) | ((v > 40 * sy) & (w > -8 * sz))
        au = np.abs(u)
        gm |= fiss & (au < self.ihf_hw + self.gm_thk)
        csf |= fiss & (au < self.ihf_hw)
        syl_region = (au > 0.42 * ax) & (v > -30 * sy) & (v < 12 * sy)
        syl_d = np.abs(w - (2 * sz + 0.35 * v + 2.5 * np.sin(0.12 * u + 0.05 * v)))
        gm |= syl_region & (syl_d < self.syl_hw + self.gm_thk)
        csf |= syl_region & (syl_d < self.syl_hw)

        hu = np.where(gm, H["gm"], H["wm"]).astype(np.float32) + field_
        lab = np.where(gm, _GM, _WM).astype(np.uint8)
        sa_csf = csf.copy()  # subarachnoid CSF (sulci, surface, fissures, cisterns): SAH target
        vent = np.zeros(n, bool)

        deep = np.flatnonzero((au < 48 * sx) & (v > -45 * sy) & (v < 55 * sy) & (w < 38 * sz))
        if deep.size:
            ud, vd, wd = u[deep], v[deep], w[deep]
            h_d, l_d = hu[deep], lab[deep]
            sa_d = sa_csf[deep]

            def ell(c: tuple[float, float, float], r: tuple[float, float, float]) -> np.ndarray:
                return (
                    ((ud - c[0] * sx) / (r[0] * sx)) ** 2
                    + ((vd - c[1] * sy) / (r[1] * sy)) ** 2
                    + ((wd - c[2] * sz) / (r[2] * sz)) ** 2
                ) < 1

            fd = field_[deep]
            for s in (-1.0, 1.0):
                for c, r, dh in (
                    ((12 * s, -16, 10), (4.5, 8, 8), 0.0),  # caudate head
                    ((21 * s, -2, 0), (6, 13, 9), -2.0),  # lentiform nucleus
                    ((9 * s, 12, 2), (8, 11, 8), -1.0),  # thalamus
                ):
                    m = ell(c, r)
                    h_d[m] = H["gm"] + dh + fd[m]
                    l_d[m] = _GM
            # Brainstem (midbrain/pons) and the CSF spaces around it.
            bs_r = ((ud / (11 * sx)) ** 2 + ((vd - 12 * sy) / (10 * sy)) ** 2) ** 0.5
            stem = (bs_r < 1) & (wd < -8 * sz)
            amb = (bs_r >= 1) & (bs_r < 1.22) & (wd < -6 * sz) & (wd > -26 * sz)
            cist = (ell((0, -4, -21), (16, 11, 6)) & ~stem) | amb | ell((0, 28, -10), (6, 5, 5))
            h_d[stem] = H["wm"] + 3.0 + fd[stem]
            l_d[stem] = _WM
            h_d[cist] = H["csf"]
            l_d[cist] = _CSF
            sa_d |= cist
            sa_csf[deep] = sa_d
            vd_mask = np.zeros(deep.size, bool)
            for side in (-1.0, 1.0):
                sel = np.flatnonzero(side * ud > 0.5)
                m = np.zeros(sel.size, bool)
                us, vs, ws = ud[sel], vd[sel], wd[sel]
                for p0, p1, r0, r1 in self.segments:
                    if p0[0] * side > 0:
                        m |= _capsule(us, vs, ws, p0, p1, r0, r1)
                vd_mask[sel] = m
            vd_mask &= np.abs(ud) > 1.0  # septum pellucidum
            vd_mask |= ell((0, 4, -2), (1.5 * self.vent_f, 11, 8))  # third ventricle
            vd_mask |= ell((0, 31, -37), (5, 3, 5))  # fourth ventricle
            h_d[vd_mask] = H["csf"]
            l_d[vd_mask] = _CSF
            vent[deep] = vd_mask
            hu[deep] = h_d
            lab[deep] = l_d

        csf_px = csf & ~vent
        hu[csf_px] = H["csf"]
        lab[csf_px] = _CSF
        falx = fiss & (au < 0.45) & (d_i > 0.3)
        hu[falx] = H["falx"]
        lab[falx] = _FALX
        for c, r, h_c in self.calcs:
            m = (u - c[0]) ** 2 + (v - c[1]) ** 2 + (w - c[2]) ** 2 < r * r
            hu[m] = h_c
            lab[m] = _CALC

        if with_lesion and self.lesion is not None:
            paren = (lab == _GM) | (lab == _WM)
            ctx = {
                "q": q, "d_i": d_i, "dc": dc, "sulc_dist": sulc_dist, "ds": ds,
                "vent": vent, "sa_csf": sa_csf, "paren": paren, "field": field_,
            }  # fmt: skip
            _apply_lesion(self, self.lesion, ctx, hu, lab)
        return hu, lab

    def render_grid(self, spacing: float = 1.0, *, lesion: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned patient-frame volume (Z, Y, X) around the head, and its origin (x, y, z).

        Convenience for pretraining or visual checks; the DICOM writers do not use it.
        """
        ext = float(np.max(self.radii)) + self.scalp + 8.0
        lo = self.center - ext
        n = math.ceil(2 * ext / spacing) + 1
        ax_ = np.arange(n) * spacing
        zz, yy, xx = np.meshgrid(ax_ + lo[2], ax_ + lo[1], ax_ + lo[0], indexing="ij")
        pts = np.stack([xx, yy, zz], -1)
        out = np.empty((n, n, n), np.float32)
        for k in range(n):
            out[k] = self.sample(pts[k], lesion=lesion)[0].reshape(n, n)
        return out, lo


def _wave_sum(u: np.ndarray, v: np.ndarray, w: np.ndarray, k: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """Sum of cos(k.x + phase) over waves, one wave at a time (avoids (N, K) temporaries)."""
    acc = np.zeros(u.shape, np.float32)
    for (k0, k1, k2), p in zip(k.tolist(), phase.tolist(), strict=True):
        acc += np.cos(u * k0 + v * k1 + w * k2 + p)
    return acc


def _capsule(
    u: np.ndarray, v: np.ndarray, w: np.ndarray, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float
) -> np.ndarray:
    """Inside a tapered capsule (segment p0-p1, radius r0..r1): curved ventricles as polylines."""
    d = p1 - p0
    t = ((u - p0[0]) * d[0] + (v - p0[1]) * d[1] + (w - p0[2]) * d[2]) / float(d @ d)
    t = np.clip(t, 0.0, 1.0)
    dist2 = (u - p0[0] - t * d[0]) ** 2 + (v - p0[1] - t * d[1]) ** 2 + (w - p0[2] - t * d[2]) ** 2
    r = r0 + (r1 - r0) * t
    return dist2 < r * r


def make_phantom(rng: np.random.Generator, lesion: str | None = None) -> Phantom:
    """Draw one subject (and optionally a lesion) from ``rng``.

    ``lesion`` is None, "hemorrhage", "infarct", or "kind:subtype" (e.g. "hemorrhage:subdural").
    Exactly two integers are drawn from ``rng`` whatever ``lesion`` is, and anatomy and lesion use
    separate child generators, so the same generator state yields the same anatomy with or without
    a lesion -- the basis of paired (counterfactual) comparisons.
    """
    kind, sub = _parse_lesion(lesion)
    anat_seed, lesion_seed = (int(x) for x in rng.integers(0, 2**63 - 1, size=2))
    a = np.random.default_rng(anat_seed)

    sex = "F" if a.random() < 0.5 else "M"
    age = float(a.uniform(18, 92))
    aging = ((age - 18) / 74) ** 1.5
    size = float(np.clip(a.normal(1.0, 0.04), 0.9, 1.1)) * (0.965 if sex == "F" else 1.0)
    radii = np.array([71.0, 89.0, 72.0]) * size * a.uniform(0.95, 1.05, size=3)
    scale = radii / np.array([71.0, 89.0, 72.0])
    center = np.array([a.normal(0, 5), a.uniform(-12, 14), a.uniform(-190, -70)])
    rot = _rotation(*np.deg2rad([a.uniform(-5, 5), a.uniform(-4, 4), a.uniform(-8, 8)]))

    gm = float(a.uniform(36, 44))
    wm = float(min(a.uniform(23, 29), gm - 8))
    hu = {
        "gm": gm,
        "wm": wm,
        "csf": float(a.uniform(2, 9)),
        "scalp": float(a.uniform(35, 50)),
        "compact": float(a.uniform(1100, 1450)),
        "diploe": float(a.uniform(320, 580)),
        "falx": gm + float(a.uniform(10, 18)),
        "texture_amp": float(a.uniform(0.3, 0.6)),
        "lowfreq_amp": float(a.uniform(0.6, 1.2)),
        "cupping": float(a.uniform(1.5, 4.0)),
    }
    vent_f = float(np.clip((0.8 + 0.9 * aging) * a.uniform(0.8, 1.2), 0.7, 2.0))
    sx, sy, sz = scale
    segments: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    for s in (-1.0, 1.0):
        pts = {
            "fh": (10 * s, -32, 14), "ab": (7 * s, -15, 18), "pb": (11 * s, 12, 17),
            "at": (20 * s, 28, 8), "oh": (16 * s, 46, 5), "th1": (29 * s, 8, -10), "th2": (28 * s, -12, -18),
        }  # fmt: skip
        p = {k: np.array(c, np.float32) * np.array([sx, sy, sz], np.float32) for k, c in pts.items()}
        f = vent_f
        for a0, a1, r0, r1 in (
            ("fh", "ab", 3.5 * f, 4.5 * f),
            ("ab", "pb", 4.5 * f, 4.2 * f),
            ("pb", "at", 4.2 * f, 6.0 * f),
            ("at", "oh", 5.0 * f, 1.5 * f),
            ("at", "th1", 3.0 * f, 1.8 * f),
            ("th1", "th2", 1.8 * f, 1.2 * f),
        ):
            segments.append((p[a0], p[a1], float(r0), float(r1)))
    calcs: list[tuple[list[float], float, float]] = []
    if a.random() < 0.3 + 0.5 * aging:  # choroid plexus calcification in the atria (normal finding)
        for s in (-1.0, 1.0):
            radius, h_calc = float(a.uniform(1.5, 3.0)), float(a.uniform(120, 300))
            calcs.append(([20 * s * sx, 29 * sy, 8 * sz], radius, h_calc))
    if a.random() < 0.25 + 0.4 * aging:  # pineal calcification
        calcs.append(([0.0, 22 * sy, 2 * sz], float(a.uniform(1.5, 2.5)), float(a.uniform(150, 350))))

    ph = Phantom(
        center=center,
        rot=rot,
        radii=radii,
        az_down=1.5,
        scalp=float(a.uniform(3.5, 6.5)),
        skull_t=float(a.uniform(5.5, 8.0)),
        scale=scale,
        hu=hu,
        csf_w=float(0.7 + 2.0 * aging * a.uniform(0.6, 1.3)),
        sulc_hw=float(0.35 + 1.1 * aging * a.uniform(0.6, 1.3)),
        sulc_depth=float(a.uniform(10, 16)),
        gm_thk=float(a.uniform(2.3, 3.2)),
        ihf_hw=float(1.0 + 1.5 * aging),
        syl_hw=float(0.8 + 1.5 * aging),
        vent_f=vent_f,
        gyri=_waves(a, 7, (22.0, 30.0)),
        texture=_waves(a, 5, (5.0, 12.0)),
        lowfreq=_waves(a, 3, (70.0, 160.0)),
        segments=segments,
        calcs=calcs,
        age=age,
        lesion=None,
    )
    if kind is not None:
        ph.lesion = _draw_lesion(np.random.default_rng(lesion_seed), ph, kind, sub)
    ph.meta = {
        "sex": sex,
        "age": round(age, 2),
        "head_radii_mm": [round(float(r), 2) for r in radii],
        "center_mm": [round(float(c), 2) for c in center],
        "hu": {k: round(v, 2) for k, v in hu.items()},
        "ventricle_factor": round(vent_f, 3),
        "lesion": None if ph.lesion is None else _jsonable(asdict(ph.lesion)),
    }
    return ph
