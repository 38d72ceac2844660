"""Where is it abnormal: a region score from the voxel maps of log p(normal|x).

``Glow.log_prob_level_maps`` decomposes log p(x) exactly over the voxels, one map per level of the
flow. M0 and M1 share the architecture (and, trained by the README's recipe, the trunk), so their
maps align and ``d_l = map0_l - map1_l`` are maps of log p(normal|x) whose grand total is the paper's
score. The total adds the modelling noise of ~500,000 voxels to the signal of a lesion of a few
hundred; a lesion-sized window of the same maps does not.

The region score, a rule fixed in advance (no value in it is fitted to any kind of lesion):

1. **Levels, each in its own units.** Each level's map ``d_l`` is standardized separately and the
   standardized maps are added (divided by sqrt(levels), so the sum of independent N(0,1) stays
   N(0,1)). Why: the finest level has 4-8x the locations of the next and dominates the variance of the
   raw map over normals, while wide context lives in the coarse levels; added raw, the finest level's
   noise hides the rest. Normalizing each scale by its own normal statistics before aggregating is
   what CFlow-AD and PaDiM do for multi-scale maps.
2. **Windows.** Each ``d_l`` is averaged over cubes of ``WINDOWS_MM`` = 10, 20 and 40 mm (box filters,
   separable, on the model's grid; a side is the nearest odd number of voxels, at least 1): lesions a
   head CT triage must catch run from about a centimetre to several centimetres.
3. **Per-position calibration on held-out normals** (as PaDiM / CFlow-AD calibrate per location):
   each window average is standardized by the mean and s.d. of the same window average over the
   calibration normals at that position; the s.d. map is smoothed with the same window and floored at
   ``SD_FLOOR`` x its median over positions.
4. **Where to look: inside the head.** Window centres are searched only inside the study's own
   cranial cavity (:func:`search_mask`: each slice's bone ring, holes filled, the bone itself left out
   as the 7-bit window saturates it), because the
   findings a head-CT triage is for are there, and because the air and scalp around a head hold no
   finding but do hold the largest relative noise (a head sits a few millimetres differently in every
   scan, so the per-position s.d. there is tiny next to a new head's edge). When a volume has no closed
   skull ring in any slice (a test phantom, a craniectomy), the tissue mask is used, then every voxel.
5. **Score.** For each window size the minimum of the standardized map over the search mask is
   taken; that minimum is itself standardized by the mean and s.d. of the calibration normals' own
   minima at that size (leave-one-out), because a minimum over more independent positions (smaller
   windows) is more negative for every study alike. The region score is the most negative of these
   (low: abnormal, like log p(normal|x)); its centre is where the winning size's minimum lies.
6. **Calibration of the score.** The calibration normals' region scores are computed leave-one-out
   (each one standardized by the statistics of the others), because a normal scored by statistics
   that include it looks more normal than a new one would; the sorted scores give the percentile, and
   the threshold keeps the same specificity as the global operating point.

Everything here is label-free: the normals calibrate, nothing is fitted to any kind of lesion.

Chest radiographs (2-D models) follow the same rule with their own windows, search mask and location
(:mod:`triage.model.radiomap`, format ``glowtriage.region-2d/1``): windows as fractions of the canonical
image side instead of millimetres, the image without its padding instead of the cranial cavity, and a
point on the source image instead of patient coordinates.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from triage.assemble.common import PIXEL_MM, SLICE_MM, TARGET_SHAPE
from triage.model.calibrate import threshold_at_specificity
from triage.model.radiomap import FORMAT_2D, content_mask
from triage.model.registry import write_once
from triage.ops.logs import get_logger

log = get_logger("models")

WINDOWS_MM: tuple[float, ...] = (10.0, 20.0, 40.0)
SD_FLOOR = 0.25  # of the median s.d. over positions
FORMAT = "glowtriage.region/2"  # /1: one raw map, no mask (no longer read)


def model_spacing_mm(image_shape: Sequence[int]) -> tuple[float, ...]:
    """Voxel size (z, y, x mm) of a 3-D model's grid: the canonical 4.5 x 1.71875 x 1.71875 mm grid,
    block-averaged to ``image_shape`` (``fit_to_shape``)."""
    if len(image_shape) != 3:
        raise ValueError(f"region scores need a 3-D model on the canonical grid, got {tuple(image_shape)}")
    canon = (SLICE_MM, PIXEL_MM, PIXEL_MM)
    return tuple(c * (t // s) for c, t, s in zip(canon, TARGET_SHAPE, image_shape, strict=True))


def window_voxels(window_mm: float, spacing_mm: Sequence[float]) -> tuple[int, ...]:
    """Side of a ``window_mm`` cube in voxels per axis: the nearest odd count, at least 1."""
    out = []
    for sp in spacing_mm:
        r = window_mm / sp
        k = max(1, round(r))
        if k % 2 == 0:
            k = k + 1 if r >= k else k - 1
        out.append(max(1, k))
    return tuple(out)


def box_mean(m: Tensor, size: Sequence[int]) -> Tensor:
    """Mean over a box of ``size`` voxels centred on each position of ``m`` (B, *spatial); at the
    borders, over the part of the box inside the grid. Separable: one 1-D pass per axis. On the CPU
    scipy's running-sum filter (its cost does not grow with the box, ~2x faster than torch's pooling
    at the 40 mm box, and this is most of the region score's cost); elsewhere cumulative sums."""
    return _box_mean_cpu(m, size) if m.device.type == "cpu" else _box_mean_torch(m, size)


