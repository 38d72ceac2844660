"""Synthetic head-CT phantom studies written as real DICOM.

Why this exists: the triage daemon must be trained, tested and demonstrated without patient data,
and its hardest bugs are not in the flow model but in the DICOM plumbing (series selection, slice
sorting, tilted or incomplete stacks, compressed transfer syntaxes, vendor habits).  So this module
produces studies that look like what a PACS sends: a primary axial soft-tissue series surrounded by
distractor series, vendor-flavoured headers, and optional hard cases, together with exact ground
truth (labels, lesion kind, primary-series geometry) that tests and evaluations can check against.

Design:

* The anatomy is an *analytic* function of patient coordinates (:class:`Phantom.sample`): every
  structure is an implicit surface (ellipsoids, capsules, level sets of smooth random fields) in a
  head frame that is shifted and rotated per subject.  Every image is made by evaluating the
  phantom at the patient-space centre of each pixel, so geometry in the headers is exact by
  construction (no resampling, no scipy), including gantry tilt and reformats.
* All randomness flows from one ``numpy.random.Generator`` per study, split into independent
  child streams in a fixed order.  The lesion therefore never perturbs the anatomy, the noise or
  the header choices: the same seed with and without a lesion gives bit-identical images outside
  the lesion, which is what makes "paired" tests and counterfactual evaluation possible.
* UIDs come from :func:`pydicom.uid.generate_uid` with entropy derived from the seed, so a dataset
  is reproducible byte for byte.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

__all__ = [
    "CT_IMAGE_STORAGE",
    "ROLES",
    "SC_IMAGE_STORAGE",
    "TISSUE",
    "Phantom",
    "StudyTruth",
    "SynthOptions",
    "main",
    "make_phantom",
    "pixel_points",
    "write_dataset",
    "write_study",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
ROLES = ("primary", "localizer", "bone", "thin", "reformat", "dose")

# Tissue classes returned by Phantom.sample; tests and evaluation use them as segmentation truth.
TISSUE = {
    "air": 0,
    "soft": 1,
    "bone": 2,
    "csf": 3,
    "gm": 4,
    "wm": 5,
    "lesion": 6,
    "edema": 7,
    "falx": 8,
    "calcification": 9,
    "fat": 10,
}
_AIR, _SOFT, _BONE, _CSF, _GM, _WM, _LESION, _EDEMA, _FALX, _CALC, _FAT = range(11)
LESION_TISSUES = (_LESION, _EDEMA)

HEMORRHAGE_SUBTYPES = ("intraparenchymal", "subdural", "subarachnoid", "intraventricular")
INFARCT_SUBTYPES = ("mca", "pca", "lacunar")
_HEM_WEIGHTS = (0.4, 0.25, 0.2, 0.15)
_INF_WEIGHTS = (0.5, 0.2, 0.3)

_RESCALE_INTERCEPT = -1024.0
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's registered root; fine for synthetic data


# --------------------------------------------------------------------------------------------------
# Options and ground truth
# --------------------------------------------------------------------------------------------------


@dataclass
class SynthOptions:
    """What to generate.  Fractions are per-study probabilities of a hard case.

    Defaults describe clean data (no hard cases) so that tests are deterministic and simple; the
    fractions exist to exercise the consumer's robustness.  Random draws for every hard case are
    made whether or not the fraction is zero, so changing one fraction flips only that decision and
    leaves every other property of every study unchanged.
    """

    matrix: int | str = 256  # 256, 512 or "mixed"
    tilt_fraction: float = 0.0
    tilt_range_deg: tuple[float, float] = (10.0, 20.0)
    # Of the tilted studies, the fraction whose slice positions step along the table (z) axis like
    # real scanners do (a sheared stack), instead of along the tilted plane normal.
    tilt_shear_fraction: float = 0.0
    reverse_fraction: float = 0.0
    missing_fraction: float = 0.0
    compressed_fraction: float = 0.0
    mixed_orientation_fraction: float = 0.0
    distractors: bool = True
    # Sub-samples across the slice thickness (partial-volume averaging).  1 = point sampling, which
    # makes "pixel == phantom at its centre" exact up to rounding (used by geometry tests).
    slab_samples: int = 3
    noise_scale: float = 1.0
    vendors: tuple[str, ...] | None = None  # restrict to these vendor keys (see _VENDORS)
    compressed_syntaxes: tuple[str, ...] = (RLELossless, JPEG2000Lossless, JPEGLSLossless)


@dataclass
class StudyTruth:
    """Ground truth for one study; JSON-serialisable through :meth:`to_dict`.

    Geometry fields describe the *primary* series' planned stack in spatial order (index 0 is the
    most inferior slice along the plane normal), before any slice was dropped.
    """

    study_uid: str
    patient_id: str
    patient_name: str
    accession: str
    label: str  # "normal" | "abnormal"
    lesion: str  # "" | "hemorrhage" | "infarct"
    lesion_subtype: str
    lesion_site: str
    lesion_spec: str  # pass to make_phantom() to rebuild the exact phantom
    lesion_voxels: int  # primary-series pixels touched by the lesion (any slab sub-sample)
    lesion_slices: list[int]  # spatial indices of primary slices that contain lesion
    vendor: str
    manufacturer: str
    study_dir: str
    primary_series_uid: str
    series_roles: dict[str, str]
    series_dirs: dict[str, str]
    series_files: dict[str, int]
    n_slices: int  # axial primary files written (excludes mixed-orientation extras)
    n_slices_planned: int
    slice_spacing: float  # perpendicular distance between adjacent planned planes (mm)
    slice_thickness: float
    slice_step: list[float]  # IPP_{k+1} - IPP_k for the planned stack (patient mm)
    pixel_spacing: list[float]  # [between rows, between columns]
    rows: int
    cols: int
    matrix: int
    tilt_deg: float
    tilt_mode: str  # "none" | "normal" | "table"
    iop: list[float]
    ipp_first: list[float]
    dropped_index: int | None
    reversed: bool  # instance numbers decrease as position ascends along the normal
    reversed_by_option: bool
    transfer_syntax: str
    pixel_representation: int
    bits_stored: int
    kernel: str
    noise_sigma: float
    mixed_orientation_instances: list[int]
    instance_numbers: list[int | None]  # per planned spatial index; None where dropped
    phantom_seed: int
    patient_index: int
    phantom_meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyTruth:
        return cls(**d)


def _jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays nested in dicts/lists to plain Python for json.dumps."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


# --------------------------------------------------------------------------------------------------
# Phantom
# --------------------------------------------------------------------------------------------------


@dataclass
class LesionSpec:
    """A lesion in head coordinates (mm); params are plain floats/lists so they serialise."""

    kind: str  # "hemorrhage" | "infarct"
    subtype: str
    site: str
    side: int  # +1 patient left, -1 patient right, 0 midline/bilateral
    hu: float
    params: dict[str, Any]


def _rotation(yaw: float, roll: float, pitch: float) -> np.ndarray:
    """Head-to-patient rotation; columns are the head axes expressed in patient (LPS) coordinates."""
    cy, sy = math.cos(yaw), math.sin(yaw)
    cr, sr = math.cos(roll), math.sin(roll)
    cp, sp = math.cos(pitch), math.sin(pitch)
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    ry = np.array([[cr, 0, sr], [0, 1, 0], [-sr, 0, cr]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return rz @ ry @ rx


def _random_unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, 3))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _waves(rng: np.random.Generator, n: int, lam: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Random plane waves (wave vectors in rad/mm, phases): cheap smooth random fields."""
    k = _random_unit(rng, n) * (2 * np.pi / rng.uniform(*lam, size=n))[:, None]
    return k.astype(np.float32), rng.uniform(0, 2 * np.pi, size=n).astype(np.float32)


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


