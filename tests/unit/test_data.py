"""training.data.volumes: DICOM folders -> cached volumes (cache hits decode nothing, rebuilds on a changed
key),
rejects with reasons, label selection, patient-level splits, and the daemon's archive as a source."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from training.data.volumes import (
    DataError,
    split_by_patient,
    volumes_from_dicom,
)
from training.synth.head import SynthOptions, write_dataset
from triage.assemble.patient import patient_key
from triage.assemble.volume import PREPROCESSING_VERSION, load_volume, save_volume
from triage.config import AssemblySettings

FAST = SynthOptions(matrix=256, distractors=False, slab_samples=1)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """Two normal and one abnormal study, primary series only."""
    root = tmp_path_factory.mktemp("clean")
    truth = write_dataset(root, 2, 1, seed=11, options=FAST)
    return root, truth


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A study with only its localizer, one with a slice missing, and a file that is not DICOM."""
    root = tmp_path_factory.mktemp("bad")
    loc = write_dataset(root / "loc", 1, 0, seed=12, options=dataclasses.replace(FAST, distractors=True))[0]
    for uid, role in loc.series_roles.items():
        if role != "localizer":
            shutil.rmtree(root / "loc" / loc.study_dir / loc.series_dirs[uid])
    gapped = dataclasses.replace(FAST, missing_fraction=1.0)
    gap = write_dataset(root / "gap", 1, 0, seed=13, options=gapped)[0]
    assert gap.dropped_index is not None
    (root / "junk.bin").write_bytes(b"\x00garbage, not a DICOM file" * 10)
    return root, {"localizer": loc.study_uid, "gap": gap.study_uid}


def mtimes(cache: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in cache.rglob("*.npz")}


def test_second_call_decodes_nothing_and_returns_the_same_volumes(clean, tmp_path: Path) -> None:
    root, truth = clean
    cache = tmp_path / "cache"
    first = volumes_from_dicom(root, cache)
    assert first.meta["format"] == "dicom"
    assert first.meta["built"] == 3 and first.meta["from_cache"] == 0
    assert sorted(first.ids) == sorted(t.study_uid for t in truth)
    assert all(v.dtype == np.uint8 and v.shape == (32, 128, 128) for v in first.volumes)
    assert {it.series_uid for it in first.items} == {t.primary_series_uid for t in truth}
    # labels.csv and truth.jsonl are skipped with a reason, not treated as broken DICOM
    assert any("labels.csv: not DICOM" in s for s in first.skipped)
    before = mtimes(cache)
    assert len(before) == 3

    second = volumes_from_dicom(root, cache)
    assert second.meta["built"] == 0 and second.meta["from_cache"] == 3
    assert all(it.cached for it in second.items)
    assert mtimes(cache) == before  # nothing rewritten
    for a, b in zip(first.volumes, second.volumes, strict=True):
        np.testing.assert_array_equal(a, b)


def test_parallel_decode_gives_the_same_volumes(clean, tmp_path: Path) -> None:
    root, _ = clean
    one = volumes_from_dicom(root, tmp_path / "c1")
    two = volumes_from_dicom(root, tmp_path / "c2", workers=2)
    assert two.meta["built"] == 3 and one.ids == two.ids
    for a, b in zip(one.volumes, two.volumes, strict=True):
        np.testing.assert_array_equal(a, b)


def test_stale_preprocessing_or_changed_rules_rebuild(clean, tmp_path: Path) -> None:
    root, _ = clean
    cache = tmp_path / "cache"
    vs = volumes_from_dicom(root, cache)
    # an entry written by another preprocessing version is never read back: it is rebuilt
    victim = vs.items[0].path
    old = load_volume(victim)
    old.preprocessing_version = "assemble-0"
    old.data = np.zeros_like(old.data)
    save_volume(old, victim)
    again = volumes_from_dicom(root, cache)
    assert again.meta["built"] == 1
    assert load_volume(victim).preprocessing_version == PREPROCESSING_VERSION
    np.testing.assert_array_equal(again.volumes[0], vs.volumes[0])
    # rules that can change a voxel are part of the key; timing rules are not
    assert volumes_from_dicom(root, cache, rules=AssemblySettings(quiet_seconds=99)).meta["built"] == 0
    assert volumes_from_dicom(root, cache, rules=AssemblySettings(min_coverage_mm=80)).meta["built"] == 3


