"""Prometheus metrics of the daemon, and the /metrics endpoint.

Why a ``Metrics`` class on its own ``CollectorRegistry`` instead of prometheus-client's global default:
tests build a fresh one and assert exact counter values, and nothing imported by accident (a library
that registers on the default registry) can add series to what Prometheus scrapes from us. The daemon
uses the module-level ``METRICS``; ``METRICS.configure(cfg)`` once at start-up, then
``start_http(cfg)``.

Labels are bounded on purpose. Free-text reasons become one of :data:`REASON_CATEGORIES` through
:func:`reason_category`, AE titles and destination names are capped at :data:`MAX_LABEL_VALUES`
distinct values (then ``other``), and anything that looks like a DICOM UID is refused as a label:
a label value per study would grow Prometheus' memory without bound, and a UID or a patient attribute
in a label would copy identifiers into a system that is not meant to hold them. Study-level detail
belongs in the logs (UIDs only) and in ``triage status``.

What the pipeline calls (all cheap, thread-safe, never raise on odd input):

    METRICS.association_opened() / METRICS.association_closed()   # gauge of open associations
    METRICS.association(calling_ae, "released")     # once an association, with how it ended
    METRICS.instance_received(nbytes)                # every stored C-STORE instance
    METRICS.instance_rejected("disk full")           # C-STORE refused (reason: free text)
    METRICS.series_assembled() / METRICS.series_skipped("not a head CT")
    METRICS.study_scored(log_posterior, flagged, inference_s, device, kind="ct")   # kind: ct | cxr
    METRICS.result_acknowledged(seconds_since_series_complete)
    METRICS.outbox_retry("PACS") / METRICS.outbox_dead_letter("PACS")
    METRICS.model_set_loaded(version, device_uid, preset, kind="ct")
    METRICS.retrain_finished(success, duration_s, gate_passed, kind="ct")
    METRICS.bind_queue(store_counts_by_state, store_oldest_age_by_state)   # read at every scrape
"""

from __future__ import annotations

import contextlib
import logging
import platform
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from triage.config import Config

PREFIX = "glowtriage"
log = logging.getLogger("glowtriage.metrics")

# Study states of the store (DESIGN.md); every one is exported, 0 when empty, so a queue that empties
# shows 0 instead of vanishing (a vanished series breaks rate() and alert expressions).
STATES = ("receiving", "stable", "assembled", "scored", "reported", "sent", "rejected", "failed")

# Seconds from "series complete" to "result acknowledged by the PACS/RIS": 1 s to 10 min.
E2E_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 450.0, 600.0)
# One scoring forward pass: 10 ms (small GPU model) to 2 min (big CPU model).
INFERENCE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
DEFAULT_SCORE_BUCKETS = (-50.0, -20.0, -10.0, -5.0, -2.0, -1.0, -0.5, -0.2, -0.1, 0.0, 0.5, 1.0, 5.0)

# Association outcomes; anything else is counted as "other".
OUTCOMES = (
    "released",  # accepted, then ended normally
    "aborted",  # accepted, then aborted by either side or a network error
    "rejected_calling_ae",  # calling AE title not in dicom.allowed_calling_aets
    "rejected_called_ae",  # addressed to another AE title
    "rejected_peer",  # peer address not in dicom.allowed_peers
    "rejected_busy",  # dicom.max_associations reached
    "rejected_other",
)
DEVICES = ("cpu", "cuda", "mps")
# Kinds of study and of model set (triage.model.registry.KINDS; ops cannot import model): head CT and
# chest radiograph have their own sets, score distributions, flag rates and retrains, so what counts
# studies or scores them is labelled ``kind`` (a closed set: never a value from a study).
KINDS = ("ct", "cxr")
MAX_LABEL_VALUES = 32
OTHER = "other"

