"""`python -m training.demo --quick`: the README's first command, end to end, as a subprocess.

It starts real peers (Orthanc, `triage serve`, an MLLP listener) on free ports, so it is an
integration test. What it checks: the run exits 0, the triage table lists every test study exactly
once with a score, a flag and its truth, the AUC line is printed, every study's SR reached the PACS and
its ORU^R01 the RIS, nothing is left running, and a second run reuses data and models.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from training.demo import QUICK
from training.harness.config import set_toml_key

REPO = Path(__file__).resolve().parents[2]


def _run(cwd: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training.demo", "--quick", "--free-ports", "--out", "demo-out", *extra],
        cwd=cwd, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.mark.integration
def test_quick_demo_runs_end_to_end_and_reuses_its_work(tmp_path: Path) -> None:
    first = _run(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    n_test = QUICK.test_normal + QUICK.test_abnormal

    truth = [json.loads(x) for x in (tmp_path / "demo-out/data/test/truth.jsonl").read_text().splitlines()]
    names = {Path(t["study_dir"]).name: t for t in truth}
    table = re.findall(r"^\s+(\d+)\s+(study_\d{4})\s+(-?[0-9.]+)\s+(\d+)\s+(FLAG|-)\s+(\S+)", out, re.M)
    assert sorted(r[1] for r in table) == sorted(names), out
    scores = [float(r[2]) for r in table]
    assert scores == sorted(scores), "the table is sorted most suspicious (lowest) first"
    for _rank, name, _score, _pct, _flag, label in table:
        assert label.startswith(names[name]["lesion"] or "normal")
    assert re.search(rf"AUC .* on these {n_test} studies .*: (0|1)\.\d{{3}}", out), out
    assert f"SRs: {n_test} of {n_test} studies" in out
    assert f"HL7: {n_test} ORU^R01 acknowledged" in out

    summary = json.loads((tmp_path / "demo-out/demo.json").read_text())
    assert len(summary["rows"]) == n_test and all(r["state"] == "sent" for r in summary["rows"])
    for r in summary["rows"]:
        assert r["flagged"] == (r["log_posterior"] < summary["threshold"])
    cfg = (tmp_path / "demo-out/config.toml").read_text()
    assert f"port = {summary['ports']['dicom']}" in cfg and "quiet_seconds = 2.0" in cfg
    # The daemon was stopped by SIGTERM: its last log line says so.
    log = (tmp_path / "demo-out/daemon.log").read_text().splitlines()
    assert json.loads(log[-1])["event"] == "stopped"

    second = _run(tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "reusing normal, mixture, calibration, test" in second.stdout
    for name in ("trunk (normal)", "M0 (normal, from the trunk)", "M1 (mixture, from the trunk)"):
        assert f"{name}: reusing" in second.stdout
    assert "reusing model set" in second.stdout
    assert f"SRs: {n_test} of {n_test} studies" in second.stdout  # a new daemon state, all sent again


def test_set_toml_key_changes_one_key_of_one_section_and_keeps_the_rest() -> None:
    text = '[dicom]\n# the port\nport = 11112\nhost = "0.0.0.0"\n\n[metrics]\nport = 9464\n'
    out = set_toml_key(text, "metrics", "port", 5000)
    assert out == text.replace("port = 9464", "port = 5000")
    out = set_toml_key(out, "assembly", "quiet_seconds", 2.0)
    assert out.endswith("[assembly]\nquiet_seconds = 2.0\n")
    assert set_toml_key("[a]\nx = 1\n", "a", "y", "v") == '[a]\ny = "v"\nx = 1\n'


def test_fresh_refuses_a_folder_that_is_not_a_demo_output(tmp_path: Path) -> None:
    (tmp_path / "demo-out").mkdir()
    (tmp_path / "demo-out" / "precious.txt").write_text("keep me")
    res = _run(tmp_path, "--fresh")
    assert res.returncode == 1
    assert "is not a demo output folder" in res.stderr
    assert (tmp_path / "demo-out" / "precious.txt").read_text() == "keep me"


def test_demo_config_keeps_the_storage_root_inside_the_demo_folder(tmp_path: Path) -> None:
    """The demo wipes its daemon's spool each run, so a base config's real root must not survive."""
    from training.demo import Ports, write_demo_config
    from triage.config import load

    real_root = tmp_path / "production-var"
    base = tmp_path / "base.toml"
    base.write_text(f'[storage]\nroot = "{real_root}"\n[dicom]\nport = 11112\n')
    out = tmp_path / "demo-out"
    out.mkdir()
    ports = Ports(dicom=1111, metrics=2222, pacs=3333, hl7=4444, orthanc_http=5555)
    path, changes = write_demo_config(out, base, ports, QUICK)
    cfg = load(path)
    assert cfg.storage_root.resolve() == (out / "var").resolve()
    assert any(c.startswith("[storage] root") for c in changes)
    assert (cfg.settings.dicom.port, cfg.settings.metrics.port, cfg.settings.pacs.port,
            cfg.settings.hl7.port) == (1111, 2222, 3333, 4444)
    # A root already inside the demo folder is left alone.
    base.write_text('[storage]\nroot = "var"\n')
    path, changes = write_demo_config(out, base, ports, QUICK)
    assert not any(c.startswith("[storage]") for c in changes)