def _box_mean_torch(m: Tensor, size: Sequence[int]) -> Tensor:
    """:func:`box_mean` by cumulative sums in torch (any device; a box wider than the axis is fine,
    where average pooling refuses it)."""
    x = m
    for axis, k in enumerate(size):
        if k <= 1:
            continue
        ax = axis + 1
        n, r = x.shape[ax], k // 2
        c = F.pad(torch.cumsum(x, dim=ax).movedim(ax, -1), [1, 0]).movedim(-1, ax)  # c[0] = 0
        i = torch.arange(n, device=x.device)
        hi = (i + r).clamp(max=n - 1) + 1
        lo = (i - r).clamp(min=0)
        shape = [1] * x.dim()
        shape[ax] = n
        x = (c.index_select(ax, hi) - c.index_select(ax, lo)) / (hi - lo).to(x.dtype).view(shape)
    return x


def _box_mean_cpu(m: Tensor, size: Sequence[int]) -> Tensor:
    """:func:`box_mean` by ``scipy.ndimage.uniform_filter1d`` (zeros outside, then each position's
    sum rescaled to the count of its box inside the grid: pooling's ``count_include_pad=False``)."""
    from scipy.ndimage import uniform_filter1d

    a = m.detach().numpy()
    for axis, k in enumerate(size):
        if k <= 1:
            continue
        ax = axis + 1
        n, r = a.shape[ax], k // 2
        i = np.arange(n)
        inside = np.minimum(i + r, n - 1) - np.maximum(i - r, 0) + 1
        shape = [1] * a.ndim
        shape[ax] = n
        scale = (k / inside).astype(a.dtype).reshape(shape)
        a = uniform_filter1d(a, k, axis=ax, mode="constant", cval=0.0) * scale
    return torch.from_numpy(np.ascontiguousarray(a))


def _floor_sd(sd: Tensor) -> Tensor:
    """Smoothed s.d. (K, *spatial) floored at SD_FLOOR x its median over positions, per map."""
    flat = sd.reshape(sd.shape[0], -1)
    floor = SD_FLOOR * flat.median(dim=1).values.clamp_min(1e-12)
    return torch.maximum(sd, floor.view(-1, *([1] * (sd.dim() - 1))))


def as_levels(d: np.ndarray | Tensor, ndim: int) -> Tensor:
    """A log-ratio map as (levels, *spatial): a plain (*spatial) map is one level."""
    t = torch.as_tensor(np.asarray(d) if not isinstance(d, Tensor) else d)
    return t[None] if t.dim() == ndim else t


BONE_GREY = 100  # 7-bit window grey (HU + 14): ~86 HU and up, the skull (cortical bone is > 700 HU)
TISSUE_GREY = 5  # above fat and air


