"""TLS handshakes cut short against a TLS-enabled daemon (``[dicom.tls] enabled = true``).

The gate (triage/receive/gate.py) runs the TLS handshake under ARTIM on its own thread, before
pynetdicom sees the socket: a peer that stops mid-handshake, resets, or sends garbage in a TLS record
must cost one ``tls_handshake_failed`` / ``artim_expired`` log line, never a traceback, a stuck slot or
a dead listener. Each case below is a function of the port returning an outcome label; the caller checks
that the daemon still answers a C-ECHO over TLS afterwards and that its log has no traceback.

The certificate is a throw-away self-signed one made with the openssl CLI in a temporary folder (no
key material is kept). Only 127.0.0.1 is contacted; every socket has a short timeout.
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import ssl
import struct
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reliability_cases.fuzz import _echo_command, _pdata, _recv_pdu, classify
from reliability_cases.sockets import associate_rq


def self_signed(folder: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem): a P-256 self-signed certificate for 127.0.0.1, valid 2 days."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def _client_context(cert: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile=str(cert))
    return ctx


def _hello() -> bytes:
    """The bytes of a real TLS ClientHello (what Python's client sends first), from a memory BIO."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = _client_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def _read_some(s: socket.socket, wait_s: float) -> str:
    """'closed' when the server closes within ``wait_s``, 'open' when it is still waiting, else the
    number of bytes it sent before closing or the timeout."""
    s.settimeout(wait_s)
    got = 0
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return f"closed after {got} bytes" if got else "closed"
            got += len(chunk)
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except (TimeoutError, OSError):
        return f"open ({got} bytes)" if got else "open"


def partial_hello(port: int, cut: int, *, then: str = "close", wait_s: float = 1.5) -> str:
    """Send the first ``cut`` bytes of a ClientHello, then ``close`` at once, ``rst`` (SO_LINGER 0),
    or ``wait`` for the server to give up (ARTIM)."""
    hello = _hello()
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
        s.sendall(hello[: max(0, min(cut, len(hello)))])
        if then == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return "reset by client"
        if then == "wait":
            return _read_some(s, wait_s)
    return "closed by client"


def after_server_hello(port: int, *, then: str = "close") -> str:
    """A full ClientHello, read the server's first flight (ServerHello ...), then ``close``, ``rst`` or
    send ``junk`` instead of the client's Finished."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = _client_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
        with contextlib.suppress(ssl.SSLWantReadError):
            obj.do_handshake()
        s.sendall(outgoing.read())
        s.settimeout(3.0)
        try:
            flight = s.recv(65536)
        except OSError:
            return "no ServerHello"
        if not flight or flight[0] != 0x16:
            return f"no ServerHello ({flight[:1].hex() or 'closed'})"
        if then == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif then == "junk":
            s.sendall(b"\x16\x03\x03\x00\x20" + bytes(random.randrange(256) for _ in range(32)))
            return "junk Finished: " + _read_some(s, 1.5)
        return f"ServerHello ({len(flight)} bytes), then {then}"


def handshake_then(port: int, payload: bytes, *, wait_s: float = 1.5) -> str:
    """A complete TLS handshake, then ``payload`` (maybe empty or a partial A-ASSOCIATE-RQ) and wait."""
    ctx = _client_context()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5.0) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        if payload:
            s.sendall(payload)
        return classify(_recv_pdu(s, wait_s)) if payload else _read_some(s, wait_s)


def tls_echo(port: int, cert: Path) -> str:
    """Associate over TLS (the server's certificate verified) and send a C-ECHO: 'P-DATA' when it is
    answered (the control case, and the proof the listener still serves)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5.0) as raw,
        _client_context(cert).wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        s.sendall(associate_rq())
        ac = _recv_pdu(s, 5.0)
        if ac is None or ac[0] != 0x02:
            return "no association: " + classify(ac)
        s.sendall(_pdata(1, 0x03, _echo_command()))
        return classify(_recv_pdu(s, 5.0))


def old_protocol(port: int) -> str:
    """A client that offers TLS 1.0/1.1 only (the server's minimum is 1.2): refused in the handshake."""
    ctx = _client_context()
    with contextlib.suppress(ValueError, ssl.SSLError), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated is the point here
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client really offer 1.0/1.1
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5.0) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1"),
        ):
            return "handshake completed"
    except ssl.SSLError as exc:
        return f"refused ({exc.reason or 'ssl error'})"
    except OSError:
        return "closed"


def named_cases(cert: Path) -> list[tuple[str, Callable[[int], str]]]:
    rq = associate_rq()
    return [
        ("TLS: 5-byte record header only, then close", lambda p: partial_hello(p, 5)),
        ("TLS: half a ClientHello, then close", lambda p: partial_hello(p, len(_hello()) // 2)),
        ("TLS: half a ClientHello, then silence (ARTIM)", lambda p: partial_hello(p, 100, then="wait")),
        ("TLS: half a ClientHello, then RST", lambda p: partial_hello(p, 100, then="rst")),
        ("TLS: ClientHello, ServerHello, then close", lambda p: after_server_hello(p)),
        ("TLS: ClientHello, ServerHello, then RST", lambda p: after_server_hello(p, then="rst")),
        ("TLS: ClientHello, ServerHello, then junk", lambda p: after_server_hello(p, then="junk")),
        ("TLS: record claims 16 KB, 4 sent", lambda p: partial_hello_bytes(p, b"\x16\x03\x01\x40\x00junk")),
        ("TLS: plain A-ASSOCIATE-RQ to the TLS port", lambda p: partial_hello_bytes(p, rq)),
        ("TLS: only TLS 1.0/1.1 offered", old_protocol),
        ("TLS: handshake, then silence (ARTIM)", lambda p: handshake_then(p, b"")),
        ("TLS: handshake, half an A-ASSOCIATE-RQ", lambda p: handshake_then(p, rq[: len(rq) // 2])),
        ("TLS: a valid C-ECHO (control)", lambda p: tls_echo(p, cert)),
    ]


def partial_hello_bytes(port: int, data: bytes, wait_s: float = 1.5) -> str:
    """Send ``data`` raw to the TLS listener and see what it does."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
        s.sendall(data)
        return _read_some(s, wait_s)


def tls_cases(port: int, cert: Path, n_random: int, seed: int = 0) -> dict[str, Any]:
    """The named cases once each, then ``n_random`` handshakes cut at a random byte of the ClientHello
    or after the ServerHello (closed, reset, or junk). Outcome label -> count."""
    named: dict[str, str] = {}
    for name, case in named_cases(cert):
        try:
            named[name] = case(port)
        except OSError as exc:
            named[name] = f"client error: {type(exc).__name__}"
    rng = random.Random(seed)
    hello_len = len(_hello())
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(n_random):
        how = rng.choice(["cut-close", "cut-rst", "server-hello-close", "server-hello-rst", "junk"])
        try:
            if how.startswith("cut"):
                partial_hello(port, rng.randrange(hello_len), then=how[4:])
                outcomes[how] += 1
            elif how == "junk":
                outcomes[after_server_hello(port, then="junk").split(":")[0]] += 1
            else:
                outcomes[how if after_server_hello(port, then=how[13:]).startswith("ServerHello")
                         else "no ServerHello"] += 1
        except OSError as exc:
            outcomes[f"client error: {type(exc).__name__}"] += 1
    time.sleep(0.1)
    return {"named": named, "random": dict(outcomes), "random_total": sum(outcomes.values())}
