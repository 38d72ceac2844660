"""Delivery of results: a durable outbox drained by destination kinds behind one small interface.

Every SR, HL7 message and routed series is first a row in the store's outbox (with its payload file
already on disk), then sent, acknowledged, and marked sent. A failure is retried with exponential
back-off (the next attempt time is stored, so the schedule survives restarts); after the configured
attempts the row is dead-lettered: logged, counted, kept, never silently dropped. A re-send uses the
same payload file, so a PACS sees the same SOP Instance UID (a duplicate, not a second report).

Destination kinds (DICOM C-STORE, HL7 MLLP; DICOMweb later) implement :class:`Destination`; adding
a kind is one class and one entry in :data:`KINDS`.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import hl7
import hl7.client
from pydicom import dcmread
from pynetdicom import AE

from triage.ops.logs import get_logger
from triage.report.hl7 import parse_ack

log = get_logger("send")


class SendError(Exception):
    """A delivery attempt failed; the message says where and why (never patient data)."""


@dataclass(frozen=True)
class Delivery:
    """What the outbox hands to a destination: the payload files of one outbox row."""

    outbox_id: int
    kind: str  # "dicom" | "hl7"
    destination: str  # a name for logs and metrics: "PACS", "RIS", a routing rule's name
    files: Sequence[Path]


class Destination(Protocol):
    name: str

    def send(self, delivery: Delivery) -> str:
        """Deliver and return a short acknowledgement text; raise SendError on any failure."""
        ...


def backoff_delay(
    attempts: int, initial_s: float, max_s: float, rng: Callable[[], float] = random.random
) -> float:
    """Seconds before attempt ``attempts + 1``: initial * 2**(attempts-1), capped, with 10% jitter.

    Jitter keeps many waiting results from hammering a PACS in lock-step when it comes back.
    """
    base = min(max_s, initial_s * (2 ** max(0, attempts - 1)))
    return base * (0.9 + 0.2 * rng())


class DicomStoreDestination:
    """C-STORE SCU to a PACS or reading station (pynetdicom)."""

    def __init__(self, name: str, ae_title: str, host: str, port: int, calling_ae_title: str,
                 timeout_s: float = 30.0):
        self.name = name
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.calling_ae_title = calling_ae_title
        self.timeout_s = timeout_s

    def send(self, delivery: Delivery) -> str:
        datasets = [dcmread(p) for p in delivery.files]
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        # Propose every (SOP class, transfer syntax) pair we are about to send, as stored.
        pairs = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
        for sop_class, ts in pairs[:128]:
            ae.add_requested_context(sop_class, ts)
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            raise SendError(f"{self.name}: association with {self.ae_title}@{self.host}:{self.port} failed")
        try:
            for ds, path in zip(datasets, delivery.files, strict=True):
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None:
                    raise SendError(f"{self.name}: no C-STORE response for {ds.SOPInstanceUID} ({path.name})")
                if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise SendError(f"{self.name}: C-STORE of {ds.SOPInstanceUID} answered 0x{code:04X}")
        finally:
            assoc.release()
        return f"{len(datasets)} instance(s) stored"


class _MLLPClient(hl7.client.MLLPClient):
    """hl7's MLLP client with connect/read timeouts and a read that waits for the whole frame."""

    def __init__(self, host: str, port: int, timeout_s: float):
        self.socket = socket.create_connection((host, port), timeout=timeout_s)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.encoding = "utf-8"

    def send(self, data: bytes) -> bytes:
        self.socket.sendall(data)
        buf = b""
        end = hl7.client.EB + hl7.client.CR
        while end not in buf:
            chunk = self.socket.recv(hl7.client.RECV_BUFFER)
            if not chunk:
                break
            buf += chunk
        return buf


class MLLPDestination:
    """HL7 v2 over MLLP to the RIS/worklist; success means an AA/CA acknowledgement."""

    def __init__(self, name: str, host: str, port: int, timeout_s: float = 10.0):
        self.name = name
        self.host = host
        self.port = port
        self.timeout_s = timeout_s

    def send(self, delivery: Delivery) -> str:
        for path in delivery.files:
            message = path.read_bytes().decode("utf-8")  # not read_text: it would turn \r into \n
            try:
                with _MLLPClient(self.host, self.port, self.timeout_s) as client:
                    raw = client.send_message(message)
            except OSError as exc:
                raise SendError(f"{self.name}: MLLP to {self.host}:{self.port}: {exc}") from exc
            control_id = message.split("\r", 1)[0].split("|")[9] if message.startswith("MSH") else None
            ok, text = parse_ack(raw.decode("utf-8", "replace"), control_id)
            if not ok:
                raise SendError(f"{self.name}: HL7 message {path.name} not accepted: {text}")
        return "ACK AA"
