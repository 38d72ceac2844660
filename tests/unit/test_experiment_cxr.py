"""`training experiment --kind cxr`: one run reports posterior, region and likelihood-only AUCs (with CIs,
per kind), and ``--reuse`` re-scores an earlier run's models into a new folder without training or
touching the earlier run."""

from __future__ import annotations

import json
from pathlib import Path

from training.experiment_cxr import main


def _tree(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*")) if p.is_file()}


def test_quick_run_reports_the_region_and_reuse_rescoring_matches(tmp_path: Path, capsys) -> None:
    first = tmp_path / "first"
    assert main(["--kind", "cxr", "--quick", "--out", str(first)]) == 0
    out = capsys.readouterr().out
    assert "region score AUC" in out and "likelihood alone AUC" in out
    res = json.loads((first / "experiment.json").read_text())
    for key in ("posterior", "region", "likelihood_only"):
        assert res[key]["auc"] is not None and len(res[key]["auc_ci95"]) == 2, key
    kinds = set(res["posterior_by_kind"])
    assert kinds and set(res["region_by_kind"]) == kinds == set(res["likelihood_by_kind"])
    assert res["region_windows_side"] == [1 / 32, 1 / 16, 1 / 8, 1 / 4]
    diff = res["posterior_minus_likelihood"]  # issue 16's margin, paired on the same test studies
    assert abs(diff["difference"] - (res["posterior"]["auc"] - res["likelihood_only"]["auc"])) < 1e-9
    assert diff["ci95"][0] <= diff["ci95"][1] and 0 <= diff["p_not_better"] <= 1
    assert "posterior - likelihood alone" in out
    rows = [json.loads(x) for x in (first / "scores.jsonl").read_text().splitlines()]
    assert all(r["region_score"] is not None and len(r["region_center_mm"]) == 2 for r in rows)
    assert all(r["region_distance_mm"] is not None for r in rows if r["label"] == "abnormal")
    before = _tree(first)

    again = tmp_path / "again"
    assert main(["--kind", "cxr", "--reuse", str(first), "--out", str(again)]) == 0
    res2 = json.loads((again / "experiment.json").read_text())
    assert res2["plan"] == res["plan"] and res2["reused"] == str(first)
    assert res2["timings_s"]["train_s"] < 1.0 and not (again / "m0.pt").exists()
    for key in ("posterior", "region", "likelihood_only", "posterior_minus_likelihood"):
        assert res2[key] == res[key], key  # the same models, normals and test set: the same numbers
    assert _tree(first) == before  # the earlier run is only read
