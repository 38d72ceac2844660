"""Step 1: the four disjoint sets of synthetic studies (head CT, or with ``--kind cxr`` chest
radiographs), written once and reused.

Normals (M0's training set), an unlabeled mixture of normals and abnormals (M1's; its ``labels.csv`` and
``truth.jsonl`` are moved to ``sealed/`` before anything is trained, so M1 cannot see them), held-out
normals for calibration, and a labeled test set written *with* its distractor series, because that is
what a PACS sends (a chest test set: lateral views beside the frontal ones).
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from training.demo.plan import SETS, Plan, say


def _set_spec(plan: Plan) -> dict[str, dict[str, Any]]:
    """(normal, abnormal, seed, distractors) of each set; seeds disjoint so no phantom is shared.
    A chest set also names its kind and synth_scale (so a head-CT set is never reused as one)."""
    specs = {
        "normal": {"normal": plan.normal, "abnormal": 0, "seed": plan.seed * 100 + 1, "distractors": False},
        "mixture": {
            "normal": plan.mixture_normal,
            "abnormal": plan.mixture_abnormal,
            "seed": plan.seed * 100 + 2,
            "distractors": False,
        },
        "calibration": {
            "normal": plan.calibration,
            "abnormal": 0,
            "seed": plan.seed * 100 + 3,
            "distractors": False,
        },
        "test": {
            "normal": plan.test_normal,
            "abnormal": plan.test_abnormal,
            "seed": plan.seed * 100 + 4,
            "distractors": plan.test_distractors,
        },
    }
    if plan.kind != "ct":
        specs = {k: {**v, "kind": plan.kind, "synth_scale": plan.synth_scale} for k, v in specs.items()}
    return specs


def _write_set(folder: str, spec: dict[str, Any], slab_samples: int) -> float:
    """One set (runs in a worker process); returns its seconds."""
    from training.synth.head import SynthOptions, write_dataset

    t0 = time.perf_counter()
    out = Path(folder)
    shutil.rmtree(out, ignore_errors=True)
    if spec.get("kind") == "cxr":
        from training.synth.cxr_dicom import write_cxr_dataset

        write_cxr_dataset(out, spec["normal"], spec["abnormal"], seed=spec["seed"],
                          lateral_fraction=0.4 if spec["distractors"] else 0.0,
                          synth_scale=spec["synth_scale"])
        return time.perf_counter() - t0
    write_dataset(
        out,
        normal=spec["normal"],
        abnormal=spec["abnormal"],
        seed=spec["seed"],
        options=SynthOptions(distractors=spec["distractors"], slab_samples=slab_samples),
    )
    return time.perf_counter() - t0


def make_data(out: Path, plan: Plan, workers: int = 2) -> dict[str, Path]:
    """Write (or reuse) the four sets; the mixture's labels are sealed away from training."""
    data, sealed = out / "data", out / "sealed"
    specs = _set_spec(plan)
    todo = []
    for name, spec in specs.items():
        want = {**spec, "slab_samples": plan.slab_samples}
        done = data / name / ".demo-set.json"
        if done.is_file() and json.loads(done.read_text()) == want:
            continue
        todo.append(name)
    reused = [n for n in SETS if n not in todo]
    if reused:
        say(f"  reusing {', '.join(reused)} (same plan; --fresh to redo)")
    if todo:
        n = sum(specs[k]["normal"] + specs[k]["abnormal"] for k in todo)
        say(f"  writing {n} studies ({', '.join(todo)}), {min(workers, len(todo))} processes ...")
        # biggest first, so two workers finish together
        order = sorted(
            todo,
            key=lambda k: (
                -(specs[k]["normal"] + specs[k]["abnormal"]) * (3 if specs[k]["distractors"] else 1)
            ),
        )
        with ProcessPoolExecutor(max_workers=max(1, min(workers, len(order)))) as pool:
            futs = {k: pool.submit(_write_set, str(data / k), specs[k], plan.slab_samples) for k in order}
            for k in order:
                secs = futs[k].result()
                s = specs[k]
                extra = (" with distractor series" if plan.kind == "ct" else " with lateral views"
                         ) if s["distractors"] else ""
                say(
                    f"    {k:<12} {s['normal']:>3} normal + {s['abnormal']:>3} abnormal{extra}"
                    f"  ({secs:.0f} s)"
                )
        for k in todo:
            if k == "mixture":  # M1 learns from an unlabeled mixture: its labels leave the data folder
                (sealed / k).mkdir(parents=True, exist_ok=True)
                for name in ("labels.csv", "truth.jsonl"):
                    shutil.move(str(data / k / name), str(sealed / k / name))
            (data / k / ".demo-set.json").write_text(
                json.dumps({**specs[k], "slab_samples": plan.slab_samples})
            )
    return {k: data / k for k in SETS}
