"""Lesions of the synthetic head: how each is drawn (:func:`_draw_lesion`) and painted (`_apply_lesion`).

Why apart from the anatomy: lesions are the labels' ground truth, drawn from their own generator so
that the same subject can be written with and without one (paired, counterfactual comparisons).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from training.synth.basics import _EDEMA, _LESION, _jsonable, _rotation, _waves


class _Head(Protocol):
    """What lesions need of :class:`training.synth.phantom.Phantom` (a Protocol: no import cycle)."""

    radii: np.ndarray
    scale: np.ndarray
    hu: dict[str, float]
    sulc_hw: float
    sulc_depth: float

HEMORRHAGE_SUBTYPES = ("intraparenchymal", "subdural", "subarachnoid", "intraventricular")
INFARCT_SUBTYPES = ("mca", "pca", "lacunar")
_HEM_WEIGHTS = (0.4, 0.25, 0.2, 0.15)
_INF_WEIGHTS = (0.5, 0.2, 0.3)


@dataclass
class LesionSpec:
    """A lesion in head coordinates (mm); params are plain floats/lists so they serialise."""

    kind: str  # "hemorrhage" | "infarct"
    subtype: str
    site: str
    side: int  # +1 patient left, -1 patient right, 0 midline/bilateral
    hu: float
    params: dict[str, Any]


def _apply_lesion(ph: _Head, les: LesionSpec, ctx: dict[str, np.ndarray], hu: np.ndarray,
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


def _draw_lesion(r: np.random.Generator, ph: _Head, kind: str, sub: str | None) -> LesionSpec:
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
