"""Shared integration fixtures: free ports, temp configs, the receiver as a real subprocess, Orthanc,
synthetic CT series, and a pynetdicom SCU that reports each instance's status exactly.

Everything here drives real programs over loopback (house rule: no mocks of what can run here).
Helpers are exposed through fixtures (not ``from conftest import``) because several test folders
have a ``conftest.py`` and the module name would be ambiguous.

Fixtures:

* ``tools``: ``find_free_port()``, ``write_ct_series(dir, n, size, study_uid=, series_uid=, seed=,
  signed=, prefix=)``, ``dataset_bytes(path)``, ``write_config(path, sections)``,
  ``echo(port, ...)``, ``send_files(port, files, ...) -> SendResult`` (exact per-instance statuses,
  error comments, A-ASSOCIATE-RJ triple, refused contexts), ``dcmtk_env()`` (TCP_NODELAY=1),
  ``require_tool(name)`` (skips when a CLI is missing);
* ``receiver_factory(**dicom_keys, storage={...}, tls={...}, name=, start=True)`` ->
  :class:`ReceiverProcess` on a free port with its own storage root, stopped after the test
  (``kill()`` for SIGKILL, ``start()`` again to restart on the same root, ``log_events()``,
  ``store()``);
* ``orthanc_factory(modalities={...}, extra={...})`` -> :class:`OrthancProcess` with REST helpers
  (``upload``, ``get``, ``post``);
* ``free_port``, ``ct_series``: the plain helpers alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
# How tests start the receiver; ``--config FILE`` is appended. Switch to ``triage serve`` here once
# the daemon's entry point exists, and every receiver test follows.
RECEIVER_ARGV = [PYTHON, "-m", "triage.cli", "serve"]  # the whole daemon, as deployed
VERIFICATION = "1.2.840.10008.1.1"


# --------------------------------------------------------------------------------------- ports
def find_free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it; a tiny race remains, as everywhere)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_port() -> Callable[[], int]:
    return find_free_port


def dcmtk_env() -> dict[str, str]:
    """Environment for dcmtk tools: TCP_NODELAY=1 so dcmtk disables Nagle on its sockets too."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


# ------------------------------------------------------------------------------ synthetic data
def write_ct_series(
    out_dir: Path,
    n: int = 10,
    size: int = 64,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    seed: int = 0,
    signed: bool = False,
    prefix: str = "ct",
) -> list[Path]:
    """Write ``n`` axial CT slices (Explicit VR Little Endian) and return their paths.

    Explicit VR LE because storescu sends a file in its own transfer syntax when the SCP accepts it,
    so what goes on the wire is the file's dataset, byte for byte.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    paths = []
    yy, xx = np.mgrid[:size, :size]
    head = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyDate = "20240101"
        ds.Modality = "CT"
        ds.PatientName = "SYNTH^PHANTOM"
        ds.PatientID = "SYNTH0001"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyDescription = "CT HEAD"
        ds.SeriesDescription = "AXIAL BRAIN"
        ds.SeriesNumber = 2
        ds.InstanceNumber = i + 1
        ds.SliceThickness = 5.0
        ds.ImagePositionPatient = [-100.0, -100.0, 5.0 * i]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [200.0 / size, 200.0 / size]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.BitsAllocated = 16
        if signed:
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
            ds.RescaleIntercept = 0
            pixels = np.where(head, 40, -1000) + rng.normal(0, 10, (size, size))
            arr = pixels.astype(np.int16)
        else:
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
            ds.RescaleIntercept = -1024
            pixels = np.where(head, 1064, 24) + rng.normal(0, 10, (size, size))
            arr = np.clip(pixels, 0, 4095).astype(np.uint16)
        ds.RescaleSlope = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 80
        ds.PixelData = arr.tobytes()
        path = out_dir / f"{prefix}{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture
def ct_series() -> Callable[..., list[Path]]:
    return write_ct_series


def dataset_bytes(path: Path) -> bytes:
    """The dataset of a Part-10 file: everything after the File Meta group (what goes on the wire)."""
    from triage.store.db import dataset_offset

    raw = Path(path).read_bytes()
    return raw[dataset_offset(raw) :]


# ---------------------------------------------------------------------------------- config
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write a small config.toml (sections of scalars/lists; dotted names for sub-tables)."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- pynetdicom SCU
def echo(port: int, called: str = "GLOWTRIAGE", calling: str = "TESTSCU", host: str = "127.0.0.1",
         tls: Any = None, timeout: float = 5.0) -> int | None:
    """C-ECHO status, or None when no association could be made."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    kwargs = {"tls_args": (tls, None)} if tls is not None else {}
    assoc = ae.associate(host, port, ae_title=called, **kwargs)
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status) if rsp else None
    finally:
        assoc.release()


