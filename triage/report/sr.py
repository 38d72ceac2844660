"""Results back to the hospital: a DICOM SR, an HL7 v2.5 ORU^R01 and the routing decision.

Why a TID 1500 Comprehensive 3D SR: it is what the IHE AI Results (AIR) profile asks an evidence
creator to write, so any AIR-ready viewer shows our score next to the images without custom code, and
a PACS files it in the same study as the CT it describes. Why an ORU^R01 as well: worklists and RIS
re-prioritise on HL7 (OBR-5 / TQ1-9 priority), not on DICOM objects.

Determinism matters more than usual here: the caller (pipeline) supplies every UID and the content
date/time, and nothing below reads the clock or a random source, so a redone report is byte-identical
and a PACS sees a duplicate of the first SR, never a second, conflicting one.

Everything the patient can be identified by (name, ID, birth date, accession number) goes into the SR
and the HL7 message because they are clinical messages; none of it is ever logged or put into an
exception message (errors name UIDs and attributes only).
"""

from __future__ import annotations

import copy
import logging
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

import hl7
from highdicom import ContributingEquipment
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM, PersonName

from triage.config import HL7Settings, PacsSettings, RoutingSettings
from triage.model.registry import UID_PREFIX
from triage.model.results import ModelSetInfo, ScoreResult

__all__ = [
    "COMPREHENSIVE_3D_SR",
    "ReportError",
    "Route",
    "build_oru",
    "build_sr",
    "hl7_escape",
    "parse_ack",
    "plan_routes",
    "summary_text",
]

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SERIES_DESCRIPTION = "AI triage aid (not a diagnosis): head CT normality"
TRACKING_IDENTIFIER = "head CT triage"


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
# Units. UCUM has no "nat"; an annotation in braces ({nat}) is a valid UCUM unit equal to 1 (a pure
# number), which is what a log probability is, and it still tells a human reader the log base (e).
# "1" alone would lose that, and "[nat]"-style units do not exist. HL7 OBX-6 uses the same code.
NAT = CodedConcept("{nat}", "UCUM", "nat")
PERCENT = CodedConcept("%", "UCUM", "percent")

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _check_uid(value: str, what: str) -> str:
    if not isinstance(value, str) or len(value) > 64 or not _UID.match(value):
        raise ReportError(f"{what} is not a valid DICOM UID (digits and dots, at most 64): {value!r}")
    return value


def _finite(value: float, what: str, study_uid: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ReportError(f"study {study_uid}: {what} is not a number: {value!r}") from None
    if not math.isfinite(v):
        raise ReportError(f"study {study_uid}: {what} is not finite ({v})")
    return v


def _text(value: object) -> str:
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


# ------------------------------------------------------------------------------------------- SR
def _local_naive(when: datetime, source: Dataset) -> datetime:
    """The content date/time as the PACS will read it: naive DICOM DA/TM in the study's local time.

    DICOM dates carry no zone; Timezone Offset From UTC would apply to the copied Study Date/Time as
    well, so we do not add one. An aware datetime is moved to the source's declared offset when it has
    one, else to this machine's zone (the daemon runs in the hospital), then the zone is dropped.
    """
    if when.tzinfo is None:
        return when
    offset = str(source.get("TimezoneOffsetFromUTC", "") or "")
    m = re.fullmatch(r"([+-])(\d\d)(\d\d)", offset)
    if m:
        sign = 1 if m.group(1) == "+" else -1
        tz = timezone(sign * timedelta(hours=int(m.group(2)), minutes=int(m.group(3))))
        return when.astimezone(tz).replace(tzinfo=None)
    return when.astimezone().replace(tzinfo=None)


# Type 2 attributes highdicom reads from the first evidence item with attribute access: an image
# header that lacks one (type 2 means "may be empty", not "may be absent", but we see absent too)
# must not crash the report.
_TYPE2_FROM_EVIDENCE = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "ReferringPhysicianName",
)
_VALID_TYPE2 = {
    "PatientSex": re.compile(r"^[MFO]?$"),
    "PatientBirthDate": re.compile(r"^(\d{8})?$"),
    "StudyDate": re.compile(r"^(\d{8})?$"),
    "StudyTime": re.compile(r"^(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?$"),
}


