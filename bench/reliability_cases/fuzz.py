"""Fuzzed inputs against a running receiver: PDU-level (hand-built PDUs, hypothesis for the structured
ones) and dataset-level (mutated CT instances sent as raw bytes). Every input is recorded with what came
back: an A-ASSOCIATE-AC/RJ or A-ABORT (with its result/source/reason), a DIMSE status (with its error
comment), or the server closing the connection. The invariants are checked by the caller: the daemon
never died, answered a C-ECHO and stored a valid instance afterwards, and refused nothing silently.

Bounded: every socket has a short timeout, every loop a count; only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import struct
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from reliability_cases.sockets import IMPLICIT_LE, VERIFICATION, _item, associate_rq

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
PDU_NAMES = {
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}


def _recv_pdu(s: socket.socket, timeout: float) -> tuple[int, bytes] | None:
    """One PDU (type, body) or None on close/timeout."""
    s.settimeout(timeout)
    try:
        head = b""
        while len(head) < 6:
            chunk = s.recv(6 - len(head))
            if not chunk:
                return None
            head += chunk
        kind, length = head[0], struct.unpack(">L", head[2:6])[0]
        body = b""
        while len(body) < min(length, 1 << 20):
            chunk = s.recv(min(65536, length - len(body)))
            if not chunk:
                break
            body += chunk
        return kind, body
    except OSError:
        return None


def classify(reply: tuple[int, bytes] | None) -> str:
    """A short outcome label: 'A-ASSOCIATE-RJ 2/3/2', 'A-ABORT 2/6', 'closed', ..."""
    if reply is None:
        return "closed"
    kind, body = reply
    name = PDU_NAMES.get(kind, f"PDU 0x{kind:02X}")
    if kind == 0x03 and len(body) >= 4:
        return f"{name} {body[1]}/{body[2]}/{body[3]}"
    if kind == 0x07 and len(body) >= 4:
        return f"{name} {body[2]}/{body[3]}"
    return name


def exchange(port: int, chunks: Sequence[bytes], *, gap_s: float = 0.0, wait_s: float = 2.0) -> str:
    """Connect, send ``chunks`` (``gap_s`` apart), read the first answer; its label."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
        try:
            for c in chunks:
                s.sendall(c)
                if gap_s:
                    time.sleep(gap_s)
        except OSError:
            return "closed"
        return classify(_recv_pdu(s, wait_s))


def _pdata(context_id: int, control: int, payload: bytes) -> bytes:
    pdv = struct.pack(">LB", len(payload) + 2, context_id) + bytes([control]) + payload
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def _echo_command(message_id: int = 1) -> bytes:
    """A C-ECHO-RQ command set, Implicit VR LE (PS3.7 9.3.5)."""

    def el(group: int, elem: int, value: bytes) -> bytes:
        return struct.pack("<HHL", group, elem, len(value)) + value

    body = el(0, 0x0002, VERIFICATION.encode() + b"\0") + el(0, 0x0100, struct.pack("<H", 0x0030))
    body += el(0, 0x0110, struct.pack("<H", message_id)) + el(0, 0x0800, struct.pack("<H", 0x0101))
    return el(0, 0x0000, struct.pack("<L", len(body))) + body


