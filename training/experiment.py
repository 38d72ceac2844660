"""`training experiment`: the paper's brain-CT protocol (section 4.1, Table 3) on synthetic studies.

The paper trains M0 on 250 normal studies (S_train_normal), M1 on an *unlabelled* mixture of 250
normal and 250 abnormal studies (S_train_mixture), and tests on 33 + 33 (S_test), scoring each test
study with log p(normal|x) = log p(x|normal) - log p(x). This command runs that protocol end to end on
``training synth`` data, scaled to the machine, through the product's own code paths:

1. ``training.synth.head.write_dataset`` writes three sets with disjoint seeds under ``DIR/data``
   (``normal``: normals only; ``mixture``: half abnormal; ``test``: half abnormal, labelled). The sets
   are checked to share no study, patient or phantom. The mixture's ``labels.csv`` and
   ``truth.jsonl`` are moved to ``DIR/sealed/mixture`` *before anything is trained*, so M1 cannot
   see its labels even by accident: they are only used to report the mixture's composition.
2. ``training.data.volumes.volumes_from_dicom`` assembles every set (``triage.assemble.volume``, cached under
   ``DIR/cache/<set>``). The normal set is split by patient into M0's training part and a held-out
   calibration part (``--calibration-fraction``).
3. ``training.train.loop.train``: a *trunk* on M0's normals (``--steps``), then two branches from it with
   the same schedule and budget (``--branch-steps`` each, the preset's ``finetune_lr``): M0 goes on
   with the normals, M1 goes on with the unlabelled mixture. ``--m1-init scratch`` trains both from
   scratch for steps + branch-steps instead (the paper's independent training); by default that M1 is
   also trained after the main result, paired with the same M0 and reported beside it
   (``DIR/ablation-m1-scratch``).
4. The operating point is set like ``triage models create`` does (``triage.model.modelset.calibrate``,
   specificity 0.9 on the held-out normals, never on the test set); the model set is registered and
   promoted in ``DIR/models`` and the test set is scored with ``triage.model.score.Scorer``, the daemon's
   scorer. The same held-out normals calibrate the region score (``triage.model.voxelmap``: the most
   abnormal lesion-sized window of the log-ratio voxel map, windows fixed a priori, nothing fitted to
   a lesion kind), so global posterior, region score and likelihood alone are reported from one run
   with the same models (``auc_region``, ``region_localization`` against the lesion centroids of the
   test set's labels.csv when it has them); each test study's map goes to ``DIR/maps``.
   ``DIR/scores.jsonl`` is in the ``triage score --json`` format plus ``zero_fraction`` and
   ``volume`` (the .npz, relative to DIR).
5. ``training.evaluate.report.evaluate`` writes ``DIR/report`` (ROC, histograms, montages, report.json);
   ``DIR/experiment.json`` holds the summary, the timings and the exact command line.

Why a shared trunk: the metric is the difference of two log-likelihoods of ~5e5 nats each, and what it
must resolve is a few hundred nats. On a CPU budget both flows end far from convergence, so two flows
trained apart differ mostly in *how far* each got, subject by subject, not in what their data hold
(label-free pilot on the first synthetic run: across held-out normals the posterior's s.d. was
~850 nats; an M1 fine-tuned from a finished M0 scored the normals ~10,000 nats higher than M0 did
itself, because it had simply trained longer). Branching both from one trunk, with the same steps
and schedule after it, makes what they share cancel in the difference and leaves what the mixture
taught M1 beyond the normals: whatever the abnormal studies hold, named or not. The trunk sees only
M0's normals, so M0 is still a model of normal studies alone, and the likelihood-only comparison is
M0's. Nothing here refers to a lesion kind: the choice follows from the variance of a difference, and
was made on label-free pilots (the spread over held-out normals; the separation of held-out normals
from an unlabelled held-out mixture, which was too noisy at 30 + 40 studies to decide anything). The
full default run then measured, on its held-out normals, an s.d. of 256 nats with the trunk against 493
with an M1 from scratch (README, "The paper's experiment").

What is chosen here and what is not: the preset decides the model and its optimiser (batch size,
learning rate, warm-up); this command only picks dataset sizes and step counts, to fit the machine.
Nothing is tuned to the generator's lesion kinds or to the test AUC. Defaults (cpu-small, 320 normal /
320 mixture / 100 test studies, 20 % of the normals' patients held out for calibration, an 800-step
trunk and 1,200-step branches of batch 4, every training volume augmented by the preset's mirror and
shift, and the 2,000-step scratch M1 of the comparison) fit a 2-core machine in about 80 minutes (a
batch-4 step of cpu-small in bf16 + channels-last takes 0.6-0.9 s there; synthesis and assembly ~1 s a
study); without the comparison (``--no-compare-scratch``) the run of 2026-11-30 took 51 minutes while
other jobs shared the cores, region AUC 0.858 (docs/experiments.md). Why these sizes: the branches are
where M1 learns what the mixture adds (800 + 800 instead of 600 + 300 took the region AUC from 0.61 to
0.77); 1,200-step branches without augmentation memorized their training volumes (the memorization
figure of experiment.json), with it they did not; 64 calibration normals rather than 32 for the region
score's per-position statistics. ``--quick`` is a few-minute smoke run of the
same path.

Every set is drawn from the acquisitions hospitals send (``PROTOCOL_MIX``: gantry tilt in 40 % of the
studies, GE's two-stack 4/7 mm series in 15 %, 0.625 mm thin series in 10 %), so that what the real
series issue found (a 7.4 mm slice records the vertex by its phase; tilt is resampled) is part of
"normal" for both flows and the test set measures the protocols a site sees; ``--no-protocol-mix``
draws untilted 4-5 mm series only, as every run before 2026-11-30's fourth did.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.data.volumes import DicomVolumes, split_by_patient, volumes_from_dicom
from triage.ops.logs import get_logger

log = get_logger("experiment")

SETS = ("normal", "mixture", "test")
SEALED = "sealed"
LABEL_FILES = ("labels.csv", "truth.jsonl")
DONE = ".synth-done.json"
DEFAULT_SPECIFICITY = 0.9
# Plan fields that do not change what is trained (a rerun with other values still resumes).
_NOT_TRAINING = ("steps", "branch_steps", "workers", "bootstrap", "montage_k", "compare_scratch")


@dataclass(frozen=True)
class Plan:
    """Sizes, steps and seeds of one run; every field is recorded in experiment.json."""

    preset: str = "cpu-small"
    normal_train: int = 320  # normal studies; a calibration_fraction of their patients is held out
    mixture_train: int = 320  # half normal, half abnormal (rounded down), labels sealed away
    test: int = 100  # half normal, half abnormal (the paper's 33 + 33 gives CIs of +-0.13)
    steps: int = 800  # the trunk (M0's first stage, normals only); from scratch: steps + branch_steps
    seed: int = 0
    calibration_fraction: float = 0.2  # 64 of 320: the region score's per-position statistics
    distractors: bool = False
    slab_samples: int = 3
    workers: int = 2
    bootstrap: int = 1000
    montage_k: int = 16
    branch_steps: int = 1200  # M0 and M1 each go on this many steps from the trunk (see the docstring)
    m1_init: str = "trunk"  # "trunk": M0 and M1 branch from one trunk; "scratch": trained independently
    compare_scratch: bool = True  # with m1_init "trunk": also train M1 from scratch and report both
    precision: str | None = None  # the coupling nets' "fp32" | "bf16"; None: the preset's
    protocol_mix: bool = True  # every set drawn from PROTOCOL_MIX's acquisitions (tilt, two-stack, thin)
    augment: str | None = None  # "on" | "off": mirror/shift (training.train.augment); None: the preset's
    augment_trunk: bool = True  # False: augment M0's and M1's branches only (a finished trunk is kept)

    def synth_seed(self, which: str) -> int:
        """Disjoint per-set seeds: no subject can appear in two sets (write_dataset draws study i of
        seed s from SeedSequence([s, i]), so different s give unrelated subjects)."""
        return 1000 * self.seed + 1 + SETS.index(which)

    def counts(self, which: str) -> tuple[int, int]:
        """(normal, abnormal) studies of a set."""
        if which == "normal":
            return self.normal_train, 0
        n = self.mixture_train if which == "mixture" else self.test
        return n - n // 2, n // 2


# The acquisition protocols a hospital's head CTs arrive in (issue 11), for every set alike: gantry tilt
# (0-25 degrees is the routine range; half of the tilted stacks step along the table as real scanners
# do), GE's two-stack series (4 mm posterior fossa, 7.4 mm above: a coarse slice at the vertex, at
# whatever phase the head's height gives), and 0.625 mm thin series (at 256 px to keep synthesis
# affordable; the canonical grid is 128 px). Label-free: the fractions say nothing about lesions, they
# make the vertex and tilt variation of real protocols part of "normal" for both flows.
PROTOCOL_MIX: dict[str, Any] = {
    "tilt_fraction": 0.4, "tilt_range_deg": (5.0, 25.0), "tilt_shear_fraction": 0.5,
    "two_stack_fraction": 0.15, "thin_fraction": 0.1, "thin_matrix": 256}

QUICK = {"normal_train": 12, "mixture_train": 12, "test": 12, "steps": 40, "branch_steps": 20,
         "bootstrap": 200, "montage_k": 8,
         "calibration_fraction": 0.25}  # >= 3 held-out normals, the least the region score calibrates on


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, t0: float) -> float:
        dt = time.perf_counter() - t0
        self.seconds[key] = round(self.seconds.get(key, 0.0) + dt, 3)
        return dt


class ExperimentError(Exception):
    """The experiment cannot go on (a set without usable studies, overlapping sets); names what."""


# --------------------------------------------------------------------------------------------------
# stages


def synthesize(out: Path, plan: Plan) -> dict[str, Path]:
    """Write the three sets (skipping one already written with the same parameters) and seal the
    mixture's labels. Returns {set: folder}."""
    from training.synth import SynthOptions, write_dataset

    folders: dict[str, Path] = {}
    for which in SETS:
        folder = out / "data" / which
        n_norm, n_abn = plan.counts(which)
        mix = PROTOCOL_MIX if plan.protocol_mix else {}
        params = {"normal": n_norm, "abnormal": n_abn, "seed": plan.synth_seed(which),
                  "distractors": plan.distractors, "slab_samples": plan.slab_samples, "matrix": 256,
                  **({"protocol_mix": {k: list(v) if isinstance(v, tuple) else v for k, v in mix.items()}}
                     if mix else {})}
        done = folder / DONE
        if not (done.is_file() and json.loads(done.read_text()) == params):
            if folder.exists():
                shutil.rmtree(folder)
            shutil.rmtree(out / SEALED / which, ignore_errors=True)
            opts = SynthOptions(matrix=256, distractors=plan.distractors, slab_samples=plan.slab_samples,
                                **mix)
            write_dataset(folder, n_norm, n_abn, plan.synth_seed(which), opts)
            (folder / DONE).write_text(json.dumps(params))
            log.info("synth_done", set=which, normal=n_norm, abnormal=n_abn, seed=plan.synth_seed(which))
        folders[which] = folder
    seal_labels(folders["mixture"], out / SEALED / "mixture")
    return folders


