"""What the SR and the HL7 message both say: the coded concepts, the one-line summary, input checks.

Both messages report the same measurements under the same codes (the SR as TID 1500 content items,
the ORU as OBX identifiers), so the concepts live here once rather than in either builder. Nothing
here logs or raises with patient data: errors name UIDs and attributes only.
"""

from __future__ import annotations

import math
import re

from highdicom.sr import CodedConcept
from pydicom.multival import MultiValue

from triage.model.results import ScoreResult

__all__ = [
    "ABNORMAL",
    "CHEST",
    "CHEST_RADIOGRAPH",
    "CT_OF_HEAD",
    "HEAD",
    "LOG_POSTERIOR",
    "LOG_P_MIXTURE_MODEL",
    "LOG_P_NORMAL_MODEL",
    "NAT",
    "NORMAL",
    "NORMALITY",
    "PERCENT",
    "PERCENTILE",
    "PROCEDURE_BY_KIND",
    "SCHEME",
    "THRESHOLD",
    "TRIAGE_RESULT",
    "ReportError",
    "check_uid",
    "dicom_text",
    "finite",
    "summary_text",
]


class ReportError(ValueError):
    """Input that cannot be reported; the message names the attribute and the UID, never patient data."""


# ----------------------------------------------------------------------------------------- codes
# No standard code exists for a flow-based log posterior, so those concepts live in a private coding
# scheme (PS3.16 8.2: designators starting "99" are private), declared in the SR's Coding Scheme
# Identification Sequence so a reader can tell where they come from. Everything that has a standard
# code uses it.
SCHEME = "99GLOWTRIAGE"
LOG_POSTERIOR = CodedConcept("LOGPOST", SCHEME, "Log posterior of normal, log p(normal|x)")
LOG_P_NORMAL_MODEL = CodedConcept("LOGPXN", SCHEME, "Log likelihood under normal model, log p(x|normal)")
LOG_P_MIXTURE_MODEL = CodedConcept("LOGPX", SCHEME, "Log likelihood under mixture model, log p(x)")
TRIAGE_RESULT = CodedConcept("TRIAGE", SCHEME, "Triage result")
# (DCM 122411 "Threshold Value") and (DCM 121415 "Percentile Ranking of measurement") are standard.
THRESHOLD = CodedConcept("122411", "DCM", "Threshold Value")
PERCENTILE = CodedConcept("121415", "DCM", "Percentile Ranking of measurement")
# (DCM 121402 "Normality") with a value from CID 222 "Normality Codes": SCT Abnormal / Normal.
NORMALITY = CodedConcept("121402", "DCM", "Normality")
ABNORMAL = CodedConcept("263654008", "SCT", "Abnormal")
NORMAL = CodedConcept("17621005", "SCT", "Normal")
CT_OF_HEAD = CodedConcept("303653007", "SCT", "Computed tomography of head")
HEAD = CodedConcept("69536005", "SCT", "Head")
CHEST_RADIOGRAPH = CodedConcept("399208008", "SCT", "Plain chest X-ray")
CHEST = CodedConcept("51185008", "SCT", "Chest")
# what a model set of each kind (ModelSetInfo.kind) reports: the procedure and the finding site
PROCEDURE_BY_KIND = {"ct": (CT_OF_HEAD, HEAD), "cxr": (CHEST_RADIOGRAPH, CHEST)}
# Units. UCUM has no "nat"; an annotation in braces ({nat}) is a valid UCUM unit equal to 1 (a pure
# number), which is what a log probability is, and it still tells a human reader the log base (e).
# "1" alone would lose that, and "[nat]"-style units do not exist. HL7 OBX-6 uses the same code.
NAT = CodedConcept("{nat}", "UCUM", "nat")
PERCENT = CodedConcept("%", "UCUM", "percent")

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def check_uid(value: str, what: str) -> str:
    if not isinstance(value, str) or len(value) > 64 or not _UID.match(value):
        raise ReportError(f"{what} is not a valid DICOM UID (digits and dots, at most 64): {value!r}")
    return value


def finite(value: float, what: str, study_uid: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ReportError(f"study {study_uid}: {what} is not a number: {value!r}") from None
    if not math.isfinite(v):
        raise ReportError(f"study {study_uid}: {what} is not finite ({v})")
    return v


def dicom_text(value: object) -> str:
    """A DICOM text value as one string: a multi-valued LO/SH (pydicom splits on backslash) is
    joined back with the backslash it came with, never rendered as a Python list."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


# --------------------------------------------------------------------------------------- summary
def summary_text(result: ScoreResult) -> str:
    """One line for HL7 and logs: the decision, the score and the operating point, no patient data."""
    verdict = "probably abnormal - read first" if result.flagged else "no triage flag"
    pct = ""
    if isinstance(result.percentile, int | float) and math.isfinite(result.percentile):
        pct = f", {result.percentile:.1f}th percentile of calibration normals"
    return (
        f"glowtriage: {verdict} (log p(normal|x) = {result.log_posterior:.3f} nats, "
        f"threshold {result.threshold:.3f}{pct}; model set {result.model_version}). "
        "AI triage aid, not a diagnosis."
    )
