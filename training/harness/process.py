"""Child processes for the harness: start one with its output in a log file, stop it, wait on it.

Every peer the harness starts (Orthanc, ``triage serve``, ``storescp``) is stopped the same way: SIGTERM,
a grace period for a clean shutdown, then SIGKILL, so a hung peer never outlives the test or demo that
started it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class HarnessError(RuntimeError):
    """A peer could not be started or did not become ready; the message says where its log is."""


def start_logged(
    argv: Sequence[str],
    log: Path,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr appended to ``log`` (so a restart keeps the earlier run's
    lines); ``env`` is added to this process's environment."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:  # the child holds its own descriptor; ours can close at once
        return subprocess.Popen(
            list(argv), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )


def stop_process(
    proc: subprocess.Popen[bytes] | None, grace: float = 20.0, kill_wait: float = 5.0
) -> int | None:
    """SIGTERM, up to ``grace`` seconds for a clean exit, then SIGKILL; returns the exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(kill_wait)
    return proc.returncode


def wait_for(
    pred: Callable[[], T | None],
    timeout: float,
    what: str,
    every: float = 0.5,
    error: type[Exception] = AssertionError,
) -> T:
    """Poll ``pred`` until it returns something truthy (which is returned); ``error`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise error(f"timed out after {timeout}s waiting for {what}")


def require_tool(name: str) -> str:
    """The path of the program ``name``; :class:`HarnessError` when it is not installed."""
    path = shutil.which(name)
    if path is None:
        raise HarnessError(f"{name} is not installed (scripts/bootstrap.sh installs it)")
    return path


def stop_all(*peers: Any) -> None:
    """``stop()`` every peer that was made (None: never started), last started first, each even when
    an earlier one failed to stop (the first failure is raised after)."""
    errors: list[BaseException] = []
    for peer in reversed(peers):
        if peer is None:
            continue
        try:
            peer.stop()
        except Exception as exc:  # the others must still be stopped
            errors.append(exc)
    if errors:
        raise errors[0]
