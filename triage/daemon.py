"""`triage serve`: receive, assemble, score, report and send, together, until SIGTERM.

Each stage is a loop in its own thread over the store (see triage.pipeline), so a slow PACS never
holds up receiving, and scoring (the CPU-heavy part) never holds up the DICOM listener. The DICOM
listener runs in ``dicom.workers`` processes (:mod:`triage.receive.workers`), or in this process when
that is 1.

Stages wake each other instead of polling: each loop sleeps on its own event, set by the stage
before it when it produced work (a stored instance wakes the assembler, an assembled study the
scorer, a queued result the sender), and otherwise until the next moment its input can become due
(the first receiving series' quiet period, the first outbox retry). A slow timer (``SAFETY_S``) stays
as a safety net: a wake-up lost to a bug or a crashed worker costs seconds, never a stuck study. A model set
that cannot load stops only the scoring loop, which retries and logs the reason; studies wait in
``assembled`` and nothing is dropped. A new model set promoted by the nightly retrain is picked up
at the next scoring round (the registry's ``current`` link is read every round).

At start the daemon warms up (:meth:`Daemon.warmup`, :mod:`triage.warmup`; ``[scoring] warmup``) after
the DICOM port listens and before the stages run and it reports ready, so the first study is as fast as
the next.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable

import pydicom.config

from triage.config import Config
from triage.model.registry import Registry, RegistryError
from triage.model.score import Scorer, Scorers, ScoringError
from triage.ops import systemd
from triage.ops.logs import get_logger
from triage.ops.metrics import METRICS, start_http
from triage.pipeline import HeaderCache, Sender, assemble_due, report_scored, score_assembled
from triage.receive.scp import Receiver
from triage.receive.workers import WorkerPool, apply_metric, worker_count
from triage.store.db import Store
from triage.store.rebuild import StateDbError, check_or_raise
from triage.warmup import warm_up

log = get_logger("daemon")

SAFETY_S = 5.0  # the longest any stage sleeps without a wake-up (the safety net)


class Daemon:
    """The whole data path in one process."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        # pydicom's value-validation warnings quote the offending value (a birth date, a name):
        # the daemon does not validate what it archives, and must not put those values in a log.
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        # state.db lost or corrupt: refuse with the file and the command to run (triage.store.rebuild)
        check_or_raise(cfg.storage_root, str(cfg.source) if cfg.source else None)
        self.store = Store(cfg.storage_root)
        self.registry = Registry(cfg.models_dir)
        self.stop_event = threading.Event()
        self.receiver: Receiver | None = None
        self.pool: WorkerPool | None = None
        # one event per stage: set by whoever made work for it (see the module docstring)
        self.wake = {name: threading.Event() for name in ("assemble", "score", "send")}
        self._assembler_planned = False  # sleeping until a due series: a new instance cannot be earlier
        self.scorer: Scorers | None = None
        self.scorer_error: str | None = None
        self.threads: list[threading.Thread] = []
        self.scheduler = None
        self.headers = HeaderCache()  # what the assembler parsed, for the report (no second parse)

    # -- stages ----------------------------------------------------------------------------------
    def _loop(self, name: str, step: Callable[[], int], wake_next: str | None,
              sleep_s: Callable[[], float]) -> None:
        """Run ``step`` until it finds nothing, wake ``wake_next`` when it did something, then sleep
        on this stage's event for at most ``sleep_s()`` (never more than SAFETY_S)."""
        event = self.wake[name]
        while not self.stop_event.is_set():
            event.clear()  # before the step: a wake-up during it makes the next wait return at once
            try:
                busy = step()
            except Exception:  # a stage must never die: log with traceback and go on
                log.exception("stage_error", loop=name)
                busy = 0
            if busy and wake_next is not None:
                self.wake[wake_next].set()
            if not busy:
                try:
                    timeout = min(SAFETY_S, max(0.0, sleep_s()))
                except Exception:
                    log.exception("stage_error", loop=name)
                    timeout = SAFETY_S
                event.wait(timeout)

    def _assemble_step(self) -> int:
        return assemble_due(self.store, self.cfg, headers=self.headers, on_study=self.wake["score"].set)

    def _assemble_sleep(self) -> float:
        """Until the first receiving series is due (its quiet period or force time ends)."""
        a = self.cfg.settings.assembly
        now = self.store.clock()
        due = self.store.next_series_due(a.quiet_seconds, a.force_seconds, after=now)
        if due is None:
            self._assembler_planned = False
            return SAFETY_S
        left = due - now + 0.005  # just past the due moment (series_due uses <=)
        self._assembler_planned = left <= SAFETY_S
        return left

    def _send_sleep(self) -> float:
        """Until the first outbox retry is due (new rows wake the sender)."""
        now = self.store.clock()
        due = self.store.outbox_next_attempt(after=now)
        return SAFETY_S if due is None else due - now + 0.005

    def instance_stored(self) -> None:
        """A receiver stored an instance: wake the assembler unless it already sleeps until a due
        series (every new instance's quiet period ends later than that)."""
        if not self._assembler_planned:
            self.wake["assemble"].set()

    def _worker_event(self, name: str, args: list) -> None:
        apply_metric(name, args)
        if name == "instance_received":
            self.instance_stored()

    def _current_scorer(self) -> Scorers | None:
        """The current set of every kind (head CT, chest radiograph), reloaded when one changes."""
        try:
            currents = self.registry.currents()
        except RegistryError as exc:
            currents, reason = {}, str(exc)
        else:
            reason = f"no current model set under {self.registry.root}" if not currents else None
        if not currents:
            self._scoring_unavailable(reason or "no model set")
            return None
        wanted = {k: cs.version for k, cs in currents.items()}
        if self.scorer is None or self.scorer.versions != wanted:
            s = self.cfg.settings.scoring
            loaded: dict[str, Scorer] = {}
            for kind, cs in currents.items():
                old = self.scorer.by_kind.get(kind) if self.scorer is not None else None
                if old is not None and old.info.version == cs.version:
                    loaded[kind] = old
                    continue
                try:
                    loaded[kind] = Scorer(cs, device=s.device, threads=s.threads, flag_policy=s.flag_policy,
                                          batch_size=s.batch_size)
                except ScoringError as exc:
                    self._scoring_unavailable(str(exc))
                    continue
                info = loaded[kind].info
                METRICS.model_set_loaded(info.version, info.device_uid, info.preset, kind=kind)
                log.info("model_set_loaded", version=info.version, device_uid=info.device_uid,
                         preset=info.preset, kind=kind, device=loaded[kind].device.type)
            if not loaded:
                self.scorer = None
                return None
            self.scorer = Scorers(loaded, self.registry)
            if self.scorer.versions != wanted:  # one kind failed to load: try it again next round
                return self.scorer
            self.scorer_error = None
        return self.scorer

    def _scoring_unavailable(self, reason: str) -> None:
        if reason != self.scorer_error:  # log once per distinct reason, not every round
            log.error("scoring_stopped", reason=reason, note="receiving goes on; studies wait in 'assembled'")
        self.scorer_error = reason

    def _score_step(self) -> int:
        scorer = self._current_scorer()
        if scorer is None:
            return 0
        # One model call's worth of studies per round (one on a CPU, up to [scoring] batch_size on a
        # GPU), reported at once (SRs and ORUs queued, the sender woken) before the next round: a
        # study scored first must not wait for more than its own batch before its results go out.
        n = score_assembled(self.store, scorer, limit=scorer.batch_size)
        n += report_scored(self.store, scorer, self.cfg, headers=self.headers)
        if n:
            self.wake["send"].set()
        return n

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.store.recover()  # logs what it found itself
        METRICS.configure(self.cfg)
        METRICS.bind_queue(self.store.queue_counts, self.store.queue_oldest_age)
        METRICS.bind_spool(self.cfg.storage_root, self.cfg.settings.storage.min_free_mb * 1024 * 1024)
        self.metrics_server = start_http(self.cfg)
        workers = worker_count(self.cfg)
        if workers > 1:
            self.pool = WorkerPool(self.cfg, workers, self._worker_event)
            self.pool.start()
        else:
            self.receiver = Receiver(self.cfg, self.store, on_stored=self.instance_stored)
            self.receiver.start(block=False)
        if self.cfg.settings.scoring.warmup:
            self.warmup()
        sender = Sender(self.store, self.cfg)
        for name, step, wake_next, sleep_s in (
            ("assemble", self._assemble_step, "score", self._assemble_sleep),
            ("score", self._score_step, "send", lambda: SAFETY_S),
            ("send", sender.drain, None, self._send_sleep),
        ):
            t = threading.Thread(target=self._loop, args=(name, step, wake_next, sleep_s), name=name,
                                 daemon=True)
            t.start()
            self.threads.append(t)
        if self.cfg.settings.retrain.enabled:
            from triage.ops.schedule import start_scheduler

            self.scheduler = start_scheduler(self.cfg)
        port = (self.pool or self.receiver).address[1]  # type: ignore[union-attr]
        systemd.notify(f"READY=1\nSTATUS=receiving on port {port}")
        log.info("serving", dicom_port=port, storage_root=str(self.cfg.storage_root),
                 receiver_workers=workers)

    def warmup(self) -> dict | None:
        """The data path once on a synthetic study (:mod:`triage.warmup`), logged as ``warmup_done``
        with seconds per part; returns what it logged, None when it failed as a whole.

        Where it runs, and why there: after the DICOM port listens and before the stage threads start
        and the daemon reports ready (``READY=1``, ``serving``). Listening first keeps a restart from
        refusing any modality: what arrives meanwhile is stored (durably, as always) and assembled as
        soon as the stages start. Before the stages, because in the background it would compete with
        the first real studies for the same cores (the cost it exists to remove, moved, not removed),
        and before ``serving`` because ready should mean "results at full speed"; the start-up takes
        the warm-up's seconds longer, said in ``warmup_done``. It loads the current model sets (what the
        first scoring round does anyway). Any failure is logged and the daemon serves regardless."""
        t0 = time.perf_counter()
        try:
            scorer = self._current_scorer()  # loading the sets: what the first scoring round did before
            loaded = time.perf_counter()
            out = warm_up(self.cfg, scorer)
        except Exception as exc:  # an optimisation must never stop the daemon
            log.exception("warmup_failed", reason=f"{type(exc).__name__}: {exc}")
            return None
        out["seconds"] = {"load_model_sets": round(loaded - t0, 3), **out["seconds"]}
        out["total_s"] = round(time.perf_counter() - t0, 3)
        log.info("warmup_done", **out)
        return out

    def stop(self) -> None:
        systemd.notify("STOPPING=1")
        if self.receiver is not None:
            self.receiver.stop()
        if self.pool is not None:
            self.pool.stop()
        self.stop_event.set()
        for event in self.wake.values():
            event.set()
        for t in self.threads:
            t.join(timeout=30)
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if getattr(self, "metrics_server", None) is not None:
            self.metrics_server.close()
        self.store.close()
        log.info("stopped")

    def run_forever(self) -> None:
        """Start, then wait for SIGTERM/SIGINT while pinging the systemd watchdog."""
        stop = threading.Event()

        def _on_signal(signum: int, _frame: object) -> None:
            log.info("signal", signum=signum)
            stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        self.start()
        interval = systemd.watchdog_interval()
        tick = interval / 2 if interval else 5.0
        try:
            while not stop.wait(tick):
                if interval and all(t.is_alive() for t in self.threads):
                    systemd.notify("WATCHDOG=1")
        finally:
            self.stop()


def serve(cfg: Config) -> int:
    try:
        daemon = Daemon(cfg)
    except StateDbError as exc:
        log.error("state_db_unusable", reason=str(exc))
        print(f"triage serve: {exc}", file=sys.stderr)
        return 1
    daemon.run_forever()
    return 0


def wait_until(predicate: Callable[[], bool], timeout_s: float, every_s: float = 0.1) -> bool:
    """Poll ``predicate`` until true or timeout (used by the demo and tests)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every_s)
    return predicate()
