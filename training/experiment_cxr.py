"""`training experiment --kind cxr`: the paper's chest-radiograph protocol (section 3) on synthetic CXRs.

The same protocol as the head-CT experiment (:mod:`training.experiment`), through the product's own code
paths, at a CPU budget: three synthetic sets with disjoint seeds (``training synth --kind cxr``: normals;
an unlabelled mixture, half abnormal, whose labels are moved to ``DIR/sealed`` before anything is
trained; a labelled test set, half abnormal), every study assembled by
:mod:`triage.assemble.radiograph` (via :mod:`training.data.images`), a trunk trained on the normals and
two branches from it with the same budget (M0 on the normals, M1 on the mixture; why a shared trunk:
see :mod:`training.experiment`), the operating point set on held-out normals like ``triage models
create`` (specificity 0.9), the set registered as a chest (``cxr``) set, and the test set scored by the
daemon's scorer. Reported: AUC of the posterior log p(normal|x) and of the likelihood alone log p(x|M0),
with stratified bootstrap 95% CIs, and the posterior's AUC per abnormal kind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data.images import radiographs_from_folder
from training.data.sources import VolumeSet, as_volume_set
from training.evaluate.metrics import roc_summary
from training.synth.cxr_dicom import write_cxr_dataset
from training.train.loop import train
from triage.model.labels import read_labels
from triage.model.modelset import calibrate
from triage.model.registry import Registry
from triage.model.score import ModelPair, Scorer, VolumeInput


@dataclass
class CxrPlan:
    preset: str = "cpu-cxr"
    normal_train: int = 160
    mixture_train: int = 160
    test: int = 100
    steps: int = 400
    branch_steps: int = 200
    calibration_fraction: float = 0.2
    seed: int = 0
    synth_scale: float = 4.0
    bootstrap: int = 2000


def _synth(out: Path, plan: CxrPlan) -> dict[str, Path]:
    sets = {"normal": (plan.normal_train, 0), "mixture": (plan.mixture_train - plan.mixture_train // 2,
                                                         plan.mixture_train // 2),
            "test": (plan.test - plan.test // 2, plan.test // 2)}  # fmt: skip
    folders = {}
    for i, (name, (n, a)) in enumerate(sets.items()):
        d = out / "data" / name
        if not (d / "labels.csv").exists() and not (out / "sealed" / name / "labels.csv").exists():
            write_cxr_dataset(d, n, a, seed=plan.seed * 100 + i + 1, synth_scale=plan.synth_scale)
        folders[name] = d
    sealed = out / "sealed" / "mixture"
    if (folders["mixture"] / "labels.csv").exists():  # M1 never sees its labels, even by accident
        sealed.mkdir(parents=True, exist_ok=True)
        for f in ("labels.csv", "truth.jsonl"):
            shutil.move(str(folders["mixture"] / f), str(sealed / f))
    return folders


def run(out: Path, plan: CxrPlan) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    folders = _synth(out, plan)
    t["synth_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    normal = as_volume_set(radiographs_from_folder(folders["normal"]), "normal")
    mixture = as_volume_set(radiographs_from_folder(folders["mixture"]), "mixture")
    test = as_volume_set(radiographs_from_folder(folders["test"]), "test")
    t["assemble_s"] = time.perf_counter() - t0
    order = sorted(range(len(normal)), key=lambda i: normal.ids[i])
    n_cal = max(2, round(len(order) * plan.calibration_fraction))
    cal_idx, tr_idx = order[:n_cal], order[n_cal:]
    m0_set = VolumeSet([normal.volumes[i] for i in tr_idx], [normal.ids[i] for i in tr_idx],
                       {"source": "normal"})
    t0 = time.perf_counter()
    common = {"progress": False, "device": "cpu", "log_every": 0, "seed": plan.seed}
    train(m0_set, plan.preset, out / "trunk.pt", role="normal", steps=plan.steps, **common)
    train(m0_set, plan.preset, out / "m0.pt", role="normal", steps=plan.branch_steps,
          init_from=out / "trunk.pt", **common)  # fmt: skip
    train(mixture, plan.preset, out / "m1.pt", role="mixture", steps=plan.branch_steps,
          init_from=out / "trunk.pt", **common)  # fmt: skip
    t["train_s"] = time.perf_counter() - t0
    pair = ModelPair.load(out / "m0.pt", out / "m1.pt", torch.device("cpu"))
    cal_post = {}
    for i in cal_idx:
        lp0, lp1 = pair.log_likelihoods(normal.volumes[i])
        cal_post[normal.ids[i]] = lp0 - lp1
    threshold, method, normals, details = calibrate(cal_post, None, 0.9)
    reg = Registry(out / "models")
    ms = reg.create(out / "m0.pt", out / "m1.pt", preset=plan.preset, preprocessing_version="radiograph-1",
                    threshold=threshold, method=method, normal_scores=normals,
                    provenance={"experiment": "cxr"}, software_version="experiment",
                    trunk=out / "trunk.pt")  # fmt: skip
    reg.promote(ms.version, reason="training experiment --kind cxr")
    scorer = Scorer(ms, device="cpu")
    labels = read_labels(folders["test"] / "labels.csv")
    t0 = time.perf_counter()
    rows = []
    for vid, vol in zip(test.ids, test.volumes, strict=True):
        r = scorer.score([VolumeInput(vid, vid, vol)])[0].to_json()
        lab = labels[vid]
        r.update(label=lab.label, lesion=lab.lesion)
        rows.append(r)
    t["score_s"] = time.perf_counter() - t0
    with (out / "scores.jsonl").open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")

    def summary(field: str, keep: str | None = None) -> dict[str, Any]:
        nrm = np.array([r[field] for r in rows if r["label"] == "normal"])
        abn = np.array([r[field] for r in rows
                        if r["label"] == "abnormal" and (keep is None or r["lesion"] == keep)])
        s = roc_summary(nrm, abn, plan.bootstrap, plan.seed)
        return {"auc": s.get("auc"), "auc_ci95": s.get("auc_ci95"), "n_normal": s["n_normal"],
                "n_abnormal": s["n_abnormal"]}  # fmt: skip

    kinds = sorted({r["lesion"] for r in rows if r["label"] == "abnormal"})
    res = {
        "plan": asdict(plan),
        "model_set": ms.version,
        "threshold": threshold,
        "posterior": summary("log_posterior"),
        "likelihood_only": summary("log_p_normal_model"),
        "posterior_by_kind": {k: summary("log_posterior", k) for k in kinds},
        "flagged_test": sum(bool(r["flagged"]) for r in rows),
        "timings_s": {k: round(v, 1) for k, v in t.items()},
        "calibration": details,
    }
    (out / "experiment.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def _fmt(s: dict[str, Any]) -> str:
    if s.get("auc") is None:
        return "undefined"
    lo, hi = s["auc_ci95"]
    return f"{s['auc']:.3f} [{lo:.3f}, {hi:.3f}] ({s['n_normal']} normal, {s['n_abnormal']} abnormal)"


def main(argv: list[str] | None = None) -> int:
    d = CxrPlan()
    p = argparse.ArgumentParser(prog="training experiment --kind cxr",
                                description="The chest-radiograph M0/M1 experiment on synthetic CXRs.")
    p.add_argument("--kind", choices=["cxr"], default="cxr")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default=d.preset)
    p.add_argument("--normal-train", type=int, default=d.normal_train)
    p.add_argument("--mixture-train", type=int, default=d.mixture_train)
    p.add_argument("--test", type=int, default=d.test)
    p.add_argument("--steps", type=int, default=d.steps, help="trunk steps on the normals")
    p.add_argument("--branch-steps", type=int, default=d.branch_steps, help="M0 and M1 steps each")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--synth-scale", type=float, default=d.synth_scale)
    p.add_argument("--bootstrap", type=int, default=d.bootstrap)
    p.add_argument("--quick", action="store_true", help="a smoke run: test-tiny-2d, a few studies and steps")
    a = p.parse_args(argv)
    plan = CxrPlan(a.preset, a.normal_train, a.mixture_train, a.test, a.steps, a.branch_steps, 0.2, a.seed,
                   a.synth_scale, a.bootstrap)  # fmt: skip
    if a.quick:
        plan = CxrPlan("test-tiny-2d", 10, 10, 10, 20, 10, 0.2, a.seed, 8.0, 200)
    res = run(a.out, plan)
    print(f"chest-radiograph experiment ({plan.preset}): posterior AUC {_fmt(res['posterior'])}")
    print(f"  likelihood alone AUC {_fmt(res['likelihood_only'])}")
    for k, s in res["posterior_by_kind"].items():
        print(f"  {k:14s} posterior AUC {_fmt(s)}")
    print(f"  timings {res['timings_s']}  -> {a.out / 'experiment.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
