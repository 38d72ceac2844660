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

Matplotlib is used through ``Figure`` objects (Agg canvas) rather than pyplot, so no display and no
global backend state are involved, which keeps it safe inside the daemon's retrain job too.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from triage.model.calibrate import threshold_at_specificity, youden
from triage.ops.logs import get_logger

log = get_logger("evaluate")

METRICS = {
    "posterior": ("log_posterior", "log p(normal|x)"),
    "likelihood": ("log_p_normal_model", "log p(x|normal)"),
}
FIXED_SPECIFICITIES = (0.8, 0.9, 0.95)
REQUIRED_FIELDS = ("study_uid", "log_p_normal_model", "log_p_mixture_model", "log_posterior")
# Scores from a model set are sums over ~500k voxels: a disagreement larger than this between
# log_posterior and M0 - M1 means the row was edited or produced by a different formula.
CONSISTENCY_TOL = 1e-3


class EvaluationInputError(ValueError):
    """Bad scores or labels; the message names the file (or list index) and the line."""


# --------------------------------------------------------------------------------------------------
# operating points (shared with the model registry's calibration)


# --------------------------------------------------------------------------------------------------
# input


@dataclass
class Row:
    """One scored study, validated."""

    where: str
    study_uid: str
    log_posterior: float
    log_p_normal_model: float
    log_p_mixture_model: float
    threshold: float | None = None
    flagged: bool | None = None
    model_version: str | None = None
    zero_fraction: float | None = None
    volume: str | None = None

    def metric(self, name: str) -> float:
        return float(getattr(self, METRICS[name][0]))

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.log_posterior, self.log_p_normal_model,
                                              self.log_p_mixture_model))


def _number(obj: Mapping[str, Any], key: str, where: str) -> float:
    v = obj[key]
    if v is None:  # some writers emit null for NaN
        return math.nan
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise EvaluationInputError(f"{where}: field {key!r} is {v!r}, expected a number")
    return float(v)


def parse_row(obj: Any, where: str) -> Row | dict[str, str]:
    """Validate one scores object; a rejected study comes back as ``{study_uid, reason}``."""
    if not isinstance(obj, dict):
        raise EvaluationInputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    uid = obj.get("study_uid")
    if not isinstance(uid, str) or not uid.strip():
        raise EvaluationInputError(f"{where}: missing or empty 'study_uid'")
    if obj.get("rejected"):
        return {"study_uid": uid, "reason": str(obj.get("reason") or "unspecified")}
    missing = [k for k in REQUIRED_FIELDS if k not in obj]
    if missing:
        raise EvaluationInputError(f"{where}: study {uid}: missing field(s) {', '.join(missing)}")
    zf = obj.get("zero_fraction")
    if zf is not None:
        zf = _number(obj, "zero_fraction", where)
        if math.isfinite(zf) and not 0.0 <= zf <= 1.0:
            raise EvaluationInputError(f"{where}: study {uid}: zero_fraction {zf} is outside [0, 1]")
    thr = obj.get("threshold")
    vol = obj.get("volume")
    if vol is not None and not isinstance(vol, str):
        raise EvaluationInputError(f"{where}: study {uid}: 'volume' must be a path string, got {vol!r}")
    return Row(
        where=where,
        study_uid=uid,
        log_posterior=_number(obj, "log_posterior", where),
        log_p_normal_model=_number(obj, "log_p_normal_model", where),
        log_p_mixture_model=_number(obj, "log_p_mixture_model", where),
        threshold=None if thr is None else _number(obj, "threshold", where),
        flagged=None if obj.get("flagged") is None else bool(obj["flagged"]),
        model_version=None if obj.get("model_version") is None else str(obj["model_version"]),
        zero_fraction=zf,
        volume=vol,
    )


