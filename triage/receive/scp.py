"""The DICOM listener: C-ECHO and C-STORE into the store, with allow-lists and optional TLS.

Why it is built this way:

* **Durable before success.** A PACS forgets an instance once it gets 0x0000, so the handler answers
  only after :meth:`Store.adopt_instance` has the file renamed into the spool and, at the same time,
  the file fsync'd, the directory fsync'd and the row committed with its log fsync'd. Concurrent
  associations may share one database commit (group commit) and one directory fsync, but no
  instance is answered before its own bytes, name and row are on disk.
* **Bytes as they arrived.** The dataset is never decoded and re-encoded: pynetdicom's chunked
  receive (``_config.STORE_RECV_CHUNKED_DATASET``) streams each dataset into a Part-10 file under
  the store's ``tmp/`` (each accepted association's DUL thread is told that folder, see
  :func:`~triage.receive.reactor.receive_into`; the process temp folder is left alone), so the file
  is on the spool's filesystem and moving it is a rename, not a copy. Memory stays flat however large the
  instance or however many associations run, at the price that the bytes transit ``tmp/`` before we
  decide: the ``min_free_mb`` reserve is what keeps that transit from ever filling the disk.
* **Know what you store.** Before success, the dataset's structure is walked to its end (so a
  truncated instance is refused, not spooled) and only the header elements the pipeline needs are
  parsed. A bad instance is quarantined with its reason and answered with a failure status; the
  association and the listener carry on.
* **Fast on loopback.** pynetdicom does not set ``TCP_NODELAY``; without it every C-STORE-RSP can sit
  behind Nagle's algorithm and the peer's delayed ACK (40 ms on Linux). Our server sets it on every
  accepted socket, drops pynetdicom's per-message debug formatting handlers, and (on pynetdicom
  3.0.x) replaces its 1 ms polling loops with event-driven ones (:mod:`triage.receive.reactor`;
  ``GLOWTRIAGE_STOCK_PYNETDICOM=1`` in the environment turns that off, for comparison or doubt).
* **Connections that never ask cost nothing.** Every accepted socket waits in the handshake gate
  (:mod:`triage.receive.gate`: one thread, PS3.8 ARTIM ``dicom.artim_timeout_s``, a per-peer limit)
  until its A-ASSOCIATE-RQ is complete; only then does pynetdicom create an association, so idle or
  half-open sockets never hold ``max_associations`` slots, and a closed one is dropped at once.

The structure walk and the statuses are in :mod:`triage.receive.inspect`; this module is the AE.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import shutil
import socket
import sqlite3
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from triage.config import Config
from triage.ops.logs import get_logger
from triage.ops.metrics import METRICS
from triage.receive.gate import HandshakeGate, PrefixedSocket, peer_ip
from triage.receive.inspect import (
    DEFLATED_LE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    INTERNAL_ERROR,
    MISSING_UID,
    OUT_OF_RESOURCES,
    OUT_OF_RESOURCES_WRITE,
    SUCCESS,
    BadInstance,
    inspect_instance,
)
from triage.receive.reactor import accelerate, copy_applies, receive_error, receive_into
from triage.store.db import Store
from triage.store.schema import StoreError

if TYPE_CHECKING:
    from triage.receive.peers import PeerTable

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

class ReceiverError(Exception):
    """The listener cannot start (port taken, certificate unreadable); the message says which key."""


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    # (0000,0902) Error Comment is LO: 64 characters, no backslash.
    ds.ErrorComment = comment.replace("\\", "/").encode("ascii", "replace").decode("ascii")[:64]
    return ds


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT from a file operation, or SQLite's "database or disk is full" at commit."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    """The listener's TLS context from ``dicom.tls`` (None when off); ReceiverError names the key.

    Also called by the worker supervisor before it starts anyone, so an unreadable certificate stops
    the daemon at start, as with one process."""
    t = cfg.settings.dicom.tls
    if not t.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = cfg.path(t.cert_file), cfg.path(t.key_file)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ReceiverError(
            f"dicom.tls.cert_file / key_file: cannot load {cert} with {key}: {exc}"
        ) from exc
    if t.ca_file:
        ca = cfg.path(t.ca_file)
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise ReceiverError(f"dicom.tls.ca_file: cannot load {ca}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED if t.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


class _NoTraceback(logging.Filter):
    """pynetdicom logs every malformed PDU or DIMSE message it rejects with ``LOGGER.exception``: a full
    traceback per bad input, which is noise (the input was refused, nothing crashed) and which a port
    scan or a fuzzing peer turns into megabytes. The exception's repr goes on the message line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({exc!r})" if exc is not None else record.getMessage()
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


