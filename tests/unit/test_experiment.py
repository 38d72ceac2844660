"""training experiment end to end on the test-tiny preset (a handful of 256-matrix studies, no
distractors): the outputs and their keys, the disjoint sets, and M1 never seeing the mixture's labels."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from training import experiment as ex
from training.evaluate.report import load_scores
from triage.model.glow import Glow
from triage.model.registry import Registry

ARGS = ["--preset", "test-tiny", "--normal-train", "6", "--mixture-train", "4", "--test", "4", "--steps", "5",
        "--branch-steps", "3", "--bootstrap", "20", "--workers", "1", "--slab-samples", "1", "--seed", "3",
        "--calibration-fraction", "0.5"]  # >= 3 held-out normals: enough to calibrate the region score
SCORE_KEYS = {"study_uid", "series_uid", "log_p_normal_model", "log_p_mixture_model", "log_posterior",
              "threshold", "flagged", "model_version", "percentile", "zero_fraction", "volume"}


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("exp")
    rc = ex.main(["--out", str(out), *ARGS])
    assert rc == 0
    return out, json.loads((out / "experiment.json").read_text()), str(out)


def test_writes_scores_report_and_experiment_json(done, capsys: pytest.CaptureFixture[str]) -> None:
    out, res, _ = done
    rows = load_scores(out / "scores.jsonl")  # the evaluator's own validation of every line
    assert len(rows) == 4
    for r in rows:
        assert set(r) >= SCORE_KEYS
        assert r["log_posterior"] == pytest.approx(r["log_p_normal_model"] - r["log_p_mixture_model"])
        assert r["global_flagged"] == (r["log_posterior"] < r["threshold"])
        vol = np.load(out / r["volume"])["data"]
        assert vol.shape == (32, 128, 128) and r["zero_fraction"] == pytest.approx(float(np.mean(vol == 0)))

    report = json.loads((out / "report" / "report.json").read_text())
    assert report["n_normal"] == 2 and report["n_abnormal"] == 2
    assert report["auc"] == res["auc_posterior"]["overall"]["auc"]
    assert {"posterior", "likelihood", "region"} == set(report["metrics"])
    assert (out / "report" / "roc_posterior.png").is_file()
    # the region score, in the same run: its fields, maps, ROC beside the global one, the map montage
    for r in rows:
        assert r["region_flagged"] == (r["region_score"] < r["region_threshold"])
        assert r["flagged"] == (r["global_flagged"] or r["region_flagged"])  # flag_policy "either"
        assert len(r["region_center_mm"]) == 3 and r["region_sop_instance_uid"]
        assert np.load(out / r["region_map"])["zmap"].ndim == 3
    for fig in ("roc_region.png", "roc_compare.png", "montage_region_maps.png"):
        assert (out / "report" / fig).is_file(), fig
    assert res["auc_region"]["overall"]["auc"] == report["metrics"]["region"]["overall"]["auc"]
    assert len(res["auc_region"]["overall"]["auc_ci95"]) == 2

    for key in ("command", "plan", "sets", "training", "auc_posterior", "auc_likelihood",
                "seconds_per_volume", "timings_s", "model_set", "mixture_labels", "disjoint", "machine"):
        assert key in res, key
    assert res["command"].startswith("training experiment --out ") and "--steps 5" in res["command"]
    assert set(res["auc_posterior"]["lesions"]) <= {"hemorrhage", "infarct"}
    assert 0.0 <= res["auc_posterior"]["overall"]["auc"] <= 1.0
    assert res["auc_likelihood"]["overall"]["auc"] == report["metrics"]["likelihood"]["overall"]["auc"]
    assert res["training"]["trunk"]["steps"] == 5 and res["training"]["m1"]["seconds"] > 0
    assert res["training"]["m0"]["steps"] == res["training"]["m1"]["steps"] == 3
    assert res["seconds_per_volume"]["score"] > 0
    assert res["sets"]["test"]["volumes"] == 4 and res["sets"]["mixture"]["abnormal"] == 2
    assert res["m0_train_volumes"] + res["calibration_volumes"] == 6 and res["calibration_volumes"] >= 1
    assert res["disjoint"]["disjoint"] is True

    # the promoted model set is what scored, calibrated on held-out normals, not on the test set
    cur = Registry(out / "models").current()
    assert cur is not None and cur.version == res["model_set"]["version"] == rows[0]["model_version"]
    assert cur.manifest["operating_point"]["method"] == "specificity=0.9"
    assert len(cur.calibration_scores) == res["calibration_volumes"]

    ex.print_summary(res)
    text = capsys.readouterr().out
    assert "posterior AUC" in text and "likelihood AUC" in text and "seconds per volume" in text


def test_every_set_is_drawn_from_the_protocol_mix_by_default(done) -> None:
    out, exp, _ = done
    assert exp["plan"]["protocol_mix"] is True
    for which in ex.SETS:
        params = json.loads((out / "data" / which / ex.DONE).read_text())
        assert params["protocol_mix"]["two_stack_fraction"] == ex.PROTOCOL_MIX["two_stack_fraction"]
        assert params["protocol_mix"]["tilt_range_deg"] == list(ex.PROTOCOL_MIX["tilt_range_deg"])
    off = ex.plan_from_args(ex._parser().parse_args(["--out", "x", "--no-protocol-mix"]))
    assert off.protocol_mix is False


def test_mixture_labels_are_sealed_before_training_and_never_used(done) -> None:
    out, res, _ = done
    mixture = out / "data" / "mixture"
    assert not (mixture / "labels.csv").exists() and not (mixture / "truth.jsonl").exists()
    assert (out / "sealed" / "mixture" / "labels.csv").is_file()
    assert res["mixture_labels"]["read_by_training"] is False
    m1 = Glow.load(out / "work" / "m1.pt").extra_info
    assert m1["role"] == "mixture" and m1["data"]["count"] == 4
    assert "labels" not in m1["data"] and "only" not in m1["data"]
    m0 = Glow.load(out / "work" / "m0.pt").extra_info
    assert m0["role"] == "normal" and m0["data"]["count"] == res["m0_train_volumes"]
    # M0 and M1 both branch from one trunk trained on the normals only (the default --m1-init trunk)
    trunk = Glow.load(out / "work" / "trunk.pt").extra_info
    assert trunk["init_from"] is None and trunk["role"] == "normal"
    assert trunk["data"]["ids_sha256"] == m0["data"]["ids_sha256"]  # the trunk saw M0's normals, only
    digest = hashlib.sha256((out / "work" / "trunk.pt").read_bytes()).hexdigest()
    assert m0["init_from"]["sha256"] == m1["init_from"]["sha256"] == digest
    assert res["training"]["m1"]["init_from"] == res["training"]["m0"]["init_from"] == "trunk"
    assert res["plan"]["m1_init"] == "trunk"
    # the same-run comparison: an M1 trained from scratch on the same mixture, scored with the same M0
    abl = res["ablation_m1_scratch"]
    scratch = Glow.load(out / "work" / "m1-scratch.pt").extra_info
    assert scratch["init_from"] is None and scratch["data"]["ids_sha256"] == m1["data"]["ids_sha256"]
    assert abl["m1"]["steps"] == 5 + 3 and abl["m1"]["init_from"] == "scratch"  # M0's whole budget
    rows = load_scores(out / "ablation-m1-scratch" / "scores.jsonl")
    assert {r["study_uid"] for r in rows} == {r["study_uid"] for r in load_scores(out / "scores.jsonl")}
    for r in rows:  # same M0, another M1
        assert r["log_p_normal_model"] == pytest.approx(
            next(x for x in load_scores(out / "scores.jsonl") if x["study_uid"] == r["study_uid"])[
                "log_p_normal_model"])
    assert 0.0 <= abl["auc_posterior"]["overall"]["auc"] <= 1.0
    assert (out / "ablation-m1-scratch" / "report" / "roc_posterior.png").is_file()
    for spread in (res["posterior_on_held_out_normals"], abl["posterior_on_held_out_normals"]):
        assert spread["n"] == res["calibration_volumes"]
        assert spread["sd"] is None or spread["sd"] >= 0


def test_training_works_with_the_mixture_labels_gone(tmp_path: Path) -> None:
    """Stage by stage: delete every label file of the mixture (sealed copy included) before its
    volumes are read and M1 is trained; nothing notices."""
    plan = ex.Plan(preset="test-tiny", normal_train=2, mixture_train=2, test=2, steps=3, seed=7, workers=1,
                   slab_samples=1)
    folders = ex.synthesize(tmp_path, plan)
    for f in (tmp_path / "sealed" / "mixture").iterdir():
        f.unlink()
    assert not list(folders["mixture"].rglob("*.csv")) and not list(folders["mixture"].rglob("*.jsonl"))
    sets = ex.load_sets(tmp_path, folders, plan)
    assert len(sets["mixture"]) == 2 and all(it.label is None for it in sets["mixture"].items)
    trained = ex.train_models(tmp_path, sets["normal"], sets["mixture"], plan, ex.Timings())
    assert trained["m1"]["volumes"] == 2 and (tmp_path / "work" / "m1.pt").is_file()


def test_rerun_resumes_and_sets_overlap_is_refused(done, tmp_path: Path) -> None:
    out, res, _ = done
    # a second run into the same folder reuses the data, the cache and the finished models
    again = ex.run(out, ex.plan_from_args(ex._parser().parse_args(["--out", str(out), *ARGS])), "rerun")
    assert all(again["sets"][s]["built_now"] == 0 for s in ex.SETS)
    assert again["training"]["trunk"]["resumed_from"] == 5 and again["training"]["m1"]["resumed_from"] == 3
    assert again["auc_posterior"] == res["auc_posterior"]
    # more steps extend the trunk; M0 and M1 were started from the old trunk, so they start again
    longer = ex.plan_from_args(ex._parser().parse_args(["--out", str(out), *ARGS, "--steps", "6"]))
    ext = ex.run(out, longer, "longer")["training"]
    assert ext["trunk"]["resumed_from"] == 5 and ext["trunk"]["steps"] == 6
    assert ext["m0"]["resumed_from"] is None and ext["m1"]["resumed_from"] is None
    # another plan does not resume checkpoints written for the old one
    plan = dataclasses.replace(ex.plan_from_args(ex._parser().parse_args(["--out", str(out), *ARGS])),
                               calibration_fraction=0.3)
    sets = ex.load_sets(out, {s: out / "data" / s for s in ex.SETS}, plan)
    retrained = ex.train_models(out, sets["normal"], sets["mixture"], plan, ex.Timings())
    assert retrained["trunk"]["resumed_from"] is None and retrained["m0"]["volumes"] == 6
    # a truth file that puts one subject into two sets is caught
    test_truth = out / "data" / "test" / "truth.jsonl"
    saved = test_truth.read_text()
    first_normal = (out / "data" / "normal" / "truth.jsonl").read_text().splitlines()[0]
    try:
        test_truth.write_text(saved + first_normal + "\n")
        with pytest.raises(ex.ExperimentError, match="overlap"):
            ex.check_disjoint(out)
    finally:
        test_truth.write_text(saved)


def test_bad_arguments_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ex.main(["--out", str(tmp_path), "--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
    quick = ex.plan_from_args(ex._parser().parse_args(["--out", "x", "--quick", "--steps", "9"]))
    assert quick.normal_train == ex.QUICK["normal_train"] and quick.steps == 9


def test_a_preset_can_size_its_own_experiment() -> None:
    """paper-bct names GPU-sized experiment steps and every core for synthesis; the CLI still wins."""
    import os

    plan = ex.plan_from_args(ex._parser().parse_args(["--out", "x", "--preset", "paper-bct"]))
    assert (plan.steps, plan.branch_steps, plan.normal_train) == (1200, 600, 160)
    assert plan.workers == (os.cpu_count() or 1)
    plan = ex.plan_from_args(ex._parser().parse_args(["--out", "x", "--preset", "paper-bct", "--steps", "7",
                                                      "--workers", "3"]))
    assert (plan.steps, plan.workers) == (7, 3)
    cpu = ex.plan_from_args(ex._parser().parse_args(["--out", "x"]))
    assert (cpu.preset, cpu.steps, cpu.workers) == ("cpu-small", ex.Plan().steps, ex.Plan().workers)
