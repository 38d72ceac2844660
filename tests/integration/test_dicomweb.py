"""The DICOMweb STOW-RS destination against a real Orthanc with Debian's DICOMweb plug-in.

Driven the way the daemon drives it: a routing rule of ``kind = "dicomweb"`` in the config, the
report stage (:func:`triage.pipeline.report_scored`) building the real SR and writing the outbox row,
and :class:`triage.pipeline.Sender` draining it. Shows what issue 10 asks of a plug-in destination: an
SR stored over STOW-RS appears in Orthanc (REST and QIDO-RS), and an outage (Orthanc stopped: the
connection is refused) is a retried attempt with a later ``next_attempt_at``, delivered once Orthanc
is back, like the other kinds.
"""

from __future__ import annotations

import io
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from training.harness.fixtures import assembled_series
from training.harness.orthanc import Orthanc, dicomweb_plugin
from triage.config import Config, parse
from triage.model.results import ModelSetInfo, ScoreResult
from triage.pipeline import Sender, report_scored
from triage.send.base import Delivery, SendError, make_destination
from triage.send.dicomweb import DicomWebDestination
from triage.store.db import Store

pytestmark = pytest.mark.integration

MODEL = ModelSetInfo(version="20261130-0000-dw0001", device_uid=generate_uid(), preset="cpu-small",
                     preprocessing_version="pp1", threshold=-3.5, threshold_method="youden")


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., Orthanc]) -> Orthanc:
    if dicomweb_plugin() is None:
        pytest.fail("Orthanc's DICOMweb plug-in is missing (scripts/bootstrap.sh installs orthanc-dicomweb)")
    return orthanc_factory(dicomweb=True)


def _config(url: str, *, images: bool = False) -> Config:
    """The site config of the test: no PACS SR, no HL7, one rule sending every SR over STOW-RS (and,
    with ``images``, a second one sending the scored series there too)."""
    rules = [{"name": "archive", "kind": "dicomweb", "when": "always", "send": "sr", "url": url,
              "timeout_s": 5.0}]
    if images:
        rules.append({**rules[0], "name": "archive-images", "send": "source"})
    return parse({
        "hl7": {"enabled": False},
        "routing": {"sr_to_pacs": False, "rules": rules},
        "outbox": {"max_attempts": 5, "backoff_initial_s": 30.0, "backoff_max_s": 600.0},
    }, None)


def _scored_study(store: Store, ct: list[Path], clock: Callable[[], float]) -> str:
    """A received, assembled and scored study in the store (the stages before report)."""
    study, series = assembled_series(store, ct, clock)
    result = ScoreResult(study_uid=study, series_uid=series, log_p_normal_model=-1000.5,
                         log_p_mixture_model=-990.25, log_posterior=-10.25, threshold=-3.5, flagged=True,
                         percentile=1.5, model_version=MODEL.version)
    assert store.record_score(study, 0, result.to_json())
    return study


def _report(store: Store, cfg: Config, study: str) -> Path:
    """Run the report stage; the SR's outbox row goes to the rule by STOW-RS; its SR file."""
    assert report_scored(store, SimpleNamespace(info=MODEL, info_for=lambda _v: MODEL), cfg) == 1  # type: ignore[arg-type]
    row, *_ = store.outbox(study)
    assert (row.kind, row.destination, row.state) == ("dicomweb", "archive", "pending")
    assert row.target == cfg.settings.routing.rules[0].url  # the URL only: no credential in the outbox
    (sr_path,) = row.files
    return sr_path


def _qido(orthanc: Orthanc, study: str) -> list[dict[str, Any]]:
    """QIDO-RS: the SR instances of the study as Orthanc's DICOMweb plug-in lists them."""
    url = f"{orthanc.dicomweb_url}/studies/{study}/instances?Modality=SR"
    with urllib.request.urlopen(url, timeout=10) as rsp:
        body = rsp.read()
    return json.loads(body) if body else []