_NO_TRACEBACK = _NoTraceback()


def quiet_pynetdicom_tracebacks() -> None:
    """Put :class:`_NoTraceback` on every pynetdicom logger (a logger's filters do not reach its
    children, so each one gets it)."""
    names = ["pynetdicom", *(n for n in logging.root.manager.loggerDict if n.startswith("pynetdicom."))]
    for name in names:
        lg = logging.getLogger(name)
        if _NO_TRACEBACK not in lg.filters:
            lg.addFilter(_NO_TRACEBACK)


# ------------------------------------------------------------------------------------- server
class _RequestHandler(RequestHandler):
    """pynetdicom's handler, given the request bytes the gate already read (see :mod:`.gate`)."""

    server: _Server

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        if sock is not None and type(sock) is AssociationSocket:
            sock.__class__ = PrefixedSocket
            sock.glow_prefix = bytearray(self.server.glow_handoff)  # type: ignore[attr-defined]
        # PS3.8 ARTIM for the rest of this association's life (release, reject, abort: Sta13)
        assoc.dul.artim_timer.timeout = self.server.glow_artim_s
        # The request is already here: if pynetdicom cannot decode it (it aborts), the acceptor thread
        # would still wait acse_timeout (30 s) for it, holding a max_associations slot. Wait ARTIM at
        # most; EVT_REQUESTED puts acse_timeout back once the request is decoded.
        assoc.acse_timeout = self.server.glow_artim_s
        assoc._target = _guarded(assoc, assoc._target)  # type: ignore[attr-defined]
        return assoc


def _guarded(assoc: Association, target: Callable[..., Any]) -> Callable[..., None]:
    """The association thread's target, so that what a malformed peer makes pynetdicom raise ends that
    association (A-ABORT, logged with the reason) instead of killing its thread with a traceback and
    leaving its socket to the timers. Found by the reliability fuzz (10^4 mutated A-ASSOCIATE-RQs):
    an abstract syntax that is no UID raised ValueError in pynetdicom's acceptor negotiation;
    ``Receiver._on_requested`` now refuses such requests first, this is the second line."""

    def run(*args: Any, **kwargs: Any) -> None:
        try:
            target(*args, **kwargs)
        except Exception as exc:  # a peer's bytes must not end the thread with a traceback
            log.error("association_failed", peer=str(getattr(assoc.requestor, "address", "")),
                      reason=f"{type(exc).__name__}: {exc}"[:300], action="aborted")
            with contextlib.suppress(Exception):
                assoc.abort()
            with contextlib.suppress(Exception):
                assoc.kill()

    return run


