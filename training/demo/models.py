"""Step 2 and 3: M0 and M1 trained from a shared trunk, then the model set calibrated and promoted.

Each model is reused when the plan, its data and the trunk it started from are unchanged, and the model
set when the current one holds these very models calibrated on the same folder.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from training.demo.plan import MIN_REGION_NORMALS, DemoError, Plan, say


def _digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def train_models(out: Path, sets: dict[str, Path], plan: Plan) -> tuple[Path, Path, dict[str, Any]]:
    """A trunk on the normals, then M0 (normals) and M1 (unlabeled mixture) branching from it with the
    same budget, as ``training experiment`` does (its docstring says why). Each model is reused when
    the plan, its data and the trunk it started from are unchanged."""
    from training.train.loop import forget_stale_warm_start, train, weights_digest

    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    info: dict[str, Any] = {}
    branch = max(1, plan.steps // 2)
    stages = (
        ("trunk", "normal", None, plan.steps),
        ("m0", "normal", "trunk", branch),
        ("m1", "mixture", "trunk", branch),
    )
    vols_of: dict[str, Any] = {}
    for name, role, start, steps in stages:
        t0 = time.perf_counter()
        if role not in vols_of:
            vols_of[role] = _volumes(sets[role], cache / role, plan.kind, role)
        vols = vols_of[role]
        assemble_s = time.perf_counter() - t0
        if not len(vols):
            why = f"see {cache / role / 'rejects.csv'}" if plan.kind == "ct" else "; ".join(vols.skipped[:3])
            raise DemoError(f"{sets[role]}: no usable study ({why})")
        path = models / f"{name}.pt"
        init_from = models / f"{start}.pt" if start else None
        want = {
            "preset": plan.preset,
            "steps": steps,
            "seed": plan.seed,
            "role": role,
            "ids": _digest(vols.ids),
            "init_from": weights_digest(init_from) if init_from else None,
        }
        stamp = models / f"{name}.json"
        label = f"{name.upper() if start else name} ({role}{', from the trunk' if start else ''})"
        if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("want") == want:
            prev = json.loads(stamp.read_text())
            say(
                f"  {label}: reusing {path.relative_to(out)} "
                f"({prev['final_bpd']:.3f} bits/dim after {steps} steps)"
            )
            info[name] = prev
            continue
        if init_from is not None:
            forget_stale_warm_start(path, init_from)
        say(
            f"  {label}: {len(vols)} volumes (assembled in {assemble_s:.0f} s), "
            f"{steps} steps of {plan.preset} ..."
        )
        # tqdm draws a bar on a terminal; elsewhere (CI, a pipe) a line every tenth of the run
        hook = None if sys.stderr.isatty() else _progress_lines(name, steps)
        res = train(
            vols,
            plan.preset,
            path,
            role=role,
            seed=plan.seed,
            steps=steps,
            resume=True,
            init_from=init_from,
            progress=True,
            checkpoint_every=max(10, steps // 4),
            hook=hook,
        )
        rec = {
            "want": want,
            "final_bpd": res.final_bpd,
            "seconds": round(res.seconds, 1),
            "volumes": len(vols),
        }
        stamp.write_text(json.dumps(rec))
        info[name] = rec
        say(f"    done in {res.seconds:.0f} s: {res.final_bpd:.3f} bits/dim (mean of the last steps)")
    return models / "m0.pt", models / "m1.pt", info


def _volumes(folder: Path, cache: Path, kind: str, role: str) -> Any:
    """The set's canonical images: head CTs through the volume cache, chest radiographs assembled
    directly (a 512x512 image takes ~0.1 s, no cache needed) by :mod:`triage.assemble.radiograph`."""
    if kind == "cxr":
        from training.data.images import radiographs_from_folder
        from training.data.sources import as_volume_set

        return as_volume_set(radiographs_from_folder(folder), role)
    from training.data.volumes import volumes_from_dicom

    return volumes_from_dicom(folder, cache, workers=2)


def _progress_lines(name: str, total: int) -> Callable[..., None]:
    """A training hook that only reports progress (it is called before each step, and reads nothing)."""
    t0 = time.perf_counter()
    every = max(1, total // 10)

    def hook(step: int, *_: Any) -> None:
        if step and step % every == 0:
            el = time.perf_counter() - t0
            say(f"    {name}: step {step}/{total}, {el:.0f} s, ~{el / step * (total - step):.0f} s to go")

    return hook


def install_model_set(cfg: Any, m0: Path, m1: Path, calibration: Path, plan: Plan) -> Any:
    """create_model_set on the calibration normals (specificity rule; with >= 3 of them also the region
    score's calibration) and promote it as the current set of the plan's kind; reused when that current
    set holds these very models calibrated on this folder (and, where the plan allows one and the kind
    has one, a region calibration)."""
    from triage.model.modelset import create_model_set
    from triage.model.registry import Registry, RegistryError, sha256_file

    reg = Registry(cfg.models_dir)
    try:
        cur = reg.current(plan.kind)
    except RegistryError:  # a damaged current set is not reused; a new one is promoted over it
        cur = None
    want_method = f"specificity={plan.specificity:g}"
    if (
        cur is not None
        and cur.manifest["m0_sha256"] == sha256_file(m0)
        and cur.manifest["m1_sha256"] == sha256_file(m1)
        and cur.manifest["operating_point"]["method"] == want_method
        and cur.manifest["provenance"]["calibration"]["data"] == str(calibration)
        # a set made before the region score existed (head CT, or chest before 2026-11-30) is redone,
        # so the demo shows it
        and (plan.calibration < MIN_REGION_NORMALS or "region" in cur.manifest["calibration"])
    ):
        say(f"  reusing model set {cur.version}")
        return cur
    s = create_model_set(
        cfg, reg, m0, m1, calibration, specificity=plan.specificity, trunk=m0.with_name("trunk.pt")
    )
    reg.promote(s.version, reason="training.demo")
    return s
