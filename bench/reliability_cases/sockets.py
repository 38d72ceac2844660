"""Misbehaving peers at the socket level: idle connections, half-sent requests, raw PDUs, timed senders.

Used by ``bench/reliability.py`` and ``tests/integration/test_reliability.py``. Everything goes to a
listener on this machine's loopback range only; every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def open_idle(port: int, n: int, source: str = "127.0.0.1", host: str = "127.0.0.1") -> list[socket.socket]:
    """``n`` TCP connections from ``source`` that never send anything."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.settimeout(5.0)
        s.connect((host, port))
        socks.append(s)
    return socks


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def associate_rq(
    called: str = "GLOWTRIAGE",
    calling: str = "FUZZSCU",
    contexts: Sequence[tuple[str, Sequence[str]]] = ((VERIFICATION, (IMPLICIT_LE,)),),
) -> bytes:
    """A well-formed A-ASSOCIATE-RQ PDU (PS3.8 9.3.2), built by hand so a test can break any part."""
    body = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
    body += _item(0x10, b"1.2.840.10008.3.1.1.1")
    for i, (abstract, syntaxes) in enumerate(contexts):
        pc = bytes([1 + 2 * i, 0, 0, 0]) + _item(0x30, abstract.encode())
        for ts in syntaxes:
            pc += _item(0x40, ts.encode())
        body += _item(0x20, pc)
    user = _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1")
    body += _item(0x50, user)
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def half_sent_rq(port: int, source: str = "127.0.0.1", host: str = "127.0.0.1") -> socket.socket:
    """A connection that sent the header and the first part of an A-ASSOCIATE-RQ, then nothing."""
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(5.0)
    s.connect((host, port))
    rq = associate_rq()
    s.sendall(rq[: len(rq) // 2])
    return s


def closed_within(socks: Sequence[socket.socket], seconds: float) -> int:
    """How many of ``socks`` the server closed (EOF or reset) within ``seconds`` from now."""
    deadline = time.monotonic() + seconds
    closed = 0
    for s in socks:
        left = max(0.01, deadline - time.monotonic())
        s.settimeout(left)
        try:
            while True:
                data = s.recv(4096)
                if not data:
                    closed += 1
                    break
        except (ConnectionResetError, BrokenPipeError):
            closed += 1
        except (TimeoutError, OSError):
            pass
    return closed


def close_all(socks: Sequence[socket.socket]) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()


def timed_echo(port: int, *, called: str = "GLOWTRIAGE", timeout: float = 10.0) -> tuple[int | None, float]:
    """(C-ECHO status or None, seconds from connect to the response) with pynetdicom as the SCU."""
    from pynetdicom import AE

    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    t0 = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return None, time.perf_counter() - t0
    try:
        rsp = assoc.send_c_echo()
        return (int(rsp.Status) if rsp and "Status" in rsp else None), time.perf_counter() - t0
    finally:
        assoc.release()


def timed_store(
    port: int, files: Sequence[Path], *, called: str = "GLOWTRIAGE", timeout: float = 10.0
) -> tuple[list[int], float]:
    """(statuses, seconds from connect to the last response) with pynetdicom as the SCU."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE

    ae = AE(ae_title="STORESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for f in files:
        m = read_file_meta_info(f)
        ae.add_requested_context(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
    t0 = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    statuses: list[int] = []
    if not assoc.is_established:
        return statuses, time.perf_counter() - t0
    try:
        for f in files:
            rsp = assoc.send_c_store(f)
            statuses.append(int(rsp.Status) if rsp is not None and "Status" in rsp else -1)
        return statuses, time.perf_counter() - t0
    finally:
        assoc.release()


def idle_socket_case(
    port: int, files: Sequence[Path], *, n_idle: int = 200, source: str = "127.0.0.2", artim_s: float = 5.0
) -> dict[str, Any]:
    """Issue 14's case: ``n_idle`` silent connections plus one half-sent A-ASSOCIATE-RQ from ``source``,
    then a real sender's C-ECHO and C-STORE from 127.0.0.1; then how soon the server closed the
    silent ones (ARTIM) and how soon C-ECHO works after the client closes them all."""
    from training.harness.storescu import storescu

    out: dict[str, Any] = {"idle_connections": n_idle, "idle_source": source}
    idle = open_idle(port, n_idle, source)
    idle.append(half_sent_rq(port, source))
    try:
        time.sleep(0.3)  # let the server accept them all
        out["echo_status"], out["echo_s"] = timed_echo(port)
        statuses, out["store_s"] = timed_store(port, files)
        out["store_statuses"] = sorted(set(statuses))
        t0 = time.perf_counter()
        done = storescu(port, list(files), timeout=60)
        out["storescu_rc"], out["storescu_s"] = done.returncode, time.perf_counter() - t0
        out["closed_by_server_within_artim"] = closed_within(idle, artim_s + 1.5)
    finally:
        close_all(idle)
    t0 = time.perf_counter()
    status = None
    while status != 0 and time.perf_counter() - t0 < 60:
        status, _ = timed_echo(port)
    out["echo_after_close_status"], out["echo_after_close_s"] = status, time.perf_counter() - t0
    return out
