"""`training evaluate`: the paper's figures and numbers from a scores file.

Input is what ``triage score --json`` prints (one JSON object a study) plus ``labels.csv``
(``study_uid,label,lesion``). Output is a folder with the ROC curves of log p(normal|x) and of
log p(x|normal) alone (paper Fig. 3/4 and A.16/A.17), histograms by label (Fig. 5/6, A.18/A.19), score
against the fraction of zero voxels (Fig. A.20), montages of the studies most and least likely to be
abnormal (Fig. 7/8) and ``report.json`` holding every number behind them.

Conventions, used everywhere here and by the registry's calibration:

* a *metric* (``log_posterior`` or ``log_p_normal_model``) is a normality score: low means abnormal,
  and the daemon flags a study when ``metric < threshold`` (strict);
* scikit-learn wants an *abnormality score*, so curves are computed on ``-metric`` with abnormal = 1;
* every threshold in ``report.json`` is in the metric's own units (nats), so it can be written into a
  model set's operating point as is.

This module holds the evaluation itself (which rows count, what goes into ``report.json``) and the
command line; reading inputs is :mod:`training.evaluate.inputs`, the numbers
:mod:`training.evaluate.metrics`, the figures :mod:`training.evaluate.plots`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from training.evaluate.inputs import (
    CONSISTENCY_TOL,
    METRICS,
    EvaluationInputError,
    Row,
    group_of,
    load_labels,
    load_scores,
    load_volume,
    parse_row,
    resolve_volume,
)
from training.evaluate.maps import load_centroids, region_section
from training.evaluate.metrics import FIXED_SPECIFICITIES, correlation, operating_point, roc_summary
from training.evaluate.plots import plot_hist, plot_montage, plot_roc, plot_zero, volume_slices
from triage.model.calibrate import threshold_at_specificity, youden
from triage.ops.logs import get_logger

__all__ = [
    "FIXED_SPECIFICITIES", "METRICS", "EvaluationInputError", "evaluate", "load_labels", "load_scores",
    "load_volume", "main", "threshold_at_specificity", "youden",
]

log = get_logger("evaluate")
Warn = Callable[..., None]


# --------------------------------------------------------------------------------------------------
# the evaluation


def evaluate(scores: list[dict[str, Any]], labels: Mapping[str, tuple[str, str]], out: Path, k: int = 16,
             *, title: str | None = None, slices: int = 1, n_boot: int = 1000, seed: int = 0,
             base_dir: Path | None = None, centroids: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the figures and ``report.json`` into ``out``; return the report.

    ``scores`` are objects as ``triage score --json`` prints them (rows from :func:`load_scores` keep
    their file:line for messages). Studies without a label, and studies with non-finite scores, are
    left out and listed; rejected rows are counted and listed. ``volume`` paths that are relative are
    looked up under ``base_dir`` (the scores file's folder for the CLI) and then the working directory.
    Rows with a region score also get its ROC, flags, localization (with lesion ``centroids``, patient
    mm) and map montage (:mod:`training.evaluate.maps`).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{title}: " if title else ""
    warnings: list[str] = []

    def warn(msg: str, **kw: Any) -> None:
        warnings.append(msg)
        log.warning("evaluate_warning", detail=msg, **kw)

    rows, rejected, seen = _parse_rows(scores)
    used, unlabeled, excluded = _select(rows, labels, warn)
    versions = sorted({r.model_version for r in used if r.model_version})
    if len(versions) > 1:
        warn(f"scores come from {len(versions)} model sets: {', '.join(versions)}")

    groups = [group_of(*labels[r.study_uid]) for r in used]
    is_abn = np.array([labels[r.study_uid][0] == "abnormal" for r in used], bool)
    lesions = sorted({g for g, a in zip(groups, is_abn, strict=True) if a})
    garr = np.array(groups, dtype=object)
    vals = {m: np.array([r.metric(m) for r in used], float) for m in METRICS}

    report: dict[str, Any] = {
        "title": title,
        "n_normal": int((~is_abn).sum()),
        "n_abnormal": int(is_abn.sum()),
        "n_rejected": len(rejected),
        "n_unlabeled": len(unlabeled),
        "n_excluded": len(excluded),
        "n_by_lesion": {les: int((garr == les).sum()) for les in lesions},
        "model_versions": versions,
        "auc": None,
        "bootstrap": {"resamples": n_boot, "seed": seed, "method": "stratified, percentile 95% CI"},
        "threshold_convention": (
            "metric units (nats); a study is flagged when metric < threshold "
            "(roc.thresholds: point i calls metric <= thresholds[i] abnormal; null: none)"
        ),
        "metrics": {},
        "figures": [],
        "skipped_figures": {},
    }
    _curves(report, vals, is_abn, garr, lesions, out, prefix, n_boot, seed, warn)
    report["operating_point"] = operating_point(used, is_abn)
    _histograms(report, used, vals, garr, lesions, out, prefix)

    volume = _volume_cache([b for b in (base_dir, Path.cwd()) if b is not None], warn)
    _zero_fraction(report, used, garr, vals, volume, out, prefix, warn)
    _montages(report, used, groups, vals["posterior"], volume, out, prefix, k, slices, warn)
    region_section(report, scores, used, is_abn, garr, lesions, out, prefix, k, n_boot, seed,
                   [b for b in (base_dir, Path.cwd()) if b is not None], warn, volume, centroids)

    report["rejected"] = rejected
    report["unlabeled"] = unlabeled
    report["excluded"] = excluded
    report["labels_without_scores"] = len(set(labels) - set(seen))
    report["warnings"] = warnings
    (out / "report.json").write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n")
    return _jsonable(report)


def _parse_rows(scores: list[dict[str, Any]]) -> tuple[list[Row], list[dict[str, str]], dict[str, str]]:
    """Validate every row; a study that appears twice is an input error (which score would count?)."""
    rows: list[Row] = []
    rejected: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    for i, obj in enumerate(scores):
        where = obj.get("_where", f"scores[{i}]") if isinstance(obj, dict) else f"scores[{i}]"
        r = parse_row(obj, where)
        uid = r["study_uid"] if isinstance(r, dict) else r.study_uid
        if uid in seen:
            raise EvaluationInputError(f"{where}: study {uid} appears again (first at {seen[uid]})")
        seen[uid] = where
        if isinstance(r, dict):
            rejected.append(r)
        else:
            rows.append(r)
    return rows, rejected, seen


def _select(rows: list[Row], labels: Mapping[str, tuple[str, str]],
            warn: Warn) -> tuple[list[Row], list[str], list[dict[str, str]]]:
    """The rows that count (labelled, finite), and the ones left out, each kind warned about once."""
    unlabeled = [r.study_uid for r in rows if r.study_uid not in labels]
    if unlabeled:
        warn(f"{len(unlabeled)} scored studies have no label and are excluded", count=len(unlabeled))
    excluded = []
    for r in rows:
        if r.study_uid in labels and not r.finite:
            excluded.append({"study_uid": r.study_uid, "where": r.where, "reason": "non-finite score"})
    if excluded:
        warn(f"{len(excluded)} studies have non-finite scores and are excluded", count=len(excluded))
    for r in rows:
        if r.finite and abs(r.log_posterior - (r.log_p_normal_model - r.log_p_mixture_model)) > \
                CONSISTENCY_TOL * max(1.0, abs(r.log_posterior)):
            warn(f"{r.where}: study {r.study_uid}: log_posterior differs from "
                 "log_p_normal_model - log_p_mixture_model")
    used = [r for r in rows if r.study_uid in labels and r.finite]
    return used, unlabeled, excluded


def _curves(report: dict[str, Any], vals: dict[str, np.ndarray], is_abn: np.ndarray, garr: np.ndarray,
            lesions: list[str], out: Path, prefix: str, n_boot: int, seed: int, warn: Warn) -> None:
    """ROC summaries of each metric, overall and per lesion, and their figures when both classes exist."""
    roc_ok = report["n_normal"] > 0 and report["n_abnormal"] > 0
    for m, (field, pretty) in METRICS.items():
        v = vals[m]
        normal = v[~is_abn]
        entry = {"field": field, "overall": roc_summary(normal, v[is_abn], n_boot, seed), "lesions": {}}
        for j, les in enumerate(lesions):
            entry["lesions"][les] = roc_summary(normal, v[garr == les], n_boot, seed + 1 + j)
        report["metrics"][m] = entry
        name = f"roc_{m}.png"
        if roc_ok:
            curves = [("all abnormal", entry["overall"]), *entry["lesions"].items()]
            plot_roc(curves, pretty, out / name, prefix)
            report["figures"].append(name)
        else:
            report["skipped_figures"][name] = entry["overall"]["auc_undefined"]
    report["auc"] = report["metrics"]["posterior"]["overall"]["auc"]
    if not roc_ok:
        why = report["metrics"]["posterior"]["overall"]["auc_undefined"]
        warn(f"labels have only one class among scored studies: {why}")
    report["youden"] = report["metrics"]["posterior"]["overall"].get("youden")


def _histograms(report: dict[str, Any], used: list[Row], vals: dict[str, np.ndarray], garr: np.ndarray,
                lesions: list[str], out: Path, prefix: str) -> None:
    """One histogram a metric, by group, with the Youden cut-off when there is one."""
    for m, (_, pretty) in METRICS.items():
        name = f"hist_{m}.png"
        if not used:
            report["skipped_figures"][name] = "no scored, labelled studies"
            continue
        by_group = {g: vals[m][garr == g] for g in ["normal", *lesions] if (garr == g).any()}
        yd = report["metrics"][m]["overall"].get("youden")
        plot_hist(by_group, pretty, out / name, prefix, yd["threshold"] if yd else None)
        report["figures"].append(name)


def _volume_cache(bases: list[Path], warn: Warn) -> Callable[[Row], np.ndarray | str]:
    """A loader that reads each study's volume once, for the zero-fraction figure and the montages."""
    volumes: dict[str, np.ndarray | str] = {}

    def volume(r: Row) -> np.ndarray | str:
        """The study's volume, or why there is none (kept as a note, never raised: a moved file
        should cost one tile, not the whole evaluation)."""
        if r.study_uid not in volumes:
            if r.volume is None:
                volumes[r.study_uid] = "no volume path"
            else:
                p = resolve_volume(r.volume, bases)
                try:
                    volumes[r.study_uid] = load_volume(p)
                except EvaluationInputError as e:
                    warn(f"{r.where}: study {r.study_uid}: {e}")
                    volumes[r.study_uid] = "volume unreadable"
        return volumes[r.study_uid]

    return volume