def search_mask(volume: np.ndarray, image_shape: Sequence[int]) -> np.ndarray:
    """Where region centres are searched (bool, ``image_shape``): the cranial cavity.

    ``volume`` is the canonical 7-bit volume (or already the model's shape); it is block-averaged to
    the model's grid like :func:`triage.model.glow.fit_to_shape`. In each axial slice the bone ring
    (grey >= ``BONE_GREY``, closed by one pixel) has its holes filled, and the bone itself and what is
    not tissue are taken out; slices without a closed ring (skull base, vertex caps) add nothing. Why
    not the skull: the paper's 7-bit window (HU + 14, clipped at 127) saturates bone, so the flow sees
    of the skull only where its edge lies, which differs from head to head; searched, the skull held
    65 % of the region centres of a whole test set (normal and abnormal alike) on 2026-11-30. No
    closed ring anywhere (phantoms, craniectomy, tiny test grids): the tissue (grey >
    ``TISSUE_GREY``), and when that is empty too, everything. A 2-D image (radiograph): the image
    without its padding (:func:`triage.model.radiomap.content_mask`)."""
    from scipy import ndimage

    shape = tuple(int(v) for v in image_shape)
    if len(shape) != 3:
        return content_mask(volume, shape)
    v = _block_mean(np.asarray(volume), shape)
    # each axial slice on its own: the structure has no extent in z, so neither the closing nor the
    # filling reaches into the next slice (one call for the volume, not one per slice)
    ring = np.zeros((3, 3, 3), dtype=bool)
    ring[1] = ndimage.generate_binary_structure(2, 1)
    bone = v >= BONE_GREY
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(bone, structure=ring), structure=ring)
    mask &= ~bone & (v > TISSUE_GREY)
    if mask.any():  # some ring was closed: there is a cavity
        return mask
    tissue = v > TISSUE_GREY
    return tissue if tissue.any() else np.ones(shape, dtype=bool)


def _block_mean(v: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``v`` averaged over blocks to ``shape`` (float32), as :func:`triage.model.glow.fit_to_shape`
    does: a sum of strided views (a reshape-and-mean of the 8-bit volume costs ~10x more)."""
    if any(s % t for s, t in zip(v.shape, shape, strict=True)):
        raise ValueError(f"a volume of shape {v.shape} does not block-average to {shape}")
    f = [s // t for s, t in zip(v.shape, shape, strict=True)]
    acc = np.zeros(shape, dtype=np.float32)
    for off in itertools.product(*(range(k) for k in f)):
        acc += v[tuple(slice(o, o + t * k, k) for o, t, k in zip(off, shape, f, strict=True))]
    return acc / np.float32(math.prod(f))


@dataclass
class RegionCalibration:
    """What the region score needs from the calibration normals: per window size and level, the mean
    and s.d. maps of the window averages; per window size, the mean and s.d. of the normals' own
    (leave-one-out) minima; the normals' leave-one-out region scores, sorted; the threshold at the
    global operating point's specificity."""

    windows_mm: tuple[float, ...]
    spacing_mm: tuple[float, ...]
    mean: np.ndarray  # (S, L, *spatial) float32
    sd: np.ndarray  # (S, L, *spatial) float32, smoothed and floored
    min_mean: np.ndarray  # (S,) mean of the normals' minima at each window size
    min_sd: np.ndarray  # (S,) their s.d.
    normal_scores: list[float]  # sorted
    threshold: float
    specificity: float
    # FORMAT (3-D, windows and spacing in mm) or FORMAT_2D (radiographs: both as fractions of the
    # canonical image side, triage.model.radiomap)
    format: str = FORMAT

    @property
    def is_2d(self) -> bool:
        return self.format == FORMAT_2D

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[2:])

    @property
    def levels(self) -> int:
        return int(self.mean.shape[1])

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(
            buf, format=np.array(self.format), windows_mm=np.asarray(self.windows_mm, dtype=float),
            spacing_mm=np.asarray(self.spacing_mm, dtype=float), mean=self.mean.astype(np.float32),
            sd=self.sd.astype(np.float32), min_mean=np.asarray(self.min_mean, dtype=float),
            min_sd=np.asarray(self.min_sd, dtype=float),
            normal_scores=np.asarray(self.normal_scores, dtype=float),
            threshold=np.array(self.threshold, dtype=float),
            specificity=np.array(self.specificity, dtype=float),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes) -> RegionCalibration:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            fmt = str(z["format"])
            if fmt not in (FORMAT, FORMAT_2D):
                raise RegionFormatError(f"region calibration format {fmt!r}, this version reads {FORMAT!r} "
                                        f"and {FORMAT_2D!r}")
            return cls(
                windows_mm=tuple(float(v) for v in z["windows_mm"]),
                spacing_mm=tuple(float(v) for v in z["spacing_mm"]),
                mean=z["mean"].astype(np.float32), sd=z["sd"].astype(np.float32),
                min_mean=z["min_mean"].astype(float), min_sd=z["min_sd"].astype(float),
                normal_scores=sorted(float(v) for v in z["normal_scores"]),
                threshold=float(z["threshold"]), specificity=float(z["specificity"]), format=fmt,
            )

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """What the manifest says about it (the arrays live in the .npz)."""
        if self.is_2d:
            return {"format": self.format, "windows_side": list(self.windows_mm),
                    "spacing_side": list(self.spacing_mm), "levels": self.levels,
                    "threshold": _num(self.threshold), "specificity": self.specificity,
                    "normal_scores": list(self.normal_scores), "sd_floor": SD_FLOOR,
                    "minima_mean": [float(v) for v in self.min_mean],
                    "minima_sd": [float(v) for v in self.min_sd],
                    "method": "per level standardized window means (windows as fractions of the canonical "
                              "image side), summed over levels; minimum inside the image without its "
                              "padding per window size, standardized by the normals' minima; most negative "
                              "size"}
        return {"format": FORMAT, "windows_mm": list(self.windows_mm), "spacing_mm": list(self.spacing_mm),
                "levels": self.levels, "threshold": _num(self.threshold), "specificity": self.specificity,
                "normal_scores": list(self.normal_scores), "sd_floor": SD_FLOOR,
                "minima_mean": [float(v) for v in self.min_mean],
                "minima_sd": [float(v) for v in self.min_sd],
                "method": "per level standardized window means, summed over levels; minimum inside the "
                          "head per window size, standardized by the normals' minima; most negative size"}


