"""`triage score | models | status | check-config` through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from training.harness.fixtures import tiny_model
from training.synth import SynthOptions, write_dataset
from triage.model.modelset import calibrate

REPO = Path(__file__).resolve().parents[2]
CONTRACT = {"study_uid", "series_uid", "log_p_normal_model", "log_p_mixture_model", "log_posterior",
            "threshold", "flagged", "model_version"}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "triage.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=check)



@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("cli")
    write_dataset(base / "studies", normal=2, abnormal=1, seed=5, options=SynthOptions(distractors=False))
    # a chest CT: no series qualifies, so `triage score` must reject the study with a reason
    first = sorted((base / "studies").glob("study_*"))[0]
    chest_uid = generate_uid()
    for f in sorted(first.rglob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = chest_uid
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.BodyPartExamined = "CHEST"
        ds.StudyDescription = ds.SeriesDescription = ds.ProtocolName = "CT THORAX"
        out = base / "chest" / f.name
        out.parent.mkdir(exist_ok=True)
        ds.save_as(out)
    tiny_model(base / "m0.pt", 1)
    tiny_model(base / "m1.pt", 2)
    return base


def test_models_create_list_show_promote_rollback_and_score(data: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[storage]\nroot = "var"\n')
    labels = data / "studies" / "labels.csv"
    out = run("models", "create", "--config", str(cfg), "--m0", str(data / "m0.pt"), "--m1",
              str(data / "m1.pt"), "--calibrate", str(data / "studies"), "--labels", str(labels), "--promote")
    assert "(youden)" in out.stdout and "promoted" in out.stdout
    out2 = run("models", "create", "--config", str(cfg), "--m0", str(data / "m1.pt"), "--m1",
               str(data / "m0.pt"), "--calibrate", str(data / "studies"), "--specificity", "0.5",
               "--trunk", str(data / "m0.pt"))
    assert "(specificity=0.5)" in out2.stdout
    listing = run("models", "list", "--config", str(cfg)).stdout.splitlines()
    assert len(listing) == 2 and sum(line.startswith("*") for line in listing) == 1
    v1 = next(line[2:].split()[0] for line in listing if line.startswith("*"))
    v2 = next(line[2:].split()[0] for line in listing if not line.startswith("*"))
    shown = json.loads(run("models", "show", "--config", str(cfg)).stdout)
    assert shown["version"] == v1 and shown["operating_point"]["method"] == "youden"
    assert "trunk_sha256" not in shown  # created without --trunk
    with_trunk = json.loads(run("models", "show", v2, "--config", str(cfg)).stdout)
    assert with_trunk["trunk_sha256"] == with_trunk["m1_sha256"]  # --trunk was the file given as --m1
    assert shown["provenance"]["calibration"]["studies"] == 3
    run("models", "promote", v2, "--config", str(cfg))
    assert json.loads(run("status", "--json", "--config", str(cfg)).stdout)["model_set"] == v2
    run("models", "rollback", "--config", str(cfg))
    status = json.loads(run("status", "--json", "--config", str(cfg)).stdout)
    assert status["model_set"] == v1 and status["studies"] == []

    scored = run("score", "--json", "--config", str(cfg), str(data / "studies"), str(data / "chest"))
    rows = [json.loads(line) for line in scored.stdout.splitlines()]
    assert len(rows) == 4
    rejected = [r for r in rows if r.get("rejected")]
    assert len(rejected) == 1 and "no axial head-CT series" in rejected[0]["reason"]
    for r in rows:
        if not r.get("rejected"):
            assert set(r) >= CONTRACT
            assert r["log_posterior"] == pytest.approx(r["log_p_normal_model"] - r["log_p_mixture_model"])
            assert r["flagged"] == (r["log_posterior"] < r["threshold"]) and r["model_version"] == v1
    # deterministic: the same studies score the same, bit for bit
    again = [json.loads(line) for line in
             run("score", "--json", "--config", str(cfg), str(data / "studies")).stdout.splitlines()]
    by_uid = {r["study_uid"]: r["log_posterior"] for r in rows if not r.get("rejected")}
    assert {r["study_uid"]: r["log_posterior"] for r in again} == by_uid

    # v2 was calibrated without labels on 3 normals: it keeps a region calibration, and `score --json`
    # gives the region, its centre in patient mm and the source slice nearest to it
    assert with_trunk["calibration"]["region"]["windows_mm"] == [10.0, 20.0, 40.0]
    run("models", "promote", v2, "--config", str(cfg))
    region_rows = [json.loads(line) for line in
                   run("score", "--json", "--config", str(cfg), str(data / "studies")).stdout.splitlines()]
    for r in region_rows:
        assert r["region_flagged"] == (r["region_score"] < r["region_threshold"])
        assert r["flagged"] == (r["global_flagged"] or r["region_flagged"]) and r["flag_policy"] == "either"
        assert len(r["region_center_mm"]) == 3 and r["region_sop_instance_uid"].startswith("1.")
        assert 0.0 <= r["region_percentile"] <= 100.0


def test_score_without_a_model_set_fails_clearly(tmp_path: Path, data: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[storage]\nroot = "var"\n')
    out = run("score", "--config", str(cfg), str(data / "chest"), check=False)
    assert out.returncode == 1 and "no current model set" in out.stderr


def test_check_config(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[dicom]\nport = 11113\n")
    assert run("check-config", "--config", str(good)).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nport = 70000\nprot = 1\n")
    out = run("check-config", "--config", str(bad), check=False)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 2 and all(str(bad) in line for line in lines)
    assert any("dicom.port" in line for line in lines) and any("dicom.prot" in line for line in lines)


def test_calibrate_youden_and_specificity() -> None:
    post = {"a": -10.0, "b": -8.0, "c": 1.0, "d": 2.0, "e": 3.0}
    labels = {"a": ("abnormal", "x"), "b": ("abnormal", "y"), "c": ("normal", ""), "d": ("normal", ""),
              "e": ("normal", "")}
    t, method, normals, details = calibrate(post, labels, 0.9)
    assert method == "youden" and -8.0 < t < 1.0 and sorted(normals) == [1.0, 2.0, 3.0]
    assert details["sensitivity"] == 1.0 and details["specificity"] == 1.0
    t2, method2, normals2, _ = calibrate({"c": 1.0, "d": 2.0, "e": 3.0, "f": 4.0}, None, 0.75)
    assert method2 == "specificity=0.75" and 1.0 < t2 < 2.0 and len(normals2) == 4
    flagged = [s for s in normals2 if s < t2]
    assert len(flagged) / len(normals2) <= 0.25 + 1e-9
    assert np.isfinite(t2)
