"""Step 4: the daemon with its peers, all real, from :mod:`training.harness`.

Orthanc stands in for the PACS (temporary config, own storage), an MLLP listener for the RIS (it
acknowledges every ORU^R01), and ``triage serve`` runs as a subprocess on ``demo-out/config.toml``. The
test studies are uploaded to Orthanc and Orthanc C-STOREs them to glowtriage, as a PACS auto-routing
rule would; the demo then polls ``triage status --json`` until every study is done.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.demo.config import Ports
from training.demo.plan import TERMINAL, DemoError, Laps, say
from training.harness.daemon import TriageProcess
from training.harness.mllp import MLLPListener
from training.harness.orthanc import Orthanc


@dataclass
class Peers:
    mllp: MLLPListener
    orthanc: Orthanc
    daemon: TriageProcess


def reset_daemon_state(root: Path) -> None:
    """The daemon's storage without its model sets: each run starts from an empty spool and database."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name == "models":
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


@contextmanager
def running_peers(out: Path, cfg: Any, cfg_path: Path, ports: Ports, laps: Laps) -> Iterator[Peers]:
    """RIS, PACS (a fresh one each run) and daemon up; all stopped on the way out, however it ends."""
    s = cfg.settings
    mllp = orthanc = daemon = None
    try:
        with laps.lap("start_peers"):
            mllp = MLLPListener(ports.hl7)
            shutil.rmtree(out / "pacs", ignore_errors=True)
            orthanc = Orthanc(
                out / "pacs",
                aet=s.pacs.ae_title,
                dicom_port=ports.pacs,
                http_port=ports.orthanc_http,
                modalities={"GLOWTRIAGE": [s.dicom.ae_title, "127.0.0.1", ports.dicom]},
                name="glowtriage-demo-pacs",
            ).start()
            say(f"  PACS: Orthanc AE {s.pacs.ae_title} on DICOM port {ports.pacs}, web {orthanc.url}")
            say(f"  RIS:  MLLP listener on port {ports.hl7} (acknowledges every message)")
            daemon = TriageProcess(cfg_path, out / "daemon.log", cwd=cfg_path.parent).start()
            say(
                f"  glowtriage: AE {s.dicom.ae_title} on port {ports.dicom}, metrics "
                f"http://{s.metrics.host}:{ports.metrics}/metrics, log {daemon.log.relative_to(out.parent)}"
            )
        yield Peers(mllp, orthanc, daemon)
    finally:
        with laps.lap("stop"):
            if daemon is not None:
                rc = daemon.stop()
                if rc not in (0, None):
                    say(f"  note: triage serve exited with {rc}; see {daemon.log}")
            if orthanc is not None:
                orthanc.stop()
            if mllp is not None:
                mllp.stop()


def send_through_pacs(orthanc: Orthanc, folder: Path, n_studies: int, called: str) -> None:
    """Upload the studies to the PACS, then have it C-STORE them to glowtriage (synchronously)."""
    files = sorted(folder.rglob("*.dcm"))
    say(f"  uploading the {n_studies} test studies ({len(files)} instances) to the PACS ...")
    ids = sorted({r["ParentStudy"] for r in orthanc.upload(files, threads=4)})
    say(f"  PACS sends them to glowtriage (Orthanc C-STORE to {called}) ...")
    sent = orthanc.store_to("GLOWTRIAGE", ids, timeout=1800)
    failed = sent.get("FailedInstancesCount", 0) if isinstance(sent, dict) else 0
    if failed:
        say(f"  note: Orthanc reports {failed} instances it could not send")


def wait_terminal(
    daemon: TriageProcess, uids: set[str], timeout_s: float, every_s: float = 2.0
) -> dict[str, dict[str, Any]]:
    """Poll `triage status --json` until every study in ``uids`` is sent/rejected/failed."""
    t0 = time.monotonic()
    last = ""
    studies: dict[str, dict[str, Any]] = {}
    while True:
        st = daemon.status()
        studies = {s["study_uid"]: s for s in st["studies"] if s["study_uid"] in uids}
        counts: dict[str, int] = {}
        for uid in uids:
            state = studies.get(uid, {}).get("state", "not yet received")
            counts[state] = counts.get(state, 0) + 1
        line = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        if line != last:
            say(f"    {time.monotonic() - t0:5.0f} s  {line}")
            last = line
        if all(studies.get(u, {}).get("state") in TERMINAL for u in uids):
            return studies
        if daemon.proc is not None and daemon.proc.poll() is not None:
            raise DemoError(f"triage serve exited with {daemon.proc.returncode}:\n{daemon.tail()}")
        if time.monotonic() - t0 > timeout_s:
            say(f"  timed out after {timeout_s:.0f} s; see {daemon.log}")
            return studies
        time.sleep(every_s)
