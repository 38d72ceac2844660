"""The association-request gate: every accepted connection waits here, one thread for all, until its
A-ASSOCIATE-RQ PDU is complete; only then does pynetdicom get it.

Why this exists (issue 14): pynetdicom 3.0 gives every accepted socket an ``Association`` thread at
once, and counts those threads against ``maximum_associations`` while they are still waiting for the
request. 200 idle connections (a port scanner, a stuck device) therefore held every slot and real
senders were rejected as busy; a half-sent request left a thread blocked in ``recv`` with no timeout;
and a peer that closed without speaking was noticed only when ``acse_timeout`` ran out (~30 s).

What PS3.8 intends, and what this module does:

* **ARTIM for the handshake** (PS3.8 9.1.5, state Sta2): a connection has ``dicom.artim_timeout_s``
  (a few seconds) from accept to a complete A-ASSOCIATE-RQ, TLS handshake included; then it is closed.
  This is separate from ``acse_timeout`` / ``dimse_timeout`` / ``network_timeout``, which govern
  established associations.
* **Handshakes cost no association slot.** Waiting connections live in one selector (no thread, no
  ``Association``); pynetdicom's ``maximum_associations`` check only ever sees connections that asked.
* **Per-peer limit** (``dicom.max_connections_per_peer``): connections from one IP, handshaking plus
  established, are counted. Over the limit, a request is answered A-ASSOCIATE-RJ (transient,
  local-limit-exceeded) with the reason logged; a peer that already has that many connections still
  handshaking gets its next ones closed at once (it is not behaving as a DICOM sender).
* **A closed socket is noticed at once**: it is readable with EOF, and the selector sees it.
* **Refusals are answered**: a first PDU that is not an A-ASSOCIATE-RQ, or a request whose length is
  impossible, gets an A-ABORT (service-provider, with the PS3.8 reason) and a log line with the reason.

The request's bytes are consumed here (that is the only way to know it is complete, and the only way
at all under TLS); the socket handed to pynetdicom replays them first (:class:`PrefixedSocket`).
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import os
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.transport import AssociationSocket

from triage.ops.logs import get_logger

log = get_logger("receive")

A_ASSOCIATE_RQ = 0x01
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
# An A-ASSOCIATE-RQ's fixed fields are 68 bytes (PS3.8 9.3.2); below that it cannot be one.
MIN_RQ_LENGTH = 68
# Far above any real request (contexts, roles, user identity); a length past this is refused unread.
MAX_RQ_LENGTH = 1 << 20
# Connections waiting for their request, over all peers. pynetdicom's own socket checks use
# select.select(), which cannot watch descriptors numbered 1024 or more: holding fewer keeps every
# association's descriptor below that.
MAX_PENDING = 512
_LOG_EVERY_S = 10.0  # per peer and kind: one line, then a count of the ones not logged


def peer_ip(address: Any) -> str:
    """The IP of a socket address as one string per host (IPv4-mapped IPv6 as IPv4)."""
    host = str(address[0] if isinstance(address, tuple) else address).split("%", 1)[0]
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ip)
    return host


def abort_pdu(reason: int) -> bytes:
    """A-ABORT from the service provider (source 2) with a PS3.8 9.3.8 reason/diagnostic."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, reason)


def reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
    return struct.pack(">BBLBBBB", 0x03, 0, 4, 0, result, source, diagnostic)


class PrefixedSocket(AssociationSocket):
    """pynetdicom's socket wrapper, but bytes the gate already read come out of ``recv`` first.

    Swapped in (``__class__``) on the association's socket before its threads start. ``ready`` is
    true while such bytes remain, so the DUL reads the request at once without waiting on the wire.
    """

    glow_prefix: bytearray

    @property
    def ready(self) -> bool:
        if getattr(self, "glow_prefix", None):
            return True
        return bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]

    def recv(self, nr_bytes: int) -> bytearray:
        prefix = getattr(self, "glow_prefix", None)
        if not prefix:
            return super().recv(nr_bytes)
        out = bytearray(prefix[:nr_bytes])
        del prefix[:nr_bytes]
        if len(out) < nr_bytes:
            out += super().recv(nr_bytes - len(out))
        return out


@dataclass
class _Pending:
    sock: Any  # socket.socket or ssl.SSLSocket (non-blocking while here)
    address: Any
    peer: str
    deadline: float
    tls_done: bool
    buf: bytearray = field(default_factory=bytearray)
    over_limit: bool = False


