"""Result types shared by score, report and send.

Kept apart so that registry and score do not import each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSetInfo:
    """What a report must say about the algorithm that produced a result."""

    version: str  # model set version, e.g. "20261129-0312-ab12cd"
    device_uid: str  # DICOM UID that changes whenever either model changes
    preset: str  # e.g. "cpu-small"
    preprocessing_version: str
    threshold: float  # operating point on log p(normal|x): flagged when the score is below it
    threshold_method: str  # e.g. "youden" or "specificity=0.90"
    manufacturer: str = "glowtriage"
    model_name: str = "glowtriage head-CT normality (Glow M0/M1)"
    software_version: str = "0.1.0"


@dataclass(frozen=True)
class ScoreResult:
    """One scored study. Field names follow the `triage score --json` contract in DESIGN.md."""

    study_uid: str
    series_uid: str
    log_p_normal_model: float  # log p(x|normal) from M0, nats
    log_p_mixture_model: float  # log p(x) from M1, nats
    log_posterior: float  # log p(normal|x) up to the constant log prior: M0 - M1
    threshold: float
    flagged: bool  # log_posterior < threshold: probably abnormal, read first
    percentile: float  # rank of log_posterior among calibration normals, 0..100 (low: unusual)
    model_version: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d.update(self.extra)
        return d
