"""Issue 14, the reliability campaign, at test size: the receiver against misbehaving peers and faults.

Every case drives the real daemon (``triage serve`` as a subprocess, through the harness) over
loopback. The bench (``bench/reliability.py``) runs the same case functions at full size; here they
run small and the invariants are asserted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from reliability_cases import sockets  # noqa: E402

integration = pytest.mark.integration


@integration
@pytest.mark.parametrize(
    ("source", "per_peer"),
    [
        # the idle sockets come from another loopback address, so the real sender (127.0.0.1) is not
        # refused by the per-peer limit (default 16) that those 201 sockets exhaust for 127.0.0.2
        ("127.0.0.2", None),
        # the literal case: all from the sender's own address, per-peer limit raised above 201
        ("127.0.0.1", 256),
    ],
)
def test_200_idle_sockets_and_a_half_sent_request_do_not_delay_a_real_sender(
    receiver_factory, tools: SimpleNamespace, tmp_path: Path, source: str, per_peer: int | None
) -> None:
    extra = {} if per_peer is None else {"max_connections_per_peer": per_peer}
    rx = receiver_factory(artim_timeout_s=3.0, **extra)
    files = tools.write_ct_series(tmp_path / "s", 2, 32, seed=7)
    got = sockets.idle_socket_case(rx.port, files, n_idle=200, source=source, artim_s=3.0)
    assert got["echo_status"] == 0 and got["echo_s"] < 1.0, got
    assert got["store_statuses"] == [0] and got["store_s"] < 1.0, got
    assert got["storescu_rc"] == 0 and got["storescu_s"] < 1.0, got
    # PS3.8 ARTIM: the server closed every silent or half-open connection itself
    assert got["closed_by_server_within_artim"] == 201, got
    assert got["echo_after_close_status"] == 0 and got["echo_after_close_s"] < 1.0, got
    assert rx.store().instance_total() == 2
    if per_peer is None:
        assert any("max_connections_per_peer" in e.get("reason", "") for e in rx.log_events()
                   if e.get("event") == "connection_refused")
    assert any(e.get("event") == "artim_expired" for e in rx.log_events())


@integration
@pytest.mark.parametrize("how", ["corrupt", "lost"])
def test_state_db_lost_or_corrupt_refuses_to_start_and_rebuilds_from_the_spool(
    receiver_factory, tools: SimpleNamespace, tmp_path: Path, how: str
) -> None:
    from reliability_cases.statedb import state_db_case

    rx = receiver_factory()
    files = tools.write_ct_series(tmp_path / "s", 6, 32, seed=3)
    got = state_db_case(rx, rx.port, rx.root, files, how)
    assert got["acknowledged"] == 6, got
    assert got["refused"], got
    assert str(rx.root / "state.db") in got["message"], got
    assert f"triage store rebuild --config {rx.config}" in got["message"], got
    assert got["rebuild_rc"] == 0, got
    assert got["lost"] == 0, got
    assert tools.echo(rx.port) == 0


@integration
def test_disk_full_mid_transfer_answers_out_of_resources_and_spools_nothing_half_written(
    receiver_factory, tools: SimpleNamespace, tmp_path: Path
) -> None:
    from reliability_cases.disk import disk_full_case, tmpfs

    files = tools.write_ct_series(tmp_path / "s", 30, 256, seed=5)  # ~130 KB each, ~4 MB in all
    try:
        mount = tmpfs(tmp_path / "tiny", 3)
        mount.__enter__()
    except OSError as exc:  # not root, or no mount in this sandbox: the reserve test still covers 0xA700
        pytest.skip(str(exc))
    try:
        root = tmp_path / "tiny" / "var"
        rx = receiver_factory(storage={"root": str(root), "min_free_mb": 0})
        got = disk_full_case(rx.port, root, tmp_path / "tiny", files, tools.send_files, tools.echo)
        rx.stop()
    finally:
        mount.__exit__(None, None, None)
    assert got["answered"] == 30 and got["other_statuses"] == [], got  # every instance got a status
    assert got["success"] > 0 and got["out_of_resources"] > 0, got
    assert got["acknowledged_missing"] == 0 and got["acknowledged_corrupt"] == 0, got
    assert got["spool_files_without_row"] == 0 and got["tmp_leftovers"] == 0, got
    assert got["echo_while_full"] == 0, got
    assert got["resent_success"] == got["resent"] == got["out_of_resources"], got


@integration
def test_kill_9_at_random_moments_during_ingest_loses_no_acknowledged_instance(
    receiver_factory, tmp_path: Path
) -> None:
    from reliability_cases.ingest import kill_cycles_case

    rx = receiver_factory()
    got = kill_cycles_case(rx, rx.port, rx.root, tmp_path / "ct", cycles=2, associations=4,
                           per_association=30)
    assert got["acknowledged"] > 0, got
    assert got["acknowledged_lost"] == 0 and got["acknowledged_corrupt"] == 0, got


@integration
def test_fuzzed_pdus_and_datasets_leave_the_daemon_serving_with_every_refusal_explained(
    receiver_factory, tools: SimpleNamespace, tmp_path: Path
) -> None:
    from reliability_cases import fuzz

    rx = receiver_factory(artim_timeout_s=0.5)
    pdus = fuzz.pdu_cases(rx.port, 60, seed=1, workers=2)  # two clients at once, as the bench runs 8
    named = pdus["named"]
    # refusals at the PDU level come as an A-ABORT with its PS3.8 reason, before any association
    assert named["zero-length A-ASSOCIATE-RQ"] == "A-ABORT 2/6", named
    assert named["oversize A-ASSOCIATE-RQ length (4 GiB)"] == "A-ABORT 2/6", named
    assert named["unknown first PDU type 0x55"] == "A-ABORT 2/1", named
    assert named["P-DATA before association"] == "A-ABORT 2/2", named
    assert named["slow sender (RQ 1 byte per 2 ms)"] == "A-ASSOCIATE-AC", named
    assert named["a valid C-ECHO (control)"] == "P-DATA", named
    # contexts pynetdicom cannot decode: its A-ABORT; one it decodes but its negotiation raised on
    # (inside the acceptor thread, a traceback): A-ASSOCIATE-RJ rejected-permanent / service-user /
    # no reason given, the reason logged
    assert named["abstract syntax longer than a UID may be (70 characters)"] == "A-ABORT 0/0", named
    assert named["even presentation context ID (2)"] == "A-ABORT 2/0", named
    assert named["presentation context without an abstract syntax"] == "A-ASSOCIATE-RJ 1/1/1", named
    assert pdus["structured_total"] == 60
    sources = tools.write_ct_series(tmp_path / "ct", 3, 32, seed=11)
    datasets = fuzz.dataset_cases(rx.port, sources, 60, tmp_path / "mut", seed=2, workers=2)
    assert datasets["sent"] == 60  # every mutation offered (a dead association hands its rest on)
    assert datasets["without_status"] == 0 and datasets["failures_without_reason"] == 0, datasets
    assert rx.running
    assert tools.echo(rx.port) == 0
    valid = tools.write_ct_series(tmp_path / "valid", 1, 32, seed=12)
    assert set(tools.send_files(rx.port, valid).statuses.values()) == {0}
    assert "Traceback" not in rx.log_text()
    assert any(e.get("event") == "association_refused" for e in rx.log_events())
    assert any(e.get("event") == "association_rejected" and "presentation context" in e.get("reason", "")
               for e in rx.log_events())


@integration
def test_tls_handshakes_cut_short_leave_the_tls_listener_serving_without_tracebacks(
    receiver_factory, tmp_path: Path
) -> None:
    from reliability_cases import tls

    cert, key = tls.self_signed(tmp_path / "pki")
    rx = receiver_factory(artim_timeout_s=0.5, tls={"enabled": True, "cert_file": str(cert),
                                                     "key_file": str(key)})
    got = tls.tls_cases(rx.port, cert, 25, seed=3)
    named = got["named"]
    # the server gives up on silent or half-done handshakes itself (ARTIM), and refuses plain DICOM
    assert named["TLS: half a ClientHello, then silence (ARTIM)"] in ("closed", "reset"), named
    assert named["TLS: handshake, then silence (ARTIM)"] in ("closed", "reset"), named
    assert named["TLS: handshake, half an A-ASSOCIATE-RQ"] in ("closed", "reset"), named
    assert named["TLS: plain A-ASSOCIATE-RQ to the TLS port"] in ("closed", "reset"), named
    assert named["TLS: ClientHello, ServerHello, then close"].startswith("ServerHello"), named
    assert named["TLS: a valid C-ECHO (control)"] == "P-DATA", named
    assert got["random_total"] == 25 and not any(k.startswith("client error") for k in got["random"]), got
    assert rx.running
    assert tls.tls_echo(rx.port, cert) == "P-DATA"  # still serving afterwards
    assert "Traceback" not in rx.log_text()
    events = {e.get("event") for e in rx.log_events()}
    assert {"tls_handshake_failed", "artim_expired"} <= events, events


@integration
def test_concurrent_load_stores_everything_and_reports_peak_rss(receiver_factory, tmp_path: Path) -> None:
    from reliability_cases.ingest import load_case

    rx = receiver_factory()
    got = load_case(rx, rx.port, rx.root, tmp_path / "ct", associations=4, per_association=15, size=64)
    assert got["missing"] == 0 and got["instances"] == 60, got
    assert 0 < got["rss_peak_mb"] < 4096, got


@integration
def test_daytime_alert_follows_the_site_time_zone_with_daylight_saving() -> None:
    """deploy/prometheus/alerts_tz_test.yml (apart from alerts_test.yml, which test_deploy.py runs: it
    evaluates most of a year). The winter window itself is in alerts_test.yml."""
    import shutil
    import subprocess

    tool = shutil.which("promtool")
    assert tool, "promtool is not installed (scripts/bootstrap.sh installs it)"
    done = subprocess.run([tool, "test", "rules", "alerts_tz_test.yml"], cwd=REPO / "deploy" / "prometheus",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@integration
def test_pacs_and_ris_down_while_studies_arrive_then_every_result_delivered_once(tmp_path: Path) -> None:
    from reliability_cases.outage import outage_case

    got = outage_case(tmp_path / "outage", studies=2, down_s=10.0, backoff_max_s=10.0, scrape_s=1.0)
    assert got["storescu_rc"] == 0, got
    assert got["retries_while_down"] > 0, got  # the outbox really tried while they were down
    assert got["results_lost"] == 0 and got["results_doubled"] == 0, got
    assert got["sr_per_study"] == [1] and got["oru_per_study"] == [1], got
    # delivery resumes within the back-off bound (1.1 x backoff_max_s + poll_s) of their return
    assert got["backoff_bound_s"] == 11.5 and got["first_delivery_within_bound"], got
    assert got["delivered_after_return_s"] < 120, got
    # the metrics show it: results waiting and retries growing during, nothing waiting after
    m = got["metrics"]
    assert m["before"]["depth_reported"]["max"] == 0, m["before"]
    assert m["during"]["depth_reported"]["max"] == 2 and m["during"]["oldest_reported_s"]["max"] > 0, m
    retries = [v for k, v in m["during"].items() if k.startswith("retries_")]
    assert any(v["last"] > v["first"] for v in retries), m["during"]
    assert m["after"]["depth_reported"]["last"] == 0 and m["after"]["depth_sent"]["last"] == 2, m["after"]
    # a real Prometheus evaluated the shipped rules on the same endpoint: a 10 s outage does not page
    # (GlowtriageDeliveryStalled needs 3 min waiting + 2 min; the 10-minute bench case fires it)
    assert m["alert_evaluated"] and m["scrape_errors"] == 0, m
    assert m["alert_fired_at_s"] is None and m["during"]["alert_states"] == ["inactive"], m


@integration
def test_kill_9_during_assembly_scoring_and_sending_gives_each_study_exactly_one_result(
    tmp_path: Path,
) -> None:
    from reliability_cases.outage import kill_during_results_case

    got = kill_during_results_case(tmp_path / "kill", studies=2, kills=3)
    assert got["storescu_rc"] == 0, got
    assert got["results_lost"] == 0 and got["results_doubled"] == 0, got
    assert got["sr_per_study"] == [1] and got["oru_per_study"] == [1], got
