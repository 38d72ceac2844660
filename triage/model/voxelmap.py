"""Where is it abnormal: a region score from the voxel map of log p(normal|x).

``Glow.log_prob_map`` decomposes log p(x) exactly over the voxels. M0 and M1 share the architecture
(and, trained by the README's recipe, the trunk), so their maps align and ``d = map0 - map1`` is a map
of log p(normal|x) whose total is the paper's score. The total adds the modelling noise of ~500,000
voxels to the signal of a lesion of a few hundred; a lesion-sized window of the same map does not.

The region score, fixed before any test label was looked at (the rule, not a tuned value):

1. **Windows.** ``d`` is averaged over cubes of ``WINDOWS_MM`` = 10, 20 and 40 mm on a side (box
   filters, separable, on the model's grid; a side is the nearest odd number of voxels, at least 1).
   Why these: the lesions a head CT triage must catch run from about a centimetre (small bleeds,
   lacunar and cortical infarcts) to several centimetres (haematomas, masses, territorial infarcts);
   three octave-spaced sizes cover that range without knowing any generator's lesion sizes, and the
   coarsest level of the cpu-small flow (8 voxels per location, ~28 mm in plane, 36 mm in z) bounds
   how finely the map localizes anyway.
2. **Per-position calibration on held-out normals** (as PaDiM / CFlow-AD calibrate per location):
   each window average is standardized by the mean and s.d. of the same window average over the
   calibration normals at that position. The s.d. map is smoothed with the same window (few normals
   make a noisy per-voxel estimate) and floored at ``SD_FLOOR`` x its median over positions, so the
   air around the head, where both models agree to a few millinats, cannot turn round-off into a
   finding.
3. **Score.** The region score is the most negative standardized window over positions and sizes
   (low: abnormal, like log p(normal|x)); its centre is the window's centre. Taking the minimum over
   positions inflates it for every study alike; the calibration below turns it into a percentile
   among normals, so the inflation is accounted for, not tuned away.
4. **Calibration of the score.** The calibration normals' own region scores are computed
   leave-one-out (each one standardized by the statistics of the others), because a normal scored by
   statistics that include it looks more normal than a new one would; the sorted scores give the
   percentile, and the threshold keeps the same specificity as the global operating point.

Everything here is label-free: the normals calibrate, nothing is fitted to any kind of lesion.
"""

from __future__ import annotations

import hashlib
import io
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
from triage.model.registry import write_once

WINDOWS_MM: tuple[float, ...] = (10.0, 20.0, 40.0)
SD_FLOOR = 0.25  # of the median s.d. over positions
FORMAT = "glowtriage.region/1"


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
    borders, over the part of the box inside the grid. Separable: one 1-D pass per axis."""
    nd = m.dim() - 1
    x = m.unsqueeze(1)
    pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    for axis, k in enumerate(size):
        if k <= 1:
            continue
        kern = [1] * nd
        kern[axis] = k
        pad = [0] * nd
        pad[axis] = k // 2
        x = pool(x, kernel_size=tuple(kern), stride=1, padding=tuple(pad), count_include_pad=False)
    return x.squeeze(1)


def _floor_sd(sd: Tensor) -> Tensor:
    """Smoothed s.d. (S or B, *spatial) floored at SD_FLOOR x its median over positions, per map."""
    flat = sd.reshape(sd.shape[0], -1)
    floor = SD_FLOOR * flat.median(dim=1).values.clamp_min(1e-12)
    return torch.maximum(sd, floor.view(-1, *([1] * (sd.dim() - 1))))


@dataclass
class RegionCalibration:
    """What the region score needs from the calibration normals, per window size: the mean and s.d.
    maps of the window averages, plus the normals' own (leave-one-out) region scores, sorted, and the
    threshold at the global operating point's specificity."""

    windows_mm: tuple[float, ...]
    spacing_mm: tuple[float, ...]
    mean: np.ndarray  # (S, *spatial) float32
    sd: np.ndarray  # (S, *spatial) float32, smoothed and floored
    normal_scores: list[float]  # sorted
    threshold: float
    specificity: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[1:])

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(
            buf, format=np.array(FORMAT), windows_mm=np.asarray(self.windows_mm, dtype=float),
            spacing_mm=np.asarray(self.spacing_mm, dtype=float), mean=self.mean.astype(np.float32),
            sd=self.sd.astype(np.float32), normal_scores=np.asarray(self.normal_scores, dtype=float),
            threshold=np.array(self.threshold, dtype=float),
            specificity=np.array(self.specificity, dtype=float),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes) -> RegionCalibration:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            if str(z["format"]) != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            return cls(
                windows_mm=tuple(float(v) for v in z["windows_mm"]),
                spacing_mm=tuple(float(v) for v in z["spacing_mm"]),
                mean=z["mean"].astype(np.float32), sd=z["sd"].astype(np.float32),
                normal_scores=sorted(float(v) for v in z["normal_scores"]),
                threshold=float(z["threshold"]), specificity=float(z["specificity"]),
            )

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def summary(self) -> dict[str, Any]:
        """What the manifest says about it (the arrays live in the .npz)."""
        return {"windows_mm": list(self.windows_mm), "spacing_mm": list(self.spacing_mm),
                "threshold": _num(self.threshold), "specificity": self.specificity,
                "normal_scores": list(self.normal_scores), "sd_floor": SD_FLOOR,
                "method": "min over positions and windows of the per-position standardized window mean"}


