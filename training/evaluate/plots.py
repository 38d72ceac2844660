"""The figures of `training evaluate`: ROC curves, histograms by label, score against zero fraction,
and montages of the extreme studies.

Matplotlib is used through ``Figure`` objects (Agg canvas) rather than pyplot, so no display and no
global backend state are involved, which keeps it safe inside the nightly retrain job too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from training.evaluate.inputs import METRICS, EvaluationInputError


def volume_slices(vol: np.ndarray, n: int) -> np.ndarray:
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



def save_png(fig: Figure, path: Path) -> None:
    """One resolution for every figure, so reports from different runs compare side by side."""
    fig.savefig(path, dpi=110, format="png")


def plot_roc(curves: list[tuple[str, dict[str, Any]]], label: str, path: Path, title: str) -> None:
    """ROC curves (overall in black, one colour a lesion) with each Youden point circled."""
    fig = Figure(figsize=(5.5, 5.2), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6")
    colors = group_colors(name for name, _ in curves if name != "all abnormal")
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
    save_png(fig, path)


def group_colors(groups: Iterable[str]) -> dict[str, str]:
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


def plot_hist(by_group: dict[str, np.ndarray], label: str, path: Path, title: str,
               cutoff: float | None) -> None:
    """Overlaid histograms by group on shared bin edges (at most 60 bins), with the cut-off if finite."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    allv = np.concatenate(list(by_group.values()))
    edges = np.histogram_bin_edges(allv, bins="auto")
    if edges.size > 61:
        edges = np.histogram_bin_edges(allv, bins=60)
    colors = group_colors(by_group)
    for g, v in by_group.items():
        ax.hist(v, bins=edges, histtype="stepfilled", alpha=0.35, color=colors[g], label=f"{g} (n={v.size})")
        ax.hist(v, bins=edges, histtype="step", lw=1.2, color=colors[g])
    if cutoff is not None and math.isfinite(cutoff):
        ax.axvline(cutoff, color="k", ls="--", lw=1, label=f"Youden cut-off {cutoff:.4g}")
    ax.set(xlabel=f"{label} (nats)", ylabel="number of studies", title=f"{title}Histogram of {label}")
    ax.legend(fontsize=8)
    save_png(fig, path)


def plot_zero(zf: np.ndarray, groups: list[str], values: dict[str, np.ndarray], path: Path,
               title: str) -> None:
    """Paper Fig. A.20: each metric against the fraction of zero voxels, coloured by group."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    colors = group_colors(dict.fromkeys(groups))
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
    save_png(fig, path)


def plot_montage(tiles: list[dict[str, Any]], path: Path, title: str) -> None:
    """A grid of slices, ranked, each titled with its score and true group (or a note if no image)."""
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
    save_png(fig, path)