def _zero_fraction(report: dict[str, Any], used: list[Row], garr: np.ndarray, vals: dict[str, np.ndarray],
                   volume: Any, out: Path, prefix: str, warn: Any) -> None:
    """Correlation of each metric with the fraction of zero voxels (from the row or the volume)."""
    name = "zero_fraction.png"
    have = any(r.zero_fraction is not None or r.volume is not None for r in used)
    if not have:
        report["correlations"] = {"skipped": "no zero_fraction and no volume in the scores"}
        report["skipped_figures"][name] = report["correlations"]["skipped"]
        return
    zf = np.full(len(used), np.nan)
    for i, r in enumerate(used):
        if r.zero_fraction is not None:
            zf[i] = r.zero_fraction
        else:
            v = volume(r)
            if isinstance(v, np.ndarray):
                zf[i] = float(np.mean(v == 0))
    ok = np.isfinite(zf)
    if ok.sum() < len(used):
        warn(f"{len(used) - int(ok.sum())} studies have no zero fraction and are left out of {name}")
    report["correlations"] = {
        m: {"all": correlation(zf[ok], vals[m][ok]),
            "normal": correlation(zf[ok & (garr == "normal")], vals[m][ok & (garr == "normal")])}
        for m in METRICS
    }
    if not ok.any():
        report["skipped_figures"][name] = "no readable zero fraction"
        return
    plot_zero(zf[ok], list(garr[ok]), {m: vals[m][ok] for m in METRICS}, out / name, prefix)
    report["figures"].append(name)


