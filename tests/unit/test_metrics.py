"""Metrics: exact counts, bounded labels without identifiers, a lint-clean exposition, a real endpoint."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from triage.config import parse
from triage.ops.metrics import (
    MAX_LABEL_VALUES,
    OTHER,
    OUTCOMES,
    REASON_CATEGORIES,
    STATES,
    Metrics,
    reason_category,
    start_http,
)


@pytest.fixture
def m() -> Metrics:
    return Metrics(CollectorRegistry())


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_counters_move_by_exact_amounts(m: Metrics) -> None:
    for nbytes in (1000, 2500, 0):
        m.instance_received(nbytes)
    m.instance_rejected("disk full")
    m.instance_rejected("Out of resources: 10 MB free")
    m.series_assembled()
    m.series_skipped("not a head CT: body part CHEST")
    for flagged in (True, False, False):
        m.study_scored(-3.0 if flagged else -0.1, flagged, 0.2, "cuda:0")
    m.study_scored(-4.0, True, 0.05, "cuda:0", kind="cxr")  # a chest radiograph
    m.study_scored(-4.0, True, 0.05, "cuda:0", kind="1.2.840.113619.2.1")  # never a value from outside
    m.outbox_retry("PACS")
    m.outbox_retry("PACS")
    m.outbox_dead_letter("HL7")
    m.association("CT_SCANNER1", "released")
    m.association("CT_SCANNER1", "released")
    m.association("CT_SCANNER1", "aborted")

    assert value(m, "glowtriage_instances_received_total") == 3
    assert value(m, "glowtriage_bytes_received_total") == 3500
    assert value(m, "glowtriage_instances_rejected_total", reason="disk_full") == 2
    assert value(m, "glowtriage_instances_rejected_total", reason="decode") == 0
    assert value(m, "glowtriage_series_assembled_total") == 1
    assert value(m, "glowtriage_series_skipped_total", reason="not_head") == 1
    assert value(m, "glowtriage_studies_scored_total", kind="ct") == 3
    assert value(m, "glowtriage_studies_flagged_total", kind="ct") == 1
    assert value(m, "glowtriage_inference_seconds_count", device="cuda", kind="ct") == 3
    assert value(m, "glowtriage_score_log_posterior_count", kind="ct") == 3
    assert value(m, "glowtriage_score_log_posterior_bucket", le="-2.0", kind="ct") == 1
    assert value(m, "glowtriage_score_log_posterior_bucket", le="-0.1", kind="ct") == 3
    # studies and scores by kind (head CT, chest radiograph); anything else is "other"
    assert value(m, "glowtriage_studies_scored_total", kind="cxr") == 1
    assert value(m, "glowtriage_studies_flagged_total", kind="cxr") == 1
    assert value(m, "glowtriage_score_log_posterior_bucket", le="-2.0", kind="cxr") == 1
    assert value(m, "glowtriage_inference_seconds_count", device="cuda", kind="cxr") == 1
    assert value(m, "glowtriage_studies_scored_total", kind="other") == 1
    assert value(m, "glowtriage_outbox_retries_total", destination="PACS") == 2
    assert value(m, "glowtriage_outbox_dead_letters_total", destination="HL7") == 1
    assert value(m, "glowtriage_outbox_dead_letters_total", destination="PACS") == 0
    assert value(m, "glowtriage_associations_total", calling_ae="CT_SCANNER1", outcome="released") == 2
    assert value(m, "glowtriage_associations_total", calling_ae="CT_SCANNER1", outcome="aborted") == 1


def test_associations_active_gauge(m: Metrics) -> None:
    m.association_opened()
    m.association_opened()
    m.association_closed()
    assert value(m, "glowtriage_associations_active") == 1


def test_latency_histogram_buckets_span_1_to_600_seconds(m: Metrics) -> None:
    for seconds in (0.5, 45.0, 700.0):
        m.result_acknowledged(seconds)
    m.result_acknowledged(-1.0)  # a clock step must not record a negative latency
    assert value(m, "glowtriage_e2e_latency_seconds_bucket", le="1.0") == 1
    assert value(m, "glowtriage_e2e_latency_seconds_bucket", le="60.0") == 2
    assert value(m, "glowtriage_e2e_latency_seconds_bucket", le="600.0") == 2
    assert value(m, "glowtriage_e2e_latency_seconds_count") == 3


def test_nan_score_is_counted_but_not_observed(m: Metrics) -> None:
    m.study_scored(float("nan"), False, 0.1, "cpu")
    assert value(m, "glowtriage_studies_scored_total", kind="ct") == 1
    assert value(m, "glowtriage_score_log_posterior_count", kind="ct") == 0


@pytest.mark.parametrize(
    ("reason", "category"),
    [
        ("disk full: 12 MB free < 2048 MB", "disk_full"),
        ("calling AE 'X' not allowed", "not_allowed"),
        ("cannot decode pixel data (JPEG 2000)", "decode"),
        ("modality MR", "not_ct"),
        ("no head keyword in body part/description", "not_head"),
        ("image type LOCALIZER", "image_type"),
        ("slice thickness 0.625 mm < 2.0", "slice_thickness"),
        ("coverage 60 mm < 90 mm", "coverage"),
        ("gantry tilt 35 deg", "tilt"),
        ("gap of 3 missing slices", "missing_slices"),
        ("only 4 slices: too few", "too_few_slices"),
        ("inconsistent orientation between slices", "geometry"),
        ("malformed dataset", "invalid"),
        ("slice_thickness", "slice_thickness"),
        ("1.2.840.113619.2.55.3.1234", OTHER),
        ("Doe^Jane", OTHER),
        ("", OTHER),
    ],
)
def test_reason_category(reason: str, category: str) -> None:
    assert reason_category(reason) == category
    assert category in REASON_CATEGORIES


def test_reason_labels_stay_bounded(m: Metrics) -> None:
    for i in range(200):
        m.series_skipped(f"odd reason number {i} for 1.2.3.{i}")
        m.instance_rejected(f"study 1.2.3.{i} of patient X{i}")
    text = generate_latest(m.registry).decode()
    reasons = {line.split('reason="')[1].split('"')[0] for line in text.splitlines() if 'reason="' in line}
    assert reasons <= set(REASON_CATEGORIES)


def test_calling_ae_labels_are_capped_and_never_uids(m: Metrics) -> None:
    for i in range(MAX_LABEL_VALUES + 20):
        m.association(f"SCANNER{i}", "released")
    m.association("1.2.840.10008.1.2.3", "released")
    m.association("bad\\ae\x00", "weird-outcome")
    text = generate_latest(m.registry).decode()
    aes = {line.split('calling_ae="')[1].split('"')[0] for line in text.splitlines() if "calling_ae=" in line}
    assert len(aes) == MAX_LABEL_VALUES + 1
    assert OTHER in aes and not any(ae.startswith("1.2.") for ae in aes)
    outcomes = {line.split('outcome="')[1].split('"')[0] for line in text.splitlines() if "outcome=" in line}
    assert outcomes <= {*OUTCOMES, OTHER}


def test_uid_like_destinations_become_other(m: Metrics) -> None:
    m.outbox_retry("1.2.826.0.1.3680043.8.498.1")
    assert value(m, "glowtriage_outbox_retries_total", destination=OTHER) == 1


def test_queue_depth_and_age_are_read_at_scrape(m: Metrics) -> None:
    counts = {"assembled": 2, "sent": 10, "mystery": 1}
    m.bind_queue(lambda: counts, lambda: {"assembled": 42.0})
    assert value(m, "glowtriage_queue_depth", state="assembled") == 2
    assert value(m, "glowtriage_queue_depth", state="receiving") == 0
    assert value(m, "glowtriage_queue_depth", state=OTHER) == 1
    assert value(m, "glowtriage_queue_oldest_age_seconds", state="assembled") == 42.0
    counts["assembled"] = 5
    assert value(m, "glowtriage_queue_depth", state="assembled") == 5
    assert {s for s in STATES if value(m, "glowtriage_queue_depth", state=s) is None} == set()


def test_a_failing_store_callback_does_not_break_the_scrape(
    m: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> dict[str, int]:
        raise RuntimeError("database is locked")

    m.bind_queue(broken)
    m.instance_received(10)
    with caplog.at_level(logging.WARNING, logger="glowtriage.metrics"):
        text = generate_latest(m.registry).decode()
    assert "glowtriage_instances_received_total 1.0" in text
    assert "glowtriage_queue_depth{" not in text
    assert "database is locked" in caplog.text


def test_spool_gauges_follow_the_file_system(m: Metrics, tmp_path: Path) -> None:
    m.bind_spool(tmp_path / "not" / "yet" / "created", reserve_bytes=123)
    usage = shutil.disk_usage(tmp_path)
    assert value(m, "glowtriage_spool_size_bytes") == usage.total
    assert abs(value(m, "glowtriage_spool_free_bytes") - usage.free) < 64 * 1024 * 1024
    assert value(m, "glowtriage_spool_reserve_bytes") == 123


def test_configure_applies_buckets_reserve_retrain_and_destinations(m: Metrics, tmp_path: Path) -> None:
    cfg = parse(
        {
            "storage": {"root": str(tmp_path), "min_free_mb": 10},
            "metrics": {"score_buckets": [-4.0, 0.0]},
            "retrain": {"enabled": True},
            "routing": {"rules": [{"name": "stat", "ae_title": "STAT", "host": "10.0.0.1", "port": 104}]},
        },
        None,
    )
    m.configure(cfg)
    m.study_scored(-5.0, True, 0.1, "cpu")
    assert value(m, "glowtriage_score_log_posterior_bucket", le="-4.0", kind="ct") == 1
    assert value(m, "glowtriage_score_log_posterior_bucket", le="-4.0", kind="cxr") == 0
    assert value(m, "glowtriage_score_log_posterior_bucket", le="-2.0", kind="ct") is None  # old buckets gone
    assert value(m, "glowtriage_spool_reserve_bytes") == 10 * 1024 * 1024
    assert value(m, "glowtriage_retrain_enabled") == 1
    assert value(m, "glowtriage_outbox_dead_letters_total", destination="stat") == 0


def test_model_set_retrain_and_build_info(m: Metrics) -> None:
    assert value(m, "glowtriage_model_set_info", kind="ct", version="none", device_uid="", preset="") == 1
    m.model_set_loaded("2024-06-01.1", "1.2.826.0.1.3680043.10.1", "paper-bct")
    m.model_set_loaded("2024-06-02.1", "1.2.826.0.1.3680043.10.2", "cpu-cxr", kind="cxr")
    labels = {"version": "2024-06-01.1", "device_uid": "1.2.826.0.1.3680043.10.1", "preset": "paper-bct"}
    assert value(m, "glowtriage_model_set_info", kind="ct", **labels) == 1  # one set per kind, both shown
    assert value(m, "glowtriage_model_set_info", kind="cxr", version="2024-06-02.1",
                 device_uid="1.2.826.0.1.3680043.10.2", preset="cpu-cxr") == 1
    m.retrain_finished(success=True, duration_s=1800.0, gate_passed=True, finished_at=1_700_000_000.0)
    m.retrain_finished(success=False, duration_s=60.0, gate_passed=False, finished_at=1_700_086_400.0)
    m.retrain_finished(success=False, duration_s=30.0, gate_passed=False, kind="cxr")
    assert value(m, "glowtriage_retrain_last_success_timestamp_seconds", kind="ct") == 1_700_000_000.0
    assert value(m, "glowtriage_retrain_duration_seconds", kind="ct") == 60.0
    assert value(m, "glowtriage_retrain_gate_passed", kind="ct") == 0
    assert value(m, "glowtriage_retrain_last_success_timestamp_seconds", kind="cxr") == 0  # never: 0
    assert value(m, "glowtriage_retrain_duration_seconds", kind="cxr") == 30.0
    # the scheduler keeps the series of the kinds with a current set (a chest-only site: no head CT)
    fresh = Metrics(CollectorRegistry())
    assert value(fresh, "glowtriage_retrain_last_success_timestamp_seconds", kind="ct") == 0
    fresh.retrain_kinds(["cxr"])
    assert value(fresh, "glowtriage_retrain_last_success_timestamp_seconds", kind="ct") is None
    assert value(fresh, "glowtriage_retrain_gate_passed", kind="cxr") == 0
    text = generate_latest(m.registry).decode()
    assert "glowtriage_build_info{" in text and "process_start_time_seconds" in text


def test_exposition_passes_promtool_check_metrics(m: Metrics, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (scripts/bootstrap.sh installs it)")
    m.bind_queue(lambda: {"assembled": 1}, lambda: {"assembled": 3.0})
    m.bind_spool(tmp_path, 1024)
    m.instance_received(10)
    m.association("PACS", "released")
    m.study_scored(-1.0, False, 0.3, "cpu")
    m.result_acknowledged(12.0)
    m.model_set_loaded("v1", "1.2.3", "cpu-small")
    text = generate_latest(m.registry)
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == b"" and proc.stderr.strip() == b"", proc.stdout + proc.stderr
    names = {line.split()[2] for line in text.decode().splitlines() if line.startswith("# TYPE ")}
    assert all(n.startswith(("glowtriage_", "process_")) for n in names), names


def test_promtool_check_metrics_does_complain_about_bad_names() -> None:
    # Proves the lint above is not vacuous.
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (scripts/bootstrap.sh installs it)")
    bad = b"# HELP glowtriage_thing a counter\n# TYPE glowtriage_thing counter\nglowtriage_thing 1\n"
    proc = subprocess.run([promtool, "check", "metrics"], input=bad, capture_output=True, timeout=30)
    assert proc.returncode != 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_http_endpoint_serves_metrics_on_loopback(m: Metrics) -> None:
    port = _free_port()
    cfg = parse({"metrics": {"port": port}}, None)
    server = start_http(cfg, m)
    assert server is not None
    try:
        assert (server.host, server.port) == ("127.0.0.1", port)
        m.instance_received(7)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
            body = rsp.read().decode()
            assert rsp.status == 200 and rsp.headers["Content-Type"].startswith("text/plain")
        assert "glowtriage_instances_received_total 1.0" in body
        assert "glowtriage_bytes_received_total 7.0" in body
    finally:
        server.close()
    with pytest.raises(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2):
        pass


def test_busy_port_is_logged_not_raised(m: Metrics, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cfg = parse({"metrics": {"port": busy.getsockname()[1]}}, None)
        with caplog.at_level(logging.ERROR, logger="glowtriage.metrics"):
            assert start_http(cfg, m) is None
    assert "cannot bind 127.0.0.1" in caplog.text


def test_disabled_endpoint_is_not_started(m: Metrics) -> None:
    assert start_http(parse({"metrics": {"enabled": False}}, None), m) is None


def test_outbox_series_exist_under_the_outboxs_own_destination_names(m: Metrics) -> None:
    """A fresh daemon exports the retry and dead-letter series of [pacs] and [hl7] under the names the
    outbox counts them by (so an alert sees 0, then the real count, in one series), and no other."""
    from triage.config import RESERVED_DESTINATIONS

    text = generate_latest(m.registry).decode()
    for name in RESERVED_DESTINATIONS:
        assert value(m, "glowtriage_outbox_retries_total", destination=name) == 0
        assert value(m, "glowtriage_outbox_dead_letters_total", destination=name) == 0
    assert 'destination="pacs"' not in text and 'destination="hl7"' not in text
