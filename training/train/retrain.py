"""The nightly M1 retrain job: archive -> new M1 -> gate -> recalibrate -> register -> promote.

One run retrains one *kind* of model set (``--kind ct``: head CT, ``--kind cxr``: chest radiograph;
:mod:`triage.model.registry` keeps one current set per kind). Each kind is its own loop: its archive is
the studies of that kind the daemon assembled (a head CT never trains a chest M1), its gate runs on its
own set's reference normals, and promotion or rollback moves only that kind's pointer. Without
``--kind`` the entry point retrains every kind with a current set, one after the other; the scheduler
starts one process per kind, so a crash or timeout of one kind costs that kind's night only.

``python -m training.train.retrain --config FILE`` is the job's entry point;
:mod:`triage.ops.schedule` starts it as
a child process at a lower CPU priority (``[retrain] nice``), so a training run never takes the
daemon's GIL, memory or scheduling priority from scoring. It lives on the training side of the line
(``triage`` never imports ``training``): the daemon only starts this process, so it never loads the
training code. The history it writes is :mod:`triage.ops.history`, which the scheduler reads.

What one run does, and why:

1. **Gather.** The assembled volumes of the store (``<root>/volumes/<study>/<series>-g<gen>.npz``)
   of the run's kind (a radiograph's file says ``grid.kind = "cxr"``, see
   :func:`triage.assemble.radiograph.load_assembled`) whose file is younger than ``window_days``.
   One volume per *patient* (the newest study): follow-up scans of one patient would otherwise weigh
   that patient several times and, split across the training and held-out sets, leak. The patient is
   read from the PatientID (+ issuer) of one spooled instance of the series and reduced to
   :func:`triage.assemble.patient.patient_key` in memory (the key training's ``split_by_patient``
   uses too); it is never logged or written.
   A volume whose instances are gone counts as its own patient.
2. **Hold out** ``holdout_fraction`` of the patients, chosen by their hash: the same patients every
   night, so no retrain ever trains on a patient that another night's gate judged with.
3. **Train** M1 (role ``mixture``) on the rest, started from the current set's trunk (``init_from``,
   the default; its M0 when it has none), M0, M1 or from scratch, into
   ``<models>/.retrain-<run>/m1.pt``; nothing under the registry changes while it trains.
4. **Gate**, on frozen inputs and with dequantization noise off:
   - NLL: the new M1's mean bits/dim on the held-out volumes may exceed the current M1's by at most
     ``gate_nll_margin_bpd`` (the current M1 may have seen those volumes on an earlier night, so
     this errs towards keeping it);
   - score shift: on the reference normal studies the model set keeps (``triage.model.modelset`` stores
     their volumes), the median of log p(normal|x) with the new M1 may move by at most
     ``gate_score_shift_sd`` standard deviations of their current scores. A flood of abnormal
     studies in the archive, a scanner change or a broken run shows up here before a patient does.
5. **Recalibrate** the threshold on those normals so the new set keeps the specificity the current
   threshold has on them (the labels that set a Youden cut-off are not available at night).
6. **Register** a new model set (same M0, new M1, provenance with the window, the counts and the gate
   numbers) and **promote** it (atomic symlink switch, reason ``nightly retrain``); else the current
   set stays and the reason is recorded.

Every run ends with one line in ``<models>/retrain.jsonl`` (``outcome``: ``promoted``, ``rejected``
(gate failed), ``skipped`` (nothing to do: too few volumes, no current set, another run) or
``failed`` (an error, a crash or a timeout)). A crash at any point leaves the current set serving: the
registry is only touched by ``Registry.create`` (a hidden folder renamed into place) and
``Registry.promote`` (one rename), after the gate.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triage import __version__
from triage.assemble.patient import patient_key, patient_key_of_file
from triage.assemble.radiograph import RADIOGRAPH_PREPROCESSING_VERSION, load_assembled
from triage.assemble.volume import PREPROCESSING_VERSION, VolumeError
from triage.config import Config, load_or_exit
from triage.model.calibrate import threshold_at_specificity
from triage.model.glow import Glow, fit_to_shape
from triage.model.modelset import load_reference_volumes, region_calibration
from triage.model.registry import DEFAULT_KIND, KINDS, ModelSet, Registry, RegistryError, volume_kind
from triage.model.score import ModelPair, pick_device
from triage.ops.history import RESULT, WORKDIR_PREFIX, append_history, new_workdir
from triage.ops.logs import get_logger
from triage.store.db import Store

LOCK = ".retrain.lock"
STATE = "state.json"
PROMOTE_REASON = "nightly retrain"
# what the daemon's assembly writes today for each kind; older files are not comparable (other pixels)
PREPROCESSING = {"ct": PREPROCESSING_VERSION, "cxr": RADIOGRAPH_PREPROCESSING_VERSION}
KIND_NAMES = {"ct": "head CT", "cxr": "chest radiograph"}

log = get_logger("retrain")


class RetrainSkipped(Exception):
    """Nothing to retrain tonight (not an error): the message says why."""


# ---------------------------------------------------------------------------------------- gathering


@dataclass
class Gathered:
    """The deduplicated window, split by patient."""

    train: list[np.ndarray] = field(default_factory=list)
    train_ids: list[str] = field(default_factory=list)
    holdout: list[np.ndarray] = field(default_factory=list)
    holdout_ids: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.train) + len(self.holdout)


@dataclass(frozen=True)
class _Candidate:
    study_uid: str
    series_uid: str
    path: Path
    mtime: float


def file_kind(path: Path) -> str:
    """The kind of an assembled volume file from its metadata alone (not its pixels): ``cxr`` when the
    radiograph assembly wrote it, else ``ct`` (an unreadable file is left to the loader to report)."""
    with contextlib.suppress(Exception), np.load(path, allow_pickle=False) as npz:
        if json.loads(str(npz["meta"])).get("grid", {}).get("kind") == "cxr":
            return "cxr"
    return DEFAULT_KIND


def _candidates(cfg: Config, store: Store, now: float, kind: str = DEFAULT_KIND
                ) -> tuple[list[_Candidate], int]:
    """One volume file per study of ``kind`` inside the window (the assembled one, else the newest),
    and how many studies of that kind had only older ones."""
    root = cfg.storage_root / "volumes"
    cutoff = now - cfg.settings.retrain.window_days * 86400.0
    out: list[_Candidate] = []
    outside = 0
    if not root.is_dir():
        return out, outside
    for study_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [f for f in study_dir.glob("*.npz") if not f.name.startswith(".")]
        if not files:
            continue
        chosen: Path | None = None
        with contextlib.suppress(Exception):  # a study the store does not know: use the files
            row = store.assembly(study_dir.name)
            if row is not None and Path(row.volume_path).is_file():
                chosen = Path(row.volume_path)
        if chosen is None:
            chosen = max(files, key=lambda f: (f.stat().st_mtime, f.name))
        if file_kind(chosen) != kind:
            continue  # another kind's archive
        mtime = chosen.stat().st_mtime
        if mtime < cutoff:
            outside += 1
            continue
        series_uid = chosen.stem.rsplit("-g", 1)[0]
        out.append(_Candidate(study_dir.name, series_uid, chosen, mtime))
    return out, outside


def patient_of(store: Store, series_uid: str, study_uid: str) -> tuple[str, bool]:
    """(:func:`~triage.assemble.patient.patient_key` of issuer + PatientID, True) from one spooled
    instance, the same key training's split uses; (the study's key, False) when no instance can tell.
    The ID itself never leaves :mod:`triage.assemble.patient`."""
    with contextlib.suppress(Exception):
        for inst in store.series_instances(series_uid)[:3]:
            key = patient_key_of_file(inst.path)  # None: unreadable or gone (retention), or no PatientID
            if key is not None:
                return key, True
    return patient_key("", study_uid=study_uid), False


def holdout_unit(patient_key: str) -> float:
    """A patient's fixed place in [0, 1): held out when below ``holdout_fraction``."""
    h = hashlib.sha256(b"holdout\0" + patient_key.encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def gather(cfg: Config, now: float | None = None, kind: str = DEFAULT_KIND) -> Gathered:
    """The window's volumes of ``kind``, one per patient, split into training and held-out sets.

    A patient with a head CT and a chest radiograph counts once in each kind's archive; the hold-out
    is by patient, so such a patient is held out (or not) in both."""
    rs = cfg.settings.retrain
    now = time.time() if now is None else now
    store = Store(cfg.storage_root)
    try:
        cands, outside = _candidates(cfg, store, now, kind)
        newest: dict[str, tuple[_Candidate, float]] = {}
        no_patient = 0
        for c in cands:
            key, known = patient_of(store, c.series_uid, c.study_uid)
            no_patient += 0 if known else 1
            prev = newest.get(key)
            if prev is None or (c.mtime, c.study_uid) > (prev[0].mtime, prev[0].study_uid):
                newest[key] = (c, holdout_unit(key))
    finally:
        store.close()
    g = Gathered()
    kept = sorted(newest.values(), key=lambda cu: cu[0].study_uid)
    unreadable = stale = 0
    loaded: list[tuple[_Candidate, float, np.ndarray]] = []
    for c, u in kept:
        try:
            vol = load_assembled(c.path)
        except VolumeError as exc:
            unreadable += 1
            log.warning("retrain_volume_skipped", study_uid=c.study_uid, path=str(c.path), reason=str(exc))
            continue
        if vol.preprocessing_version != PREPROCESSING[kind] or volume_kind(vol.data) != kind:
            stale += 1
            continue
        loaded.append((c, u, vol.data))
    units = [u for _, u, _ in loaded]
    hold = {i for i, u in enumerate(units) if u < rs.holdout_fraction}
    if len(loaded) >= 2:
        if not hold:  # a small window: hold out the lowest-ranked patient anyway ...
            hold = {int(np.argmin(units))}
        if len(hold) == len(loaded):  # ... and train on at least one
            hold.discard(int(np.argmax(units)))
    for i, (c, _, data) in enumerate(loaded):
        if i in hold:
            g.holdout.append(data)
            g.holdout_ids.append(c.study_uid)
        else:
            g.train.append(data)
            g.train_ids.append(c.study_uid)
    g.counts = {
        "studies_in_window": len(cands),
        "studies_outside_window": outside,
        "patients": len(newest),
        "duplicates_dropped": len(cands) - len(newest),
        "without_patient_id": no_patient,
        "unreadable": unreadable,
        "other_preprocessing": stale,
        "train": len(g.train),
        "holdout": len(g.holdout),
    }
    return g


# --------------------------------------------------------------------------------------------- gate


def _model_input(model: Glow, volume: np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(volume)).to(device)
    return fit_to_shape(x[None, None], model.cfg.image_shape)


@torch.inference_mode()
def mean_bpd(model: Glow, volumes: Sequence[np.ndarray], device: torch.device) -> float:
    """Mean bits/dim of canonical uint8 volumes, bin midpoints (no noise), one volume at a time."""
    model = model.to(device).eval()
    vals = [float(model.bits_per_dim(_model_input(model, v, device), noise=False).double().item())
            for v in volumes]
    return float(np.mean(vals))


@torch.inference_mode()
def log_likelihoods(model: Glow, volumes: Sequence[np.ndarray], device: torch.device) -> np.ndarray:
    """log p(x) in nats under ``model`` for each canonical volume (as ModelPair computes it)."""
    model = model.to(device).eval()
    out = [model.log_prob(model.preprocess(_model_input(model, v, device))).double().item() for v in volumes]
    return np.asarray(out, dtype=float)


def recalibrate(current_threshold: float, current_scores: np.ndarray, new_scores: np.ndarray
                ) -> tuple[float, float]:
    """(new threshold, specificity kept): the share of reference normals the current threshold leaves
    unflagged (``score >= threshold``) is what the new threshold leaves unflagged too."""
    spec = float(np.mean(np.asarray(current_scores) >= current_threshold))
    if spec <= 0.0:
        return math.inf, 0.0  # the current set flags every reference normal; so does the new one
    return threshold_at_specificity(new_scores, spec), spec


def _num(v: float) -> float | None:
    return round(float(v), 6) if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------- run


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, sort_keys=True) + "\n")
    os.replace(tmp, path)


