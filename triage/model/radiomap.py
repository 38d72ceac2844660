"""The region score's radiograph parts: window sizes, where to search, and where a region lies on the
source image (the chest counterpart of the head-CT rules in :mod:`triage.model.voxelmap`).

The rule (``glowtriage.region-2d/1``), fixed a priori, before any test score or label was looked at:

* **Windows as fractions of the canonical image side**: ``WINDOWS_SIDE`` = 1/32, 1/16, 1/8 and 1/4
  of the 512-pixel side, about 11, 22, 45 and 90 mm on a 36 cm field (13-108 mm on a 43 cm detector):
  from the smallest nodule a radiograph shows (~1 cm) to a lobe or an effusion. Not millimetres because
  the canonical image has no one pixel size: :func:`triage.assemble.radiograph.canonical_image` scales
  each image so its longer side fills 512 pixels (0.67-0.79 mm a pixel on the synthetic vendors), a PNG
  or JPEG records no pixel size at all, and a detector's ImagerPixelSpacing includes the projection's
  magnification. The detector is sized to the thorax, so a fixed fraction of the side covers about the
  same anatomy in every image, which is what per-position statistics need.
* **Search mask: the whole image with the padding left out** (:func:`content_mask`). A chest finding
  can sit anywhere in the thorax, its edges included (an apical pneumothorax, a costophrenic effusion),
  and a lung-field mask taken from the image would be changed by the very findings it should search
  (an effusion or a consolidation makes the lung as bright as the soft tissue). Padding (the zero
  columns or rows of the aspect-preserving resize) holds no patient and differs in width from image to
  image, so a window there would only measure how wide it is. Model pixels partly on the padding are left
  out too (their average mixes in the zeros).
* The rest is the CT rule unchanged: each level standardized per position on the calibration normals,
  levels added, per-size minima standardized by the normals' leave-one-out minima, most negative size.

Where (``region_center_px``, ``region_center_mm``): the winning window's centre is carried from the model
grid to the canonical image (block centres) and through the image's ``content_box`` back to the source
image, as a continuous (column, row) in the DICOM SCOORD convention ((0, 0) is the top-left corner of the
top-left pixel, a pixel's centre is at +0.5) and as millimetres in the image plane from that corner by
the source's pixel spacing (the one the assembly honoured; 1 mm a pixel when none is recorded). A
radiograph is a projection: the point is on the image, not in the patient, so no patient coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from triage.assemble.radiograph import RADIOGRAPH_SHAPE

__all__ = [
    "FORMAT_2D",
    "WINDOWS_SIDE",
    "canonical_side",
    "content_mask",
    "model_spacing_side",
    "radiograph_fields",
    "source_to_model_index",
]

FORMAT_2D = "glowtriage.region-2d/1"
WINDOWS_SIDE: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4)


def canonical_side() -> int:
    """Side of the canonical radiograph in pixels (the unit ``WINDOWS_SIDE`` are fractions of)."""
    return int(RADIOGRAPH_SHAPE[0])


def model_spacing_side(image_shape: Sequence[int]) -> tuple[float, float]:
    """Pixel size of a 2-D model's grid as a fraction of the canonical side (block-averaged 512 -> shape)."""
    if len(image_shape) != 2:
        raise ValueError(f"a radiograph region needs a 2-D model, got {tuple(image_shape)}")
    return tuple(1.0 / float(s) for s in image_shape)  # type: ignore[return-value]


