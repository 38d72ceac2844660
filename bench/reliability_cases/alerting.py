"""What an operator sees during an outage: the daemon's Prometheus metrics scraped over time, and the
shipped alert rules (deploy/prometheus/alerts.yml) evaluated by a real Prometheus server scraping the
same endpoint.

Why a real Prometheus and not a re-implementation of the expression: the claim to prove is "the alert
that ships would page during a PACS/RIS outage and clear after", and only Prometheus' own rule engine
(``for:`` pending/firing, staleness, label matching) can make it. The bench's own scraper keeps the
values themselves (queue depth and oldest age of the studies whose results wait in the outbox, retry
counts per destination) so the JSON shows them before, during and after, with or without Prometheus.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from training.harness.ports import free_port
from training.harness.process import start_logged, stop_process, wait_for

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
OUTAGE_ALERT = "GlowtriageDeliveryStalled"
# The daemon's metrics that show an outage (triage/ops/metrics.py): studies whose results wait in the
# outbox are in state "reported" until every destination acknowledged them.
WATCHED = {
    "depth_reported": ("glowtriage_queue_depth", {"state": "reported"}),
    "oldest_reported_s": ("glowtriage_queue_oldest_age_seconds", {"state": "reported"}),
    "depth_sent": ("glowtriage_queue_depth", {"state": "sent"}),
}


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # loopback only
        return bytes(r.read())


def scrape(port: int) -> dict[str, float]:
    """One scrape of the daemon's /metrics: the :data:`WATCHED` values and the retry and dead-letter
    counters summed per destination (``retries_<dest>``, ``dead_<dest>``)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = _get(f"http://127.0.0.1:{port}/metrics").decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            for key, (name, labels) in WATCHED.items():
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    out[key] = s.value
            if s.name == "glowtriage_outbox_retries_total":
                out[f"retries_{s.labels.get('destination', '?')}"] = s.value
            if s.name == "glowtriage_outbox_dead_letters_total":
                out[f"dead_{s.labels.get('destination', '?')}"] = s.value
    return out


class Prometheus:
    """A real ``prometheus`` server on loopback: scrapes the daemon every ``interval_s`` and evaluates
    the shipped alert rules at the same interval. ``alerts()`` is its /api/v1/alerts."""

    def __init__(self, work: Path, target_port: int, interval_s: float) -> None:
        self.work = work
        self.port = free_port()
        self.interval_s = interval_s
        self.target_port = target_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus is not installed (scripts/bootstrap.sh installs it)")
        self.work.mkdir(parents=True, exist_ok=True)
        cfg = self.work / "prometheus.yml"
        every = f"{max(1, round(self.interval_s))}s"
        cfg.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": every, "evaluation_interval": every},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {
                            "job_name": "glowtriage",
                            "static_configs": [{"targets": [f"127.0.0.1:{self.target_port}"]}],
                        }
                    ],
                }
            )
        )
        self.proc = start_logged(
            [
                binary,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={self.work / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            self.work / "prometheus.log",
        )
        wait_for(self._ready, 60, "prometheus ready", every=0.5)
        return self

    def _ready(self) -> bool:
        with contextlib.suppress(OSError):
            return _get(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).startswith(b"Prometheus")
        return False

    def alerts(self) -> list[dict[str, Any]]:
        body = json.loads(_get(f"http://127.0.0.1:{self.port}/api/v1/alerts"))
        return list(body.get("data", {}).get("alerts", []))

    def query(self, expr: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"query": expr})
        body = json.loads(_get(f"http://127.0.0.1:{self.port}/api/v1/query?{q}"))
        return list(body.get("data", {}).get("result", []))

    def stop(self) -> None:
        stop_process(self.proc, grace=10)


class Watch:
    """A thread that scrapes the daemon (and asks Prometheus for its alerts) every ``every_s`` and keeps
    the timeline; ``mark(name)`` records a moment (outage start, return, all delivered)."""

    def __init__(self, metrics_port: int, prometheus: Prometheus | None, every_s: float) -> None:
        self.metrics_port = metrics_port
        self.prometheus = prometheus
        self.every_s = every_s
        self.t0 = time.monotonic()
        self.samples: list[dict[str, Any]] = []
        self.marks: dict[str, float] = {}
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-watch", daemon=True)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def mark(self, name: str) -> None:
        self.marks[name] = self.now()

    def start(self) -> Watch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def sample(self) -> None:
        row: dict[str, Any] = {"t": self.now()}
        try:
            row.update(scrape(self.metrics_port))
        except OSError:
            self.errors += 1  # the daemon restarting, or busy: a gap, as Prometheus would see it
        if self.prometheus is not None:
            with contextlib.suppress(OSError, ValueError):
                alerts = self.prometheus.alerts()
                states = [a["state"] for a in alerts if a["labels"]["alertname"] == OUTAGE_ALERT]
                row["alert"] = states[0] if states else "inactive"
        self.samples.append(row)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def summary(self, start: str, end: str) -> dict[str, Any]:
        """Values before ``start``, between ``start`` and ``end`` and after ``end`` (marks); when the
        outage alert was first pending, first firing, and first inactive again after ``end``."""
        t_start, t_end = self.marks.get(start, 0.0), self.marks.get(end, float("inf"))

        def phase(rows: list[dict[str, Any]]) -> dict[str, Any]:
            keys = sorted({k for r in rows for k in r if k not in ("t", "alert")})
            out: dict[str, Any] = {"scrapes": len(rows)}
            for k in keys:
                vals = [r[k] for r in rows if k in r]
                out[k] = {"first": vals[0], "max": max(vals), "last": vals[-1]}
            out["alert_states"] = sorted({r["alert"] for r in rows if "alert" in r})
            return out

        before = [r for r in self.samples if r["t"] < t_start]
        during = [r for r in self.samples if t_start <= r["t"] < t_end]
        after = [r for r in self.samples if r["t"] >= t_end]

        def first(rows: list[dict[str, Any]], state: str) -> float | None:
            return next((r["t"] for r in rows if r.get("alert") == state), None)

        fired = first(during, "firing") or first(after, "firing")
        cleared = first([r for r in after if r["t"] > fired], "inactive") if fired is not None else None
        return {
            "marks": self.marks,
            "before": phase(before),
            "during": phase(during),
            "after": phase(after),
            "alert": OUTAGE_ALERT,
            "alert_evaluated": self.prometheus is not None,
            "alert_pending_at_s": first(during, "pending"),
            "alert_fired_at_s": fired,
            "alert_fired_after_outage_start_s": None if fired is None else round(fired - t_start, 1),
            "alert_firing_during_outage": first(during, "firing") is not None,
            "alert_cleared_at_s": cleared,
            "alert_cleared_after_return_s": None if cleared is None else round(cleared - t_end, 1),
            "scrape_errors": self.errors,
        }

    def timeline(self, keep: int = 400) -> list[dict[str, Any]]:
        """The samples, thinned to at most ``keep`` rows for the JSON."""
        step = max(1, len(self.samples) // keep)
        return self.samples[::step]
