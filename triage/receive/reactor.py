"""Event-driven copies of pynetdicom 3.0's two polling loops, swapped in on acceptor associations.

Why a copy at all: pynetdicom 3.0 sleeps 1 ms per idle turn in both the DUL thread and the
association reactor (dul.py carries "TODO: try and make this event based"); at hundreds of
instances a second those waits and the GIL contention of the wake-ups are most of the receive time.
The copies below keep pynetdicom's logic line for line and replace only the sleeps.

The same goes for where pynetdicom streams a received dataset: it creates a ``NamedTemporaryFile``
in the process-wide temp folder, but the receiver wants it under the store's ``tmp/`` (the spool's
filesystem, so adopting the file is a rename). :func:`receive_into` sends one association's files
there without touching :data:`tempfile.tempdir`, so no other library's temp files move.

Why it is guarded: a copy silently overrides any upstream fix. So it is applied only on the
pynetdicom series it was copied from (:data:`ACCEL_VERSIONS`, matching the pin in pyproject.toml),
``GLOWTRIAGE_STOCK_PYNETDICOM=1`` turns it off, and :data:`UPSTREAM_SOURCE_SHA256` records the hash
of every upstream function the copy replaces or relies on: ``tests/unit/test_reactor_pin.py`` fails
when one of them changes, naming the function to re-check here.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import ssl
import struct
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import IO, Any, cast

import pydicom.filewriter as _filewriter
import pynetdicom
import pynetdicom.dimse_messages as _dimse_messages
import pynetdicom.dsutils as _dsutils
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import LOGGER as _DUL_LOGGER
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.utils import make_target

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
ACCEL_VERSIONS = ("3.0.",)
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
        if getattr(self.socket, "glow_prefix", None):  # the gate's request bytes: readable now
            return
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

    def _abort_on_error(self) -> None:
        """pynetdicom's own reaction to an exception in the DUL loop: A-ABORT, association killed."""
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        with contextlib.suppress(Exception):  # the socket may already be gone
            self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True

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
                    _DUL_LOGGER.error(f"Exception in DUL.run(), aborting association: {exc!r}")
                    self._abort_on_error()
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    sleep = True
                    continue
                # Not in the upstream loop: an action that raises on malformed input (e.g. a command
                # set without CommandField in DT-2) killed the DUL thread with an uncaught exception.
                # Answer it like a bad PDU instead: A-ABORT, association over, thread ends cleanly.
                try:
                    self.state_machine.do_action(event)
                except Exception as exc:
                    _DUL_LOGGER.error(f"State machine action failed, aborting association: {exc!r}")
                    self._abort_on_error()
                    return
                sleep = False
        finally:
            self._waker.close()
            # Not upstream: an acceptor whose request never became a primitive (undecodable, aborted)
            # waits in receive_pdu(timeout=acse_timeout) with a max_associations slot; a None tells it
            # at once that no request will come (pynetdicom's own time-out branch then closes it).
            assoc = self.assoc
            if assoc.is_acceptor and getattr(assoc.requestor, "primitive", None) is None:
                self.to_user_queue.put(None)


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


def copy_applies() -> bool:
    """True when the installed pynetdicom is the series the loops were copied from."""
    return pynetdicom.__version__.startswith(ACCEL_VERSIONS)


def accelerate(assoc: Association) -> bool:
    """Swap in the event-driven loops on a not-yet-started acceptor association (see above)."""
    if not copy_applies() or assoc.is_alive() or assoc.dul.is_alive():
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


# ----------------------------------------------------------------- received datasets under tmp/
# pynetdicom 3.0's chunked receive (DIMSEMessage.decode_msg) calls the module-global
# NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm") with no folder, in the DUL thread that
# decodes the association's PDUs. The factory below stands in for that name: it adds dir= only on a
# DUL thread that receive_into() marked, so every other caller (and every other library) gets the
# stock behaviour and the process temp folder stays what it was. Should upstream stop calling it
# this way, files land in the system temp folder and the receiver copies instead of linking:
# slower, never wrong (and the pin test flags the change first).
_TMP_DIR_ATTR = "glow_receive_dir"
_STOCK_NAMED_TEMPORARY_FILE = tempfile.NamedTemporaryFile


