"""The receiver against real peers over loopback: dcmtk storescu, Orthanc, pynetdicom as SCU.

What "identical" means here: we compare the *dataset* bytes (everything after the File Meta
group). The File Meta is never on the wire: each side writes its own (implementation UID, source
AE, group length), so comparing whole files would test the two writers, not the transfer. The
dataset bytes are exactly what the sender's C-STORE carried, and the store's sha256 covers them.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from triage.store.part10 import dataset_offset

# Tests that drive real peers carry @pytest.mark.integration; the structure-walk tests at the end
# are plain unit tests (no network) kept here beside the receiver they belong to.
integration = pytest.mark.integration

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

# A representative subset of the ingest tests (several associations at once and a SIGKILL; bad
# input) runs with the event-driven reactor copy and again with pynetdicom's own loops, so neither
# a stale copy nor an upstream change can go unnoticed (see triage/receive/reactor.py).
REACTORS = pytest.mark.parametrize("reactor", ["event-driven", "stock"])


def reactor_env(reactor: str) -> dict[str, str]:
    """The receiver's environment for one reactor (set both ways, whatever the outer one says)."""
    return {"GLOWTRIAGE_STOCK_PYNETDICOM": "1" if reactor == "stock" else "0"}


def assert_reactor(rx: Any, reactor: str) -> None:
    listening = [e for e in rx.log_events() if e.get("event") == "listening"]
    assert listening and listening[-1].get("reactor") == reactor, listening[-1:]


def sop_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def ts_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def assert_stored_identically(store: Any, files: list[Path], tools: SimpleNamespace) -> None:
    for f in files:
        row = store.instance(sop_of(f))
        assert row is not None, f"{f.name} was not stored"
        sent = tools.dataset_bytes(f)
        got = tools.dataset_bytes(row.path)
        assert got == sent, f"{f.name}: dataset bytes differ ({len(got)} vs {len(sent)})"
        assert row.sha256 == hashlib.sha256(sent).hexdigest()
        assert row.transfer_syntax == ts_of(f)


def storescu(
    port: int, files: list[Path], tools: SimpleNamespace, *flags: str
) -> subprocess.CompletedProcess[str]:
    tools.require_tool("storescu")
    return subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "GLOWTRIAGE", *flags, "127.0.0.1", str(port),
         *map(str, files)],
        env=tools.dcmtk_env(), capture_output=True, text=True, timeout=120,
    )


@integration
def test_storescu_plain_jpeg_lossless_and_jpegls_arrive_byte_identical(
    receiver_factory, tools: SimpleNamespace, tmp_path: Path
) -> None:
    tools.require_tool("dcmcjpeg")
    tools.require_tool("dcmcjpls")
    study = generate_uid()
    plain = tools.write_ct_series(tmp_path / "plain", 10, 64, study_uid=study, seed=1)
    jpeg_src = tools.write_ct_series(tmp_path / "jsrc", 10, 64, study_uid=study, seed=2)
    jls_src = tools.write_ct_series(tmp_path / "lsrc", 10, 64, study_uid=study, seed=3)
    (tmp_path / "jpeg").mkdir()
    (tmp_path / "jls").mkdir()
    jpeg, jls = [], []
    for src in jpeg_src:  # default: JPEG Lossless, first-order prediction (Process 14 SV1)
        dst = tmp_path / "jpeg" / src.name
        subprocess.run(["dcmcjpeg", str(src), str(dst)], check=True, capture_output=True)
        jpeg.append(dst)
    for src in jls_src:  # default: JPEG-LS lossless
        dst = tmp_path / "jls" / src.name
        subprocess.run(["dcmcjpls", str(src), str(dst)], check=True, capture_output=True)
        jls.append(dst)
    assert {ts_of(f) for f in jpeg} == {"1.2.840.10008.1.2.4.70"}
    assert {ts_of(f) for f in jls} == {"1.2.840.10008.1.2.4.80"}

    rx = receiver_factory()
    for files, flags in ((plain, ()), (jpeg, ("-xs",)), (jls, ("-xt",))):
        done = storescu(rx.port, files, tools, *flags)
        assert done.returncode == 0, done.stderr

    store = rx.store()
    assert_stored_identically(store, plain + jpeg + jls, tools)
    assert len(store.study_series(study)) == 3
    assert store.study(study).instances == 30
    assert store.quarantined() == []


