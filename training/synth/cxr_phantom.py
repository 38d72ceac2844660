"""Synthetic chest radiographs: projected anatomy as a line-integral (attenuation) image.

Why a projection model and not pictures: a radiograph is the sum of attenuation along each ray, so
overlapping structures add (the heart over the left lung, ribs over everything, an effusion over the
base). Drawing each organ as a thickness map and summing reproduces what a reader (and the flow)
sees: lung fields darker than the mediastinum, rib shadows crossing them, the diaphragm domes.

Coordinates: anatomy is drawn in body units (``u`` across, -1 = patient's right edge of the chest
wall as displayed, i.e. the image's left in a PA view; ``v`` down, 0 = the lung apices, 1 = the
costophrenic angles), then mapped onto the detector with the study's size, rotation and shift.

The output (:class:`Radiograph`) is the attenuation image (float32, larger = more attenuating =
brighter on a MONOCHROME2 display) plus the truth: abnormal kind and its centre in pixels.
Normal variation: body size, lung height, heart size within normal (cardiothoracic ratio 0.38-0.48),
inspiration (diaphragm level), rotation, exposure, vascular markings. Abnormal kinds
(:data:`CXR_LESIONS`): consolidation, effusion, pneumothorax, nodule (or mass), cardiomegaly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

CXR_LESIONS = ("consolidation", "effusion", "pneumothorax", "nodule", "cardiomegaly")
VIEWS = ("PA", "AP", "LL")


@dataclass
class Radiograph:
    """One projection: ``image[row, col]`` attenuation (float32) and what was drawn."""

    image: np.ndarray
    view: str  # PA, AP (frontal) or LL (lateral)
    lesion: str = ""  # one of CXR_LESIONS, "" for normal
    lesion_center_px: tuple[float, float] | None = None  # (row, col) in the image
    params: dict[str, float] = field(default_factory=dict)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    n = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / (float(n.std()) + 1e-6)


def _ellipse_thickness(u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, av: float
                       ) -> np.ndarray:
    """Chord length through an ellipsoid seen along the beam: sqrt(1 - r^2), 0 outside."""
    r2 = ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2
    return np.sqrt(np.clip(1.0 - r2, 0.0, None))


def _lung(u: np.ndarray, v: np.ndarray, side: float, p: dict[str, float]) -> np.ndarray:
    """One lung's air thickness (0..1): apex at v=0, rounded lateral wall, mediastinal border, dome base.

    ``side`` -1 for the image-left lung, +1 for the image-right one.
    """
    s = side * u  # >0 towards this lung's lateral wall
    medial = p["mediastinum"] + (p["heart_w"] * 0.8 if side > 0 else p["heart_w"] * 0.35) * np.clip(
        (v - 0.45) / 0.4, 0.0, 1.0
    ) ** 0.7
    lateral = 0.93 - 1.1 * np.clip(0.32 - v, 0.0, None) ** 1.3
    dome = (p["dome_r"] if side < 0 else p["dome_l"]) + 0.12 * ((s - 0.55) / 0.4) ** 2
    width = np.clip(lateral - medial, 1e-3, None)
    x = (s - medial) / width  # 0 at the mediastinum, 1 at the chest wall
    inside = (x > 0) & (x < 1) & (v > 0.0) & (v < dome)
    across = np.sqrt(np.clip(x * (1 - x) * 4.0, 0.0, 1.0))
    apex = np.clip(v / 0.12, 0.0, 1.0) ** 0.5
    base = np.clip((dome - v) / 0.06, 0.0, 1.0) ** 0.5
    return np.where(inside, across * apex * base, 0.0).astype(np.float32)


def _ribs(u: np.ndarray, v: np.ndarray, rng: np.random.Generator, p: dict[str, float]) -> np.ndarray:
    """Posterior and anterior rib shadows: curved bands with denser cortical edges."""
    out = np.zeros_like(u, dtype=np.float32)
    au = np.abs(u)
    spacing = p["rib_spacing"]
    for k in range(10):
        v0 = 0.02 + k * spacing + rng.normal(0, 0.004)
        # posterior rib: leaves the spine and sags laterally
        centre = v0 + 0.18 * (au - 0.08) ** 2 + 0.04 * au
        d = np.abs(v - centre)
        band = np.clip(1.0 - d / p["rib_w"], 0.0, 1.0)
        cortex = np.exp(-(((d - p["rib_w"] * 0.85) / (p["rib_w"] * 0.2)) ** 2))
        rib = (0.55 * band + 0.45 * cortex) * (au > 0.07) * (au < 0.95)
        out += rib.astype(np.float32)
        # anterior rib: fainter, rising laterally
        centre_a = v0 + 0.16 - 0.12 * au
        da = np.abs(v - centre_a)
        out += (0.35 * np.clip(1.0 - da / (p["rib_w"] * 1.2), 0.0, 1.0) * (au > 0.3) * (au < 0.9)).astype(
            np.float32
        )
    return out


def _clavicles(u: np.ndarray, v: np.ndarray, p: dict[str, float]) -> np.ndarray:
    out = np.zeros_like(u, dtype=np.float32)
    for side in (-1.0, 1.0):
        s = side * u
        centre = p["clav_v"] - 0.10 * (s - 0.1) + 0.12 * (s - 0.4) ** 2
        d = np.abs(v - centre)
        out += (np.clip(1.0 - d / 0.022, 0.0, 1.0) * (s > 0.06) * (s < 0.7)).astype(np.float32)
    return out


def _params(rng: np.random.Generator) -> dict[str, float]:
    return {
        "body_w": float(rng.uniform(1.10, 1.30)),  # chest wall half-width relative to lung span
        "mediastinum": float(rng.uniform(0.10, 0.14)),
        "heart_w": float(rng.uniform(0.26, 0.34)),  # widening of the heart below v=0.45 (normal CTR)
        "heart_cu": float(rng.uniform(0.06, 0.12)),
        "dome_r": float(rng.uniform(0.86, 0.94)),
        "dome_l": 0.0,
        "rib_spacing": float(rng.uniform(0.085, 0.095)),
        "rib_w": float(rng.uniform(0.018, 0.024)),
        "clav_v": float(rng.uniform(0.02, 0.07)),
        "soft": float(rng.uniform(0.9, 1.3)),  # soft tissue (habitus)
        "vessels": float(rng.uniform(0.08, 0.13)),
    }


def render_frontal(rng: np.random.Generator, shape: tuple[int, int], spacing_mm: float,
                   lesion: str | None = None, view: str = "PA") -> Radiograph:
    """A frontal chest projection on a detector of ``shape`` pixels of ``spacing_mm``."""
    p = _params(rng)
    p["dome_l"] = p["dome_r"] + float(rng.uniform(0.02, 0.05))  # the left dome sits lower
    if lesion == "cardiomegaly":
        p["heart_w"] = float(rng.uniform(0.48, 0.58))
    rows, cols = shape
    # detector -> body units: lungs span ~300 mm across (u in -1..1), ~260 mm apex to base (v in 0..1)
    scale = float(rng.uniform(0.88, 1.12))
    half_w_mm, height_mm = 150.0 * scale, 260.0 * scale * float(rng.uniform(0.92, 1.08))
    angle = math.radians(float(rng.normal(0, 2.5)))
    cy = rows * spacing_mm * float(rng.uniform(0.40, 0.48))
    cx = cols * spacing_mm * (0.5 + float(rng.normal(0, 0.02)))
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32) * spacing_mm
    dx, dy = xx - cx, yy - cy
    ca, sa = math.cos(angle), math.sin(angle)
    u = (ca * dx + sa * dy) / half_w_mm
    v = (-sa * dx + ca * dy) / height_mm + 0.5
    if view == "AP":  # AP: magnified heart, clavicles higher, shallower inspiration
        p["heart_w"] *= 1.10
        p["clav_v"] -= 0.04
        p["dome_r"] -= 0.04
        p["dome_l"] -= 0.04

    body_half = p["body_w"] + 0.05 * np.clip(v - 0.2, 0.0, None)
    neck = np.where(v < -0.05, 0.38 + 0.3 * np.clip(v + 0.25, 0.0, None), body_half)
    torso = np.sqrt(np.clip(1.0 - (u / neck) ** 2, 0.0, None)) * (v > -0.6)
    shoulders = 0.6 * _ellipse_thickness(u, v, -1.05, -0.02, 0.35, 0.12) + 0.6 * _ellipse_thickness(
        u, v, 1.05, -0.02, 0.35, 0.12)
    soft = p["soft"] * (torso + shoulders)
    lung = _lung(u, v, -1.0, p) + _lung(u, v, 1.0, p)
    heart = 1.1 * _ellipse_thickness(u, v, p["heart_cu"] + 0.06, 0.74, p["heart_w"] + 0.18, 0.26)
    media = 0.9 * np.exp(-((u / p["mediastinum"]) ** 4)) * (v < 0.95)
    spine = 0.3 * np.exp(-((u / 0.06) ** 6)) * (v > -0.6)
    abdomen = 0.6 * np.clip((v - np.minimum(p["dome_r"], p["dome_l"]) + 0.05) / 0.1, 0.0, 1.0) * torso
    hila = np.exp(-(((np.abs(u) - 0.22) / 0.08) ** 2 + ((v - 0.42) / 0.10) ** 2))
    texture = _smooth_noise(rng, shape, sigma=max(1.0, 3.0 / spacing_mm))
    vessels = p["vessels"] * (0.6 * hila + 0.4 * np.clip(texture, 0.0, None)) * (lung > 0)
    bone = _ribs(u, v, rng, p) + 1.2 * _clavicles(u, v, p)

    extra = np.zeros_like(u)
    centre: tuple[float, float] | None = None
    side = float(rng.choice([-1.0, 1.0]))
    if lesion == "consolidation":
        cu, cv = side * float(rng.uniform(0.35, 0.65)), float(rng.uniform(0.35, 0.8))
        blob = _ellipse_thickness(u, v, cu, cv, float(rng.uniform(0.18, 0.3)), float(rng.uniform(0.12, 0.22)))
        blob *= np.clip(0.8 + 0.3 * _smooth_noise(rng, shape, sigma=12.0 / spacing_mm), 0.0, None)
        extra += 1.4 * blob * (lung > 0)
        centre = (cv, cu)
    elif lesion == "effusion":
        dome = p["dome_r"] if side < 0 else p["dome_l"]
        level = dome - float(rng.uniform(0.15, 0.3))
        s = side * u
        meniscus = level - 0.12 * np.clip(s - 0.3, 0.0, None)  # rises along the lateral wall
        fluid = np.clip((v - meniscus) / 0.04, 0.0, 1.0) * (s > 0.05) * (s < 1.0)
        extra += 1.3 * fluid * np.clip(lung / 0.3, 0.0, 1.0) + 0.4 * fluid * (s > 0.85)
        centre = ((level + dome) / 2, side * 0.6)
    elif lesion == "pneumothorax":
        s = side * u
        rim = float(rng.uniform(0.14, 0.3))  # collapsed-lung gap at the lateral wall and apex
        outer = (s > 0.93 - rim - 0.2 * np.clip(0.4 - v, 0.0, None)) & (lung > 0) & (s > 0)
        outer |= (v < 0.05 + rim * 0.6) & (lung > 0) & (s > 0)
        vessels = np.where(outer, 0.0, vessels)
        extra -= 0.25 * outer.astype(np.float32)
        edge = gaussian_filter(outer.astype(np.float32), 1.0)
        extra += 0.35 * (edge * (1 - edge)) * 4 * (s > 0)
        centre = (0.25, side * 0.75)
    elif lesion == "nodule":
        cu, cv = side * float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.2, 0.75))
        r = float(rng.uniform(0.05, 0.14))  # 8 mm nodule to ~40 mm mass
        extra += 1.3 * _ellipse_thickness(u, v, cu, cv, r, r * 300.0 / 260.0)
        centre = (cv, cu)
    elif lesion == "cardiomegaly":
        centre = (0.7, p["heart_cu"])

    mu = 0.55 * soft - 1.0 * lung + 0.65 * heart + media + spine + abdomen + vessels + 0.45 * bone + extra
    mu = mu - float(mu.min())
    centre_px = None
    if centre is not None:
        cv_, cu_ = centre
        bx, by = cu_ * half_w_mm, (cv_ - 0.5) * height_mm
        centre_px = (float((sa * bx + ca * by + cy) / spacing_mm),
                     float((ca * bx - sa * by + cx) / spacing_mm))
    return Radiograph(mu.astype(np.float32), view, lesion or "", centre_px, p)


def render_lateral(rng: np.random.Generator, shape: tuple[int, int], spacing_mm: float) -> Radiograph:
    """A left lateral projection (the distractor of a two-view study): spine posterior, one lung field."""
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32) * spacing_mm
    u = (xx - cols * spacing_mm * 0.5) / 130.0  # anterior (-) to posterior (+)
    v = (yy - rows * spacing_mm * 0.45) / 260.0 + 0.5
    body = np.sqrt(np.clip(1.0 - (u / 1.15) ** 2, 0.0, None)) * (v > -0.5)
    lung = _ellipse_thickness(u, v, 0.05, 0.5, 0.85, 0.5) * (v < 0.9)
    heart = _ellipse_thickness(u, v, -0.35, 0.68, 0.4, 0.25)
    spine = 1.5 * np.exp(-(((u - 0.78) / 0.1) ** 4)) * (v > -0.5)
    sternum = 0.8 * np.exp(-(((u + 0.95) / 0.05) ** 2)) * (v > 0.0) * (v < 0.6)
    tex = 0.1 * np.clip(_smooth_noise(rng, shape, 3.0), 0.0, None) * (lung > 0)
    mu = 1.2 * body - 1.1 * lung + 0.8 * heart + spine + sternum + tex
    mu = mu - float(mu.min())
    return Radiograph(mu.astype(np.float32), "LL")