def test_rejects_are_listed_with_reasons_and_cached(bad, tmp_path: Path) -> None:
    root, uids = bad
    cache = tmp_path / "cache"
    vs = volumes_from_dicom(root, cache)
    assert len(vs) == 0
    studies = {r.id: r for r in vs.rejects if r.kind == "study"}
    assert set(studies) == {uids["localizer"], uids["gap"]}
    assert studies[uids["localizer"]].category == "image_type"
    assert "LOCALIZER" in studies[uids["localizer"]].reason
    assert studies[uids["gap"]].category == "missing_slices"
    assert "missing" in studies[uids["gap"]].reason
    files = [r for r in vs.rejects if r.kind == "file"]
    assert [Path(r.id).name for r in files] == ["junk.bin"] and files[0].reason

    with (cache / "rejects.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["kind"], r["id"], r["category"]) for r in rows} == {
        ("study", uids["localizer"], "image_type"),
        ("study", uids["gap"], "missing_slices"),
        ("file", str(root / "junk.bin"), "not_dicom"),
    }
    assert all(r["reason"] for r in rows)
    # the failed build is remembered: a second call decodes nothing and says the same
    again = volumes_from_dicom(root, cache)
    assert again.meta["built"] == 0
    assert {(r.id, r.reason) for r in again.rejects} == {(r.id, r.reason) for r in vs.rejects}


def test_only_normal_selects_before_decoding_and_unlabelled_studies_stay_without_only(
    clean, tmp_path: Path
) -> None:
    root, truth = clean
    normals = {t.study_uid for t in truth if t.label == "normal"}
    abnormal = next(t for t in truth if t.label == "abnormal")
    cache = tmp_path / "cache"
    vs = volumes_from_dicom(root, cache, labels=root / "labels.csv", only="normal")
    assert set(vs.ids) == normals
    assert vs.meta["built"] == 2 and vs.meta["dropped_by_label"] == 1  # the abnormal was never decoded
    assert {it.label for it in vs.items} == {"normal"}
    assert not (cache / abnormal.study_uid).exists()

    partial = tmp_path / "labels.csv"
    partial.write_text("study_uid,label,lesion\n" + "".join(
        f"{t.study_uid},{t.label},{t.lesion}\n" for t in truth if t.label == "normal"))
    everything = volumes_from_dicom(root, cache, labels=partial)
    assert set(everything.ids) == {t.study_uid for t in truth}
    by_uid = {it.study_uid: it for it in everything.items}
    assert by_uid[abnormal.study_uid].label is None
    assert set(volumes_from_dicom(root, cache, labels=partial, only="NORMAL").ids) == normals

    with pytest.raises(DataError, match=r"needs a labels\.csv"):
        volumes_from_dicom(root, cache, only="normal")
    bad_labels = tmp_path / "bad.csv"
    bad_labels.write_text("uid,diagnosis\n1.2.3,normal\n")
    with pytest.raises(DataError, match=r"bad\.csv:1: header must contain study_uid,label"):
        volumes_from_dicom(root, cache, labels=bad_labels, only="normal")
    with pytest.raises(DataError, match="no such file or folder"):
        volumes_from_dicom(tmp_path / "nowhere", cache)