class GuardedFile:
    """The received dataset's file, surviving a full disk (ENOSPC, EDQUOT) instead of killing the DUL.

    pynetdicom writes each P-DATA fragment from the DUL thread; an ``OSError`` there aborts the
    association, so the sender gets no status for the instance in flight (nor for the rest). Here the
    first failed write is remembered in :attr:`glow_error`, the file is truncated to give the space
    back at once, and later fragments are dropped; the message completes, and the C-STORE handler
    answers out-of-resources (0xA701) and deletes the partial file, which never reaches the spool.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.name = inner.name
        self.file = self  # pynetdicom calls ``.file.flush()``
        self.glow_error: OSError | None = None

    def _fail(self, exc: OSError) -> None:
        self.glow_error = exc
        with contextlib.suppress(OSError, ValueError):
            os.ftruncate(self._inner.file.fileno(), 0)

    def write(self, data: Any) -> int:
        if self.glow_error is None:
            try:
                return int(self._inner.write(data))
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def flush(self) -> None:
        if self.glow_error is None:
            try:
                self._inner.file.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        try:
            self._inner.close()  # a BufferedWriter closes its raw file even when the last flush fails
        except OSError as exc:
            if self.glow_error is None:
                self.glow_error = exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _named_temporary_file(*args: Any, **kwargs: Any) -> IO[bytes]:
    """``tempfile.NamedTemporaryFile``, in the folder the current DUL thread was given (if any), as a
    :class:`GuardedFile` there."""
    folder = getattr(threading.current_thread(), _TMP_DIR_ATTR, None)
    if kwargs.get("dir") is None and folder is not None:
        kwargs["dir"] = folder
        return cast(IO[bytes], GuardedFile(_STOCK_NAMED_TEMPORARY_FILE(*args, **kwargs)))
    return _STOCK_NAMED_TEMPORARY_FILE(*args, **kwargs)


# pynetdicom 3.0's decode_msg writes each received dataset's File Meta with pydicom:
# ``write_file_meta_info(file, create_file_meta(...))``, both module globals of dimse_messages. That builds
# and validates a FileMetaDataset element by element, about a tenth of the receiver's CPU per instance.
# On a marked DUL thread the two names below write the same bytes directly (seven elements, explicit VR
# little endian; tests/unit/test_receive_filemeta.py compares them with pydicom's); anywhere else, or
# called any other way, they are pydicom's and pynetdicom's own.
_STOCK_CREATE_FILE_META = _dsutils.create_file_meta
_STOCK_WRITE_FILE_META_INFO = _filewriter.write_file_meta_info


class FastFileMeta:
    """The File Meta pynetdicom asks for, as bytes (group 0002 after the preamble and ``DICM``)."""

    def __init__(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                 implementation_uid: str, implementation_version: str) -> None:
        body = b"".join((
            b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01",  # (0002,0001) version 00 01
            _element(0x0002, b"UI", sop_class_uid, b"\x00"),
            _element(0x0003, b"UI", sop_instance_uid, b"\x00"),
            _element(0x0010, b"UI", transfer_syntax, b"\x00"),
            _element(0x0012, b"UI", implementation_uid, b"\x00"),
            _element(0x0013, b"SH", implementation_version, b" "),
        ))
        self.encoded = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(body)) + body


def _element(elem: int, vr: bytes, value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += pad
    return struct.pack("<HH", 0x0002, elem) + vr + struct.pack("<H", len(raw)) + raw


def _fast_meta_ok(*values: Any) -> bool:
    """Plain ASCII strings of at most 64 characters without a backslash: what the fast path encodes
    exactly as pydicom would (anything else goes to pydicom, which validates and warns as it does)."""
    return all(isinstance(v, str) and len(v) <= 64 and v.isascii() and "\\" not in v for v in values)


def _create_file_meta(*, sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any,
                      **kwargs: Any) -> Any:
    """``pynetdicom.dsutils.create_file_meta``, as :class:`FastFileMeta` on a marked DUL thread."""
    impl_uid = kwargs.get("implementation_uid", _dsutils.PYNETDICOM_IMPLEMENTATION_UID)
    impl_version = kwargs.get("implementation_version", _dsutils.PYNETDICOM_IMPLEMENTATION_VERSION)
    if (getattr(threading.current_thread(), _TMP_DIR_ATTR, None) is not None
            and set(kwargs) <= {"implementation_uid", "implementation_version"}
            and _fast_meta_ok(sop_class_uid, sop_instance_uid, transfer_syntax, impl_uid)
            and _fast_meta_ok(impl_version) and len(impl_version) <= 16):
        return FastFileMeta(str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax), str(impl_uid),
                            str(impl_version))
    return _STOCK_CREATE_FILE_META(sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid,
                                   transfer_syntax=transfer_syntax, **kwargs)


def _write_file_meta_info(fp: Any, file_meta: Any, *args: Any, **kwargs: Any) -> None:
    """``pydicom.filewriter.write_file_meta_info``, direct for a :class:`FastFileMeta`."""
    if isinstance(file_meta, FastFileMeta):
        fp.write(file_meta.encoded)
        return
    _STOCK_WRITE_FILE_META_INFO(fp, file_meta, *args, **kwargs)


def receive_error(request: Any) -> OSError | None:
    """The write error of a C-STORE request's received dataset file, if the disk refused it."""
    return getattr(getattr(request, "_dataset_file", None), "glow_error", None)


