"""Model sets per body part: a head-CT set and a chest set current at once, studies to their own kind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.harness.fixtures import tiny_model
from training.synth import SynthOptions, write_dataset
from training.synth.cxr_dicom import write_cxr_dataset
from triage.model.registry import CURRENT, Registry, RegistryError
from triage.model.score import Scorer, Scorers, VolumeInput

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
