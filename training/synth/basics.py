"""Constants and small helpers shared by the synthetic generator's modules.

Why a module of its own: the phantom, the lesions, the DICOM writers and the ground truth all need
the tissue classes, the rotation/plane-wave helpers and the JSON conversion; keeping them here lets
those modules import each other in one direction only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
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

_RESCALE_INTERCEPT = -1024.0
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's registered root; fine for synthetic data


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