def _apply_lesion(ph: Phantom, les: LesionSpec, ctx: dict[str, np.ndarray], hu: np.ndarray,
                  lab: np.ndarray) -> None:
    """Paint one lesion into intracranial arrays (in place).  Only intracranial voxels change."""
    q = ctx["q"]
    u, v, w = q[:, 0], q[:, 1], q[:, 2]
    p = les.params
    s = les.side
    if les.subtype == "intraparenchymal":
        c = np.asarray(p["center"], np.float32)
        a = np.asarray(p["axes_inv"], np.float32)  # 3x3: offset -> normalised ellipsoid coords
        rmax = float(p["rmax"]) * 1.5
        cand = np.flatnonzero(((q - c) ** 2).sum(1) < rmax * rmax)
        if cand.size == 0:
            return
        e = (q[cand] - c) @ a
        r = np.linalg.norm(e, axis=1)
        dirs = e / np.maximum(r, 1e-6)[:, None]
        bk = np.asarray(p["bumps_k"], np.float32)
        bp = np.asarray(p["bumps_phi"], np.float32)
        mod = 1.0 + 0.12 * np.cos(dirs @ bk.T + bp).sum(1)  # irregular, lobulated outline
        core = r < mod
        rim = (r < mod * 1.35) & ~core & ctx["paren"][cand]
        hc, lc = hu[cand], lab[cand]
        hc[rim] -= float(p["edema"])
        lc[rim] = _EDEMA
        hc[core] = les.hu + 6.0 * (1.0 - r[core] / mod[core])
        lc[core] = _LESION
        hu[cand], lab[cand] = hc, lc
    elif les.subtype == "subdural":
        cand = np.flatnonzero((ctx["d_i"] < float(p["thickness"])) & (s * u > 2.0))
        if cand.size == 0:
            return
        ax, ay, az = (float(x) for x in ph.radii)
        nq = q[cand] / np.array([ax, ay, az], np.float32)
        nq /= np.maximum(np.linalg.norm(nq, axis=1), 1e-6)[:, None]
        cdir = np.asarray(p["direction"], np.float32)
        alpha = np.arccos(np.clip(nq @ cdir, -1, 1))
        amax = float(p["half_angle"])
        thick = float(p["thickness"]) * np.clip(1 - (alpha / amax) ** 2, 0, None)
        m = ctx["d_i"][cand] < thick
        sel = cand[m]
        hu[sel] = les.hu + 4.0 * np.cos(0.3 * w[sel])
        lab[sel] = _LESION
    elif les.subtype == "subarachnoid":
        c = np.asarray(p["center"], np.float32)
        r = float(p["radius"])
        within = ((q - c) ** 2).sum(1) < r * r
        widened = (ctx["sulc_dist"] < ph.sulc_hw + 0.8) & (ctx["dc"] < ph.sulc_depth)
        surface = ctx["ds"] < ph.csf_w + 1.0
        m = within & (ctx["sa_csf"] | widened | surface) & ~ctx["vent"]
        hu[m] = les.hu
        lab[m] = _LESION
    elif les.subtype == "intraventricular":
        m = ctx["vent"] & (v > float(p["v_level"]))
        if s != 0:
            m &= (s * u > 0) | (np.abs(u) < 3.0)
        hu[m] = les.hu
        lab[m] = _LESION
    elif les.subtype in ("mca", "pca"):
        phi = np.arctan2(v, s * u)
        rho = np.sqrt(u * u + v * v)
        m_ang = (float(p["half_width"]) - np.abs(phi - float(p["phi0"]))) * rho
        m_w = np.minimum(w - float(p["w_lo"]), float(p["w_hi"]) - w)
        m_d = float(p["depth"]) - ctx["dc"]
        margin = np.minimum(np.minimum(m_ang, m_w), m_d)
        target = (ctx["paren"] | (ctx["sa_csf"] & (ctx["dc"] > -2))) & (s * u > 2.0)
        wt = np.where(target, np.clip(margin / 4.0, 0, 1), 0).astype(np.float32)
        _blend_infarct(les, ctx, hu, lab, wt)
    elif les.subtype == "lacunar":
        c = np.asarray(p["center"], np.float32)
        r = np.sqrt((((q - c) / np.asarray(p["radii"], np.float32)) ** 2).sum(1))
        wt = np.where(ctx["paren"], np.clip((1.0 - r) * 3.0, 0, 1), 0).astype(np.float32)
        _blend_infarct(les, ctx, hu, lab, wt)
    else:
        raise ValueError(f"unknown lesion subtype {les.subtype!r}")


def _blend_infarct(les: LesionSpec, ctx: dict[str, np.ndarray], hu: np.ndarray, lab: np.ndarray,
                   wt: np.ndarray) -> None:
    """Soft-edged hypodensity with loss of gray/white differentiation, like an acute infarct."""
    m = wt > 0
    if not m.any():
        return
    target = les.hu + 0.5 * ctx["field"][m]
    hu[m] = hu[m] * (1 - wt[m]) + target * wt[m]
    lab[m] = np.where(wt[m] >= 0.5, _LESION, lab[m])