@dataclass
class SendResult:
    """Per-instance outcome of :func:`send_files`; ``statuses`` maps SOP Instance UID -> status."""

    established: bool
    statuses: dict[str, int] = field(default_factory=dict)
    comments: dict[str, str] = field(default_factory=dict)
    rejected: tuple[int, int, int] | None = None  # (result, source, diagnostic) of an A-ASSOCIATE-RJ
    refused_contexts: list[str] = field(default_factory=list)


def send_files(
    port: int,
    files: Sequence[Path],
    *,
    called: str = "GLOWTRIAGE",
    calling: str = "TESTSCU",
    raw: bool | None = True,
    extra_contexts: Sequence[tuple[str, str]] = (),
    tls: Any = None,
    timeout: float = 30.0,
    on_status: Callable[[str, int], None] | None = None,
) -> SendResult:
    """Send Part-10 files with pynetdicom and record every status exactly.

    ``raw=True`` sends each file's dataset bytes untouched (pynetdicom's chunked send: no decode),
    which is how the bad-input tests put truncated or malformed bytes on the wire. ``raw=None``
    leaves pynetdicom's process-wide switch alone (set it once around concurrent senders).
    """
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, _config

    metas = []
    for f in files:
        m = read_file_meta_info(f)
        metas.append((str(m.MediaStorageSOPClassUID), str(m.MediaStorageSOPInstanceUID),
                      str(m.TransferSyntaxUID)))
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts: dict[tuple[str, str], None] = {}
    for sop_class, _sop, ts in metas:
        contexts[(sop_class, ts)] = None
    for pair in extra_contexts:
        contexts[pair] = None
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, ts)
    kwargs = {"tls_args": (tls, None)} if tls is not None else {}
    assoc = ae.associate("127.0.0.1", port, ae_title=called, **kwargs)
    result = SendResult(established=assoc.is_established)
    if not assoc.is_established:
        prim = assoc.acceptor.primitive
        if assoc.is_rejected and prim is not None:
            result.rejected = (int(prim.result), int(prim.result_source), int(prim.diagnostic))
        return result
    result.refused_contexts = [str(cx.abstract_syntax) for cx in assoc.rejected_contexts]
    with contextlib.suppress(AttributeError, OSError):  # our side of the wire: no Nagle stalls either
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    if raw is not None:
        _config.STORE_SEND_CHUNKED_DATASET = raw
    try:
        for f, (_cls, sop, _ts) in zip(files, metas, strict=True):
            try:
                rsp = assoc.send_c_store(f)
            except ValueError:  # no accepted presentation context for it
                continue
            except RuntimeError:  # the association died under us (peer killed)
                break
            if rsp is not None and "Status" in rsp:
                result.statuses[sop] = int(rsp.Status)
                if "ErrorComment" in rsp:
                    result.comments[sop] = str(rsp.ErrorComment)
                if on_status:
                    on_status(sop, int(rsp.Status))
            if not assoc.is_established:
                break
    finally:
        if raw is not None:
            _config.STORE_SEND_CHUNKED_DATASET = previous
        if assoc.is_established:
            assoc.release()
    return result