def receive_into(assoc: Association, folder: Path) -> None:
    """Have pynetdicom write the datasets this (not yet started) association receives under ``folder``."""
    if getattr(_dimse_messages, "NamedTemporaryFile", None) is not _named_temporary_file:
        _dimse_messages.NamedTemporaryFile = _named_temporary_file  # type: ignore[attr-defined]
    if getattr(_dimse_messages, "create_file_meta", None) is _STOCK_CREATE_FILE_META:
        _dimse_messages.create_file_meta = _create_file_meta  # type: ignore[attr-defined]
    if getattr(_dimse_messages, "write_file_meta_info", None) is _STOCK_WRITE_FILE_META_INFO:
        _dimse_messages.write_file_meta_info = _write_file_meta_info  # type: ignore[attr-defined]
    setattr(assoc.dul, _TMP_DIR_ATTR, str(folder))


# ------------------------------------------------------------------------------- upstream pin
# sha256 of inspect.getsource() of each pynetdicom function the code above copies, overrides or
# relies on, as of the version in ACCEL_VERSIONS (3.0.4). tests/unit/test_reactor_pin.py recomputes
# them; when one differs, read the upstream change, port it into the copy, then update the hash.
UPSTREAM_SOURCE_SHA256: dict[str, str] = {
    # copied line for line, sleeps replaced
    "pynetdicom.dul.DULServiceProvider.run_reactor":
        "e3a10eb3a0931e4854af33b9496e92d9679522aca26b0e04da8967559b9e2803",
    "pynetdicom.association.Association._run_reactor":
        "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee",
    # overridden around a super() call (stop_dul's Sta1 branch is mirrored)
    "pynetdicom.dul.DULServiceProvider.send_pdu":
        "7cbce5da8594124e9e70c790a68df640d21df11af4220783e752bc607de8dde6",
    "pynetdicom.dul.DULServiceProvider.kill_dul":
        "5ceccf8dd01c2072c377d18bb1be284941a345bd40f03bd1e03a864ab0817842",
    "pynetdicom.dul.DULServiceProvider.stop_dul":
        "28a7e0be126e7b306369cc1b131daec8e907d21d0f5692930133b6599b8c6e5f",
    # relied on: __init__ binds the thread target accelerate() re-points; run_reactor looks up
    # _run_reactor at call time; decode_msg creates the received dataset's NamedTemporaryFile
    "pynetdicom.dul.DULServiceProvider.__init__":
        "c82dafa9438ddf70685917cb15d2bfbc814aa0ad5233ffb0ae650faedc7570f0",
    "pynetdicom.association.Association.run_reactor":
        "ed8bbbe3b3d6ddaee3e8673ba25b2ab2a4c45f25bc1d8ae7b48ebafd09499e6d",
    "pynetdicom.dimse_messages.DIMSEMessage.decode_msg":
        "f51c777e841a76beeaadfe3015bd4f4a68387229a72f13f3a3b7846d01d72284",
    # FastFileMeta writes what these two would, for decode_msg's one call of them
    "pynetdicom.dsutils.create_file_meta":
        "035ed415f5aeea15543cca3b0b7b2b6d5a3189bc807a0211f5c633bb356ab9e3",
    # GuardedFile: the file reaches the handler as C_STORE._dataset_file and is closed after it
    "pynetdicom.service_class.StorageServiceClass.SCP":
        "63afca7fc6c6e7ee6e6eb303dd6aa72c1e69dbfcb94dd91c9e90ea6d900a4c40",
    # relied on by triage/receive/gate.py and scp.py: the gate replays the A-ASSOCIATE-RQ it read
    # through AssociationSocket.recv/ready (read by _read_pdu_data as 6 header bytes, then the rest);
    # the request handler builds the association and its socket; the server counts acceptor threads
    "pynetdicom.transport.AssociationSocket.recv":
        "6bc20a33b1b7cfe76d4ad4407ca242563bc6206fde4b4e1cf7a2fbb1f11d621d",
    "pynetdicom.transport.AssociationSocket.ready.fget":
        "3eb58e3d39dc076df7a04c804ca183ffd3f4d1b34361039e9e6f11de3d45579c",
    "pynetdicom.dul.DULServiceProvider._read_pdu_data":
        "19f2d4e38c13c83586365d93dd5cd96a0c7c665cb37251054b3e1f246e9f431b",
    "pynetdicom.transport.RequestHandler._create_association":
        "05c8d12b79863cdbdb901ce37187b7030a0434c5cd89d219ed0bedbda679a61e",
    "pynetdicom.transport.RequestHandler.handle":
        "034823fb4df3a87467bd0d45193f0d457fcf59c87fda8e97b2edfb89426f76dd",
}

