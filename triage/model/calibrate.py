"""Operating point of a model set: the threshold on log p(normal|x) below which a study is flagged.

Two ways, as the registry records them: with labels, Youden's J on the calibration studies (the
paper's cut-off, Fig. 3/4); without labels, the threshold that keeps a configured specificity on a
held-out set of normal studies. Lives in ``triage`` because ``triage models create`` calibrates;
``training.evaluate.report`` uses the same functions so a report and the daemon agree on what a cut-off is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_curve


def youden(y_true: Sequence[int] | np.ndarray, abnormality_score: Sequence[float] | np.ndarray
           ) -> tuple[float, float, float]:
    """Cut-off maximising Youden's J = sensitivity + specificity - 1.

    Returns ``(threshold, sensitivity, specificity)`` where a study is called abnormal when
    ``abnormality_score > threshold``. The threshold is placed halfway between the optimal score and
    the next lower one, so ``>`` and ``>=`` give the same calls on these data and a caller that negates
    it for the daemon's strict ``log_posterior < threshold`` rule reproduces the same sensitivity and
    specificity. Ties in J go to the highest threshold (the more specific point). When no cut-off beats
    chance the threshold is ``+inf`` (call nothing abnormal) with sensitivity 0 and specificity 1.
    """
    y = np.asarray(y_true)
    s = np.asarray(abnormality_score, dtype=float)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"y_true and abnormality_score must be 1-D of equal length: {y.shape}, {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("abnormality_score contains non-finite values")
    y = y.astype(int)
    if set(np.unique(y)) != {0, 1}:
        raise ValueError("youden needs both classes (0 = normal, 1 = abnormal) in y_true")
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    i = int(np.argmax(tpr - fpr))
    if not np.isfinite(thr[i]):
        return math.inf, 0.0, 1.0
    cut = float(thr[i])
    lower = s[s < cut]
    t = (cut + float(lower.max())) / 2 if lower.size else float(np.nextafter(cut, -np.inf))
    return t, float(tpr[i]), float(1.0 - fpr[i])


def threshold_at_specificity(normal_scores: Sequence[float] | np.ndarray, specificity: float) -> float:
    """Threshold on a normality metric (e.g. log_posterior) keeping ``specificity`` of normals unflagged.

    The daemon flags ``score < threshold``; the returned threshold leaves at least
    ``ceil(specificity * n)`` normals at or above it (strictly above when there are no ties), and is
    the highest such value, i.e. the most sensitive operating point with that specificity on these
    normals. It lies halfway between the last flagged and the first unflagged normal so that a new
    normal scoring like the calibration ones is not flagged by round-off.
    """
    if not 0.0 < specificity <= 1.0:
        raise ValueError(f"specificity must be in (0, 1], got {specificity}")
    s = np.sort(np.asarray(normal_scores, dtype=float))
    if s.size == 0:
        raise ValueError("threshold_at_specificity needs at least one normal score")
    if not np.all(np.isfinite(s)):
        raise ValueError("normal_scores contains non-finite values")
    n = s.size
    m = min(n, math.ceil(specificity * n - 1e-9))  # normals that must stay unflagged
    if m == n:
        return float(s[0])
    lo, hi = float(s[n - m - 1]), float(s[n - m])
    return (lo + hi) / 2 if lo < hi else hi
