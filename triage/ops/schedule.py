"""apscheduler jobs of the daemon: the nightly M1 retrain of every current model set.

``start_scheduler(cfg)`` (called by ``triage serve`` when ``[retrain] enabled``) runs one
``BackgroundScheduler`` with a single job on ``CronTrigger.from_crontab(retrain.cron)`` in local time:
``max_instances=1`` (a retrain still running when the next one is due is not doubled), ``coalesce``
(runs missed while the machine slept collapse into one) and a misfire grace of an hour.

The job (:class:`RetrainJob`) retrains each kind of model set that has a current set (head CT, chest
radiograph: :func:`current_kinds`), one after the other, each in its own child process with its own
archive (the studies of that kind), gate, promotion and history line: a chest retrain never touches
the head-CT set, and one kind's crash or timeout (``timeout_s`` per kind) leaves the other's night as
it is. It does no training itself: for each kind it starts ``python -m training.train.retrain --kind K``
as a child process (which lowers its own priority to ``[retrain] nice``, see
:mod:`training.train.retrain`) and waits for it. So the daemon process never imports ``training``
nor holds the GIL for a training step, and a child that crashes, is killed by the OOM killer or runs
past ``timeout_s`` costs one night's retrain and nothing else: the registry is only touched after the
gate. The job then turns the run's record into metrics and, when the child left none (killed), writes
the failure line to ``<models>/retrain.jsonl`` itself. Metrics after every run, labelled ``kind``:
``glowtriage_retrain_duration_seconds``; ``glowtriage_retrain_gate_passed`` 1 only when a new model
passed the gate, so 0 after a rejected, a skipped (too few volumes: no model to pass it) or a failed
run, which the history's ``outcome`` tells apart; ``glowtriage_retrain_last_success_timestamp_seconds``
moves only on a promotion, and is restored from the history at start-up.

The scheduler returned is the apscheduler object with one change: ``shutdown()`` also stops a running
retrain child (SIGTERM, then SIGKILL), so stopping the daemon never waits hours for a training run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from triage.config import Config
from triage.ops.history import (
    RESULT,
    WORKDIR_PREFIX,
    append_history,
    last_success,
    new_workdir,
    read_history,
)
from triage.ops.logs import get_logger
from triage.ops.metrics import METRICS, Metrics

JOB_ID = "retrain"
# The registry's pointers (triage.model.registry.current_name; ops sits below model and cannot import
# it): ``current`` is the head-CT set's, ``current-<kind>`` another kind's. tests/unit/test_retrain.py
# checks that both modules agree.
HEAD_KIND = "ct"
CURRENT = "current"
MISFIRE_GRACE_S = 3600
TERMINATE_GRACE_S = 10.0

log = get_logger("schedule")


def current_kinds(models_dir: Path) -> list[str]:
    """The kinds that have a current model set (head CT first), read from the registry's pointers."""
    root = Path(models_dir)
    kinds = []
    if (root / CURRENT).is_symlink():
        kinds.append(HEAD_KIND)
    with contextlib.suppress(OSError):
        kinds += sorted(p.name.removeprefix(f"{CURRENT}-") for p in root.glob(f"{CURRENT}-*")
                        if p.is_symlink() and p.name.removeprefix(f"{CURRENT}-").isalnum())
    return kinds


def last_success_by_kind(models_dir: Path) -> dict[str, float]:
    """Unix time of each kind's newest promoted retrain (a record without ``kind`` is head CT)."""
    out: dict[str, float] = {}
    for rec in read_history(models_dir):
        if rec.get("outcome") == "promoted" and isinstance(rec.get("finished_at"), (int, float)):
            out[str(rec.get("kind") or HEAD_KIND)] = float(rec["finished_at"])
    return out


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"retrain process was killed by signal {-rc} ({name})"
    return f"retrain process exited with status {rc} without a result"