class HandshakeGate:
    """One thread and one selector holding every connection until its A-ASSOCIATE-RQ is complete.

    ``dispatch(sock, address, request_bytes)`` is called on the gate's thread with a blocking socket
    (timeout ``socket_timeout``); it must not block for long (it starts the association's threads).
    ``established(peer)`` counts that peer's connections that are past the gate.
    """

    def __init__(
        self,
        *,
        artim_s: float,
        per_peer: int,
        socket_timeout: float | None,
        tls: ssl.SSLContext | None,
        dispatch: Callable[[Any, Any, bytes], None],
        established: Callable[[str], int],
        on_refused: Callable[[str, str, str], None] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.artim_s = artim_s
        self.per_peer = per_peer
        self.socket_timeout = socket_timeout
        self.tls = tls
        self._dispatch = dispatch
        self._established = established
        self._on_refused = on_refused
        self._on_change = on_change  # a peer's connection count changed (workers share theirs)
        self._sel = selectors.DefaultSelector()
        self._inbox: collections.deque[tuple[Any, Any]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending: dict[int, _Pending] = {}  # fileno -> connection
        self._by_peer: collections.Counter[str] = collections.Counter()
        self._stopping = False
        self._logged: dict[tuple[str, str], list[float]] = {}  # (peer, kind) -> [last time, not logged]
        self.counts: collections.Counter[str] = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="dicom-gate", daemon=True)

    # ------------------------------------------------------------------------------- public
    def start(self) -> None:
        self._thread.start()

    def submit(self, sock: socket.socket, address: Any) -> None:
        """Hand over a just-accepted connection (any thread)."""
        self._inbox.append((sock, address))
        self._wake()

    def stop(self) -> None:
        """Close every waiting connection and end the thread."""
        self._stopping = True
        self._wake()
        self._thread.join(timeout=5.0)

    def pending(self) -> int:
        return len(self._pending)

    def handshaking(self) -> dict[str, int]:
        """Connections still handshaking, per peer (a copy; safe from any thread)."""
        for _ in range(5):
            with contextlib.suppress(RuntimeError):  # changed size while copied: try again
                return dict(self._by_peer)
        return {}

    # ------------------------------------------------------------------------------ internals
    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full pipe: a wake-up is already pending
            os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        try:
            while not self._stopping:
                timeout = 1.0
                if self._pending:
                    soonest = min(p.deadline for p in self._pending.values())
                    timeout = min(timeout, max(0.0, soonest - time.monotonic()))
                for key, _mask in self._sel.select(timeout):
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                        while self._inbox:
                            self._admit(*self._inbox.popleft())
                    else:
                        self._progress(key.data)
                self._expire()
        except Exception:  # the gate must not die silently: every new connection would hang
            log.error("gate_failed", exc_info=True)
            raise
        finally:
            for p in list(self._pending.values()):
                self._drop(p)
            while self._inbox:
                sock, _addr = self._inbox.popleft()
                with contextlib.suppress(OSError):
                    sock.close()
            self._sel.close()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _note(self, peer: str, kind: str, level: str, **fields: Any) -> None:
        """Log one line per peer and kind every few seconds (a scanner must not flood the log)."""
        self.counts[kind] += 1
        now = time.monotonic()
        slot = self._logged.get((peer, kind))
        if slot is not None and now - slot[0] < _LOG_EVERY_S:
            slot[1] += 1
            return
        suppressed = int(slot[1]) if slot else 0
        self._logged[(peer, kind)] = [now, 0]
        if len(self._logged) > 4096:  # bounded: forget the oldest
            for k in list(self._logged)[:2048]:
                del self._logged[k]
        if suppressed:
            fields["not_logged_since"] = suppressed
        getattr(log, level)(kind, peer=peer, **fields)

    def _admit(self, sock: socket.socket, address: Any) -> None:
        peer = peer_ip(address)
        if self._stopping:
            sock.close()
            return
        if len(self._pending) >= MAX_PENDING:
            self._note(peer, "connection_refused", "warning",
                       reason=f"{MAX_PENDING} connections already waiting for an association request")
            sock.close()
            return
        if self._by_peer[peer] >= self.per_peer:
            self._note(peer, "connection_refused", "warning",
                       reason=f"{self._by_peer[peer]} connections from this peer still handshaking "
                              f"(dicom.max_connections_per_peer = {self.per_peer})")
            sock.close()
            return
        over = self._by_peer[peer] + self._established(peer) >= self.per_peer
        try:
            sock.setblocking(False)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            self._note(peer, "tls_handshake_failed", "warning", reason=str(exc))
            with contextlib.suppress(OSError):
                sock.close()
            return
        p = _Pending(sock, address, peer, time.monotonic() + self.artim_s, self.tls is None, over_limit=over)
        self._pending[sock.fileno()] = p
        self._by_peer[peer] += 1
        self._sel.register(sock, selectors.EVENT_READ, p)
        self._changed()

    def _forget(self, p: _Pending) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(p.sock)
        if self._pending.pop(p.sock.fileno(), None) is not None:
            self._by_peer[p.peer] -= 1
            if self._by_peer[p.peer] <= 0:
                del self._by_peer[p.peer]

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:  # counting must never stop the gate
                log.warning("gate_on_change_failed", exc_info=True)

    def _drop(self, p: _Pending, final: bytes = b"") -> None:
        """Forget and close, sending ``final`` first if the socket takes it right away."""
        self._forget(p)
        if final:
            with contextlib.suppress(OSError, ValueError):
                p.sock.send(final)
        with contextlib.suppress(OSError):
            p.sock.close()
        self._changed()

    def _expire(self) -> None:
        now = time.monotonic()
        for p in [p for p in self._pending.values() if p.deadline <= now]:
            stage = "TLS handshake" if not p.tls_done else (
                "no PDU" if not p.buf else f"{len(p.buf)} bytes of an A-ASSOCIATE-RQ")
            self._note(p.peer, "artim_expired", "info",
                       reason=f"no complete A-ASSOCIATE-RQ within dicom.artim_timeout_s = {self.artim_s:g} s "
                              f"({stage})")
            self._drop(p)

    def _refuse(self, p: _Pending, reason: str, pdu: bytes) -> None:
        self._note(p.peer, "association_refused", "warning", reason=reason)
        if self._on_refused is not None:
            self._on_refused(p.peer, "", reason)
        self._drop(p, pdu)

    def _progress(self, p: _Pending) -> None:
        if not p.tls_done:
            try:
                p.sock.do_handshake()
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                self._sel.modify(p.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, p)
                return
            except (OSError, ValueError) as exc:
                self._note(p.peer, "tls_handshake_failed", "warning", reason=str(exc))
                self._drop(p)
                return
            p.tls_done = True
            self._sel.modify(p.sock, selectors.EVENT_READ, p)
        while True:
            want = 6 - len(p.buf) if len(p.buf) < 6 else 6 + self._length(p) - len(p.buf)
            if want <= 0:
                self._complete(p)
                return
            try:
                chunk = p.sock.recv(min(want, 65536))
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError, InterruptedError):
                return
            except OSError as exc:
                self._note(p.peer, "connection_closed_before_request", "debug", reason=str(exc))
                self._drop(p)
                return
            if not chunk:
                self._note(p.peer, "connection_closed_before_request", "debug",
                           received=len(p.buf), reason="peer closed before a complete A-ASSOCIATE-RQ")
                self._drop(p)
                return
            p.buf += chunk
            if len(p.buf) == 6 and not self._header_ok(p):
                return

    @staticmethod
    def _length(p: _Pending) -> int:
        return int(struct.unpack_from(">L", p.buf, 2)[0])

    def _header_ok(self, p: _Pending) -> bool:
        pdu_type, length = p.buf[0], self._length(p)
        if pdu_type not in KNOWN_PDU_TYPES:
            self._refuse(p, f"first PDU has unknown type 0x{pdu_type:02X} (expected an A-ASSOCIATE-RQ)",
                         abort_pdu(0x01))  # unrecognized-PDU
            return False
        if pdu_type != A_ASSOCIATE_RQ:
            self._refuse(p, f"first PDU is type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ", abort_pdu(0x02))
            return False
        if not MIN_RQ_LENGTH <= length <= MAX_RQ_LENGTH:
            self._refuse(p, f"A-ASSOCIATE-RQ length {length} is outside {MIN_RQ_LENGTH}..{MAX_RQ_LENGTH}",
                         abort_pdu(0x06))  # invalid-PDU-parameter value
            return False
        return True

    def _complete(self, p: _Pending) -> None:
        try:
            self._hand_over(p)
        finally:  # handed over (now an association, still counted) or refused: either way, tell
            self._changed()

    def _hand_over(self, p: _Pending) -> None:
        self._forget(p)
        request = bytes(p.buf)
        try:
            p.sock.settimeout(self.socket_timeout)  # blocking for pynetdicom; a stalled peer times out
        except OSError:
            with contextlib.suppress(OSError):
                p.sock.close()
            return
        if p.over_limit:
            calling = request[26:42].decode("ascii", "replace").strip()
            reason = (f"too many connections from {p.peer} "
                      f"(dicom.max_connections_per_peer = {self.per_peer})")
            self.counts["association_rejected_peer_limit"] += 1
            log.warning("association_rejected", peer=p.peer, calling_aet=calling, reason=reason,
                        result="rejected-transient", source="service-provider-presentation", diagnostic=2)
            if self._on_refused is not None:
                self._on_refused(p.peer, calling, reason)
            with contextlib.suppress(OSError, ValueError):
                p.sock.sendall(reject_pdu(0x02, 0x03, 0x02))  # transient, local-limit-exceeded
            with contextlib.suppress(OSError):
                p.sock.close()
            return
        try:
            self._dispatch(p.sock, p.address, request)
        except Exception:
            log.error("connection_error", peer=p.peer, exc_info=True)
            with contextlib.suppress(OSError):
                p.sock.close()
