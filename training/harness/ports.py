"""Loopback ports: one the OS says is free, whether a given one is, and waiting for a listener."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time

from training.harness.process import HarnessError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it; a tiny race remains, as everywhere)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could listen on (host, port) now (SO_REUSEADDR, as servers bind)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0, host: str = "127.0.0.1"
) -> None:
    """Return once something accepts TCP connections on (host, port); fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise HarnessError(f"{proc.args[0]} exited with {proc.returncode}")  # type: ignore[index]
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.1)
    raise HarnessError(f"nothing listening on {port} after {timeout}s")
