"""Delivery: the destination registry, back-off, C-STORE and MLLP destinations against real listeners,
the outbox state machine."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import socket
import socketserver
import threading
import time
import typing
from collections.abc import Callable
from pathlib import Path

import hl7
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage  # type: ignore[attr-defined]

from triage.config import ConfigError, parse
from triage.pipeline import Sender
from triage.send.base import (
    KINDS,
    Delivery,
    SendError,
    UnknownDestinationKind,
    backoff_delay,
    destination_class,
    make_destination,
)
from triage.send.dicom import DicomStoreDestination
from triage.send.dicomweb import DicomWebDestination
from triage.send.mllp import MLLPDestination
from triage.store.db import Store


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -------------------------------------------------------------------------------------- registry
def test_registry_finds_each_kind() -> None:
    assert destination_class("dicom") is DicomStoreDestination
    assert destination_class("hl7") is MLLPDestination
    assert destination_class("dicomweb") is DicomWebDestination
    assert {"dicom", "hl7", "dicomweb"} <= set(KINDS)
    for kind, cls in KINDS.items():
        assert cls.kind == kind and cls.payloads, cls


def test_every_kind_the_config_can_name_is_registered() -> None:
    """A routing rule's ``kind`` (one table per kind in triage.config.Rule), [pacs] and [hl7]: each
    must have its module here, or the report stage would plan a delivery nothing can make."""
    from triage.config import HL7Settings, PacsSettings, Rule

    members = typing.get_args(typing.get_args(Rule)[0])  # Annotated[A | B, Discriminator] -> A, B
    rule_kinds = {typing.get_args(typing.get_args(m)[0].model_fields["kind"].annotation)[0] for m in members}
    assert rule_kinds == {"dicom", "dicomweb"}
    assert rule_kinds | {PacsSettings.kind, HL7Settings.kind} == set(KINDS)


def test_registry_refuses_an_unknown_kind_with_the_known_ones() -> None:
    cfg = parse({}, None)
    expected = r"unknown destination kind .fax. \(known kinds: .*dicom.*hl7.*; each is a module of triage/"
    with pytest.raises(UnknownDestinationKind, match=expected):
        destination_class("fax")
    with pytest.raises(SendError, match="'fax'"):  # a SendError: the outbox retries, then dead-letters it
        make_destination("fax", "RIS", "@127.0.0.1:2575", cfg)


def test_register_refuses_a_second_module_claiming_a_kind() -> None:
    from triage.send.base import Destination, register

    class Impostor(Destination):
        kind = "dicom"
        payloads = frozenset({"sr"})

        @classmethod
        def from_target(cls, name: str, target: str, cfg) -> Destination:  # type: ignore[override]
            raise AssertionError

        def send(self, delivery: Delivery) -> str:
            raise AssertionError

    with pytest.raises(TypeError, match="'dicom' is claimed by"):
        register(Impostor)
    assert KINDS["dicom"] is DicomStoreDestination


def test_destinations_are_built_from_outbox_targets_and_the_live_config() -> None:
    cfg = parse({"pacs": {"calling_ae_title": "US"}, "dicom": {"network_timeout": 7.0},
                 "hl7": {"timeout": 3.0}}, None)
    d = make_destination("dicom", "stat", "ST@T@10.0.0.5:104", cfg)  # "@" is legal in an AE title
    assert isinstance(d, DicomStoreDestination)
    assert (d.name, d.ae_title, d.host, d.port, d.calling_ae_title, d.timeout_s) == (
        "stat", "ST@T", "10.0.0.5", 104, "US", 7.0)
    m = make_destination("hl7", "HL7", "@::1:2575", cfg)
    assert isinstance(m, MLLPDestination)
    assert (m.host, m.port, m.timeout_s) == ("::1", 2575, 3.0)
    with pytest.raises(SendError, match="not host:port"):
        make_destination("dicom", "PACS", "PACS@10.0.0.5", cfg)


def test_every_planned_route_has_a_registered_kind_that_carries_its_payload() -> None:
    from triage.config import RouteRule
    from triage.model.results import ScoreResult
    from triage.report.routes import plan_routes

    rules = [RouteRule(name="stat", when="always", send="source", ae_title="STAT", host="h", port=104)]
    cfg = parse({"routing": {"rules": [r.model_dump() for r in rules]}}, None)
    s = cfg.settings
    result = ScoreResult(study_uid="1.2", series_uid="1.2.3", log_posterior=-1.0, threshold=-2.0,
                         flagged=False, percentile=50.0, log_p_normal_model=-1.0, log_p_mixture_model=0.0,
                         model_version="v1")
    routes = plan_routes(result, s.routing, s.pacs, s.hl7)
    assert {r.payload for r in routes} == {"sr", "source", "oru"}
    for route in routes:
        dest = make_destination(route.kind, route.destination, route.target, cfg)
        assert route.payload in dest.payloads and dest.name == route.destination


def test_backoff_doubles_caps_and_jitters() -> None:
    mid = [backoff_delay(a, 2.0, 60.0, rng=lambda: 0.5) for a in range(1, 8)]
    assert mid == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert backoff_delay(3, 2.0, 60.0, rng=lambda: 0.0) == pytest.approx(7.2)
    assert backoff_delay(3, 2.0, 60.0, rng=lambda: 1.0) == pytest.approx(8.8)


def _sr_file(tmp: Path) -> Path:
    ds = Dataset()
    ds.SOPClassUID = Comprehensive3DSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


class _SCP:
    """A real pynetdicom C-STORE SCP that answers a chosen status."""

    def __init__(self, status: int = 0x0000):
        self.received: list[str] = []
        self.port = _port()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(Comprehensive3DSRStorage, ExplicitVRLittleEndian)

        def on_store(event: evt.Event) -> int:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            return status

        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def close(self) -> None:
        self.server.shutdown()


def test_dicom_destination_success_failure_status_and_down(tmp_path: Path) -> None:
    sr = _sr_file(tmp_path)
    scp = _SCP()
    try:
        dest = DicomStoreDestination("PACS", "PACS", "127.0.0.1", scp.port, "GLOWTRIAGE", timeout_s=5)
        assert "1 instance" in dest.send(Delivery(1, "dicom", "PACS", [sr]))
        assert len(scp.received) == 1
    finally:
        scp.close()
    bad = _SCP(status=0xA700)
    try:
        dest = DicomStoreDestination("PACS", "PACS", "127.0.0.1", bad.port, "GLOWTRIAGE", timeout_s=5)
        with pytest.raises(SendError, match="0xA700"):
            dest.send(Delivery(1, "dicom", "PACS", [sr]))
    finally:
        bad.close()
    down = DicomStoreDestination("PACS", "PACS", "127.0.0.1", _port(), "GLOWTRIAGE", timeout_s=2)
    with pytest.raises(SendError, match="association"):
        down.send(Delivery(1, "dicom", "PACS", [sr]))


class _MLLP(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self, code: str):
        outer = self

        class H(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                buf = b""
                while b"\x1c\r" not in buf:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                msg = hl7.parse(buf.strip(b"\x0b\x1c\r").decode())
                outer.got.append(msg)
                # send the ACK in two pieces: the client must wait for the whole frame
                ack = b"\x0b" + str(msg.create_ack(code)).encode() + b"\x1c\r"
                self.request.sendall(ack[:10])
                time.sleep(0.05)
                self.request.sendall(ack[10:])

        super().__init__(("127.0.0.1", 0), H)
        self.got: list = []
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _oru(tmp: Path) -> Path:
    text = "MSH|^~\\&|GLOWTRIAGE|RAD|RIS|HOSP|20261129||ORU^R01^ORU_R01|CTRL123|P|2.5\rPID|1||X\r"
    p = tmp / "m.hl7"
    p.write_bytes(text.encode())
    return p


def test_mllp_destination_acks_and_nacks(tmp_path: Path) -> None:
    msg = _oru(tmp_path)
    ok = _MLLP("AA")
    try:
        assert MLLPDestination("RIS", "127.0.0.1", ok.server_address[1]).send(
            Delivery(1, "hl7", "RIS", [msg])) == "ACK AA"
        assert str(ok.got[0].segment("MSH")[10]) == "CTRL123"
        assert len(ok.got[0].segments("PID")) == 1  # segments kept their \r separators
    finally:
        ok.shutdown()
    nak = _MLLP("AE")
    try:
        with pytest.raises(SendError, match="not accepted"):
            MLLPDestination("RIS", "127.0.0.1", nak.server_address[1]).send(Delivery(1, "hl7", "RIS", [msg]))
    finally:
        nak.shutdown()
    with pytest.raises(SendError, match="MLLP"):
        MLLPDestination("RIS", "127.0.0.1", _port(), timeout_s=1).send(Delivery(1, "hl7", "RIS", [msg]))


def _store_with_reported_study(tmp: Path, clock) -> tuple[Store, str]:
    store = Store(tmp / "var", clock=clock)
    study, series, sop = "1.2.3", "1.2.3.4", "1.2.3.4.5"
    store.put_instance(sop, study, series, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                       lambda f: f.write(b"\0" * 128 + b"DICM"), "TEST")
    store.set_series_state(series, "stable")
    store.set_study_state(study, "stable")
    store.record_assembly(study, series, 0, tmp / "v.npz", complete_at=clock())
    store.record_score(study, 0, {"study_uid": study})
    return store, study


def test_outbox_retries_with_backoff_then_dead_letters_and_survives_restart(tmp_path: Path) -> None:
    now = [1000.0]
    store, study = _store_with_reported_study(tmp_path, lambda: now[0])
    msg = _oru(tmp_path)
    dead_port = _port()
    assert store.enqueue_results(study, 0, [("hl7", "RIS", [msg], f"@127.0.0.1:{dead_port}")]) == 1
    # re-running the report stage adds nothing (idempotent)
    assert store.enqueue_results(study, 0, [("hl7", "RIS", [msg], f"@127.0.0.1:{dead_port}")]) == 0
    cfg = parse({"outbox": {"max_attempts": 3, "backoff_initial_s": 10.0, "backoff_max_s": 100.0},
                 "hl7": {"timeout": 1.0}}, None)
    sender = Sender(store, cfg)
    assert sender.drain(now=now[0]) == 0
    row = store.outbox(study)[0]
    assert row.attempts == 1 and row.state == "pending" and 9.0 <= row.next_attempt_at - now[0] <= 11.0
    assert sender.drain(now=now[0] + 5) == 0 and store.outbox(study)[0].attempts == 1  # not due yet
    store.close()
    # restart: the schedule is in the database, not in memory
    store = Store(tmp_path / "var", clock=lambda: now[0])
    sender = Sender(store, cfg)
    sender.drain(now=now[0] + 11)
    assert store.outbox(study)[0].attempts == 2
    sender.drain(now=now[0] + 1000)
    row = store.outbox(study)[0]
    assert row.state == "dead" and row.attempts == 3 and "MLLP" in (row.last_error or "")
    st = store.study(study)
    assert st.state == "failed" and "dead-lettered" in st.reason
    assert store.outbox_counts() == {"pending": 0, "sent": 0, "dead": 1}
    # an operator re-queues it; a listener is now up; it is delivered once
    ok = _MLLP("AA")
    try:
        with store.transaction() as db:
            db.execute("UPDATE outbox SET target=?", (f"@127.0.0.1:{ok.server_address[1]}",))
        assert store.outbox_requeue(row.id)
        assert sender.drain(now=now[0] + 2000) == 1
        assert sender.drain(now=now[0] + 3000) == 0
        assert len(ok.got) == 1
        assert store.study(study).state == "sent"
    finally:
        ok.shutdown()


def test_an_outbox_row_of_an_unknown_kind_is_retried_and_says_why(tmp_path: Path) -> None:
    """A row whose kind no module handles (written by a newer version, or a removed plug-in) does not
    stop the drain: it is a failed attempt like any other, then a dead letter naming the kind."""
    now = [1000.0]
    store, study = _store_with_reported_study(tmp_path, lambda: now[0])
    assert store.enqueue_results(study, 0, [("fax", "FAX", [_oru(tmp_path)], "+1-555-0100")]) == 1
    cfg = parse({"outbox": {"max_attempts": 2, "backoff_initial_s": 10.0}}, None)
    sender = Sender(store, cfg)
    assert sender.drain(now=now[0]) == 0
    row = store.outbox(study)[0]
    assert row.state == "pending" and row.attempts == 1 and row.next_attempt_at > now[0]
    assert "unknown destination kind 'fax'" in (row.last_error or "")
    sender.drain(now=now[0] + 100)
    assert store.outbox(study)[0].state == "dead"


# -------------------------------------------------------------------------------------- DICOMweb
class _StowServer(http.server.ThreadingHTTPServer):
    """A real HTTP server on loopback answering STOW-RS POSTs with a chosen status and DICOM JSON body
    (Orthanc itself is in tests/integration/test_dicomweb.py; this one can answer what Orthanc won't)."""

    daemon_threads = True

    def __init__(self, status: int = 200, body: Callable[[list[str]], dict] | None = None,
                 delay_s: float = 0.0):
        outer = self
        self.requests: list[tuple[str, dict[str, str]]] = []

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                outer.requests.append((self.path, dict(self.headers)))
                time.sleep(delay_s)
                uids = [dcmread(io.BytesIO(part.split(b"\r\n\r\n", 1)[1])).SOPInstanceUID
                        for part in data.split(b"--0f3cf5c0-70e0-41ef-baef-c6f9f65ec3e1")[1:-1]]
                payload = json.dumps(body([str(u) for u in uids]) if body else {}).encode()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a client that timed out
                    self.send_response(status)
                    self.send_header("Content-Type", "application/dicom+json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), H)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dicom-web"


def _stored(uids: list[str], warning: int | None = None) -> dict:
    warn = {"00081196": {"vr": "US", "Value": [warning]}} if warning is not None else {}
    items = [{"00081155": {"vr": "UI", "Value": [u]}, **warn} for u in uids]
    return {"00081199": {"vr": "SQ", "Value": items}}


def _failed(uids: list[str], reason: int = 0xA700) -> dict:
    items = [{"00081155": {"vr": "UI", "Value": [u]}, "00081197": {"vr": "US", "Value": [reason]}}
             for u in uids]
    return {"00081198": {"vr": "SQ", "Value": items}}


def _dicomweb_cfg(url: str, **rule: object) -> object:
    return parse({"routing": {"rules": [{"name": "archive", "kind": "dicomweb", "send": "sr", "url": url,
                                         **rule}]}}, None)


def test_dicomweb_stores_and_authenticates_with_the_rules_credentials(tmp_path: Path) -> None:
    sr = _sr_file(tmp_path)
    server = _StowServer(200, _stored)
    try:
        bearer = make_destination("dicomweb", "archive", server.url, _dicomweb_cfg(server.url, token="t0k"))
        assert bearer.send(Delivery(1, "dicomweb", "archive", [sr])) == "1 instance(s) stored over STOW-RS"
        basic = make_destination("dicomweb", "archive", server.url,
                                 _dicomweb_cfg(server.url, username="glow", password="s3cret"))
        basic.send(Delivery(1, "dicomweb", "archive", [sr]))
        # a row written before the rule's URL changed: its credentials are not sent to the old URL
        moved = make_destination("dicomweb", "archive", server.url,
                                 _dicomweb_cfg("http://10.9.9.9/dicom-web", token="t0k"))
        moved.send(Delivery(1, "dicomweb", "archive", [sr]))
    finally:
        server.shutdown()
    paths = [p for p, _ in server.requests]
    auth = [h.get("Authorization") for _, h in server.requests]
    assert paths == ["/dicom-web/studies"] * 3
    assert auth == ["Bearer t0k", "Basic " + base64.b64encode(b"glow:s3cret").decode(), None]
    assert server.requests[0][1]["Content-Type"].startswith('multipart/related; type="application/dicom"')


def test_dicomweb_posts_a_long_series_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from triage.send import dicomweb

    monkeypatch.setattr(dicomweb, "BATCH", 2)
    files = []
    for i in range(5):
        (tmp_path / str(i)).mkdir()
        files.append(_sr_file(tmp_path / str(i)))
    server = _StowServer(200, _stored)
    try:
        dest = make_destination("dicomweb", "archive", server.url, _dicomweb_cfg(server.url))
        assert dest.send(Delivery(1, "dicomweb", "archive", files)) == "5 instance(s) stored over STOW-RS"
    finally:
        server.shutdown()
    assert len(server.requests) == 3  # 2 + 2 + 1


def test_dicomweb_failures_are_send_errors_with_status_and_reasons(tmp_path: Path) -> None:
    sr = _sr_file(tmp_path)
    sop = str(dcmread(sr).SOPInstanceUID)
    cases = [
        (409, lambda u: _failed(u, 0xC000), rf"answered HTTP 409 Conflict; failed: {sop}: 0xC000"),
        (202, lambda u: _failed(u, 0xA700), rf"1 of 1 instance\(s\) refused: {sop}: 0xA700"),
        (200, lambda u: _stored(["1.2.3.999"]), r"response does not list 1 instance"),
        (503, None, r"answered HTTP 503 Service Unavailable"),
    ]
    for status, body, expected in cases:
        server = _StowServer(status, body)
        try:
            dest = make_destination("dicomweb", "archive", server.url, _dicomweb_cfg(server.url))
            with pytest.raises(SendError, match=expected):
                dest.send(Delivery(1, "dicomweb", "archive", [sr]))
        finally:
            server.shutdown()
        # one outbox attempt is one request: dicomweb-client's own retries (503 among them) are off
        assert len(server.requests) == 1, (status, server.requests)
    warned = _StowServer(200, lambda u: _stored(u, warning=0xB000))
    try:
        dest = make_destination("dicomweb", "archive", warned.url, _dicomweb_cfg(warned.url))
        assert dest.send(Delivery(1, "dicomweb", "archive", [sr])).endswith("1 with a warning")
    finally:
        warned.shutdown()


def test_dicomweb_timeout_and_refused_connection_are_send_errors(tmp_path: Path) -> None:
    sr = _sr_file(tmp_path)
    slow = _StowServer(200, _stored, delay_s=3.0)
    try:
        dest = make_destination("dicomweb", "archive", slow.url, _dicomweb_cfg(slow.url, timeout_s=0.5))
        started = time.monotonic()
        with pytest.raises(SendError, match="ReadTimeout"):
            dest.send(Delivery(1, "dicomweb", "archive", [sr]))
        assert time.monotonic() - started < 2.5
    finally:
        slow.shutdown()
    url = f"http://127.0.0.1:{_port()}/dicom-web"
    with pytest.raises(SendError, match="ConnectionError"):
        make_destination("dicomweb", "archive", url, _dicomweb_cfg(url)).send(
            Delivery(1, "dicomweb", "archive", [sr]))


def test_dicomweb_rule_keeps_credentials_out_of_the_outbox_target() -> None:
    cfg = _dicomweb_cfg("https://archive.example.org:8443/dicom-web/", username="u", password="p")
    (rule,) = cfg.settings.routing.rules  # type: ignore[attr-defined]
    assert rule.kind == "dicomweb" and rule.target == "https://archive.example.org:8443/dicom-web"
    for bad in ("https://u:p@archive.example.org/dicom-web", "ftp://archive.example.org/", "http:///x"):
        with pytest.raises(ConfigError, match=r"routing\.rules\[0\]\.url"):
            _dicomweb_cfg(bad)
    with pytest.raises(ConfigError, match=r"routing\.rules\[0\]\.token: set either token"):
        _dicomweb_cfg("http://h/dicom-web", username="u", password="p", token="t")
    with pytest.raises(ConfigError, match=r"routing\.rules\[0\]\.kind: expected kind = .*\(got 'fax'\)"):
        parse({"routing": {"rules": [{"name": "a", "kind": "fax", "url": "http://h/"}]}}, None)
    twice = {"name": "a", "kind": "dicomweb", "url": "http://h/dicom-web"}
    with pytest.raises(ConfigError, match=r"routing\.rules: rule name 'a' is used twice"):
        parse({"routing": {"rules": [twice, {**twice, "url": "http://g/dicom-web"}]}}, None)
