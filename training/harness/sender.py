"""A sender that knows which instances were acknowledged: for crash and power-cut tests.

``storescu`` reports per association; a test that kills the receiver mid-association needs to know,
instance by instance, which ones got a success status before the kill (those must survive), so it sends
with pynetdicom and records each 0x0000 the moment it arrives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path


def send_acked(port: int, files: Sequence[Path], on_ack: Callable[[Path], None], *,
               calling_ae: str = "ACKSCU", timeout: float = 10.0) -> None:
    """One association to ``127.0.0.1:port`` sending ``files`` in order; ``on_ack(file)`` for every
    instance answered 0x0000, as its status arrives. Ends quietly when the receiver dies under it or
    after ``timeout`` without an answer (pynetdicom waits out its DIMSE timeout for an answer that never
    comes: crash tests use a short one; an instance it gives up on counts as not acknowledged, as for
    a PACS)."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE

    meta = read_file_meta_info(files[0])
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="GLOWTRIAGE")
    except Exception:  # refused or reset: the receiver is down
        return
    if not assoc.is_established:
        return
    try:
        for f in files:
            try:
                rsp = assoc.send_c_store(f)
            except Exception:  # the receiver was killed under us
                return
            if rsp is not None and int(rsp.get("Status", -1)) == 0:
                on_ack(f)
            if not assoc.is_established:
                return
    finally:
        if assoc.is_established:
            try:
                assoc.release()
            except Exception:
                assoc.abort()