def _montages(report: dict[str, Any], used: list[Row], groups: list[str], post: np.ndarray, volume: Any,
              out: Path, prefix: str, k: int, slices: int, warn: Any) -> None:
    """The k studies most and least likely abnormal by log p(normal|x), one figure each."""
    names = {"most": "montage_most_abnormal.png", "least": "montage_least_abnormal.png"}
    if not any(r.volume for r in used):
        for n in names.values():
            report["skipped_figures"][n] = "no volume paths in the scores"
        return
    order = np.argsort(post, kind="stable")
    report["montages"] = {}
    for which, idx in (("most", order[:k]), ("least", order[::-1][:k])):
        tiles = []
        for rank, i in enumerate(idx, 1):
            v = volume(used[i])
            img, note = None, ""
            if isinstance(v, np.ndarray):
                try:
                    img = volume_slices(v, slices)
                except EvaluationInputError as e:
                    warn(f"{used[i].where}: study {used[i].study_uid}: {e}")
                    note = "volume has an odd shape"
            else:
                note = v
            tiles.append({"rank": rank, "score": float(post[i]), "group": groups[i], "image": img,
                          "note": note})
        what = "most" if which == "most" else "least"
        plot_montage(tiles, out / names[which],
                      f"{prefix}top {len(tiles)} {what} likely abnormal (log p(normal|x), true label)")
        report["figures"].append(names[which])
        report["montages"][which] = [
            {"rank": t["rank"], "study_uid": used[i].study_uid, "log_posterior": t["score"],
             "label": t["group"]}
            for t, i in zip(tiles, idx, strict=True)
        ]


