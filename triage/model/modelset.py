"""`triage models create`: two trained flows + calibration studies -> a registered model set.

The operating point is set here, once, on studies the models were not trained on: with labels,
Youden's cut-off on log p(normal|x) (the paper's choice); without labels, the calibration studies are
taken as normals and the threshold keeps ``specificity`` of them unflagged. Either way the normals'
scores are stored, so every later result can be given as a percentile among them.

The normals' *volumes* are kept too, content-addressed under ``<models>/reference/<sha256>.npz`` (pixel
data only, no UIDs) and named in the manifest's ``calibration.reference_volumes``: the nightly retrain
(training.train.retrain) must score the same normals with a new M1 to gate it (score shift) and to recalibrate
its threshold, and the archive they came from may be gone by then. Content addressing lets every
retrained set name the same files without copying them.

The region score (:mod:`triage.model.voxelmap`) is calibrated here too, on the same normals: their
log-ratio voxel maps give per-position statistics and leave-one-out region scores, kept as a
content-addressed ``<models>/region/<sha256>.npz`` named in ``calibration.region``; its threshold keeps
the specificity the global operating point has on those normals. The nightly retrain calls
:func:`region_calibration` with its new M1 on the reference volumes. Chest sets get one too, by the
radiograph form of the rule (:mod:`triage.model.radiomap`: windows as fractions of the image side, the
image without its padding as the search mask).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np

from triage import __version__
from triage.assemble.folders import folder_studies
from triage.assemble.radiograph import RADIOGRAPH_PREPROCESSING_VERSION
from triage.assemble.volume import PREPROCESSING_VERSION
from triage.config import Config
from triage.model import labels as labels_csv
from triage.model.calibrate import threshold_at_specificity, youden
from triage.model.glow import Glow
from triage.model.radiomap import FORMAT_2D, WINDOWS_SIDE, model_spacing_side
from triage.model.registry import ModelSet, Registry, RegistryError, volume_kind, write_once
from triage.model.score import ModelPair, pick_device
from triage.model.voxelmap import (
    fit_region_calibration,
    model_spacing_mm,
    save_region_calibration,
    search_mask,
)
from triage.ops.logs import get_logger

log = get_logger("models")

DEFAULT_SPECIFICITY = 0.9
REFERENCE_DIR = "reference"


def save_reference_volume(models_root: Path, data: np.ndarray, score: float) -> dict[str, Any]:
    """Keep one calibration normal's volume under ``<models>/reference/`` (atomic, content-addressed).

    Returns the manifest entry ``{"file", "sha256", "score"}``; ``file`` is relative to the models root.
    """
    vol = np.ascontiguousarray(data, dtype=np.uint8)
    sha = hashlib.sha256(vol.tobytes() + repr(vol.shape).encode()).hexdigest()
    rel = f"{REFERENCE_DIR}/{sha}.npz"
    write_once(Path(models_root) / rel, lambda fh: np.savez_compressed(fh, data=vol))
    return {"file": rel, "sha256": sha, "score": float(score)}


def load_reference_volumes(model_set: ModelSet, models_root: Path) -> list[np.ndarray]:
    """The calibration normals' volumes a model set names; RegistryError if any is missing or altered."""
    entries = model_set.manifest.get("calibration", {}).get("reference_volumes")
    if not entries:
        raise RegistryError(
            f"model set {model_set.version} keeps no reference normal volumes (created before they were "
            f"kept): recreate it with `triage models create` to enable the nightly retrain"
        )
    out = []
    for e in entries:
        path = Path(models_root) / str(e["file"])
        try:
            with np.load(path, allow_pickle=False) as z:
                vol = z["data"]
        except (OSError, ValueError, KeyError) as exc:
            raise RegistryError(f"model set {model_set.version}: reference volume {path}: {exc}") from None
        if hashlib.sha256(vol.tobytes() + repr(vol.shape).encode()).hexdigest() != e["sha256"]:
            raise RegistryError(f"model set {model_set.version}: {path} does not match its manifest hash")
        out.append(vol)
    return out


def specificity_on(normal_scores: list[float] | np.ndarray, threshold: float) -> float:
    """Share of normals the global threshold leaves unflagged (``score >= threshold``)."""
    s = np.asarray(normal_scores, dtype=float)
    return float(np.mean(s >= threshold)) if s.size else 1.0


def region_calibration(pair: ModelPair, volumes: list[np.ndarray], global_threshold: float,
                       global_normal_scores: list[float] | np.ndarray, models_root: Path,
                       maps: list[np.ndarray] | None = None) -> dict[str, Any] | None:
    """Fit and keep the region calibration of ``pair`` on normal ``volumes``; its manifest entry.

    The region threshold keeps the specificity the global threshold has on the normals' global scores
    (so "either" flags each score at the same specificity). None (logged) when there are fewer than 3
    normals: the set then flags by the global score alone. A 3-D model gets the head-CT rule (windows in
    mm on the canonical grid), a 2-D one the radiograph rule (:mod:`triage.model.radiomap`). ``maps``
    (the volumes' log-ratio maps, when the caller has them) saves a pass.
    """
    shape = tuple(pair.m0.cfg.image_shape)
    if len(volumes) < 3 or len(shape) not in (2, 3):
        log.warning("region_not_calibrated", normals=len(volumes), image_shape=list(shape))
        return None
    if maps is None:
        maps = [pair.log_likelihood_maps(v)[2].cpu().numpy() for v in volumes]
    spec = specificity_on(global_normal_scores, global_threshold)
    masks = [search_mask(v, shape) for v in volumes]
    if len(shape) == 3:
        cal = fit_region_calibration(maps, model_spacing_mm(shape), specificity=max(spec, 1e-9), masks=masks)
    else:
        cal = fit_region_calibration(maps, model_spacing_side(shape), specificity=max(spec, 1e-9),
                                     masks=masks, windows_mm=WINDOWS_SIDE, fmt=FORMAT_2D)
    if spec <= 0.0:
        cal.threshold = math.inf  # the global threshold flags every normal: so does the region's
    entry = save_region_calibration(models_root, cal)
    log.info("region_calibrated", normals=len(volumes), threshold=cal.threshold, specificity=spec)
    return entry


