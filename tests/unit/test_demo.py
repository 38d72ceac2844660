"""`python -m training.demo --quick`: the README's first command, end to end, as a subprocess.

It starts real peers (Orthanc, `triage serve`, an MLLP listener) on free ports, so it is an
integration test. What it checks: the run exits 0, the triage table lists every test study exactly
once with a score, a region score, a flag (and which score raised it), the region's centre and its truth,
the AUC line gives both scores, flagged studies have key-image PNGs, every study's SR reached the PACS
and its ORU^R01 the RIS, nothing is left running, and a second run reuses data and models.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from training.demo import CXR_FULL, CXR_QUICK, FULL, QUICK
from training.demo.plan import MIN_REGION_NORMALS
from training.demo.results import auc_of, flagged_by
from training.harness.config import set_toml_key

REPO = Path(__file__).resolve().parents[2]


def _run(cwd: Path, *extra: str, out: str = "demo-out") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training.demo", "--quick", "--free-ports", "--out", out, *extra],
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
    table = re.findall(
        r"^\s+(\d+)\s+(study_\d{4})\s+(-?[0-9.]+)\s+(\d+)\s+(-?[0-9.]+)\s+(\d+)\s+(FLAG|-)\s+"
        r"(global|region|both|-)\s+(\(-?\d+,-?\d+,-?\d+\))\s+(\S+)", out, re.M)
    assert sorted(r[1] for r in table) == sorted(names), out
    scores = [float(r[2]) for r in table]
    assert scores == sorted(scores), "the table is sorted most suspicious (lowest) first"
    for _rank, name, _score, _pct, _region, _rpct, flag, by, _centre, label in table:
        assert label.startswith(names[name]["lesion"] or "normal")
        assert (flag == "FLAG") == (by != "-")
    auc = r"(0|1)\.\d{3}"
    assert re.search(
        rf"AUC .* on these {n_test} studies .*: log p\(normal\|x\) {auc}; region score {auc}", out), out
    assert "region score: flag when" in out and "flag_policy either" in out
    assert "key images: " in out
    assert f"SRs: {n_test} of {n_test} studies" in out
    assert f"HL7: {n_test} ORU^R01 acknowledged" in out

    summary = json.loads((tmp_path / "demo-out/demo.json").read_text())
    assert len(summary["rows"]) == n_test and all(r["state"] == "sent" for r in summary["rows"])
    assert summary["flag_policy"] == "either" and summary["auc_region"] is not None
    if summary["region_threshold"] is not None:  # None in the manifest: an infinite threshold
        assert summary["region_threshold"] == summary["rows"][0]["region_threshold"]
    for r in summary["rows"]:
        g = r["log_posterior"] < summary["threshold"]
        reg = r["region_score"] < r["region_threshold"]
        assert r["global_flagged"] == g and r["region_flagged"] == reg
        assert r["flagged"] == (g or reg)  # flag_policy "either", the shipped default
        assert r["flagged_by"] == ({(True, True): "both", (True, False): "global", (False, True): "region"}
                                   .get((g, reg)))
        assert 0 <= r["region_percentile"] <= 100 and len(r["region_center_mm"]) == 3
        assert r["region_sop_instance_uid"]
        # every flagged study's key images are PNGs under demo-out/key_images; an unflagged one has none
        assert bool(r["key_images"]) == r["flagged"], r
        for png in r["key_images"]:
            path = tmp_path / "demo-out" / png
            assert path.parent.name == "key_images" and path.name.startswith(f"{r['study_uid']}-key-")
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "demo-out/key_images").glob("*.png")) == sorted(
        Path(png).name for r in summary["rows"] for png in r["key_images"])
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


@pytest.mark.integration
def test_quick_chest_demo_sends_radiographs_through_the_chest_set_and_reuses_its_work(tmp_path: Path) -> None:
    """``--kind cxr``: synthetic CR/DX studies, a chest set (current-cxr), the daemon assembles them as
    radiographs, one SR ("Plain chest X-ray") and one ORU each; a second run reuses data and models."""
    from triage.model.registry import Registry

    first = _run(tmp_path, "--kind", "cxr", out="demo-out-cxr")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    n_test = CXR_QUICK.test_normal + CXR_QUICK.test_abnormal
    assert "synthetic chest radiographs, CR and DX" in out and "(preset test-tiny-2d, --quick)" in out
    assert "region score: flag when" in out and "1/32, 1/16, 1/8, 1/4 of the image side" in out
    truth_file = tmp_path / "demo-out-cxr/data/test/truth.jsonl"
    truth = [json.loads(x) for x in truth_file.read_text().splitlines()]
    names = {Path(t["study_dir"]).name: t for t in truth}
    assert all(t["kind"] == "cxr" for t in truth)
    # a chest set has a region score too (triage.model.radiomap): its centre is a point on the image
    row = (r"^\s+(\d+)\s+(study_\d{4})\s+(-?[0-9.]+)\s+(\d+)\s+(-?[0-9.]+)\s+(\d+)\s+(FLAG|-)\s+"
           r"(global|region|both|-)\s+(\(-?\d+,-?\d+\))\s+(\S+)")
    table = re.findall(row, out, re.M)
    assert sorted(r[1] for r in table) == sorted(names), out
    for _rank, name, _score, _pct, _region, _rpct, flag, by, _centre, label in table:
        assert label.startswith(names[name]["lesion"] or "normal")
        assert (flag == "FLAG") == (by != "-")
    auc = r"(0|1)\.\d{3}"
    assert re.search(rf"on these {n_test} studies .*: log p\(normal\|x\) {auc}; region score {auc}", out)
    assert f"SRs: {n_test} of {n_test} studies" in out and f"HL7: {n_test} ORU^R01 acknowledged" in out
    summary = json.loads((tmp_path / "demo-out-cxr/demo.json").read_text())
    assert summary["plan"]["kind"] == "cxr" and summary["plan"]["preset"] == "test-tiny-2d"
    assert len(summary["rows"]) == n_test and all(r["state"] == "sent" for r in summary["rows"])
    for r in summary["rows"]:
        assert r["region_score"] is not None and len(r["region_center_mm"]) == 2  # [x, y] mm on the image
        assert r["region_sop_instance_uid"] and bool(r["key_images"]) == r["flagged"], r
    reg = Registry(tmp_path / "demo-out-cxr/var/models")
    assert reg.current("cxr").version == summary["model_set"] and reg.current() is None  # chest set only
    srs = sorted((tmp_path / "demo-out-cxr/var/results").glob("*/sr-*.dcm"))
    assert len(srs) == n_test
    assert all(b"Plain chest X-ray" in sr.read_bytes() for sr in srs)  # the chest SR's procedure

    second = _run(tmp_path, "--kind", "cxr", out="demo-out-cxr")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "reusing normal, mixture, calibration, test" in second.stdout
    assert "M1 (mixture, from the trunk): reusing" in second.stdout
    assert f"reusing model set {summary['model_set']}" in second.stdout
    assert f"SRs: {n_test} of {n_test} studies" in second.stdout


def test_chest_plans_use_2d_presets_and_fit_the_demo_budget() -> None:
    """The chest plans train 2-D presets; the full one stays within the demo's 10 minutes on 2 cores at
    the README's cpu-cxr speed (0.037 s forward+backward per image in bf16 + channels-last): training
    at most ~5 min, so data, daemon and peers have the rest."""
    from training.presets import preset

    for plan in (CXR_FULL, CXR_QUICK):
        assert plan.kind == "cxr" and preset(plan.preset)["ndim"] == 2
    images = (CXR_FULL.steps + 2 * max(1, CXR_FULL.steps // 2)) * preset(CXR_FULL.preset)["batch_size"]
    assert CXR_FULL.preset == "cpu-cxr" and images * 0.037 <= 5 * 60
    assert CXR_FULL.test_distractors and not CXR_QUICK.test_distractors  # laterals in the full test set
    assert FULL.kind == QUICK.kind == "ct"


def test_both_plans_keep_enough_calibration_normals_for_the_region_score() -> None:
    assert QUICK.calibration >= MIN_REGION_NORMALS and FULL.calibration >= MIN_REGION_NORMALS


def test_flagged_by_names_the_scores_the_policy_used_and_auc_of_takes_either_score() -> None:
    both = {"flagged": True, "global_flagged": True, "region_flagged": True}
    assert flagged_by({**both, "flag_policy": "either"}) == "both"
    assert flagged_by({**both, "flag_policy": "global"}) == "global"
    assert flagged_by({**both, "flag_policy": "region"}) == "region"
    assert flagged_by({**both, "global_flagged": False, "flag_policy": "either"}) == "region"
    assert flagged_by({**both, "flagged": False, "flag_policy": "either"}) is None
    assert flagged_by({"flagged": True}) == "global"  # a set without a region calibration
    assert flagged_by({}) is None
    rows = [{"abnormal": True, "log_posterior": -5.0, "region_score": 1.0},
            {"abnormal": False, "log_posterior": 1.0, "region_score": -1.0},
            {"abnormal": False, "log_posterior": 2.0, "region_score": None}]
    assert auc_of(rows) == 1.0 and auc_of(rows, "region_score") == 0.0


def _key_image(path: Path, value: int) -> None:
    """A small RGB Secondary Capture, as the daemon's key images are (no patient data)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.full((8, 8, 3), value, np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_write_key_images_makes_pngs_of_the_flagged_studies_newest_generation_only(tmp_path: Path) -> None:
    from training.demo.results import write_key_images

    root, out = tmp_path / "var", tmp_path / "demo-out"
    for uid in ("1.2.3", "1.2.4"):
        (root / "results" / uid).mkdir(parents=True)
        for name in ("key-1-1.dcm", "key-2-1.dcm", "key-2-2.dcm"):
            _key_image(root / "results" / uid / name, 40)
    (out / "key_images").mkdir(parents=True)
    (out / "key_images" / "stale.png").write_bytes(b"from an earlier run")
    rows = [{"study_uid": "1.2.3", "flagged": True, "key_images": []},
            {"study_uid": "1.2.4", "flagged": False, "key_images": []}]
    folder = write_key_images(rows, root, out)
    assert folder == out / "key_images"
    assert rows[0]["key_images"] == ["key_images/1.2.3-key-1.png", "key_images/1.2.3-key-2.png"]
    assert rows[1]["key_images"] == []  # not flagged: its key images (if any) are not the demo's to show
    assert sorted(p.name for p in folder.iterdir()) == ["1.2.3-key-1.png", "1.2.3-key-2.png"]
    assert (folder / "1.2.3-key-1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