def load_scores(path: Path) -> list[dict[str, Any]]:
    """Read a scores JSONL file; blank lines are skipped, anything else must be a valid object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise EvaluationInputError(f"{path}: cannot read scores file: {e.strerror or e}") from e
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvaluationInputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
        parse_row(obj, where)  # fail here, with the line number, rather than later with an index
        obj = dict(obj)
        obj["_where"] = where
        out.append(obj)
    return out


def load_labels(path: Path) -> dict[str, tuple[str, str]]:
    """``labels.csv`` -> ``{study_uid: (label, lesion)}``; label is normal|abnormal, lesion may be ''."""
    path = Path(path)
    try:
        fh = path.open(newline="", encoding="utf-8-sig")
    except OSError as e:
        raise EvaluationInputError(f"{path}: cannot read labels file: {e.strerror or e}") from e
    labels: dict[str, tuple[str, str]] = {}
    first_line: dict[str, int] = {}
    with fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if "study_uid" not in cols or "label" not in cols:
            raise EvaluationInputError(f"{path}:1: header must contain study_uid,label[,lesion], got {cols}")
        for rec in reader:
            lineno = reader.line_num
            rec = {(k or "").strip(): (v or "").strip() for k, v in rec.items() if k is not None}
            uid, label, lesion = rec.get("study_uid", ""), rec.get("label", "").lower(), rec.get("lesion", "")
            if not uid and not label:
                continue
            if not uid:
                raise EvaluationInputError(f"{path}:{lineno}: empty study_uid")
            if label not in ("normal", "abnormal"):
                raise EvaluationInputError(
                    f"{path}:{lineno}: study {uid}: label {rec.get('label')!r} is not 'normal' or 'abnormal'"
                )
            if uid in labels:
                raise EvaluationInputError(
                    f"{path}:{lineno}: study {uid} is labelled twice (first on line {first_line[uid]})"
                )
            labels[uid] = (label, lesion)
            first_line[uid] = lineno
    return labels


def _group(label: str, lesion: str) -> str:
    """Histogram/ROC group: 'normal' or the lesion type ('unspecified' when an abnormal has none)."""
    return "normal" if label == "normal" else (lesion or "unspecified")


# --------------------------------------------------------------------------------------------------
# numbers


def _bootstrap_auc(neg: np.ndarray, pos: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Stratified bootstrap of the AUC (normals and abnormals resampled separately, so every
    resample keeps both classes). Mann-Whitney form with average ranks, vectorised in chunks."""
    rng = np.random.default_rng(seed)
    n0, n1 = neg.size, pos.size
    out = np.empty(n_boot)
    chunk = max(1, min(n_boot, 2_000_000 // (n0 + n1)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        s = np.concatenate([pos[rng.integers(0, n1, (b, n1))], neg[rng.integers(0, n0, (b, n0))]], axis=1)
        r = stats.rankdata(s, axis=1)
        out[start:start + b] = (r[:, :n1].sum(axis=1) - n1 * (n1 + 1) / 2) / (n0 * n1)
    return out


def _curve(normal: np.ndarray, abnormal: np.ndarray, n_boot: int, seed: int) -> dict[str, Any]:
    """Everything about one ROC curve of a normality metric (low = abnormal)."""
    res: dict[str, Any] = {"n_normal": int(normal.size), "n_abnormal": int(abnormal.size)}
    if normal.size == 0 or abnormal.size == 0:
        missing = "normal" if normal.size == 0 else "abnormal"
        res.update(auc=None, auc_ci95=None, auc_undefined=f"no {missing} studies: AUC is undefined")
        if normal.size:
            res["sensitivity_at_specificity"] = [
                {"specificity_target": sp, "threshold": threshold_at_specificity(normal, sp),
                 "sensitivity": None, "specificity": _spec(normal, threshold_at_specificity(normal, sp))}
                for sp in FIXED_SPECIFICITIES
            ]
        return res
    y = np.r_[np.zeros(normal.size, int), np.ones(abnormal.size, int)]
    a = -np.r_[normal, abnormal]  # abnormality score
    auc = float(roc_auc_score(y, a))
    boot = _bootstrap_auc(-normal, -abnormal, n_boot, seed) if n_boot > 0 else np.array([auc])
    fpr, tpr, thr = roc_curve(y, a)
    t, sens, spec = youden(y, a)
    res.update(
        auc=auc,
        auc_ci95=[float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        auc_se=float(boot.std(ddof=1)) if boot.size > 1 else None,
        youden={
            "threshold": -t,  # metric units: flag when metric < threshold
            "sensitivity": sens,
            "specificity": spec,
            "j": sens + spec - 1.0,
        },
        sensitivity_at_specificity=[],
        roc={"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": (-thr).tolist()},
    )
    for sp in FIXED_SPECIFICITIES:
        th = threshold_at_specificity(normal, sp)
        res["sensitivity_at_specificity"].append({
            "specificity_target": sp,
            "threshold": th,
            "sensitivity": float(np.mean(abnormal < th)),
            "specificity": _spec(normal, th),
        })
    return res


def _spec(normal: np.ndarray, threshold: float) -> float:
    return float(np.mean(normal >= threshold))


def _correlation(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    if x.size < 3:
        return {"n": int(x.size), "undefined": "fewer than 3 studies"}
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": int(x.size), "undefined": "constant input"}
    p, s = stats.pearsonr(x, y), stats.spearmanr(x, y)
    return {"n": int(x.size), "pearson_r": float(p.statistic), "pearson_p": float(p.pvalue),
            "spearman_rho": float(s.statistic), "spearman_p": float(s.pvalue)}


# --------------------------------------------------------------------------------------------------
# volumes


def _resolve(volume: str, base_dirs: Sequence[Path]) -> Path:
    p = Path(volume)
    if p.is_absolute():
        return p
    for b in base_dirs:
        if (b / p).exists():
            return b / p
    return p


def load_volume(path: Path) -> np.ndarray:
    """The ``data`` array of a scored volume (.npz; a bare .npy is accepted too)."""
    try:
        z = np.load(path, allow_pickle=False)
        if isinstance(z, np.ndarray):
            return z
        with z:
            if "data" not in z.files:
                raise EvaluationInputError(f"{path}: no 'data' array (has {z.files})")
            return np.asarray(z["data"])
    except EvaluationInputError:
        raise
    except Exception as e:  # OSError, BadZipFile, ValueError, EOFError: all mean "not a readable volume"
        raise EvaluationInputError(f"{path}: cannot read volume: {e}") from e


def _slices(vol: np.ndarray, n: int) -> np.ndarray:
    """Mid-axial slice (n=1) or n slices spread over the central half, side by side."""
    v = np.squeeze(vol)
    if v.ndim == 2:
        return v
    if v.ndim != 3:
        raise EvaluationInputError(f"volume of shape {vol.shape} is neither 2-D nor 3-D")
    d = v.shape[0]
    idx = [d // 2] if n <= 1 else sorted({round(i) for i in np.linspace(d * 0.25, d * 0.75 - 1, n)})
    parts = []
    for i in idx:
        parts += [v[i], np.zeros((v.shape[1], 2), v.dtype)]
    return np.concatenate(parts[:-1], axis=1)


# --------------------------------------------------------------------------------------------------
# figures


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110, format="png")


def _plot_roc(curves: list[tuple[str, dict[str, Any]]], label: str, path: Path, title: str) -> None:
    fig = Figure(figsize=(5.5, 5.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6")
    colors = _colors(name for name, _ in curves if name != "all abnormal")
    for name, c in curves:
        fpr, tpr = c["roc"]["fpr"], c["roc"]["tpr"]
        color = "black" if name == "all abnormal" else colors[name]
        (line,) = ax.plot(fpr, tpr, lw=1.6, color=color, label=f"{name} [{c['auc']:.3f}]")
        yd = c["youden"]
        if math.isfinite(yd["threshold"]):
            ax.plot(1 - yd["specificity"], yd["sensitivity"], "o", mfc="none", ms=9, mew=1.6,
                    color=line.get_color())
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="1 - specificity", ylabel="sensitivity",
           title=f"{title}ROC of {label}\n(AUC in brackets, circle: Youden cut-off)")
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def _colors(groups: Iterable[str]) -> dict[str, str]:
    """One colour per group, the same in every figure: normal blue, lesions in name order."""
    palette = ["tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    out, i = {}, 0
    for g in sorted(set(groups), key=lambda g: (g != "normal", g)):
        if g == "normal":
            out[g] = "tab:blue"
        else:
            out[g] = palette[i % len(palette)]
            i += 1
    return out


def _plot_hist(by_group: dict[str, np.ndarray], label: str, path: Path, title: str,
               cutoff: float | None) -> None:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    allv = np.concatenate(list(by_group.values()))
    edges = np.histogram_bin_edges(allv, bins="auto")
    if edges.size > 61:
        edges = np.histogram_bin_edges(allv, bins=60)
    colors = _colors(by_group)
    for g, v in by_group.items():
        ax.hist(v, bins=edges, histtype="stepfilled", alpha=0.35, color=colors[g], label=f"{g} (n={v.size})")
        ax.hist(v, bins=edges, histtype="step", lw=1.2, color=colors[g])
    if cutoff is not None and math.isfinite(cutoff):
        ax.axvline(cutoff, color="k", ls="--", lw=1, label=f"Youden cut-off {cutoff:.4g}")
    ax.set(xlabel=f"{label} (nats)", ylabel="number of studies", title=f"{title}Histogram of {label}")
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_zero(zf: np.ndarray, groups: list[str], values: dict[str, np.ndarray], path: Path,
               title: str) -> None:
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    colors = _colors(dict.fromkeys(groups))
    garr = np.array(groups)
    for i, name in enumerate(("likelihood", "posterior")):
        ax = fig.add_subplot(1, 2, i + 1)
        for g in dict.fromkeys(groups):
            m = garr == g
            ax.scatter(zf[m], values[name][m], s=12, alpha=0.7, color=colors[g], label=g)
        ax.set(xlabel="fraction of zero voxels", ylabel=f"{METRICS[name][1]} (nats)",
               title=f"({'ab'[i]}) {METRICS[name][1]} vs zero fraction")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title.rstrip(": "))
    _save(fig, path)


def _plot_montage(tiles: list[dict[str, Any]], path: Path, title: str) -> None:
    n = len(tiles)
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    # Tiles of several slices side by side are wide: size the figure to the tiles, not a square grid.
    aspect = max((t["image"].shape[1] / t["image"].shape[0] for t in tiles if t["image"] is not None),
                 default=1.0)
    fig = Figure(figsize=(1.9 * aspect * ncols + 0.2, 2.35 * nrows + 0.4), layout="constrained")
    for i, t in enumerate(tiles):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        if t["image"] is not None:
            img = t["image"]
            vmax = 127 if img.dtype == np.uint8 and img.max() <= 127 else float(np.percentile(img, 99.5)) or 1
            ax.imshow(img, cmap="gray", vmin=0 if img.dtype == np.uint8 else float(img.min()), vmax=vmax,
                      interpolation="nearest")
        else:
            ax.text(0.5, 0.5, t["note"], ha="center", va="center", fontsize=7, wrap=True)
        color = "tab:blue" if t["group"] == "normal" else "tab:red"
        ax.set_title(f"#{t['rank']} {t['score']:.4g}\n{t['group']}", fontsize=8, color=color)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


# --------------------------------------------------------------------------------------------------
# the evaluation


def evaluate(scores: list[dict[str, Any]], labels: Mapping[str, tuple[str, str]], out: Path, k: int = 16,
             *, title: str | None = None, slices: int = 1, n_boot: int = 1000, seed: int = 0,
             base_dir: Path | None = None) -> dict[str, Any]:
    """Write the figures and ``report.json`` into ``out``; return the report.

    ``scores`` are objects as ``triage score --json`` prints them (rows from :func:`load_scores` keep
    their file:line for messages). Studies without a label, and studies with non-finite scores, are
    left out and listed; rejected rows are counted and listed. ``volume`` paths that are relative are
    looked up under ``base_dir`` (the scores file's folder for the CLI) and then the working directory.
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
    versions = sorted({r.model_version for r in used if r.model_version})
    if len(versions) > 1:
        warn(f"scores come from {len(versions)} model sets: {', '.join(versions)}")

    groups = [_group(*labels[r.study_uid]) for r in used]
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
    roc_ok = report["n_normal"] > 0 and report["n_abnormal"] > 0
    for m, (field, pretty) in METRICS.items():
        v = vals[m]
        normal = v[~is_abn]
        entry = {"field": field, "overall": _curve(normal, v[is_abn], n_boot, seed), "lesions": {}}
        for j, les in enumerate(lesions):
            entry["lesions"][les] = _curve(normal, v[garr == les], n_boot, seed + 1 + j)
        report["metrics"][m] = entry
        name = f"roc_{m}.png"
        if roc_ok:
            curves = [("all abnormal", entry["overall"]), *entry["lesions"].items()]
            _plot_roc(curves, pretty, out / name, prefix)
            report["figures"].append(name)
        else:
            report["skipped_figures"][name] = entry["overall"]["auc_undefined"]
    report["auc"] = report["metrics"]["posterior"]["overall"]["auc"]
    if not roc_ok:
        why = report["metrics"]["posterior"]["overall"]["auc_undefined"]
        warn(f"labels have only one class among scored studies: {why}")
    report["youden"] = report["metrics"]["posterior"]["overall"].get("youden")
    report["operating_point"] = _operating_point(used, is_abn)

    for m, (_, pretty) in METRICS.items():
        name = f"hist_{m}.png"
        if not used:
            report["skipped_figures"][name] = "no scored, labelled studies"
            continue
        by_group = {g: vals[m][garr == g] for g in ["normal", *lesions] if (garr == g).any()}
        yd = report["metrics"][m]["overall"].get("youden")
        _plot_hist(by_group, pretty, out / name, prefix, yd["threshold"] if yd else None)
        report["figures"].append(name)

    bases = [b for b in (base_dir, Path.cwd()) if b is not None]
    volumes: dict[str, np.ndarray | str] = {}

    def volume(r: Row) -> np.ndarray | str:
        """The study's volume, or why there is none (kept as a note, never raised: a moved file
        should cost one tile, not the whole evaluation)."""
        if r.study_uid not in volumes:
            if r.volume is None:
                volumes[r.study_uid] = "no volume path"
            else:
                p = _resolve(r.volume, bases)
                try:
                    volumes[r.study_uid] = load_volume(p)
                except EvaluationInputError as e:
                    warn(f"{r.where}: study {r.study_uid}: {e}")
                    volumes[r.study_uid] = "volume unreadable"
        return volumes[r.study_uid]

    _zero_fraction(report, used, garr, vals, volume, out, prefix, warn)
    _montages(report, used, groups, vals["posterior"], volume, out, prefix, k, slices, warn)

    report["rejected"] = rejected
    report["unlabeled"] = unlabeled
    report["excluded"] = excluded
    report["labels_without_scores"] = len(set(labels) - set(seen))
    report["warnings"] = warnings
    (out / "report.json").write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n")
    return _jsonable(report)


def _operating_point(used: list[Row], is_abn: np.ndarray) -> dict[str, Any] | None:
    """How the scorer's own flag (its model set's threshold) did on these labels."""
    flags = []
    for r in used:
        if r.flagged is not None:
            flags.append(r.flagged)
        elif r.threshold is not None and math.isfinite(r.threshold):
            flags.append(r.log_posterior < r.threshold)
        else:
            return None
    if not flags:
        return None
    f = np.array(flags, bool)
    thr = sorted({r.threshold for r in used if r.threshold is not None})
    return {
        "thresholds": thr,
        "sensitivity": float(f[is_abn].mean()) if is_abn.any() else None,
        "specificity": float((~f[~is_abn]).mean()) if (~is_abn).any() else None,
        "n_flagged": int(f.sum()),
    }


def _zero_fraction(report: dict[str, Any], used: list[Row], garr: np.ndarray, vals: dict[str, np.ndarray],
                   volume: Any, out: Path, prefix: str, warn: Any) -> None:
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
        m: {"all": _correlation(zf[ok], vals[m][ok]),
            "normal": _correlation(zf[ok & (garr == "normal")], vals[m][ok & (garr == "normal")])}
        for m in METRICS
    }
    if not ok.any():
        report["skipped_figures"][name] = "no readable zero fraction"
        return
    _plot_zero(zf[ok], list(garr[ok]), {m: vals[m][ok] for m in METRICS}, out / name, prefix)
    report["figures"].append(name)


def _montages(report: dict[str, Any], used: list[Row], groups: list[str], post: np.ndarray, volume: Any,
              out: Path, prefix: str, k: int, slices: int, warn: Any) -> None:
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
                    img = _slices(v, slices)
                except EvaluationInputError as e:
                    warn(f"{used[i].where}: study {used[i].study_uid}: {e}")
                    note = "volume has an odd shape"
            else:
                note = v
            tiles.append({"rank": rank, "score": float(post[i]), "group": groups[i], "image": img,
                          "note": note})
        what = "most" if which == "most" else "least"
        _plot_montage(tiles, out / names[which],
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
                       seed=a.seed, base_dir=a.scores.resolve().parent)
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