# Short categories for rejection/skip reasons, tried in order on the lower-cased reason. The pipeline
# may pass a category name itself; anything unrecognised is "other" (the log line has the detail).
_REASON_PATTERNS: tuple[tuple[str, str], ...] = (
    ("disk_full", r"disk|space|out of resources|no room|quota"),
    ("not_allowed", r"not allowed|unauthori[sz]ed|forbidden|allow-list|allowlist|denied"),
    ("duplicate", r"duplicate|already (stored|received|exists)"),
    ("decode", r"decod|transfer syntax|compress|pixel data|jpeg|unsupported syntax"),
    ("not_ct", r"modality|not (a )?ct\b"),
    ("not_head", r"head|body part|brain|anatom"),
    ("image_type", r"image ?type|localizer|scout|derived|secondary|topogram"),
    ("slice_thickness", r"thickness|thick|thin"),
    ("coverage", r"coverage|too short|extent"),
    ("tilt", r"tilt|gantry|oblique"),
    ("missing_slices", r"gap|missing slice|spacing|missing instance"),
    ("too_few_slices", r"few|not enough|too small|single slice"),
    ("geometry", r"orientation|geometry|position|inconsistent|size mismatch|shape|rows|columns"),
    ("timeout", r"timeout|timed out"),
    ("invalid", r"invalid|malformed|corrupt|missing|unreadable|parse|required"),
)
REASON_CATEGORIES = (*(name for name, _ in _REASON_PATTERNS), OTHER)
_COMPILED_REASONS = tuple((name, re.compile(pattern)) for name, pattern in _REASON_PATTERNS)
_UID_LIKE = re.compile(r"^\s*\d+(\.\d+){2,}\s*$")
_LABEL_OK = re.compile(r"^[A-Za-z0-9 _.:@/-]{1,64}$")


def reason_category(reason: str) -> str:
    """A free-text reason ("slice thickness 0.6 mm < 2.0") as one of :data:`REASON_CATEGORIES`.

    Bounded on purpose: the raw reason may hold numbers, file names or UIDs, each of which would be a
    new time series.
    """
    text = str(reason).strip().lower()
    if text in REASON_CATEGORIES:
        return text
    for name, pattern in _COMPILED_REASONS:
        if pattern.search(text):
            return name
    return OTHER


def _closed_set(value: str, allowed: Sequence[str]) -> str:
    text = str(value).strip().lower()
    return text if text in allowed else OTHER


def _kind_label(kind: str) -> str:
    return _closed_set(kind, KINDS)


def _device_label(device: str) -> str:
    # "cuda:0", "cuda:1" -> "cuda": per-GPU detail is not worth a series per card here.
    return _closed_set(str(device).split(":", 1)[0], DEVICES)


class _BoundedLabel:
    """Label values from the outside world (AE titles, destination names), capped in number.

    UID-like or odd values are refused outright; once ``limit`` distinct values were seen, new ones
    become ``other``. ``expected`` values (from the config) are always admitted.
    """

    def __init__(self, limit: int = MAX_LABEL_VALUES):
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def expect(self, values: Iterable[str]) -> None:
        with self._lock:
            for v in values:
                text = str(v).strip()
                if _LABEL_OK.match(text) and not _UID_LIKE.match(text):
                    self._seen.add(text)

    def __call__(self, value: str) -> str:
        text = str(value).strip()
        if not _LABEL_OK.match(text) or _UID_LIKE.match(text):
            return OTHER
        with self._lock:
            if text in self._seen:
                return text
            if len(self._seen) < self.limit:
                self._seen.add(text)
                return text
        return OTHER


def _version() -> str:
    try:
        return metadata.version("glowtriage")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _existing(path: Path) -> Path | None:
    # The storage root may not exist yet at start-up; its file system is that of its nearest parent.
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return None


class _ScrapeCollector(Collector):
    """Values read at scrape time: queue depth and age from the store, free space of the spool."""

    def __init__(self, owner: Metrics):
        self.owner = owner

    def describe(self) -> list[Metric]:
        # Without describe(), registering would call collect() and with it the store callbacks.
        return self._families()

    def _families(self) -> list[Metric]:
        return [
            GaugeMetricFamily(
                f"{PREFIX}_queue_depth",
                "Studies in each pipeline state, read from the store.",
                labels=["state"],
            ),
            GaugeMetricFamily(
                f"{PREFIX}_queue_oldest_age_seconds",
                "Seconds since the oldest study in each state entered it (0 when the state is empty).",
                labels=["state"],
            ),
            GaugeMetricFamily(f"{PREFIX}_spool_free_bytes", "Free bytes on the storage root's file system."),
            GaugeMetricFamily(
                f"{PREFIX}_spool_size_bytes", "Size in bytes of the storage root's file system."
            ),
        ]

    def collect(self) -> Iterable[Metric]:
        depth, age, free, size = self._families()
        counts, ages = self.owner._read_queue()
        if counts is not None:
            for state in (*STATES, OTHER):
                if state in counts or state != OTHER:
                    depth.add_metric([state], counts.get(state, 0))
            yield depth
        if ages is not None:
            for state in STATES:
                age.add_metric([state], ages.get(state, 0.0))
            yield age
        usage = self.owner._read_spool()
        if usage is not None:
            free.add_metric([], usage.free)
            size.add_metric([], usage.total)
            yield free
            yield size


