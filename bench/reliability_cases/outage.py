"""PACS and RIS down while studies arrive, then back: every result is delivered after they return,
exactly once (one SR per study in Orthanc, one ORU^R01 per study at the RIS), within the back-off bound.

The daemon runs as deployed (``triage serve``) with a tiny model set trained here (test-tiny preset on
synthetic studies, as the end-to-end test does): this case checks the outbox, not the model.
"""

from __future__ import annotations

import contextlib
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from training.harness.config import write_config
from training.harness.daemon import TriageProcess
from training.harness.mllp import MLLPListener
from training.harness.orthanc import Orthanc
from training.harness.ports import free_port
from training.harness.process import stop_all, wait_for
from training.harness.storescu import storescu


def _train_tiny(work: Path, m0: Path, m1: Path) -> None:
    from training.synth import SynthOptions, write_dataset
    from training.train.loop import VolumeSet, train
    from triage.assemble.volume import assemble_study, group_studies, read_headers
    from triage.config import AssemblySettings

    train_dir = work / "train"
    write_dataset(train_dir, normal=3, abnormal=2, seed=11, options=SynthOptions(distractors=False))
    headers, _ = read_headers(p for p in train_dir.rglob("*.dcm"))
    vols = {}
    for uid, series in group_studies(headers).items():
        _sel, vol = assemble_study(series, AssemblySettings())
        if vol is not None:
            vols[uid] = vol.data
    labels = dict(ln.split(",")[:2] for ln in (train_dir / "labels.csv").read_text().splitlines()[1:])
    normals = [v for uid, v in vols.items() if labels.get(uid) == "normal"]
    train(
        VolumeSet(normals, [f"n{i}" for i in range(len(normals))]),
        "test-tiny",
        m0,
        role="normal",
        steps=30,
        progress=False,
    )
    mixture = list(vols.values())
    train(
        VolumeSet(mixture, [f"m{i}" for i in range(len(mixture))]),
        "test-tiny",
        m1,
        role="mixture",
        steps=30,
        progress=False,
    )


def tiny_model_set(work: Path, root: Path) -> str:
    """Train M0/M1 (test-tiny, 30 steps) on 5 synthetic studies and promote them under ``root``.
    ``work/m0.pt`` and ``work/m1.pt``, when both exist already, are used as they are (a rerun on a
    loaded machine need not train again: only the plumbing is under test)."""
    from triage.model.registry import Registry

    m0, m1 = work / "m0.pt", work / "m1.pt"
    if not (m0.exists() and m1.exists()):
        _train_tiny(work, m0, m1)
    reg = Registry(root / "models")
    s = reg.create(
        m0,
        m1,
        preset="test-tiny",
        preprocessing_version="assemble-1",
        threshold=0.0,
        method="reliability bench: plumbing only",
        normal_scores=[-1.0, 1.0],
        provenance={},
        software_version="bench",
    )
    reg.promote(s.version)
    return str(s.version)


def _daemon_config(
    work: Path,
    root: Path,
    dicom_port: int,
    pacs_port: int,
    hl7_port: int,
    *,
    backoff_max_s: float = 10.0,
    metrics_port: int | None = None,
) -> Path:
    metrics: dict[str, Any] = (
        {"enabled": True, "host": "127.0.0.1", "port": metrics_port} if metrics_port else {"enabled": False}
    )
    return write_config(
        work / "config.toml",
        {
            "dicom": {"ae_title": "GLOWTRIAGE", "host": "127.0.0.1", "port": dicom_port},
            "storage": {"root": str(root), "min_free_mb": 1},
            "assembly": {"quiet_seconds": 3.0, "force_seconds": 120.0},
            "scoring": {"device": "cpu"},
            "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port},
            "hl7": {"enabled": True, "host": "127.0.0.1", "port": hl7_port},
            "outbox": {
                "max_attempts": 1000,
                "backoff_initial_s": 1.0,
                "backoff_max_s": backoff_max_s,
                "poll_s": 0.5,
            },
            "metrics": metrics,
            "logging": {"level": "info", "format": "json"},
        },
    )