def in_association(port: int, after_ac: Sequence[bytes], *, wait_s: float = 2.0) -> str:
    """Associate (Verification), then send ``after_ac``; the label of the answer to those PDUs."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as s:
        s.sendall(associate_rq())
        ac = _recv_pdu(s, 5.0)
        if ac is None or ac[0] != 0x02:
            return "no association: " + classify(ac)
        try:
            for pdu in after_ac:
                s.sendall(pdu)
        except OSError:
            return "closed"
        return classify(_recv_pdu(s, wait_s))


# ------------------------------------------------------------------------------------ PDU cases
def fixed_pdu_cases() -> list[tuple[str, Callable[[int], str]]]:
    """The named protocol faults, each a function of the port returning the outcome label."""
    rq = associate_rq()
    cases: list[tuple[str, Callable[[int], str]]] = [
        ("zero-length A-ASSOCIATE-RQ", lambda p: exchange(p, [struct.pack(">BBL", 1, 0, 0)])),
        (
            "oversize A-ASSOCIATE-RQ length (4 GiB)",
            lambda p: exchange(p, [struct.pack(">BBL", 1, 0, 2**32 - 1)]),
        ),
        (
            "unknown first PDU type 0x55",
            lambda p: exchange(p, [b"\x55\x00" + struct.pack(">L", 10) + bytes(10)]),
        ),
        ("P-DATA before association", lambda p: exchange(p, [_pdata(1, 3, _echo_command())])),
        ("HTTP request to the DICOM port", lambda p: exchange(p, [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])),
        (
            "TLS ClientHello to a plain listener",
            lambda p: exchange(p, [bytes.fromhex("16030100a5010000a10303") + bytes(160)]),
        ),
        (
            "slow sender (RQ 1 byte per 2 ms)",
            lambda p: exchange(p, [rq[i : i + 1] for i in range(len(rq))], gap_s=0.002),
        ),
        (
            "P-DATA dataset fragment before any command",
            lambda p: in_association(p, [_pdata(1, 0x02, b"\x08\x00\x16\x00" + bytes(8))]),
        ),
        (
            "P-DATA on an unaccepted context id 99",
            lambda p: in_association(p, [_pdata(99, 3, _echo_command())]),
        ),
        ("P-DATA zero length", lambda p: in_association(p, [struct.pack(">BBL", 4, 0, 0)])),
        (
            "P-DATA oversize length (1 GiB, then silence)",
            lambda p: in_association(p, [struct.pack(">BBL", 4, 0, 2**30)], wait_s=1.0),
        ),
        (
            "PDV length past the PDU",
            lambda p: in_association(
                p, [struct.pack(">BBL", 4, 0, 10) + struct.pack(">LB", 500, 1) + b"\x03" + bytes(4)]
            ),
        ),
        (
            "command fragments out of order (last flag first)",
            lambda p: in_association(
                p, [_pdata(1, 0x03, _echo_command()[20:]), _pdata(1, 0x01, _echo_command()[:20])]
            ),
        ),
        (
            "A-ABORT mid-command",
            lambda p: in_association(
                p,
                [_pdata(1, 0x01, _echo_command()[:20]), struct.pack(">BBLBBBB", 7, 0, 4, 0, 0, 0, 0)],
                wait_s=0.5,
            ),
        ),
        (  # refused when pynetdicom decodes the PDU (A-ABORT)
            "abstract syntax longer than a UID may be (70 characters)",
            lambda p: exchange(p, [associate_rq(contexts=((VERIFICATION, (IMPLICIT_LE,)),
                                                          ("1." + "2" * 68, (IMPLICIT_LE,))))]),
        ),
        ("even presentation context ID (2)", lambda p: exchange(p, [_even_context_id(rq)])),
        (  # decoded, then pynetdicom's acceptor negotiation raised TypeError in the association thread
            # (a traceback, found at 10^4 mutations): now refused before it with a reason
            "presentation context without an abstract syntax",
            lambda p: exchange(p, [_no_abstract_syntax_rq()]),
        ),
        ("a valid C-ECHO (control)", lambda p: in_association(p, [_pdata(1, 0x03, _echo_command())])),
    ]
    return cases


def _no_abstract_syntax_rq() -> bytes:
    """An A-ASSOCIATE-RQ whose one presentation context has a transfer syntax but no abstract syntax."""
    body = struct.pack(">HH", 1, 0) + b"GLOWTRIAGE".ljust(16) + b"FUZZSCU".ljust(16) + bytes(32)
    body += _item(0x10, b"1.2.840.10008.3.1.1.1")
    body += _item(0x20, bytes([1, 0, 0, 0]) + _item(0x40, IMPLICIT_LE.encode()))
    body += _item(0x50, _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def _even_context_id(rq: bytes) -> bytes:
    """``rq`` with its first presentation context's ID set to 2 (PS3.8: odd, 1-255)."""
    out = bytearray(rq)
    i = out.index(b"\x20\x00", 6 + 68)  # the first presentation context item after the fixed part
    out[i + 4] = 2
    return bytes(out)