def _jsonable(x: Any) -> Any:
    """Plain JSON: numpy scalars to Python, non-finite floats to null (standard JSON has no inf/NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x



# --------------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="training evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("scores", type=Path, help="SCORES.jsonl as printed by `triage score --json`")
    ap.add_argument("--labels", type=Path, required=True, help="labels.csv (study_uid,label,lesion)")
    ap.add_argument("--out", type=Path, required=True, help="output folder for the PNGs and report.json")
    ap.add_argument("--title", default=None, help="prefix for figure titles")
    ap.add_argument("--k", type=int, default=16, help="studies per montage (default 16)")
    ap.add_argument("--slices", type=int, default=1, help="axial slices per montage tile (default 1: mid)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for AUC CIs")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    a = ap.parse_args(argv)
    if a.k < 1 or a.slices < 1 or a.bootstrap < 0:
        ap.error("--k and --slices must be >= 1 and --bootstrap >= 0")
    try:
        scores = load_scores(a.scores)
        labels = load_labels(a.labels)
        rep = evaluate(scores, labels, a.out, k=a.k, title=a.title, slices=a.slices, n_boot=a.bootstrap,
                       seed=a.seed, base_dir=a.scores.resolve().parent, centroids=load_centroids(a.labels))
    except EvaluationInputError as e:
        print(f"training evaluate: error: {e}", file=sys.stderr)
        return 2
    o = rep["metrics"]["posterior"]["overall"]
    if o["auc"] is not None:
        lo, hi = o["auc_ci95"]
        lik = rep["metrics"]["likelihood"]["overall"]["auc"]
        yd = rep["youden"]
        cut = "none better than chance" if yd["threshold"] is None else f"{yd['threshold']:.4g}"
        print(f"AUC log p(normal|x) {o['auc']:.3f} [{lo:.3f}, {hi:.3f}], log p(x|normal) {lik:.3f}; "
              f"Youden cut-off {cut} (sens {yd['sensitivity']:.3f}, spec {yd['specificity']:.3f})")
        for les, c in rep["metrics"]["posterior"]["lesions"].items():
            print(f"  {les}: AUC {c['auc']:.3f} (n={c['n_abnormal']})")
        reg = rep["metrics"].get("region", {}).get("overall", {})
        if reg.get("auc") is not None:
            lo, hi = reg["auc_ci95"]
            loc = rep.get("region", {}).get("localization") or {}
            where = "" if not loc.get("n") else (
                f"; centre to lesion median {loc['median_mm']:.0f} mm, "
                f"{100 * loc['within_30mm']:.0f}% within 30 mm (n={loc['n']})")
            print(f"AUC region score {reg['auc']:.3f} [{lo:.3f}, {hi:.3f}]{where}")
    else:
        print(f"AUC undefined: {o['auc_undefined']}")
    print(f"n normal {rep['n_normal']}, abnormal {rep['n_abnormal']}, rejected {rep['n_rejected']}, "
          f"unlabeled {rep['n_unlabeled']}, excluded {rep['n_excluded']}")
    for name, why in rep["skipped_figures"].items():
        print(f"skipped {name}: {why}")
    print(f"wrote {len(rep['figures'])} figures and report.json to {a.out}"
          + (f"; {len(rep['warnings'])} warnings in report.json" if rep["warnings"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
