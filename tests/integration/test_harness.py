"""training.harness against the real programs it wraps: the readiness checks and helpers every test,
the demo and the benches now share, so a regression here shows before it shows as a flaky suite."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

import pytest

from training.harness import HarnessError
from training.harness.config import set_toml_key, write_config
from training.harness.daemon import TriageProcess
from training.harness.mllp import MLLPListener
from training.harness.orthanc import Orthanc
from training.harness.ports import free_port, port_free, wait_port
from training.harness.series import write_ct_series
from training.harness.storescu import storescu

pytestmark = pytest.mark.integration

ORU = "MSH|^~\\&|GLOWTRIAGE|HOSP|RIS|HOSP|20240101120000||ORU^R01|MSG1|P|2.5\rPID|1||X\rOBR|1|||CT|S"


def _mllp_send(port: int, text: str) -> str:
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(b"\x0b" + text.encode() + b"\x1c\r")
        buf = b""
        while not buf.endswith(b"\x1c\r"):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
    return buf.strip(b"\x0b\x1c\r").decode()


def test_mllp_listener_acks_hl7_with_aa_and_anything_else_with_ar() -> None:
    ris = MLLPListener()
    try:
        ack = _mllp_send(ris.port, ORU)
        assert "MSA|AA|MSG1" in ack
        assert "MSA|AR" in _mllp_send(ris.port, "not hl7 at all")
        assert ris.messages == [ORU, "not hl7 at all"]
    finally:
        ris.stop()
    assert port_free(ris.port)


def test_config_writers_round_trip_through_tomllib(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.toml",
        {"dicom": {"port": 104, "ae_title": 'A"B', "strict": False}, "dicom.tls": {"ciphers": ["a", "b"]}},
        header="made by a test",
    )
    assert tomllib.loads(path.read_text()) == {
        "dicom": {"port": 104, "ae_title": 'A"B', "strict": False, "tls": {"ciphers": ["a", "b"]}}
    }
    text = set_toml_key(path.read_text(), "dicom", "port", 11112)
    assert tomllib.loads(text)["dicom"]["port"] == 11112
    assert text.startswith("# made by a test\n")


def test_orthanc_with_dicomweb_restarts_on_its_storage_and_takes_storescu(tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "pacs", dicomweb=True)
    files = write_ct_series(tmp_path / "ct", n=3, size=16)
    try:
        pacs.start(timeout=30)
        assert "dicom-web" in pacs.get("/plugins")
        done = storescu(pacs.dicom_port, files, called="ORTHANC")
        assert done.returncode == 0, done.stdout + done.stderr
        assert pacs.instance_count() == 3
        pacs.stop()
        pacs.start(timeout=30)  # same storage: what it held is still there
        assert pacs.instance_count() == 3
        assert pacs.get("/dicom-web/studies")  # the plug-in answers QIDO-RS over what it holds
    finally:
        pacs.stop()


def test_wait_port_and_a_daemon_that_cannot_start_fail_with_its_log(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="nothing listening"):
        wait_port(free_port(), timeout=0.5)
    bad = write_config(tmp_path / "bad.toml", {"dicom": {"port": "not a port"}})
    proc = TriageProcess(bad, tmp_path / "daemon.log", start_timeout=60)
    with pytest.raises(HarnessError, match="exited with"):
        proc.start()
    assert proc.log_text()  # the reason is in the message and the log


def test_a_daemon_that_is_not_ready_in_time_is_stopped_not_left_behind(tmp_path: Path) -> None:
    """A start that times out stops the process it started (before, a slow daemon kept the port, the
    store and its receiver workers after the bench had given up on it)."""
    cfg = write_config(tmp_path / "c.toml", {})
    proc = TriageProcess(cfg, tmp_path / "d.log", argv=["-c", "import time; time.sleep(120)"],
                         start_timeout=2, stop_grace=5)
    with pytest.raises(HarnessError, match="no 'serving' after 2 s"):
        proc.start()
    assert proc.proc is not None and not proc.running