def test_sr_routed_by_a_dicomweb_rule_is_stored_over_stow_rs_and_appears_in_orthanc(
    orthanc: Orthanc, ct_series: Callable[..., list[Path]], tmp_path: Path
) -> None:
    now = [1_000_000.0]
    store = Store(tmp_path / "var", clock=lambda: now[0])
    cfg = _config(orthanc.dicomweb_url, images=True)
    study = _scored_study(store, ct_series(tmp_path / "ct", n=3, size=32), lambda: now[0])
    sr_path = _report(store, cfg, study)

    assert Sender(store, cfg).drain(now=now[0]) == 2
    sr_row, images_row = store.outbox(study)
    assert (sr_row.destination, sr_row.state, sr_row.attempts, sr_row.ack) == (
        "archive", "sent", 1, "1 instance(s) stored over STOW-RS")
    assert (images_row.destination, images_row.state, images_row.ack) == (
        "archive-images", "sent", "3 instance(s) stored over STOW-RS")
    assert store.study(study).state == "sent"
    assert orthanc.instance_count() == 4  # the SR and the scored series

    local = dcmread(sr_path)
    (orthanc_id,) = orthanc.sr_instances(study)  # REST: /tools/find
    stored = dcmread(io.BytesIO(orthanc.get(f"/instances/{orthanc_id}/file")))
    assert stored.SOPInstanceUID == local.SOPInstanceUID and stored.SOPClassUID == local.SOPClassUID
    assert stored.ContentSequence == local.ContentSequence  # the report itself, unchanged in transit
    (qido,) = _qido(orthanc, study)  # QIDO-RS: SOP Instance UID (0008,0018)
    assert qido["00080018"]["Value"] == [str(local.SOPInstanceUID)]
    store.close()


def test_an_outage_is_retried_with_back_off_and_delivered_when_orthanc_is_back(
    orthanc: Orthanc, ct_series: Callable[..., list[Path]], tmp_path: Path
) -> None:
    now = [1_000_000.0]
    store = Store(tmp_path / "var", clock=lambda: now[0])
    cfg = _config(orthanc.dicomweb_url)
    study = _scored_study(store, ct_series(tmp_path / "ct", n=3, size=32), lambda: now[0])
    sr_path = _report(store, cfg, study)
    orthanc.stop()

    # the destination alone: connection refused is a SendError naming the URL
    dest = make_destination("dicomweb", "archive", orthanc.dicomweb_url, cfg)
    assert isinstance(dest, DicomWebDestination)
    refused = r"archive: STOW-RS to http://127\.0\.0\.1:\d+/dicom-web: ConnectionError"
    with pytest.raises(SendError, match=refused):
        dest.send(Delivery(0, "dicomweb", "archive", [sr_path]))

    # through the outbox: a failed attempt, retried later (30 s +-10%), not before
    sender = Sender(store, cfg)
    assert sender.drain(now=now[0]) == 0
    (row,) = store.outbox(study)
    assert row.state == "pending" and row.attempts == 1
    assert 27.0 <= row.next_attempt_at - now[0] <= 33.0
    assert "ConnectionError" in (row.last_error or "") and "Connection refused" in (row.last_error or "")
    assert sender.drain(now=now[0] + 20.0) == 0 and store.outbox(study)[0].attempts == 1  # not due yet
    assert store.study(study).state == "reported"

    orthanc.start(timeout=30.0)  # same ports, same storage
    assert sender.drain(now=row.next_attempt_at) == 1
    (row,) = store.outbox(study)
    assert row.state == "sent" and row.attempts == 2
    assert store.study(study).state == "sent"
    assert len(orthanc.sr_instances(study)) == 1
    assert sender.drain(now=now[0] + 10_000.0) == 0  # delivered once
    store.close()


def test_an_http_error_is_a_retried_send_error_with_the_status(
    orthanc: Orthanc, ct_series: Callable[..., list[Path]], tmp_path: Path
) -> None:
    """A wrong DICOMweb root: Orthanc answers 404; like every failure, the outbox retries it."""
    now = [1_000_000.0]
    store = Store(tmp_path / "var", clock=lambda: now[0])
    cfg = _config(f"{orthanc.url}/no-dicom-web-here")
    study = _scored_study(store, ct_series(tmp_path / "ct", n=3, size=32), lambda: now[0])
    _report(store, cfg, study)
    assert Sender(store, cfg).drain(now=now[0]) == 0
    (row,) = store.outbox(study)
    assert row.state == "pending" and row.attempts == 1 and row.next_attempt_at > now[0]
    assert "answered HTTP 404" in (row.last_error or "")
    assert orthanc.instance_count() == 0
    store.close()