def _parse_lesion(lesion: str | None) -> tuple[str | None, str | None]:
    if lesion is None or lesion in ("", "normal"):
        return None, None
    kind, _, sub = lesion.partition(":")
    if kind not in ("hemorrhage", "infarct"):
        raise ValueError(f"lesion must be 'hemorrhage' or 'infarct' (optionally ':subtype'), got {lesion!r}")
    allowed = HEMORRHAGE_SUBTYPES if kind == "hemorrhage" else INFARCT_SUBTYPES
    if sub and sub not in allowed:
        raise ValueError(f"unknown {kind} subtype {sub!r}; choose from {allowed}")
    return kind, sub or None


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


def _draw_lesion(r: np.random.Generator, ph: Phantom, kind: str, sub: str | None) -> LesionSpec:
    sx, sy, sz = (float(s) for s in ph.scale)
    side = 1 if r.random() < 0.5 else -1
    if kind == "hemorrhage":
        subtype = sub or str(r.choice(HEMORRHAGE_SUBTYPES, p=_HEM_WEIGHTS))
        h = float(r.uniform(58, 88))
        if subtype == "intraparenchymal":
            site = str(r.choice(["basal_ganglia", "thalamus", "lobar", "cerebellar"], p=[0.4, 0.2, 0.3, 0.1]))
            if site == "basal_ganglia":
                c = [21 * side * sx, -2 * sy, 0.0]
            elif site == "thalamus":
                c = [9 * side * sx, 12 * sy, 2 * sz]
            elif site == "cerebellar":
                c = [24 * side * sx, 36 * sy, -38 * sz]
            else:
                ang = r.uniform(-0.8, 0.8) + (0 if r.random() < 0.5 else np.pi * 0.5)
                c = [side * 36 * sx * math.cos(ang), 44 * sy * math.sin(ang), r.uniform(15, 38) * sz]
            c = list(np.asarray(c) + r.normal(0, 2.0, 3))
            rmean = float(r.uniform(6, 20) if site != "thalamus" else r.uniform(5, 11))
            axes = rmean * r.uniform(0.7, 1.3, 3)
            rot = _rotation(*r.uniform(-np.pi, np.pi, 3))
            axes_inv = rot / axes[None, :]  # e = (q-c) @ rot / axes
            bk, bphi = _waves(r, 3, (2.0, 4.0))  # wavelengths in unit-sphere units: 2-3 lobes
            params = {
                "center": c, "axes_inv": axes_inv.tolist(), "rmax": float(axes.max() * 1.45),
                "bumps_k": (bk * 2 * np.pi / np.linalg.norm(bk, axis=1, keepdims=True) / 3).tolist(),
                "bumps_phi": bphi.tolist(), "edema": float(r.uniform(4, 8)), "radius_mm": rmean,
            }  # fmt: skip
        elif subtype == "subdural":
            site = "convexity_" + ("left" if side > 0 else "right")
            az_ = r.uniform(-0.7, 0.7)
            el = r.uniform(0.1, 0.6)
            d = np.array([side * math.cos(el) * math.cos(az_), math.cos(el) * math.sin(az_), math.sin(el)])
            params = {
                "direction": (d / np.linalg.norm(d)).tolist(),
                "half_angle": float(r.uniform(0.6, 1.0)),
                "thickness": float(r.uniform(4, 14)),
            }
        elif subtype == "subarachnoid":
            site = str(r.choice(["sylvian", "basal_cisterns", "convexity"]))
            if site == "sylvian":
                c = [side * 50 * sx, -8 * sy, 2 * sz]
            elif site == "basal_cisterns":
                c = [0.0, 0.0, -20 * sz]
                side = 0
            else:
                c = [side * 45 * sx, r.uniform(-40, 40) * sy, r.uniform(25, 50) * sz]
            params = {"center": c, "radius": float(r.uniform(25, 38))}
            h = float(r.uniform(55, 75))
        else:  # intraventricular
            site = "lateral_ventricles"
            if r.random() < 0.4:
                side = 0
            params = {"v_level": float(r.uniform(8, 26) * sy)}
            h = float(r.uniform(55, 80))
        return LesionSpec(kind, subtype, site, side, h, _jsonable(params))

    subtype = sub or str(r.choice(INFARCT_SUBTYPES, p=_INF_WEIGHTS))
    h = float(max(10.0, ph.hu["wm"] - r.uniform(10, 18)))
    if subtype == "mca":
        site = "mca_" + ("left" if side > 0 else "right")
        params = {
            "phi0": float(r.uniform(-0.35, 0.35)), "half_width": float(r.uniform(0.35, 0.75)),
            "w_lo": float(r.uniform(-14, 0) * sz), "w_hi": float(r.uniform(22, 48) * sz),
            "depth": float(r.uniform(22, 45)),
        }  # fmt: skip
    elif subtype == "pca":
        site = "pca_" + ("left" if side > 0 else "right")
        params = {
            "phi0": float(r.uniform(1.05, 1.3)), "half_width": float(r.uniform(0.3, 0.5)),
            "w_lo": float(-40 * sz), "w_hi": float(r.uniform(12, 26) * sz), "depth": float(r.uniform(25, 40)),
        }  # fmt: skip
    else:
        site = str(r.choice(["lentiform", "thalamus", "internal_capsule", "corona_radiata"]))
        c = {
            "lentiform": (21, -2, 0), "thalamus": (9, 12, 2),
            "internal_capsule": (16, 4, 4), "corona_radiata": (22, 0, 24),
        }[site]  # fmt: skip
        params = {
            "center": [side * c[0] * sx, c[1] * sy, c[2] * sz],
            "radii": list(r.uniform(4.5, 8.0, 3)),
        }
    return LesionSpec(kind, subtype, site, side, h, _jsonable(params))


# --------------------------------------------------------------------------------------------------
# Vendors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Vendor:
    key: str
    manufacturers: tuple[str, ...]
    models: tuple[str, ...]
    soft_kernels: tuple[str, ...]
    bone_kernels: tuple[str, ...]
    body_parts: tuple[str, ...]
    study_descriptions: tuple[str, ...]
    primary_fmt: str
    bone_fmt: str
    thin_fmt: str
    localizer_desc: str
    reformat_desc: str
    reformat_type: tuple[str, ...]
    signed: bool  # int16 + PixelRepresentation 1 + BitsStored 16, else uint16 + BitsStored 12
    spacing_between_slices: bool
    superior_first: bool  # numbers instances from the vertex down: consumers must sort by position
    thicknesses: tuple[float, ...]
    thin_thickness: float
    series_numbers: tuple[tuple[str, int], ...]
    soft_window: tuple[float, float]
    kernel_short: tuple[tuple[str, str], ...] = ()