@integration
def test_orthanc_forwards_a_study_byte_identical(
    receiver_factory, orthanc_factory, tools: SimpleNamespace, tmp_path: Path
) -> None:
    rx = receiver_factory()
    orthanc = orthanc_factory(modalities={"glow": ["GLOWTRIAGE", "127.0.0.1", rx.port]})
    files = tools.write_ct_series(tmp_path / "study", 10, 64, seed=4)
    orthanc.upload(files)
    study_id = orthanc.get("/studies")[0]
    # Orthanc sends each stored file in its own transfer syntax when the peer accepts it (we accept
    # Explicit VR Little Endian), so nothing is transcoded and the bytes can be compared exactly.
    rsp = orthanc.post("/modalities/glow/store", {"Resources": [study_id], "Synchronous": True})
    assert int(rsp.get("InstancesCount", len(files))) == len(files)

    store = rx.store()
    assert_stored_identically(store, files, tools)
    assert all(store.instance(sop_of(f)).calling_aet == "ORTHANC" for f in files)


@integration
@REACTORS
def test_sigkill_mid_transfer_keeps_every_acknowledged_instance(
    receiver_factory, tools: SimpleNamespace, tmp_path: Path, reactor: str
) -> None:
    from pynetdicom import _config

    series = [tools.write_ct_series(tmp_path / f"s{k}", 60, 64, seed=10 + k, prefix=f"s{k}_")
              for k in range(3)]
    rx = receiver_factory(env=reactor_env(reactor))
    assert_reactor(rx, reactor)
    acknowledged: dict[str, int] = {}
    lock = threading.Lock()
    enough = threading.Event()

    def on_status(sop: str, status: int) -> None:
        with lock:
            acknowledged[sop] = status
            if sum(1 for s in acknowledged.values() if s == 0) >= 45:
                enough.set()

    _config.STORE_SEND_CHUNKED_DATASET = True  # raw bytes for all three senders
    try:
        senders = [
            threading.Thread(target=tools.send_files, args=(rx.port, files),
                             kwargs={"raw": None, "on_status": on_status, "calling": f"SCU{k}"})
            for k, files in enumerate(series)
        ]
        for t in senders:
            t.start()
        assert enough.wait(60), "transfer did not get going"
        rx.kill()  # mid-transfer: three associations are open and writing
        for t in senders:
            t.join(60)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False

    ok = [sop for sop, status in acknowledged.items() if status == 0]
    total = sum(len(s) for s in series)
    assert 45 <= len(ok) < total, f"the kill should land mid-transfer ({len(ok)}/{total})"

    rx.start()  # same root: recover() runs first
    recovered = [e for e in rx.log_events() if e.get("event") == "recovered"]
    assert len(recovered) == 2
    store = rx.store()
    assert list(store.tmp.iterdir()) == []
    by_sop = {sop_of(f): f for files in series for f in files}
    for sop in ok:
        row = store.instance(sop)
        assert row is not None, f"acknowledged instance {sop} is missing after the crash"
        on_disk = hashlib.sha256(tools.dataset_bytes(row.path)).hexdigest()
        assert on_disk == row.sha256 == hashlib.sha256(tools.dataset_bytes(by_sop[sop])).hexdigest()

    # the senders retry everything; what was stored is a duplicate, the rest arrives
    for files in series:
        again = tools.send_files(rx.port, files)
        assert set(again.statuses.values()) == {0}
    assert store.instance_total() == total


