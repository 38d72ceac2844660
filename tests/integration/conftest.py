"""Shared integration fixtures: thin wrappers over :mod:`training.harness` (free ports, temp configs, the
receiver as a real subprocess, Orthanc, synthetic CT series) plus a pynetdicom SCU that reports each
instance's status exactly (only the tests need that one).

Everything here drives real programs over loopback (house rule: no mocks of what can run here).
Helpers are exposed through fixtures (not ``from conftest import``) because several test folders
have a ``conftest.py`` and the module name would be ambiguous.

Fixtures:

* ``tools``: ``find_free_port()``, ``write_ct_series(dir, n, size, study_uid=, series_uid=, seed=,
  signed=, prefix=)``, ``dataset_bytes(path)``, ``write_config(path, sections)``,
  ``echo(port, ...)``, ``send_files(port, files, ...) -> SendResult`` (exact per-instance statuses,
  error comments, A-ASSOCIATE-RJ triple, refused contexts), ``dcmtk_env()`` (TCP_NODELAY=1),
  ``storescu(port, files, flags=..., ...)`` (dcmtk storescu, the completed process),
  ``require_tool(name)`` (fails when a CLI is missing);
* ``receiver_factory(**dicom_keys, storage={...}, tls={...}, name=, start=True, env={...})`` ->
  :class:`ReceiverProcess` on a free port with its own storage root, stopped after the test
  (``kill()`` for SIGKILL, ``start()`` again to restart on the same root, ``log_events()``,
  ``store()``; ``env`` is added to the receiver's environment, e.g. GLOWTRIAGE_STOCK_PYNETDICOM=1);
* ``orthanc_factory(modalities={...}, extra={...}, dicomweb=False)`` ->
  :class:`training.harness.orthanc.Orthanc` with REST helpers (``upload``, ``get``, ``post``,
  ``sr_count``), the DICOMweb plug-in loaded on request;
* ``free_port``, ``ct_series``: the plain helpers alone.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from training.harness.config import write_config
from training.harness.daemon import SERVE, TriageProcess
from training.harness.orthanc import Orthanc, orthanc_binary
from training.harness.ports import free_port as find_free_port
from training.harness.process import require_tool
from training.harness.series import write_ct_series
from training.harness.storescu import dcmtk_env, storescu

# How tests start the receiver: the whole daemon, as deployed (``--config FILE`` is appended).
RECEIVER_ARGV = SERVE
VERIFICATION = "1.2.840.10008.1.1"


@pytest.fixture
def free_port() -> Callable[[], int]:
    return find_free_port


@pytest.fixture
def ct_series() -> Callable[..., list[Path]]:
    return write_ct_series


def dataset_bytes(path: Path) -> bytes:
    """The dataset of a Part-10 file: everything after the File Meta group (what goes on the wire)."""
    from triage.store.part10 import dataset_offset

    raw = Path(path).read_bytes()
    return raw[dataset_offset(raw) :]


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
class ReceiverProcess(TriageProcess):
    """``triage serve --config FILE`` as a real subprocess, ready once it logs ``listening`` (20 s at
    most); SIGTERM then 15 s before SIGKILL. Logs (JSON lines) go to ``log_path``."""

    def __init__(self, config_path: Path, root: Path, port: int, ae_title: str, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        super().__init__(config_path, log_path, argv=RECEIVER_ARGV, ready_event="listening", env=env,
                         start_timeout=20.0, stop_grace=15.0)
        self.root, self.port, self.ae_title = root, port, ae_title

    @property
    def config_path(self) -> Path:
        return self.config

    @property
    def log_path(self) -> Path:
        return self.log

    def store(self) -> Any:
        from triage.store.db import Store

        return Store(self.root)


@pytest.fixture
def receiver_factory(tmp_path: Path) -> Iterator[Callable[..., ReceiverProcess]]:
    """``make(**dicom_overrides, storage={...}, env={...})`` -> a started receiver on a free port."""
    started: list[ReceiverProcess] = []

    def make(
        *, start: bool = True, storage: dict[str, Any] | None = None, tls: dict[str, Any] | None = None,
        name: str = "rx", env: dict[str, str] | None = None, **dicom: Any,
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
        rx = ReceiverProcess(cfg, base / "var", port, d["ae_title"], base / "receiver.log", env=env)
        started.append(rx)
        return rx.start() if start else rx

    yield make
    for rx in started:
        rx.stop()


# ---------------------------------------------------------------------------------- Orthanc
@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """``make(modalities={...})`` -> a started Orthanc on free ports (30 s to answer), stopped after
    the test; ``dicomweb=True`` loads the DICOMweb plug-in."""
    if orthanc_binary() is None:
        pytest.fail("Orthanc is not installed (scripts/bootstrap.sh installs it)")
    started: list[Orthanc] = []

    def make(modalities: dict[str, list[Any]] | None = None, name: str = "orthanc",
             extra: dict[str, Any] | None = None, dicomweb: bool = False) -> Orthanc:
        o = Orthanc(tmp_path / name, modalities=modalities, extra=extra, dicomweb=dicomweb,
                    name="glowtriage-test")
        started.append(o)
        return o.start(timeout=30.0)

    yield make
    for o in started:
        o.stop()


# Expose plain helpers to tests through one fixture (see module docstring).
@pytest.fixture
def tools() -> SimpleNamespace:
    return SimpleNamespace(
        find_free_port=find_free_port, write_ct_series=write_ct_series, dataset_bytes=dataset_bytes,
        write_config=write_config, echo=echo, send_files=send_files, dcmtk_env=dcmtk_env,
        require_tool=require_tool, storescu=storescu,
    )