class _NoPatientNameInLogs(logging.Filter):
    """highdicom warns about a PN without a caret ("SMITH", common in real data) by logging the name
    itself; our logs must never carry one, so that record is dropped at the source."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "patient_name" not in str(record.msg)


logging.getLogger("highdicom.base").addFilter(_NoPatientNameInLogs())
# ... and it also issues a UserWarning quoting the name, which would reach stderr (journald); ignored
# around the SR build only (a filter set at import would not survive code that resets the filters).
_PN_WARNING = r"The string .* is unlikely to represent the intended person name"


def _checked_sources(result: ScoreResult, source: Sequence[Dataset]) -> list[Dataset]:
    """Validate the scored series' headers and order them (so the SR does not depend on input order)."""
    if not source:
        raise ReportError(f"study {result.study_uid}: no source instances to reference in the SR")
    seen: set[str] = set()
    for i, ds in enumerate(source):
        for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not str(ds.get(kw, "") or ""):
                raise ReportError(f"study {result.study_uid}: source instance #{i} has no {kw}")
        sop = str(ds.SOPInstanceUID)
        if str(ds.StudyInstanceUID) != result.study_uid:
            raise ReportError(
                f"source instance {sop} belongs to study {ds.StudyInstanceUID}, not the scored study "
                f"{result.study_uid}"
            )
        if str(ds.SeriesInstanceUID) != result.series_uid:
            raise ReportError(
                f"source instance {sop} belongs to series {ds.SeriesInstanceUID}, not the scored series "
                f"{result.series_uid}"
            )
        if sop in seen:
            raise ReportError(f"study {result.study_uid}: source instance {sop} is listed twice")
        seen.add(sop)

    def key(ds: Dataset) -> tuple[int, str]:
        try:
            number = int(ds.get("InstanceNumber", 0) or 0)
        except (TypeError, ValueError):
            number = 0
        return number, str(ds.SOPInstanceUID)

    return sorted(source, key=key)


def _evidence(ordered: list[Dataset]) -> list[Dataset]:
    """The headers highdicom reads. The first is a copy (the caller's header is never modified) in
    which a missing or unusable type 2 patient/study value becomes empty: highdicom would raise on
    PatientSex "FEMALE" or a 4-digit birth date, and one such header must not block the result."""
    first = copy.deepcopy(ordered[0])
    for kw in _TYPE2_FROM_EVIDENCE:
        value = first.get(kw)
        pattern = _VALID_TYPE2.get(kw)
        if kw not in first or (pattern is not None and not pattern.match(_text(value).strip())):
            if kw in first:
                del first[kw]
            setattr(first, kw, None)
    return [first, *ordered[1:]]


def _measurements(result: ScoreResult) -> list[Measurement]:
    uid = result.study_uid
    items = [
        Measurement(LOG_POSTERIOR, _finite(result.log_posterior, "log_posterior", uid), NAT),
        Measurement(THRESHOLD, _finite(result.threshold, "threshold", uid), NAT),
    ]
    if isinstance(result.percentile, int | float) and math.isfinite(result.percentile):
        # NaN when the model set has no calibration normals: then there is no percentile to report.
        items.append(Measurement(PERCENTILE, float(result.percentile), PERCENT))
    lp0 = _finite(result.log_p_normal_model, "log_p_normal_model", uid)
    lp1 = _finite(result.log_p_mixture_model, "log_p_mixture_model", uid)
    items.append(Measurement(LOG_P_NORMAL_MODEL, lp0, NAT))
    items.append(Measurement(LOG_P_MIXTURE_MODEL, lp1, NAT))
    return items


