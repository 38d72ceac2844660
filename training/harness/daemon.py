"""``python -m triage.cli serve --config FILE`` (or the receiver alone) as a real subprocess.

Ready means this run's JSON log holds the ready event: ``serving`` for the daemon (receiver, pipeline and
outbox all up), ``listening`` where only the DICOM port matters. The log is appended to, so a restart
on the same config keeps the first run's lines, and readiness is read from where this run began.
Stopping is SIGTERM (the daemon drains and logs ``stopped``), then SIGKILL after a grace period;
``kill()`` is SIGKILL at once, as in a power cut of the process.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from training.harness.process import HarnessError, start_logged, stop_process

REPO = Path(__file__).resolve().parents[2]
SERVE = ("-m", "triage.cli", "serve")  # the whole daemon, as deployed
RECEIVER = ("-m", "triage.receive.scp")  # the receiver alone (the ingest bench)


class TriageProcess:
    """One glowtriage process on ``config`` with its output in ``log`` (JSON lines)."""

    def __init__(
        self,
        config: Path,
        log: Path,
        *,
        argv: Sequence[str] = SERVE,
        ready_event: str = "serving",
        env: Mapping[str, str] | None = None,
        cwd: Path = REPO,
        start_timeout: float = 120.0,
        stop_grace: float = 60.0,
    ) -> None:
        self.config = Path(config)
        self.log = Path(log)
        self.argv = [sys.executable, *argv, "--config", str(self.config)]
        self.ready_event = ready_event
        self.env = dict(env or {})
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self, timeout: float | None = None) -> TriageProcess:
        """Start (or restart, appending to the same log) and wait for this run's ready event."""
        timeout = self.start_timeout if timeout is None else timeout
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        env = {"PYTHONUNBUFFERED": "1", **self.env}
        self.proc = start_logged(self.argv, self.log, cwd=self.cwd, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(f"{self.argv[2]} exited with {self.proc.returncode}:\n{self.tail()}")
            if any(ev.get("event") == self.ready_event for ev in self.events(self._offset)):
                return self
            time.sleep(0.1)
        self.stop()  # not ready in time: no daemon left behind holding the port, the store and its workers
        raise HarnessError(f"{self.argv[2]}: no {self.ready_event!r} after {timeout:.0f} s:\n{self.tail()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, ``stop_grace`` seconds for a clean shutdown, then SIGKILL; the exit status."""
        return stop_process(self.proc, grace=self.stop_grace, kill_wait=10.0)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as in a power cut of the process."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    # ------------------------------------------------------------------------------------ log
    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log.read_text(encoding="utf-8", errors="replace")
        return ""

    def tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:]

    def events(self, offset: int = 0) -> Iterator[dict[str, Any]]:
        """The JSON log records from byte ``offset`` on (lines that are not JSON objects are skipped)."""
        if not self.log.exists():
            return
        with open(self.log, "rb") as f:
            f.seek(offset)
            for line in f:
                with contextlib.suppress(ValueError):
                    ev = json.loads(line)
                    if isinstance(ev, dict):
                        yield ev

    def log_events(self) -> list[dict[str, Any]]:
        """Every JSON log record of every run on this log."""
        return list(self.events())

    # ------------------------------------------------------------------------------------ CLI
    def status(self, limit: int = 100000, timeout: float = 120.0) -> dict[str, Any]:
        """``triage status --json`` (a separate process, exactly what an operator would run)."""
        argv = [sys.executable, "-m", "triage.cli", "status", "--json", "--limit", str(limit)]
        out = subprocess.run(
            [*argv, "--config", str(self.config)],
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if out.returncode != 0:
            raise HarnessError(f"triage status failed ({out.returncode}): {out.stderr.strip()[-500:]}")
        return dict(json.loads(out.stdout))
