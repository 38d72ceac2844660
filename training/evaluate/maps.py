"""The region score in ``training evaluate``: its ROC beside the global one, how well it localizes, and
montages of the maps.

Inputs are the same score rows (``triage score --json``) with the region fields (``region_score``,
``region_flagged``, ``region_center_mm``; see ``triage.model.voxelmap``), and optionally:

* ``region_map`` in a row: an .npz (path relative like ``volume``) with the standardized map ``zmap`` on
  the model's grid and ``canonical_index_zyx``, its centre on the canonical grid (``training
  experiment`` writes them): the montages overlay it on the study's slice through the centre;
* lesion centroids (``labels.csv`` columns ``lesion_x, lesion_y, lesion_z``, patient LPS mm, written
  by the synthetic generator): the distance from each abnormal study's region centre to its lesion.

Rows without a region score (a model set made before region calibration) leave this section out.
Conventions as in :mod:`training.evaluate.report`: a low score is abnormal, AUCs come with stratified
bootstrap 95 % CIs.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from training.evaluate.inputs import Row, resolve_volume
from training.evaluate.metrics import roc_summary
from training.evaluate.plots import plot_montage, plot_roc, save_png

__all__ = ["LOCALIZED_MM", "load_centroids", "region_section"]

LOCALIZED_MM = 30.0  # "found": the region's centre within 30 mm of the lesion's centroid
WINDOW_OFFSET = 14  # the 7-bit volume is clip(HU + 14, 0, 127) (paper, eq. 4)


def load_centroids(path: Path) -> dict[str, tuple[float, float, float]]:
    """``labels.csv`` -> {study_uid: (x, y, z)} for rows with a lesion centroid (patient LPS mm)."""
    out: dict[str, tuple[float, float, float]] = {}
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError:
        return out
    for rec in csv.DictReader(text.splitlines()):
        try:
            xyz = tuple(float(rec[k]) for k in ("lesion_x", "lesion_y", "lesion_z"))
        except (KeyError, TypeError, ValueError):
            continue
        if all(math.isfinite(v) for v in xyz):
            out[(rec.get("study_uid") or "").strip()] = xyz  # type: ignore[assignment]
    return out


def region_section(report: dict[str, Any], scores: Sequence[Mapping[str, Any]], used: list[Row],
                   is_abn: np.ndarray, garr: np.ndarray, lesions: list[str], out: Path, prefix: str,
                   k: int, n_boot: int, seed: int, bases: list[Path], warn: Callable[..., None],
                   volume: Callable[[Row], np.ndarray | str],
                   centroids: Mapping[str, Sequence[float]] | None = None) -> None:
    """Add ``metrics.region``, ``region`` (operating point, localization) and the figures to ``report``."""
    raw = {str(o.get("study_uid")): o for o in scores if isinstance(o, Mapping)}
    region = np.array([_num(raw.get(r.study_uid, {}).get("region_score")) for r in used], float)
    if not used or not np.isfinite(region).any():
        report["region"] = {"skipped": "no region_score in the scores"}
        return
    ok = np.isfinite(region)
    if not ok.all():
        warn(f"{int((~ok).sum())} studies have no region score and are left out of the region figures")
    v, a, g = region[ok], is_abn[ok], garr[ok]
    entry: dict[str, Any] = {"field": "region_score", "overall": roc_summary(v[~a], v[a], n_boot, seed),
                             "lesions": {}}
    for j, les in enumerate(lesions):
        entry["lesions"][les] = roc_summary(v[~a], v[g == les], n_boot, seed + 1 + j)
    report["metrics"]["region"] = entry
    if (~a).any() and a.any():
        plot_roc([("all abnormal", entry["overall"]), *entry["lesions"].items()],
                 "region score (most abnormal window, normal s.d.)", out / "roc_region.png", prefix)
        report["figures"].append("roc_region.png")
        _plot_compare(report, out / "roc_compare.png", prefix)
        report["figures"].append("roc_compare.png")
    section: dict[str, Any] = {"n": int(ok.sum()), "operating_point": _region_flags(used, raw, is_abn)}
    if centroids:
        section["localization"] = _localization(used, raw, is_abn, garr, centroids)
    report["region"] = section
    _map_montage(report, used, raw, region, garr, out, prefix, k, bases, warn, volume)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def _plot_compare(report: dict[str, Any], path: Path, title: str) -> None:
    """Region score, global posterior and likelihood alone on one set of axes, AUC [95 % CI] in the legend."""
    fig = Figure(figsize=(5.5, 5.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6")
    for m, name, color in (("region", "region score", "tab:red"), ("posterior", "log p(normal|x)", "black"),
                           ("likelihood", "log p(x|normal)", "tab:gray")):
        c = report["metrics"].get(m, {}).get("overall")
        if not c or c.get("auc") is None:
            continue
        lo, hi = c.get("auc_ci95") or (math.nan, math.nan)
        ax.plot(c["roc"]["fpr"], c["roc"]["tpr"], color=color, lw=1.6,
                label=f"{name}: {c['auc']:.3f} [{lo:.3f}, {hi:.3f}]")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=8, title="AUC [95% CI]", title_fontsize=8)
    ax.set_title(f"{title}region score vs the paper's global score", fontsize=9)
    save_png(fig, path)


def _region_flags(used: list[Row], raw: Mapping[str, Mapping[str, Any]], is_abn: np.ndarray
                  ) -> dict[str, Any] | None:
    """Sensitivity and specificity of the scorer's region flag (its own calibrated threshold), and of
    the final flag under the scorer's policy."""
    out: dict[str, Any] = {}
    for key in ("region_flagged", "flagged"):
        flags = [raw.get(r.study_uid, {}).get(key) for r in used]
        if any(f is None for f in flags):
            continue
        f = np.array(flags, bool)
        out[key] = {"sensitivity": float(f[is_abn].mean()) if is_abn.any() else None,
                    "specificity": float((~f[~is_abn]).mean()) if (~is_abn).any() else None}
    policies = {raw.get(r.study_uid, {}).get("flag_policy") for r in used} - {None}
    if policies:
        out["flag_policy"] = sorted(policies)
    return out or None