def _algorithm(model: ModelSetInfo) -> AlgorithmIdentification:
    return AlgorithmIdentification(
        name="glowtriage Glow M0/M1 normality",
        version=model.version,
        parameters=[
            f"preset={model.preset}",
            f"preprocessing={model.preprocessing_version}",
            f"threshold_method={model.threshold_method}",
        ],
        manufacturer=model.manufacturer,
    )


def build_sr(
    result: ScoreResult,
    source: list[Dataset],
    model: ModelSetInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9901,
    instance_number: int = 1,
    content_datetime: datetime | None = None,
) -> Dataset:
    """A Comprehensive 3D SR (TID 1500 Measurement Report) with the triage result for one study.

    ``source``: the headers (pixels not needed) of every instance of the scored series; they become
    the evidence (Current Requested Procedure Evidence Sequence) and the measurement group's source
    images, and the first one gives the patient and study modules. The algorithm is the device
    observer and a Contributing Equipment item (Processing Equipment) carrying the model set's Device
    UID. Completion COMPLETE, verification UNVERIFIED, preliminary flag PRELIMINARY: a triage aid is
    never the definitive report.

    Same inputs and UIDs -> same bytes: ``content_datetime`` (default: now, which is not
    reproducible) stands in for every date/time highdicom would otherwise take from the clock.
    """
    _check_uid(series_instance_uid, "series_instance_uid")
    _check_uid(sop_instance_uid, "sop_instance_uid")
    _check_uid(model.device_uid, "model.device_uid")
    ordered = _checked_sources(result, source)
    if series_instance_uid == result.series_uid:
        raise ReportError(f"study {result.study_uid}: the SR needs its own series, got the source's UID")
    if content_datetime is None:
        content_datetime = datetime.now()
    when = _local_naive(content_datetime, ordered[0])

    device = DeviceObserverIdentifyingAttributes(
        uid=model.device_uid,
        name="glowtriage",
        manufacturer_name=model.manufacturer,
        model_name=model.model_name,
        serial_number=model.version,
    )
    context = ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )
    finding = ABNORMAL if result.flagged else NORMAL
    try:
        sources = [SourceImageForMeasurementGroup.from_source_image(ds) for ds in ordered]
    except (ValueError, AttributeError) as exc:
        raise ReportError(
            f"study {result.study_uid}: a source instance is not an image header: {exc}"
        ) from None
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            # derived, not random: the tracking UID is part of the bytes that must repeat
            uid=generate_uid(prefix=UID_PREFIX, entropy_srcs=["glowtriage-tracking", sop_instance_uid]),
            identifier=TRACKING_IDENTIFIER,
        ),
        algorithm_id=_algorithm(model),
        finding_sites=[FindingSite(HEAD)],
        measurements=_measurements(result),
        qualitative_evaluations=[QualitativeEvaluation(NORMALITY, finding)],
        source_images=sources,
    )
    report = MeasurementReport(
        observation_context=context,
        procedure_reported=CT_OF_HEAD,
        imaging_measurements=[group],
    )
    equipment = ContributingEquipment(
        manufacturer=model.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,  # DCM 109102, CID 7005
        manufacturer_model_name=model.model_name,
        software_versions=[model.software_version, model.version],
        device_serial_number=model.version,
        contribution_datetime=when,
        contribution_description="Normality score of the source series (AI triage aid, not a diagnosis)",
    )
    equipment.DeviceUID = model.device_uid  # type 3 in the current SOP Common module (see report)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_PN_WARNING, category=UserWarning)
            sr = Comprehensive3DSR(
                evidence=_evidence(ordered),
                content=report,
                series_instance_uid=series_instance_uid,
                series_number=series_number,
                sop_instance_uid=sop_instance_uid,
                instance_number=instance_number,
                manufacturer=model.manufacturer,
                is_complete=True,
                is_final=False,
                is_verified=False,
                contributing_equipment=[equipment],
                series_description=SERIES_DESCRIPTION,
                manufacturer_model_name=model.model_name,
                software_versions=[model.software_version, model.version],
                device_serial_number=model.version,
                content_date=when.date(),
                content_time=when.time(),
                series_date=when.date(),
                series_time=when.time(),
                coding_schemes=[
                    CodingSchemeIdentificationItem(
                        designator=SCHEME,
                        name="glowtriage local codes",
                        responsible_organization=model.manufacturer,
                    )
                ],
            )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ReportError(f"study {result.study_uid}: cannot build the SR: {exc}") from None
    # highdicom stamps these with datetime.now(); pin them so a rebuilt SR is byte-identical.
    sr.DeviceUID = model.device_uid  # General Equipment: this SR's "device" is the model set
    sr.InstanceCreationDate = DA(when.date())
    sr.InstanceCreationTime = TM(when.time())
    for item in sr.ContributingEquipmentSequence:
        if item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = DT(when)
    return sr


