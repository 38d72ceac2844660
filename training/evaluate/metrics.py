"""The numbers of `training evaluate`: ROC summaries with bootstrap CIs, Youden and fixed-specificity
operating points, and correlations.

Conventions (shared with the registry's calibration in :mod:`triage.model.calibrate`): a *metric* is a
normality score (low = abnormal; the daemon flags ``metric < threshold``), scikit-learn is fed the
abnormality score ``-metric``, and every threshold returned is in the metric's own units (nats).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from training.evaluate.inputs import Row
from triage.model.calibrate import threshold_at_specificity, youden

FIXED_SPECIFICITIES = (0.8, 0.9, 0.95)


def bootstrap_auc(neg: np.ndarray, pos: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Stratified bootstrap of the AUC (normals and abnormals resampled separately, so every
    resample keeps both classes). Mann-Whitney form with average ranks, vectorised in chunks."""
    rng = np.random.default_rng(seed)
    n0, n1 = neg.size, pos.size
    out = np.empty(n_boot)
    chunk = max(1, min(n_boot, 2_000_000 // (n0 + n1)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        s = np.concatenate([pos[rng.integers(0, n1, (b, n1))], neg[rng.integers(0, n0, (b, n0))]], axis=1)
        r = stats.rankdata(s, axis=1)
        out[start:start + b] = (r[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2) / (n0 * n1)
    return out


def paired_bootstrap_auc(neg: list[np.ndarray], pos: list[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """AUCs of several scores of the same studies on the same stratified resamples: ``neg[k]``,
    ``pos[k]`` are score k (abnormality, high = abnormal) of the same normals and abnormals in the same
    order. Returns (n_boot, scores). Why paired: two scores of one test set are correlated, so the CI of
    their difference is much narrower than the two CIs side by side suggest (issue 16's "0.1 above the
    likelihood alone" is a statement about the difference). The resamples are :func:`bootstrap_auc`'s
    (same seed, same draws): column k equals ``bootstrap_auc(neg[k], pos[k], n_boot, seed)``."""
    rng = np.random.default_rng(seed)
    n0, n1 = neg[0].size, pos[0].size
    if any(a.size != n0 for a in neg) or any(a.size != n1 for a in pos):
        raise ValueError("paired scores must cover the same studies")
    out = np.empty((n_boot, len(neg)))
    chunk = max(1, min(n_boot, 2_000_000 // (n0 + n1)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        ip, ineg = rng.integers(0, n1, (b, n1)), rng.integers(0, n0, (b, n0))
        for k, (ng, ps) in enumerate(zip(neg, pos, strict=True)):
            r = stats.rankdata(np.concatenate([ps[ip], ng[ineg]], axis=1), axis=1)
            out[start:start + b, k] = (r[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2) / (n0 * n1)
    return out


def auc_difference(normal_a: np.ndarray, abnormal_a: np.ndarray, normal_b: np.ndarray, abnormal_b: np.ndarray,
                   n_boot: int, seed: int) -> dict[str, Any]:
    """AUC of normality metric a minus that of metric b on the same studies (low = abnormal for both),
    with the paired stratified bootstrap's 95% CI and the share of resamples where a is not better."""
    y = np.r_[np.zeros(normal_a.size, int), np.ones(abnormal_a.size, int)]
    diff = float(roc_auc_score(y, -np.r_[normal_a, abnormal_a])
                 - roc_auc_score(y, -np.r_[normal_b, abnormal_b]))
    boot = paired_bootstrap_auc([-normal_a, -normal_b], [-abnormal_a, -abnormal_b], n_boot, seed)
    d = boot[:, 0] - boot[:, 1]
    return {"difference": diff, "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
            "p_not_better": float(np.mean(d <= 0.0)), "n_boot": int(n_boot)}


def roc_summary(normal: np.ndarray, abnormal: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """Everything about one ROC curve of a normality metric (low = abnormal)."""
    res: dict[str, Any] = {"n_normal": int(normal.size), "n_abnormal": int(abnormal.size)}
    if normal.size == 0 or abnormal.size == 0:
        missing = "normal" if normal.size == 0 else "abnormal"
        res.update(auc=None, auc_ci95=None, auc_undefined=f"no {missing} studies: AUC is undefined")
        if normal.size:
            res["sensitivity_at_specificity"] = [
                {"specificity_target": sp, "threshold": threshold_at_specificity(normal, sp),
                 "sensitivity": None, "specificity": _spec(normal, threshold_at_specificity(normal, sp))}
                for sp in FIXED_SPECIFICITIES
            ]
        return res
    y = np.r_[np.zeros(normal.size, int), np.ones(abnormal.size, int)]
    a = -np.r_[normal, abnormal]  # abnormality score
    auc = float(roc_auc_score(y, a))
    boot = bootstrap_auc(-normal, -abnormal, n_boot, seed) if n_boot > 0 else np.array([auc])
    fpr, tpr, thr = roc_curve(y, a)
    t, sens, spec = youden(y, a)
    res.update(
        auc=auc,
        auc_ci95=[float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        auc_se=float(boot.std(ddof=1)) if boot.size > 1 else None,
        youden={
            "threshold": -t,  # metric units: flag when metric < threshold
            "sensitivity": sens,
            "specificity": spec,
            "j": sens + spec - 1.0,
        },
        sensitivity_at_specificity=[],
        roc={"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": (-thr).tolist()},
    )
    for sp in FIXED_SPECIFICITIES:
        th = threshold_at_specificity(normal, sp)
        res["sensitivity_at_specificity"].append({
            "specificity_target": sp,
            "threshold": th,
            "sensitivity": float(np.mean(abnormal < th)),
            "specificity": _spec(normal, th),
        })
    return res


def _spec(normal: np.ndarray, threshold: float) -> float:
    return float(np.mean(normal >= threshold))


def correlation(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    if x.size < 3:
        return {"n": int(x.size), "undefined": "fewer than 3 studies"}
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": int(x.size), "undefined": "constant input"}
    p, s = stats.pearsonr(x, y), stats.spearmanr(x, y)
    return {"n": int(x.size), "pearson_r": float(p.statistic), "pearson_p": float(p.pvalue),
            "spearman_rho": float(s.statistic), "spearman_p": float(s.pvalue)}



def operating_point(used: list[Row], is_abn: np.ndarray) -> dict[str, Any] | None:
    """How the scorer's own flag (its model set's threshold) did on these labels."""
    flags = []
    for r in used:
        if r.flagged is not None:
            flags.append(r.flagged)
        elif r.threshold is not None and math.isfinite(r.threshold):
            flags.append(r.log_posterior < r.threshold)
        else:
            return None
    if not flags:
        return None
    f = np.array(flags, bool)
    thr = sorted({r.threshold for r in used if r.threshold is not None})
    return {
        "thresholds": thr,
        "sensitivity": float(f[is_abn].mean()) if is_abn.any() else None,
        "specificity": float((~f[~is_abn]).mean()) if (~is_abn).any() else None,
        "n_flagged": int(f.sum()),
    }