def seal_labels(folder: Path, sealed: Path) -> None:
    """Move a set's labels out of its folder: what training reads from ``folder`` cannot hold them."""
    sealed.mkdir(parents=True, exist_ok=True)
    for name in LABEL_FILES:
        if (folder / name).exists():
            os.replace(folder / name, sealed / name)


def label_file(out: Path, which: str, name: str = "labels.csv") -> Path:
    """Where a set's labels.csv / truth.jsonl lives (the mixture's is sealed away)."""
    return out / SEALED / which / name if which == "mixture" else out / "data" / which / name


def check_disjoint(out: Path) -> dict[str, Any]:
    """No study UID, patient or phantom seed in two sets (truth.jsonl of each set)."""
    seen: dict[str, dict[str, set[Any]]] = {}
    for which in SETS:
        p = label_file(out, which, "truth.jsonl")
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        seen[which] = {
            "study": {r["study_uid"] for r in rows},
            "patient": {r["patient_id"] for r in rows},
            "phantom": {r["phantom_seed"] for r in rows},
        }
    overlaps = {}
    for i, a in enumerate(SETS):
        for b in SETS[i + 1:]:
            for kind in ("study", "patient", "phantom"):
                n = len(seen[a][kind] & seen[b][kind])
                if n:
                    overlaps[f"{a}/{b}/{kind}"] = n
    if overlaps:
        raise ExperimentError(f"synthetic sets overlap: {overlaps}")
    return {"disjoint": True, "checked": ["study_uid", "patient_id", "phantom_seed"]}


