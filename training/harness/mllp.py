"""An MLLP listener standing in for the RIS: it acknowledges every HL7 v2 message and keeps it.

A well-formed message gets an ``AA`` acknowledgement built by ``hl7`` from the message itself; anything
else gets ``AR``, so a sender never hangs on a peer that stays silent (the test that sent it then fails
on what was recorded, not on a timeout).
"""

from __future__ import annotations

import socketserver
import threading

START, END = b"\x0b", b"\x1c\r"
REJECT = "MSH|^~\\&|RIS|HOSPITAL|||||ACK|1|P|2.5\rMSA|AR|"


class _MLLPHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        import hl7

        buf = b""
        while True:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            buf += chunk
            while END in buf:
                frame, buf = buf.split(END, 1)
                text = frame.lstrip(START).decode("utf-8", "replace")
                try:
                    ack = str(hl7.parse(text).create_ack("AA"))
                except Exception:  # not HL7: answer AR rather than hang the sender
                    ack = REJECT
                self.server.record(text)  # type: ignore[attr-defined]
                self.request.sendall(START + ack.encode() + END)


class MLLPListener(socketserver.ThreadingTCPServer):
    """Acknowledges every message on (host, port) (0: a free port) and keeps it in ``messages``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        super().__init__((host, port), _MLLPHandler)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, name="mllp", daemon=True)
        self.thread.start()

    def record(self, text: str) -> None:
        with self._lock:
            self.messages.append(text)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