DEFAULT_STEPS = 2000


def branch_recipe(current: ModelSet, configured_steps: int | None) -> tuple[int, str | None]:
    """Steps and precision of the nightly M1: those the current set's M1 was trained with.

    M0 and M1 must be trained alike for their difference to measure the data and not the training
    (the set's M0 and M1 branched from one trunk with equal budgets): a nightly M1 trained far longer
    or shorter than the M0 it is compared with shifts every score. ``[retrain] steps`` overrides.
    """
    m1 = (current.manifest.get("provenance") or {}).get("m1") or {}
    steps = configured_steps or int(m1.get("steps") or DEFAULT_STEPS)
    precision = m1.get("precision")
    return steps, str(precision) if precision in ("fp32", "bf16") else None


def _train_m1(cfg: Config, current: ModelSet, g: Gathered, out: Path) -> dict[str, Any]:
    """Train the new M1 (imported here: the gather and gate steps do not need the training loop)."""
    from training.data.sources import VolumeSet
    from training.train.loop import train

    rs = cfg.settings.retrain
    vs = VolumeSet(g.train, g.train_ids, {"source": "retrain archive", "window_days": rs.window_days})
    started_from = rs.init_from
    if started_from == "trunk" and current.trunk_path is None:
        started_from = "m0"  # a set made without its trunk: M0 is the closest common start
    start = {"trunk": current.trunk_path, "m0": current.m0_path, "m1": current.m1_path}.get(started_from)
    steps, precision = branch_recipe(current, rs.steps)
    res = train(
        vs, str(current.manifest["preset"]), out, role="mixture", seed=0, steps=steps,
        init_from=start, progress=False, device=rs.device, precision=precision,
    )
    return {"steps": res.steps, "precision": precision, "final_bpd": _num(res.final_bpd),
            "nan_restores": res.nan_restores,
            "seconds": round(res.seconds, 3), "init_from": started_from}


