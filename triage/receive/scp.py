"""The DICOM listener: C-ECHO and C-STORE into the store, with allow-lists and optional TLS.

Why it is built this way:

* **Durable before success.** A PACS forgets an instance once it gets 0x0000, so the handler answers
  only after :meth:`Store.adopt_instance` has the file fsync'd, renamed, the directory fsync'd and
  the row committed. Concurrent associations may share one database commit (group commit), but no
  instance is answered before the commit holding its own row is on disk.
* **Bytes as they arrived.** The dataset is never decoded and re-encoded: pynetdicom's chunked
  receive (``_config.STORE_RECV_CHUNKED_DATASET``) streams each dataset into a Part-10 file under
  the store's ``tmp/`` (we point :data:`tempfile.tempdir` there, so the spool is on the same
  filesystem and moving the file is a rename, not a copy). Memory stays flat however large the
  instance or however many associations run, at the price that the bytes transit ``tmp/`` before we
  decide: the ``min_free_mb`` reserve is what keeps that transit from ever filling the disk.
* **Know what you store.** Before success, the dataset's structure is walked to its end (so a
  truncated instance is refused, not spooled) and only the header elements the pipeline needs are
  parsed. A bad instance is quarantined with its reason and answered with a failure status; the
  association and the listener carry on.
* **Fast on loopback.** pynetdicom does not set ``TCP_NODELAY``; without it every C-STORE-RSP can sit
  behind Nagle's algorithm and the peer's delayed ACK (40 ms on Linux). Our server sets it on every
  accepted socket, drops pynetdicom's per-message debug formatting handlers, and (on pynetdicom
  3.0.x) replaces its 1 ms polling loops with event-driven ones (see ``_EventDrivenDUL``;
  ``GLOWTRIAGE_STOCK_PYNETDICOM=1`` in the environment turns that off, for comparison or doubt).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import mmap
import os
import queue
import select
import shutil
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pynetdicom
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dul import LOGGER as _DUL_LOGGER
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from triage.config import Config, ConfigError, load
from triage.ops.logs import configure, get_logger
from triage.ops.metrics import METRICS
from triage.store.db import Store
from triage.store.part10 import LONG_VRS, dataset_offset
from triage.store.schema import StoreError

log = get_logger("receive")

VERIFICATION = "1.2.840.10008.1.1"

# Storage SOP classes we accept (PS3.4 B.5). Anything else is refused at association negotiation.
STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.1.2": "Digital Mammography X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "Digital Mammography X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
}

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
TRANSFER_SYNTAXES: list[str] = [
    EXPLICIT_LE,
    IMPLICIT_LE,
    DEFLATED_LE,
    EXPLICIT_BE,
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1 (Process 14, selection value 1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]

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


class ReceiverError(Exception):
    """The listener cannot start (port taken, certificate unreadable); the message says which key."""


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


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


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


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    # (0000,0902) Error Comment is LO: 64 characters, no backslash.
    ds.ErrorComment = comment.replace("\\", "/").encode("ascii", "replace").decode("ascii")[:64]
    return ds


# ------------------------------------------------------------------ event-driven pynetdicom loops
# pynetdicom 3.0 runs two polling loops per association: the DUL thread sleeps 1 ms whenever it
# found nothing to do, and the association reactor sleeps 1 ms on every turn before it looks for a
# received DIMSE message (dul.py itself carries "TODO: try and make this event based"). For a
# C-STORE that means up to three 1 ms waits per instance, and with several associations the
# threads' wake-ups compete for the GIL with the work. These subclasses keep pynetdicom's logic
# line for line and only replace the sleeps: the DUL waits in select() on its socket and on a pipe
# that send_pdu() writes to, the reactor blocks on the DIMSE message queue. They are swapped in
# (``__class__``) on acceptor associations before their threads start, and only on the pynetdicom
# series they were written against; any other version runs stock.
_ACCEL_VERSIONS = ("3.0.",)
_DUL_IDLE_S = 0.05  # select() timeout: bounds how late ARTIM/kill checks run on a silent connection
_REACTOR_IDLE_S = 0.005  # queue wait: bounds how late a release/abort request is noticed


class _Waker:
    """A self-pipe that wakes a DUL thread blocked in select().

    Closed exactly once, under a lock: a closed fd number is soon reused by another file, and a
    late wake-up written to it would land in that file.
    """

    def __init__(self) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self.fds: tuple[int, int] | None = (r, w)
        self.lock = threading.Lock()

    def wake(self) -> None:
        with self.lock:
            if self.fds is not None:
                with contextlib.suppress(OSError):  # full pipe: a wake-up is already pending
                    os.write(self.fds[1], b"\0")

    def drain(self) -> None:
        fds = self.fds
        if fds is not None:
            with contextlib.suppress(OSError):
                os.read(fds[0], 4096)

    def close(self) -> None:
        with self.lock:
            fds, self.fds = self.fds, None
        for fd in fds or ():
            with contextlib.suppress(OSError):
                os.close(fd)


class _EventDrivenDUL(DULServiceProvider):
    _waker: _Waker

    def _wake(self) -> None:
        self._waker.wake()

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
        return bool(super().stop_dul())

    def _wait(self) -> None:
        sock = self.socket.socket if self.socket is not None else None
        if sock is None:
            time.sleep(self._run_loop_delay)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        fds = self._waker.fds  # only this thread closes it, so it stays open during the wait
        if fds is None:
            time.sleep(self._run_loop_delay)
            return
        try:
            ready, _, _ = select.select([sock, fds[0]], [], [], _DUL_IDLE_S)
        except (OSError, ValueError):  # socket closed under us: let the state machine see it
            time.sleep(self._run_loop_delay)
            return
        if fds[0] in ready:
            self._waker.drain()

    def run_reactor(self) -> None:  # pynetdicom 3.0 DULServiceProvider.run_reactor, sleep -> _wait
        try:
            self._idle_timer.start()
            sleep = False
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    sleep = True
                if sleep:
                    self._wait()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    _DUL_LOGGER.error("Exception in DUL.run(), aborting association")
                    _DUL_LOGGER.exception(exc)
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    sleep = True
                    continue
                self.state_machine.do_action(event)
                sleep = False
        finally:
            self._waker.close()


class _EventDrivenAssociation(Association):
    def _run_reactor(self) -> None:  # pynetdicom 3.0 Association._run_reactor, sleep -> queue wait
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=_REACTOR_IDLE_S)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def _accelerate(assoc: Association) -> bool:
    """Swap in the event-driven loops on a not-yet-started acceptor association (see above)."""
    if not pynetdicom.__version__.startswith(_ACCEL_VERSIONS) or assoc.is_alive() or assoc.dul.is_alive():
        return False
    if type(assoc) is not Association or type(assoc.dul) is not DULServiceProvider:
        return False
    waker = _Waker()
    assoc.dul._waker = waker  # type: ignore[attr-defined]
    weakref.finalize(assoc.dul, waker.close)  # if the DUL thread never runs, its pipe still closes
    assoc.dul.__class__ = _EventDrivenDUL
    # Thread bound its target to the stock run_reactor in __init__; point it at ours.
    assoc.dul._target = make_target(assoc.dul.run_reactor)  # type: ignore[attr-defined]
    assoc.__class__ = _EventDrivenAssociation  # its run_reactor looks _run_reactor up at call time
    return True


# ------------------------------------------------------------------------------------- server
class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server plus TCP_NODELAY and a TLS handshake off the accept thread.

    pynetdicom wraps TLS inside ``get_request``, i.e. on the single accept thread, so one peer that
    opens a connection and never finishes the handshake would stall every other peer; here the
    handshake runs in the connection's own thread with the ACSE timeout.
    """

    daemon_threads = True
    glow_tls: ssl.SSLContext | None = None
    glow_handshake_timeout: float = 30.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.glow_tls is not None:
            try:
                request.settimeout(self.glow_handshake_timeout)
                request = self.glow_tls.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (OSError, ValueError) as exc:
                log.warning("tls_handshake_failed", peer=str(client_address[0]), reason=str(exc))
                with contextlib.suppress(OSError):
                    request.close()
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints tracebacks to stderr; route them through our logs instead.
        log.error("connection_error", peer=str(client_address[0]), exc_info=True)


