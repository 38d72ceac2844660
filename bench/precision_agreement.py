"""bf16 vs float32 scoring of one model set: how far apart are the scores, and is the ranking kept?

The coupling nets of a ``precision = "bf16"`` model set run under bf16 autocast; the likelihood
bookkeeping is float32 either way (``triage.model.glow``). This scores the same canonical volumes with
the same weights twice in one run, once in each precision (``Glow.set_precision``), and reports the
distribution of the differences of log p(x|normal), log p(x) and log p(normal|x) in nats, and the
Spearman rank correlation of the posteriors (the issue's target: >= 0.99) and of the region scores.

    python bench/precision_agreement.py --models DIR/models --volumes DIR/cache/test [--limit 100]
                                        [--out bench/results/precision.json]

``--volumes``: a folder of canonical volumes (``*.npz`` as ``save_volume`` writes them, searched
recursively), e.g. an experiment's test-set cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from triage.assemble.volume import load_volume  # noqa: E402
from triage.model.registry import Registry  # noqa: E402
from triage.model.score import Scorer, VolumeInput  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "precision.json"


Volumes = list[tuple[str, np.ndarray, dict]]


def _score_all(scorer: Scorer, precision: str, vols: Volumes) -> tuple[dict, float]:
    for model in (scorer.pair.m0, scorer.pair.m1):
        model.set_precision(precision)
    t0 = time.perf_counter()
    out = {}
    for uid, vol, meta in vols:
        r = scorer.score([VolumeInput(uid, uid, vol, meta)])[0]
        out[uid] = (r.log_p_normal_model, r.log_p_mixture_model, r.log_posterior, r.region_score)
    return out, (time.perf_counter() - t0) / max(1, len(vols))


def _summary(d: np.ndarray) -> dict[str, float]:
    a = np.abs(d)
    return {"mean": float(d.mean()), "sd": float(d.std(ddof=1)) if d.size > 1 else 0.0,
            "median_abs": float(np.median(a)), "p95_abs": float(np.percentile(a, 95)),
            "max_abs": float(a.max())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, required=True, help="a model registry (its current set is used)")
    ap.add_argument("--volumes", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    paths = sorted(args.volumes.rglob("*.npz"))[: args.limit]
    vols = []
    for p in paths:
        v = load_volume(p)
        vols.append((str(v.metadata().get("study_uid") or p.stem), v.data, v.metadata()))
    scorer = Scorer.from_registry(Registry(args.models), device="cpu", flag_policy="either")
    trained = scorer.pair.m0.precision
    s16, t16 = _score_all(scorer, "bf16", vols)
    s32, t32 = _score_all(scorer, "fp32", vols)
    uids = sorted(s16)
    a16, a32 = np.array([s16[u] for u in uids], float), np.array([s32[u] for u in uids], float)
    rows = {}
    for i, name in enumerate(("log_p_normal_model", "log_p_mixture_model", "log_posterior", "region_score")):
        ok = np.isfinite(a16[:, i]) & np.isfinite(a32[:, i])
        if ok.sum() < 3:
            continue
        rows[name] = {**_summary(a16[ok, i] - a32[ok, i]),
                      "spearman": float(spearmanr(a16[ok, i], a32[ok, i]).statistic), "n": int(ok.sum())}
    result = {"models": str(args.models), "trained_precision": trained, "volumes": len(vols),
              "seconds_per_volume": {"bf16": t16, "fp32": t32}, "differences_bf16_minus_fp32": rows,
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"model set trained in {trained}; {len(vols)} volumes; "
          f"scoring s/volume bf16 {t16:.3f}, fp32 {t32:.3f}")
    print("| score | n | mean diff (nats) | sd | median abs | p95 abs | max abs | Spearman |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['n']} | {r['mean']:.3f} | {r['sd']:.3f} | {r['median_abs']:.3f} | "
              f"{r['p95_abs']:.3f} | {r['max_abs']:.3f} | {r['spearman']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
