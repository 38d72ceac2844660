"""Pixels: decode each file with pydicom and rescale to HU with its own slope and intercept.

Why pydicom and not SimpleITK's ImageSeriesReader: GDCM sorts files by its own rules, takes the
geometry of the first file, shears a gantry-tilted series silently, and its errors do not name the
bad file. Padding (PixelPaddingValue, PixelPaddingRangeLimit) and values below -1024 HU (out-of-FOV
fill) become -1024 before any filtering, so they cannot darken the edge of the head. A multi-frame
(Enhanced CT) file is decoded once and rescaled frame by frame from its Pixel Value Transformation
functional groups.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from triage.assemble.common import AIR_HU, VolumeError, _sop_class_name
from triage.assemble.headers import InstanceHeader, _dcmread, _header_from_dataset, frame_headers


def _stored_pixels(ds: Dataset, path: Path) -> np.ndarray:
    """The decoded stored values: (rows, columns) for one frame, (frames, rows, columns) for more."""
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeError(f"{path}: SamplesPerPixel {ds.SamplesPerPixel} (a colour image, not CT)", "not_ct")
    if "PixelData" not in ds:
        raise VolumeError(f"{path}: no pixel data", "invalid")
    try:
        return ds.pixel_array
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise VolumeError(
            f"{path}: cannot decode pixel data (transfer syntax {_sop_class_name(str(ts))}): "
            f"{type(exc).__name__}: {exc}",
            "decode",
        ) from None


def _rescale(ds: Dataset, path: Path, frame: int | None) -> tuple[float, float]:
    """RescaleSlope/Intercept: for a frame of an enhanced image, from its Pixel Value Transformation
    functional group (per-frame, else shared), else the top-level attributes."""
    source: Dataset = ds
    if frame is not None:
        per = ds.get("PerFrameFunctionalGroupsSequence") or []
        shared = ds.get("SharedFunctionalGroupsSequence") or []
        for groups, i in ((per, frame), (shared, 0)):
            if i < len(groups) and groups[i].get("PixelValueTransformationSequence"):
                source = groups[i].PixelValueTransformationSequence[0]
                break
    try:
        slope = float(source.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(source.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{path}: unreadable RescaleSlope/RescaleIntercept ({exc})") from None
    return slope, intercept


def _to_hu(stored: np.ndarray, ds: Dataset, path: Path, frame: int | None = None) -> np.ndarray:
    """Stored values of one frame -> HU, padding -> air (float32, rows x columns)."""
    slope, intercept = _rescale(ds, path, frame)
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


def _hu_from_dataset(ds: Dataset, path: Path) -> np.ndarray:
    """Stored values -> HU for one single-frame slice, padding -> air (float32, rows x columns)."""
    stored = _stored_pixels(ds, path)
    if stored.ndim != 2:
        raise VolumeError(f"{path}: pixel data has shape {stored.shape}, expected one 2-D frame", "geometry")
    return _to_hu(stored, ds, path)


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
    """One slice to stack: a single-frame file, or one frame of a multi-frame one (``header.frame_index``)."""

    header: InstanceHeader
    ds: Dataset
    s: float = 0.0  # position along the normal


def _read_series(paths: Sequence[os.PathLike[str] | str]) -> list[_Slice]:
    """Every slice of the files (a multi-frame file gives one a frame); a re-sent instance once."""
    out: list[_Slice] = []
    seen: set[str] = set()
    for raw in paths:
        p = Path(raw)
        ds = _dcmread(p, pixels=True)
        h = _header_from_dataset(ds, p)
        if h.sop_instance_uid in seen:  # the same instance twice (re-sent): not a conflict
            continue
        seen.add(h.sop_instance_uid)
        if h.number_of_frames > 1:
            out.extend(_Slice(fh, ds) for fh in frame_headers(ds, h))
        else:
            out.append(_Slice(h, ds))
    return out


def slice_hu(sl: _Slice, cache: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """One slice's HU; a multi-frame file is decoded once (``cache`` keeps it by dataset)."""
    h = sl.header
    if h.frame_index is None:
        return _hu_from_dataset(sl.ds, h.path)
    cache = {} if cache is None else cache
    key = id(sl.ds)
    if key not in cache:
        stored = _stored_pixels(sl.ds, h.path)
        cache[key] = stored if stored.ndim == 3 else stored[None]
    frames = cache[key]
    if h.frame_index >= frames.shape[0]:
        raise VolumeError(f"{h.path}: frame {h.frame_index + 1} of {frames.shape[0]} missing", "geometry")
    return _to_hu(frames[h.frame_index], sl.ds, h.path, h.frame_index)


def _decode_stack(slices: list[_Slice]) -> tuple[np.ndarray, np.ndarray]:
    """HU stack (slices, rows, columns) in the order given, and the slice positions (n, 3)."""
    first = slices[0].header
    rows, cols = int(first.rows or 0), int(first.columns or 0)
    stack = np.empty((len(slices), rows, cols), dtype=np.float32)
    positions = np.empty((len(slices), 3))
    cache: dict[int, np.ndarray] = {}
    for k, s in enumerate(slices):
        hu = slice_hu(s, cache)
        if hu.shape != (rows, cols):
            raise VolumeError(
                f"series {first.series_uid}: {s.header.path}: pixel data {hu.shape}, header {rows}x{cols}",
                "geometry",
            )
        stack[k] = hu
        positions[k] = s.header.position
    for s in slices:
        s.ds = None  # type: ignore[assignment]  # release the files' bytes
    return stack, positions
