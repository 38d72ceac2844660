"""End to end with real peers: Orthanc -> `triage serve` -> SR back into Orthanc, ORU^R01 to an MLLP
listener; Orthanc down while results are pending; daemon restarted; nothing lost or doubled; metrics
moved by the right amounts; no patient identifier in any log line or metric.

The model set is trained by the fixture itself (test-tiny preset on synthetic studies). Its operating
point is put between the two test studies' scores so exactly one is flagged: this test checks the
plumbing (the flagged one gets priority S and an "Abnormal" SR, the other R and "Normal"), not the
model's accuracy, which `training experiment` measures.
"""

from __future__ import annotations

import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7
import numpy as np
import pydicom
import pytest

from training.harness.config import write_config
from training.harness.daemon import TriageProcess
from training.harness.mllp import MLLPListener
from training.harness.orthanc import Orthanc
from training.harness.ports import free_port
from training.harness.process import stop_all, wait_for
from training.synth import SynthOptions, write_dataset
from training.train.loop import VolumeSet, train
from triage.assemble.volume import assemble_study, group_studies, read_headers
from triage.config import AssemblySettings
from triage.model.registry import Registry
from triage.model.score import ModelPair, pick_device

pytestmark = pytest.mark.integration

MARK_NAME = "ZZMARKER^QWERTY"
MARK_ID = "PIDMARK8812"
MARK_BIRTH = "19010203"


