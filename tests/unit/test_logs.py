"""Logs are JSON lines with a stage, and never carry a patient's name, ID or birth date."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from triage.ops.logs import FOREIGN_REDACTED, REDACTED, configure, get_logger, scrub_phi

NAME, PID, DOB = "Doe^Jane", "MRN-4711-0815", "19620417"


def _capture_into(buffer: io.StringIO) -> None:
    """Point the handler configure() installed at ``buffer`` (it holds the stdout of its time)."""
    handlers = [h for h in logging.getLogger().handlers if getattr(h, "_glowtriage", False)]
    assert len(handlers) == 1
    handlers[0].setStream(buffer)  # type: ignore[attr-defined]


@pytest.fixture
def json_logs() -> Iterator[Any]:
    """configure(json), output captured; the fixture returns a function giving the parsed lines so far."""
    buffer = io.StringIO()
    configure("debug", "json")
    _capture_into(buffer)
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG)

    def lines() -> list[dict[str, Any]]:
        out = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        lines.raw = out  # type: ignore[attr-defined]
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    lines.buffer = buffer  # type: ignore[attr-defined]
    yield lines
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_glowtriage", False):
            root.removeHandler(handler)
    structlog.reset_defaults()


def test_top_level_phi_keys_are_redacted(json_logs: Any) -> None:
    get_logger("receive").info(
        "instance_stored", PatientName=NAME, patient_id=PID, PatientBirthDate=DOB, study_uid="1.2.3.4"
    )
    (event,) = json_logs()
    assert NAME not in json_logs.raw and PID not in json_logs.raw and DOB not in json_logs.raw
    assert event["PatientName"] == event["patient_id"] == event["PatientBirthDate"] == REDACTED
    assert event["study_uid"] == "1.2.3.4"
    assert event["stage"] == "receive" and event["event"] == "instance_stored" and event["level"] == "info"


def test_nested_phi_is_redacted(json_logs: Any) -> None:
    get_logger("assemble").warning(
        "series_rejected",
        reason="too few slices",
        header={"Patient Name": NAME, "inner": {"patient-id": PID}, "SeriesNumber": 3},
        items=[{"PatientBirthDate": DOB}, ("ok", {"PatientID": PID})],
    )
    (event,) = json_logs()
    for value in (NAME, PID, DOB):
        assert value not in json_logs.raw
    assert event["header"] == {"Patient Name": REDACTED, "inner": {"patient-id": REDACTED}, "SeriesNumber": 3}
    assert event["reason"] == "too few slices"


def test_pydicom_values_are_redacted_whatever_their_key(json_logs: Any) -> None:
    ds = Dataset()
    ds.PatientName = NAME
    ds.PatientID = PID
    get_logger("score").info("scored", who=PersonName(NAME), ds=ds, element=ds["PatientID"])
    (event,) = json_logs()
    assert NAME not in json_logs.raw and PID not in json_logs.raw
    assert event["who"] == event["ds"] == event["element"] == REDACTED


def test_pynetdicom_dataset_dump_lines_are_scrubbed(json_logs: Any) -> None:
    logging.getLogger("pynetdicom.dsutils").debug(
        "(0008,0018) UI [1.2.3.4.5]\n(0010,0010) PN [%s]\n(0010,0020) LO [%s]\n(0020,000D) UI [1.2.3]",
        NAME,
        PID,
    )
    logging.getLogger("pynetdicom.acse").info("Patient's Birth Date: %s", DOB)
    first, second = json_logs()
    for value in (NAME, PID, DOB, "Doe"):
        assert value not in json_logs.raw
    assert first["event"].splitlines() == [
        "(0008,0018) UI [1.2.3.4.5]",
        FOREIGN_REDACTED,
        FOREIGN_REDACTED,
        "(0020,000D) UI [1.2.3]",
    ]
    assert second["event"] == FOREIGN_REDACTED
    assert first["stage"] == second["stage"] == "pynetdicom"
    assert first["logger"] == "pynetdicom.dsutils" and first["level"] == "debug"


def test_foreign_lines_without_phi_pass_unchanged(json_logs: Any) -> None:
    logging.getLogger("pynetdicom.assoc").info("Accepted association request from %s", "10.0.0.5")
    (event,) = json_logs()
    assert event["event"] == "Accepted association request from 10.0.0.5"


def test_our_events_with_phi_keys_are_not_swallowed_by_the_foreign_filter(json_logs: Any) -> None:
    # The foreign-record filter sees our records too; it must not blank a whole event because one
    # of its (already redacted) keys is called patient_*.
    get_logger("report").info("sr_built", patient_id=PID, sop_instance_uid="1.2.3.9")
    (event,) = json_logs()
    assert event["event"] == "sr_built" and event["sop_instance_uid"] == "1.2.3.9"


def test_exceptions_are_rendered_in_the_json_line(json_logs: Any) -> None:
    try:
        raise ValueError("slice 7 missing")
    except ValueError:
        get_logger("assemble").exception("assembly_failed", study_uid="1.2.3")
    (event,) = json_logs()
    assert "ValueError: slice 7 missing" in event["exception"] and event["level"] == "error"


def test_reconfiguring_does_not_duplicate_lines(json_logs: Any) -> None:
    configure("info", "json")
    configure("info", "json")
    _capture_into(json_logs.buffer)
    get_logger("send").info("sent", destination="pacs")
    assert len(json_logs()) == 1


def test_level_filters(json_logs: Any) -> None:
    configure("warning", "json")
    _capture_into(json_logs.buffer)
    get_logger("send").info("quiet")
    get_logger("send").warning("loud")
    assert [e["event"] for e in json_logs()] == ["loud"]


def test_scrub_phi_processor_directly() -> None:
    out = scrub_phi(None, "info", {"event": "x", "MRN": "1", "dob": "2", "Name": "n", "series_uid": "4"})
    assert out == {"event": "x", "MRN": REDACTED, "dob": REDACTED, "Name": REDACTED, "series_uid": "4"}
