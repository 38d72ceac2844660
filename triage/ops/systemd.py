"""sd_notify without libsystemd: readiness and watchdog pings for a Type=notify unit.

Why our own twenty lines instead of the ``systemd`` Python bindings: the protocol is one datagram on
an AF_UNIX socket named in ``$NOTIFY_SOCKET``, and the bindings need libsystemd headers to build, which
hospital servers often do not have. Outside systemd (tests, a terminal, Docker) the variables are unset
and every call is a cheap no-op, so the daemon calls these unconditionally.

The daemon's use:

    notify("READY=1")                   # after the DICOM listener is bound and the store is open
    interval = watchdog_interval()      # None: no watchdog configured
    ... every interval: notify("WATCHDOG=1") from the main loop, only while it is healthy
    notify("STOPPING=1")                # on SIGTERM, before draining
    notify("STATUS=3 studies queued")   # free text shown by `systemctl status`
"""

from __future__ import annotations

import os
import socket

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def _address(name: str) -> str | bytes:
    # "@name" is Linux's abstract namespace: a leading NUL byte, no file on disk.
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, ``"WATCHDOG=1"``, several lines joined by newlines) to systemd.

    Returns True when the message was sent, False when there is no ``$NOTIFY_SOCKET`` (not started by
    systemd) or the send failed: a notification problem must never take the daemon down, and systemd's
    watchdog will notice a daemon that really stopped pinging.
    """
    name = os.environ.get(NOTIFY_SOCKET)
    if not name or not state:
        return False
    if not name.startswith(("/", "@")):
        return False  # systemd only hands out absolute paths or abstract names
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(name))
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when systemd expects none.

    systemd sets ``$WATCHDOG_USEC`` to the unit's WatchdogSec; we ping at half of it, as
    sd_watchdog_enabled(3) recommends, so one late tick does not get the daemon killed.
    ``$WATCHDOG_PID``, when set, names the process meant; in another process (a child, a test) the
    watchdog is not ours to feed.
    """
    usec = os.environ.get(WATCHDOG_USEC)
    if not usec:
        return None
    pid = os.environ.get(WATCHDOG_PID)
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000 / 2