def raw_part10(path: Path, sop_class: str, sop: str, ts: str, dataset: bytes) -> Path:
    """A Part-10 file whose dataset bytes are exactly ``dataset`` (sent raw by pynetdicom)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta)
    path.write_bytes(buf.getvalue() + dataset)
    return path


def reencoded(src: Path, dst: Path, ts: str, **changes: Any) -> Path:
    ds = dcmread(src)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.file_meta.TransferSyntaxUID = ts
    dcmwrite(dst, ds, enforce_file_format=True)
    return dst


@integration
@pytest.mark.filterwarnings("ignore:Unknown encoding 'ISO_IR 999':UserWarning")  # pydicom, test side
@REACTORS
def test_bad_input_is_refused_quarantined_and_the_listener_carries_on(
    receiver_factory, tools: SimpleNamespace, tmp_path: Path, reactor: str
) -> None:
    rx = receiver_factory(env=reactor_env(reactor))
    assert_reactor(rx, reactor)
    good = tools.write_ct_series(tmp_path / "good", 8, 64, seed=20)
    src = tools.write_ct_series(tmp_path / "src", 1, 64, seed=21)[0]
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()

    def uid() -> str:
        return str(generate_uid())

    def dataset_with(sop: str, **changes: Any) -> bytes:
        ds = dcmread(src)
        ds.SOPInstanceUID = sop
        for k, v in changes.items():
            setattr(ds, k, v)
        path = bad_dir / f"tmp-{sop}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        return path.read_bytes()

    cases: list[tuple[str, str, Path, int, str]] = []  # name, sop, file, expected status, reason
    # 1 truncated in the middle of Pixel Data (a header parser stopping before pixels would miss it)
    sop = uid()
    body = dataset_with(sop)
    body = body[dataset_offset(body):]
    cases.append(("truncated", sop, raw_part10(bad_dir / "trunc.dcm", CTImageStorage, sop,
                                               ExplicitVRLittleEndian, body[:-3000]), 0xC000, "truncated"))
    # 2 the sender put a whole file (preamble, DICM, meta) where the dataset belongs
    sop = uid()
    cases.append(("file as dataset", sop, raw_part10(bad_dir / "pre.dcm", CTImageStorage, sop,
                                                     ExplicitVRLittleEndian, dataset_with(sop)),
                  0xC000, "preamble"))
    # 3 noise
    sop = uid()
    cases.append(("noise", sop, raw_part10(bad_dir / "noise.dcm", CTImageStorage, sop, ExplicitVRLittleEndian,
                                           bytes(range(256)) * 16), 0xC000, "invalid VR"))
    # 4 a Basic Text SR dataset sent under the CT Image Storage context
    sop = uid()
    sr = Dataset()
    sr.SOPClassUID = BASIC_TEXT_SR
    sr.SOPInstanceUID = sop
    sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.Modality = uid(), uid(), "SR"
    buf = io.BytesIO()
    dcmwrite(buf, sr, implicit_vr=False, little_endian=True)
    cases.append(("SR as CT", sop, raw_part10(bad_dir / "sr.dcm", CTImageStorage, sop, ExplicitVRLittleEndian,
                                              buf.getvalue()), 0xA900, "differs from Affected SOP Class"))
    # 5 a Modality Worklist item (no SOP/Study/Series UIDs) sent as CT storage
    sop = uid()
    mwl = Dataset()
    mwl.PatientName = "WORK^LIST"
    mwl.PatientID = "MWL1"
    step = Dataset()
    step.Modality = "CT"
    step.ScheduledStationAETitle = "CT1"
    mwl.ScheduledProcedureStepSequence = [step]
    buf = io.BytesIO()
    dcmwrite(buf, mwl, implicit_vr=False, little_endian=True)
    mwl_path = raw_part10(bad_dir / "mwl.dcm", CTImageStorage, sop, ExplicitVRLittleEndian, buf.getvalue())
    cases.append(("worklist", sop, mwl_path, 0xC001, "no SOPClassUID"))

    def open_fds() -> int:
        return len(list(Path(f"/proc/{rx.proc.pid}/fd").iterdir()))

    log_before = len(rx.log_events())
    fds_before = open_fds()
    for i, (name, sop, path, status, reason) in enumerate(cases):
        result = tools.send_files(rx.port, [path], extra_contexts=[(BASIC_TEXT_SR, ExplicitVRLittleEndian)])
        got = result.statuses.get(sop)
        assert got == status, f"{name}: status {got} (expected 0x{status:04X}); {result.comments}"
        assert reason.lower() in result.comments[sop].lower(), f"{name}: {result.comments}"
        assert BASIC_TEXT_SR in result.refused_contexts  # a non-image class is refused at negotiation
        assert rx.store().instance(sop) is None
        # the receiver keeps serving: an echo and a good instance right after
        assert tools.echo(rx.port) == 0
        ok = tools.send_files(rx.port, [good[i]])
        assert set(ok.statuses.values()) == {0}, name

    store = rx.store()
    quarantined = store.quarantined()
    assert len(quarantined) == len(cases)
    for (_name, _sop, _p, _s, reason), q in zip(cases, reversed(quarantined), strict=True):
        assert reason.lower() in q["reason"].lower()
        assert Path(q["path"]).exists() and Path(q["path"] + ".reason.json").exists()
    refused = [e for e in rx.log_events()[log_before:] if e.get("event") == "instance_refused"]
    assert len(refused) == len(cases) and all(e["reason"] and e["status"].startswith("0x") for e in refused)
    assert list(store.tmp.iterdir()) == []
    time.sleep(0.3)  # the last association's threads wind down
    assert open_fds() <= fds_before + 2, "file descriptors leak per association"

    # 6 a huge private OB element (20 MB): valid, stored byte for byte, streamed (not in memory)
    big = dcmread(src)
    big.SOPInstanceUID = uid()
    big.add_new(0x00990010, "LO", "GLOWTEST")
    big.add_new(0x00991000, "OB", bytes(range(256)) * (20 * 1024 * 1024 // 256))
    big_path = tmp_path / "big.dcm"
    dcmwrite(big_path, big, enforce_file_format=True)
    # 7 an unknown Specific Character Set: stored as received, with a warning naming it
    odd = reencoded(src, tmp_path / "odd.dcm", ExplicitVRLittleEndian, SOPInstanceUID=uid(),
                    SpecificCharacterSet="ISO_IR 999")
    result = tools.send_files(rx.port, [big_path, odd])
    assert result.statuses == {sop_of(big_path): 0, sop_of(odd): 0}
    assert_stored_identically(store, [big_path, odd], tools)
    warns = [e for e in rx.log_events() if e.get("event") == "instance_warning"]
    assert any("ISO_IR 999" in e["reason"] and e["sop_instance_uid"] == sop_of(odd) for e in warns)
    assert tools.echo(rx.port) == 0


@integration
def test_a_storage_fault_fails_one_instance_not_the_listener(
    receiver_factory, tools: SimpleNamespace, tmp_path: Path
) -> None:
    """Real fault, no mock: a plain file squats where the study's spool folder must go."""
    rx = receiver_factory()
    doomed = tools.write_ct_series(tmp_path / "doomed", 1, 32, seed=35)
    fine = tools.write_ct_series(tmp_path / "fine", 2, 32, seed=36)
    study = str(dcmread(doomed[0], stop_before_pixels=True).StudyInstanceUID)
    (rx.root / "spool" / study).write_bytes(b"in the way")

    result = tools.send_files(rx.port, doomed + fine)
    assert result.statuses[sop_of(doomed[0])] == 0xC211
    assert "storage error" in result.comments[sop_of(doomed[0])]
    assert [result.statuses[sop_of(f)] for f in fine] == [0, 0]
    assert tools.echo(rx.port) == 0
    store = rx.store()
    (q,) = store.quarantined()
    assert "internal error" in q["reason"]
    assert tools.dataset_bytes(Path(q["path"])) == tools.dataset_bytes(doomed[0])
    failed = [e for e in rx.log_events() if e.get("event") == "store_failed"]
    assert len(failed) == 1 and "Traceback" in failed[0]["exception"]
    assert list(store.tmp.iterdir()) == []


