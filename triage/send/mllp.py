"""HL7 v2 over MLLP: the ORU^R01 to the RIS/worklist; delivered means an AA/CA acknowledgement.

Target notation in the outbox: ``@host:port`` (an empty AE title before the ``@``: the notation rows
have always had, kept so rows written by earlier versions still parse). The timeout comes from the
live config ([hl7] timeout).
"""

from __future__ import annotations

import socket

import hl7
import hl7.client

from triage.config import Config
from triage.report.hl7 import parse_ack
from triage.send.base import Delivery, Destination, SendError, register, split_host_port

__all__ = ["MLLPDestination"]


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


@register
class MLLPDestination(Destination):
    """HL7 v2 over MLLP to the RIS/worklist; success means an AA/CA acknowledgement."""

    kind = "hl7"
    payloads = frozenset({"oru"})

    def __init__(self, name: str, host: str, port: int, timeout_s: float = 10.0):
        self.name = name
        self.host = host
        self.port = port
        self.timeout_s = timeout_s

    @classmethod
    def from_target(cls, name: str, target: str, cfg: Config) -> MLLPDestination:
        host, port = split_host_port(target.rpartition("@")[2], name)
        return cls(name, host, port, timeout_s=cfg.settings.hl7.timeout)

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