def _num(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


@dataclass(frozen=True)
class Region:
    """The most abnormal window of one study."""

    score: float  # most negative standardized window mean (low: abnormal)
    index_zyx: tuple[float, float, float]  # window centre, continuous index on the model's grid
    window_mm: float
    zmap: np.ndarray  # standardized map at the winning window size (*spatial), for overlays


def standardized(d: Tensor, mean: Tensor, sd: Tensor, windows: Sequence[tuple[int, ...]]) -> Tensor:
    """(S, *spatial) z-maps of one log-ratio map ``d`` (*spatial) at each window size."""
    return torch.stack([(box_mean(d[None], w)[0] - mean[i]) / sd[i] for i, w in enumerate(windows)])


class RegionScorer:
    """Applies one :class:`RegionCalibration` to log-ratio maps (on the scorer's device)."""

    def __init__(self, cal: RegionCalibration, device: torch.device | str = "cpu"):
        self.cal = cal
        self.windows = [window_voxels(w, cal.spacing_mm) for w in cal.windows_mm]
        self.mean = torch.from_numpy(cal.mean).to(device)
        self.sd = torch.from_numpy(cal.sd).to(device)

    def __call__(self, d: Tensor) -> Region:
        if tuple(d.shape) != self.cal.shape:
            raise ValueError(f"log-ratio map of shape {tuple(d.shape)}, calibrated for {self.cal.shape}")
        z = standardized(d.to(self.mean.dtype), self.mean, self.sd, self.windows)
        return _region_of(z, self.cal.windows_mm)


def _region_of(z: Tensor, windows_mm: Sequence[float]) -> Region:
    flat = int(torch.argmin(z).item())
    s, *idx = np.unravel_index(flat, tuple(z.shape))
    pos = [float(i) for i in idx]
    centre = (pos[0], pos[1], pos[2]) if len(pos) == 3 else (0.0, pos[0], pos[1])  # 2-D: one slice
    return Region(score=float(z.reshape(-1)[flat].item()), index_zyx=centre, window_mm=float(windows_mm[s]),
                  zmap=z[s].float().cpu().numpy())


def fit_region_calibration(
    maps: Sequence[np.ndarray] | np.ndarray, spacing_mm: Sequence[float], *, specificity: float,
    windows_mm: Sequence[float] = WINDOWS_MM,
) -> RegionCalibration:
    """Per-position statistics of the calibration normals' log-ratio maps (n, *spatial), and their
    leave-one-out region scores. Needs at least 3 normals (a leave-one-out s.d. of 2)."""
    d = torch.from_numpy(np.stack([np.asarray(m, dtype=np.float64) for m in maps]))
    n = d.shape[0]
    if n < 3:
        raise ValueError(f"a region calibration needs at least 3 normal studies, got {n}")
    windows = [window_voxels(w, spacing_mm) for w in windows_mm]
    means, sds = [], []
    loo_min = torch.full((n,), math.inf, dtype=torch.float64)
    for w in windows:
        a = box_mean(d, w)  # (n, *spatial)
        tot, sq = a.sum(0), (a * a).sum(0)
        mean = tot / n
        var = ((sq - n * mean * mean) / (n - 1)).clamp_min(0.0)
        means.append(mean)
        sds.append(_floor_sd(box_mean(var.sqrt()[None], w))[0])
        for i in range(n):  # leave one out: the normal is scored as a new study would be
            m_i = (tot - a[i]) / (n - 1)
            v_i = ((sq - a[i] * a[i] - (n - 1) * m_i * m_i) / (n - 2)).clamp_min(0.0)
            sd_i = _floor_sd(box_mean(v_i.sqrt()[None], w))[0]
            loo_min[i] = min(float(loo_min[i]), float(((a[i] - m_i) / sd_i).min()))
    scores = sorted(float(v) for v in loo_min)
    return RegionCalibration(
        windows_mm=tuple(float(w) for w in windows_mm), spacing_mm=tuple(float(s) for s in spacing_mm),
        mean=torch.stack(means).float().numpy(), sd=torch.stack(sds).float().numpy(),
        normal_scores=scores, threshold=threshold_at_specificity(scores, specificity),
        specificity=float(specificity),
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
    """The region calibration a model set names (``calibration.region``), or None when it keeps none.
    Raises ValueError when the file is missing or does not match its hash (a changed file would change
    results)."""
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
    return RegionCalibration.from_bytes(raw)