def _gate(cfg: Config, current: ModelSet, new_m1: Path, g: Gathered, refs: list[np.ndarray],
          device: torch.device) -> dict[str, Any]:
    rs = cfg.settings.retrain
    m0, m1_cur, m1_new = Glow.load(current.m0_path), Glow.load(current.m1_path), Glow.load(new_m1)
    nll_cur, nll_new = mean_bpd(m1_cur, g.holdout, device), mean_bpd(m1_new, g.holdout, device)
    lp0 = log_likelihoods(m0, refs, device)
    cur_scores = lp0 - log_likelihoods(m1_cur, refs, device)
    new_scores = lp0 - log_likelihoods(m1_new, refs, device)
    sd = float(np.std(cur_scores, ddof=1))
    shift = float(np.median(new_scores) - np.median(cur_scores))
    limit = rs.gate_score_shift_sd * sd
    nll_ok = math.isfinite(nll_new) and nll_new <= nll_cur + rs.gate_nll_margin_bpd
    shift_ok = bool(np.all(np.isfinite(new_scores))) and abs(shift) <= limit
    reasons = []
    if not nll_ok:
        reasons.append(
            f"held-out NLL {nll_new:.4f} bpd is worse than the current M1's {nll_cur:.4f} bpd by more "
            f"than gate_nll_margin_bpd = {rs.gate_nll_margin_bpd:g}"
        )
    if not shift_ok:
        reasons.append(
            f"median score of the {len(refs)} reference normals moved by {shift:+.4f} nats, beyond "
            f"gate_score_shift_sd = {rs.gate_score_shift_sd:g} x sd {sd:.4f} = {limit:.4f}"
        )
    return {
        "passed": nll_ok and shift_ok,
        "reason": "; ".join(reasons) or None,
        "nll_current_bpd": _num(nll_cur), "nll_new_bpd": _num(nll_new),
        "nll_margin_bpd": rs.gate_nll_margin_bpd, "nll_passed": nll_ok,
        "holdout": len(g.holdout), "reference_normals": len(refs),
        "median_shift": _num(shift), "shift_limit": _num(limit), "current_sd": _num(sd),
        "shift_passed": shift_ok,
        "_scores": (cur_scores, new_scores),
        "_refs": refs, "_device": device,  # the region score is recalibrated on them with the new M1
    }