def hypothesis_rq_cases(port: int, n: int, seed: int = 0, workers: int = 1) -> collections.Counter[str]:
    """``n`` structurally mutated A-ASSOCIATE-RQs (hypothesis): items of random type, length fields that
    lie, truncations, junk, fields of the fixed part changed. Returns outcome label -> count.

    The requests are drawn first, then sent by ``workers`` concurrent clients: most of a case's time is
    the daemon waiting (correctly) for bytes a lying length promised, until ARTIM, so one client at a
    time spends the run idle; several at once also load the handshake path as a network would."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    outcomes: collections.Counter[str] = collections.Counter()
    base = associate_rq(contexts=((VERIFICATION, (IMPLICIT_LE,)), (CT_IMAGE, (EXPLICIT_LE,))))

    @st.composite
    def mutated(draw: Any) -> bytes:
        body = bytearray(base[6:])
        kind = draw(st.sampled_from(["item", "flip", "truncate", "length", "fixed", "junk"]))
        if kind == "item":  # a random variable item appended or replacing the user-information item
            item_type = draw(st.integers(0, 255))
            payload = draw(st.binary(max_size=300))
            claimed = draw(st.one_of(st.just(len(payload)), st.integers(0, 0xFFFF)))
            body += struct.pack(">BBH", item_type, 0, claimed) + payload
        elif kind == "flip":
            for _ in range(draw(st.integers(1, 8))):
                i = draw(st.integers(0, len(body) - 1))
                body[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            body = body[: draw(st.integers(0, len(body)))]
        elif kind == "length":  # an item's length field set to a lie
            i = draw(st.integers(68, len(body) - 4))
            body[i + 2 : i + 4] = struct.pack(">H", draw(st.integers(0, 0xFFFF)))
        elif kind == "fixed":  # protocol version, AE titles
            i = draw(st.integers(0, 67))
            body[i] = draw(st.integers(0, 255))
        else:
            body = bytearray(draw(st.binary(min_size=68, max_size=600)))
        declared = draw(st.one_of(st.just(len(body)), st.integers(0, len(body) + 64)))
        return struct.pack(">BBL", 1, 0, declared) + bytes(body)

    drawn: list[bytes] = []

    @hseed(seed)
    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(mutated())
    def run(pdu: bytes) -> None:
        drawn.append(pdu)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for label in pool.map(lambda pdu: exchange(port, [pdu], wait_s=1.0), drawn):
            outcomes[label] += 1
    return outcomes


# -------------------------------------------------------------------------------- dataset level
def mutate_dataset(raw: bytes, rng: random.Random) -> bytes:
    """One mutation of a Part-10 file's dataset (the File Meta is left valid so it can be sent)."""
    from triage.store.part10 import dataset_offset

    off = dataset_offset(raw)
    meta, ds = raw[:off], bytearray(raw[off:])
    kind = rng.choice(["flip", "truncate", "length", "junk", "tag"])
    if kind == "flip":
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(ds))
            ds[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        ds = ds[: rng.randrange(len(ds))]
    elif kind == "length":  # a 2- or 4-byte length field somewhere in the first 2 KB set to a lie
        i = rng.randrange(0, min(len(ds) - 4, 2048))
        ds[i : i + 4] = struct.pack("<L", rng.choice([0, 0xFFFFFFFF, 0x7FFFFFFF, rng.randrange(1 << 32)]))
    elif kind == "junk":
        i = rng.randrange(len(ds))
        ds[i : i + 64] = bytes(rng.randrange(256) for _ in range(64))
    else:  # an element's tag rewritten
        i = rng.randrange(0, min(len(ds) - 4, 4096)) & ~1
        ds[i : i + 4] = struct.pack("<HH", rng.randrange(1 << 16), rng.randrange(1 << 16))
    return meta + bytes(ds)


def dataset_cases(
    port: int, sources: Sequence[Path], n: int, out_dir: Path, seed: int = 0, per_association: int = 50,
    workers: int = 1,
) -> dict[str, Any]:
    """``n`` mutated instances sent raw over pynetdicom by ``workers`` concurrent associations (each its
    own share, mutations and files); statuses counted, and whether each failure came with an error
    comment (a refusal with a reason)."""
    from pynetdicom import _config

    workers = max(1, min(workers, n)) if n else 1
    shares = [n // workers + (1 if k < n % workers else 0) for k in range(workers)]
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are, never decoded
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(
                lambda k: _send_mutations(port, sources, shares[k], out_dir / f"w{k}",
                                          random.Random(seed if workers == 1 else 1000 * seed + k),
                                          per_association),
                range(workers)))
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    statuses: collections.Counter[str] = collections.Counter()
    for p in parts:
        statuses.update(p["statuses"])
    return {
        "sent": sum(p["sent"] for p in parts),
        "statuses": dict(statuses),
        "failures_without_reason": sum(p["failures_without_reason"] for p in parts),
        "without_status": sum(p["without_status"] for p in parts),
        "workers": workers,
    }


def _send_mutations(port: int, sources: Sequence[Path], n: int, out_dir: Path, rng: random.Random,
                    per_association: int) -> dict[str, Any]:
    """One sender's share of :func:`dataset_cases`."""
    from pynetdicom import AE

    out_dir.mkdir(parents=True, exist_ok=True)
    statuses: collections.Counter[str] = collections.Counter()
    silent_failures = no_status = 0
    done = 0  # instances offered to the daemon (an association that died mid-batch leaves the rest of
    # its batch for the next one: "sent" counts what was sent, not what was planned)
    while done < n:
        batch = []
        for i in range(min(per_association, n - done)):
            src = rng.choice(list(sources))
            f = out_dir / f"m{i}.dcm"
            f.write_bytes(mutate_dataset(src.read_bytes(), rng))
            batch.append(f)
        ae = AE(ae_title="FUZZSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(CT_IMAGE, EXPLICIT_LE)
        assoc = ae.associate("127.0.0.1", port, ae_title="GLOWTRIAGE")
        if not assoc.is_established:
            statuses["no association"] += len(batch)
            no_status += len(batch)
            done += len(batch)
            continue
        try:
            for f in batch:
                done += 1
                try:
                    rsp = assoc.send_c_store(f)
                except (ValueError, RuntimeError, OSError):
                    statuses["not sent (sender refused its own bytes)"] += 1
                    continue
                if rsp is None or "Status" not in rsp:
                    no_status += 1
                    statuses["no status"] += 1
                    if not assoc.is_established:
                        break
                    continue
                code = int(rsp.Status)
                statuses[f"0x{code:04X}"] += 1
                if code != 0 and not str(rsp.get("ErrorComment", "")).strip():
                    silent_failures += 1
        finally:
            if assoc.is_established:
                assoc.release()
    return {"sent": done, "statuses": dict(statuses), "failures_without_reason": silent_failures,
            "without_status": no_status}


def pdu_cases(port: int, n_structured: int, seed: int = 0, workers: int = 1) -> dict[str, Any]:
    """The named faults once each (one at a time: each checks its own answer), then ``n_structured``
    hypothesis-mutated requests from ``workers`` concurrent clients."""
    named = {}
    for name, case in fixed_pdu_cases():
        with contextlib.suppress(OSError):
            named[name] = "error"
            named[name] = case(port)
    structured = (hypothesis_rq_cases(port, n_structured, seed, workers) if n_structured
                  else collections.Counter())
    return {"named": named, "structured": dict(structured), "structured_total": sum(structured.values())}