# ------------------------------------------------------------------------------------------ HL7
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}


def hl7_escape(text: object) -> str:
    """Escape HL7 v2 delimiters (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\) in free text for the default separators.

    Control characters (CR would end the segment) become one space. Non-ASCII stays as it is: the
    message declares UTF-8 in MSH-18. Not ``hl7.util.escape``: it writes non-ASCII as a one-byte
    ``\\Xhh\\``, which is wrong for characters above U+00FF in a UTF-8 message.
    """
    s = _CONTROL.sub(" ", _text(text))
    return "".join(_ESCAPES.get(c, c) for c in s)


def _hl7_ts(when: datetime) -> str:
    """HL7 TS: YYYYMMDDHHMMSS, plus +/-ZZZZ when the datetime knows its zone."""
    return when.strftime("%Y%m%d%H%M%S") + (when.strftime("%z") if when.tzinfo else "")


def _dicom_ts(date: object, time: object) -> str:
    """StudyDate + StudyTime as an HL7 TS (local time, no zone); '' when the date is unusable."""
    d = str(date or "")
    if not re.fullmatch(r"\d{8}", d):
        return ""
    t = str(time or "").strip()
    m = re.fullmatch(r"(\d{2,6})(?:\.(\d{1,6}))?", t)
    if not m:
        return d
    whole = m.group(1)[: len(m.group(1)) - len(m.group(1)) % 2]
    frac = f".{m.group(2)[:4]}" if m.group(2) and len(whole) == 6 else ""
    return d + whole + frac


def _xpn(name: object) -> str:
    """DICOM PN (family^given^middle^prefix^suffix) -> HL7 XPN (family^given^middle^suffix^prefix)."""
    if not name:
        return ""
    pn = name if isinstance(name, PersonName) else PersonName(str(name))
    parts = [pn.family_name, pn.given_name, pn.middle_name, pn.name_suffix, pn.name_prefix]
    return "^".join(hl7_escape(p) for p in parts).rstrip("^")


def _segment(*fields: str) -> str:
    return "|".join(fields).rstrip("|")


def _procedure(source: Dataset) -> str:
    """OBR-4 (CE): the source's procedure code when it has one, else LOINC 24725-4 "CT Head";
    the Study Description goes in CE.5 (alternate text) for people reading the worklist."""
    code, meaning, scheme = "24725-4", "CT Head", "LN"
    seq = source.get("ProcedureCodeSequence")
    if seq:
        item = seq[0]
        if item.get("CodeValue") and item.get("CodingSchemeDesignator"):
            code, meaning = _text(item.CodeValue), _text(item.get("CodeMeaning", ""))
            scheme = _text(item.CodingSchemeDesignator)
    parts = [hl7_escape(code), hl7_escape(meaning), hl7_escape(scheme)]
    description = _text(source.get("StudyDescription", ""))
    if description:
        parts += ["", hl7_escape(description)]
    return "^".join(parts)


