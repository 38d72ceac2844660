"""Model sets per body part: a head-CT set and a chest set current at once, studies to their own kind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from training.harness.fixtures import tiny_model
from training.synth import SynthOptions, write_dataset
from training.synth.cxr_dicom import write_cxr_dataset
from triage.model.registry import CURRENT, KINDS, Registry, RegistryError
from triage.model.score import Scorer, Scorers, VolumeInput
from triage.ops import metrics, schedule
from triage.store.db import Store

TINY_2D = "test-tiny-2d"  # the radiograph tests' tiny preset

REPO = Path(__file__).resolve().parents[2]



def _create(reg: Registry, m0: Path, m1: Path, preset: str, version: str) -> str:
    s = reg.create(m0, m1, preset=preset, preprocessing_version=version, threshold=0.0, method="test",
                   normal_scores=[-1.0, 0.0, 1.0], provenance={}, software_version="test")
    return s.version


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "triage.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    base = tmp_path_factory.mktemp("kinds")
    reg = Registry(base / "models")
    ct = _create(reg, tiny_model(base / "c0.pt", 1), tiny_model(base / "c1.pt", 2), "test-tiny", "assemble-2")
    cxr = _create(reg, tiny_model(base / "x0.pt", 3, TINY_2D), tiny_model(base / "x1.pt", 4, TINY_2D),
                  "test-tiny-2d", "radiograph-1")
    reg.promote(ct)
    reg.promote(cxr)
    return {"base": base, "ct": ct, "cxr": cxr}


def test_both_kinds_are_current_and_old_registries_still_read(world: dict, tmp_path: Path) -> None:
    reg = Registry(world["base"] / "models")
    assert reg.get(world["ct"]).kind == "ct" and reg.get(world["cxr"]).kind == "cxr"
    assert {k: s.version for k, s in reg.currents().items()} == {"ct": world["ct"], "cxr": world["cxr"]}
    assert reg.current().version == world["ct"]  # what every single-kind caller reads
    assert (reg.root / CURRENT).resolve().name == world["ct"]
    assert reg.get(world["cxr"]).info().kind == "cxr"
    listing = run("models", "list", "--models", str(reg.root)).stdout.splitlines()
    assert sum(line.startswith("*") for line in listing) == 2
    assert any("kind=cxr" in line and line.startswith("*") for line in listing)
    # the head set was made on assemble-2 volumes, which this software no longer writes; the chest set
    # on the current radiograph version
    ct_line = next(line for line in listing if world["ct"] in line)
    cxr_line = next(line for line in listing if world["cxr"] in line)
    assert "preprocessing=assemble-2 (STALE" in ct_line
    assert "preprocessing=radiograph-1  " in cxr_line and "STALE" not in cxr_line
    # a set made before kinds existed (no "kind" in its manifest) is a head-CT set
    old = tmp_path / "old"
    shutil.copytree(reg.root / world["ct"], old / world["ct"])
    m = json.loads((old / world["ct"] / "manifest.json").read_text())
    del m["kind"]
    (old / world["ct"] / "manifest.json").write_text(json.dumps(m))
    (old / CURRENT).symlink_to(world["ct"])
    legacy = Registry(old)
    assert legacy.current().kind == "ct" and set(legacy.currents()) == {"ct"}


def test_rollback_is_per_kind(world: dict, tmp_path: Path) -> None:
    reg = Registry(tmp_path / "m")
    b = world["base"]
    a1 = _create(reg, b / "x0.pt", b / "x1.pt", "test-tiny-2d", "radiograph-1")
    c1 = _create(reg, b / "c0.pt", b / "c1.pt", "test-tiny", "assemble-2")
    a2 = _create(reg, b / "x1.pt", b / "x0.pt", "test-tiny-2d", "radiograph-1")
    for v in (a1, c1, a2):
        reg.promote(v)
    assert reg.current("cxr").version == a2 and reg.current().version == c1
    with pytest.raises(RegistryError, match="no earlier"):
        reg.rollback()  # the head-CT set has no predecessor, whatever the chest set did
    assert reg.rollback(kind="cxr").version == a1 and reg.current().version == c1


def test_scorers_send_each_image_to_its_kind(world: dict) -> None:
    sc = Scorers.from_registry(Registry(world["base"] / "models"), device="cpu")
    vol = np.random.default_rng(0).integers(0, 128, (32, 128, 128), dtype=np.uint8)
    img = np.random.default_rng(1).integers(0, 128, (512, 512), dtype=np.uint8)
    a, b = sc.score([VolumeInput("s1", "r1", vol), VolumeInput("s2", "r2", img)])
    assert (a.model_version, b.model_version) == (world["ct"], world["cxr"])
    # interleaved kinds: each kind's images go to its scorer in one call, results in the given order
    mixed = sc.score([VolumeInput("s3", "r3", img), VolumeInput("s4", "r4", vol),
                      VolumeInput("s5", "r5", img)])
    assert [r.study_uid for r in mixed] == ["s3", "s4", "s5"]
    assert [r.model_version for r in mixed] == [world["cxr"], world["ct"], world["cxr"]]
    assert mixed[1].log_posterior == a.log_posterior and mixed[0].log_posterior == b.log_posterior
    assert sc.info_for(world["cxr"]).kind == "cxr" and sc.info_for(world["ct"]).kind == "ct"
    only_ct = Scorers({"ct": Scorer(Registry(world["base"] / "models").get(world["ct"]), device="cpu")})
    assert only_ct.accepts(vol) and not only_ct.accepts(img)


def test_triage_score_routes_a_folder_of_both_kinds(world: dict) -> None:
    base = world["base"]
    write_dataset(base / "mixed" / "ct", normal=1, abnormal=0, seed=2,
                  options=SynthOptions(distractors=False))
    write_cxr_dataset(base / "mixed" / "cxr", 1, 1, seed=2, synth_scale=6)
    out = run("score", "--json", "--models", str(base / "models"), str(base / "mixed"))
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 3 and not any(r.get("rejected") for r in rows)
    assert sorted(r["model_version"] for r in rows) == sorted([world["ct"], world["cxr"], world["cxr"]])


def test_lower_layers_name_the_kinds_as_the_registry_does() -> None:
    """ops sits below model and cannot import its KINDS: the metrics' closed label set and the
    scheduler's pointer names must agree with the registry's."""
    assert metrics.KINDS == KINDS
    assert schedule.HEAD_KIND == "ct" and schedule.CURRENT == CURRENT


def _scored_study(store: Store, k: int, version: str) -> None:
    """A study that went through assembly and scoring by ``version`` (only the rows ``status`` reads)."""
    study, series = f"1.2.826.0.1.4.{k}", f"1.2.826.0.1.4.{k}.1"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = f"{series}.1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = study, series, "DX", "PAT-Q"
    store.put_instance(f"{series}.1", study, series, ds.SOPClassUID, ExplicitVRLittleEndian,
                       lambda f: ds.save_as(f, enforce_file_format=True), "TEST", "DX")
    store.set_study_state(study, "assembled")
    assert store.record_score(study, 0, {"study_uid": study, "model_version": version, "log_posterior": -1.0})


def test_status_reports_each_kinds_set_calibration_scored_studies_and_retrain(world: dict, tmp_path: Path
                                                                           ) -> None:
    models = tmp_path / "var" / "models"
    shutil.copytree(world["base"] / "models", models, symlinks=True)
    (tmp_path / "config.toml").write_text('[storage]\nroot = "var"\n')
    with Store(tmp_path / "var") as store:
        for k, version in enumerate([world["ct"], world["cxr"], world["cxr"], "20200101-000000-gone00"]):
            _scored_study(store, k, version)
    night = {"kind": "cxr", "outcome": "rejected", "finished": "2026-11-30T03:20:00Z",
             "reason": "held-out NLL"}
    (models / "retrain.jsonl").write_text(json.dumps(night) + "\n")
    out = run("status", "--json", "--config", str(tmp_path / "config.toml")).stdout
    st = json.loads(out)
    assert st["model_set"] == world["ct"]  # the head-CT set, as before kinds
    assert {k: v["version"] for k, v in st["model_sets"].items()} == {"ct": world["ct"], "cxr": world["cxr"]}
    cxr = st["model_sets"]["cxr"]
    assert cxr["kind"] == "cxr" and cxr["preset"] == "test-tiny-2d"
    assert cxr["calibration"] == {"threshold": 0.0, "method": "test", "normals": 3, "region": False,
                                  "reference_volumes": 0}
    assert st["scored_by_kind"] == {"ct": 1, "cxr": 2, "unknown": 1}
    assert st["last_retrain"]["cxr"]["outcome"] == "rejected" and "ct" not in st["last_retrain"]
    assert "PAT-Q" not in out
    text = run("status", "--config", str(tmp_path / "config.toml")).stdout
    assert f"head CT:           {world['ct']}  preset=test-tiny" in text
    chest = f"chest radiograph:  {world['cxr']}  preset=test-tiny-2d  threshold=0.000 (test, 3 normals)"
    assert chest + "  2 scored" in text
    assert "last retrain 2026-11-30T03:20:00Z: rejected (held-out NLL)" in text
    listing = run("models", "list", "--models", str(models)).stdout
    assert "(test, 3 normals)" in listing