def test_split_by_patient_keeps_each_patient_on_one_side() -> None:
    # 60 patients with 1-3 studies each
    items = [{"study": f"s{p}.{k}", "patient_key": patient_key(f"PID{p}", "HOSP", study_uid=f"s{p}.{k}")}
             for p in range(60) for k in range(1 + p % 3)]
    train, val, test = split_by_patient(items, (0.8, 0.1, 0.1), seed=5)
    assert len(train) + len(val) + len(test) == len(items)
    sides = [{it["patient_key"] for it in part} for part in (train, val, test)]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert abs(len(train) - 0.8 * len(items)) <= 3 and abs(len(test) - 0.1 * len(items)) <= 3 and val
    again = split_by_patient(items, (0.8, 0.1, 0.1), seed=5)
    assert (train, val, test) == again
    assert split_by_patient(items, (0.8, 0.1, 0.1), seed=6) != again
    # the raw PatientID is not what is kept
    assert all("PID" not in it["patient_key"] for it in items)
    assert patient_key("", "HOSP", study_uid="1.2.3").startswith("study:")
    assert patient_key("PID1", study_uid="x") == patient_key("PID1", study_uid="y")
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_patient(items, (0.8, 0.1))


def test_studies_of_one_patient_are_split_together(clean, tmp_path: Path) -> None:
    root, truth = clean
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    # give the second study the first study's patient
    first = pydicom.dcmread(next((copy / "study_0000").rglob("*.dcm")), stop_before_pixels=True)
    for f in (copy / "study_0001").rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.PatientID = first.PatientID
        ds.save_as(f)
    vs = volumes_from_dicom(copy, tmp_path / "cache")
    keys = {it.study_uid: it.patient_key for it in vs.items}
    assert keys[truth[0].study_uid] == keys[truth[1].study_uid] != keys[truth[2].study_uid]
    assert str(first.PatientID) not in json.dumps([dataclasses.asdict(it) for it in vs.items], default=str)
    for seed in range(20):
        parts = split_by_patient(vs.items, (0.5, 0.5), seed=seed)
        side = {it.study_uid: i for i, part in enumerate(parts) for it in part}
        assert side[truth[0].study_uid] == side[truth[1].study_uid]
        sub = vs.subset(parts[0])
        assert sub.ids == [it.study_uid for it in sub.items] and len(sub.volumes) == len(parts[0])


def test_daemon_storage_root_is_read_directly(clean, tmp_path: Path) -> None:
    from training.data.sources import resolve_data
    from triage.store.db import Store

    root, _ = clean
    built = volumes_from_dicom(root, tmp_path / "cache")
    store_root = tmp_path / "var"
    Store(store_root).close()
    assert (store_root / "state.db").is_file() and (store_root / "volumes").is_dir()
    shutil.copytree(root / "study_0000", store_root / "spool" / "study_0000")  # DICOM must not be re-read
    uid0, uid1, uid2 = built.ids
    for uid, vol_path in zip(built.ids, (it.path for it in built.items), strict=True):
        save_volume(load_volume(vol_path), store_root / "volumes" / uid / "g1.npz")
    # a newer generation of the first study wins over the older one
    newer = load_volume(built.items[0].path)
    newer.data = np.full_like(newer.data, 7)
    dest = save_volume(newer, store_root / "volumes" / uid0 / "g2.npz")
    older = store_root / "volumes" / uid0 / "g1.npz"
    import os

    os.utime(older, (dest.stat().st_mtime - 60, dest.stat().st_mtime - 60))
    # a study archived only by an older preprocessing version is rejected with the reason
    stale = load_volume(built.items[2].path)
    stale.preprocessing_version = "assemble-0"
    (store_root / "volumes" / uid2 / "g1.npz").unlink()
    save_volume(stale, store_root / "volumes" / uid2 / "g0.npz")

    vs = volumes_from_dicom(store_root, tmp_path / "cache2")
    assert vs.meta["format"] == "archive" and vs.meta["built"] == 0
    assert vs.ids == sorted([uid0, uid1])
    np.testing.assert_array_equal(vs.volumes[vs.ids.index(uid0)], newer.data)
    rej = [r for r in vs.rejects if r.kind == "study"]
    assert [(r.id, r.category) for r in rej] == [(uid2, "stale_preprocessing")]
    assert "assemble-0" in rej[0].reason and "reassemble" in rej[0].reason
    assert not list((tmp_path / "cache2").rglob("*.npz"))  # nothing copied into the cache

    # training's DATA argument takes the storage root the same way (through this module)
    via_train = resolve_data(store_root, cache_dir=tmp_path / "cache3")
    assert sorted(via_train.ids) == sorted([uid0, uid1])
