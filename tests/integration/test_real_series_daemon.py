"""Issue 11 through the daemon: real scanners' head CTs sent by dcmtk storescu to `triage serve`.

The same patterns as ``tests/unit/test_real_series.py`` (a 0.625 mm JPEG Lossless tilted series with
a missing slice and only a protocol description, GE's two-stack series, an Enhanced CT multi-frame
instance, a soft/bone pair with unknown kernel names, a water phantom, and one stray slice of another
study sent in the same association as the thin series) go over the wire; each study must end scored
or rejected with a reason that names the cause, and the warnings are recorded with the assembly.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from training.harness.config import write_config
from training.harness.daemon import TriageProcess
from training.harness.fixtures import tiny_model
from training.harness.ports import free_port
from training.harness.process import stop_all
from training.harness.storescu import storescu
from triage.assemble.volume import PREPROCESSING_VERSION
from triage.model.registry import Registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from realseries import SKULL_TOP, phantom_hu, thin_zs, two_stack, write_series

pytestmark = pytest.mark.integration
SMALL = {"rows": 64, "ps": 3.5}
DONE = {"scored", "reported", "sent", "rejected", "failed"}


def _thick() -> list[float]:
    return [SKULL_TOP + 4.0 - 5.0 * i for i in range(30)][::-1]



def _patterns(root: Path) -> tuple[dict[str, str], dict[str, list[Path]]]:
    uids = {k: generate_uid() for k in ("thin", "stray", "two_stack", "enhanced", "twins", "phantom")}
    thin = thin_zs()
    del thin[117]
    sends: dict[str, list[Path]] = {}
    sends["thin+stray"] = write_series(
        root / "thin",
        thin,
        thickness=0.625,
        tilt_deg=8.5,
        study_uid=uids["thin"],
        jpeg_lossless=True,
        series_description="CTA Willis 80ml",
        protocol_name="5.14 CTA Neuro Bolus",
        **SMALL,
    ) + write_series(root / "stray", [40.0], thickness=5.0, study_uid=uids["stray"], **SMALL)
    zz, tt = two_stack()
    sends["two_stack"] = write_series(
        root / "two",
        zz,
        thickness=tt,
        sub=3,
        tilt_deg=18.5,
        study_uid=uids["two_stack"],
        body_part="HEAD",
        **SMALL,
    )
    sends["enhanced"] = write_series(
        root / "enh", _thick(), thickness=5.0, study_uid=uids["enhanced"], enhanced=True, **SMALL
    )
    frame = generate_uid()
    sends["twins"] = [
        *write_series(
            root / "bone",
            _thick(),
            thickness=5.0,
            study_uid=uids["twins"],
            frame_uid=frame,
            noise="bone",
            kernel="K2",
            rows=128,
            ps=1.75,
        ),
        *write_series(
            root / "soft",
            _thick(),
            thickness=5.0,
            study_uid=uids["twins"],
            frame_uid=frame,
            noise="soft",
            kernel="K1",
            rows=128,
            ps=1.75,
        ),
    ]
    sends["phantom"] = write_series(
        root / "ph",
        _thick(),
        thickness=5.0,
        study_uid=uids["phantom"],
        hu_fn=phantom_hu,
        body_part="HEAD",
        **SMALL,
    )
    return uids, sends


def test_real_series_patterns_through_the_daemon(tmp_path: Path) -> None:
    uids, sends = _patterns(tmp_path / "studies")
    root = tmp_path / "var"
    reg = Registry(root / "models")
    s = reg.create(
        tiny_model(tmp_path / "m0.pt", 1),
        tiny_model(tmp_path / "m1.pt", 2),
        preset="test-tiny",
        preprocessing_version=PREPROCESSING_VERSION,
        threshold=0.0,
        method="test",
        normal_scores=[-1.0, 1.0],
        provenance={},
        software_version="test",
    )
    reg.promote(s.version)
    port = free_port()
    cfg = write_config(
        tmp_path / "config.toml",
        {
            "dicom": {"ae_title": "GLOWTRIAGE", "host": "127.0.0.1", "port": port},
            "storage": {"root": str(root), "min_free_mb": 1},
            "assembly": {"quiet_seconds": 3.0, "force_seconds": 120.0},
            "scoring": {"device": "cpu"},
            "pacs": {"ae_title": "NOPACS", "host": "127.0.0.1", "port": free_port()},
            "hl7": {"enabled": False},
            "logging": {"level": "info", "format": "json"},
        },
    )
    daemon = TriageProcess(cfg, tmp_path / "daemon.log", start_timeout=90, stop_grace=30)
    try:
        daemon.start()
        for files in sends.values():
            # -xs: also propose JPEG Lossless SV1 (the thin series is stored that way, as a scanner would)
            done = storescu(port, files, timeout=300, flags=["-xs"])
            assert done.returncode == 0, done.stdout + done.stderr
        deadline = time.monotonic() + 300
        states: dict[str, Any] = {}
        while time.monotonic() < deadline:
            states = {st["study_uid"]: st for st in daemon.status(timeout=60)["studies"]}
            if set(uids.values()) <= set(states) and all(states[u]["state"] in DONE for u in uids.values()):
                break
            time.sleep(1.0)
        events = list(daemon.events())
    finally:
        stop_all(daemon)
    by_pattern = {name: states.get(uid, {}) for name, uid in uids.items()}
    for name in ("thin", "two_stack", "enhanced", "twins"):
        assert by_pattern[name].get("state") in {"scored", "reported", "sent"}, (name, by_pattern[name])
    assert by_pattern["stray"]["state"] == "rejected"
    assert "1 image: no volume" in by_pattern["stray"]["reason"]
    assert by_pattern["phantom"]["state"] == "rejected"
    assert "content is not a head: no skull ring" in by_pattern["phantom"]["reason"]
    assembled = {ev["study_uid"]: ev for ev in events if ev.get("event") == "study_assembled"}
    thin_warnings = assembled[uids["thin"]]["warnings"]
    assert any(w.startswith("interpolated across a 1.25 mm gap") for w in thin_warnings), thin_warnings
    assert any("variable slice spacing" in w for w in assembled[uids["two_stack"]]["warnings"])
    # the warnings reach the SR (Contributing Equipment's description), built even with the PACS down
    import pydicom

    srs = {}
    for f in root.rglob("sr-*.dcm"):
        ds = pydicom.dcmread(f)
        srs[ds.StudyInstanceUID] = (f, ds)
    sr_file, sr = srs[uids["thin"]]
    described = sr.ContributingEquipmentSequence[0].ContributionDescription
    assert "assembly warnings: " in described and "interpolated across a 1.25 mm gap" in described
    check = subprocess.run(["dciodvfy", str(sr_file)], capture_output=True, text=True)
    errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
    assert not errors, errors
    soft_series = next(p for p in sends["twins"] if p.parent.name == "soft")
    chosen = assembled[uids["twins"]]["series_uid"]
    assert chosen == pydicom.dcmread(soft_series, stop_before_pixels=True).SeriesInstanceUID