# -------------------------------------------------------------------------------- receiver
@dataclass
class ReceiverProcess:
    """``python -m triage.receive.scp --config FILE`` as a real subprocess (the lead later swaps in
    ``triage serve``). Logs (JSON lines) go to ``log_path``."""

    config_path: Path
    root: Path
    port: int
    ae_title: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log_offset: int = 0

    def start(self, timeout: float = 20.0) -> ReceiverProcess:
        """Start (or restart, appending to the same log) and wait for this run's ``listening``."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed right below
        self.proc = subprocess.Popen(
            [*RECEIVER_ARGV, "--config", str(self.config_path)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"receiver exited with {self.proc.returncode}:\n{self.log_text()}")
            if self._listening():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"receiver not listening after {timeout}s:\n{self.log_text()}")

    def _listening(self) -> bool:
        with open(self.log_path, "rb") as f:
            f.seek(self._log_offset)
            tail = f.read().decode("utf-8", errors="replace")
        return '"event": "listening"' in tail

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as in a power cut of the process."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict):
                    events.append(obj)
        return events

    def store(self) -> Any:
        from triage.store.db import Store

        return Store(self.root)


@pytest.fixture
def receiver_factory(tmp_path: Path) -> Iterator[Callable[..., ReceiverProcess]]:
    """``make(**dicom_overrides, storage={...})`` -> a started receiver on a free port."""
    started: list[ReceiverProcess] = []

    def make(
        *, start: bool = True, storage: dict[str, Any] | None = None, tls: dict[str, Any] | None = None,
        name: str = "rx", **dicom: Any,
    ) -> ReceiverProcess:
        base = tmp_path / name
        base.mkdir(parents=True, exist_ok=True)
        port = dicom.pop("port", None) or find_free_port()
        d = {"ae_title": "GLOWTRIAGE", "host": "127.0.0.1", "port": port, "acse_timeout": 10.0,
             "dimse_timeout": 30.0, "network_timeout": 30.0, **dicom}
        sections: dict[str, dict[str, Any]] = {
            "dicom": d,
            "storage": {"root": str(base / "var"), "min_free_mb": 1, **(storage or {})},
            "logging": {"level": "debug", "format": "json"},
            "metrics": {"enabled": False},
        }
        if tls:
            sections["dicom.tls"] = tls
        cfg = write_config(base / "config.toml", sections)
        rx = ReceiverProcess(cfg, base / "var", port, d["ae_title"], base / "receiver.log")
        started.append(rx)
        return rx.start() if start else rx

    yield make
    for rx in started:
        rx.stop()


# ---------------------------------------------------------------------------------- Orthanc
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


@dataclass
class OrthancProcess:
    """Orthanc with a temporary JSON config: own storage, loopback HTTP and DICOM, no auth."""

    base: Path
    http_port: int
    dicom_port: int
    aet: str = "ORTHANC"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, modalities: dict[str, list[Any]] | None = None, timeout: float = 30.0,
              extra: dict[str, Any] | None = None) -> OrthancProcess:
        self.base.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "glowtriage-test",
            "StorageDirectory": str(self.base / "storage"),
            "IndexDirectory": str(self.base / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomModalities": modalities or {},
            "HttpServerEnabled": True,
            "Plugins": [],
            "StableAge": 1,
            **(extra or {}),
        }
        cfg = self.base / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=1), encoding="utf-8")
        log = open(self.base / "orthanc.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.base, env=dcmtk_env())
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            with contextlib.suppress(OSError):
                self.get("/system")
                return self
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc not up after {timeout}s: {self.log_text()[-2000:]}")

    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.base / "orthanc.log").read_text(errors="replace")
        return ""

    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json", timeout: float = 120.0) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            data = rsp.read()
        ctype = rsp.headers.get("Content-Type", "")
        return json.loads(data) if "json" in ctype and data else data

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: Any, content_type: str = "application/json") -> Any:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self._request("POST", path, payload, content_type)

    def upload(self, files: Sequence[Path]) -> list[str]:
        """POST /instances for each file; returns Orthanc instance ids."""
        ids = []
        for f in files:
            rsp = self.post("/instances", Path(f).read_bytes(), "application/dicom")
            ids.append(rsp["ID"])
        return ids

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancProcess]]:
    """``make(modalities={...})`` -> a started Orthanc on free ports, stopped after the test."""
    if not Path(ORTHANC).exists():
        pytest.fail("Orthanc is not installed (scripts/bootstrap.sh installs it)")
    started: list[OrthancProcess] = []

    def make(modalities: dict[str, list[Any]] | None = None, name: str = "orthanc",
             extra: dict[str, Any] | None = None) -> OrthancProcess:
        o = OrthancProcess(tmp_path / name, find_free_port(), find_free_port())
        started.append(o)
        return o.start(modalities, extra=extra)

    yield make
    for o in started:
        o.stop()


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/bootstrap.sh installs it)")
    return path


# Expose plain helpers to tests through one fixture (see module docstring).
@pytest.fixture
def tools() -> SimpleNamespace:
    return SimpleNamespace(
        find_free_port=find_free_port, write_ct_series=write_ct_series, dataset_bytes=dataset_bytes,
        write_config=write_config, echo=echo, send_files=send_files, dcmtk_env=dcmtk_env,
        require_tool=require_tool,
    )