class Metrics:
    """Every metric of the daemon, on one registry; see the module docstring for what calls what."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        score_buckets: Sequence[float] = DEFAULT_SCORE_BUCKETS,
        process_metrics: bool = True,
    ):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        p = PREFIX
        self._calling_ae = _BoundedLabel()
        self._destination = _BoundedLabel()
        self._queue_counts: Callable[[], Mapping[str, int]] | None = None
        self._queue_ages: Callable[[], Mapping[str, float]] | None = None
        self._spool: Path | None = None

        self.associations_active = Gauge(f"{p}_associations_active", "Open DICOM associations.", registry=r)
        self.associations_total = Counter(
            f"{p}_associations",
            "DICOM associations by calling AE title and how they ended.",
            ["calling_ae", "outcome"],
            registry=r,
        )
        self.instances_received_total = Counter(f"{p}_instances_received", "Instances stored.", registry=r)
        self.bytes_received_total = Counter(f"{p}_bytes_received", "Bytes of instances stored.", registry=r)
        self.instances_rejected_total = Counter(
            f"{p}_instances_rejected", "C-STORE requests refused, by reason category.", ["reason"], registry=r
        )
        self.series_assembled_total = Counter(
            f"{p}_series_assembled", "Series assembled into volumes.", registry=r
        )
        self.series_skipped_total = Counter(
            f"{p}_series_skipped", "Series not scored, by reason category.", ["reason"], registry=r
        )
        self.studies_scored_total = Counter(
            f"{p}_studies_scored", "Studies scored, by kind (ct: head CT, cxr: chest radiograph).", ["kind"],
            registry=r,
        )
        self.studies_flagged_total = Counter(
            f"{p}_studies_flagged", "Studies flagged as abnormal, by kind.", ["kind"], registry=r
        )
        self.e2e_latency = Histogram(
            f"{p}_e2e_latency_seconds",
            "Seconds from series complete to result acknowledged by its destination.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            f"{p}_inference_seconds",
            "Seconds of one scoring (both flows) by device and study kind.",
            ["device", "kind"],
            buckets=INFERENCE_BUCKETS,
            registry=r,
        )
        self.outbox_retries_total = Counter(
            f"{p}_outbox_retries",
            "Failed delivery attempts that will be retried.",
            ["destination"],
            registry=r,
        )
        self.outbox_dead_letters_total = Counter(
            f"{p}_outbox_dead_letters",
            "Messages given up after outbox.max_attempts.",
            ["destination"],
            registry=r,
        )
        self.spool_reserve_bytes = Gauge(
            f"{p}_spool_reserve_bytes",
            "storage.min_free_mb in bytes: below it C-STORE is refused.",
            registry=r,
        )
        self.model_set = Info(f"{p}_model_set", "The model set in use for each kind.", ["kind"], registry=r)
        self.model_set.labels("ct").info({"version": "none", "device_uid": "", "preset": ""})
        self._score_buckets = tuple(float(b) for b in score_buckets)
        self.score_log_posterior = self._make_score_histogram()
        self.retrain_enabled = Gauge(f"{p}_retrain_enabled", "1 when the nightly retrain is on.", registry=r)
        self.retrain_last_success = Gauge(
            f"{p}_retrain_last_success_timestamp_seconds",
            "Unix time of the last successful retrain of each kind's set (0: none known).",
            ["kind"],
            registry=r,
        )
        self.retrain_duration = Gauge(
            f"{p}_retrain_duration_seconds", "Seconds the last retrain of each kind ran.", ["kind"],
            registry=r,
        )
        self.retrain_gate_passed = Gauge(
            f"{p}_retrain_gate_passed", "1 when the last retrain's model passed the gate, else 0.", ["kind"],
            registry=r,
        )
        self.build_info = Info(
            f"{p}_build", "Version of glowtriage and of the Python running it.", registry=r
        )
        self.build_info.info({"version": _version(), "python": platform.python_version()})
        r.register(_ScrapeCollector(self))
        if process_metrics:
            ProcessCollector(registry=r)  # process_start_time_seconds, memory, CPU, open fds

        # Known label values start at 0, so the first event is an increase() and not a new series.
        for reason in REASON_CATEGORIES:
            self.instances_rejected_total.labels(reason)
            self.series_skipped_total.labels(reason)
        self.retrain_kinds(["ct"])  # until the scheduler says which kinds have a set (as before kinds)
        for kind in KINDS:
            self.studies_scored_total.labels(kind)
            self.studies_flagged_total.labels(kind)
            self.score_log_posterior.labels(kind)
            for device in DEVICES:
                self.inference.labels(device, kind)
        # the outbox's own names of [pacs] and [hl7] (triage.config.RESERVED_DESTINATIONS): lower-case
        # ones here exported a second, always-zero pair of series beside the real ones
        self._expect_destinations(["PACS", "HL7"])

    # --- configuration -------------------------------------------------------------------------------

    def _make_score_histogram(self) -> Histogram:
        return Histogram(
            f"{PREFIX}_score_log_posterior",
            "Score log p(normal|x) of scored studies by kind, in nats.",
            ["kind"],
            buckets=self._score_buckets,
            registry=self.registry,
        )

    def _expect_destinations(self, names: Iterable[str]) -> None:
        names = list(names)
        self._destination.expect(names)
        for name in names:
            label = self._destination(name)
            self.outbox_retries_total.labels(label)
            self.outbox_dead_letters_total.labels(label)

    def configure(self, cfg: Config) -> None:
        """Apply config: score buckets, spool path and reserve, known destinations and AE titles."""
        s = cfg.settings
        buckets = tuple(float(b) for b in s.metrics.score_buckets)
        if buckets != self._score_buckets:
            # Buckets are fixed at construction, so a new histogram replaces the old (empty at start-up).
            self.registry.unregister(self.score_log_posterior)
            self._score_buckets = buckets
            self.score_log_posterior = self._make_score_histogram()
            for kind in KINDS:
                self.score_log_posterior.labels(kind)
        self.bind_spool(cfg.storage_root, s.storage.min_free_mb * 1024 * 1024)
        self.retrain_enabled.set(1 if s.retrain.enabled else 0)
        self._calling_ae.expect(s.dicom.allowed_calling_aets)
        self._expect_destinations([rule.name for rule in s.routing.rules])

    def bind_queue(
        self,
        counts: Callable[[], Mapping[str, int]],
        oldest_age_s: Callable[[], Mapping[str, float]] | None = None,
    ) -> None:
        """Read queue depth (studies by state) and, optionally, the oldest study's age per state at scrape.

        ``counts`` returns ``{state: n}``; ``oldest_age_s`` returns ``{state: seconds}`` for the study
        that has been in that state longest. Both run on the HTTP thread, so they must open their own
        database connection (SQLite connections are per thread) and be quick (one GROUP BY).
        """
        self._queue_counts = counts
        self._queue_ages = oldest_age_s

    def bind_spool(self, path: str | Path, reserve_bytes: int = 0) -> None:
        """Report free and total bytes of the file system holding ``path``, read at scrape."""
        self._spool = Path(path)
        self.spool_reserve_bytes.set(reserve_bytes)

    def _read_queue(self) -> tuple[dict[str, int] | None, dict[str, float] | None]:
        counts: dict[str, int] | None = None
        ages: dict[str, float] | None = None
        try:
            if self._queue_counts is not None:
                counts = {}
                for state, n in self._queue_counts().items():
                    key = state if state in STATES else OTHER
                    counts[key] = counts.get(key, 0) + int(n)
            if self._queue_ages is not None:
                ages = {s: float(v) for s, v in self._queue_ages().items() if s in STATES}
        except Exception as exc:  # a store hiccup must not break the scrape of everything else
            log.warning("queue metrics unavailable: %s", exc)
            return None, None
        return counts, ages

    def _read_spool(self) -> shutil._ntuple_diskusage | None:
        if self._spool is None:
            return None
        where = _existing(self._spool)
        if where is None:
            return None
        try:
            return shutil.disk_usage(where)
        except OSError as exc:
            log.warning("spool metrics unavailable for %s: %s", where, exc)
            return None

    # --- events --------------------------------------------------------------------------------------

    def association_opened(self) -> None:
        """An association was accepted and is now open."""
        self.associations_active.inc()

    def association_closed(self) -> None:
        """An open association ended (released or aborted)."""
        self.associations_active.dec()

    def association(self, calling_ae: str, outcome: str) -> None:
        """Count one association by calling AE title and outcome (one of :data:`OUTCOMES`), at its end."""
        self.associations_total.labels(self._calling_ae(calling_ae), _closed_set(outcome, OUTCOMES)).inc()

    def instance_received(self, nbytes: int) -> None:
        """One instance stored (after fsync), ``nbytes`` its file size."""
        self.instances_received_total.inc()
        if nbytes > 0:
            self.bytes_received_total.inc(nbytes)

    def instance_rejected(self, reason: str) -> None:
        """A C-STORE was refused; ``reason`` is free text (it is reduced to a category)."""
        self.instances_rejected_total.labels(reason_category(reason)).inc()

    def series_assembled(self) -> None:
        """A series became a volume ready to score."""
        self.series_assembled_total.inc()

    def series_skipped(self, reason: str) -> None:
        """A series was not scored (not a head CT, too thin, ...); ``reason`` is free text."""
        self.series_skipped_total.labels(reason_category(reason)).inc()

    def study_scored(self, log_posterior: float, flagged: bool, inference_s: float, device: str,
                     kind: str = "ct") -> None:
        """A study of ``kind`` (ct, cxr) was scored: its score, the decision, and how long the flows took
        on which device."""
        k = _kind_label(kind)
        self.studies_scored_total.labels(k).inc()
        if flagged:
            self.studies_flagged_total.labels(k).inc()
        if log_posterior == log_posterior:  # NaN would land in +Inf; the score logger reports it
            self.score_log_posterior.labels(k).observe(log_posterior)
        if inference_s >= 0:
            self.inference.labels(_device_label(device), k).observe(inference_s)

    def result_acknowledged(self, latency_s: float) -> None:
        """The study's result was acknowledged by its destination, ``latency_s`` after series complete."""
        if latency_s >= 0:
            self.e2e_latency.observe(latency_s)

    def outbox_retry(self, destination: str) -> None:
        """A delivery to ``destination`` (pacs, hl7 or a routing rule's name) failed and will be retried."""
        self.outbox_retries_total.labels(self._destination(destination)).inc()

    def outbox_dead_letter(self, destination: str) -> None:
        """A message to ``destination`` was given up after outbox.max_attempts."""
        self.outbox_dead_letters_total.labels(self._destination(destination)).inc()

    def model_set_loaded(self, version: str, device_uid: str, preset: str, kind: str = "ct") -> None:
        """The model set in use for ``kind`` changed (start-up, promote, rollback)."""
        self.model_set.labels(_kind_label(kind)).info(
            {"version": str(version), "device_uid": str(device_uid), "preset": str(preset)})

    def retrain_finished(
        self, success: bool, duration_s: float, gate_passed: bool, finished_at: float | None = None,
        kind: str = "ct",
    ) -> None:
        """A retrain of ``kind``'s set ended. ``success``: it trained, passed the gate and was promoted.

        A kind's last-success gauge exists (0) from its first run on, so an alert on the stalest kind
        (``min without (kind)``) sees a kind that never succeeded.
        """
        k = _kind_label(kind)
        self.retrain_duration.labels(k).set(duration_s)
        self.retrain_gate_passed.labels(k).set(1 if gate_passed else 0)
        last = self.retrain_last_success.labels(k)
        if success:
            last.set(time.time() if finished_at is None else finished_at)

    def retrain_kinds(self, kinds: Iterable[str]) -> None:
        """The kinds whose retrain gauges exist (0 until a run says more): those with a current set.

        A kind without one has no series, so the stale-retrain alert, which takes the stalest kind,
        does not fire for a kind the site does not score (a chest-only site has no head-CT retrain).
        """
        keep = {_kind_label(k) for k in kinds}
        for gauge in (self.retrain_last_success, self.retrain_duration, self.retrain_gate_passed):
            for k in KINDS:
                if k in keep:
                    gauge.labels(k)
                else:
                    with contextlib.suppress(KeyError):
                        gauge.remove(k)

    def retrain_restore(self, last_success: float, kind: str = "ct") -> None:
        """At start-up: the last success known to the model registry, so a restart does not forget it."""
        self.retrain_last_success.labels(_kind_label(kind)).set(last_success)


METRICS = Metrics()


@dataclass
class MetricsServer:
    """A running /metrics endpoint; ``close()`` stops it (tests, shutdown)."""

    server: WSGIServer
    thread: threading.Thread
    host: str
    port: int

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_http(cfg: Config, metrics: Metrics | None = None) -> MetricsServer | None:
    """Serve ``/metrics`` on ``[metrics] host:port`` (default 127.0.0.1:9464) in a daemon thread.

    Returns None when ``[metrics] enabled = false``, or when the port cannot be bound: the daemon
    keeps triaging without its metrics (logged as an error; Prometheus' ``up == 0`` alert fires), since
    a busy port is no reason to stop flagging bleeds.
    """
    m = metrics or METRICS
    settings = cfg.settings.metrics
    if not settings.enabled:
        return None
    try:
        server, thread = start_http_server(settings.port, addr=settings.host, registry=m.registry)
    except OSError as exc:
        log.error(
            "metrics endpoint not started: cannot bind %s:%s (%s); check [metrics] host/port in %s",
            settings.host,
            settings.port,
            exc.strerror or exc,
            cfg.source or "the embedded defaults",
        )
        return None
    return MetricsServer(server=server, thread=thread, host=settings.host, port=server.server_port)
