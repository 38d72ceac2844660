"""Pixels: decode each file with pydicom and rescale to HU with its own slope and intercept.

Why pydicom and not SimpleITK's ImageSeriesReader: GDCM sorts files by its own rules, takes the
geometry of the first file, shears a gantry-tilted series silently, and its errors do not name the
bad file. Padding (PixelPaddingValue, PixelPaddingRangeLimit) and values below -1024 HU (out-of-FOV
fill) become -1024 before any filtering, so they cannot darken the edge of the head.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from triage.assemble.common import AIR_HU, VolumeError, _sop_class_name
from triage.assemble.headers import InstanceHeader, _dcmread, _header_from_dataset


def _hu_from_dataset(ds: Dataset, path: Path) -> np.ndarray:
    """Stored values -> HU for one single-frame slice, padding -> air (float32, rows x columns)."""
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeError(f"{path}: SamplesPerPixel {ds.SamplesPerPixel} (a colour image, not CT)", "not_ct")
    if "PixelData" not in ds:
        raise VolumeError(f"{path}: no pixel data", "invalid")
    try:
        stored = ds.pixel_array
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise VolumeError(
            f"{path}: cannot decode pixel data (transfer syntax {_sop_class_name(str(ts))}): "
            f"{type(exc).__name__}: {exc}",
            "decode",
        ) from None
    if stored.ndim != 2:
        raise VolumeError(f"{path}: pixel data has shape {stored.shape}, expected one 2-D frame", "geometry")
    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{path}: unreadable RescaleSlope/RescaleIntercept ({exc})") from None
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        pad = _as_stored(int(padding), ds)
        limit = ds.get("PixelPaddingRangeLimit")
        if limit is not None:
            lo, hi = sorted((pad, _as_stored(int(limit), ds)))
            mask = (stored >= lo) & (stored <= hi)
        else:
            mask = stored == pad
        hu[mask] = AIR_HU
    np.maximum(hu, AIR_HU, out=hu)
    return hu


def _as_stored(value: int, ds: Dataset) -> int:
    """A padding value as the pixel array holds it (a signed image with the value written unsigned)."""
    bits = int(ds.get("BitsAllocated", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1 and value >= 2 ** (bits - 1):
        return value - 2**bits
    return value


def read_slice_hu(path: str | os.PathLike[str]) -> tuple[InstanceHeader, np.ndarray]:
    """One file's header and its pixels in HU (float32; padding and values below -1024 -> -1024)."""
    p = Path(path)
    ds = _dcmread(p, pixels=True)
    return _header_from_dataset(ds, p), _hu_from_dataset(ds, p)


@dataclass
class _Slice:
    header: InstanceHeader
    ds: Dataset
    s: float = 0.0  # position along the normal


def _read_series(paths: Sequence[os.PathLike[str] | str]) -> list[_Slice]:
    out: list[_Slice] = []
    seen: set[str] = set()
    for raw in paths:
        p = Path(raw)
        ds = _dcmread(p, pixels=True)
        h = _header_from_dataset(ds, p)
        if h.sop_instance_uid in seen:  # the same instance twice (re-sent): not a conflict
            continue
        seen.add(h.sop_instance_uid)
        out.append(_Slice(h, ds))
    return out


def _decode_stack(
    slices: list[_Slice], gaps: dict[int, int], warnings: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """HU stack (slices, rows, columns) in order, gaps filled by linear interpolation; positions."""
    first = slices[0].header
    rows, cols = int(first.rows or 0), int(first.columns or 0)
    n_out = len(slices) + sum(gaps.values())
    stack = np.empty((n_out, rows, cols), dtype=np.float32)
    positions = np.empty((n_out, 3))
    index: list[int] = []  # output index of each source slice
    k = 0
    for i, s in enumerate(slices):
        hu = _hu_from_dataset(s.ds, s.header.path)
        if hu.shape != (rows, cols):
            raise VolumeError(
                f"series {first.series_uid}: {s.header.path}: pixel data {hu.shape}, header {rows}x{cols}",
                "geometry",
            )
        stack[k] = hu
        positions[k] = s.header.position
        s.ds = None  # type: ignore[assignment]  # release the file's bytes early
        index.append(k)
        k += 1 + gaps.get(i, 0)
    for i, missing in sorted(gaps.items()):
        a, b = index[i], index[i + 1]
        for q in range(1, missing + 1):
            t = q / (missing + 1)
            stack[a + q] = (1 - t) * stack[a] + t * stack[b]
            positions[a + q] = (1 - t) * positions[a] + t * positions[b]
        at = ", ".join(f"{positions[a + q][2]:.2f}" for q in range(1, missing + 1))
        warnings.append(
            f"interpolated {missing} missing slice{'s' if missing > 1 else ''} at z={at} mm "
            f"(between z={positions[a][2]:.2f} and z={positions[b][2]:.2f} mm)"
        )
    return stack, positions