def load_sets(out: Path, folders: dict[str, Path], plan: Plan) -> dict[str, DicomVolumes]:
    """Assemble every set through the cache. The mixture is read without labels; the test set's labels
    are not needed to build volumes either (they are read only by the evaluation)."""
    sets: dict[str, DicomVolumes] = {}
    for which in SETS:
        vs = volumes_from_dicom(folders[which], out / "cache" / which, workers=plan.workers)
        if not len(vs):
            raise ExperimentError(
                f"set {which} ({folders[which]}): no usable volume; see {vs.meta['rejects_csv']}")
        sets[which] = vs
    return sets


def stages(plan: Plan, normal: DicomVolumes, mixture: DicomVolumes
           ) -> list[tuple[str, str, DicomVolumes, str | None, int]]:
    """(name, role, data, started from, steps) of each model to train, in order."""
    if plan.m1_init == "trunk":
        return [("trunk", "normal", normal, None, plan.steps),
                ("m0", "normal", normal, "trunk", plan.branch_steps),
                ("m1", "mixture", mixture, "trunk", plan.branch_steps)]
    total = plan.steps + plan.branch_steps
    return [("m0", "normal", normal, None, total), ("m1", "mixture", mixture, None, total)]


def train_models(out: Path, normal: DicomVolumes, mixture: DicomVolumes, plan: Plan,
                 timings: Timings) -> dict[str, Any]:
    """The models of :func:`stages`. A rerun with the same plan resumes from their checkpoints (or
    extends them with more ``steps``); another plan starts over, and so does a branch when the trunk it
    was started from has changed."""
    from training.train.loop import forget_stale_warm_start, train

    models = out / "work"
    same = {k: v for k, v in plan.__dict__.items() if k not in _NOT_TRAINING
            and not (k in _AUGMENT_KEYS and plan.augment is None)}  # as stamped before augmentation
    stamp = models / "plan.json"
    old = json.loads(stamp.read_text()) if stamp.is_file() else same
    if old != same and _trunk_identity(old) == _trunk_identity(same):
        for f in [*models.glob("m0.pt*"), *models.glob("m1.pt*"), *models.glob("m1-scratch.pt*")]:
            f.unlink()
        log.info("branches_restarted", reason="the plan changed for the branches only; the trunk is kept")
    elif old != same:
        shutil.rmtree(models)
        log.info("training_restarted", reason="the plan changed since the checkpoints were written")
    models.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(same, sort_keys=True))
    results = {}
    for name, role, data, start, steps in stages(plan, normal, mixture):
        init_from = None
        if start is not None:
            init_from = models / f"{start}.pt"
            forget_stale_warm_start(models / f"{name}.pt", init_from)
        t0 = time.perf_counter()
        aug = plan.augment if (name != "trunk" or plan.augment_trunk) else None
        res = train(data, plan.preset, models / f"{name}.pt", role=role, seed=plan.seed, steps=steps,
                    resume=True, init_from=init_from, progress=False, log_every=25, checkpoint_every=50,
                    precision=plan.precision, augment=aug)
        wall = timings.add(f"train_{name}", t0)
        s = res.summary()
        s["wall_seconds"] = round(wall, 3)
        s["init_from"] = start or "scratch"
        (models / f"{name}.train.json").write_text(json.dumps(res.summary(with_curve=True), indent=1) + "\n")
        results[name] = s
        log.info("model_trained", model=name, role=role, steps=res.steps, final_bpd=s["final_bpd"],
                 seconds=s["seconds"])
    return results