def read_labels(path: Path) -> dict[str, tuple[str, str]]:
    """labels.csv -> {study_uid: (label, lesion)} through the one reader (:mod:`triage.model.labels`,
    shared with training and evaluation); a bad file is a RegistryError naming file and line."""
    try:
        return dict(labels_csv.read_labels(path))
    except labels_csv.LabelsError as exc:
        raise RegistryError(str(exc)) from None


def calibrate(posteriors: dict[str, float], labels: dict[str, tuple[str, str]] | None,
              specificity: float) -> tuple[float, str, list[float], dict[str, Any]]:
    """(threshold, method, normal scores, details) from the calibration studies' log posteriors."""
    if labels:
        known = {uid: s for uid, s in posteriors.items() if uid in labels}
        y = np.array([0 if labels[uid][0] == "normal" else 1 for uid in known])
        s = np.array(list(known.values()))
        normals = [float(v) for v, t in zip(s, y, strict=True) if t == 0]
        if len(set(y.tolist())) == 2:
            t, sens, spec = youden(y, -s)  # abnormality score = -log posterior
            threshold = -t if math.isfinite(t) else -math.inf
            return threshold, "youden", normals, {"sensitivity": sens, "specificity": spec,
                                                  "n_normal": int((y == 0).sum()), "n_abnormal": int(y.sum())}
        if not normals:
            raise RegistryError("calibration labels name no normal study: cannot set an operating point")
    else:
        normals = [float(v) for v in posteriors.values()]
    if not normals:
        raise RegistryError("no calibration study could be scored")
    threshold = threshold_at_specificity(normals, specificity)
    return threshold, f"specificity={specificity:g}", normals, {"n_normal": len(normals)}


def create_model_set(cfg: Config, reg: Registry, m0: Path, m1: Path, data: Path, *,
                     labels: Path | None = None, specificity: float | None = None,
                     device: str | None = None, trunk: Path | None = None) -> ModelSet:
    """Score the calibration studies with M0/M1, choose the operating point, register the set."""
    spec = specificity or DEFAULT_SPECIFICITY
    dev = pick_device(device or cfg.settings.scoring.device)
    g0, g1 = Glow.load(m0), Glow.load(m1)
    preset = str(g0.cfg.extra.get("preset", "custom"))
    if g1.cfg.extra.get("preset", preset) != preset:
        raise RegistryError(f"M0 is preset {preset!r} but M1 is {g1.cfg.extra.get('preset')!r}")
    pair = ModelPair(g0, g1, dev)
    kind = "cxr" if g0.cfg.ndim == 2 else "ct"  # the set's kind follows its models
    posteriors: dict[str, float] = {}
    rejected: dict[str, str] = {}
    lab = read_labels(labels) if labels else None
    references: dict[str, dict[str, Any]] = {}
    normal_volumes: list[np.ndarray] = []
    normal_maps: list[np.ndarray] = []
    for st in folder_studies([data], cfg.settings.assembly):
        if st.volume is None:
            rejected[st.study_uid] = st.reason or "no volume"
            continue
        if volume_kind(st.volume.data) != kind:
            rejected[st.study_uid] = f"not a {'chest radiograph' if kind == 'cxr' else 'head CT'}"
            continue
        is_normal = lab is None or lab.get(st.study_uid, ("",))[0] == "normal"  # the ones calibrate() keeps
        if is_normal:  # their voxel maps calibrate the region score; the global score is the maps' total
            lp0, lp1, dmap = pair.log_likelihood_maps(st.volume.data)
            normal_maps.append(dmap.cpu().numpy())
        else:
            lp0, lp1 = pair.log_likelihoods(st.volume.data)
        posteriors[st.study_uid] = lp0 - lp1
        if is_normal:
            references[st.study_uid] = save_reference_volume(reg.root, st.volume.data, lp0 - lp1)
            normal_volumes.append(st.volume.data)
    threshold, method, normals, details = calibrate(posteriors, lab, spec)
    log.info("calibrated", studies=len(posteriors), rejected=len(rejected), method=method,
             threshold=threshold)
    region = region_calibration(pair, normal_volumes, threshold, normals, reg.root, maps=normal_maps)
    provenance = {
        "m0": getattr(g0, "extra_info", {}),
        "m1": getattr(g1, "extra_info", {}),
        "calibration": {"data": str(data), "labels": str(labels) if labels else None,
                        "studies": len(posteriors), "rejected": len(rejected), **details},
    }
    version = PREPROCESSING_VERSION if kind == "ct" else RADIOGRAPH_PREPROCESSING_VERSION
    return reg.create(m0, m1, preset=preset, preprocessing_version=version, kind=kind,
                      threshold=threshold, method=method, normal_scores=normals, provenance=provenance,
                      software_version=__version__,
                      calibration_extra={"reference_volumes": list(references.values()),
                                         **({"region": region} if region else {})}, trunk=trunk)