def _localization(used: list[Row], raw: Mapping[str, Mapping[str, Any]], is_abn: np.ndarray,
                  garr: np.ndarray, centroids: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """Distance (mm) from the region centre to the lesion centroid, for abnormal studies with both."""
    dist: list[float] = []
    by: dict[str, list[float]] = {}
    for r, a, g in zip(used, is_abn, garr, strict=True):
        c = raw.get(r.study_uid, {}).get("region_center_mm")
        if not a or c is None or r.study_uid not in centroids:
            continue
        d = float(np.linalg.norm(np.asarray(c, float) - np.asarray(centroids[r.study_uid], float)))
        dist.append(d)
        by.setdefault(str(g), []).append(d)

    def summary(ds: list[float]) -> dict[str, Any]:
        arr = np.asarray(ds, float)
        return {"n": int(arr.size), "median_mm": float(np.median(arr)) if arr.size else None,
                f"within_{LOCALIZED_MM:g}mm": float(np.mean(arr <= LOCALIZED_MM)) if arr.size else None}

    return {**summary(dist), "lesions": {g: summary(d) for g, d in sorted(by.items())}}


def _map_tile(vol: np.ndarray, zmap: np.ndarray, centre: Sequence[float]) -> np.ndarray:
    """The axial slice through the region's centre with its map overlaid (RGB)."""
    from triage.report.keyimages import overlay_rgb

    zc, yc, xc = (float(c) for c in centre)
    k = int(np.clip(round(zc), 0, vol.shape[0] - 1))
    f = [s // t for s, t in zip(vol.shape, zmap.shape, strict=True)]
    zslice = zmap[min(k // f[0], zmap.shape[0] - 1)]
    z2 = np.repeat(np.repeat(zslice, f[1], axis=0), f[2], axis=1)[: vol.shape[1], : vol.shape[2]]
    hu = vol[k].astype(float) - WINDOW_OFFSET
    return overlay_rgb(hu, z2, ring=(yc, xc, 6.0))


def _map_montage(report: dict[str, Any], used: list[Row], raw: Mapping[str, Mapping[str, Any]],
                 region: np.ndarray, garr: np.ndarray, out: Path, prefix: str, k: int, bases: list[Path],
                 warn: Callable[..., None], volume: Callable[[Row], np.ndarray | str]) -> None:
    """The k studies most likely abnormal by the region score, each at its region with the map."""
    name = "montage_region_maps.png"
    have = [i for i, r in enumerate(used)
            if raw.get(r.study_uid, {}).get("region_map") and np.isfinite(region[i])]
    if not have:
        report["skipped_figures"][name] = "no region_map files in the scores"
        return
    order = sorted(have, key=lambda i: region[i])[:k]
    tiles = []
    for rank, i in enumerate(order, 1):
        r = used[i]
        img, note = None, ""
        vol = volume(r)
        try:
            with np.load(resolve_volume(str(raw[r.study_uid]["region_map"]), bases), allow_pickle=False) as z:
                zmap, centre = np.asarray(z["zmap"], float), np.asarray(z["canonical_index_zyx"], float)
            if isinstance(vol, np.ndarray):
                img = _map_tile(vol, zmap, centre)
            else:
                note = vol
        except (OSError, KeyError, ValueError) as e:
            warn(f"{r.where}: study {r.study_uid}: region map unreadable: {e}")
            note = "region map unreadable"
        tiles.append({"rank": rank, "score": float(region[i]), "group": str(garr[i]), "image": img,
                      "note": note})
    plot_montage(tiles, out / name, f"{prefix}top {len(tiles)} by region score: slice through the region, "
                                    "map where > 2 normal s.d. below normal")
    report["figures"].append(name)


def write_key_image_pngs(results_dir: Path, out_dir: Path, prefix: str = "") -> list[Path]:
    """The daemon's key images of one study (``<storage>/results/<study>/key-<generation>-<i>.dcm``, the
    newest generation) as PNGs in ``out_dir``: what the demo shows a newcomer of each flagged study.
    Returns the PNGs written (none when the study has no key images)."""
    import matplotlib.image
    from pydicom import dcmread

    files = sorted(Path(results_dir).glob("key-*-*.dcm"),
                   key=lambda p: tuple(int(v) for v in p.stem.split("-")[1:3]))
    if not files:
        return []
    newest = max(int(p.stem.split("-")[1]) for p in files)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for p in files:
        gen, i = (int(v) for v in p.stem.split("-")[1:3])
        if gen != newest:
            continue
        png = out_dir / f"{prefix}key-{i}.png"
        matplotlib.image.imsave(png, dcmread(p).pixel_array)
        written.append(png)
    return written