@integration
def test_uncompressed_transfer_syntaxes_are_walked_and_stored(
    receiver_factory, tools: SimpleNamespace, tmp_path: Path
) -> None:
    """Implicit VR, Big Endian and Deflated datasets (with a nested sequence) arrive intact."""
    rx = receiver_factory()
    src = tools.write_ct_series(tmp_path / "src", 1, 32, seed=30)[0]
    files = []
    for ts in (ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-A0100", "SRT", "Brain"
        files.append(reencoded(src, tmp_path / f"{ts}.dcm", ts, SOPInstanceUID=generate_uid(),
                               AnatomicRegionSequence=[item]))
    result = tools.send_files(rx.port, files)
    assert sorted(result.statuses.values()) == [0, 0, 0], result.comments
    assert_stored_identically(rx.store(), files, tools)


@integration
def test_allow_lists_reject_at_association_with_a_logged_reason(
    receiver_factory, tools: SimpleNamespace, tmp_path: Path
) -> None:
    files = tools.write_ct_series(tmp_path / "s", 2, 32, seed=40)
    rx = receiver_factory(allowed_calling_aets=["GOODSCU"], name="aets")

    bad = tools.send_files(rx.port, files, calling="BADSCU")
    assert not bad.established and bad.rejected == (1, 1, 3)  # permanent, service user, calling AE
    wrong_called = tools.send_files(rx.port, files, calling="GOODSCU", called="SOMEONEELSE")
    assert not wrong_called.established and wrong_called.rejected == (1, 1, 7)
    good = tools.send_files(rx.port, files, calling="GOODSCU")
    assert good.established and set(good.statuses.values()) == {0}
    reasons = [e["reason"] for e in rx.log_events() if e.get("event") == "association_rejected"]
    assert any("'BADSCU'" in r and "allowed_calling_aets" in r for r in reasons)
    assert any("'SOMEONEELSE'" in r for r in reasons)

    rx2 = receiver_factory(allowed_peers=["10.0.0.0/8"], name="peers")
    blocked = tools.send_files(rx2.port, files, calling="ANYSCU")
    assert not blocked.established and blocked.rejected == (1, 1, 3)
    assert any("127.0.0.1" in e["reason"] and "allowed_peers" in e["reason"]
               for e in rx2.log_events() if e.get("event") == "association_rejected")
    assert rx2.store().instance_total() == 0
    assert rx.stop() == 0 and rx2.stop() == 0  # SIGTERM: a clean shutdown
    assert any(e.get("event") == "stopped" for e in rx.log_events())


@integration
def test_too_many_associations_are_rejected_transiently(
    receiver_factory, tools: SimpleNamespace, tmp_path: Path
) -> None:
    from pynetdicom import AE

    rx = receiver_factory(max_associations=1)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = ae.associate("127.0.0.1", rx.port, ae_title="GLOWTRIAGE")
    try:
        assert held.is_established
        second = tools.send_files(rx.port, tools.write_ct_series(tmp_path, 1, 16), calling="SECOND")
        assert not second.established and second.rejected == (2, 3, 2)  # transient, local limit exceeded
    finally:
        held.release()
    time.sleep(0.3)
    assert tools.echo(rx.port) == 0
    assert any("max_associations = 1" in e.get("reason", "") for e in rx.log_events()
               if e.get("event") == "association_rejected")


@integration
def test_a_taken_port_fails_fast_naming_the_key(receiver_factory) -> None:
    import socket
    import sys

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        rx = receiver_factory(start=False, port=squatter.getsockname()[1])
        done = subprocess.run([sys.executable, "-m", "triage.receive.scp", "--config", str(rx.config_path)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "dicom.host/dicom.port: cannot listen on 127.0.0.1:" in done.stderr
    assert '"event": "receiver_failed"' in done.stdout


@integration
def test_disk_reserve_answers_out_of_resources_without_storing(
    receiver_factory, tools: SimpleNamespace, tmp_path: Path
) -> None:
    rx = receiver_factory(storage={"min_free_mb": 10**12})  # more than any disk has
    files = tools.write_ct_series(tmp_path / "s", 3, 32, seed=50)
    result = tools.send_files(rx.port, files)
    assert set(result.statuses.values()) == {0xA700}
    assert all("reserve" in c for c in result.comments.values())
    store = rx.store()
    assert store.instance_total() == 0 and store.quarantined() == []
    assert list(store.tmp.iterdir()) == [] and list(store.spool.iterdir()) == []
    assert tools.echo(rx.port) == 0
    assert any(e.get("event") == "out_of_resources" for e in rx.log_events())


@integration
def test_tls_listener_with_a_self_signed_certificate(
    receiver_factory, tools: SimpleNamespace, tmp_path: Path
) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl CLI not installed (scripts/bootstrap.sh installs it)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    rx = receiver_factory(tls={"enabled": True, "cert_file": str(cert), "key_file": str(key)})
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    ctx.check_hostname = False
    files = tools.write_ct_series(tmp_path / "s", 3, 32, seed=60)

    result = tools.send_files(rx.port, files, tls=ctx)
    assert result.established and set(result.statuses.values()) == {0}
    assert_stored_identically(rx.store(), files, tools)
    # a plain-TCP peer gets no association, and the TLS listener keeps serving
    assert tools.echo(rx.port, timeout=3) is None
    time.sleep(0.2)
    assert tools.echo(rx.port, tls=ctx) == 0
    assert any(e.get("event") == "tls_handshake_failed" for e in rx.log_events())


@integration
@REACTORS
def test_received_datasets_stream_into_the_spool_tmp_without_moving_the_process_tempdir(
    tools: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reactor: str
) -> None:
    """In-process, so the test sees the process: ``tempfile`` is untouched while the receiver runs,
    yet pynetdicom's own file for each received dataset lies in the store's tmp/ (so adopting it is
    a link/rename on the spool's filesystem, not a copy)."""
    from triage.config import load
    from triage.receive.scp import Receiver
    from triage.store.db import Store

    monkeypatch.setenv("GLOWTRIAGE_STOCK_PYNETDICOM", reactor_env(reactor)["GLOWTRIAGE_STOCK_PYNETDICOM"])
    tempdir_before, gettempdir_before = tempfile.tempdir, tempfile.gettempdir()
    port = tools.find_free_port()
    cfg = load(tools.write_config(tmp_path / "config.toml", {
        "dicom": {"ae_title": "GLOWTRIAGE", "host": "127.0.0.1", "port": port},
        "storage": {"root": str(tmp_path / "var"), "min_free_mb": 1},
        "metrics": {"enabled": False},
    }))
    seen: list[Path] = []

    class Recording(Receiver):
        def _materialize(self, event: Any) -> Path:
            seen.append(Path(event.dataset_path).parent)
            return super()._materialize(event)

    store = Store(cfg.storage_root)
    rx = Recording(cfg, store)
    rx.start()
    try:
        assert (tempfile.tempdir, tempfile.gettempdir()) == (tempdir_before, gettempdir_before)
        files = tools.write_ct_series(tmp_path / "ct", 4, 32, seed=40)
        sent = tools.send_files(port, files)
        assert sent.established and set(sent.statuses.values()) == {0}, sent
        assert seen == [store.tmp] * len(files)
        assert store.instance_total() == len(files)
        # an unrelated temp file made while the receiver runs lands where it always did
        with tempfile.NamedTemporaryFile() as other:
            assert Path(other.name).parent == Path(gettempdir_before)
    finally:
        rx.stop()
        store.close()
    assert (tempfile.tempdir, tempfile.gettempdir()) == (tempdir_before, gettempdir_before)


# ------------------------------------------------------------------------ structure walk (no network)
def _el(tag: int, vr: bytes, value: bytes, *, undefined: bool = False) -> bytes:
    """One explicit VR little endian element."""
    import struct

    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        length = 0xFFFFFFFF if undefined else len(value)
        return struct.pack("<HH2sHI", group, elem, vr, 0, length) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _item(body: bytes, *, undefined: bool = False) -> bytes:
    import struct

    if undefined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + body + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body


_SEQ_END = bytes.fromhex("feffdde000000000")


def _check(data: bytes) -> dict[str, list[str]]:
    from triage.receive.inspect import check_structure

    return check_structure(memoryview(data), ExplicitVRLittleEndian)


def test_walk_reads_index_values_and_nested_sequences() -> None:
    uid_ = b"1.2.3.4\0"
    inner = _el(0x00080100, b"SH", b"T-A0100 ")
    data = (
        _el(0x00080005, b"CS", b"\\ISO 2022 IR 100 ")
        + _el(0x00080016, b"UI", CTImageStorage.encode() + b"\0")
        + _el(0x00082218, b"SQ", _item(inner, undefined=True) + _item(inner) + _SEQ_END, undefined=True)
        + _el(0x0020000D, b"UI", uid_)
        + _el(0x7FE00010, b"OB", _item(b"") + _item(b"\xff\xd8" * 8) + _SEQ_END, undefined=True)
    )
    values = _check(data)
    assert values["SpecificCharacterSet"] == ["", "ISO 2022 IR 100"]
    assert values["SOPClassUID"] == [str(CTImageStorage)]
    assert values["StudyInstanceUID"] == ["1.2.3.4"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_el(0x00100010, b"PN", b"DOE^JOHN")[:-3], "declares 8 bytes, 5 remain"),
        (_el(0x7FE00010, b"OB", _item(b"\xff\xd8" * 8)[:-4], undefined=True), "item at byte 12 declares"),
        (_el(0x00082218, b"SQ", _item(_el(0x00080100, b"SH", b"AB"), undefined=True)[:-8], undefined=True),
         "no delimiter"),
        (_el(0x00400280, b"UT", b"", undefined=True), "undefined length on VR UT"),
        (b"\x08\x00\x16\x00\x00\x00", "header at byte 0 is cut short"),
        (bytes.fromhex("feff0de000000000"), "item delimiter outside"),
        (_el(0x00082218, b"SQ", _el(0x00080100, b"SH", b"AB") + _SEQ_END, undefined=True),
         "expected an item"),
        (b"\x00" * 128 + b"DICM" + b"\x02\x00" * 8, "Part-10 preamble"),
    ],
)
def test_walk_refuses_malformed_datasets(data: bytes, reason: str) -> None:
    from triage.receive.inspect import CANNOT_UNDERSTAND, BadInstance

    with pytest.raises(BadInstance) as err:
        _check(data)
    assert err.value.status == CANNOT_UNDERSTAND
    assert reason in err.value.reason
    assert len(err.value.comment) <= 64 or len(err.value.reason) > 64


def test_walk_refuses_a_nesting_bomb() -> None:
    from triage.receive.inspect import BadInstance

    data = b""
    for _ in range(40):
        data = _el(0x00082218, b"SQ", _item(data, undefined=True) + _SEQ_END, undefined=True)
    with pytest.raises(BadInstance, match="nested deeper"):
        _check(data)


@integration
def test_per_peer_connection_limit_answers_a_transient_rejection_with_the_reason(
    receiver_factory, tools: SimpleNamespace
) -> None:
    """dicom.max_connections_per_peer: over it, a request gets A-ASSOCIATE-RJ (transient, local limit
    exceeded) from the handshake gate, the reason is logged, and the slot comes back when one ends."""
    from pynetdicom import AE

    rx = receiver_factory(max_connections_per_peer=1)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = ae.associate("127.0.0.1", rx.port, ae_title="GLOWTRIAGE")
    try:
        assert held.is_established
        assert tools.echo(rx.port) is None  # the second connection from 127.0.0.1 is refused
    finally:
        held.release()
    time.sleep(0.3)
    assert tools.echo(rx.port) == 0
    rejected = [e for e in rx.log_events() if e.get("event") == "association_rejected"]
    assert any("max_connections_per_peer = 1" in e.get("reason", "") and e.get("diagnostic") == 2
               for e in rejected), rejected


@integration
def test_a_silent_connection_is_closed_by_artim_and_holds_no_association_slot(
    receiver_factory, tools: SimpleNamespace
) -> None:
    import socket

    rx = receiver_factory(max_associations=1, artim_timeout_s=1.0)
    t0 = time.monotonic()
    silent = socket.create_connection(("127.0.0.1", rx.port), timeout=5)
    try:
        assert tools.echo(rx.port) == 0  # the only association slot is not taken by the silent socket
        silent.settimeout(5)
        assert silent.recv(1) == b""  # the server closed it (PS3.8 ARTIM)
        assert 0.9 < time.monotonic() - t0 < 3.0
    finally:
        silent.close()
    assert any(e.get("event") == "artim_expired" for e in rx.log_events())
