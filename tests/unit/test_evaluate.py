"""training.evaluate.report on scores whose answers are known: Gaussian scores with a known AUC, hand-made
operating points, and small .npz volumes for the montages."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from scipy.stats import norm

from training.evaluate import report as ev

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(uid: str, post: float, lp1: float = -1000.0, **extra) -> dict:
    return {"study_uid": uid, "series_uid": uid + ".1", "log_p_normal_model": lp1 + post,
            "log_p_mixture_model": lp1, "log_posterior": post, "threshold": 0.0,
            "flagged": bool(post < 0.0), "model_version": "v1", **extra}


def gaussian_set(seed: int, n: int, shifts: dict[str, float]) -> tuple[list[dict], dict]:
    """Normals ~ N(0, 1); abnormals of each lesion ~ N(-shift, 1): AUC = Phi(shift / sqrt(2))."""
    rng = np.random.default_rng(seed)
    scores, labels = [], {}
    for g, d in {"normal": 0.0, **shifts}.items():
        for x in rng.normal(-d, 1.0, n):
            uid = f"1.2.{len(scores)}"
            zf = rng.uniform(0.2, 0.8)
            # the likelihood alone follows the zero fraction (the paper's App. A effect), the posterior not
            lp1 = -1000.0 + 50 * zf + rng.normal(0, 0.5) - x
            scores.append(row(uid, float(x), lp1=lp1, zero_fraction=zf))
            labels[uid] = ("normal", "") if g == "normal" else ("abnormal", g)
    return scores, labels


# -- operating points ------------------------------------------------------------------------------


def test_youden_hand_made_case():
    # abnormality scores; the best cut calls >= 0.4 abnormal: all 4 abnormals, 1 of 4 normals (0.6)
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.6, 0.4, 0.5, 0.7, 0.8]
    t, sens, spec = ev.youden(y, s)
    assert t == pytest.approx(0.35)  # halfway between 0.3 (normal, not called) and 0.4
    assert (sens, spec) == (1.0, 0.75)


def test_youden_threshold_reproduces_its_sensitivity_with_the_daemon_rule():
    rng = np.random.default_rng(3)
    post = np.round(np.r_[rng.normal(0, 1, 60), rng.normal(-1, 1, 40)], 1)  # rounded: many ties
    y = np.r_[np.zeros(60, int), np.ones(40, int)]
    t, sens, spec = ev.youden(y, -post)
    flagged = post < -t  # the daemon's strict rule on log_posterior
    assert flagged[y == 1].mean() == pytest.approx(sens)
    assert (~flagged[y == 0]).mean() == pytest.approx(spec)
    with pytest.raises(ValueError, match="both classes"):
        ev.youden([0, 0], [1.0, 2.0])
    # every abnormal scores below every normal: no cut-off beats chance, so call nothing abnormal
    assert ev.youden([0, 0, 1, 1], [3.0, 4.0, 1.0, 2.0]) == (math.inf, 0.0, 1.0)


def test_threshold_at_specificity_hand_made_case():
    normals = [3, -5, 1, -4, 0, -3, 4, -2, 2, -1]  # -5..4, unsorted on purpose
    assert ev.threshold_at_specificity(normals, 0.8) == pytest.approx(-3.5)  # 8 of 10 above
    assert ev.threshold_at_specificity(normals, 0.9) == pytest.approx(-4.5)
    assert ev.threshold_at_specificity(normals, 0.95) == -5  # needs all 10: nothing below the lowest
    assert ev.threshold_at_specificity(normals, 0.5) == pytest.approx(-0.5)
    # ties: the threshold may not split equal scores, so specificity comes out above the target
    t = ev.threshold_at_specificity([1, 1, 1, 2], 0.5)
    assert t == 1 and np.mean(np.array([1, 1, 1, 2]) >= t) == 1.0
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="specificity"):
            ev.threshold_at_specificity(normals, bad)
    with pytest.raises(ValueError, match="at least one"):
        ev.threshold_at_specificity([], 0.9)


# -- numbers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gaussian_report(tmp_path_factory) -> tuple[dict, Path]:
    scores, labels = gaussian_set(7, 300, {"hemorrhage": 2.5, "infarct": 0.5})
    out = tmp_path_factory.mktemp("gauss")
    return ev.evaluate(scores, labels, out, n_boot=1000, seed=1), out


def test_auc_matches_the_binormal_value_within_the_bootstrap_tolerance(gaussian_report):
    rep, _ = gaussian_report
    post = rep["metrics"]["posterior"]
    truth = {"hemorrhage": norm.cdf(2.5 / math.sqrt(2)), "infarct": norm.cdf(0.5 / math.sqrt(2))}
    for les, want in truth.items():
        c = post["lesions"][les]
        assert c["n_abnormal"] == 300 and c["n_normal"] == 300
        assert abs(c["auc"] - want) < 3 * c["auc_se"], (les, c["auc"], want)
        lo, hi = c["auc_ci95"]
        assert lo < c["auc"] < hi and hi - lo == pytest.approx(2 * 1.96 * c["auc_se"], rel=0.25)
    # overall: a 50/50 mixture of the two lesions, so the AUC is the mean of theirs
    want = (truth["hemorrhage"] + truth["infarct"]) / 2
    assert abs(post["overall"]["auc"] - want) < 3 * post["overall"]["auc_se"]
    assert rep["auc"] == post["overall"]["auc"]
    assert post["lesions"]["hemorrhage"]["auc"] > post["overall"]["auc"] > post["lesions"]["infarct"]["auc"]


def test_report_fields_and_operating_points(gaussian_report):
    rep, out = gaussian_report
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == rep
    assert (rep["n_normal"], rep["n_abnormal"], rep["n_rejected"]) == (300, 600, 0)
    assert rep["n_by_lesion"] == {"hemorrhage": 300, "infarct": 300}
    for m in ("posterior", "likelihood"):
        c = rep["metrics"][m]["overall"]
        roc = c["roc"]
        assert len(roc["fpr"]) == len(roc["tpr"]) == len(roc["thresholds"]) > 10
        assert roc["fpr"][0] == 0 and roc["fpr"][-1] == 1 and roc["tpr"][-1] == 1
        assert roc["thresholds"][0] is None  # the "call nothing" point (+inf) is null in JSON
        assert [p["specificity_target"] for p in c["sensitivity_at_specificity"]] == [0.8, 0.9, 0.95]
        for p in c["sensitivity_at_specificity"]:
            assert p["specificity"] >= p["specificity_target"]
    # the Youden cut-off is in log_posterior units and is the one that maximises J on these data
    post = rep["metrics"]["posterior"]["overall"]
    yd = post["youden"]
    assert yd["threshold"] < 0  # normals sit around 0, abnormals below
    assert yd["j"] == pytest.approx(max(np.subtract(post["roc"]["tpr"], post["roc"]["fpr"])))
    assert rep["youden"] == yd
    # the scorer's own flag (threshold 0) on these labels: half the normals are below 0
    assert rep["operating_point"]["specificity"] == pytest.approx(0.5, abs=0.08)
    corr = rep["correlations"]
    assert corr["likelihood"]["all"]["pearson_r"] > 0.9
    assert abs(corr["posterior"]["all"]["pearson_r"]) < 0.15
    assert corr["posterior"]["all"]["n"] == 900 and "spearman_rho" in corr["posterior"]["normal"]


def test_every_figure_is_a_real_png(gaussian_report):
    rep, out = gaussian_report
    want = {"roc_posterior.png", "roc_likelihood.png", "hist_posterior.png", "hist_likelihood.png",
            "zero_fraction.png"}
    assert want <= set(rep["figures"])
    assert set(rep["skipped_figures"]) == {"montage_most_abnormal.png", "montage_least_abnormal.png"}
    for name in rep["figures"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
        img = imread(out / name)
        assert img.shape[0] > 300 and img.shape[1] > 300
        assert img[..., :3].std() > 0.05  # not a blank canvas


# -- volumes, montages, and the edges --------------------------------------------------------------


def write_volumes(tmp: Path, n: int) -> tuple[list[dict], dict]:
    """Small volumes whose mid slice encodes the study index, so the montage order can be seen."""
    vdir = tmp / "vols"
    vdir.mkdir()
    scores, labels = [], {}
    for i in range(n):
        vol = np.zeros((8, 16, 16), np.uint8)
        vol[:, 2:14, 2:14] = 40
        vol[:, 6:10, 6:6 + (i % 8)] = 100 if i % 2 else 40
        np.savez_compressed(vdir / f"{i}.npz", data=vol)
        uid = f"2.25.{i}"
        scores.append(row(uid, float(i - n / 2), volume=f"vols/{i}.npz"))  # relative to the scores file
        labels[uid] = ("abnormal", "hemorrhage") if i % 2 else ("normal", "")
    return scores, labels


def test_montages_from_volumes_and_zero_fraction_from_volumes(tmp_path):
    scores, labels = write_volumes(tmp_path, 10)
    scores[3]["volume"] = "vols/missing.npz"  # a moved file costs a tile, not the run
    path = tmp_path / "scores.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in scores))
    rep = ev.evaluate(ev.load_scores(path), labels, tmp_path / "out", k=4, n_boot=50, base_dir=tmp_path)
    for name in ("montage_most_abnormal.png", "montage_least_abnormal.png", "zero_fraction.png"):
        assert name in rep["figures"]
        assert (tmp_path / "out" / name).read_bytes()[:8] == PNG_MAGIC
    most, least = rep["montages"]["most"], rep["montages"]["least"]
    assert [t["study_uid"] for t in most] == ["2.25.0", "2.25.1", "2.25.2", "2.25.3"]  # lowest posterior
    assert [t["study_uid"] for t in least] == ["2.25.9", "2.25.8", "2.25.7", "2.25.6"]
    assert most[1]["label"] == "hemorrhage" and most[0]["label"] == "normal"
    assert any("missing.npz" in w for w in rep["warnings"])
    # zero fraction computed from the 9 readable volumes
    assert rep["correlations"]["posterior"]["all"]["n"] == 9


def test_rejected_unlabeled_and_nonfinite_rows_are_listed_not_scored(tmp_path):
    scores, labels = gaussian_set(1, 20, {"infarct": 1.0})
    scores.append({"study_uid": "9.1", "rejected": True, "reason": "no axial head series"})
    scores.append({"study_uid": "9.2", "rejected": True, "reason": "too few slices"})
    scores.append(row("9.3", 1.0))  # no label
    nan_row = row("9.4", float("nan"))
    scores.append(nan_row)
    labels["9.4"] = ("normal", "")
    path = tmp_path / "scores.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in scores))  # json writes NaN as a bare NaN
    rep = ev.evaluate(ev.load_scores(path), labels, tmp_path / "out", n_boot=50)
    assert rep["n_rejected"] == 2
    assert {r["study_uid"]: r["reason"] for r in rep["rejected"]} == {
        "9.1": "no axial head series", "9.2": "too few slices"}
    assert rep["unlabeled"] == ["9.3"] and rep["n_unlabeled"] == 1
    assert [e["study_uid"] for e in rep["excluded"]] == ["9.4"]
    assert rep["excluded"][0]["where"].endswith(f"scores.jsonl:{len(scores)}")
    assert (rep["n_normal"], rep["n_abnormal"]) == (20, 20)
    json.loads((tmp_path / "out" / "report.json").read_text())  # strict JSON: no NaN leaked


def test_one_class_reports_auc_undefined_instead_of_crashing(tmp_path):
    scores = [row(f"3.{i}", float(i)) for i in range(6)]
    labels = {f"3.{i}": ("normal", "") for i in range(6)}
    rep = ev.evaluate(scores, labels, tmp_path, n_boot=50)
    assert rep["auc"] is None
    assert "undefined" in rep["metrics"]["posterior"]["overall"]["auc_undefined"]
    assert "roc_posterior.png" in rep["skipped_figures"] and not (tmp_path / "roc_posterior.png").exists()
    assert (tmp_path / "hist_posterior.png").exists()
    assert any("one class" in w for w in rep["warnings"])
    # a threshold for a wanted specificity still exists on normals alone: 5 of 6 (0.8) above 0.5
    at80 = rep["metrics"]["posterior"]["overall"]["sensitivity_at_specificity"][0]
    assert at80["threshold"] == 0.5 and at80["sensitivity"] is None


def test_malformed_scores_line_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "scores.jsonl"
    labels = tmp_path / "labels.csv"
    labels.write_text("study_uid,label,lesion\n4.1,normal,\n")
    path.write_text(json.dumps(row("4.1", 0.0)) + "\n\n" + '{"study_uid": "4.2", "log_posterior": \n')
    with pytest.raises(ev.EvaluationInputError, match=r"scores\.jsonl:3: not valid JSON"):
        ev.load_scores(path)
    assert ev.main([str(path), "--labels", str(labels), "--out", str(tmp_path / "o")]) == 2
    assert "scores.jsonl:3" in capsys.readouterr().err
    path.write_text(json.dumps({"study_uid": "4.2", "log_posterior": 1.0}) + "\n")
    with pytest.raises(ev.EvaluationInputError, match=r"scores\.jsonl:1: study 4\.2: missing field"):
        ev.load_scores(path)
    path.write_text(json.dumps(row("4.2", 0.0) | {"log_posterior": "high"}) + "\n")
    with pytest.raises(ev.EvaluationInputError, match=r":1: field 'log_posterior' is 'high'"):
        ev.load_scores(path)
    with pytest.raises(ev.EvaluationInputError, match=r"scores\[1\]: study 4\.1 appears again"):
        ev.evaluate([row("4.1", 0.0), row("4.1", 1.0)], {}, tmp_path / "o")


def test_bad_labels_name_file_and_line(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("study_uid,label,lesion\n5.1,normal,\n5.2,sick,infarct\n")
    with pytest.raises(ev.EvaluationInputError, match=r"labels\.csv:3: study 5\.2: label 'sick'"):
        ev.load_labels(p)
    p.write_text("study_uid,label,lesion\n5.1,normal,\n5.1,abnormal,infarct\n")
    with pytest.raises(ev.EvaluationInputError, match=r"labels\.csv:3: study 5\.1 is labelled twice"):
        ev.load_labels(p)
    p.write_text("uid,class\n5.1,normal\n")
    with pytest.raises(ev.EvaluationInputError, match=r"labels\.csv:1: header"):
        ev.load_labels(p)
    p.write_text("study_uid,label,lesion\n5.1, Normal ,\n5.2,abnormal,\n")
    assert ev.load_labels(p) == {"5.1": ("normal", ""), "5.2": ("abnormal", "")}


def test_cli_end_to_end_without_volumes(tmp_path, capsys):
    scores, labels = gaussian_set(2, 15, {"hemorrhage": 2.0})
    for s in scores:
        del s["zero_fraction"]
    scores.append({"study_uid": "9.9", "rejected": True, "reason": "not a head CT"})
    sp, lp = tmp_path / "scores.jsonl", tmp_path / "labels.csv"
    sp.write_text("".join(json.dumps(s) + "\n" for s in scores))
    lp.write_text("study_uid,label,lesion\n" + "".join(f"{u},{a},{b}\n" for u, (a, b) in labels.items()))
    rc = ev.main([str(sp), "--labels", str(lp), "--out", str(tmp_path / "out"), "--title", "T",
                  "--bootstrap", "100", "--k", "4"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "AUC log p(normal|x)" in text and "hemorrhage: AUC" in text and "rejected 1" in text
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["title"] == "T" and rep["n_rejected"] == 1
    assert "no zero_fraction and no volume" in rep["skipped_figures"]["zero_fraction.png"]
    assert "no volume paths" in rep["skipped_figures"]["montage_most_abnormal.png"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(rep["figures"])
