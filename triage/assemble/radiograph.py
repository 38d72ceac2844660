"""Chest radiographs (CR, DX for presentation or for processing) -> the canonical 512x512 7-bit image.

The radiograph counterpart of :mod:`triage.assemble.volume`, one code path for the daemon, ``triage
score`` and training, so the images a chest model was trained on are the images it scores.

Routing
    :func:`study_kind` decides from a study's headers whether it is a chest-radiograph study (every
    image is CR or DX by SOP class or modality) or goes the head-CT way; :func:`assemble_by_kind` is
    what callers use: the same ``(SelectionResult, AssembledVolume | None)`` either way.

Which image (the frontal chest view; every other image is skipped with its reason)
    1. ``ViewPosition`` LL/RL/LLO/RLO/LAT..., or a lateral ``PatientOrientation`` (rows running A/P):
       a lateral, skipped.
    2. ``BodyPartExamined`` naming another part (not CHEST/THORAX/LUNG): skipped.
    3. ``ViewPosition`` PA or AP: frontal by header. Without it, the image content decides: a frontal
       chest shows the mediastinum as a bright central band between two darker lung fields, a lateral
       shows lung across the middle; :func:`frontal_score` must reach :data:`FRONTAL_SCORE` (a
       mirror-symmetry test was tried first: an effusion made a frontal view fail it).
    Among frontal images PA wins over AP (AP is the portable view: magnified heart), then header over
    content, then the larger matrix; the reason is recorded in ``why``.

The canonical image (``data[row, col]``, shape :data:`RADIOGRAPH_SHAPE`, uint8 0..127)
    * the Modality LUT (rescale or LUT sequence), then the VOI LUT sequence or window, as PS3.3
      C.11 orders them (pydicom's ``apply_modality_lut`` / ``apply_voi_lut``; the first VOI item);
      DX "for processing" images carry no VOI and are linear in log exposure: used as they are;
    * MONOCHROME1 (or MONOCHROME2 with Presentation LUT Shape INVERSE) inverted, so larger is always
      brighter (more attenuation);
    * aspect-preserving area-averaging resize (physical pixel spacing honoured, ImagerPixelSpacing
      or PixelSpacing) so the longer side is 512 pixels, centred and padded with 0;
    * robust intensity normalisation: the 1st and 99th percentiles of the image (padding excluded)
      map to 0 and 127, clipped and rounded: the 7-bit quantisation the paper applies (eq. 4's range).
    Compressed transfer syntaxes decode through pydicom's plugins as for CT.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from triage.assemble.common import VolumeError
from triage.assemble.headers import InstanceHeader, _dcmread
from triage.assemble.pixels import _stored_pixels
from triage.assemble.select import SelectionResult
from triage.assemble.volume import AssembledVolume, assemble_study, load_volume
from triage.config import AssemblySettings

__all__ = [
    "CR_IMAGE_STORAGE",
    "DX_STORAGE",
    "FRONTAL_SCORE",
    "RADIOGRAPH_PREPROCESSING_VERSION",
    "RADIOGRAPH_SHAPE",
    "assemble_by_kind",
    "assemble_radiograph",
    "canonical_image",
    "frontal_score",
    "image_file_volume",
    "image_values",
    "load_assembled",
    "normalize_7bit",
    "study_kind",
]

RADIOGRAPH_SHAPE: tuple[int, int] = (512, 512)  # (row, col): the canonical chest radiograph
RADIOGRAPH_PREPROCESSING_VERSION = "radiograph-1"  # bump whenever a change here can change a pixel
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1")
RADIOGRAPH_MODALITIES = ("CR", "DX")
LATERAL_VIEWS = ("LL", "RL", "LLO", "RLO", "LAT", "LATERAL", "LLD", "RLD", "XTABLE")
FRONTAL_VIEWS = ("PA", "AP")
CHEST_PARTS = ("CHEST", "THORAX", "LUNG", "CHEST_LAT", "PORT CHEST")
FRONTAL_SCORE = 0.5  # frontal_score: frontal chests 1.5-2.6, laterals -1.4 to -0.9 (synthetic set)
LOW_PCT, HIGH_PCT = 1.0, 99.0
TOP = 127


def _is_radiograph(h: InstanceHeader) -> bool:
    return h.sop_class_uid in (CR_IMAGE_STORAGE, *DX_STORAGE) or h.modality.upper() in RADIOGRAPH_MODALITIES


def study_kind(series: Mapping[str, Sequence[InstanceHeader]]) -> str:
    """``"cxr"`` when every image of the study is CR or DX, else ``"ct"`` (the head-CT path)."""
    headers = [h for hs in series.values() for h in hs]
    return "cxr" if headers and all(_is_radiograph(h) for h in headers) else "ct"


def assemble_by_kind(series: Mapping[str, Sequence[InstanceHeader]], rules: AssemblySettings | None = None
                     ) -> tuple[SelectionResult, AssembledVolume | None]:
    """Route a study by its images: radiographs to :func:`assemble_radiograph`, the rest to the CT path."""
    if study_kind(series) == "cxr":
        return assemble_radiograph(series)
    return assemble_study(series, rules)


# --------------------------------------------------------------------------------------------------
# the canonical image


def _invert(ds: Dataset) -> bool:
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return pi == "MONOCHROME1" or (pi == "MONOCHROME2" and shape == "INVERSE")


def displayed_values(ds: Dataset, path: Path) -> np.ndarray:
    """Stored values -> modality LUT -> VOI LUT/window -> larger is brighter (float64)."""
    stored = _stored_pixels(ds, path)
    if stored.ndim != 2:
        raise VolumeError(f"{path}: {stored.ndim}-D pixel data, expected one 2-D radiograph", "invalid")
    x = apply_modality_lut(stored, ds)
    if "VOILUTSequence" in ds:  # a LUT is indexed by integer values (rescale may have made floats)
        x = np.rint(x).astype(np.int64)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        x = apply_voi_lut(x, ds, index=0, prefer_lut=True)
    x = np.asarray(x, dtype=np.float64)
    return -x if _invert(ds) else x


def _spacing(ds: Dataset) -> tuple[float, float]:
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        v = ds.get(kw)
        try:
            if v is not None and len(v) == 2 and float(v[0]) > 0 and float(v[1]) > 0:
                return float(v[0]), float(v[1])
        except (TypeError, ValueError):
            continue
    return 1.0, 1.0


def normalize_7bit(x: np.ndarray) -> np.ndarray:
    """The 1st..99th percentile range -> 0..127, clipped and rounded (uint8)."""
    lo, hi = np.percentile(x, [LOW_PCT, HIGH_PCT])
    y = (x - lo) / max(float(hi - lo), 1e-9) * TOP
    return np.clip(np.rint(y), 0, TOP).astype(np.uint8)


def canonical_image(values: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)
                    ) -> tuple[np.ndarray, dict[str, Any]]:
    """Display values (larger = brighter) -> the padded 512x512 7-bit image and where it sits.

    Also the entry point of plain image files (PNG/JPEG are display values already), so a folder of
    images and the same images as DICOM give the same canonical image.
    """
    rows, cols = values.shape
    height_mm, width_mm = rows * spacing[0], cols * spacing[1]
    size = RADIOGRAPH_SHAPE[0]
    s = size / max(height_mm, width_mm)
    h = max(1, min(size, round(height_mm * s)))
    w = max(1, min(size, round(width_mm * s)))
    img = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
    small = np.asarray(img.resize((w, h), Image.Resampling.BOX), dtype=np.float64)
    out = np.zeros(RADIOGRAPH_SHAPE, dtype=np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = normalize_7bit(small)
    return out, {"content_box": [top, left, h, w], "mm_per_pixel": 1.0 / s, "source_shape": [rows, cols],
                 "source_spacing": list(spacing)}  # fmt: skip


def frontal_score(img: np.ndarray, box: Sequence[int] | None = None) -> float:
    """How much brighter the central band (mediastinum) is than the lung fields either side, at
    mid-height, in standard deviations of the column profile: ~2 for a frontal chest (also with an
    effusion or a consolidation on one side), below 0 for a lateral (lung across the middle)."""
    if box is not None:
        t, lft, h, w = box
        img = img[t : t + h, lft : lft + w]
    a = img.astype(np.float64)
    rows, cols = a.shape
    prof = a[int(rows * 0.2) : max(int(rows * 0.55), int(rows * 0.2) + 1)].mean(axis=0)
    x = (np.arange(cols) + 0.5) / cols
    centre = prof[(x > 0.42) & (x < 0.58)]
    left, right = prof[(x > 0.15) & (x < 0.35)], prof[(x > 0.65) & (x < 0.85)]
    if not (centre.size and left.size and right.size):
        return 0.0
    return float((centre.mean() - max(left.mean(), right.mean())) / (prof.std() + 1e-6))


# --------------------------------------------------------------------------------------------------
# selection


@dataclass
class _Candidate:
    header: InstanceHeader
    ds: Dataset
    view: str
    by_header: bool
    image: np.ndarray | None = None
    info: dict[str, Any] | None = None
    sym: float | None = None


def _lateral_by_orientation(ds: Dataset) -> bool:
    po = ds.get("PatientOrientation")
    try:
        return po is not None and len(po) == 2 and str(po[0]).strip().upper()[:1] in ("A", "P")
    except TypeError:
        return False


def _build(c: _Candidate) -> None:
    path = c.header.path
    c.ds = _dcmread(path, pixels=True)
    c.image, c.info = canonical_image(displayed_values(c.ds, path), _spacing(c.ds))
    c.sym = frontal_score(c.image, c.info["content_box"])


def assemble_radiograph(series: Mapping[str, Sequence[InstanceHeader]]
                        ) -> tuple[SelectionResult, AssembledVolume | None]:
    """Choose the frontal chest image of a radiograph study and build its canonical image."""
    skipped_images: dict[str, list[str]] = {}  # series -> reasons of its skipped images
    cands: list[_Candidate] = []
    warnings: list[str] = []
    for suid, hs in sorted(series.items()):
        for h in hs:
            reason = None
            try:
                ds = _dcmread(h.path, pixels=False)
            except VolumeError as exc:  # a broken file is one skipped image, not a lost study
                skipped_images.setdefault(suid, []).append(exc.reason)
                continue
            view = str(ds.get("ViewPosition", "") or "").strip().upper()
            part = h.body_part.strip().upper()
            if not _is_radiograph(h):
                reason = f"modality {h.modality or '(none)'} is not CR or DX"
            elif view in LATERAL_VIEWS or (not view and _lateral_by_orientation(ds)):
                reason = f"lateral view (ViewPosition {view or 'absent'}, PatientOrientation " \
                         f"{'/'.join(map(str, ds.get('PatientOrientation', []) or [])) or 'absent'})"
            elif part and part not in CHEST_PARTS:
                reason = f"BodyPartExamined {part} is not the chest"
            elif view and view not in FRONTAL_VIEWS:
                reason = f"ViewPosition {view} is not a frontal view"
            if reason:
                skipped_images.setdefault(suid, []).append(reason)
                continue
            cands.append(_Candidate(h, ds, view, bool(view)))
    frontal: list[_Candidate] = []
    build_failures: list[str] = []
    for c in cands:
        try:
            _build(c)
        except VolumeError as exc:
            skipped_images.setdefault(c.header.series_uid, []).append(f"cannot build the image: {exc.reason}")
            build_failures.append(exc.reason)
            continue
        if not c.by_header and (c.sym or 0.0) < FRONTAL_SCORE:
            skipped_images.setdefault(c.header.series_uid, []).append(
                f"no ViewPosition and the image is not a frontal chest (mediastinal band score {c.sym:.2f} < "
                f"{FRONTAL_SCORE})")  # fmt: skip
            continue
        frontal.append(c)
    frontal.sort(key=lambda c: (c.view != "PA", not c.by_header,
                                -(c.header.rows or 0) * (c.header.columns or 0), c.header.sop_instance_uid))
    sel = SelectionResult(chosen=None, skipped={})
    chosen = frontal[0] if frontal else None
    for suid, reasons in skipped_images.items():
        if chosen is None or suid != chosen.header.series_uid:
            sel.skipped[suid] = "; ".join(reasons)
            sel.categories[suid] = "lateral" if all(r.startswith("lateral") for r in reasons) else "not_chest"
    for c in frontal[1:]:
        suid = c.header.series_uid
        if chosen is not None and suid != chosen.header.series_uid:
            sel.skipped[suid] = f"another frontal view ({c.view or 'by content'}) ranked below the chosen one"
            sel.categories[suid] = "not_preferred"
    if chosen is None:
        sel.reason = ("no frontal chest radiograph in the study ("
                      + ("; ".join(r for rs in skipped_images.values() for r in rs) or "no images") + ")")
        return sel, None
    h = chosen.header
    if not chosen.by_header:
        warnings.append(f"no ViewPosition: frontal by image content (mediastinal band {chosen.sym:.2f})")
    if not h.body_part:
        warnings.append("no BodyPartExamined: chest assumed from the image")
    if chosen.view == "AP":
        warnings.append("AP view (portable): the heart is magnified")
    assert chosen.image is not None and chosen.info is not None
    sel.chosen, sel.candidates, sel.instances, sel.warnings = h.series_uid, [h.series_uid], [h], warnings
    sel.why = (f"frontal {chosen.view or 'view by image content'} {h.modality} image "
               f"{h.columns}x{h.rows}; PA before AP, header before content")
    data = chosen.image
    content = data[data > 0]
    vol = AssembledVolume(
        data=data,
        hu_stats={"mean": float(content.mean()) if content.size else 0.0,
                  "p50": float(np.median(content)) if content.size else 0.0},
        source_geometry={"kind": "cxr", "view": chosen.view or "frontal-by-content",
                         "photometric": str(chosen.ds.get("PhotometricInterpretation", "")),
                         "frontal_score": round(float(chosen.sym or 0.0), 4), **chosen.info},
        grid={"kind": "cxr", "shape": list(RADIOGRAPH_SHAPE), "spacing": [chosen.info["mm_per_pixel"]] * 2},
        coverage_mm=float(max(chosen.info["source_shape"][0] * chosen.info["source_spacing"][0],
                              chosen.info["source_shape"][1] * chosen.info["source_spacing"][1])),
        warnings=list(warnings),
        zero_fraction=float((data == 0).mean()),
        study_uid=h.study_uid,
        series_uid=h.series_uid,
        sop_instance_uids=[h.sop_instance_uid],
        preprocessing_version=RADIOGRAPH_PREPROCESSING_VERSION,
    )
    return sel, vol


def load_assembled(path: str | os.PathLike[str]) -> AssembledVolume:
    """Read what :func:`triage.assemble.volume.save_volume` wrote, a radiograph or a CT volume.

    ``load_volume`` insists on the CT grid; a radiograph's .npz (same format, 2-D data, its kind in
    the metadata) is read here, anything else goes to ``load_volume`` and its checks.
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as npz:
            data = npz["data"]
            meta = json.loads(str(npz["meta"]))
    except (OSError, ValueError, KeyError):
        return load_volume(p)  # its error names what is wrong
    if data.ndim != 2 or meta.get("grid", {}).get("kind") != "cxr":
        return load_volume(p)
    if data.dtype != np.uint8 or tuple(data.shape) != RADIOGRAPH_SHAPE:
        raise VolumeError(f"{p}: radiograph is {data.dtype} {data.shape}, expected uint8 {RADIOGRAPH_SHAPE}")
    return AssembledVolume(
        data=data, hu_stats=meta.get("hu_stats", {}), source_geometry=meta.get("source_geometry", {}),
        grid=meta.get("grid", {}), coverage_mm=float(meta.get("coverage_mm", 0.0)),
        warnings=list(meta.get("warnings", [])), zero_fraction=float(meta.get("zero_fraction", 0.0)),
        study_uid=meta.get("study_uid", ""), series_uid=meta.get("series_uid", ""),
        sop_instance_uids=list(meta.get("sop_instance_uids", [])),
        preprocessing_version=meta.get("preprocessing_version", ""),
    )


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_values(path: str | os.PathLike[str]) -> np.ndarray:
    """A PNG or JPEG (8 or 16 bit grey; colour is converted to grey) as display values (float64).

    Public chest datasets are published so (ChestX-ray14 as PNG, CheXpert as JPEG): already windowed
    and MONOCHROME2-like, i.e. what :func:`displayed_values` makes of a DICOM image.
    """
    p = Path(path)
    try:
        with Image.open(p) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L"):
                arr = np.asarray(im)
            else:
                arr = np.asarray(im.convert("L"))
    except (OSError, ValueError) as exc:
        raise VolumeError(f"{p}: not a readable image ({exc})", "decode") from None
    if arr.ndim != 2:
        raise VolumeError(f"{p}: image of shape {arr.shape}, expected one grey plane", "invalid")
    return arr.astype(np.float64)


def image_file_volume(path: str | os.PathLike[str]) -> AssembledVolume:
    """A plain image file as a scored-ready radiograph; its study is the file name (labels.csv's key)."""
    p = Path(path)
    data, info = canonical_image(image_values(p))
    score = frontal_score(data, info["content_box"])
    return AssembledVolume(
        data=data, hu_stats={}, coverage_mm=0.0, warnings=[], zero_fraction=float((data == 0).mean()),
        source_geometry={"kind": "cxr", "view": "image file", "frontal_score": round(score, 4), **info},
        grid={"kind": "cxr", "shape": list(RADIOGRAPH_SHAPE), "spacing": [info["mm_per_pixel"]] * 2},
        study_uid=p.name, series_uid=p.name, sop_instance_uids=[],
        preprocessing_version=RADIOGRAPH_PREPROCESSING_VERSION,
    )


def read_radiograph(path: str | os.PathLike[str]) -> np.ndarray:
    """One DICOM file's canonical image (tests and the PNG-vs-DICOM comparison)."""
    p = Path(path)
    ds = _dcmread(p, pixels=True)
    return canonical_image(displayed_values(ds, p), _spacing(ds))[0]