@dataclass
class _AssocStats:
    calling_aet: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    bytes: int = 0
    handler_s: float = 0.0  # time spent in our C-STORE handler (the rest is network and pynetdicom)


class Receiver:
    """pynetdicom AE built from ``Config`` + ``Store``; ``start()`` listens, ``stop()`` closes."""

    def __init__(self, cfg: Config, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        d = cfg.settings.dicom
        self._d = d
        self._reserve = cfg.settings.storage.min_free_mb * 1024 * 1024
        self._networks = [ipaddress.ip_network(p, strict=False) for p in d.allowed_peers]
        self._aets = {a.strip() for a in d.allowed_calling_aets}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._prev_globals: tuple[bool, str, str | None] | None = None
        self._lock = threading.Lock()
        self._last_sweep = time.monotonic()
        self._free, self._free_at = 0, -1e9
        self.counts: dict[str, int] = {"stored": 0, "duplicates": 0, "refused": 0, "out_of_resources": 0,
                                       "errors": 0, "rejected_associations": 0}
        self._accelerate = os.environ.get("GLOWTRIAGE_STOCK_PYNETDICOM", "") != "1"
        self.ae = self._build_ae()

    # -------------------------------------------------------------------------------- setup
    def _build_ae(self) -> AE:
        d = self._d
        ae = AE(ae_title=d.ae_title)
        ae.maximum_associations = d.max_associations
        ae.acse_timeout = d.acse_timeout
        ae.dimse_timeout = d.dimse_timeout
        ae.network_timeout = d.network_timeout
        ae.maximum_pdu_size = d.maximum_pdu_size
        # Our EVT_REQUESTED handler checks these first so it can log why; pynetdicom's own checks
        # stay on as a second line.
        ae.require_called_aet = d.require_called_aet
        ae.require_calling_aet = sorted(self._aets)
        for uid in STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION, [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE])
        return ae

    def _tls_context(self) -> ssl.SSLContext | None:
        t = self._d.tls
        if not t.enabled:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        cert, key = self.cfg.path(t.cert_file), self.cfg.path(t.key_file)
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ReceiverError(
                f"dicom.tls.cert_file / key_file: cannot load {cert} with {key}: {exc}"
            ) from exc
        if t.ca_file:
            ca = self.cfg.path(t.ca_file)
            try:
                ctx.load_verify_locations(cafile=str(ca))
            except (OSError, ssl.SSLError) as exc:
                raise ReceiverError(f"dicom.tls.ca_file: cannot load {ca}: {exc}") from exc
            ctx.verify_mode = ssl.CERT_REQUIRED if t.require_client_cert else ssl.CERT_OPTIONAL
        return ctx

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("receiver is not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self, block: bool = False) -> None:
        """Bind and listen. ``block=True`` serves in this thread until :meth:`stop` (from another)."""
        if self._server is not None:
            raise RuntimeError("receiver already started")
        tls = self._tls_context()
        # Process-wide pynetdicom switches: stream datasets to tmp/, skip per-message debug dumps.
        # stop() puts them back.
        self._prev_globals = (_config.STORE_RECV_CHUNKED_DATASET, _config.LOG_HANDLER_LEVEL, tempfile.tempdir)
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_HANDLER_LEVEL = "none"
        tempfile.tempdir = str(self.store.tmp)
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_ended, ["released"]),
            (evt.EVT_ABORTED, self._on_ended, ["aborted"]),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
        ]
        try:
            server = self.ae.make_server(
                (self._d.host, self._d.port), ae_title=self._d.ae_title, evt_handlers=handlers,
                server_class=_Server,
            )
        except OSError as exc:
            self._restore_globals()
            raise ReceiverError(
                f"dicom.host/dicom.port: cannot listen on {self._d.host}:{self._d.port}: "
                f"{exc.strerror or exc}"
            ) from exc
        server.glow_tls = tls
        server.glow_handshake_timeout = self._d.acse_timeout
        self.ae._servers.append(server)
        self._server = server
        host, port = self.address
        log.info(
            "listening", host=host, port=port, ae_title=self._d.ae_title, tls=server.glow_tls is not None,
            allowed_calling_aets=sorted(self._aets), allowed_peers=[str(n) for n in self._networks],
        )
        if block:
            server.serve_forever()
            return
        self._thread = threading.Thread(target=server.serve_forever, name="dicom-accept", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let running associations finish for ``grace_s``, then abort the rest."""
        server = self._server
        if server is None:
            return
        server.shutdown()  # stops serve_forever, closes the listening socket
        deadline = time.monotonic() + grace_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in server.active_associations:
            assoc.abort()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._server = None
        self._restore_globals()
        log.info("stopped", **self.counts)

    def _restore_globals(self) -> None:
        if self._prev_globals is not None:
            chunked, handler_level, tempdir = self._prev_globals
            _config.STORE_RECV_CHUNKED_DATASET = chunked
            _config.LOG_HANDLER_LEVEL = handler_level
            tempfile.tempdir = tempdir
            self._prev_globals = None

    # --------------------------------------------------------------------------- association
    def _peer_allowed(self, address: str) -> bool:
        if not self._networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._networks)

    def _on_conn_open(self, event: evt.Event) -> None:
        # Runs in the connection's thread before the association's threads start.
        if self._accelerate:
            _accelerate(event.assoc)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = _text(getattr(rq, "calling_ae_title", ""))
        called = _text(getattr(rq, "called_ae_title", ""))
        peer = str(assoc.requestor.address)
        reason = ""
        diagnostic = 0x01
        if not self._peer_allowed(peer):
            # Same answer dcm4chee gives for a known AE at an unknown address: the requestor, as
            # identified by title and address, is not recognised.
            reason, diagnostic = f"peer address {peer} is not in dicom.allowed_peers", 0x03
        elif self._aets and calling not in self._aets:
            reason, diagnostic = f"calling AE title {calling!r} is not in dicom.allowed_calling_aets", 0x03
        elif self._d.require_called_aet and called != self._d.ae_title:
            reason, diagnostic = f"called AE title {called!r} is not ours ({self._d.ae_title!r})", 0x07
        if not reason:
            return
        with self._lock:
            self.counts["rejected_associations"] += 1
        outcome = ("rejected_peer" if "allowed_peers" in reason else
                   "rejected_calling_ae" if "allowed_calling_aets" in reason else "rejected_called_ae")
        METRICS.association(calling, outcome)
        log.warning("association_rejected", peer=peer, calling_aet=calling, called_aet=called, reason=reason,
                    result="rejected-permanent", source="service-user", diagnostic=diagnostic)
        assoc._glow_rejected = True  # type: ignore[attr-defined]  # logged here, not in _on_rejected
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        assoc.kill()

    def _on_rejected(self, event: evt.Event) -> None:
        """pynetdicom's own rejections (too many associations, bad user identity...)."""
        assoc = event.assoc
        if getattr(assoc, "_glow_rejected", False):
            return
        prim = assoc.acceptor.primitive
        rsd = (getattr(prim, "result", None), getattr(prim, "result_source", None),
               getattr(prim, "diagnostic", None))
        if rsd == (0x02, 0x03, 0x02):
            reason = f"too many associations (dicom.max_associations = {self._d.max_associations})"
        else:
            reason = f"rejected by pynetdicom, (result, source, diagnostic) = {rsd}"
        with self._lock:
            self.counts["rejected_associations"] += 1
        busy = rsd == (0x02, 0x03, 0x02)
        METRICS.association(_text(assoc.requestor.ae_title), "rejected_busy" if busy else "rejected_other")
        log.warning("association_rejected", peer=str(assoc.requestor.address),
                    calling_aet=_text(assoc.requestor.ae_title), reason=reason)

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        stats = _AssocStats(calling_aet=_text(assoc.requestor.ae_title), peer=str(assoc.requestor.address))
        assoc._glow_stats = stats  # type: ignore[attr-defined]
        METRICS.association_opened()
        log.info("association_accepted", peer=stats.peer, calling_aet=stats.calling_aet,
                 contexts=len(assoc.accepted_contexts))

    def _on_ended(self, event: evt.Event, how: str) -> None:
        stats: _AssocStats | None = getattr(event.assoc, "_glow_stats", None)
        if stats is not None:
            METRICS.association_closed()
            METRICS.association(stats.calling_aet, how)
            log.info(
                f"association_{how}", peer=stats.peer, calling_aet=stats.calling_aet, stored=stats.stored,
                duplicates=stats.duplicates, refused=stats.refused, bytes=stats.bytes,
                seconds=round(time.monotonic() - stats.started, 3), handler_seconds=round(stats.handler_s, 3),
            )
        self._maybe_sweep()

    def _maybe_sweep(self) -> None:
        """Delete tmp/ files of dead transfers (an aborted association leaves its partial file)."""
        now = time.monotonic()
        if now - self._last_sweep < 60.0:
            return
        self._last_sweep = now
        idle = self._d.network_timeout + self._d.dimse_timeout + 60.0  # a live transfer writes more often
        removed = self.store.sweep_tmp(older_than_s=idle)
        if removed:
            log.info("tmp_swept", removed=removed)

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    # ------------------------------------------------------------------------------- C-STORE
    def _materialize(self, event: evt.Event) -> Path:
        """A Part-10 file of the received bytes under tmp/, owned by us from here on."""
        dst = self.store.new_tmp_path()
        src: Path | None = None
        with contextlib.suppress(AttributeError):
            src = event.dataset_path
        if src is not None:
            # pynetdicom deletes its own name after the handler; a second link keeps the inode.
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
            return dst
        with open(dst, "wb") as f:  # memory mode (if someone turns chunked receiving off)
            f.write(event.encoded_dataset(include_meta=True))
        return dst

    def _free_bytes(self) -> int:
        """Free space, re-read at most every 0.5 s (the reserve is far larger than what arrives in
        that time, and a statvfs per instance is measurable at hundreds of instances a second)."""
        now = time.monotonic()
        if now - self._free_at > 0.5:
            self._free, self._free_at = self.store.free_bytes(), now
        return self._free

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def _on_store(self, event: evt.Event) -> int | Dataset:
        t0 = time.perf_counter()
        try:
            return self._store(event)
        finally:
            stats: _AssocStats | None = getattr(event.assoc, "_glow_stats", None)
            if stats is not None:
                stats.handler_s += time.perf_counter() - t0

    def _store(self, event: evt.Event) -> int | Dataset:
        req = event.request
        sop_class = _text(req.AffectedSOPClassUID)
        sop_uid = _text(req.AffectedSOPInstanceUID)
        ts = str(event.context.transfer_syntax)
        stats: _AssocStats | None = getattr(event.assoc, "_glow_stats", None)
        calling = stats.calling_aet if stats else _text(event.assoc.requestor.ae_title)
        ctx = {"sop_instance_uid": sop_uid, "sop_class_uid": sop_class, "calling_aet": calling,
               "transfer_syntax": ts}
        tmp: Path | None = None
        try:
            free = self._free_bytes()
            if free < self._reserve:
                self._count("out_of_resources")
                METRICS.instance_rejected("out_of_resources")
                reserve_mb = self._reserve // (1024 * 1024)
                log.error("out_of_resources", **ctx, free_mb=free // (1024 * 1024),
                          reason=f"free space below storage.min_free_mb ({reserve_mb} MB)")
                return _status(OUT_OF_RESOURCES, "storage below its free-space reserve (min_free_mb)")
            tmp = self._materialize(event)
            try:
                info = inspect_instance(tmp, ts, sop_class, sop_uid)
                self.store.instance_path(info.study_uid, info.series_uid, info.sop_uid)  # UID safety
            except (BadInstance, StoreError) as exc:
                status = exc.status if isinstance(exc, BadInstance) else MISSING_UID
                reason = exc.reason if isinstance(exc, BadInstance) else str(exc)
                comment = exc.comment if isinstance(exc, BadInstance) else "a UID is not usable"
                where = self.store.quarantine_file(tmp, reason, calling, sop_uid or "unknown")
                tmp = None
                self._count("refused")
                METRICS.instance_rejected(reason)
                if stats:
                    stats.refused += 1
                log.warning("instance_refused", **ctx, status=f"0x{status:04X}", reason=reason,
                            quarantine=where.name)
                return _status(status, comment)
            for w in info.warnings:
                log.warning("instance_warning", **ctx, study_uid=info.study_uid, reason=w)
            result = self.store.adopt_instance(
                tmp, info.sop_uid, info.study_uid, info.series_uid, sop_class, ts, calling, info.modality
            )
            tmp = None
            if result.duplicate:
                self._count("duplicates")
            else:
                self._count("stored")
                METRICS.instance_received(result.size)
            if stats:
                stats.stored += 0 if result.duplicate else 1
                stats.duplicates += 1 if result.duplicate else 0
                stats.bytes += result.size
            log.debug("instance_stored", **ctx, study_uid=info.study_uid, series_uid=info.series_uid,
                      duplicate=result.duplicate, replaced=result.replaced, reopened=result.reopened)
            return SUCCESS
        except Exception as exc:  # never let one instance take the listener down
            self._count("errors")
            METRICS.instance_rejected("internal_error")
            disk_full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
            reason = f"{type(exc).__name__}: {exc}"
            where = None
            if tmp is not None and tmp.exists() and not disk_full:
                try:  # keep the bytes for a human: they were received complete
                    where = self.store.quarantine_file(tmp, f"internal error: {reason}", calling,
                                                       sop_uid or "unknown")
                    tmp = None
                except Exception as qexc:
                    log.error("quarantine_failed", **ctx, reason=f"{type(qexc).__name__}: {qexc}")
            log.error("store_failed", **ctx, reason=reason, quarantine=where.name if where else None,
                      exc_info=True)
            if disk_full:
                return _status(OUT_OF_RESOURCES_WRITE, "disk full while storing")
            if isinstance(exc, OSError):
                return _status(INTERNAL_ERROR, f"storage error: {exc.strerror or type(exc).__name__}")
            return _status(INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ entry
def serve_receiver(cfg: Config) -> None:
    """Open the store, recover, listen, and block until SIGTERM/SIGINT (used by ``triage serve``)."""
    configure(cfg.settings.logging.level, cfg.settings.logging.format)
    store = Store(cfg.storage_root)
    try:
        store.recover()
        receiver = Receiver(cfg, store)
        stop = threading.Event()

        def _on_signal(signum: int, _frame: Any) -> None:
            log.info("signal", signal=signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        try:
            receiver.start(block=False)
        except ReceiverError as exc:
            log.error("receiver_failed", reason=str(exc))
            raise
        while not stop.wait(1.0):
            pass
        receiver.stop()
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triage.receive.scp", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config.toml (default: $GLOWTRIAGE_CONFIG or embedded defaults)")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return 2
    try:
        serve_receiver(cfg)
    except ReceiverError as exc:
        print(f"{args.config or 'config'}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