def _register(reg: Registry, current: ModelSet, new_m1: Path, gate: dict[str, Any],
              record: dict[str, Any]) -> ModelSet:
    cur_scores, new_scores = gate["_scores"]
    cur_threshold = float(current.manifest["operating_point"]["threshold"])
    threshold, spec = recalibrate(cur_threshold, cur_scores, new_scores)
    refs = [{**e, "score": float(s)} for e, s in
            zip(current.manifest["calibration"]["reference_volumes"], new_scores, strict=True)]
    public_gate = {k: v for k, v in gate.items() if not k.startswith("_")}
    provenance = {
        "m0": current.manifest.get("provenance", {}).get("m0"),
        "m1": Glow.load(new_m1).extra_info,  # type: ignore[attr-defined]
        "retrain": {"run": record["run"], "previous": current.version, "data": record["data"],
                    "training": record.get("training"), "gate": public_gate},
        "calibration": {"method": "kept the specificity of the previous threshold on the reference normals",
                        "previous_threshold": cur_threshold, "previous_method":
                        current.manifest["operating_point"]["method"], "n_normal": len(refs)},
    }
    region = region_calibration(ModelPair(Glow.load(current.m0_path), Glow.load(new_m1), gate["_device"]),
                                gate["_refs"], threshold, new_scores, reg.root)
    return reg.create(
        current.m0_path, new_m1, trunk=current.trunk_path, preset=str(current.manifest["preset"]),
        preprocessing_version=PREPROCESSING[current.kind], threshold=threshold,
        method=f"specificity={spec:g}", normal_scores=[float(s) for s in new_scores], provenance=provenance,
        software_version=__version__,
        calibration_extra={"reference_volumes": refs, "recalibrated_from": current.version,
                           **({"region": region} if region else {})},
    )


