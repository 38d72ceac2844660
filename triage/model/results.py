"""Result types shared by score, report and send.

Kept apart so that registry and score do not import each other.
"""

from __future__ import annotations

import math
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
    kind: str = "ct"  # what the set scores: "ct" (head CT) or "cxr" (chest radiograph); the SR follows


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
    # The region score (triage.model.voxelmap): the most abnormal lesion-sized window of the voxel map of
    # log p(normal|x), standardized per position on calibration normals. None when the model set keeps no
    # region calibration (made before it existed); ``flagged`` is then the global decision.
    region_score: float | None = None  # low: abnormal
    region_percentile: float | None = None  # rank among calibration normals' region scores, 0..100
    region_threshold: float | None = None
    region_flagged: bool | None = None  # region_score < region_threshold
    region_window_mm: float | None = None  # side of the winning window
    # head CT: [x, y, z] patient LPS mm of the window's centre; radiograph: [x, y] mm on the image from
    # its top-left corner (triage.model.radiomap)
    region_center_mm: list[float] | None = None
    region_sop_instance_uid: str | None = None  # the source slice nearest to that centre
    global_flagged: bool | None = None  # log_posterior < threshold, whatever the policy
    flag_policy: str = "global"  # which of the two decided ``flagged``: global, region or either
    # assembly's warnings (triage.assemble, issue 11): content vs headers, resampling, a sharp kernel,
    # content scored with non_head_content = "warn"; they go into the JSON and the SR
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # The standardized map at the winning window (model grid) and the canonical grid, for key images:
    # not part of the JSON (the pipeline keeps it beside the results).
    region_map: Any = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The JSON fields; a non-finite number becomes null. Why: a region threshold is +inf when the
        global operating point flags every calibration normal, and JSON has no Infinity (Python writes
        it anyway, and SQLite's JSON functions, ``triage status`` among their users, reject the row)."""
        d = asdict(self)
        d.pop("extra")
        d.pop("region_map")
        d.update(self.extra)
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in d.items()}
