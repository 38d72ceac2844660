"""Stages wake each other: the daemon's assembler runs when a series' quiet period ends, not at its
next poll, whether the listener runs in the daemon (``workers = 1``) or in worker processes.

The daemon runs in this process (real receiver, real store, storescu as the sender); there is no model
set, so the study stops at ``assembled`` (or ``rejected``): the wake-up measured here is the one from
a stored instance to the assembler. The safety-net timer is 5 s, so a lost wake-up shows as seconds.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from triage.config import parse
from triage.daemon import SAFETY_S, Daemon

integration = pytest.mark.integration

QUIET_S = 1.0


@integration
@pytest.mark.parametrize("workers", [1, 2])
def test_assembler_wakes_when_the_quiet_period_ends(
    workers: int, tools: SimpleNamespace, tmp_path: Path, free_port: Any
) -> None:
    from training.harness.storescu import storescu_parallel

    cfg = parse({
        "dicom": {"ae_title": "GLOWTRIAGE", "host": "127.0.0.1", "port": free_port(), "workers": workers},
        "storage": {"root": str(tmp_path / "var"), "min_free_mb": 1},
        "assembly": {"quiet_seconds": QUIET_S},
        "metrics": {"enabled": False},
        "logging": {"level": "info", "format": "json"},
    }, None)
    daemon = Daemon(cfg)
    daemon.start()
    try:
        time.sleep(0.5)  # the assembler is asleep on its 5 s safety timer: only a wake-up is on time
        files = tools.write_ct_series(tmp_path / "ct", 24, 64, seed=9)
        storescu_parallel(daemon.cfg.settings.dicom.port, [files[0::2], files[1::2]], called="GLOWTRIAGE")
        store = daemon.store
        study = store.studies(limit=1)[0].study_uid
        deadline = time.monotonic() + QUIET_S + SAFETY_S + 10
        while time.monotonic() < deadline:
            moved = [e for e in store.events(study) if e.kind == "state" and e.to_state == "stable"]
            if moved:
                break
            time.sleep(0.05)
        assert moved, "the study was never found complete"
        last = max(s.last_received_at for s in store.study_series(study))
        late = moved[0].at - (last + QUIET_S)
        # due at last + quiet; the old poll (quiet/4) or the safety net (5 s) would show here
        assert -0.01 <= late < 0.5, f"assembled {late:.3f} s after the quiet period ended"
    finally:
        daemon.stop()