# ----------------------------------------------------------------------------------- fixtures
def _volumes(folder: Path) -> dict[str, Any]:
    headers, _ = read_headers(p for p in folder.rglob("*.dcm"))
    out = {}
    for study_uid, series in group_studies(headers).items():
        sel, vol = assemble_study(series, AssemblySettings())
        assert vol is not None, sel.reason
        out[study_uid] = vol
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Training data, two test studies (one normal, one hemorrhage, with distractors), a model set."""
    base = tmp_path_factory.mktemp("e2e")
    train_dir = base / "train"
    write_dataset(train_dir, normal=3, abnormal=2, seed=11, options=SynthOptions(distractors=False))
    vols = _volumes(train_dir)
    labels = dict(
        line.split(",")[:2] for line in (train_dir / "labels.csv").read_text().splitlines()[1:]
    )
    normals = [v.data for uid, v in vols.items() if labels[uid] == "normal"]
    mixture = [v.data for v in vols.values()]
    m0 = base / "m0.pt"
    m1 = base / "m1.pt"
    train(VolumeSet(normals, [f"n{i}" for i in range(len(normals))]), "test-tiny", m0, role="normal",
          steps=30, progress=False)
    train(VolumeSet(mixture, [f"m{i}" for i in range(len(mixture))]), "test-tiny", m1, role="mixture",
          steps=30, progress=False)

    test_dir = base / "test"
    truths = write_dataset(test_dir, normal=1, abnormal=1, seed=23)
    # Unique markers in the patient module: none may show up in a log line or a metric.
    for f in test_dir.rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = MARK_NAME, MARK_ID, MARK_BIRTH
        ds.save_as(f)
    test_vols = _volumes(test_dir)
    pair = ModelPair.load(m0, m1, pick_device("cpu"))
    post = {uid: float(np.subtract(*pair.log_likelihoods(v.data))) for uid, v in test_vols.items()}
    a, b = sorted(post.values())
    assert a < b, "the two test studies must score differently"
    yield {"base": base, "m0": m0, "m1": m1, "test_dir": test_dir, "truths": truths, "post": post,
           "threshold": (a + b) / 2}


def _config(base: Path, *, dicom_port: int, pacs_port: int, hl7_port: int, metrics_port: int) -> Path:
    return write_config(base / "config.toml", {
        "dicom": {"ae_title": "GLOWTRIAGE", "host": "127.0.0.1", "port": dicom_port},
        "storage": {"root": "var", "min_free_mb": 1},
        "assembly": {"quiet_seconds": 6.0, "force_seconds": 120.0},
        "scoring": {"device": "cpu"},
        "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port},
        "hl7": {"enabled": True, "host": "127.0.0.1", "port": hl7_port},
        "outbox": {"max_attempts": 50, "backoff_initial_s": 0.5, "backoff_max_s": 2.0, "poll_s": 0.2},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "logging": {"level": "debug", "format": "json"},
    })


def _install_model_set(world: dict[str, Any], root: Path) -> str:
    reg = Registry(root / "models")
    s = reg.create(world["m0"], world["m1"], preset="test-tiny", preprocessing_version="assemble-1",
                   threshold=world["threshold"], method="test: between the two studies",
                   normal_scores=[world["threshold"] - 1, world["threshold"] + 1], provenance={},
                   software_version="test")
    reg.promote(s.version)
    return s.version


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


# ----------------------------------------------------------------------------------- the tests
def test_orthanc_to_triage_to_pacs_and_ris_with_outage_and_restart(
    world: dict[str, Any], tmp_path: Path
) -> None:
    glow_port = free_port()
    mllp = MLLPListener()
    metrics_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", name="e2e",
                      modalities={"GLOWTRIAGE": ["GLOWTRIAGE", "127.0.0.1", glow_port]})
    cfg = _config(tmp_path, dicom_port=glow_port, pacs_port=orthanc.dicom_port, hl7_port=mllp.port,
                  metrics_port=metrics_port)
    version = _install_model_set(world, tmp_path / "var")
    daemon = TriageProcess(cfg, tmp_path / "daemon.log", start_timeout=60, stop_grace=30)
    try:
        orthanc.start(timeout=30)
        daemon.start()
        files = sorted(world["test_dir"].rglob("*.dcm"))
        orthanc.upload(files)
        studies = orthanc.get("/studies")
        assert len(studies) == 2
        # Orthanc sends both studies to glowtriage (REST /modalities/{id}/store, synchronous C-STOREs).
        orthanc.store_to("GLOWTRIAGE", studies, timeout=300)
        # Take the PACS down at once (quiet_seconds = 6 keeps the studies from completing before
        # this): the SRs cannot be delivered, the HL7 flags can.
        orthanc.stop()
        wait_for(lambda: len(mllp.messages) >= 2, 120, "two ORU^R01 messages")
        metrics_first = urllib.request.urlopen(
            f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        st = daemon.status(timeout=60)
        assert st["model_set"] == version
        assert {s["state"] for s in st["studies"]} == {"reported"}, st
        assert daemon.log_text().count('"event": "outbox_retry"') >= 1
        # Restart the daemon while results are pending: nothing is redone, nothing lost.
        daemon.stop()
        daemon.start()
        orthanc.start(timeout=30)
        wait_for(lambda: {s["state"] for s in daemon.status(timeout=60)["studies"]} == {"sent"}, 120,
                 "both sent")

        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    finally:
        stop_all(mllp, orthanc, daemon)

    truths = {t.study_uid: t for t in world["truths"]}
    flagged = {uid for uid, p in world["post"].items() if p < world["threshold"]}
    assert len(flagged) == 1

    # Each study: exactly one SR came back into Orthanc, as a new series of the same study.
    orthanc.start(timeout=30)
    try:
        for study_uid in truths:
            srs = orthanc.sr_instances(study_uid)
            assert len(srs) == 1, f"{study_uid}: {len(srs)} SR instances (lost or doubled)"
            sr_file = tmp_path / f"{study_uid}.sr.dcm"
            sr_file.write_bytes(orthanc.get(f"/instances/{srs[0]}/file"))
            sr = pydicom.dcmread(sr_file)
            assert sr.StudyInstanceUID == study_uid
            assert sr.SeriesInstanceUID not in truths[study_uid].series_roles
            assert sr.PatientID == MARK_ID  # the patient module is copied to the SR (where PHI belongs)
            v = subprocess.run(["dciodvfy", str(sr_file)], capture_output=True, text=True)
            errors = [ln for ln in (v.stdout + v.stderr).splitlines() if ln.startswith("Error")]
            assert not errors, errors
            d = subprocess.run(["dsrdump", str(sr_file)], capture_output=True, text=True, check=True).stdout
            finding = "Abnormal" if study_uid in flagged else "Normal"
            assert re.search(rf'"{finding}"', d), d
            assert "{nat}" in d and f"{world['post'][study_uid]:.1f}"[:-2] in d
    finally:
        orthanc.stop()

    # HL7: one ORU^R01 per study, priority S for the flagged one, R for the other; not sent twice.
    by_study: dict[str, list[Any]] = {}
    for text in mllp.messages:
        msg = hl7.parse(text)
        assert str(msg.segment("MSH")[9]).startswith("ORU^R01")
        uid = next(str(s[5]) for s in msg.segments("OBX") if str(s[5]) in truths)
        by_study.setdefault(uid, []).append(msg)
    assert set(by_study) == set(truths)
    for uid, msgs in by_study.items():
        assert len(msgs) == 1, f"{uid}: {len(msgs)} ORU messages"
        assert str(msgs[0].segment("OBR")[5]) == ("S" if uid in flagged else "R")

    # Metrics moved by the right amounts: the first run received every file Orthanc sent, scored both
    # studies, flagged one, and retried the PACS; the second run (counters restart) delivered.
    assert _metric(metrics_first, "glowtriage_instances_received_total") == len(files)
    assert _metric(metrics_first, "glowtriage_studies_scored_total", '{kind="ct"}') == 2
    assert _metric(metrics_first, "glowtriage_studies_flagged_total", '{kind="ct"}') == 1
    assert _metric(metrics_first, "glowtriage_outbox_retries_total", '{destination="PACS"}') >= 1
    assert _metric(metrics_first, "glowtriage_series_assembled_total") == 2
    assert _metric(metrics, "glowtriage_outbox_dead_letters_total", '{destination="PACS"}') == 0
    assert _metric(metrics, "glowtriage_queue_depth", '{state="sent"}') == 2
    assert 'glowtriage_model_set_info{' in metrics and version in metrics

    # No patient identifier anywhere in the logs or the metrics, even at debug level.
    logs = daemon.log_text()
    for marker in (MARK_NAME, "ZZMARKER", "QWERTY", MARK_ID, MARK_BIRTH):
        assert marker not in logs, f"{marker} leaked into the log"
        assert marker not in metrics, f"{marker} leaked into the metrics"