def content_mask(image: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    """Where a radiograph's region centres are searched (bool, ``image_shape``): every model pixel whose
    block of the canonical ``image`` lies inside the image content, i.e. not on the zero padding rows or
    columns at its edges. An image with no content at all (a test blank) is searched everywhere."""
    shape = tuple(int(v) for v in image_shape)
    v = np.asarray(image)
    nz = v > 0
    rows, cols = np.flatnonzero(nz.any(axis=1)), np.flatnonzero(nz.any(axis=0))
    if rows.size == 0 or cols.size == 0:
        return np.ones(shape, dtype=bool)
    inside = np.zeros(v.shape, dtype=bool)
    inside[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
    if v.shape == shape:
        return inside
    f = [s // t for s, t in zip(v.shape, shape, strict=True)]
    blocks = inside.reshape(shape[0], f[0], shape[1], f[1])
    return blocks.all(axis=(1, 3))


def _geometry(metadata: dict[str, Any] | None) -> tuple[list[int], list[int], list[float]] | None:
    geo = (metadata or {}).get("source_geometry") or {}
    box, shape = geo.get("content_box"), geo.get("source_shape")
    if not box or not shape:
        return None
    spacing = geo.get("source_spacing") or [1.0, 1.0]
    return [int(v) for v in box], [int(v) for v in shape], [float(v) for v in spacing]


def radiograph_fields(index_rc: Sequence[float], window_side: float, zmap: np.ndarray,
                      image_shape: Sequence[int], metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The result fields of a radiograph region centred at model index ``index_rc`` (row, col), won by
    a window of ``window_side`` (a fraction of the canonical side), for ``ScoreResult``.

    ``region_window_mm``: the window's side on this image (its fraction of the canonical side times the
    canonical pixel size; in canonical pixels when the image's size is unknown). With the assembly's
    metadata also ``region_center_mm`` ([x, y] mm in the image plane from its top-left corner, by the
    source's pixel spacing) and ``region_sop_instance_uid`` (the scored image); ``extra`` (merged into
    the JSON) ``region_center_px`` ([column, row] on the source image, SCOORD convention) and
    ``region_window_side``; ``region_map`` what the key images need (the map, the model shape, the
    canonical centre and the image's geometry).
    """
    side = canonical_side()
    f = [side // int(s) for s in image_shape]
    canon = [float(i) * k + (k - 1) / 2.0 for i, k in zip(index_rc, f, strict=True)]
    grid = (metadata or {}).get("grid") or {}
    mm_per_px = float((grid.get("spacing") or [1.0])[0])
    window_mm = float(window_side) * side * mm_per_px
    out: dict[str, Any] = {"region_window_mm": window_mm,
                           "extra": {"region_window_side": float(window_side)}}
    geo = _geometry(metadata)
    out["region_map"] = {"kind": "cxr", "zmap": zmap, "image_shape": [int(v) for v in image_shape],
                         "index_rc": [float(v) for v in index_rc], "canonical_center_rc": canon,
                         "window_mm": window_mm, "window_side": float(window_side),
                         "geometry": None if geo is None else
                         {"content_box": geo[0], "source_shape": geo[1], "source_spacing": geo[2]}}
    if geo is None:
        return out
    (top, left, h, w), (rows, cols), (dr, dc) = geo
    row = (canon[0] + 0.5 - top) * rows / h
    col = (canon[1] + 0.5 - left) * cols / w
    out["extra"]["region_center_px"] = [col, row]
    out["region_center_mm"] = [col * dc, row * dr]
    uids = (metadata or {}).get("sop_instance_uids") or []
    out["region_sop_instance_uid"] = str(uids[0]) if uids else None
    return out


def source_to_model_index(rows: np.ndarray, cols: np.ndarray, geometry: dict[str, Any],
                          model_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Continuous model-grid (row, col) indices of source pixel centres ``rows``/``cols`` (integer
    pixel indices of the source image), through ``geometry`` (``content_box``, ``source_shape``):
    the inverse of :func:`radiograph_fields`' chain, for sampling the map on the source image."""
    top, left, h, w = (int(v) for v in geometry["content_box"])
    n_rows, n_cols = (int(v) for v in geometry["source_shape"])
    side = canonical_side()
    fr, fc = side // int(model_shape[0]), side // int(model_shape[1])
    canon_r = (np.asarray(rows, dtype=float) + 0.5) * h / n_rows + top - 0.5
    canon_c = (np.asarray(cols, dtype=float) + 0.5) * w / n_cols + left - 0.5
    return (canon_r - (fr - 1) / 2.0) / fr, (canon_c - (fc - 1) / 2.0) / fc