def context_problem(rq: Any) -> str:
    """Why a request's presentation contexts cannot be negotiated ("" when they can), by the same
    setters pynetdicom's acceptor negotiation uses (odd context ID 1-255, the abstract and transfer
    syntaxes valid UIDs), so that such a request is refused with an A-ASSOCIATE-RJ and a reason
    instead of raising inside pynetdicom."""
    from pynetdicom.presentation import PresentationContext

    for cx in getattr(rq, "presentation_context_definition_list", None) or []:
        try:
            probe = PresentationContext()
            probe.context_id = cx.context_id
            probe.abstract_syntax = cx.abstract_syntax
            for ts in cx.transfer_syntax:
                probe.add_transfer_syntax(ts)
        except (ValueError, TypeError) as exc:
            return f"presentation context {cx.context_id!r}: {exc}"[:200]
    return ""


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server, with every accepted socket sent through the handshake gate.

    ``process_request`` (on the accept thread) only hands the socket to the :class:`HandshakeGate`:
    TCP_NODELAY is set, TLS and the A-ASSOCIATE-RQ are read there under ARTIM, and only a complete
    request reaches pynetdicom (``finish_request`` on the gate's thread, which starts the association's
    own threads and returns). pynetdicom wraps TLS inside ``get_request``, i.e. on the single accept
    thread, so one peer that never finished its handshake stalled every other peer; not here.
    """

    daemon_threads = True
    request_queue_size = 256  # socketserver's 5 drops SYNs under a burst (1 s retransmit for the sender)
    glow_gate: HandshakeGate | None = None
    glow_handoff: bytes = b""
    glow_artim_s: float = 5.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.glow_gate is None:
            super().process_request(request, client_address)
            return
        self.glow_gate.submit(request, client_address)

    def service_actions(self) -> None:
        # pynetdicom runs a full gc.collect() on the accept thread every 60 connections; in the daemon
        # (torch and the model loaded) that is a long pause for every sender during a connection burst.
        # Python's own cyclic collector still runs; nothing else lives here.
        pass

    def handoff(self, sock: Any, address: Any, request_bytes: bytes) -> None:
        """Called by the gate, on its thread, with a complete A-ASSOCIATE-RQ read from ``sock``."""
        self.glow_handoff = request_bytes
        try:
            self.finish_request(sock, address)
        finally:
            self.glow_handoff = b""

    def established_from(self, peer: str) -> int:
        """Established associations from ``peer`` (connections past the gate that are in use)."""
        n = 0
        for assoc in self.active_associations:
            # established only: one being torn down (aborted, rejected, released) is no longer a sender's
            with contextlib.suppress(ValueError, AttributeError):
                n += assoc.is_established and peer_ip(assoc.requestor.address) == peer
        return n

    def open_by_peer(self) -> dict[str, int]:
        """Open connections per peer: handshaking in the gate plus associations past it (for the other
        workers: one still negotiating or already ending counts too, so that a connection is never
        missing from the table between the gate and pynetdicom)."""
        counts: dict[str, int] = dict(self.glow_gate.handshaking()) if self.glow_gate is not None else {}
        for assoc in list(self.active_associations):
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                peer = peer_ip(assoc.requestor.address)
                counts[peer] = counts.get(peer, 0) + 1
        return counts

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints tracebacks to stderr; route them through our logs instead.
        log.error("connection_error", peer=str(client_address[0]), exc_info=True)


class _InheritedServer(_Server):
    """The server on a listening socket opened by the worker supervisor (:mod:`.workers`), shared
    with the other workers: no bind here, and the socket is non-blocking (set by the supervisor), so a
    worker that loses the race for a connection gets EAGAIN, which socketserver ignores."""

    glow_listen_fd: int = -1

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.close()
        self.socket = socket.socket(fileno=self.glow_listen_fd)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # already listening (the supervisor did it)


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

    def __init__(
        self,
        cfg: Config,
        store: Store,
        *,
        listen_fd: int | None = None,
        on_stored: Callable[[], None] | None = None,
        peers: tuple[PeerTable, int] | None = None,
    ) -> None:
        """``listen_fd``: accept from this listening socket instead of binding (a worker of
        :class:`~triage.receive.workers.WorkerPool`); ``on_stored``: called after each stored instance
        (the daemon wakes its assembler); ``peers``: the shared per-peer table and this worker's row."""
        self.cfg = cfg
        self.store = store
        self._listen_fd = listen_fd
        self._on_stored = on_stored
        self._peers = peers
        self._publisher: threading.Thread | None = None
        self._stopping = threading.Event()
        d = cfg.settings.dicom
        self._d = d
        self._reserve = cfg.settings.storage.min_free_mb * 1024 * 1024
        self._networks = [ipaddress.ip_network(p, strict=False) for p in d.allowed_peers]
        self._aets = {a.strip() for a in d.allowed_calling_aets}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._prev_globals: tuple[bool, str] | None = None
        self._lock = threading.Lock()
        self._last_sweep = time.monotonic()
        self._free, self._free_at = 0, -1e9
        self.counts: dict[str, int] = {"stored": 0, "duplicates": 0, "refused": 0, "out_of_resources": 0,
                                       "errors": 0, "rejected_associations": 0}
        # The event-driven reactor copy (triage.receive.reactor), unless turned off or not applicable.
        self._accelerate = os.environ.get("GLOWTRIAGE_STOCK_PYNETDICOM", "") != "1" and copy_applies()
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
        return tls_context(self.cfg)

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
        # Process-wide pynetdicom switches: stream datasets to files (under the store's tmp/, which
        # _on_conn_open arranges per association), skip per-message debug dumps. stop() puts them back.
        self._prev_globals = (_config.STORE_RECV_CHUNKED_DATASET, _config.LOG_HANDLER_LEVEL)
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_HANDLER_LEVEL = "none"
        quiet_pynetdicom_tracebacks()
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
        server_class: type[_Server] = _Server
        if self._listen_fd is not None:
            server_class = type("_WorkerServer", (_InheritedServer,), {"glow_listen_fd": self._listen_fd})
        try:
            server = self.ae.make_server(
                (self._d.host, self._d.port), ae_title=self._d.ae_title, evt_handlers=handlers,
                server_class=server_class, request_handler=_RequestHandler,
            )
        except OSError as exc:
            self._restore_globals()
            raise ReceiverError(
                f"dicom.host/dicom.port: cannot listen on {self._d.host}:{self._d.port}: "
                f"{exc.strerror or exc}"
            ) from exc
        server.glow_artim_s = self._d.artim_timeout_s
        established: Callable[[str], int] = server.established_from
        on_change: Callable[[], None] | None = None
        if self._peers is not None:  # the other workers' connections count too (see .workers)
            table, me = self._peers
            publish_lock = threading.Lock()

            def established(peer: str) -> int:
                return server.established_from(peer) + table.others(me, peer)

            def on_change() -> None:  # at once, so a connection the next instant sees this one
                with publish_lock:
                    table.publish(me, server.open_by_peer())

            self._publisher = threading.Thread(target=self._publish_peers, args=(on_change,),
                                               name="dicom-peers", daemon=True)
        server.glow_gate = HandshakeGate(
            artim_s=self._d.artim_timeout_s, per_peer=self._d.max_connections_per_peer,
            socket_timeout=self._d.network_timeout, tls=tls, dispatch=server.handoff,
            established=established, on_refused=self._on_gate_refused, on_change=on_change,
        )
        server.glow_gate.start()
        if self._publisher is not None:
            self._publisher.start()
        self.ae._servers.append(server)
        self._server = server
        host, port = self.address
        log.info(
            "worker_listening" if self._listen_fd is not None else "listening", host=host, port=port,
            ae_title=self._d.ae_title, tls=tls is not None,
            artim_timeout_s=self._d.artim_timeout_s,
            max_connections_per_peer=self._d.max_connections_per_peer,
            reactor="event-driven" if self._accelerate else "stock",
            allowed_calling_aets=sorted(self._aets), allowed_peers=[str(n) for n in self._networks],
        )
        if block:
            server.serve_forever()
            return
        self._thread = threading.Thread(target=server.serve_forever, name="dicom-accept", daemon=True)
        self._thread.start()

    def _publish_peers(self, publish: Callable[[], None]) -> None:
        """This worker's open connections per peer into the shared table every 0.1 s (the gate also
        publishes on each new or closed connection; this catches associations that ended)."""
        while not self._stopping.wait(0.1):
            with contextlib.suppress(Exception):  # a failed round is retried; never kill the worker
                publish()
        if self._peers is not None:
            with contextlib.suppress(Exception):
                self._peers[0].publish(self._peers[1], {})

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let running associations finish for ``grace_s``, then abort the rest."""
        server = self._server
        if server is None:
            return
        self._stopping.set()
        server.shutdown()  # stops serve_forever, closes the listening socket
        if server.glow_gate is not None:
            server.glow_gate.stop()  # closes connections still waiting for their request
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
            chunked, handler_level = self._prev_globals
            _config.STORE_RECV_CHUNKED_DATASET = chunked
            _config.LOG_HANDLER_LEVEL = handler_level
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
        receive_into(event.assoc, self.store.tmp)
        if self._accelerate:
            accelerate(event.assoc)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        assoc.acse_timeout = self._d.acse_timeout  # see _RequestHandler: ARTIM only until the request
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
        elif problem := context_problem(rq):
            reason, diagnostic = problem, 0x01
        if not reason:
            return
        with self._lock:
            self.counts["rejected_associations"] += 1
        outcome = ("rejected_peer" if "allowed_peers" in reason else
                   "rejected_calling_ae" if "allowed_calling_aets" in reason else
                   "rejected_called_ae" if "called AE title" in reason else "rejected_other")
        METRICS.association(calling, outcome)
        log.warning("association_rejected", peer=peer, calling_aet=calling, called_aet=called, reason=reason,
                    result="rejected-permanent", source="service-user", diagnostic=diagnostic)
        assoc._glow_rejected = True  # type: ignore[attr-defined]  # logged here, not in _on_rejected
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        assoc.kill()

    def _on_gate_refused(self, peer: str, calling: str, reason: str) -> None:
        """The gate refused a connection before pynetdicom saw it (per-peer limit, not a request)."""
        with self._lock:
            self.counts["rejected_associations"] += 1
        busy = "max_connections_per_peer" in reason
        METRICS.association(calling, "rejected_busy" if busy else "rejected_other")

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
        """A Part-10 file of the received bytes under tmp/, owned by us from here on.

        pynetdicom streamed them into a file under the store's tmp/ (:func:`receive_into`) and deletes
        that name after the handler, ignoring a name that is already gone. The handler moves or deletes
        the file on every path before it returns, so it takes pynetdicom's file as it is: no second
        name, no link and unlink per instance (issue 15)."""
        src: Path | None = None
        with contextlib.suppress(AttributeError):
            src = event.dataset_path
        if src is not None and Path(src).parent == self.store.tmp:
            return Path(src)
        dst = self.store.new_tmp_path()
        if src is not None:  # elsewhere (an upstream change moved it): a copy on the spool's filesystem
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
            failed = receive_error(req)
            if failed is not None:  # the disk refused the dataset while it arrived (reactor.GuardedFile)
                self._count("out_of_resources")
                METRICS.instance_rejected("out_of_resources")
                self._free_at = -1e9  # re-read free space for the next instance
                log.error("out_of_resources", **ctx, reason=f"disk full while receiving: {failed}")
                return _status(OUT_OF_RESOURCES_WRITE, "disk full while receiving")
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
                if self._on_stored is not None:
                    self._on_stored()
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
            disk_full = _disk_full(exc)
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
if __name__ == "__main__":
    # ``python -m triage.receive.scp`` (the receiver alone, e.g. the ingest bench) lives on in
    # :mod:`triage.receive.serve`, which sits above the worker pool; imported by name here so that this
    # module, below the pool, does not import it.
    import importlib

    sys.exit(importlib.import_module("triage.receive.serve").main())
