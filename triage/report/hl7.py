"""The HL7 result: an HL7 v2.5 ORU^R01 for the RIS/worklist, and reading its acknowledgement.

Why an ORU^R01 as well as the SR: worklists and RIS re-prioritise on HL7 (OBR-5 / TQ1-9 priority),
not on DICOM objects. Like the SR, the message is a function of its inputs (the caller supplies the
control id and the time), so a redone report sends the same bytes.

The patient's name, ID and birth date go into PID because the message is clinical; none of it is
logged or put into an exception message.
"""

from __future__ import annotations

import math
import re
from datetime import datetime

import hl7
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from triage.config import HL7Settings
from triage.model.results import ModelSetInfo, ScoreResult
from triage.report.codes import (
    LOG_POSTERIOR,
    PERCENTILE,
    SCHEME,
    THRESHOLD,
    TRIAGE_RESULT,
    ReportError,
    dicom_text,
    finite,
    summary_text,
)

__all__ = ["build_oru", "hl7_escape", "parse_ack"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}


def hl7_escape(text: object) -> str:
    """Escape HL7 v2 delimiters (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\) in free text for the default separators.

    Control characters (CR would end the segment) become one space. Non-ASCII stays as it is: the
    message declares UTF-8 in MSH-18. Not ``hl7.util.escape``: it writes non-ASCII as a one-byte
    ``\\Xhh\\``, which is wrong for characters above U+00FF in a UTF-8 message.
    """
    s = _CONTROL.sub(" ", dicom_text(text))
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


def _procedure(source: Dataset, kind: str = "ct") -> str:
    """OBR-4 (CE): the source's procedure code when it has one, else LOINC 24725-4 "CT Head" (a chest
    set: SNOMED CT 399208008 "Plain chest X-ray"); the Study Description goes in CE.5 (alternate text)
    for people reading the worklist."""
    code, meaning, scheme = "24725-4", "CT Head", "LN"
    if kind == "cxr":
        code, meaning, scheme = "399208008", "Plain chest X-ray", "SCT"
    seq = source.get("ProcedureCodeSequence")
    if seq:
        item = seq[0]
        if item.get("CodeValue") and item.get("CodingSchemeDesignator"):
            code, meaning = dicom_text(item.CodeValue), dicom_text(item.get("CodeMeaning", ""))
            scheme = dicom_text(item.CodingSchemeDesignator)
    parts = [hl7_escape(code), hl7_escape(meaning), hl7_escape(scheme)]
    description = dicom_text(source.get("StudyDescription", ""))
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
    post = finite(result.log_posterior, "log_posterior", result.study_uid)
    thr = finite(result.threshold, "threshold", result.study_uid)
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
        _segment("OBR", "1", accession, accession, _procedure(source, model.kind), priority, "", observed,
                 "", "", "", "", "", "", "", "", "", "", "", "", "", "", now, "",
                 "RX" if model.kind == "cxr" else "CT", "F"),  # OBR-24, HL7 table 0074
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
