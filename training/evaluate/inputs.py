"""What `training evaluate` reads: scores rows (``triage score --json``), labels and scored volumes.

Every reader fails with :class:`EvaluationInputError` naming the file (or list index) and the line, so a
bad row in a 10,000-line scores file can be found without a debugger. Kept apart from the numbers and
the figures because the experiment and the registry's calibration read the same inputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triage.model.labels import Label, LabelsError, read_labels

METRICS = {
    "posterior": ("log_posterior", "log p(normal|x)"),
    "likelihood": ("log_p_normal_model", "log p(x|normal)"),
}
REQUIRED_FIELDS = ("study_uid", "log_p_normal_model", "log_p_mixture_model", "log_posterior")
# Scores from a model set are sums over ~500k voxels: a disagreement larger than this between
# log_posterior and M0 - M1 means the row was edited or produced by a different formula.
CONSISTENCY_TOL = 1e-3


class EvaluationInputError(ValueError):
    """Bad scores or labels; the message names the file (or list index) and the line."""



@dataclass
class Row:
    """One scored study, validated."""

    where: str
    study_uid: str
    log_posterior: float
    log_p_normal_model: float
    log_p_mixture_model: float
    threshold: float | None = None
    flagged: bool | None = None
    model_version: str | None = None
    zero_fraction: float | None = None
    volume: str | None = None

    def metric(self, name: str) -> float:
        return float(getattr(self, METRICS[name][0]))

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.log_posterior, self.log_p_normal_model,
                                              self.log_p_mixture_model))


def _number(obj: Mapping[str, Any], key: str, where: str) -> float:
    v = obj[key]
    if v is None:  # some writers emit null for NaN
        return math.nan
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise EvaluationInputError(f"{where}: field {key!r} is {v!r}, expected a number")
    return float(v)


def parse_row(obj: Any, where: str) -> Row | dict[str, str]:
    """Validate one scores object; a rejected study comes back as ``{study_uid, reason}``."""
    if not isinstance(obj, dict):
        raise EvaluationInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    uid = obj.get("study_uid")
    if not isinstance(uid, str) or not uid.strip():
        raise EvaluationInputError(f"{where}: missing or empty 'study_uid'")
    if obj.get("rejected"):
        return {"study_uid": uid, "reason": str(obj.get("reason") or "unspecified")}
    missing = [k for k in REQUIRED_FIELDS if k not in obj]
    if missing:
        raise EvaluationInputError(f"{where}: study {uid}: missing field(s) {', '.join(missing)}")
    zf = obj.get("zero_fraction")
    if zf is not None:
        zf = _number(obj, "zero_fraction", where)
        if math.isfinite(zf) and not 0.0 <= zf <= 1.0:
            raise EvaluationInputError(f"{where}: study {uid}: zero_fraction {zf} is outside [0, 1]")
    thr = obj.get("threshold")
    vol = obj.get("volume")
    if vol is not None and not isinstance(vol, str):
        raise EvaluationInputError(f"{where}: study {uid}: 'volume' must be a path string, got {vol!r}")
    return Row(
        where=where,
        study_uid=uid,
        log_posterior=_number(obj, "log_posterior", where),
        log_p_normal_model=_number(obj, "log_p_normal_model", where),
        log_p_mixture_model=_number(obj, "log_p_mixture_model", where),
        threshold=None if thr is None else _number(obj, "threshold", where),
        flagged=None if obj.get("flagged") is None else bool(obj["flagged"]),
        model_version=None if obj.get("model_version") is None else str(obj["model_version"]),
        zero_fraction=zf,
        volume=vol,
    )


def load_scores(path: Path) -> list[dict[str, Any]]:
    """Read a scores JSONL file; blank lines are skipped, anything else must be a valid object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise EvaluationInputError(f"{path}: cannot read scores file: {e.strerror or e}") from e
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvaluationInputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
        parse_row(obj, where)  # fail here, with the line number, rather than later with an index
        obj = dict(obj)
        obj["_where"] = where
        out.append(obj)
    return out


def load_labels(path: Path) -> dict[str, Label]:
    """``labels.csv`` -> ``{study_uid: Label(label, lesion)}`` through the one reader
    (:func:`triage.model.labels.read_labels`); label is normal|abnormal, lesion may be ''."""
    try:
        return read_labels(path)
    except LabelsError as e:
        raise EvaluationInputError(str(e)) from None


def group_of(label: str, lesion: str) -> str:
    """Histogram/ROC group: 'normal' or the lesion type ('unspecified' when an abnormal has none)."""
    return "normal" if label == "normal" else (lesion or "unspecified")



def resolve_volume(volume: str, base_dirs: Sequence[Path]) -> Path:
    p = Path(volume)
    if p.is_absolute():
        return p
    for b in base_dirs:
        if (b / p).exists():
            return b / p
    return p


def load_volume(path: Path) -> np.ndarray:
    """The ``data`` array of a scored volume (.npz; a bare .npy is accepted too)."""
    try:
        z = np.load(path, allow_pickle=False)
        if isinstance(z, np.ndarray):
            return z
        with z:
            if "data" not in z.files:
                raise EvaluationInputError(f"{path}: no 'data' array (has {z.files})")
            return np.asarray(z["data"])
    except EvaluationInputError:
        raise
    except Exception as e:  # OSError, BadZipFile, ValueError, EOFError: all mean "not a readable volume"
        raise EvaluationInputError(f"{path}: cannot read volume: {e}") from e