class RegionFormatError(ValueError):
    """A region calibration written by another version of the rule (recalibrate the set)."""


def _num(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


@dataclass(frozen=True)
class Region:
    """The most abnormal window of one study."""

    score: float  # most negative standardized window minimum (low: abnormal)
    index_zyx: tuple[float, float, float]  # window centre, continuous index on the model's grid
    window_mm: float
    zmap: np.ndarray  # level-combined standardized map at the winning window size (*spatial)


def standardized(d: Tensor, mean: Tensor, sd: Tensor, windows: Sequence[tuple[int, ...]]) -> Tensor:
    """(S, *spatial) z-maps of one study's per-level log-ratio maps ``d`` (L, *spatial): per window
    size, each level's window mean standardized by ``mean``/``sd`` (S, L, *spatial), summed over
    levels / sqrt(L)."""
    n_lv = d.shape[0]
    out = []
    for i, w in enumerate(windows):
        z = (box_mean(d, w) - mean[i]) / sd[i]  # (L, *spatial)
        out.append(z.sum(dim=0) / math.sqrt(n_lv))
    return torch.stack(out)


def _masked_minima(z: Tensor, mask: Tensor) -> Tensor:
    """(S,) minimum of each z-map (S, *spatial) over ``mask`` (*spatial, bool)."""
    inf = torch.tensor(math.inf, dtype=z.dtype, device=z.device)
    return torch.where(mask[None], z, inf).reshape(z.shape[0], -1).min(dim=1).values


class RegionScorer:
    """Applies one :class:`RegionCalibration` to per-level log-ratio maps (on the scorer's device)."""

    def __init__(self, cal: RegionCalibration, device: torch.device | str = "cpu"):
        self.cal = cal
        self.windows = [window_voxels(w, cal.spacing_mm) for w in cal.windows_mm]
        self.mean = torch.from_numpy(cal.mean).to(device)
        self.sd = torch.from_numpy(cal.sd).to(device)
        self.min_mean = torch.as_tensor(cal.min_mean, dtype=self.mean.dtype, device=device)
        self.min_sd = torch.as_tensor(cal.min_sd, dtype=self.mean.dtype, device=device)

    def __call__(self, d: Tensor | np.ndarray, mask: np.ndarray | None = None) -> Region:
        """The region of one study: ``d`` its per-level log-ratio maps (L, *spatial) (or one map),
        ``mask`` where to search (:func:`search_mask` of its volume; None: everywhere)."""
        t = as_levels(d, len(self.cal.shape)).to(self.mean.device, self.mean.dtype)
        if tuple(t.shape) != (self.cal.levels, *self.cal.shape):
            raise ValueError(f"log-ratio maps of shape {tuple(t.shape)}, calibrated for "
                             f"{(self.cal.levels, *self.cal.shape)}")
        z = standardized(t, self.mean, self.sd, self.windows)
        m = torch.ones(self.cal.shape, dtype=torch.bool, device=z.device) if mask is None \
            else torch.as_tensor(np.asarray(mask, dtype=bool), device=z.device)
        t_s = (_masked_minima(z, m) - self.min_mean) / self.min_sd
        return _region_of(z, m, t_s, self.cal.windows_mm)


def _region_of(z: Tensor, mask: Tensor, t_s: Tensor, windows_mm: Sequence[float]) -> Region:
    s = int(torch.argmin(t_s).item())
    zs = torch.where(mask, z[s], torch.tensor(math.inf, dtype=z.dtype, device=z.device))
    idx = np.unravel_index(int(torch.argmin(zs).item()), tuple(zs.shape))
    pos = [float(i) for i in idx]
    centre = (pos[0], pos[1], pos[2]) if len(pos) == 3 else (0.0, pos[0], pos[1])  # 2-D: one slice
    zmap = torch.where(mask, z[s], torch.zeros((), dtype=z.dtype, device=z.device))
    return Region(score=float(t_s[s].item()), index_zyx=centre, window_mm=float(windows_mm[s]),
                  zmap=zmap.float().cpu().numpy())


def fit_region_calibration(
    maps: Sequence[np.ndarray] | np.ndarray, spacing_mm: Sequence[float], *, specificity: float,
    masks: Sequence[np.ndarray | None] | None = None, windows_mm: Sequence[float] = WINDOWS_MM,
    fmt: str = FORMAT,
) -> RegionCalibration:
    """Per-position, per-level statistics of the calibration normals' log-ratio maps (each (L, *spatial)
    or (*spatial)), the statistics of their (leave-one-out) minima inside ``masks`` (their
    :func:`search_mask`; None: everywhere), and their leave-one-out region scores. Needs at least 3
    normals (a leave-one-out s.d. of 2). ``fmt``: FORMAT_2D for a radiograph set, whose ``windows_mm``
    and ``spacing_mm`` are fractions of the canonical image side (:mod:`triage.model.radiomap`)."""
    nd = len(spacing_mm)
    d = torch.stack([as_levels(np.asarray(m, dtype=np.float64), nd) for m in maps])  # (n, L, *spatial)
    n = d.shape[0]
    if n < 3:
        raise ValueError(f"a region calibration needs at least 3 normal studies, got {n}")
    spatial = tuple(d.shape[2:])
    mk = torch.stack([torch.ones(spatial, dtype=torch.bool) if m is None
                      else torch.as_tensor(np.asarray(m, dtype=bool)) for m in (masks or [None] * n)])
    windows = [window_voxels(w, spacing_mm) for w in windows_mm]
    means, sds = [], []
    minima = torch.empty((len(windows), n), dtype=torch.float64)
    for s, w in enumerate(windows):
        a = box_mean(d.reshape(-1, *spatial), w).reshape(d.shape)  # (n, L, *spatial)
        tot, sq = a.sum(0), (a * a).sum(0)
        mean = tot / n
        var = ((sq - n * mean * mean) / (n - 1)).clamp_min(0.0)
        means.append(mean)
        sds.append(_floor_sd(box_mean(var.sqrt(), w)))
        for i in range(n):  # leave one out: the normal is scored as a new study would be
            m_i = (tot - a[i]) / (n - 1)
            v_i = ((sq - a[i] * a[i] - (n - 1) * m_i * m_i) / (n - 2)).clamp_min(0.0)
            sd_i = _floor_sd(box_mean(v_i.sqrt(), w))
            z = ((a[i] - m_i) / sd_i).sum(dim=0) / math.sqrt(d.shape[1])
            minima[s, i] = _masked_minima(z[None], mk[i])[0]
    loo = torch.empty_like(minima)
    for i in range(n):  # each normal's minima standardized by the others' minima
        rest = torch.cat([minima[:, :i], minima[:, i + 1:]], dim=1)
        loo[:, i] = (minima[:, i] - rest.mean(1)) / rest.std(1).clamp_min(1e-12)
    scores = sorted(float(v) for v in loo.min(dim=0).values)
    return RegionCalibration(
        windows_mm=tuple(float(w) for w in windows_mm), spacing_mm=tuple(float(s) for s in spacing_mm),
        mean=torch.stack(means).float().numpy(), sd=torch.stack(sds).float().numpy(),
        min_mean=minima.mean(1).numpy(), min_sd=minima.std(1).clamp_min(1e-12).numpy(),
        normal_scores=scores, threshold=threshold_at_specificity(scores, specificity),
        specificity=float(specificity), format=fmt,
    )


def model_index_to_canonical(index_zyx: Sequence[float], image_shape: Sequence[int]) -> tuple[float, ...]:
    """Continuous index on a (block-averaged) model grid -> continuous index on the canonical grid:
    model voxel k covers canonical voxels k*f .. k*f+f-1, centred at k*f + (f-1)/2."""
    out = []
    for i, t, s in zip(index_zyx, TARGET_SHAPE, image_shape, strict=True):
        f = t // s
        out.append(float(i) * f + (f - 1) / 2.0)
    return tuple(out)


# -------------------------------------------------------------------------------- geometry and storage


def grid_index_to_patient(grid: dict[str, Any], index_zyx: Sequence[float]) -> list[float]:
    """Continuous canonical index (z, y, x) -> patient LPS mm, by the volume's saved ``grid`` (the same
    formula as ``AssembledVolume.index_to_patient``, for a volume known only by its metadata)."""
    z, y, x = (float(v) for v in index_zyx)
    d = np.asarray(grid["direction"], dtype=float).reshape(3, 3)
    sp = np.asarray(grid["spacing"], dtype=float)
    p = np.asarray(grid["origin"], dtype=float) + d @ (sp * np.array([x, y, z]))
    return [float(v) for v in p]


def nearest_source_slice(metadata: dict[str, Any], point_mm: Sequence[float]
                         ) -> tuple[str | None, int | None]:
    """(SOP Instance UID, index in z order) of the source slice whose plane is nearest to ``point_mm``.

    Uses the slice positions the assembly keeps (``source_geometry.slice_positions_mm`` with
    ``slice_sop_instance_uids``, one per slice or frame, in z order); volumes saved before it kept
    them fall back to first position + k * step when the counts agree (no interpolated gaps). None
    when neither is known.
    """
    geo = metadata.get("source_geometry") or {}
    uids = list(geo.get("slice_sop_instance_uids") or metadata.get("sop_instance_uids") or [])
    pos = geo.get("slice_positions_mm")
    if pos is None and uids and geo.get("n_slices") == len(uids) and "first_position" in geo:
        p0, step = np.asarray(geo["first_position"], float), np.asarray(geo["step_mm"], float)
        pos = [p0 + k * step for k in range(len(uids))]
    if not uids or pos is None or len(pos) != len(uids):
        return None, None
    normal = np.asarray(geo.get("normal") or [0.0, 0.0, 1.0], dtype=float)
    dist = np.abs((np.asarray(pos, dtype=float) - np.asarray(point_mm, dtype=float)) @ normal)
    k = int(np.argmin(dist))
    return str(uids[k]), k


REGION_DIR = "region"


def save_region_calibration(models_root: Path, cal: RegionCalibration) -> dict[str, Any]:
    """Keep a region calibration under ``<models>/region/<sha256>.npz`` (content-addressed, atomic, like
    the reference volumes) and return its manifest entry (the summary plus ``file`` and ``sha256``)."""
    raw = cal.to_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    rel = f"{REGION_DIR}/{sha}.npz"
    write_once(Path(models_root) / rel, lambda fh: fh.write(raw))
    return {**cal.summary(), "file": rel, "sha256": sha}


def load_region_calibration(model_set_path: Path, manifest: dict[str, Any]) -> RegionCalibration | None:
    """The region calibration a model set names (``calibration.region``), or None when it keeps none or
    keeps one of an older rule (logged: the set then flags by its global score until it is made again
    with ``triage models create``). Raises ValueError when the file is missing or does not match its
    hash (a changed file would change results)."""
    entry = (manifest.get("calibration") or {}).get("region")
    if not entry:
        return None
    path = Path(model_set_path).parent / str(entry["file"])
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"region calibration {path}: {exc}") from None
    if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise ValueError(f"region calibration {path} does not match its manifest hash")
    try:
        return RegionCalibration.from_bytes(raw)
    except RegionFormatError as exc:
        log.warning("region_calibration_outdated", file=str(path), reason=str(exc))
        return None
