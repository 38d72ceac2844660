"""structlog JSON logs without patient data.

Why a scrubbing processor instead of trusting callers: a single ``log.info("stored", **ds_fields)``
written in a hurry would put a patient's name into journald, which is kept for months and read by
people who have no right to it. The processor removes every PHI-bearing key whatever the caller
passed, and the formatter of foreign (stdlib) log records goes through the same chain, so pynetdicom's
own debug output cannot leak identifiers either. We log UIDs, stages and reasons only.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# Keys that may carry patient or operator identity. Matched case-insensitively after removing
# non-letters, so "patient_name", "PatientName" and "patient-name" are all caught.
PHI_KEYS = frozenset(
    k.lower()
    for k in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientSex",
        "PatientAge",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "OtherPatientIDs",
        "OtherPatientNames",
        "OtherPatientIDsSequence",
        "PatientMotherBirthName",
        "MedicalRecordLocator",
        "IssuerOfPatientID",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "NameOfPhysiciansReadingStudy",
        "InstitutionAddress",
        "AccessionNumber",
        "Name",
        "BirthDate",
        "DOB",
        "MRN",
    )
)
_NON_LETTERS = re.compile(r"[^a-z]")
REDACTED = "[redacted]"
EventDict = MutableMapping[str, Any]


def _is_phi_key(key: str) -> bool:
    return _NON_LETTERS.sub("", key.lower()) in PHI_KEYS


def _is_pydicom_phi(value: Any) -> bool:
    # A PersonName is a person's name whatever key it travels under, and a whole Dataset (or one of its
    # elements) would be rendered with repr(), i.e. with every patient attribute in it.
    module = type(value).__module__ or ""
    return module.startswith("pydicom") and type(value).__name__ in (
        "PersonName",
        "Dataset",
        "FileDataset",
        "DataElement",
        "RawDataElement",
        "Sequence",
    )


def _scrub(value: Any) -> Any:
    if _is_pydicom_phi(value):
        return REDACTED
    if isinstance(value, dict):
        return {k: (REDACTED if _is_phi_key(str(k)) else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def scrub_phi(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drop the values of PHI keys anywhere in the event, nested ones too."""
    for key in list(event_dict):
        if key == "event":
            continue
        if _is_phi_key(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


# Tags and words that mark a line of a third-party dataset dump as carrying identity: the whole
# patient group (0010,xxxx), accession number, referring/performing/reading physicians, operators,
# institution address, and their keywords or descriptions ("Patient's Name", "PatientID", ...).
_FOREIGN_PHI = re.compile(
    r"\(0010,|\(0008,0050\)|\(0008,0090\)|\(0008,1050\)|\(0008,1060\)|\(0008,1070\)|\(0008,0081\)"
    r"|Patient|Accession|Physician|Operator|Birth",
    re.IGNORECASE,
)
FOREIGN_REDACTED = "[third-party line with patient data removed]"


class _ForeignRecordScrubber(logging.Filter):
    """pynetdicom logs whole datasets at debug level (names, IDs). Drop those lines' PHI content.

    Its DIMSE/dataset dumps print elements as ``(0010,0010) PN [Name]`` or ``Patient's Name``; every
    line of a foreign record that mentions a patient-module element is replaced, the other lines
    (UIDs, transfer syntaxes, status codes, which are what one debugs with) are kept.
    Our own structlog events arrive here too (``msg`` is their already-scrubbed event dict) and pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, dict):  # a structlog event: scrub_phi already ran on it
            return True
        try:
            msg = record.getMessage()
        except Exception:  # a malformed third-party record must never break logging
            msg = f"[unformattable third-party record from {record.name}]"
        if _FOREIGN_PHI.search(msg):
            msg = "\n".join(FOREIGN_REDACTED if _FOREIGN_PHI.search(ln) else ln for ln in msg.splitlines())
        record.msg = msg
        record.args = ()
        return True


def _default_stage(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """Every line carries ``stage``; a foreign record's is the top package of its logger (pynetdicom)."""
    if "stage" not in event_dict:
        record = event_dict.get("_record")
        name = getattr(record, "name", None) or event_dict.get("logger") or "glowtriage"
        event_dict["stage"] = str(name).split(".")[0]
    return event_dict


_configured = False


class _StdHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stdout (or sys.stderr) is *now*, not to the object it was when the
    handler was made: test runners and daemons that redirect the streams get the lines too."""

    def __init__(self, use_stderr: bool = False):
        self._use_stderr = use_stderr
        self._override: TextIO | None = None
        self._ready = False
        super().__init__()
        self._ready = True

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        if self._override is not None:
            return self._override
        return sys.stderr if self._use_stderr else sys.stdout

    @stream.setter
    def stream(self, value: TextIO) -> None:
        if self._ready:  # an explicit setStream() wins; the constructor's default does not
            self._override = value


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog and route stdlib logging (pynetdicom, apscheduler) through the same chain.

    ``stream`` defaults to stdout (journald); commands whose stdout is data (`triage score --json`)
    log to stderr instead.
    """
    global _configured
    out = stream or sys.stdout
    lvl = getattr(logging, level.upper())
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _default_stage,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        scrub_phi,
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False) if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler: logging.Handler = (
        _StdHandler(stream is sys.stderr) if stream in (None, sys.stderr) else logging.StreamHandler(out)
    )
    handler.setFormatter(formatter)
    handler.addFilter(_ForeignRecordScrubber())
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_glowtriage", False):
            root.removeHandler(h)
    handler._glowtriage = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(lvl)
    # pynetdicom is very chatty at debug; keep it one level quieter than ours unless debugging it.
    logging.getLogger("pynetdicom").setLevel(max(lvl, logging.INFO))
    _configured = True


def get_logger(stage: str) -> structlog.stdlib.BoundLogger:
    """A logger bound to a pipeline stage (receive, store, assemble, score, report, send, ...)."""
    # Lazy (no .bind()): a module-level logger made before configure() must follow configure().
    return structlog.get_logger("glowtriage", stage=stage)
