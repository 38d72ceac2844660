"""`triage models create`: two trained flows + calibration studies -> a registered model set.

The operating point is set here, once, on studies the models were not trained on: with labels,
Youden's cut-off on log p(normal|x) (the paper's choice); without labels, the calibration studies are
taken as normals and the threshold keeps ``specificity`` of them unflagged. Either way the normals'
scores are stored, so every later result can be given as a percentile among them.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from triage import __version__
from triage.assemble import PREPROCESSING_VERSION
from triage.calibrate import threshold_at_specificity, youden
from triage.config import Config
from triage.glow import Glow
from triage.logs import get_logger
from triage.offline import folder_studies
from triage.registry import ModelSet, Registry, RegistryError
from triage.score import ModelPair, pick_device

log = get_logger("models")

DEFAULT_SPECIFICITY = 0.9


def read_labels(path: Path) -> dict[str, tuple[str, str]]:
    """labels.csv (study_uid,label,lesion) -> {study_uid: (label, lesion)}."""
    out: dict[str, tuple[str, str]] = {}
    with path.open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            try:
                label, lesion = row["label"].strip().lower(), (row.get("lesion") or "").strip()
                out[row["study_uid"].strip()] = (label, lesion)
            except (KeyError, AttributeError):
                raise RegistryError(f"{path}:{i}: expected columns study_uid,label,lesion") from None
    return out


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
                     device: str | None = None) -> ModelSet:
    """Score the calibration studies with M0/M1, choose the operating point, register the set."""
    spec = specificity or DEFAULT_SPECIFICITY
    dev = pick_device(device or cfg.settings.scoring.device)
    g0, g1 = Glow.load(m0), Glow.load(m1)
    preset = str(g0.cfg.extra.get("preset", "custom"))
    if g1.cfg.extra.get("preset", preset) != preset:
        raise RegistryError(f"M0 is preset {preset!r} but M1 is {g1.cfg.extra.get('preset')!r}")
    pair = ModelPair(g0, g1, dev)
    posteriors: dict[str, float] = {}
    rejected: dict[str, str] = {}
    for st in folder_studies([data], cfg.settings.assembly):
        if st.volume is None:
            rejected[st.study_uid] = st.reason or "no volume"
            continue
        lp0, lp1 = pair.log_likelihoods(st.volume.data)
        posteriors[st.study_uid] = lp0 - lp1
    lab = read_labels(labels) if labels else None
    threshold, method, normals, details = calibrate(posteriors, lab, spec)
    log.info("calibrated", studies=len(posteriors), rejected=len(rejected), method=method,
             threshold=threshold)
    provenance = {
        "m0": getattr(g0, "extra_info", {}),
        "m1": getattr(g1, "extra_info", {}),
        "calibration": {"data": str(data), "labels": str(labels) if labels else None,
                        "studies": len(posteriors), "rejected": len(rejected), **details},
    }
    return reg.create(m0, m1, preset=preset, preprocessing_version=PREPROCESSING_VERSION,
                      threshold=threshold, method=method, normal_scores=normals, provenance=provenance,
                      software_version=__version__)
