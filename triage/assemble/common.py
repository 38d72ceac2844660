"""What every step of assembly shares: the canonical grid, the window, the error type and its categories.

The canonical grid is fixed in physical units so a voxel means the same tissue in every study: see
:mod:`triage.assemble.volume` for how a series is placed on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.uid import UID

from triage.ops.logs import get_logger

PREPROCESSING_VERSION = "assemble-6"  # bump whenever a change here can change a voxel
TARGET_SHAPE: tuple[int, int, int] = (32, 128, 128)  # (z, y, x)
FOV_MM = 220.0
SLICE_MM = 4.5
PIXEL_MM = FOV_MM / TARGET_SHAPE[2]  # 1.71875
VERTEX_MARGIN_MM = 2.0
TISSUE_HU = -500.0
AIR_HU = -1024.0
WINDOW_OFFSET = 14  # the paper: clip(rint(HU) + 14, 0, 127)
WINDOW_MAX = 127
SPACING_TOLERANCE = 0.10  # relative deviation of a step from the median step
ORIENTATION_TOLERANCE = 0.01  # max abs difference of direction cosines within one orientation group
DUPLICATE_MM = 0.01  # two slices closer than this along the normal are at one position
MASK_Z_MM = 2.25  # z spacing of the coarse grid on which the head is found

NOT_PREFERRED = "not_preferred"  # category of an acceptable series ranked below the chosen one
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")

log = get_logger("assemble")


class VolumeError(Exception):
    """A series or file that cannot become a volume; the message names the series or file and why.

    ``category`` is a short name from a closed set (``invalid``, ``decode``, ``not_ct``, ``geometry``,
    ``tilt``, ``duplicate``, ``missing_slices``, ``too_few_slices``, ``not_head``, ``coverage``) for
    metric labels, where the message with its UIDs and positions would be unbounded.
    """

    def __init__(self, reason: str, category: str = "invalid"):
        self.reason = reason
        self.category = category
        super().__init__(reason)


GRID_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # x -> +X, y -> +Y, z index -> -Z


def window_7bit(hu: np.ndarray) -> np.ndarray:
    """The paper's brain window: ``clip(rint(HU) + 14, 0, 127)`` as uint8 (-14 HU -> 0, 113 -> 127)."""
    return np.clip(np.rint(hu) + WINDOW_OFFSET, 0, WINDOW_MAX).astype(np.uint8)


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.1f}" for x in v) + ")"
