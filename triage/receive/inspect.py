"""Is a received instance storable? A walk over its Part-10 bytes, and the statuses we answer.

Why before success: a PACS forgets an instance once it gets 0x0000, so a truncated or malformed
dataset must be refused (and quarantined with its reason) while the sender still has it. The walk
never decodes values: it checks that every element's length fits, reads the few top-level values
the store indexes, and proves the dataset agrees with the C-STORE command that carried it.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydicom.charset import python_encoding

from triage.store.part10 import LONG_VRS, dataset_offset

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

# C-STORE statuses we answer (PS3.4 B.2.3).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # below the disk reserve: nothing stored
OUT_OF_RESOURCES_WRITE = 0xA701  # the disk refused the write (ENOSPC, EDQUOT)
DATASET_MISMATCH = 0xA900  # dataset's SOP Class/Instance UID differ from the C-STORE command's
CANNOT_UNDERSTAND = 0xC000  # dataset undecodable: truncated, malformed
MISSING_UID = 0xC001  # a UID the pipeline needs is absent or unusable
INTERNAL_ERROR = 0xC211  # unexpected error in our handler (pynetdicom uses 0xC211 for the same)

# Top-level elements the store indexes: tag -> keyword.
_INDEX_TAGS: dict[int, str] = {
    0x00080005: "SpecificCharacterSet",
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080060: "Modality",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}



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


# ----------------------------------------------------------------------------- structure check
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 32


class _Walker:
    """Walks element headers to the end of a dataset, reading only the few values we index.

    Why not pydicom here: with ``stop_before_pixels`` it happily parses a header whose Pixel Data is
    cut short, and reading everything would load every value; this walk touches only tags and
    lengths (the file is mmapped, so a 20 MB value costs nothing), proves that every length fits,
    and picks up the top-level values in :data:`_INDEX_TAGS` on the way (all of them ASCII code
    strings or UIDs, so no character-set decoding is involved). It is also several times cheaper
    than a pydicom parse, which matters at hundreds of instances a second.
    """

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.end = len(buf)
        self.values: dict[int, bytes] = {}

    def _tag(self, pos: int, little: bool) -> int:
        g, e = struct.unpack_from("<HH" if little else ">HH", self.buf, pos)
        return (g << 16) | e

    def elements(self, pos: int, implicit: bool, little: bool, in_item: bool, depth: int) -> int:
        if depth > _MAX_DEPTH:
            raise BadInstance(CANNOT_UNDERSTAND, f"sequences nested deeper than {_MAX_DEPTH} at byte {pos}")
        end = self.end
        u32 = "<I" if little else ">I"
        u16 = "<H" if little else ">H"
        while pos < end:
            if pos + 8 > end:
                raise BadInstance(CANNOT_UNDERSTAND, f"truncated: element header at byte {pos} is cut short")
            tag = self._tag(pos, little)
            if tag == _ITEM_DELIM:
                if in_item:
                    return pos + 8
                raise BadInstance(CANNOT_UNDERSTAND, f"item delimiter outside any item at byte {pos}")
            if tag in (_ITEM, _SEQ_DELIM):
                raise BadInstance(CANNOT_UNDERSTAND, f"item tag outside any sequence at byte {pos}")
            vr = b""
            if implicit:
                length = struct.unpack_from(u32, self.buf, pos + 4)[0]
                hdr = 8
            else:
                vr = bytes(self.buf[pos + 4 : pos + 6])
                if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                    raise BadInstance(
                        CANNOT_UNDERSTAND,
                        f"invalid VR {vr!r} for ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {pos}",
                    )
                if vr in LONG_VRS:
                    if pos + 12 > end:
                        raise BadInstance(
                            CANNOT_UNDERSTAND, f"truncated: element header at byte {pos} is cut short"
                        )
                    length = struct.unpack_from(u32, self.buf, pos + 8)[0]
                    hdr = 12
                else:
                    length = struct.unpack_from(u16, self.buf, pos + 6)[0]
                    hdr = 8
            pos += hdr
            if depth == 0 and tag in _INDEX_TAGS and length != _UNDEFINED:
                self.values[tag] = bytes(self.buf[pos : pos + length])
            if length == _UNDEFINED:
                if implicit or vr in (b"SQ", b"UN") or tag == _PIXEL_DATA:
                    # Undefined-length UN holds implicit VR little endian items (PS3.5 6.2.2).
                    nested_implicit = implicit or vr == b"UN"
                    nested_little = little or vr == b"UN"
                    pos = self.items(pos, nested_implicit, nested_little, depth + 1)
                else:
                    raise BadInstance(
                        CANNOT_UNDERSTAND,
                        f"undefined length on VR {vr.decode('ascii', 'replace')} at byte {pos - hdr}",
                    )
            else:
                if pos + length > end:
                    raise BadInstance(
                        CANNOT_UNDERSTAND,
                        f"truncated: ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {pos - hdr} declares "
                        f"{length} bytes, {end - pos} remain",
                        f"truncated: ({tag >> 16:04X},{tag & 0xFFFF:04X}) at byte {pos - hdr} cut short",
                    )
                pos += length
        if in_item:
            raise BadInstance(CANNOT_UNDERSTAND, "truncated: an undefined-length item has no delimiter")
        return pos

    def items(self, pos: int, implicit: bool, little: bool, depth: int) -> int:
        u32 = "<I" if little else ">I"
        while True:
            if pos + 8 > self.end:
                raise BadInstance(
                    CANNOT_UNDERSTAND, "truncated: an undefined-length sequence has no delimiter"
                )
            tag = self._tag(pos, little)
            length = struct.unpack_from(u32, self.buf, pos + 4)[0]
            if tag == _SEQ_DELIM:
                return pos + 8
            if tag != _ITEM:
                raise BadInstance(
                    CANNOT_UNDERSTAND,
                    f"expected an item in a sequence at byte {pos}, "
                    f"found ({tag >> 16:04X},{tag & 0xFFFF:04X})",
                )
            pos += 8
            if length == _UNDEFINED:
                pos = self.elements(pos, implicit, little, True, depth)
            elif pos + length > self.end:
                raise BadInstance(
                    CANNOT_UNDERSTAND,
                    f"truncated: item at byte {pos - 8} declares {length} bytes, {self.end - pos} remain",
                )
            else:
                pos += length


def check_structure(data: memoryview, transfer_syntax: str) -> dict[str, list[str]]:
    """Raise :class:`BadInstance` unless ``data`` (dataset bytes) is complete and well formed.

    Returns the :data:`_INDEX_TAGS` values found at the top level, keyword -> list of values.
    """
    if len(data) == 0:
        raise BadInstance(CANNOT_UNDERSTAND, "empty dataset")
    if len(data) >= 132 and bytes(data[128:132]) == b"DICM":
        raise BadInstance(
            CANNOT_UNDERSTAND,
            "dataset starts with a Part-10 preamble and 'DICM' (the sender sent a file, not a dataset)",
            "dataset starts with a Part-10 preamble (a file, not a dataset)",
        )
    if transfer_syntax == DEFLATED_LE:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            inflated = inflater.decompress(data) + inflater.flush()
        except zlib.error as exc:
            raise BadInstance(CANNOT_UNDERSTAND, f"deflated dataset does not inflate: {exc}") from None
        if not inflater.eof:
            raise BadInstance(CANNOT_UNDERSTAND, "truncated: deflated dataset stream ends early")
        data = memoryview(inflated)
    implicit = transfer_syntax == IMPLICIT_LE
    little = transfer_syntax != EXPLICIT_BE
    walker = _Walker(data)
    walker.elements(0, implicit, little, False, 0)
    return {
        _INDEX_TAGS[tag]: [v.strip(b"\x00 ").decode("latin-1") for v in raw.split(b"\\")]
        for tag, raw in walker.values.items()
    }


def inspect_instance(path: Path, transfer_syntax: str, sop_class_uid: str, sop_uid: str) -> InstanceInfo:
    """Check a received Part-10 file and read the few header values the pipeline indexes.

    ``sop_class_uid``/``sop_uid`` are the C-STORE command's Affected SOP Class/Instance UIDs; the
    dataset must agree with them (PS3.4 B.2.3: "Data Set does not match SOP Class" otherwise).
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise BadInstance(CANNOT_UNDERSTAND, "empty file")
        # Every view is released on the way out, errors included (an exception's traceback keeps
        # them referenced, and an mmap with live exports refuses to close).
        with (
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm,
            memoryview(mm) as view,
            view[dataset_offset(mm) :] as data,
        ):
            values = check_structure(data, transfer_syntax)

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
