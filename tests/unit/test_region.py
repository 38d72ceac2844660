"""The region score in `training evaluate`: its ROC and CIs beside the global one, flags, localization
against lesion centroids, map montages; a scores file without region fields leaves it out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.evaluate.maps import load_centroids
from training.evaluate.report import evaluate, main


def rows_and_labels(tmp_path: Path, region: bool = True) -> tuple[list[dict], dict, dict]:
    """8 normals, 8 abnormals: the region score separates them perfectly, the global one does not;
    abnormal region centres lie 10 mm (first half) or 50 mm (second half) from their lesions."""
    rng = np.random.default_rng(0)
    rows, labels, centroids = [], {}, {}
    vol = rng.integers(0, 128, (32, 128, 128), dtype=np.uint8)
    np.savez_compressed(tmp_path / "vol.npz", data=vol)
    zmap = np.zeros((32, 64, 64), np.float32)
    zmap[10:14, 20:30, 20:30] = -8.0
    np.savez_compressed(tmp_path / "map.npz", zmap=zmap, canonical_index_zyx=np.array([12.0, 50.0, 50.0]))
    for i in range(16):
        uid = f"1.2.3.{i}"
        abn = i >= 8
        post = float(rng.normal())
        row = {"study_uid": uid, "series_uid": uid + ".1", "log_p_normal_model": -1000.0 + post,
               "log_p_mixture_model": -1000.0, "log_posterior": post, "threshold": -1.0,
               "flagged": bool(abn), "model_version": "v1", "volume": "vol.npz"}
        if region:
            score = -8.0 - i if abn else -2.0 + 0.1 * i
            row.update(region_score=score, region_threshold=-5.0, region_flagged=score < -5.0,
                       global_flagged=post < -1.0, flag_policy="either", region_center_mm=[0.0, 0.0, 0.0],
                       region_map="map.npz")
        rows.append(row)
        labels[uid] = ("abnormal", "bleed") if abn else ("normal", "")
        if abn:
            centroids[uid] = (10.0, 0.0, 0.0) if i < 12 else (0.0, 50.0, 0.0)
    return rows, labels, centroids


def test_region_roc_flags_and_localization(tmp_path: Path) -> None:
    rows, labels, centroids = rows_and_labels(tmp_path)
    rep = evaluate(rows, labels, tmp_path / "out", k=4, n_boot=50, base_dir=tmp_path, centroids=centroids)
    reg = rep["metrics"]["region"]["overall"]
    assert reg["auc"] == pytest.approx(1.0) and len(reg["auc_ci95"]) == 2
    assert rep["metrics"]["region"]["lesions"]["bleed"]["n_abnormal"] == 8
    assert rep["metrics"]["posterior"]["overall"]["auc"] < 1.0
    loc = rep["region"]["localization"]
    assert loc["n"] == 8 and loc["median_mm"] == pytest.approx(30.0) and loc["within_30mm"] == 0.5
    op = rep["region"]["operating_point"]["region_flagged"]
    assert op == {"sensitivity": 1.0, "specificity": 1.0}
    for fig in ("roc_region.png", "roc_compare.png", "montage_region_maps.png"):
        assert fig in rep["figures"] and (tmp_path / "out" / fig).is_file()


def test_scores_without_region_fields_leave_the_section_out(tmp_path: Path) -> None:
    rows, labels, _ = rows_and_labels(tmp_path, region=False)
    rep = evaluate(rows, labels, tmp_path / "out", k=4, n_boot=20, base_dir=tmp_path)
    assert "region" not in rep["metrics"] and rep["region"] == {"skipped": "no region_score in the scores"}


def test_cli_reads_centroids_from_labels_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows, labels, centroids = rows_and_labels(tmp_path)
    (tmp_path / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["study_uid,label,lesion,lesion_x,lesion_y,lesion_z"]
    for uid, (label, lesion) in labels.items():
        c = centroids.get(uid)
        lines.append(f"{uid},{label},{lesion}," + (",".join(f"{v:g}" for v in c) if c else ",,"))
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    assert load_centroids(tmp_path / "labels.csv") == centroids
    assert main([str(tmp_path / "scores.jsonl"), "--labels", str(tmp_path / "labels.csv"), "--out",
                 str(tmp_path / "out"), "--bootstrap", "20", "--k", "4"]) == 0
    out = capsys.readouterr().out
    assert "AUC region score 1.000" in out and "median 30 mm, 50% within 30 mm (n=8)" in out


def test_key_images_become_pngs(tmp_path: Path) -> None:
    """The demo's view of a flagged study: the daemon's key images (newest generation) as PNGs."""
    from datetime import datetime

    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from training.evaluate.maps import write_key_image_pngs
    from training.harness.series import write_ct_series
    from triage.model.results import ModelSetInfo, ScoreResult
    from triage.report.keyimages import build_key_images

    ct = [dcmread(p) for p in write_ct_series(tmp_path / "ct", n=4, size=32)]
    res = ScoreResult(study_uid=str(ct[0].StudyInstanceUID), series_uid=str(ct[0].SeriesInstanceUID),
                      log_p_normal_model=-1.0, log_p_mixture_model=0.0, log_posterior=-1.0, threshold=0.0,
                      flagged=True, percentile=0.0, model_version="v", region_score=-9.0,
                      region_window_mm=10.0, region_center_mm=[0.0, 0.0, 5.0])
    info = ModelSetInfo(version="v", device_uid=generate_uid(), preset="p", preprocessing_version="p",
                        threshold=0.0, threshold_method="m")
    grid = {"origin": [-109.14, -109.14, 50.0], "spacing": [1.71875, 1.71875, 4.5],
            "direction": [1, 0, 0, 0, 1, 0, 0, 0, -1]}
    kis = build_key_images(res, ct, {"zmap": -8 * np.ones((32, 64, 64))}, grid, info,
                           series_instance_uid=generate_uid(), sop_instance_uid=lambda i: generate_uid(),
                           content_datetime=datetime(2026, 1, 1))
    results = tmp_path / "results"
    results.mkdir()
    for gen in (0, 1):
        for i, ki in enumerate(kis, 1):
            ki.save_as(results / f"key-{gen}-{i}.dcm", enforce_file_format=True)
    pngs = write_key_image_pngs(results, tmp_path / "png", prefix="s1-")
    assert [p.name for p in pngs] == [f"s1-key-{i}.png" for i in range(1, len(kis) + 1)]
    assert all(p.stat().st_size > 0 for p in pngs)
    assert write_key_image_pngs(tmp_path / "ct", tmp_path / "none") == []
