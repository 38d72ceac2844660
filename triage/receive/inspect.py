"""Is a received instance storable? A walk over its Part-10 bytes, and the statuses we answer.

Why before success: a PACS forgets an instance once it gets 0x0000, so a truncated or malformed
dataset must be refused (and quarantined with its reason) while the sender still has it. The walk
never decodes values: it checks that every element's length fits, reads the few top-level values
the store indexes, and proves the dataset agrees with the C-STORE command that carried it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydicom.charset import python_encoding

from triage.store.structure import (  # noqa: F401  (the transfer syntaxes: re-exported for scp)
    DEFLATED_LE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    Malformed,
    check_file,
)
from triage.store.structure import check_structure as _check_structure

# C-STORE statuses we answer (PS3.4 B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # below the disk reserve: nothing stored
OUT_OF_RESOURCES_WRITE = 0xA701  # the disk refused the write (ENOSPC, EDQUOT)
DATASET_MISMATCH = 0xA900  # dataset's SOP Class/Instance UID differ from the C-STORE command's
CANNOT_UNDERSTAND = 0xC000  # dataset undecodable: truncated, malformed
MISSING_UID = 0xC001  # a UID the pipeline needs is absent or unusable
INTERNAL_ERROR = 0xC211  # unexpected error in our handler (pynetdicom uses 0xC211 for the same)


class BadInstance(Exception):
    """An instance we refuse: the status it deserves and a reason a human can act on."""

    def __init__(self, status: int, reason: str, comment: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason  # logged and kept beside the quarantined file
        self.comment = comment or reason  # the response's Error Comment: at most 64 characters


@dataclass(frozen=True)
class InstanceInfo:
    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str
    warnings: tuple[str, ...] = ()


def check_structure(data: memoryview, transfer_syntax: str) -> dict[str, list[str]]:
    """:func:`triage.store.structure.check_structure`, a failure as :class:`BadInstance` (0xC000)."""
    try:
        return _check_structure(data, transfer_syntax)
    except Malformed as exc:
        raise BadInstance(CANNOT_UNDERSTAND, exc.reason, exc.comment) from None


def inspect_instance(path: Path, transfer_syntax: str, sop_class_uid: str, sop_uid: str) -> InstanceInfo:
    """Check a received Part-10 file and read the few header values the pipeline indexes.

    ``sop_class_uid``/``sop_uid`` are the C-STORE command's Affected SOP Class/Instance UIDs; the
    dataset must agree with them (PS3.4 B.2.3: "Data Set does not match SOP Class" otherwise).
    """
    try:
        values = check_file(path, transfer_syntax)
    except Malformed as exc:
        raise BadInstance(CANNOT_UNDERSTAND, exc.reason, exc.comment) from None

    def first(kw: str) -> str:
        return (values.get(kw) or [""])[0]

    for kw, tag in (("SOPClassUID", "0008,0016"), ("SOPInstanceUID", "0008,0018"),
                    ("StudyInstanceUID", "0020,000D"), ("SeriesInstanceUID", "0020,000E")):
        if not first(kw):
            raise BadInstance(MISSING_UID, f"dataset has no {kw} ({tag})")
    if first("SOPClassUID") != sop_class_uid:
        raise BadInstance(
            DATASET_MISMATCH,
            f"SOPClassUID {first('SOPClassUID')} in the dataset differs from Affected SOP Class UID "
            f"{sop_class_uid} of the C-STORE",
            "SOPClassUID differs from Affected SOP Class UID",
        )
    if first("SOPInstanceUID") != sop_uid:
        raise BadInstance(
            DATASET_MISMATCH,
            f"SOPInstanceUID {first('SOPInstanceUID')} in the dataset differs from Affected SOP Instance "
            f"UID {sop_uid} of the C-STORE",
            "SOPInstanceUID differs from Affected SOP Instance UID",
        )
    warnings: list[str] = []
    unknown = [t for t in values.get("SpecificCharacterSet", []) if t and t not in python_encoding]
    if unknown:
        # Text is stored as received and never decoded here, so the instance is still storable;
        # whoever renders its strings later has to know.
        warnings.append(f"unknown SpecificCharacterSet {', '.join(unknown)!s}; text kept as received")
    return InstanceInfo(
        sop_class_uid=sop_class_uid,
        sop_uid=sop_uid,
        study_uid=first("StudyInstanceUID"),
        series_uid=first("SeriesInstanceUID"),
        modality=first("Modality"),
        warnings=tuple(warnings),
    )