def build_oru(
    result: ScoreResult,
    source: Dataset,
    model: ModelSetInfo,
    settings: HL7Settings,
    *,
    control_id: str,
    when: datetime,
) -> str:
    """HL7 v2.5 ORU^R01 for the RIS/worklist; segments end with CR; parseable by ``hl7.parse``.

    MSH, PID (patient from the source header), ORC/OBR (order = Accession Number, priority S when
    flagged and R otherwise in OBR-5 and TQ1-9, result status F), then OBX: 1 NM log posterior in
    {nat} with abnormal flag A/N and the threshold as reference range (OBX-7 "> lower limit"),
    2 ST the summary text,
    3 NM threshold, 4 NM percentile (when known), 5/6 HD Study/Series Instance UID (DCM 113014/113015)
    so the RIS can open the images the result is about. Original acknowledgement mode (MSH-15/16
    empty): the receiver answers AA/AE/AR at once.
    """
    if not control_id or len(control_id) > 20 or hl7_escape(control_id) != control_id:
        raise ReportError(f"study {result.study_uid}: HL7 control id must be 1-20 characters without "
                          f"delimiters, got {control_id!r}")
    if str(source.get("StudyInstanceUID", "")) != result.study_uid:
        raise ReportError(f"HL7 source header is from study {source.get('StudyInstanceUID', '(none)')}, "
                          f"not the scored study {result.study_uid}")
    post = _finite(result.log_posterior, "log_posterior", result.study_uid)
    thr = _finite(result.threshold, "threshold", result.study_uid)
    e = hl7_escape
    now = _hl7_ts(when)
    observed = _dicom_ts(source.get("StudyDate"), source.get("StudyTime")) or now
    accession = e(source.get("AccessionNumber", "") or "")
    priority = "S" if result.flagged else "R"
    priority_cwe = "S^Stat^HL70485" if result.flagged else "R^Routine^HL70485"
    sex = str(source.get("PatientSex", "") or "").upper()
    sex = sex if sex in ("M", "F", "O") else "U"
    birth = str(source.get("PatientBirthDate", "") or "")
    birth = birth if re.fullmatch(r"\d{8}", birth) else ""
    pid3 = e(source.get("PatientID", "") or "")
    issuer = source.get("IssuerOfPatientID", "")
    if pid3:
        pid3 += f"^^^{e(issuer)}^MR" if issuer else "^^^^MR"
    equipment = f"{e(model.version)}^^{model.device_uid}^ISO"  # OBX-18: which model set said so

    def obx(n: int, vtype: str, ident: str, value: str, units: str = "", ref: str = "",
            flag: str = "") -> str:
        # OBX-1..19: set id, type, identifier, sub-id, value, units, range, flags, ..., status (11),
        # observation time (14), equipment (18), analysis time (19)
        return _segment("OBX", str(n), vtype, ident, "", value, units, ref, flag, "", "", "F", "", "",
                        observed, "", "", "", equipment, now)

    nat = "{nat}^nat^UCUM"
    lines = [
        _segment("MSH", "^~\\&", e(settings.sending_application), e(settings.sending_facility),
                 e(settings.receiving_application), e(settings.receiving_facility), now, "",
                 "ORU^R01^ORU_R01", control_id, "P", "2.5", "", "", "", "", "", "UNICODE UTF-8"),
        _segment("PID", "1", "", pid3, "", _xpn(source.get("PatientName")), "", birth, sex),
        _segment("ORC", "RE", accession, accession, "", "CM"),
        _segment("OBR", "1", accession, accession, _procedure(source), priority, "", observed,
                 "", "", "", "", "", "", "", "", "", "", "", "", "", "", now, "", "CT", "F"),
        _segment("TQ1", "1", "", "", "", "", "", "", "", priority_cwe),
        obx(1, "NM", f"LOGPOST^{e(LOG_POSTERIOR.meaning)}^{SCHEME}", f"{post:.4f}", nat, f">{thr:.4f}",
            "A" if result.flagged else "N"),
        obx(2, "ST", f"TRIAGE^{e(TRIAGE_RESULT.meaning)}^{SCHEME}", e(summary_text(result))),
        obx(3, "NM", f"122411^{e(THRESHOLD.meaning)}^DCM", f"{thr:.4f}", nat),
    ]
    n = 4
    if isinstance(result.percentile, int | float) and math.isfinite(result.percentile):
        lines.append(obx(n, "NM", f"121415^{e(PERCENTILE.meaning)}^DCM", f"{result.percentile:.2f}",
                         "%^percent^UCUM"))
        n += 1
    lines.append(obx(n, "HD", "113014^Study^DCM", e(result.study_uid)))
    lines.append(obx(n + 1, "HD", "113015^Series^DCM", e(result.series_uid)))
    return "\r".join(lines) + "\r"