_AUGMENT_KEYS = ("augment", "augment_trunk")


def _trunk_identity(stamp: dict[str, Any]) -> dict[str, Any]:
    """What the trunk of a stamped plan depends on: every training key, with the augmentation the
    trunk itself got (none when only the branches were augmented)."""
    out = {k: v for k, v in stamp.items() if k not in _AUGMENT_KEYS}
    out["trunk_augment"] = stamp.get("augment") if stamp.get("augment_trunk", True) else None
    return out


def register_models(out: Path, calib: DicomVolumes, plan: Plan, trained: dict[str, Any]) -> Any:
    """Operating point on held-out normals (as ``triage models create`` sets it without labels), then
    create and promote the model set in ``DIR/models``."""
    import triage
    from triage.assemble.volume import PREPROCESSING_VERSION
    from triage.model.modelset import calibrate, region_calibration
    from triage.model.registry import Registry
    from triage.model.score import ModelPair, pick_device

    m0, m1 = out / "work" / "m0.pt", out / "work" / "m1.pt"
    pair = ModelPair.load(m0, m1, pick_device("auto"))
    posteriors, maps = {}, []
    for uid, vol in zip(calib.ids, calib.volumes, strict=True):
        lp0, lp1, dmap = pair.log_likelihood_maps(vol)  # the maps calibrate the region score too
        posteriors[uid] = lp0 - lp1
        maps.append(dmap.cpu().numpy())
    threshold, method, normals, details = calibrate(posteriors, None, DEFAULT_SPECIFICITY)
    reg = Registry(out / "models")
    region = region_calibration(pair, list(calib.volumes), threshold, normals, reg.root, maps=maps)
    ms = reg.create(
        m0, m1, preset=plan.preset, preprocessing_version=PREPROCESSING_VERSION, threshold=threshold,
        method=method, normal_scores=normals,
        provenance={"experiment": str(out), **trained,
                    "calibration": {"studies": len(posteriors), "held_out_normals_of": "normal set",
                                    **details}},
        software_version=getattr(triage, "__version__", "0+unknown"),
        trunk=out / "work" / "trunk.pt" if plan.m1_init == "trunk" else None,
        calibration_extra={"region": region} if region else None,
    )
    reg.promote(ms.version, reason="training experiment")
    return ms