def _results(study_uids: set[str], orthanc: Orthanc, mllp: MLLPListener) -> dict[str, Any]:
    """SRs per study in the PACS, ORU^R01 messages per study at the RIS; lost and doubled counts."""
    oru: dict[str, int] = {}
    for text in mllp.messages:
        for uid in study_uids:
            if uid in text:
                oru[uid] = oru.get(uid, 0) + 1
    srs = {uid: orthanc.sr_count(uid) for uid in study_uids}
    return {
        "sr_per_study": sorted(set(srs.values())),
        "oru_per_study": sorted({oru.get(u, 0) for u in study_uids}),
        "results_lost": sum(1 for u in study_uids if srs[u] == 0 or oru.get(u, 0) == 0),
        "results_doubled": sum(1 for u in study_uids if srs[u] > 1 or oru.get(u, 0) > 1),
    }


def _all_sent(daemon: TriageProcess, study_uids: set[str]) -> bool:
    st = daemon.status(timeout=60)
    states = {s["study_uid"]: s["state"] for s in st["studies"]}
    return study_uids <= set(states) and all(states[u] == "sent" for u in study_uids)


def _studies(work: Path, root: Path, studies: int, seed: int) -> tuple[str, Path, set[str]]:
    from training.synth import write_dataset

    work.mkdir(parents=True, exist_ok=True)
    version = tiny_model_set(work, root)
    test_dir = work / "studies"
    truths = write_dataset(test_dir, normal=studies - studies // 2, abnormal=studies // 2, seed=seed)
    return version, test_dir, {t.study_uid for t in truths}


def _retried_studies(daemon: TriageProcess) -> int:
    """How many studies had a delivery attempt fail (an ``outbox_retry`` event) so far."""
    return len({e.get("study_uid") for e in daemon.log_events() if e.get("event") == "outbox_retry"})


def _deliveries_after(daemon: TriageProcess, since_epoch: float) -> list[float]:
    """Seconds after ``since_epoch`` of every ``outbox_sent`` event in the daemon's log."""
    out = []
    for ev in daemon.log_events():
        if ev.get("event") == "outbox_sent" and ev.get("timestamp"):
            t = datetime.fromisoformat(str(ev["timestamp"]).replace("Z", "+00:00")).timestamp()
            if t >= since_epoch:
                out.append(round(t - since_epoch, 2))
    return sorted(out)


def outage_case(
    work: Path,
    *,
    studies: int,
    down_s: float,
    backoff_max_s: float = 10.0,
    scrape_s: float = 1.0,
    deliver_within_s: float = 120.0,
) -> dict[str, Any]:
    """Studies arrive while the PACS (Orthanc) and the RIS (MLLP) are down for ``down_s``; then both
    come back and every study must end ``sent`` with exactly one SR and one ORU, the first delivery
    within the back-off bound (1.1 x outbox.backoff_max_s + poll_s: the longest a waiting row sleeps).

    Meanwhile the daemon's /metrics is scraped every ``scrape_s`` (queue depth and oldest age of the
    results waiting in the outbox, retries per destination) and a real Prometheus evaluates the shipped
    alert rules on the same endpoint (see :mod:`reliability_cases.alerting`)."""
    from reliability_cases.alerting import OUTAGE_ALERT, Prometheus, Watch

    root = work / "var"
    version, test_dir, study_uids = _studies(work, root, studies, seed=23)
    dicom_port, hl7_port, metrics_port = free_port(), free_port(), free_port()
    orthanc = Orthanc(work / "orthanc", name="reliability")
    poll_s = 0.5
    cfg = _daemon_config(
        work, root, dicom_port, orthanc.dicom_port, hl7_port, backoff_max_s=backoff_max_s,
        metrics_port=metrics_port,
    )
    daemon = TriageProcess(cfg, work / "daemon.log", start_timeout=600, stop_grace=30)
    mllp: MLLPListener | None = None
    prom: Prometheus | None = None
    watch: Watch | None = None
    bound_s = round(1.1 * backoff_max_s + poll_s, 1)
    out: dict[str, Any] = {
        "studies": studies,
        "down_s": down_s,
        "model_set": version,
        "backoff_max_s": backoff_max_s,
        "poll_s": poll_s,
        "backoff_bound_s": bound_s,
    }
    try:
        daemon.start()  # PACS and RIS are down from the start
        try:
            prom = Prometheus(work / "prometheus", metrics_port, scrape_s).start()
        except (FileNotFoundError, AssertionError) as exc:
            out["prometheus"] = f"not run: {exc}"
        watch = Watch(metrics_port, prom, scrape_s).start()
        time.sleep(3 * scrape_s)  # a baseline before anything arrives
        watch.mark("studies_arrive")
        t_down = time.monotonic()
        done = storescu(dicom_port, sorted(test_dir.rglob("*.dcm")), timeout=1800)
        out["storescu_rc"] = done.returncode
        out["studies_sent_in_s"] = round(time.monotonic() - t_down, 1)
        time.sleep(max(0.0, down_s - (time.monotonic() - t_down)))
        # down at least until every study's results met the closed PACS/RIS once (on a loaded machine
        # a short outage could otherwise end before anything was scored, and test nothing)
        wait_for(lambda: _retried_studies(daemon) >= len(study_uids), 900, "a retry for every study")
        out["down_s_actual"] = round(time.monotonic() - t_down, 1)
        out["retries_while_down"] = daemon.log_text().count('"event": "outbox_retry"')
        orthanc.start(timeout=60)
        mllp = MLLPListener(port=hl7_port)
        watch.mark("returned")
        t_up, t_up_epoch = time.monotonic(), time.time()
        wait_for(lambda: _all_sent(daemon, study_uids), deliver_within_s + 60, "every study sent")
        out["delivered_after_return_s"] = round(time.monotonic() - t_up, 1)
        sent = _deliveries_after(daemon, t_up_epoch)
        out["first_delivery_after_return_s"] = sent[0] if sent else None
        out["last_delivery_after_return_s"] = sent[-1] if sent else None
        out["deliveries_after_return"] = len(sent)
        out["first_delivery_within_bound"] = bool(sent) and sent[0] <= bound_s
        watch.mark("all_delivered")
        if prom is not None:  # until the alert is inactive again (or 3 minutes)
            with contextlib.suppress(AssertionError):
                wait_for(lambda: watch is not None and watch.samples[-1].get("alert") == "inactive"
                         and watch.now() - watch.marks["all_delivered"] > 3 * scrape_s, 180, "alert clear")
        else:
            time.sleep(3 * scrape_s)
        watch.stop()
        out["metrics"] = watch.summary("studies_arrive", "returned")
        out["metrics_timeline"] = watch.timeline()
        if prom is not None:
            out["alerts_fired_overall"] = sorted(
                {s["metric"]["alertname"] for s in prom.query('ALERTS{alertstate="firing"}[1h]')}
            )
        out["outage_alert"] = OUTAGE_ALERT
        out.update(_results(study_uids, orthanc, mllp))
    finally:
        if watch is not None:
            watch.stop()
        stop_all(prom, mllp, orthanc, daemon)
    return out


def kill_during_results_case(work: Path, *, studies: int, kills: int, seed: int = 0) -> dict[str, Any]:
    """PACS and RIS up; studies arrive; ``kill -9`` of the daemon at random moments while it assembles,
    scores, reports and sends, restarted each time; at the end every study must be ``sent`` with exactly
    one SR in the PACS and one ORU^R01 at the RIS (no loss, no duplicate after a restart)."""
    import random

    rng = random.Random(seed)
    root = work / "var"
    version, test_dir, study_uids = _studies(work, root, studies, seed=29)
    dicom_port, hl7_port = free_port(), free_port()
    orthanc = Orthanc(work / "orthanc", name="reliability-kill")
    cfg = _daemon_config(work, root, dicom_port, orthanc.dicom_port, hl7_port)
    daemon = TriageProcess(cfg, work / "daemon.log", start_timeout=600, stop_grace=30)
    mllp = MLLPListener(port=hl7_port)
    out: dict[str, Any] = {"studies": studies, "kills": kills, "model_set": version}
    try:
        orthanc.start(timeout=60)
        daemon.start()
        done = storescu(dicom_port, sorted(test_dir.rglob("*.dcm")), timeout=1800)
        out["storescu_rc"] = done.returncode
        if done.returncode != 0:  # nothing to kill the daemon over: say why instead of waiting
            raise AssertionError(f"storescu exited {done.returncode}: {(done.stdout + done.stderr)[-800:]}")
        for _ in range(kills):  # quiet_seconds is 3: the kills land in assembly, scoring, reports, sends
            time.sleep(rng.uniform(0.5, 6.0))
            daemon.kill()
            daemon.start()
        wait_for(lambda: _all_sent(daemon, study_uids), 300, "every study sent")
        out.update(_results(study_uids, orthanc, mllp))
    finally:
        stop_all(mllp, orthanc, daemon)
    return out