_VENDORS: dict[str, _Vendor] = {
    v.key: v
    for v in (
        _Vendor(
            "siemens", ("SIEMENS",), ("SOMATOM Definition AS+", "SOMATOM go.Top", "SOMATOM Force"),
            ("H31s", "J40s", "Hr38"), ("H70h", "J70h", "Hr64"), ("HEAD",),
            ("CT^Head", "CT HEAD W/O", "Head^Routine"),
            "Head {thk:.1f} {kernel}", "Head {thk:.1f} {kernel} BONE", "Head {thk:.2f} {kernel}",
            "Topogram 0.6 T20s", "Head MPR Cor", ("DERIVED", "SECONDARY", "MPR"),
            False, False, False, (5.0, 4.0), 0.75,
            (("localizer", 1), ("primary", 2), ("bone", 3), ("thin", 4), ("reformat", 5), ("dose", 501)),
            (40.0, 80.0),
        ),
        _Vendor(
            "ge", ("GE MEDICAL SYSTEMS",), ("LightSpeed VCT", "Revolution CT", "Discovery CT750 HD"),
            ("STANDARD", "SOFT"), ("BONE", "BONEPLUS"), ("HEAD",), ("CT HEAD W/O", "HEAD W/O CONTRAST"),
            "HEAD {thk:g}mm {short}", "HEAD {thk:g}mm BONE", "{thk:g}mm {short}",
            "Scout", "Cor Reformat", ("DERIVED", "SECONDARY", "REFORMATTED"),
            True, True, False, (5.0, 4.5), 0.625,
            (("localizer", 1), ("primary", 2), ("bone", 3), ("thin", 4), ("reformat", 100), ("dose", 999)),
            (40.0, 80.0), (("STANDARD", "STND"), ("SOFT", "SOFT")),
        ),
        _Vendor(
            "canon", ("TOSHIBA", "CANON_MEC"), ("Aquilion ONE", "Aquilion Prime SP"),
            ("FC21", "FC64"), ("FC30",), ("HEAD", "BRAIN"), ("HEAD ROUTINE", "BRAIN"),
            "Brain {thk:.1f} {kernel}", "Brain {thk:.1f} {kernel} BONE", "Brain {thk:.1f} {kernel}",
            "Scanogram", "Coronal MPR", ("DERIVED", "SECONDARY", "REFORMATTED"),
            True, True, True, (5.0, 4.0), 0.5,
            (("localizer", 1), ("thin", 2), ("primary", 3), ("bone", 4), ("reformat", 5), ("dose", 9001)),
            (35.0, 90.0),
        ),
        _Vendor(
            "philips", ("Philips",), ("Brilliance 64", "iCT 256", "Ingenuity CT"),
            ("UB", "UC"), ("YC", "D"), ("", "BRAIN"), ("CT Brain", "HEAD ROUTINE"),
            "Brain {thk:g}mm {kernel}", "Brain {thk:g}mm {kernel} BONE", "Brain {thk:g}mm {kernel}",
            "Surview", "Brain Cor MPR", ("DERIVED", "SECONDARY", "MPR"),
            False, False, False, (5.0, 4.0), 0.9,
            (("localizer", 1), ("primary", 2), ("bone", 3), ("thin", 4), ("reformat", 201), ("dose", 1001)),
            (40.0, 80.0),
        ),
    )
}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Geometry and rendering
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# DICOM writing
# --------------------------------------------------------------------------------------------------


@dataclass
class _Study:
    token: int
    vendor: _Vendor
    manufacturer: str
    model: str
    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    study_uid: str
    study_date: str
    study_time: str
    accession: str
    description: str
    body_part: str
    frame_uid: str
    station: str
    kvp: float
    signed: bool


@dataclass
class _Series:
    role: str
    uid: str
    number: int
    description: str
    kernel: str
    image_type: list[str]
    window: tuple[float, float]
    folder: Path
    count: int = 0


def _uid(study: _Study, *parts: object) -> str:
    return generate_uid(prefix=_UID_PREFIX, entropy_srcs=[str(study.token), *map(str, parts)])


def _new_dataset(study: _Study, series: _Series, sop_class: str, instance: int) -> Dataset:
    sop_uid = _uid(study, series.role, series.number, "sop", instance)
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "GLOWTRIAGE_SYN"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = study.study_time
    ds.AccessionNumber = study.accession
    ds.Modality = "CT"
    ds.Manufacturer = study.manufacturer
    ds.ManufacturerModelName = study.model
    ds.InstitutionName = "SYNTHETIC GENERAL HOSPITAL"
    ds.StationName = study.station
    ds.ReferringPhysicianName = "SYNTH^REFERRER"
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.PatientAge = study.age
    ds.BodyPartExamined = study.body_part
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series.uid
    ds.StudyID = study.accession[-6:]
    ds.SeriesNumber = series.number
    ds.InstanceNumber = instance
    ds.ImageType = list(series.image_type)
    return ds


