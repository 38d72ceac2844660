"""The receiver's File Meta fast path writes exactly the bytes pydicom writes for pynetdicom's call.

``triage.receive.reactor`` stands in for pynetdicom's ``create_file_meta`` and pydicom's
``write_file_meta_info`` on the receiver's DUL threads (issue 15: a tenth of the CPU per instance);
a byte of difference would change every received file's header, so each case is compared with the
stock functions, and anything the fast path does not cover must fall through to them.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_file_meta_info
from pynetdicom.dsutils import create_file_meta

from triage.receive import reactor


def _stock(**kw: str) -> bytes:
    buf = DicomBytesIO()
    reactor._STOCK_WRITE_FILE_META_INFO(buf, create_file_meta(**kw))
    return buf.getvalue()


def _fast(**kw: str) -> bytes:
    """Through the stand-ins, on a thread marked the way receive_into() marks a DUL thread."""
    out: list[bytes] = []

    def run() -> None:
        buf = DicomBytesIO()
        meta = reactor._create_file_meta(**kw)
        assert isinstance(meta, reactor.FastFileMeta)
        reactor._write_file_meta_info(buf, meta)
        out.append(buf.getvalue())

    t = threading.Thread(target=run)
    setattr(t, reactor._TMP_DIR_ATTR, "/nonexistent")
    t.start()
    t.join()
    return out[0]


CASES = [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", "1.2.840.10008.1.2.1"),  # even, even, odd
    ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4", "1.2.840.10008.1.2"),  # odd lengths
    ("1.2.840.10008.5.1.4.1.1.7", "1." + "2" * 62, "1.2.840.10008.1.2.4.90"),  # a 64-character UID
]


@pytest.mark.parametrize(("sop_class", "sop", "ts"), CASES)
def test_fast_file_meta_is_byte_identical(sop_class: str, sop: str, ts: str, tmp_path: Path) -> None:
    kw = {"sop_class_uid": sop_class, "sop_instance_uid": sop, "transfer_syntax": ts}
    assert _fast(**kw) == _stock(**kw)
    (tmp_path / "m.dcm").write_bytes(b"\0" * 128 + b"DICM" + _fast(**kw))
    meta = read_file_meta_info(tmp_path / "m.dcm")
    assert (meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID) == (sop, ts)


def test_the_same_with_another_implementation_name() -> None:
    kw = {"sop_class_uid": "1.2.3", "sop_instance_uid": "1.2.3.4", "transfer_syntax": "1.2.840.10008.1.2.1",
          "implementation_uid": "1.2.826.0.1.3680043.10.1", "implementation_version": "GLOW_1"}
    assert _fast(**kw) == _stock(**kw)


def test_other_threads_and_odd_values_get_pydicom() -> None:
    kw = {"sop_class_uid": "1.2.3", "sop_instance_uid": "1.2.3.4", "transfer_syntax": "1.2.840.10008.1.2.1"}
    assert not isinstance(reactor._create_file_meta(**kw), reactor.FastFileMeta)  # this thread: unmarked
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(reactor._create_file_meta(
        sop_class_uid="1.2.3", sop_instance_uid="1.2.3.4\\5", transfer_syntax="1.2.840.10008.1.2.1")))
    setattr(t, reactor._TMP_DIR_ATTR, "/nonexistent")
    t.start()
    t.join()
    assert not isinstance(out[0], reactor.FastFileMeta)  # a backslash: pydicom's to judge