def score_test(out: Path, test: DicomVolumes, timings: Timings) -> tuple[list[dict[str, Any]], float]:
    """Score the test set with the promoted model set (the daemon's Scorer); write scores.jsonl, and
    each study's region map under ``DIR/maps`` (for the evaluation's montages)."""
    from triage.assemble.volume import load_volume
    from triage.model.registry import Registry
    from triage.model.score import Scorer, VolumeInput

    scorer = Scorer.from_registry(Registry(out / "models"), device="auto", flag_policy="either")
    rows: list[dict[str, Any]] = []
    (out / "maps").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for it, vol in zip(test.items, test.volumes, strict=True):
        meta = load_volume(it.path).metadata()  # the grid: region centre in patient mm
        res = scorer.score([VolumeInput(it.study_uid, it.series_uid, vol, meta)])[0]
        row = res.to_json()
        row["zero_fraction"] = float(np.mean(vol == 0))
        row["volume"] = os.path.relpath(it.path, out)
        if res.region_map is not None:
            path = out / "maps" / f"{it.study_uid}.npz"
            np.savez_compressed(path, zmap=np.asarray(res.region_map["zmap"], np.float32),
                                canonical_index_zyx=np.asarray(res.region_map["canonical_index_zyx"]))
            row["region_map"] = os.path.relpath(path, out)
        rows.append(row)
    dt = timings.add("score_test", t0)
    for r in test.rejects:
        if r.kind == "study":
            rows.append({"study_uid": r.id, "rejected": True, "reason": r.reason})
    with (out / "scores.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, allow_nan=False) + "\n")
    return rows, dt / max(1, len(test))


def spread(posteriors: Sequence[float]) -> dict[str, Any]:
    """Mean and s.d. of log p(normal|x) over held-out normals: a label-free view of the metric's noise
    (every one of them is normal, so all of their spread is the two models disagreeing)."""
    post = np.asarray(posteriors, dtype=float)
    return {"n": int(post.size), "mean": round(float(post.mean()), 3),
            "sd": round(float(post.std(ddof=1)), 3) if post.size > 1 else None}


def ablation_scratch(out: Path, mixture: DicomVolumes, test: DicomVolumes, calib: DicomVolumes,
                     labels: Any, plan: Plan, timings: Timings) -> dict[str, Any]:
    """The paper's independent training, in the same run: M1 from scratch on the same mixture, for M0's
    whole budget (trunk + branch steps) and with the same seed, paired with the same M0, scoring the same
    test set. Its scores and report go
    to ``DIR/ablation-m1-scratch``; the AUCs are returned for experiment.json."""
    from training.evaluate.report import evaluate
    from training.train.loop import train
    from triage.model.score import ModelPair, pick_device

    where = out / "ablation-m1-scratch"
    t0 = time.perf_counter()
    res = train(mixture, plan.preset, out / "work" / "m1-scratch.pt", role="mixture", seed=plan.seed,
                steps=plan.steps + plan.branch_steps, resume=True, progress=False, log_every=25,
                checkpoint_every=50, precision=plan.precision, augment=plan.augment)
    timings.add("train_m1_scratch", t0)
    pair = ModelPair.load(out / "work" / "m0.pt", out / "work" / "m1-scratch.pt", pick_device("auto"))
    rows = []
    for it, vol in zip(test.items, test.volumes, strict=True):
        lp0, lp1 = pair.log_likelihoods(vol)
        rows.append({"study_uid": it.study_uid, "series_uid": it.series_uid, "log_p_normal_model": lp0,
                     "log_p_mixture_model": lp1, "log_posterior": lp0 - lp1,
                     "zero_fraction": float(np.mean(vol == 0)), "volume": os.path.relpath(it.path, out)})
    where.mkdir(parents=True, exist_ok=True)
    with (where / "scores.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, allow_nan=False) + "\n")
    report = evaluate(rows, labels, where / "report", k=plan.montage_k, n_boot=plan.bootstrap,
                      seed=plan.seed, base_dir=out, title=f"synthetic BCT, {plan.preset}, M1 from scratch")
    summary = _summary(report)
    return {"m1": {**res.summary(), "init_from": "scratch"}, "auc_posterior": summary["auc_posterior"],
            "posterior_on_held_out_normals": spread(
                [lp0 - lp1 for lp0, lp1 in map(pair.log_likelihoods, calib.volumes)]),
            "outputs": os.path.relpath(where, out)}


# --------------------------------------------------------------------------------------------------
# driver


def run(out: Path, plan: Plan, command: str) -> dict[str, Any]:
    """The whole experiment; returns (and writes) the experiment.json content."""
    from training.evaluate.maps import load_centroids
    from training.evaluate.report import evaluate, load_labels

    out.mkdir(parents=True, exist_ok=True)
    timings = Timings()
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    folders = synthesize(out, plan)
    timings.add("synth", t0)
    disjoint = check_disjoint(out)

    t0 = time.perf_counter()
    sets = load_sets(out, folders, plan)
    n_vol = sum(len(v) for v in sets.values())
    assemble_s = timings.add("assemble", t0)

    normal = sets["normal"]
    m0_part, calib_part = split_by_patient(
        normal.items, (1.0 - plan.calibration_fraction, plan.calibration_fraction), seed=plan.seed)
    if not m0_part or not calib_part:
        raise ExperimentError(
            f"normal set of {len(normal)} studies split into {len(m0_part)} for M0 and {len(calib_part)} for "
            f"calibration (--calibration-fraction {plan.calibration_fraction}): use more normal studies")
    m0_data = normal.subset(m0_part, part="m0-train")
    calib = normal.subset(calib_part, part="calibration")

    trained = train_models(out, m0_data, sets["mixture"], plan, timings)
    t0 = time.perf_counter()
    ms = register_models(out, calib, plan, trained)
    held_out = spread(ms.manifest["calibration"]["normal_scores"])
    timings.add("calibrate", t0)
    t0 = time.perf_counter()
    memo = memorization(out, m0_data, calib)
    timings.add("memorization", t0)
    rows, s_per_volume = score_test(out, sets["test"], timings)

    t0 = time.perf_counter()
    labels = load_labels(label_file(out, "test"))
    report = evaluate(rows, labels, out / "report", k=plan.montage_k, n_boot=plan.bootstrap, seed=plan.seed,
                      base_dir=out, title=f"synthetic BCT, {plan.preset}",
                      centroids=load_centroids(label_file(out, "test")))
    timings.add("evaluate", t0)
    timings.seconds["total"] = round(time.perf_counter() - t_all, 3)

    sealed = label_file(out, "mixture")
    mixture_truth = load_labels(sealed) if sealed.is_file() else {}
    summary = _summary(report)
    result: dict[str, Any] = {
        "command": command,
        "plan": plan.__dict__,
        "sets": {
            which: {"folder": os.path.relpath(folders[which], out), "seed": plan.synth_seed(which),
                    "studies": sum(plan.counts(which)), "normal": plan.counts(which)[0],
                    "abnormal": plan.counts(which)[1], "volumes": len(sets[which]),
                    "rejected": sets[which].meta["rejected_studies"],
                    "built_now": sets[which].meta["built"], "from_cache": sets[which].meta["from_cache"]}
            for which in SETS
        },
        "m0_train_volumes": len(m0_data),
        "calibration_volumes": len(calib),
        "mixture_labels": {
            "sealed_at": os.path.relpath(label_file(out, "mixture"), out),
            "read_by_training": False,
            "abnormal_fraction": (sum(1 for v in mixture_truth.values() if v[0] == "abnormal")
                                  / len(mixture_truth)) if mixture_truth else None,
        },
        "disjoint": disjoint,
        "model_set": {"version": ms.version, "threshold": ms.manifest["operating_point"]["threshold"],
                      "method": ms.manifest["operating_point"]["method"],
                      "device_uid": ms.manifest["device_uid"]},
        "training": trained,
        **summary,
        "posterior_on_held_out_normals": held_out,
        "memorization": memo,
        "ablation_m1_scratch": None,
        "seconds_per_volume": {"score": round(s_per_volume, 4),
                               "assemble": round(assemble_s / max(1, n_vol), 4)},
        "timings_s": timings.seconds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), **_torch_info()},
        "outputs": {"scores": "scores.jsonl", "report": "report/report.json", "models": "models"},
        "notes": [
            "dataset sizes and step counts were chosen to fit the machine; the preset decides the model",
            "nothing was tuned on the test set or on the generator's lesion kinds",
            "the mixture's labels were moved out of its folder before training (see mixture_labels)",
            f"operating point: {ms.manifest['operating_point']['method']} on {len(calib)} held-out normals",
        ],
    }
    (out / "experiment.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    if plan.m1_init == "trunk" and plan.compare_scratch:
        # written again with the comparison; the main result is on disk in case this part is cut short
        result["ablation_m1_scratch"] = ablation_scratch(
            out, sets["mixture"], sets["test"], calib, labels, plan, timings)
        result["timings_s"]["total"] = round(time.perf_counter() - t_all, 3)
        (out / "experiment.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    return result


def memorization(out: Path, m0_data: DicomVolumes, calib: DicomVolumes, k: int = 64) -> dict[str, Any]:
    """How much better the models know their own training normals than new normals of the same kind:
    mean log p(x|M0) and posterior of (up to ``k``, evenly spaced) M0 training normals against the
    held-out calibration normals. Label-free; a gap far above the held-out spread says the models
    memorized their volumes (what :mod:`training.train.augment` is against)."""
    import torch

    from triage.model.score import ModelPair, pick_device

    pair = ModelPair.load(out / "work" / "m0.pt", out / "work" / "m1.pt", pick_device("auto"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    def stats(vols: Sequence[Any]) -> dict[str, float]:
        lp = np.array([pair.log_likelihoods(v) for v in vols], dtype=float)  # (n, 2)
        post = lp[:, 0] - lp[:, 1]
        return {"n": len(vols), "log_p_m0_mean": float(lp[:, 0].mean()),
                "posterior_mean": float(post.mean()), "posterior_sd": float(post.std(ddof=1))}

    step = max(1, len(m0_data) // k)
    train_part = stats(list(m0_data.volumes)[::step][:k])
    held = stats(list(calib.volumes))
    return {"m0_training_normals": train_part, "held_out_normals": held,
            "log_p_m0_gap": train_part["log_p_m0_mean"] - held["log_p_m0_mean"],
            "posterior_gap": train_part["posterior_mean"] - held["posterior_mean"]}


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    def curve(c: dict[str, Any]) -> dict[str, Any]:
        return {"auc": c.get("auc"), "auc_ci95": c.get("auc_ci95"), "n_normal": c.get("n_normal"),
                "n_abnormal": c.get("n_abnormal")}

    out: dict[str, Any] = {}
    for metric, key in (("posterior", "auc_posterior"), ("likelihood", "auc_likelihood"),
                        ("region", "auc_region")):
        m = report["metrics"].get(metric)
        if m is None:
            out[key] = None  # no region score: a model set without region calibration
            continue
        out[key] = {"overall": curve(m["overall"]), "lesions": {k: curve(v) for k, v in m["lesions"].items()}}
    region = report.get("region") or {}
    out["region_localization"] = region.get("localization")
    out["region_operating_point_on_test"] = region.get("operating_point")
    out["youden"] = report.get("youden")
    out["operating_point_on_test"] = report.get("operating_point")
    out["n_test"] = {"normal": report["n_normal"], "abnormal": report["n_abnormal"],
                     "rejected": report["n_rejected"]}
    return out


def _torch_info() -> dict[str, Any]:
    import torch

    return {"torch": str(torch.__version__), "torch_threads": torch.get_num_threads()}


def _fmt_auc(c: dict[str, Any]) -> str:
    if c.get("auc") is None:
        return "undefined"
    lo, hi = c["auc_ci95"] or (math.nan, math.nan)
    return f"{c['auc']:.3f} [{lo:.3f}, {hi:.3f}]"


def print_summary(res: dict[str, Any], file: Any = None) -> None:
    f = file or sys.stdout
    post, lik = res["auc_posterior"], res["auc_likelihood"]
    print(f"posterior AUC  log p(normal|x): {_fmt_auc(post['overall'])}", file=f)
    for les, c in post["lesions"].items():
        print(f"  {les:<12} {_fmt_auc(c)}  (n={c['n_abnormal']})", file=f)
    reg = res.get("auc_region")
    if reg:
        print(f"region AUC     most abnormal window of the log-ratio map: {_fmt_auc(reg['overall'])}", file=f)
        for les, c in reg["lesions"].items():
            print(f"  {les:<12} {_fmt_auc(c)}  (n={c['n_abnormal']})", file=f)
        loc = res.get("region_localization") or {}
        if loc.get("n"):
            print(f"region centre to lesion centroid: median {loc['median_mm']:.1f} mm, "
                  f"{100 * loc['within_30mm']:.0f}% within 30 mm (n={loc['n']})", file=f)
    abl = res.get("ablation_m1_scratch")
    if abl:
        print(f"posterior AUC, M1 from scratch (the paper's independent training): "
              f"{_fmt_auc(abl['auc_posterior']['overall'])}", file=f)
    print(f"likelihood AUC log p(x|normal): {_fmt_auc(lik['overall'])}", file=f)
    for les, c in lik["lesions"].items():
        print(f"  {les:<12} {_fmt_auc(c)}  (n={c['n_abnormal']})", file=f)
    for name in res["training"]:
        t = res["training"][name]
        print(f"{name}: {t['volumes']} volumes, {t['steps']} steps from {t.get('init_from', 'scratch')}, "
              f"{t['seconds']:.0f} s, "
              f"final {t['final_bpd']:.4f} bits/dim", file=f)
    spv = res["seconds_per_volume"]
    print(f"seconds per volume: scoring {spv['score']:.3f} (M0+M1), assembly {spv['assemble']:.3f}", file=f)
    print(f"total {res['timings_s']['total']:.0f} s; wrote experiment.json, scores.jsonl, report/", file=f)


def _parser() -> argparse.ArgumentParser:
    d = Plan()
    p = argparse.ArgumentParser(prog="training experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="experiment folder (created; reruns resume)")
    p.add_argument("--preset", default=d.preset, help=f"model preset (default {d.preset})")
    p.add_argument("--normal-train", type=int,
                   help=f"normal studies for M0 + calibration (default {d.normal_train})")
    p.add_argument("--mixture-train", type=int,
                   help=f"mixture studies for M1, half abnormal (default {d.mixture_train})")
    p.add_argument("--test", type=int, help=f"test studies, half abnormal (default {d.test})")
    p.add_argument("--steps", type=int, help=f"trunk steps on the normals (default {d.steps})")
    p.add_argument("--branch-steps", type=int,
                   help=f"steps of M0 and of M1 from the trunk (default {d.branch_steps})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--precision", choices=("fp32", "bf16"),
                   help="the coupling nets' compute type for every model trained (default: the preset's)")
    p.add_argument("--m1-init", choices=("trunk", "scratch"), default=d.m1_init,
                   help="M0 and M1 branch from one trunk trained on normals (default; see the module "
                        "docstring), or both from scratch")
    p.add_argument("--no-compare-scratch", dest="compare_scratch", action="store_false",
                   help="skip the same-run comparison with an M1 trained from scratch")
    p.add_argument("--calibration-fraction", type=float,
                   help="share of the normal set's patients held out to set the operating point and "
                        f"calibrate the region score (default {d.calibration_fraction}; "
                        f"{QUICK['calibration_fraction']} with --quick)")
    p.add_argument("--distractors", action="store_true",
                   help="write localizer/bone/thin/reformat/dose series too (exercises series selection; "
                        "~3x slower synthesis)")
    p.add_argument("--protocol-mix", action=argparse.BooleanOptionalAction, default=d.protocol_mix,
                   help="draw every set from the acquisitions hospitals send (gantry tilt, two-stack "
                        "4/7 mm series, 0.625 mm thin series; PROTOCOL_MIX; the default), or "
                        "(--no-protocol-mix) from untilted 4-5 mm series only, as before 2026-11-30")
    p.add_argument("--augment", choices=("on", "off"),
                   help="mirror left-right and shift in-plane every training volume, label-free "
                        "(training/train/augment.py: against memorizing a few hundred volumes; "
                        "default: the preset's augment_* keys)")
    p.add_argument("--augment-branches-only", dest="augment_trunk", action="store_false",
                   help="with --augment: augment M0's and M1's branches only, keeping a trunk already "
                        "trained by this folder's plan (an ablation of augmentation at the same trunk)")
    p.add_argument("--slab-samples", type=int, default=d.slab_samples)
    p.add_argument("--workers", type=int,
                   help=f"processes writing and decoding DICOM (default {d.workers}, or the preset's)")
    p.add_argument("--bootstrap", type=int, help=f"bootstrap resamples for AUC CIs (default {d.bootstrap})")
    p.add_argument("--quick", action="store_true",
                   help="a few-minute smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    return p


def preset_recipe(preset: str) -> dict[str, int]:
    """The experiment sizes a preset names (``experiment_*`` keys of presets.toml), for machines whose
    speed differs from the CPU defaults' by orders of magnitude (``paper-bct`` on one GPU)."""
    from training.presets import preset as preset_keys

    try:
        keys = preset_keys(preset)
    except KeyError:
        return {}
    return {k.removeprefix("experiment_"): int(v) for k, v in keys.items()
            if k.startswith("experiment_") and k.removeprefix("experiment_") in _RECIPE_KEYS}


_RECIPE_KEYS = ("normal_train", "mixture_train", "test", "steps", "branch_steps", "workers")


def plan_from_args(a: argparse.Namespace) -> Plan:
    base = {**Plan().__dict__, **({} if a.quick else preset_recipe(a.preset)), **(QUICK if a.quick else {})}
    for key in ("normal_train", "mixture_train", "test", "steps", "branch_steps", "bootstrap",
                "calibration_fraction"):
        v = getattr(a, key)
        if v is not None:
            base[key] = v
    base.update(preset=a.preset, seed=a.seed, m1_init=a.m1_init, compare_scratch=a.compare_scratch,
                distractors=a.distractors, slab_samples=a.slab_samples, precision=a.precision,
                augment=a.augment, augment_trunk=a.augment_trunk,
                protocol_mix=a.protocol_mix)
    if a.workers is not None:
        base["workers"] = a.workers
    elif base["workers"] <= 0:  # the recipe's 0: every core of this machine
        base["workers"] = os.cpu_count() or 1
    return Plan(**base)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if ("--kind" in args and args[args.index("--kind") + 1 :][:1] == ["cxr"]) or "--kind=cxr" in args:
        from training.experiment_cxr import main as cxr_main  # the chest-radiograph protocol

        return cxr_main(args)
    args_list = list(sys.argv[1:] if argv is None else argv)
    a = _parser().parse_args(args_list)
    plan = plan_from_args(a)
    problems = [f"--{k.replace('_', '-')} must be >= {lo}" for k, lo in
                (("normal_train", 2), ("mixture_train", 2), ("test", 2), ("steps", 1), ("branch_steps", 1))
                if getattr(plan, k) < lo]
    if not 0.0 < plan.calibration_fraction < 1.0:
        problems.append("--calibration-fraction must be in (0, 1)")
    if problems:
        _parser().error("; ".join(problems))
    from training.errors import TrainingError
    from triage.ops.logs import configure

    configure(level=os.environ.get("GLOWTRIAGE_LOG_LEVEL", "info"), stream=sys.stderr)
    command = shlex.join(["training", "experiment", *args_list])
    try:
        res = run(a.out, plan, command)
    except (ExperimentError, TrainingError) as exc:
        print(f"training experiment: error: {exc}", file=sys.stderr)
        return 1
    print_summary(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
