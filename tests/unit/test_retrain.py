"""The nightly M1 retrain (triage.ops.schedule + training.train.retrain)
on a real store, registry and child process.

A site here is a storage root with an archive of assembled volumes (written with save_volume where the
daemon writes them, with one spooled DICOM instance each carrying the PatientID), and a current model
set made by ``create_model_set`` (so it keeps its reference normal volumes). The models are test-tiny
flows trained once per module; every retrain runs ``python -m training.train.retrain`` as the daemon does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

import training.train.retrain as retrain_mod
from training.data.sources import VolumeSet
from training.data.volumes import split_by_patient, volumes_from_dicom
from training.train.loop import train
from training.train.retrain import file_kind, gather, holdout_unit, patient_of, run
from triage.assemble.radiograph import RADIOGRAPH_PREPROCESSING_VERSION
from triage.assemble.volume import AssembledVolume, save_volume
from triage.config import Config, load
from triage.model.modelset import create_model_set
from triage.model.registry import ModelSet, Registry, RegistryError, sha256_file
from triage.model.score import Scorer, Scorers, VolumeInput
from triage.ops.history import HISTORY, read_history
from triage.ops.metrics import Metrics
from triage.ops.schedule import JOB_ID, RetrainJob, current_kinds, start_scheduler
from triage.store.db import Store

REPO = Path(__file__).resolve().parents[2]
SMALL = (8, 16, 16)  # test-tiny's image_shape; volumes are these blocks repeated up to 32x128x128
CT = "1.2.840.10008.5.1.4.1.1.2"
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
SMALL_2D = (16, 16)  # test-tiny-2d's image_shape; radiographs are these blocks repeated up to 512x512
DAY = 86400.0
PATIENT_IDS = ["PAT-A", "PAT-A", *[f"PAT-{i:02d}" for i in range(2, 12)], None, "PAT-OLD"]  # 14 studies


def blob(rng: np.random.Generator) -> np.ndarray:
    """A smooth bright blob on a dark noisy background (what a tiny flow learns in a few steps)."""
    grids = np.meshgrid(*[np.arange(s) for s in SMALL], indexing="ij")
    c = [rng.uniform(s * 0.25, s * 0.75) for s in SMALL]
    d = sum((g - ci) ** 2 for g, ci in zip(grids, c, strict=True)) / rng.uniform(2.0, 4.0) ** 2
    small = np.clip(np.round(20 + 90 * np.exp(-d) + rng.normal(0, 2, SMALL)), 0, 127).astype(np.uint8)
    return np.repeat(np.repeat(np.repeat(small, 4, 0), 8, 1), 8, 2)


def blobs(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [blob(rng) for _ in range(n)]


def volume(data: np.ndarray, study: str, series: str) -> AssembledVolume:
    return AssembledVolume(data=data, hu_stats={}, source_geometry={}, grid={}, coverage_mm=150.0,
                           warnings=[], zero_fraction=0.0, study_uid=study, series_uid=series)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """M0 on normals, M1 on the mixture and a trunk (normals of another seed), trained once (60 steps
    each)."""
    d = tmp_path_factory.mktemp("models")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only spin against each other
    try:
        for name, role, seed in (("normal", "normal", 1), ("mixture", "mixture", 2), ("trunk", "normal", 3)):
            vs = VolumeSet(blobs(16, seed), [f"1.2.3.{seed}.{i}" for i in range(16)])
            train(vs, "test-tiny", d / f"{name}.pt", role=role, steps=60, progress=False, log_every=0)
        yield {"m0": d / "normal.pt", "m1": d / "mixture.pt", "trunk": d / "trunk.pt"}
    finally:
        torch.set_num_threads(threads)


def put_instance(store: Store, study: str, series: str, patient_id: str, issuer: str | None = None,
                 sop_class: str = CT) -> None:
    modality = "CT" if sop_class == CT else "DX"
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = f"{series}.1"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, f"{series}.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, modality
    ds.PatientID = patient_id
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    store.put_instance(f"{series}.1", study, series, sop_class, ExplicitVRLittleEndian,
                       lambda f: ds.save_as(f, enforce_file_format=True), "TEST", modality)


def make_site(tmp: Path, models: dict[str, Path], *, trunk: Path | None = None,
              **retrain: Any) -> tuple[Config, Registry, ModelSet]:
    """Config, archive (14 studies: a patient twice, one study without instances, one too old) and a
    promoted current model set with 6 reference normals."""
    settings = {"enabled": True, "cron": "17 3 * * *", "window_days": 90, "min_volumes": 6, "steps": 20,
                "nice": 5, "gate_nll_margin_bpd": 0.05, "gate_score_shift_sd": 3.0, "holdout_fraction": 0.25,
                "device": "cpu", "threads": 1, "timeout_s": 300.0, **retrain}
    lines = ['[storage]\nroot = "var"\nmin_free_mb = 0', '[scoring]\ndevice = "cpu"', "[retrain]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    (tmp / "config.toml").write_text("\n".join(lines) + "\n")
    cfg = load(tmp / "config.toml")
    now = time.time()
    with Store(cfg.storage_root) as store:
        for k, (pid, data) in enumerate(zip(PATIENT_IDS, blobs(len(PATIENT_IDS), 5), strict=True)):
            study, series = f"1.2.826.0.1.9.{k}", f"1.2.826.0.1.9.{k}.1"
            path = save_volume(volume(data, study, series), store.volume_path(study, series, 1))
            if pid is not None:
                put_instance(store, study, series, pid)
            age = 200 * DAY if pid == "PAT-OLD" else (10 * DAY if k == 0 else DAY + 60 * k)
            os.utime(path, (now - age, now - age))
    calib = tmp / "calib"
    for k, data in enumerate(blobs(6, 3)):
        save_volume(volume(data, f"1.2.826.0.1.8.{k}", f"1.2.826.0.1.8.{k}.1"), calib / f"n{k}.npz")
    reg = Registry(cfg.models_dir)
    current = create_model_set(cfg, reg, models["m0"], models["m1"], calib, specificity=0.8, device="cpu",
                               trunk=trunk)
    reg.promote(current.version, reason="initial")
    return cfg, reg, current


def gauge(m: Metrics, name: str, kind: str = "ct") -> float | None:
    return m.registry.get_sample_value(f"glowtriage_retrain_{name}", {"kind": kind})


def no_leftovers(reg: Registry) -> None:
    left = [p.name for p in reg.root.iterdir() if p.name.startswith(".") and p.name != ".retrain.lock"]
    assert left == [], left


def test_gather_one_volume_per_patient_newest_study_split_by_patient(tmp_path: Path,
                                                                      models: dict[str, Path]) -> None:
    cfg, _, _ = make_site(tmp_path, models)
    g = gather(cfg)
    assert g.counts == {
        "studies_in_window": 13, "studies_outside_window": 1, "patients": 12, "duplicates_dropped": 1,
        "without_patient_id": 1, "unreadable": 0, "other_preprocessing": 0,
        "train": len(g.train), "holdout": len(g.holdout),
    }
    ids = g.train_ids + g.holdout_ids
    assert len(ids) == 12 and len(set(ids)) == 12
    assert "1.2.826.0.1.9.1" in ids and "1.2.826.0.1.9.0" not in ids  # PAT-A's newer study is kept
    assert "1.2.826.0.1.9.13" not in ids  # 200 days old, window 90
    assert 1 <= len(g.holdout) <= 6 and len(g.train) >= 6
    assert all(v.dtype == np.uint8 and v.shape == (32, 128, 128) for v in g.train + g.holdout)
    again = gather(cfg)  # the split is a function of the patients, not of the run
    assert again.holdout_ids == g.holdout_ids


def test_training_split_and_nightly_holdout_agree_on_who_is_one_patient(tmp_path: Path) -> None:
    """Training reads the archive (``volumes_from_dicom`` on the storage root) and the retrain reads the
    store's instances (``patient_of``): both must give one patient (PatientID + issuer) one key, so the
    training split and the nightly hold-out keep the same studies together."""
    root = tmp_path / "var"
    who = {"1.2.826.0.1.7.0": ("PAT-A", "HOSP-1"), "1.2.826.0.1.7.1": ("PAT-A", "HOSP-1"),
           "1.2.826.0.1.7.2": ("PAT-A", "HOSP-2"),  # the same number at another issuer: another person
           "1.2.826.0.1.7.3": ("PAT-B", None), "1.2.826.0.1.7.4": None}  # no instance left: its own key
    with Store(root) as store:
        for (study, patient), data in zip(who.items(), blobs(len(who), 11), strict=True):
            series = f"{study}.1"
            vol = volume(data, study, series)
            vol.sop_instance_uids = [f"{series}.1"]
            save_volume(vol, store.volume_path(study, series, 1))
            if patient is not None:
                put_instance(store, study, series, *patient)
    training = {it.study_uid: it.patient_key for it in volumes_from_dicom(root, tmp_path / "cache").items}
    with Store(root) as store:
        nightly = {study: patient_of(store, f"{study}.1", study) for study in who}
    assert {s: k for s, (k, _) in nightly.items()} == training
    assert [known for _, known in nightly.values()] == [True, True, True, True, False]
    a0, a1, a2, b, none = (training[s] for s in who)
    assert a0 == a1 and len({a0, a2, b, none}) == 4
    assert holdout_unit(a0) == holdout_unit(a1)  # held out (or not) together every night
    for seed in range(10):  # and on one side of every training split
        parts = split_by_patient(list(training.items()), (0.5, 0.5), seed=seed, key=lambda kv: kv[1])
        side = {s: i for i, part in enumerate(parts) for s, _ in part}
        assert side["1.2.826.0.1.7.0"] == side["1.2.826.0.1.7.1"]
    # the raw IDs are kept nowhere the keys go
    assert not any("PAT-" in k or "HOSP" in k for k in training.values())


def test_scheduled_job_retrains_gates_and_promotes(tmp_path: Path, models: dict[str, Path]) -> None:
    cfg, reg, before = make_site(tmp_path, models)
    (reg.root / ".retrain-left-by-a-crash").mkdir()
    m = Metrics(CollectorRegistry())
    sched = start_scheduler(cfg, m, paused=True)
    try:
        job = sched.get_job(JOB_ID)
        # the cron time from a fixed "now": 17 3 * * * local time
        tz = job.trigger.timezone
        at = datetime(2024, 5, 1, 2, 0, tzinfo=tz)
        assert job.trigger.get_next_fire_time(None, at) == datetime(2024, 5, 1, 3, 17, tzinfo=tz)
        assert job.trigger.get_next_fire_time(None, at.replace(hour=3, minute=18)) == datetime(
            2024, 5, 2, 3, 17, tzinfo=tz)
        assert (job.next_run_time.hour, job.next_run_time.minute) == (3, 17)
        assert timedelta(0) < job.next_run_time - datetime.now(tz) <= timedelta(days=1)
        assert job.max_instances == 1 and job.coalesce and job.misfire_grace_time == 3600
        assert gauge(m, "last_success_timestamp_seconds") == 0  # no history yet (the head set is current)
        assert gauge(m, "last_success_timestamp_seconds", "cxr") is None  # no chest set: no series
        t0 = time.monotonic()
        records = job.func()  # what the scheduler runs at 03:17, here synchronously
        took = time.monotonic() - t0
    finally:
        sched.shutdown(wait=False)
    assert list(records) == ["ct"]  # the only kind with a current set
    record = records["ct"]
    d = record["data"]
    assert record["kind"] == "ct"
    print(f"\nretrain job, 20 steps test-tiny, {d['train']} train / {d['holdout']} held out: {took:.1f} s "
          f"wall, {record['duration_s']:.1f} s inside the child (the rest: process start, imports)")
    assert record["outcome"] == "promoted", record
    new = reg.current()
    assert new.version == record["version"] != before.version
    promoted = reg.history()[-1]
    assert promoted["reason"] == "nightly retrain" and promoted["previous"] == before.version
    assert new.manifest["m0_sha256"] == before.manifest["m0_sha256"]  # M0 is kept
    assert new.manifest["m1_sha256"] != before.manifest["m1_sha256"]
    prov = new.manifest["provenance"]["retrain"]
    assert prov["previous"] == before.version
    assert prov["data"]["patients"] == 12 and prov["data"]["duplicates_dropped"] == 1
    assert prov["data"]["train"] + prov["data"]["holdout"] == 12
    gate = prov["gate"]
    assert gate["passed"] and gate["nll_new_bpd"] <= gate["nll_current_bpd"] + 0.05
    assert abs(gate["median_shift"]) <= gate["shift_limit"]
    # init_from = "trunk" (the default) on a set made without a trunk: the new M1 starts from its M0
    assert new.manifest["provenance"]["m1"]["init_from"]["sha256"] == before.manifest["m0_sha256"]
    assert record["training"]["init_from"] == "m0"
    # recalibrated on the same reference normals, keeping the old threshold's specificity
    refs, old_refs = (s.manifest["calibration"]["reference_volumes"] for s in (new, before))
    assert [r["sha256"] for r in refs] == [r["sha256"] for r in old_refs] and len(refs) == 6
    kept = np.mean(np.array(new.calibration_scores) >= new.info().threshold)
    assert new.manifest["operating_point"]["method"] == f"specificity={kept:g}"
    assert np.mean(np.array(before.calibration_scores) >= before.info().threshold) == pytest.approx(kept)
    Scorer.from_registry(reg, device="cpu")  # the promoted set loads and verifies
    # history, metrics, clean-up
    hist = read_history(reg.root)
    assert len(hist) == 1 and hist[0]["outcome"] == "promoted" and hist[0]["version"] == new.version
    assert "PAT-" not in (reg.root / HISTORY).read_text() and "PAT-" not in json.dumps(new.manifest)
    assert gauge(m, "gate_passed") == 1
    assert gauge(m, "last_success_timestamp_seconds") == pytest.approx(hist[0]["finished_at"])
    assert gauge(m, "duration_seconds") == pytest.approx(hist[0]["duration_s"])
    no_leftovers(reg)
    # a restarted daemon remembers the last success
    fresh = Metrics(CollectorRegistry())
    start_scheduler(cfg, fresh, paused=True).shutdown(wait=False)
    assert gauge(fresh, "last_success_timestamp_seconds") == pytest.approx(hist[0]["finished_at"])


def test_retrain_branches_the_new_m1_from_the_sets_trunk_and_keeps_it(tmp_path: Path,
                                                                     models: dict[str, Path]) -> None:
    cfg, reg, before = make_site(tmp_path, models, trunk=models["trunk"], gate_nll_margin_bpd=1.0)
    assert before.trunk_path is not None
    assert before.manifest["trunk_sha256"] == sha256_file(models["trunk"])
    record = RetrainJob(cfg, Metrics(CollectorRegistry()))()["ct"]
    assert record["outcome"] == "promoted", record
    assert record["training"]["init_from"] == "trunk"
    new = reg.current()
    assert new.manifest["provenance"]["m1"]["init_from"]["sha256"] == before.manifest["trunk_sha256"]
    assert new.manifest["trunk_sha256"] == before.manifest["trunk_sha256"]  # kept for the next night
    new.verify()
    # a set whose trunk file was swapped does not verify (and so does not load)
    new.trunk_path.write_bytes(models["m0"].read_bytes())
    with pytest.raises(RegistryError, match=r"trunk\.pt does not match"):
        new.verify()


def test_gate_failure_keeps_the_current_set_and_says_why(tmp_path: Path, models: dict[str, Path]) -> None:
    # one step from scratch against a trained M1, with no margin: the held-out NLL must fail
    cfg, reg, before = make_site(tmp_path, models, init_from="scratch", steps=1, gate_nll_margin_bpd=0.0)
    m = Metrics(CollectorRegistry())
    record = RetrainJob(cfg, m)()["ct"]
    assert record["outcome"] == "rejected"
    assert "held-out NLL" in record["reason"] and "gate_nll_margin_bpd = 0" in record["reason"]
    assert record["gate"]["nll_new_bpd"] > record["gate"]["nll_current_bpd"]
    assert not record["gate"]["nll_passed"] and record["version"] is None
    assert reg.current().version == before.version
    assert [s.version for s in reg.list()] == [before.version]  # nothing registered
    assert read_history(reg.root)[-1]["reason"] == record["reason"]
    assert gauge(m, "gate_passed") == 0 and gauge(m, "last_success_timestamp_seconds") == 0
    no_leftovers(reg)


def test_too_few_volumes_skips_without_training(tmp_path: Path, models: dict[str, Path]) -> None:
    cfg, reg, before = make_site(tmp_path, models, min_volumes=13)
    record = run(cfg, reg.root / ".retrain-test")
    assert record["outcome"] == "skipped"
    assert record["reason"] == ("12 volumes (one per patient) in the last 90 days, fewer than "
                                "retrain.min_volumes = 13")
    assert "training" not in record and reg.current().version == before.version
    assert read_history(reg.root)[-1]["outcome"] == "skipped"


def test_a_set_made_on_another_preprocessing_version_is_not_retrained(
        tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # an upgrade changed the assembly: the archive's new volumes would train an M1 that pairs with
    # an M0 (and reference normals) of the old version, so the job says what to do instead
    cfg, reg, before = make_site(tmp_path, models)
    made_on = before.manifest["preprocessing_version"]
    monkeypatch.setitem(retrain_mod.PREPROCESSING, "ct", made_on + "-next")
    record = run(cfg, reg.root / ".retrain-test")
    assert record["outcome"] == "skipped" and "training" not in record
    assert f"made on {made_on} volumes" in record["reason"]
    assert f"assembles {made_on}-next" in record["reason"]
    assert "make a new set" in record["reason"]
    assert reg.current().version == before.version and [s.version for s in reg.list()] == [before.version]


def test_killed_retrain_leaves_the_current_set_serving(tmp_path: Path, models: dict[str, Path]) -> None:
    cfg, reg, before = make_site(tmp_path, models, steps=1_000_000)
    m = Metrics(CollectorRegistry())
    job = RetrainJob(cfg, m)
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(job()["ct"]))
    t.start()
    try:
        deadline = time.monotonic() + 240  # seconds on an idle machine; minutes on a loaded CI runner
        ckpt = None
        while time.monotonic() < deadline:  # mid-training: its first checkpoint (step 100) is written
            wd = job.workdir
            if wd is not None and (wd / "m1.pt.ckpt").exists():
                ckpt = wd / "m1.pt.ckpt"
                break
            time.sleep(0.05)
        assert ckpt is not None, "the retrain child never reached its first checkpoint"
        pid = json.loads((ckpt.parent / "state.json").read_text())["pid"]
        assert json.loads((ckpt.parent / "state.json").read_text())["phase"] == "training"
        assert os.getpriority(os.PRIO_PROCESS, pid) == max(5, os.getpriority(os.PRIO_PROCESS, 0))
        os.kill(pid, signal.SIGKILL)
    finally:
        t.join(timeout=60)
    assert not t.is_alive()
    assert out["outcome"] == "failed" and out["reason"] == "retrain process was killed by signal 9 (SIGKILL)"
    assert reg.current().version == before.version
    assert [s.version for s in reg.list()] == [before.version]
    assert Scorer.from_registry(reg, device="cpu").info.version == before.version
    assert read_history(reg.root)[-1]["run"] == out["run"]
    assert gauge(m, "gate_passed") == 0 and gauge(m, "last_success_timestamp_seconds") == 0
    no_leftovers(reg)


def wait_for(predicate: Any, what: str, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_scheduler_fires_the_job_and_shutdown_stops_its_child(tmp_path: Path,
                                                               models: dict[str, Path]) -> None:
    """The scheduler thread runs the job when due (made due now, not slept until 03:17); the daemon's
    stop() (shutdown(wait=False)) ends the training child instead of waiting for it."""
    cfg, reg, before = make_site(tmp_path, models, steps=1_000_000)
    m = Metrics(CollectorRegistry())
    sched = start_scheduler(cfg, m)
    try:
        job = sched.get_job(JOB_ID)
        job.modify(next_run_time=datetime.now(job.trigger.timezone))
        sched.wakeup()
        wd = wait_for(lambda: sched.retrain_job.workdir, "the scheduler to start the job")
        wait_for(lambda: (wd / "m1.pt.ckpt").exists(), "the child's first checkpoint")
        assert sched.get_job(JOB_ID).next_run_time.time().isoformat() == "03:17:00"  # back on the cron
    finally:
        sched.shutdown(wait=False)
    rec = wait_for(lambda: [r for r in read_history(reg.root) if r["outcome"] == "failed"], "the record")[0]
    assert rec["reason"] == "retrain process was killed by signal 15 (SIGTERM)"
    assert reg.current().version == before.version and [s.version for s in reg.list()] == [before.version]
    wait_for(lambda: gauge(m, "duration_seconds") == pytest.approx(rec["duration_s"]), "the metrics")
    assert gauge(m, "gate_passed") == 0
    wait_for(lambda: not wd.exists(), "the work folder to be removed")


def test_daemon_side_never_imports_training() -> None:
    """The daemon only starts the retrain as a child process: loading every daemon module (and the
    scheduler that starts the job) must not load one module of the training side."""
    code = ("import sys, triage.cli, triage.daemon, triage.pipeline, triage.ops.schedule; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'training'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ chest radiograph sets


def blob2d(rng: np.random.Generator) -> np.ndarray:
    """The 2-D blob: what a tiny 2-D flow learns in a few steps, as a 512x512 canonical radiograph."""
    yy, xx = np.meshgrid(*[np.arange(s) for s in SMALL_2D], indexing="ij")
    cy, cx = (rng.uniform(s * 0.25, s * 0.75) for s in SMALL_2D)
    d = ((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(2.0, 4.0) ** 2
    small = np.clip(np.round(20 + 90 * np.exp(-d) + rng.normal(0, 2, SMALL_2D)), 0, 127).astype(np.uint8)
    return np.repeat(np.repeat(small, 32, 0), 32, 1)


def radiograph(data: np.ndarray, study: str, series: str) -> AssembledVolume:
    """What the radiograph assembly saves (its grid names the kind)."""
    return AssembledVolume(data=data, hu_stats={}, source_geometry={"kind": "cxr"},
                           grid={"kind": "cxr", "shape": [512, 512], "spacing": [0.7, 0.7]}, coverage_mm=0.0,
                           warnings=[], zero_fraction=0.0, study_uid=study, series_uid=series,
                           preprocessing_version=RADIOGRAPH_PREPROCESSING_VERSION)


@pytest.fixture(scope="module")
def models2d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """test-tiny-2d M0 on normal blobs and M1 on a mixture, trained once (60 steps each)."""
    d = tmp_path_factory.mktemp("models2d")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, role, seed in (("normal", "normal", 21), ("mixture", "mixture", 22)):
            rng = np.random.default_rng(seed)
            vs = VolumeSet([blob2d(rng) for _ in range(16)], [f"1.2.3.{seed}.{i}" for i in range(16)])
            train(vs, "test-tiny-2d", d / f"{name}.pt", role=role, steps=60, progress=False, log_every=0)
        yield {"m0": d / "normal.pt", "m1": d / "mixture.pt"}
    finally:
        torch.set_num_threads(threads)


def add_chest_site(tmp: Path, cfg: Config, reg: Registry, models2d: dict[str, Path], n: int = 14) -> ModelSet:
    """``n`` chest radiographs of ``n`` patients in the store's archive beside the head CTs, and a
    promoted current chest set (6 reference normals) beside the head-CT set."""
    rng = np.random.default_rng(7)
    with Store(cfg.storage_root) as store:
        for k in range(n):
            study, series = f"1.2.826.0.1.6.{k}", f"1.2.826.0.1.6.{k}.1"
            save_volume(radiograph(blob2d(rng), study, series), store.volume_path(study, series, 1))
            put_instance(store, study, series, f"PAT-X{k:02d}", sop_class=DX)
    calib = tmp / "calib-cxr"
    for k in range(6):
        uid = f"1.2.826.0.1.5.{k}"
        save_volume(radiograph(blob2d(rng), uid, f"{uid}.1"), calib / f"n{k}.npz")
    chest = create_model_set(cfg, reg, models2d["m0"], models2d["m1"], calib, specificity=0.8, device="cpu")
    assert chest.kind == "cxr" and len(chest.manifest["calibration"]["reference_volumes"]) == 6
    reg.promote(chest.version, reason="initial")
    return chest


def test_each_kind_retrains_on_its_own_archive_and_the_head_set_is_untouched(
        tmp_path: Path, models: dict[str, Path], models2d: dict[str, Path]) -> None:
    # 12 head-CT patients, 14 chest patients, min_volumes 13: tonight only the chest set can retrain
    cfg, reg, head = make_site(tmp_path, models, min_volumes=13)
    chest = add_chest_site(tmp_path, cfg, reg, models2d)
    assert current_kinds(reg.root) == list(reg.currents()) == ["ct", "cxr"]  # schedule reads the pointers
    # each kind's archive holds only its own studies
    g_cxr, g_ct = gather(cfg, kind="cxr"), gather(cfg, kind="ct")
    assert g_cxr.counts["patients"] == 14 and g_cxr.counts["unreadable"] == 0
    assert all(v.shape == (512, 512) for v in g_cxr.train + g_cxr.holdout)
    assert all(i.startswith("1.2.826.0.1.6.") for i in g_cxr.train_ids + g_cxr.holdout_ids)
    assert g_ct.counts["patients"] == 12 and all(v.ndim == 3 for v in g_ct.train + g_ct.holdout)
    some = next((tmp_path / "var" / "volumes").glob("1.2.826.0.1.6.0/*.npz"))
    assert file_kind(some) == "cxr" and file_kind(next(tmp_path.glob("calib/*.npz"))) == "ct"

    m = Metrics(CollectorRegistry())
    records = RetrainJob(cfg, m)()
    assert list(records) == ["ct", "cxr"]
    ct, cxr = records["ct"], records["cxr"]
    assert ct["kind"] == "ct" and ct["outcome"] == "skipped"
    assert ct["reason"].startswith("12 volumes (one per patient)")
    assert cxr["kind"] == "cxr" and cxr["outcome"] == "promoted", cxr
    assert cxr["data"]["patients"] == 14 and cxr["gate"]["passed"]
    # the chest set moved; the head-CT set did not
    new = reg.current("cxr")
    assert new.version == cxr["version"] != chest.version and new.kind == "cxr"
    assert new.manifest["m0_sha256"] == chest.manifest["m0_sha256"]
    assert new.manifest["m1_sha256"] != chest.manifest["m1_sha256"]
    assert new.manifest["preprocessing_version"] == RADIOGRAPH_PREPROCESSING_VERSION
    assert new.manifest["provenance"]["retrain"]["previous"] == chest.version
    assert len(new.manifest["calibration"]["reference_volumes"]) == 6  # kept for the next night's gate
    assert reg.current("ct").version == head.version
    assert [s.version for s in reg.list() if s.kind == "ct"] == [head.version]
    promoted = [h for h in reg.history() if h.get("reason") == "nightly retrain"]
    assert [(h["kind"], h["previous"]) for h in promoted] == [("cxr", chest.version)]
    # one history line per kind; metrics per kind
    hist = read_history(reg.root)
    assert [(h["kind"], h["outcome"]) for h in hist] == [("ct", "skipped"), ("cxr", "promoted")]
    assert gauge(m, "gate_passed", "cxr") == 1 and gauge(m, "gate_passed", "ct") == 0
    assert gauge(m, "last_success_timestamp_seconds", "cxr") == pytest.approx(hist[1]["finished_at"])
    assert gauge(m, "last_success_timestamp_seconds", "ct") == 0
    # the daemon's scorers load both; a chest image is scored by the new chest set
    sc = Scorers.from_registry(reg, device="cpu")
    res = sc.score([VolumeInput("s", "r", blob2d(np.random.default_rng(99)))])[0]
    assert res.model_version == new.version
    # rollback of the chest set goes back to the set before the retrain, the head set stays
    assert reg.rollback(kind="cxr").version == chest.version
    assert reg.current().version == head.version
    # a restarted daemon restores each kind's last success
    fresh = Metrics(CollectorRegistry())
    start_scheduler(cfg, fresh, paused=True).shutdown(wait=False)
    assert gauge(fresh, "last_success_timestamp_seconds", "cxr") == pytest.approx(hist[1]["finished_at"])
    assert gauge(fresh, "last_success_timestamp_seconds", "ct") == 0  # current, never retrained
    no_leftovers(reg)


def test_chest_gate_failure_keeps_the_chest_set(tmp_path: Path, models: dict[str, Path],
                                                models2d: dict[str, Path]) -> None:
    cfg, reg, head = make_site(tmp_path, models, init_from="scratch", steps=1, gate_nll_margin_bpd=0.0)
    chest = add_chest_site(tmp_path, cfg, reg, models2d)
    record = run(cfg, reg.root / ".retrain-chest", kind="cxr")
    assert record["kind"] == "cxr" and record["outcome"] == "rejected", record
    assert "held-out NLL" in record["reason"] and record["version"] is None
    assert reg.current("cxr").version == chest.version and reg.current().version == head.version
    assert sorted(s.version for s in reg.list()) == sorted([head.version, chest.version])
    assert read_history(reg.root)[-1]["kind"] == "cxr"


def test_entry_point_without_kind_retrains_each_kind_with_a_current_set(
        tmp_path: Path, models: dict[str, Path], models2d: dict[str, Path]) -> None:
    """``python -m training.train.retrain --config FILE`` (by hand, no --kind): every kind with a
    current set in turn, one history line each; --workdir names one run, so it needs --kind."""
    cfg, reg, head = make_site(tmp_path, models, min_volumes=13)
    chest = add_chest_site(tmp_path, cfg, reg, models2d)
    cmd = [sys.executable, "-m", "training.train.retrain", "--config", str(tmp_path / "config.toml")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    hist = read_history(reg.root)
    assert [(h["kind"], h["outcome"]) for h in hist] == [("ct", "skipped"), ("cxr", "promoted")]
    assert reg.current().version == head.version and reg.current("cxr").version not in (None, chest.version)
    bad = subprocess.run([*cmd, "--workdir", str(reg.root / ".retrain-x")], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "give --kind too" in bad.stderr
    no_leftovers(reg)