class RetrainJob:
    """The scheduled callable: one retrain per kind, each in a child process, then metrics.
    Thread-safe to cancel."""

    def __init__(self, cfg: Config, metrics: Metrics | None = None):
        self.cfg = cfg
        self.metrics = metrics or METRICS
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._cancelled = False
        self.workdir: Path | None = None  # of the run in progress (tests watch it)

    def command(self, workdir: Path, kind: str = HEAD_KIND) -> list[str]:
        cmd = [sys.executable, "-m", "training.train.retrain", "--workdir", str(workdir),
               "--parent-pid", str(os.getpid()), "--kind", kind]
        if self.cfg.source is not None:
            cmd += ["--config", str(self.cfg.source.resolve())]
        return cmd

    def __call__(self) -> dict[str, dict[str, Any]]:
        """Retrain every kind with a current set, one after the other; their history records by kind.

        With no current set at all the head-CT run still starts, so the history says why nothing was
        retrained. A shutdown stops the run in progress and starts no other kind.
        """
        records: dict[str, dict[str, Any]] = {}
        for kind in current_kinds(self.cfg.models_dir) or [HEAD_KIND]:
            with self._lock:
                if self._cancelled and records:
                    break
            records[kind] = self.run_kind(kind)
        return records

    def run_kind(self, kind: str) -> dict[str, Any]:
        """Run one kind's retrain to its end and return its history record."""
        rs = self.cfg.settings.retrain
        models = self.cfg.models_dir
        t0 = time.time()
        workdir = new_workdir(models)
        run_id = workdir.name.removeprefix(WORKDIR_PREFIX)
        log.info("retrain_started", run=run_id, kind=kind, window_days=rs.window_days, steps=rs.steps,
                 init_from=rs.init_from, nice=rs.nice)
        timed_out = False
        rc: int | None = None
        error: str | None = None
        try:
            with self._lock:
                if self._cancelled:
                    raise RuntimeError("scheduler is shutting down")
                self.workdir = workdir
                # cwd: without --config the child resolves the defaults' relative paths like we do
                self._proc = subprocess.Popen(self.command(workdir, kind), cwd=self.cfg.base_dir,
                                              stdin=subprocess.DEVNULL)
            try:
                rc = self._proc.wait(timeout=rs.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                self._stop_child()
                rc = self._proc.returncode
        except Exception as exc:  # could not start the child (fork failed, no memory, shutting down)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                self._proc = None
        record = self._record(workdir, run_id, kind, t0, rc, timed_out, error)
        shutil.rmtree(workdir, ignore_errors=True)
        with self._lock:
            self.workdir = None
        self.metrics.retrain_finished(
            success=record.get("outcome") == "promoted",
            duration_s=float(record.get("duration_s") or 0.0),
            gate_passed=bool((record.get("gate") or {}).get("passed")),
            finished_at=float(record.get("finished_at") or time.time()),
            kind=kind,
        )
        level = log.info if record.get("outcome") in ("promoted", "skipped") else log.warning
        level("retrain_job_done", run=run_id, kind=kind, outcome=record.get("outcome"),
              reason=record.get("reason"),
              version=record.get("version"), duration_s=record.get("duration_s"))
        return record

    def _record(self, workdir: Path, run_id: str, kind: str, t0: float, rc: int | None, timed_out: bool,
                error: str | None) -> dict[str, Any]:
        """The child's record, or a ``failed`` one written here when the child left none."""
        with contextlib.suppress(OSError, json.JSONDecodeError):
            rec = json.loads((workdir / RESULT).read_text())
            if isinstance(rec, dict) and rec.get("run") == run_id:
                return rec
        for rec in reversed(read_history(self.cfg.models_dir)[-20:]):  # written, then killed
            if rec.get("run") == run_id:
                return rec
        if error is not None:
            reason = f"could not run the retrain process: {error}"
        elif timed_out:
            reason = f"retrain ran longer than retrain.timeout_s = {self.cfg.settings.retrain.timeout_s:g} s"
        else:
            reason = _describe_exit(rc if rc is not None else -1)
        t1 = time.time()
        rec = {"run": run_id, "kind": kind, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t1)), "finished_at": t1,
               "duration_s": round(t1 - t0, 3), "outcome": "failed", "reason": reason,
               "gate": {"passed": False}, "version": None}
        with contextlib.suppress(OSError):
            append_history(self.cfg.models_dir, rec)
        return rec

    def _stop_child(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=TERMINATE_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def cancel(self) -> None:
        """Stop a running retrain (daemon shutdown); later calls do nothing."""
        with self._lock:
            self._cancelled = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            log.info("retrain_cancelled", pid=proc.pid)
            proc.terminate()


class RetrainScheduler(BackgroundScheduler):
    """A BackgroundScheduler whose shutdown also stops a running retrain child."""

    def __init__(self, job: RetrainJob, **kwargs: Any):
        super().__init__(**kwargs)
        self.retrain_job = job

    def shutdown(self, wait: bool = True) -> None:
        self.retrain_job.cancel()
        super().shutdown(wait=wait)


def cron_trigger(cfg: Config) -> CronTrigger:
    """``retrain.cron`` as apscheduler reads it (local time zone)."""
    return CronTrigger.from_crontab(cfg.settings.retrain.cron)


def start_scheduler(cfg: Config, metrics: Metrics | None = None, *, paused: bool = False) -> RetrainScheduler:
    """Schedule the nightly retrain and start the scheduler thread; the daemon calls ``shutdown``.

    Also restores ``glowtriage_retrain_last_success_timestamp_seconds`` of each kind from the retrain
    history, so a restart does not read as "never retrained". ``paused`` starts it without running jobs
    (tests).
    """
    m = metrics or METRICS
    job = RetrainJob(cfg, m)
    sched = RetrainScheduler(job, job_defaults={"coalesce": True, "max_instances": 1,
                                                "misfire_grace_time": MISFIRE_GRACE_S})
    sched.add_job(job, cron_trigger(cfg), id=JOB_ID, name="nightly M1 retrain", replace_existing=True)
    m.retrain_kinds(current_kinds(cfg.models_dir))
    for kind, when in last_success_by_kind(cfg.models_dir).items():
        m.retrain_restore(when, kind=kind)
    ts = last_success(cfg.models_dir)
    sched.start(paused=paused)
    nxt = sched.get_job(JOB_ID).next_run_time
    log.info("retrain_scheduled", cron=cfg.settings.retrain.cron,
             next_run=nxt.isoformat() if nxt else None, last_success=ts)
    return sched
