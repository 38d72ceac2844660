"""Orthanc as the PACS for tests, the demo and the benches: a real one, with a temporary JSON config.

Own storage under ``base``, loopback only, no authentication, ``StableAge`` 1 (so Lua hooks and stable
events come quickly), ``TCP_NODELAY=1`` in its environment (dcmtk's switch for its sockets). Ready means
its REST API answers ``GET /system`` (and, with the DICOMweb plug-in, that the plug-in is loaded).
``start()`` again after ``stop()`` reuses the same storage, so a test can take the PACS down and bring
it back with what it held.

``dicomweb=True`` loads Debian's DICOMweb plug-in (package ``orthanc-dicomweb``) at
``{url}/dicom-web/``: the STOW-RS destination is tested against it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from training.harness.ports import free_port
from training.harness.process import HarnessError, start_logged, stop_process

ORTHANC_CANDIDATES = ("Orthanc", "/usr/sbin/Orthanc", "/usr/bin/Orthanc")
DICOMWEB_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
)


def orthanc_binary() -> str | None:
    """The Orthanc executable, or None when it is not installed (scripts/bootstrap.sh installs it)."""
    for cand in ORTHANC_CANDIDATES:
        found = shutil.which(cand) or (cand if Path(cand).is_file() else None)
        if found:
            return found
    return None


def dicomweb_plugin() -> Path | None:
    """Debian's DICOMweb plug-in (``apt-get install orthanc-dicomweb``), or None when it is missing."""
    for cand in DICOMWEB_CANDIDATES:
        if Path(cand).exists():
            return Path(cand)
    found = sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))
    return found[0] if found else None


class Orthanc:
    """One Orthanc process with REST helpers; ports are free ones unless given."""

    def __init__(
        self,
        base: Path,
        *,
        aet: str = "ORTHANC",
        http_port: int | None = None,
        dicom_port: int | None = None,
        modalities: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        plugins: Sequence[Path | str] = (),
        dicomweb: bool = False,
        name: str = "glowtriage-harness",
    ) -> None:
        self.base = Path(base)
        self.aet = aet
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.modalities = modalities or {}
        self.extra = extra or {}
        self.plugins = [str(p) for p in plugins]
        self.dicomweb = dicomweb
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (STOW-RS: POST ``{dicomweb_url}/studies``)."""
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.base / "orthanc.log"

    def config(self) -> dict[str, Any]:
        """The JSON configuration this Orthanc runs with (``extra`` overrides any key)."""
        plugins = list(self.plugins)
        conf: dict[str, Any] = {
            "Name": self.name,
            "StorageDirectory": str(self.base / "storage"),
            "IndexDirectory": str(self.base / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "StableAge": 1,
            "DicomModalities": self.modalities,
            "HttpServerEnabled": True,
        }
        if self.dicomweb:
            plugin = dicomweb_plugin()
            if plugin is None:
                raise HarnessError(
                    "Orthanc's DICOMweb plug-in is not installed (apt-get install orthanc-dicomweb)"
                )
            plugins.append(str(plugin))
            conf["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        conf["Plugins"] = plugins
        conf.update(self.extra)
        return conf

    def start(self, timeout: float = 60.0) -> Orthanc:
        """Write the config, start Orthanc and wait until its REST API (and DICOMweb) answers."""
        binary = orthanc_binary()
        if binary is None:
            raise HarnessError("Orthanc is not installed (scripts/bootstrap.sh installs it)")
        self.base.mkdir(parents=True, exist_ok=True)
        cfg = self.base / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=1), encoding="utf-8")
        self.proc = start_logged([binary, str(cfg)], self.log_path, cwd=self.base, env={"TCP_NODELAY": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"Orthanc exited with {self.proc.returncode}; see {self.log_path}:\n"
                    f"{self.log_text()[-2000:]}"
                )
            if self._ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise HarnessError(f"Orthanc not answering after {timeout:.0f} s; see {self.log_path}")

    def _ready(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            self.get("/system", timeout=2)
            socket.create_connection(("127.0.0.1", self.dicom_port), 2).close()  # DICOM side up too
            if not self.dicomweb:
                return True
            return "dicom-web" in self.get("/plugins", timeout=2)
        return False

    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")
        return ""

    # ------------------------------------------------------------------------------------ REST
    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = 120.0,
    ) -> Any:
        """One REST call; ``body`` bytes go as they are, anything else as JSON. JSON answers are
        decoded, others returned as bytes."""
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            raw = rsp.read()
            is_json = "json" in rsp.headers.get("Content-Type", "")
        return json.loads(raw) if is_json and raw else raw

    def get(self, path: str, timeout: float = 120.0) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post(
        self, path: str, body: Any, content_type: str = "application/json", timeout: float = 120.0
    ) -> Any:
        return self.request("POST", path, body, content_type, timeout=timeout)

    def upload(self, files: Sequence[Path], threads: int = 1) -> list[dict[str, Any]]:
        """POST /instances for every file (``threads`` at a time); Orthanc's answers in file order
        (``ID`` the instance, ``ParentStudy`` its study)."""

        def one(f: Path) -> dict[str, Any]:
            return dict(self.post("/instances", Path(f).read_bytes(), "application/dicom"))

        if threads <= 1:
            return [one(f) for f in files]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(one, files))

    def store_to(self, modality: str, resources: Sequence[str], timeout: float = 1800.0) -> Any:
        """Orthanc C-STOREs ``resources`` (study/series/instance ids) to ``modality``, synchronously,
        as a PACS routing rule would; returns Orthanc's job summary."""
        return self.post(
            f"/modalities/{modality}/store",
            {"Resources": list(resources), "Synchronous": True},
            timeout=timeout,
        )

    def sr_instances(self, study_uid: str) -> list[str]:
        """Orthanc ids of the SR instances it holds in the study ``study_uid``."""
        found = self.post(
            "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}
        )
        return list(found or [])

    def sr_count(self, study_uid: str) -> int:
        return len(self.sr_instances(study_uid))

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def stop(self) -> None:
        """SIGTERM (20 s for Orthanc to close its index cleanly), then SIGKILL."""
        stop_process(self.proc, grace=20.0, kill_wait=5.0)