def parse_ack(raw: str, control_id: str | None = None) -> tuple[bool, str]:
    """(accepted, text) from an HL7 ACK: MSA-1 AA or CA is accepted; AE, AR, CE, CR are not.

    The text is MSA-3, else ERR-8 (user message) or ERR-3 (error code), else the code itself. With
    ``control_id`` an ACK for another message (MSA-2 mismatch) is not accepted: on a shared MLLP
    connection a stale ACK must not mark this message delivered. Never raises on bad input.
    """
    body = (raw or "").strip("\x0b\x1c\r\n ").replace("\r\n", "\r").replace("\n", "\r")
    if not body:
        return False, "empty acknowledgement"
    try:
        msg = hl7.parse(body)
        msa = msg.segment("MSA")
    except (KeyError, IndexError, hl7.ParseException, ValueError) as exc:
        return False, f"unparseable acknowledgement ({exc})"
    code = str(msa[1]).strip() if len(msa) > 1 else ""
    acked = str(msa[2]).strip() if len(msa) > 2 else ""
    text = msg.unescape(str(msa[3])) if len(msa) > 3 and str(msa[3]) else ""
    if not text:
        try:
            err = msg.segment("ERR")
        except KeyError:
            err = None
        if err is not None:
            for i in (8, 3):
                if len(err) > i and str(err[i]):
                    text = msg.unescape(str(err[i]))
                    break
    if not code:
        return False, "acknowledgement without MSA-1"
    if control_id is not None and acked != control_id:
        return False, f"acknowledgement is for message {acked!r}, not {control_id!r}"
    return code in ("AA", "CA"), text or code


# -------------------------------------------------------------------------------------- routing
RouteKind = Literal["dicom-sr", "dicom-source", "hl7"]


@dataclass(frozen=True)
class Route:
    """One delivery to plan: what (``kind``), a stable name for metrics/outbox (``destination``),
    and where. ``ae_title`` is empty for HL7 (MLLP has no AE titles)."""

    kind: RouteKind
    destination: str
    ae_title: str
    host: str
    port: int


def _matches(when: str, flagged: bool) -> bool:
    return when == "always" or (when == "flagged") == flagged


def _dedupe(routes: Iterable[Route]) -> list[Route]:
    """The same payload to the same peer twice is waste (and a second C-STORE of the same SR); keep
    the first, in plan order: the PACS SR, then rules in config order, then HL7."""
    seen: set[tuple[str, str, str, int]] = set()
    out = []
    for r in routes:
        key = (r.kind, r.ae_title, r.host, r.port)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def plan_routes(
    result: ScoreResult, settings: RoutingSettings, pacs: PacsSettings, hl7: HL7Settings
) -> list[Route]:
    """Where this study's results go: the SR to the PACS (``routing.sr_to_pacs``), each rule whose
    ``when`` matches (flagged / normal / always) with its ``send`` (source series or SR), and the ORU to
    the RIS when ``hl7.enabled``."""
    routes: list[Route] = []
    if settings.sr_to_pacs:
        routes.append(Route("dicom-sr", "PACS", pacs.ae_title, pacs.host, pacs.port))
    for rule in settings.rules:
        if _matches(rule.when, result.flagged):
            kind: RouteKind = "dicom-source" if rule.send == "source" else "dicom-sr"
            routes.append(Route(kind, rule.name, rule.ae_title, rule.host, rule.port))
    if hl7.enabled:
        routes.append(Route("hl7", "HL7", "", hl7.host, hl7.port))
    return _dedupe(routes)