def run(cfg: Config, workdir: Path, *, now: float | None = None, kind: str = DEFAULT_KIND) -> dict[str, Any]:
    """One retrain of ``kind``'s current set, start to end; returns the history record (already
    appended to the history, with its ``kind``). Every other kind's set is left as it is.

    Call with ``workdir`` under ``cfg.models_dir`` named ``.retrain-<run>``: it holds the new M1 while
    it is trained and gated, then ``result.json`` (the record) for the scheduler, which removes the
    folder; one left by a crash is removed by the next run (under the lock, so never a live one).
    """
    t0 = time.time()
    rs = cfg.settings.retrain
    reg = Registry(cfg.models_dir)
    record: dict[str, Any] = {
        "run": workdir.name.removeprefix(WORKDIR_PREFIX), "kind": kind, "started": _iso(t0),
        "outcome": "failed", "reason": None, "previous": None, "version": None, "data": {},
        "gate": {"passed": False},
        "window_days": rs.window_days, "steps": rs.steps, "init_from": rs.init_from,
    }
    lock_fd = None
    try:
        reg.root.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(reg.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            lock_fd = None
            raise RetrainSkipped("another retrain is running") from None
        for stale in reg.root.glob(f"{WORKDIR_PREFIX}*"):  # left by a crashed run: we hold the lock
            if stale.is_dir() and stale.resolve() != workdir.resolve():
                shutil.rmtree(stale, ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)
        _write_json(workdir / STATE, {"pid": os.getpid(), "phase": "gathering", "kind": kind})
        if kind not in KINDS:
            raise RegistryError(f"model set kind {kind!r} is not one of {', '.join(KINDS)}")
        current = reg.current(kind)
        if current is None:
            raise RetrainSkipped(f"no current {KIND_NAMES[kind]} model set under {reg.root} to retrain")
        record["previous"] = current.version
        current.verify()
        made_on = str(current.manifest.get("preprocessing_version", ""))
        if made_on != PREPROCESSING[kind]:
            # The archive is assembled by this software's version; an M1 retrained on it would be paired
            # with an M0 (and reference normals) of the old one, and the set labelled with either version
            # would be wrong about half of itself.
            raise RetrainSkipped(
                f"model set {current.version} was made on {made_on or '(unknown)'} volumes, this software "
                f"assembles {PREPROCESSING[kind]}: a new M1 cannot pair with its M0; make a new set "
                f"(README, Training) instead of retraining M1 alone")
        g = gather(cfg, now=t0 if now is None else now, kind=kind)
        record["data"] = g.counts
        log.info("retrain_gathered", **g.counts)
        if g.total < rs.min_volumes:
            what = "volumes" if kind == DEFAULT_KIND else f"{KIND_NAMES[kind]}s"
            raise RetrainSkipped(
                f"{g.total} {what} (one per patient) in the last {rs.window_days} days, fewer than "
                f"retrain.min_volumes = {rs.min_volumes}"
            )
        if not g.holdout or not g.train:
            raise RetrainSkipped(f"{g.total} volumes cannot be split into training and held-out sets")
        refs = load_reference_volumes(current, reg.root)
        if len(refs) < 2:
            raise RegistryError(f"model set {current.version} keeps {len(refs)} reference normal volume(s); "
                                f"the score-shift gate needs at least 2")
        _write_json(workdir / STATE, {"pid": os.getpid(), "phase": "training"})
        new_m1 = workdir / "m1.pt"
        record["training"] = _train_m1(cfg, current, g, new_m1)
        _write_json(workdir / STATE, {"pid": os.getpid(), "phase": "gating"})
        gate = _gate(cfg, current, new_m1, g, refs, pick_device(rs.device))
        record["gate"] = {k: v for k, v in gate.items() if not k.startswith("_")}
        if not gate["passed"]:
            record["outcome"], record["reason"] = "rejected", gate["reason"]
        else:
            _write_json(workdir / STATE, {"pid": os.getpid(), "phase": "registering"})
            new = _register(reg, current, new_m1, gate, record)
            record["version"] = new.version
            reg.promote(new.version, reason=PROMOTE_REASON)
            record["outcome"] = "promoted"
    except RetrainSkipped as exc:
        record["outcome"], record["reason"] = "skipped", str(exc)
    except Exception as exc:  # the job must end with a record, whatever broke
        record["outcome"], record["reason"] = "failed", f"{type(exc).__name__}: {exc}"
        log.exception("retrain_error", run=record["run"])
    finally:
        t1 = time.time()
        record.update(finished=_iso(t1), finished_at=t1, duration_s=round(t1 - t0, 3))
        append_history(reg.root, record)
        if workdir.is_dir():
            _write_json(workdir / RESULT, record)
        if lock_fd is not None:
            os.close(lock_fd)  # releases the lock
    level = log.info if record["outcome"] in ("promoted", "skipped") else log.warning
    gate_log = {k: record["gate"].get(k) for k in ("nll_new_bpd", "nll_current_bpd", "median_shift")}
    level("retrain_finished", run=record["run"], kind=kind, outcome=record["outcome"],
          reason=record["reason"], version=record["version"], previous=record["previous"],
          duration_s=record["duration_s"], **gate_log)
    return record


# --------------------------------------------------------------------------------------- entry point


def _lower_priority(nice: int) -> None:
    """Run at nice level ``nice`` (absolute: never raises our priority, which needs privileges)."""
    cur = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > cur:
        os.nice(nice - cur)


def _die_with_parent(parent_pid: int | None) -> None:
    """SIGTERM this process when the daemon that started it dies (Linux), so no orphan keeps training."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if parent_pid is not None and os.getppid() != parent_pid:  # it died before prctl took effect
        raise SystemExit(3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.train.retrain",
                                description="The nightly M1 retrain of one kind of model set, or of each.")
    p.add_argument("--config", help="config.toml (default: $GLOWTRIAGE_CONFIG, else built-in defaults)")
    p.add_argument("--workdir", type=Path, help="work folder (default: <models>/.retrain-<UTC time>)")
    p.add_argument("--parent-pid", type=int, help="exit if this process is no longer the parent")
    p.add_argument("--kind", choices=KINDS,
                   help="the kind of set to retrain (ct: head CT, cxr: chest radiograph; default: each kind "
                        "with a current set, one after the other)")
    args = p.parse_args(argv)
    cfg = load_or_exit(args.config)
    from triage.ops.logs import configure

    configure(cfg.settings.logging.level, cfg.settings.logging.format)
    _die_with_parent(args.parent_pid)
    _lower_priority(cfg.settings.retrain.nice)
    if cfg.settings.retrain.threads > 0:
        torch.set_num_threads(cfg.settings.retrain.threads)
    if args.kind is not None:
        kinds = [args.kind]
    else:
        try:
            kinds = list(Registry(cfg.models_dir).currents()) or [DEFAULT_KIND]
        except RegistryError:
            kinds = [DEFAULT_KIND]  # run() records what is wrong with the registry
    if args.workdir is not None and len(kinds) > 1:
        print("--workdir names one run's folder: give --kind too", file=sys.stderr)
        return 2
    outcomes = []
    for k in kinds:
        workdir = args.workdir or new_workdir(cfg.models_dir)
        outcomes.append(run(cfg, workdir, kind=k)["outcome"])
        if args.workdir is None:  # ours: nobody else reads its result.json (the scheduler passes one)
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if "failed" in outcomes else 0


if __name__ == "__main__":
    raise SystemExit(main())