def _set_pixels(ds: Dataset, raw: np.ndarray, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(raw.shape[0]), int(raw.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept = _RESCALE_INTERCEPT
    ds.RescaleSlope = 1.0
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(raw.astype("<i2" if signed else "<u2")).tobytes()


def _ct_image(
    study: _Study,
    series: _Series,
    *,
    instance: int,
    raw: np.ndarray,
    ipp: list[float],
    iop: list[float],
    ps: tuple[float, float],
    thickness: float,
    spacing: float | None,
    tilt: float,
    slice_location: float,
) -> Dataset:
    ds = _new_dataset(study, series, CT_IMAGE_STORAGE, instance)
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = study.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = 1
    ds.ImagePositionPatient = ipp
    ds.ImageOrientationPatient = iop
    ds.PixelSpacing = [float(ps[0]), float(ps[1])]
    ds.SliceThickness = float(thickness)
    if spacing is not None and study.vendor.spacing_between_slices:
        ds.SpacingBetweenSlices = float(spacing)
    ds.SliceLocation = round(float(slice_location), 4) + 0.0
    ds.KVP = study.kvp
    ds.ConvolutionKernel = series.kernel
    ds.GantryDetectorTilt = float(tilt)
    ds.ReconstructionDiameter = round(float(ps[1]) * raw.shape[1], 3)
    ds.DataCollectionDiameter = 500.0
    ds.XRayTubeCurrent = 280
    ds.ExposureTime = 1000
    ds.RotationDirection = "CW"
    ds.ScanOptions = "AXIAL MODE" if study.vendor.key in ("ge", "canon") else "HELICAL MODE"
    ds.ProtocolName = study.description
    ds.WindowCenter = series.window[0]
    ds.WindowWidth = series.window[1]
    _set_pixels(ds, raw, study.signed)
    return ds


def _save(ds: Dataset, series: _Series, name: int, syntax: str = ExplicitVRLittleEndian) -> None:
    if syntax != ExplicitVRLittleEndian:
        # Lossless, and keep the SOP Instance UID: it is part of the reproducible ground truth.
        ds.compress(syntax, generate_instance_uid=False)
    series.folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(series.folder / f"{name}.dcm", enforce_file_format=True)
    series.count += 1


def _available_syntaxes(preferred: tuple[str, ...]) -> list[str]:
    """Lossless encoders present in this environment, in ``preferred`` order (RLE needs only numpy)."""
    from pydicom.pixels.encoders import (
        JPEG2000LosslessEncoder,
        JPEGLSLosslessEncoder,
        RLELosslessEncoder,
    )

    enc = {RLELossless: RLELosslessEncoder, JPEG2000Lossless: JPEG2000LosslessEncoder,
           JPEGLSLossless: JPEGLSLosslessEncoder}  # fmt: skip
    out = [s for s in preferred if s in enc and enc[s].is_available]
    return out or [RLELossless]


# --------------------------------------------------------------------------------------------------
# Study writer
# --------------------------------------------------------------------------------------------------


def _plan_primary(ph: Phantom, normal: np.ndarray, spacing: float) -> tuple[float, int]:
    """Start distance along the normal and slice count covering skull base to vertex (28-40 slices)."""
    c_n = float(ph.center @ normal)
    ax, ay, az = (float(r) + ph.scalp for r in ph.radii)
    m = ph.rot.T @ normal
    top = c_n + math.sqrt((m[0] * ax) ** 2 + (m[1] * ay) ** 2 + (m[2] * az) ** 2) - 1.0
    floor = ph.head_to_patient(np.array([0.0, 35.0 * ph.scale[1], -58.0 * ph.scale[2]])) @ normal
    bottom = float(floor) - 3.0
    need = math.ceil((top - bottom) / spacing)
    n = int(np.clip(need, 28, 40))
    # Spare slices go below the skull base (as in real scans), a shortfall is split between both ends.
    start = bottom - (n - need) * spacing if n >= need else bottom + (need - n) * spacing / 2.0
    return start, n


def write_study(
    out_dir: Path,
    rng: np.random.Generator,
    *,
    lesion: str | None,
    options: SynthOptions,
    patient_index: int,
) -> StudyTruth:
    """Write one study under ``out_dir`` (the study folder: ``out_dir/<series_folder>/<n>.dcm``).

    ``lesion`` is None, "hemorrhage", "infarct" or "kind:subtype".  A fixed number of values is
    drawn from ``rng`` up front, whatever the lesion and options, so the same generator state gives
    the same subject, scanner, noise and UIDs with or without a lesion or a hard case.
    """
    out_dir = Path(out_dir)
    seeds = [int(x) for x in rng.integers(0, 2**63 - 1, size=6)]
    token, phantom_seed, scan_seed, noise_seed, case_seed, distr_seed = seeds
    sc = np.random.default_rng(scan_seed)
    cases = np.random.default_rng(case_seed)
    # Hard-case draws: always all of them, in a fixed order (see SynthOptions).
    u_tilt, u_shear, u_rev, u_miss, u_comp, u_mixed, u_matrix = cases.random(7)
    tilt_angle = float(cases.uniform(*options.tilt_range_deg))
    miss_pos = float(cases.random())
    comp_pick = float(cases.random())

    kind, _ = _parse_lesion(lesion)
    ph = make_phantom(np.random.default_rng(phantom_seed), lesion)

    vendor_keys = list(options.vendors) if options.vendors else list(_VENDORS)
    unknown = sorted(set(vendor_keys) - set(_VENDORS))
    if unknown:
        raise ValueError(f"unknown vendors {unknown}; choose from {sorted(_VENDORS)}")
    vkey = vendor_keys[int(sc.integers(len(vendor_keys)))]
    vendor = _VENDORS[vkey]
    year_day = int(sc.integers(0, 6 * 365))
    study_date = np.datetime64("2019-01-01") + np.timedelta64(year_day, "D")
    age_years = int(ph.age)
    birth = study_date - np.timedelta64(round(ph.age * 365.25), "D")
    hh, mm, ss = int(sc.integers(0, 24)), int(sc.integers(0, 60)), int(sc.integers(0, 60))
    study = _Study(
        token=token,
        vendor=vendor,
        manufacturer=str(sc.choice(vendor.manufacturers)),
        model=str(sc.choice(vendor.models)),
        patient_name=f"SYNTH^P{patient_index:04d}",
        patient_id=f"SYNP{patient_index:04d}-{token % 65536:04X}",
        birth_date=str(birth).replace("-", ""),
        sex=ph.meta["sex"],
        age=f"{age_years:03d}Y",
        study_uid="",
        study_date=str(study_date).replace("-", ""),
        study_time=f"{hh:02d}{mm:02d}{ss:02d}",
        accession=f"SA{token % 10**10:010d}",
        description=str(sc.choice(vendor.study_descriptions)),
        body_part=str(sc.choice(vendor.body_parts)),
        frame_uid="",
        station=f"CT{int(sc.integers(1, 9))}",
        kvp=float(sc.choice([120.0, 120.0, 100.0, 140.0])),
        signed=vendor.signed,
    )
    study.study_uid = _uid(study, "study")
    study.frame_uid = _uid(study, "frame")

    if options.matrix == "mixed":
        matrix = 512 if u_matrix < 0.5 else 256
    else:
        matrix = int(options.matrix)
        if matrix not in (256, 512):
            raise ValueError("matrix must be 256, 512 or 'mixed'")
    thickness = float(sc.choice(vendor.thicknesses))
    spacing = thickness
    soft_kernel = str(sc.choice(vendor.soft_kernels))
    bone_kernel = str(sc.choice(vendor.bone_kernels))
    noise_sigma = float(sc.uniform(3.0, 8.0)) * options.noise_scale
    fov_need = 2 * max(
        abs(ph.center[0]) + ph.radii[0] + ph.scalp, abs(ph.center[1]) + ph.radii[1] + ph.scalp
    ) + 12.0
    fov = float(sc.integers(math.ceil(max(205.0, fov_need)), 257))
    fov = min(fov, 256.0)
    ps_val = fov / 512.0 * (512 // matrix)
    ps = (ps_val, ps_val)
    rows = cols = matrix

    tilted = u_tilt < options.tilt_fraction
    tilt = tilt_angle if tilted else 0.0
    tilt_mode = "none" if not tilted else ("table" if u_shear < options.tilt_shear_fraction else "normal")
    t_rad = math.radians(tilt)
    iop = _r([1.0, 0.0, 0.0, 0.0, math.cos(t_rad), -math.sin(t_rad)], 6)
    iop_a = np.asarray(iop)
    normal = np.cross(iop_a[:3], iop_a[3:])
    normal /= np.linalg.norm(normal)
    start, n_planned = _plan_primary(ph, normal, spacing)
    fy = 0.0
    centres = []
    for k in range(n_planned):
        d = start + k * spacing
        if tilt_mode == "table":
            centres.append(np.array([0.0, fy, (d - fy * normal[1]) / normal[2]]))
        else:
            f0 = np.array([0.0, fy, -fy * normal[1] / normal[2]])
            centres.append(f0 + d * normal)
    half = ((cols - 1) / 2.0) * ps[1] * iop_a[:3] + ((rows - 1) / 2.0) * ps[0] * iop_a[3:]
    ipps = [np.asarray(_r(c - half)) for c in centres]
    step = centres[1] - centres[0]

    nsub = max(1, int(options.slab_samples))
    clean, les_mask = _render(ph, ipps, iop_a, ps, rows, cols, thickness, nsub)
    if kind is not None and not les_mask.any():
        raise RuntimeError("lesion not visible in the primary series; phantom/lesion sites disagree")
    noise_rng = np.random.default_rng(noise_seed)
    soft = clean + _soft_noise(noise_rng, clean.shape, noise_sigma)

    roles = dict(vendor.series_numbers)
    series_list: list[_Series] = []

    def new_series(
        role: str, desc: str, kernel: str, image_type: list[str], window: tuple[float, float]
    ) -> _Series:
        num = roles[role]
        s = _Series(role, _uid(study, "series", role), num, desc, kernel, image_type, window,
                    out_dir / f"series_{num:04d}")  # fmt: skip
        series_list.append(s)
        return s

    short = dict(vendor.kernel_short).get(soft_kernel, soft_kernel)
    prim = new_series(
        "primary",
        vendor.primary_fmt.format(thk=thickness, kernel=soft_kernel, short=short),
        soft_kernel,
        ["ORIGINAL", "PRIMARY", "AXIAL"],
        vendor.soft_window,
    )

    # Hard cases on the primary series.
    superior_first = vendor.superior_first
    rev_opt = u_rev < options.reverse_fraction
    descending = superior_first != rev_opt
    inst = [n_planned - k if descending else k + 1 for k in range(n_planned)]
    dropped = None
    if u_miss < options.missing_fraction and n_planned > 6:
        dropped = 2 + int(miss_pos * (n_planned - 4))
    syntax = ExplicitVRLittleEndian
    if u_comp < options.compressed_fraction:
        avail = _available_syntaxes(options.compressed_syntaxes)
        syntax = avail[int(comp_pick * len(avail))]

    raw_soft = _to_raw(soft, study.signed)
    for k in range(n_planned):
        if k == dropped:
            continue
        ds = _ct_image(
            study, prim, instance=inst[k], raw=raw_soft[k], ipp=list(ipps[k]), iop=iop, ps=ps,
            thickness=thickness, spacing=spacing, tilt=tilt, slice_location=float(centres[k][2]),
        )  # fmt: skip
        _save(ds, prim, inst[k], syntax)

    mixed_instances: list[int] = []
    if u_mixed < options.mixed_orientation_fraction:
        cor_iop = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
        cor = np.asarray(cor_iop)
        top_z = float(max(c[2] for c in centres))
        for j, dy in enumerate((-10.0, 10.0)):
            y = float(ph.center[1]) + dy
            c = np.array([0.0, y, top_z - (rows - 1) / 2.0 * ps[0]])
            corner = c - ((cols - 1) / 2.0) * ps[1] * cor[:3] - ((rows - 1) / 2.0) * ps[0] * cor[3:]
            ipp = np.asarray(_r(corner))
            img, _ = _render(ph, [ipp], cor, ps, rows, cols, thickness, 1)
            img = img + _soft_noise(noise_rng, img.shape, noise_sigma)
            number = n_planned + 1 + j
            ds = _ct_image(
                study, prim, instance=number, raw=_to_raw(img[0], study.signed), ipp=list(ipp), iop=cor_iop,
                ps=ps, thickness=thickness, spacing=None, tilt=0.0, slice_location=y,
            )  # fmt: skip
            _save(ds, prim, number, syntax)
            mixed_instances.append(number)

    if options.distractors:
        _write_distractors(
            study, ph, vendor, new_series, np.random.default_rng(distr_seed), clean=clean, ipps=ipps,
            iop=iop, ps=ps, thickness=thickness, spacing=spacing, tilt=tilt, centres=centres,
            bone_kernel=bone_kernel, soft_kernel=soft_kernel, short=short, noise_sigma=noise_sigma,
            fov=fov,
        )  # fmt: skip

    lesion_slices = [int(k) for k in np.flatnonzero(les_mask.any(axis=(1, 2)))]
    les_obj = ph.lesion
    return StudyTruth(
        study_uid=study.study_uid,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        accession=study.accession,
        label="abnormal" if kind else "normal",
        lesion=kind or "",
        lesion_subtype=les_obj.subtype if les_obj else "",
        lesion_site=les_obj.site if les_obj else "",
        lesion_spec=f"{les_obj.kind}:{les_obj.subtype}" if les_obj else "",
        lesion_voxels=int(les_mask.sum()),
        lesion_slices=lesion_slices,
        vendor=vendor.key,
        manufacturer=study.manufacturer,
        study_dir=out_dir.name,
        primary_series_uid=prim.uid,
        series_roles={s.uid: s.role for s in series_list},
        series_dirs={s.uid: s.folder.name for s in series_list},
        series_files={s.uid: s.count for s in series_list},
        n_slices=n_planned - (dropped is not None),
        n_slices_planned=n_planned,
        slice_spacing=spacing,
        slice_thickness=thickness,
        slice_step=[float(x) for x in step],
        pixel_spacing=[float(ps[0]), float(ps[1])],
        rows=rows,
        cols=cols,
        matrix=matrix,
        tilt_deg=tilt,
        tilt_mode=tilt_mode,
        iop=[float(x) for x in iop],
        ipp_first=[float(x) for x in ipps[0]],
        dropped_index=dropped,
        reversed=descending,
        reversed_by_option=rev_opt,
        transfer_syntax=str(syntax),
        pixel_representation=1 if study.signed else 0,
        bits_stored=16 if study.signed else 12,
        kernel=soft_kernel,
        noise_sigma=noise_sigma,
        mixed_orientation_instances=mixed_instances,
        instance_numbers=[None if k == dropped else inst[k] for k in range(n_planned)],
        phantom_seed=phantom_seed,
        patient_index=patient_index,
        phantom_meta=_jsonable(ph.meta),
    )


def _write_distractors(
    study: _Study,
    ph: Phantom,
    vendor: _Vendor,
    new_series: Any,
    rng: np.random.Generator,
    *,
    clean: np.ndarray,
    ipps: list[np.ndarray],
    iop: list[float],
    ps: tuple[float, float],
    thickness: float,
    spacing: float,
    tilt: float,
    centres: list[np.ndarray],
    bone_kernel: str,
    soft_kernel: str,
    short: str,
    noise_sigma: float,
    fov: float,
) -> None:
    """Series a PACS sends alongside the one we want: they must be recognised and skipped."""
    # Localizer: projection radiograph(s) of the phantom on a coarse grid, upsampled to 512.
    loc = new_series("localizer", vendor.localizer_desc, "T20s" if vendor.key == "siemens" else "",
                     ["ORIGINAL", "PRIMARY", "LOCALIZER"], (300.0, 1200.0))  # fmt: skip
    span = 320.0
    g = 4.0
    cz = float(ph.center[2]) - 40.0
    xs = np.arange(-100.0, 100.0 + 1e-6, g) + float(ph.center[0])
    ys = np.arange(-span / 2, span / 2 + 1e-6, g)
    zs = np.arange(span / 2, -span / 2 - 1e-6, -g) + cz  # top (superior) first
    zz, yy, xx = np.meshgrid(zs, ys, xs, indexing="ij")
    hu3 = ph.sample(np.stack([xx, yy, zz], -1))[0].reshape(len(zs), len(ys), len(xs))
    mu = np.clip(1.0 + hu3 / 1000.0, 0, None) * 0.019 * g
    n_views = 1 + int(rng.random() < 0.5)
    views = [(mu.sum(axis=2), [0.0, 1.0, 0.0, 0.0, 0.0, -1.0])]  # lateral: rows down z, cols along +y
    if n_views == 2:
        views.append((mu.sum(axis=1), [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]))  # AP
    lps = span / 512.0
    for j, (proj, liop) in enumerate(views):
        tgt = np.linspace(0, proj.shape[0] - 1, 512)
        src = np.arange(proj.shape[0])
        tmp = np.stack([np.interp(tgt, src, proj[:, c]) for c in range(proj.shape[1])], 1)
        tgt2 = np.linspace(0, proj.shape[1] - 1, 512)
        img = np.stack([np.interp(tgt2, np.arange(proj.shape[1]), row) for row in tmp], 0)
        img = img * 350.0 + rng.normal(0, 6.0, img.shape) - 1024.0
        lr, lc = np.asarray(liop[:3]), np.asarray(liop[3:])
        origin = np.array([float(ph.center[0]), 0.0, cz]) - (span / 2) * lr - (span / 2) * lc
        ds = _ct_image(
            study, loc, instance=j + 1, raw=_to_raw(img, study.signed), ipp=_r(origin), iop=liop,
            ps=(lps, lps), thickness=0.6, spacing=None, tilt=0.0, slice_location=0.0,
        )  # fmt: skip
        _save(ds, loc, j + 1)

    # Bone-kernel reconstruction of the same acquisition: same planes, sharp kernel, more noise.
    bone = new_series("bone", vendor.bone_fmt.format(thk=thickness, kernel=bone_kernel, short=bone_kernel),
                      bone_kernel, ["ORIGINAL", "PRIMARY", "AXIAL"], (500.0, 2000.0))  # fmt: skip
    sharp = clean + 0.9 * (clean - _blur(clean)) + rng.standard_normal(clean.shape, dtype=np.float32) * (
        np.float32(max(noise_sigma, 1e-3) * 3.5)
    )
    raw_b = _to_raw(sharp, study.signed)
    bone_desc = vendor.superior_first
    n = len(ipps)
    for k in range(n):
        number = n - k if bone_desc else k + 1
        ds = _ct_image(
            study, bone, instance=number, raw=raw_b[k], ipp=list(ipps[k]), iop=iop, ps=ps,
            thickness=thickness, spacing=spacing, tilt=tilt, slice_location=float(centres[k][2]),
        )  # fmt: skip
        _save(ds, bone, number)

    # Thin-slice soft series through the middle of the brain at 256 matrix (kept small on purpose).
    tthk = vendor.thin_thickness
    tps = (fov / 256.0, fov / 256.0)
    t_iop = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ti = np.asarray(t_iop)
    n_thin = 24
    z0 = float(ph.center[2]) - (n_thin - 1) / 2.0 * tthk
    half = 127.5 * tps[1] * ti[:3] + 127.5 * tps[0] * ti[3:]
    t_ipps = [np.asarray(_r(np.array([0.0, 0.0, z0 + k * tthk]) - half)) for k in range(n_thin)]
    thin_img, _ = _render(ph, t_ipps, ti, tps, 256, 256, tthk, 1)
    thin_img += _soft_noise(rng, thin_img.shape, noise_sigma * math.sqrt(thickness / tthk) * 0.8)
    thin = new_series("thin", vendor.thin_fmt.format(thk=tthk, kernel=soft_kernel, short=short), soft_kernel,
                      ["ORIGINAL", "PRIMARY", "AXIAL"], vendor.soft_window)  # fmt: skip
    raw_t = _to_raw(thin_img, study.signed)
    for k in range(n_thin):
        ds = _ct_image(
            study, thin, instance=k + 1, raw=raw_t[k], ipp=list(t_ipps[k]), iop=t_iop, ps=tps,
            thickness=tthk, spacing=tthk, tilt=0.0, slice_location=float(t_ipps[k][2]),
        )  # fmt: skip
        _save(ds, thin, k + 1)

    # Coronal reformat (derived): 12 planes 8 mm apart through the head.
    c_iop = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    ci = np.asarray(c_iop)
    n_cor = 12
    zc = float(ph.center[2]) + 10.0
    c_ipps = []
    for k in range(n_cor):
        y = float(ph.center[1]) + (k - (n_cor - 1) / 2.0) * 8.0
        centre = np.array([0.0, y, zc])
        c_ipps.append(np.asarray(_r(centre - 127.5 * tps[1] * ci[:3] - 127.5 * tps[0] * ci[3:])))
    cor_img, _ = _render(ph, c_ipps, ci, tps, 256, 256, 3.0, 1)
    cor_img += _soft_noise(rng, cor_img.shape, noise_sigma)
    ref = new_series("reformat", vendor.reformat_desc, soft_kernel, list(vendor.reformat_type),
                     vendor.soft_window)  # fmt: skip
    raw_c = _to_raw(cor_img, study.signed)
    for k in range(n_cor):
        ds = _ct_image(
            study, ref, instance=k + 1, raw=raw_c[k], ipp=list(c_ipps[k]), iop=c_iop, ps=tps, thickness=3.0,
            spacing=8.0, tilt=0.0, slice_location=float(c_ipps[k][1]),
        )  # fmt: skip
        _save(ds, ref, k + 1)

    # Dose report: a Secondary Capture "screenshot" with block glyphs standing in for text.
    dose = new_series("dose", "Dose Report", "", ["DERIVED", "SECONDARY", "OTHER"], (128.0, 256.0))
    ds = _new_dataset(study, dose, SC_IMAGE_STORAGE, 1)
    ds.ConversionType = "WSD"
    ds.PatientOrientation = ""
    img = np.zeros((512, 512), np.uint8)
    img[40:44, 30:480] = 200
    for line in range(12):
        y0 = 70 + line * 30
        x = 30
        while x < 470:
            wdt = int(rng.integers(4, 12))
            if rng.random() < 0.8:
                img[y0:y0 + 12, x:x + wdt] = 230
            x += wdt + 3
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = img.tobytes()
    _save(ds, dose, 1)


# --------------------------------------------------------------------------------------------------
# Dataset writer and CLI
# --------------------------------------------------------------------------------------------------


def write_dataset(
    out: Path, normal: int, abnormal: int, seed: int, options: SynthOptions | None = None
) -> list[StudyTruth]:
    """Write ``normal + abnormal`` studies, ``labels.csv`` and ``truth.jsonl`` under ``out``.

    Abnormal studies alternate hemorrhage/infarct (hemorrhage gets the odd one), and the study order
    is shuffled so that folder index does not leak the label.  Study ``i`` uses its own generator
    seeded by (seed, i), so any single study can be regenerated without the others.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    opts = options or SynthOptions()
    lesions: list[str | None] = [None] * normal + [
        "hemorrhage" if j % 2 == 0 else "infarct" for j in range(abnormal)
    ]
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED])).permutation(len(lesions))
    rows: list[StudyTruth] = []
    for i, li in enumerate(order):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        truth = write_study(
            out / f"study_{i:04d}", rng, lesion=lesions[int(li)], options=opts, patient_index=i
        )
        rows.append(truth)
    with (out / "labels.csv").open("w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["study_uid", "label", "lesion"])
        for t in rows:
            wr.writerow([t.study_uid, t.label, t.lesion])
    with (out / "truth.jsonl").open("w") as fh:
        for t in rows:
            fh.write(json.dumps(t.to_dict(), sort_keys=True) + "\n")
    return rows


def _fraction(text: str) -> float:
    x = float(text)
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError("fraction must be within [0, 1]")
    return x


def main(argv: list[str] | None = None) -> int:
    """``training synth``: write a synthetic labelled head-CT dataset."""
    p = argparse.ArgumentParser(prog="training synth", description=__doc__.splitlines()[0])
    frac = "fraction of studies (0-1) whose primary series gets this hard case"
    p.add_argument("--out", type=Path, required=True, help="dataset folder (created)")
    p.add_argument("--normal", type=int, required=True, help="number of normal studies")
    p.add_argument("--abnormal", type=int, required=True, help="abnormal studies (hemorrhage/infarct)")
    p.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical dataset")
    p.add_argument("--tilt-fraction", type=_fraction, default=0.0, help=f"{frac}: gantry tilt 10-20 deg")
    p.add_argument("--tilt-shear-fraction", type=_fraction, default=0.0,
                   help="of tilted studies, fraction stepping along the table (sheared stack)")  # fmt: skip
    p.add_argument("--reverse-fraction", type=_fraction, default=0.0, help=f"{frac}: reversed numbering")
    p.add_argument("--missing-fraction", type=_fraction, default=0.0, help=f"{frac}: slice dropped")
    p.add_argument("--compressed-fraction", type=_fraction, default=0.0, help=f"{frac}: lossless compression")
    p.add_argument("--mixed-orientation-fraction", type=_fraction, default=0.0,
                   help=f"{frac}: two coronal images appended")  # fmt: skip
    p.add_argument("--matrix", choices=["256", "512", "mixed"], default="256")
    p.add_argument("--no-distractors", action="store_true", help="write only the primary series")
    p.add_argument("--slab-samples", type=int, default=3, help="samples across thickness (1: fast)")
    a = p.parse_args(argv)
    if a.normal < 0 or a.abnormal < 0:
        p.error("--normal/--abnormal must be >= 0")
    opts = SynthOptions(
        matrix=a.matrix if a.matrix == "mixed" else int(a.matrix),
        tilt_fraction=a.tilt_fraction,
        tilt_shear_fraction=a.tilt_shear_fraction,
        reverse_fraction=a.reverse_fraction,
        missing_fraction=a.missing_fraction,
        compressed_fraction=a.compressed_fraction,
        mixed_orientation_fraction=a.mixed_orientation_fraction,
        distractors=not a.no_distractors,
        slab_samples=a.slab_samples,
    )
    rows = write_dataset(a.out, a.normal, a.abnormal, a.seed, opts)
    n_abn = sum(t.label == "abnormal" for t in rows)
    print(f"wrote {len(rows)} studies ({len(rows) - n_abn} normal, {n_abn} abnormal) to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
