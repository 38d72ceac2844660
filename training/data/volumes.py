"""DICOM folders (or the daemon's archive) -> cached canonical volumes for training.

Why this module exists: training must see exactly the volumes the daemon scores, so every study goes
through :mod:`triage.assemble.volume` (``read_headers`` -> ``group_studies`` -> ``select_series`` ->
``build_volume``, falling back to the next candidate series like the daemon's pipeline does); there is
no second reader here. What this module adds is what training needs on top:

Cache
    Each volume is decoded once and read back on later calls (:mod:`training.data.cache`: keyed by
    series, its SOP Instance UIDs, the voxel-changing assembly rules and the preprocessing version, so
    nothing stale is ever read; failures are cached too, so a second call decodes nothing at all).
    Headers are re-read on every call (no pixels: ~2 ms a file) because they decide the key.

Sources
    A folder searched recursively for DICOM files (non-DICOM files are skipped with a reason), or the
    daemon's storage root (``state.db`` beside ``volumes/``): its ``volumes/**.npz`` were written by
    ``save_volume`` and are read as they are (the newest volume of a study wins; one built by another
    preprocessing version is rejected with a reason, never silently mixed in). A folder of such
    ``.npz`` files alone is read the same way.

Quality control
    Every study that yields no volume is listed with a reason and a short category, returned in
    ``rejects`` and written to ``<cache_dir>/rejects.csv`` (files that are not DICOM go there too,
    ``kind=file``), so a curator can see what the training set lost and why.

Labels and splits
    ``labels`` (labels.csv: ``study_uid,label,lesion``) with ``only="normal"`` keeps the normals;
    the selection happens before decoding, so unwanted studies cost nothing. Without ``only`` every
    study is kept, labelled or not (labels are read by :mod:`triage.model.labels`, the one reader).
    :func:`split_by_patient` splits by :func:`triage.assemble.patient.patient_key` (issuer + PatientID,
    the same key the nightly retrain holds out by), so one patient's studies never sit on both sides of
    a split; the raw ID is read, hashed and dropped, and only the key is kept or logged.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from training.data.cache import (
    Candidate,
    Job,
    Outcome,
    assemble_cached,
    cache_key,
    default_cache_dir,
    rules_digest,
)
from training.errors import TrainingError
from triage.assemble.patient import patient_key, patient_key_of_file, quiet_validation
from triage.assemble.volume import (
    PREPROCESSING_VERSION,
    InstanceHeader,
    VolumeError,
    group_studies,
    load_volume,
    read_headers,
    select_series,
)
from triage.config import AssemblySettings
from triage.model.labels import Label, LabelsError
from triage.model.labels import read_labels as _read_labels
from triage.ops.logs import get_logger

log = get_logger("data")

REJECTS_CSV = "rejects.csv"
# Files that are certainly not DICOM instances: skipped without opening them (a dataset folder holds
# labels.csv and truth.jsonl beside the studies, an archive holds its database).
NOT_DICOM_SUFFIXES = frozenset(
    {".npz", ".npy", ".json", ".jsonl", ".csv", ".png", ".jpg", ".pt", ".ckpt", ".db", ".toml", ".txt",
     ".log", ".md", ".wal", ".shm", ".db-wal", ".db-shm", ".tmp", ".py", ".html", ".pdf", ".xml"}
)
_PATHS_IN_META = ("source", "cache", "rejects_csv", "labels")  # long; the log line keeps the counts


class DataError(TrainingError):
    """The data source cannot be read at all (no such folder, unreadable labels); names what and where.

    A :class:`~training.errors.TrainingError`, so ``training train`` reports it as one line."""


# --------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class VolumeItem:
    """One usable study: where its volume is and what is known about it (no PHI: ``patient_key`` is
    :func:`triage.assemble.patient.patient_key` of issuer + PatientID, or of the study UID when the
    PatientID is empty or unknown)."""

    study_uid: str
    series_uid: str
    path: Path  # the .npz (cache entry or archive file)
    patient_key: str
    label: str | None = None
    lesion: str | None = None
    zero_fraction: float = 0.0
    warnings: tuple[str, ...] = ()
    cached: bool = False  # True when read from the cache or the archive, False when built now


@dataclass(frozen=True)
class Reject:
    """A study (``kind="study"``, ``id`` = study UID) or a file (``kind="file"``, ``id`` = path) that
    yields no volume, with a short ``category`` for counting and the full ``reason`` for people."""

    kind: str
    id: str
    category: str
    reason: str


@dataclass(eq=False)
class DicomVolumes(Sequence):
    """What :func:`volumes_from_dicom` returns: a volume source in the shape
    :class:`training.data.sources.VolumeSet` takes (``volumes``, ``ids`` = study UIDs, ``meta``,
    ``skipped``) plus the per-study ``items`` (aligned with ``ids``) and the ``rejects``."""

    volumes: list[np.ndarray]
    ids: list[str]
    items: list[VolumeItem]
    meta: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "path: reason" of files that are not usable
    rejects: list[Reject] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        return self.volumes[i]

    def subset(self, keep: Sequence[VolumeItem] | Callable[[VolumeItem], bool], **meta: Any) -> DicomVolumes:
        """The studies in ``keep`` (items, e.g. one side of :func:`split_by_patient`) or passing it."""
        if callable(keep):
            want = {it.study_uid for it in self.items if keep(it)}
        else:
            want = {it.study_uid for it in keep}
        idx = [i for i, it in enumerate(self.items) if it.study_uid in want]
        return DicomVolumes(
            [self.volumes[i] for i in idx],
            [self.ids[i] for i in idx],
            [self.items[i] for i in idx],
            {**self.meta, **meta, "count": len(idx)},
            list(self.skipped),
            list(self.rejects),
        )


# --------------------------------------------------------------------------------------------------
# labels


def read_labels(path: str | os.PathLike[str]) -> dict[str, Label]:
    """labels.csv -> {study_uid: Label(label, lesion)} through the one reader
    (:func:`triage.model.labels.read_labels`); a bad file is a :class:`DataError` naming file and line."""
    try:
        return _read_labels(path)
    except LabelsError as exc:
        raise DataError(str(exc)) from None


# --------------------------------------------------------------------------------------------------
# patients and splits


T = TypeVar("T")


def split_by_patient(
    items: Sequence[T],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    key: Callable[[T], str] | None = None,
) -> tuple[list[T], ...]:
    """Split ``items`` into ``len(fractions)`` parts (train, val, test) with no patient in two parts.

    Patients are ordered by a seeded hash of their key and cut where the running share of *studies*
    crosses the fractions (a patient goes where the middle of its studies falls), so the parts hold
    about the asked share of studies and a patient with many studies stays whole. Why a hash order
    and not a shuffle: the order of two patients depends only on the seed and the two keys, so when
    the archive grows and is split again, patients only move near the cut points. ``key`` gives an
    item's patient key (default: its ``patient_key`` attribute or mapping entry); items keep their
    input order within a part.
    """
    fr = [float(f) for f in fractions]
    if not fr or any(not math.isfinite(f) or f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {list(fractions)}")

    def default_key(it: T) -> str:
        if isinstance(it, dict):
            return str(it["patient_key"])
        return str(it.patient_key)  # type: ignore[attr-defined]

    get = key or default_key
    by_patient: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_patient.setdefault(str(get(it)), []).append(i)
    order = sorted(by_patient, key=lambda k: hashlib.sha256(f"{int(seed)}\0{k}".encode()).hexdigest())
    bounds = np.cumsum(fr)
    total = max(1, len(items))
    part_of: dict[int, int] = {}
    done = 0
    for k in order:
        n = len(by_patient[k])
        mid = (done + n / 2) / total
        part = min(int(np.searchsorted(bounds, mid, side="right")), len(fr) - 1)
        while fr[part] == 0 and part > 0:  # a zero fraction never receives anyone
            part -= 1
        for i in by_patient[k]:
            part_of[i] = part
        done += n
    parts: tuple[list[T], ...] = tuple([] for _ in fr)
    for i, it in enumerate(items):
        parts[part_of[i]].append(it)
    return parts


# --------------------------------------------------------------------------------------------------
# sources


def is_storage_root(path: Path) -> bool:
    """The daemon's storage root: ``state.db`` beside a ``volumes/`` folder."""
    return (path / "volumes").is_dir() and (path / "state.db").is_file()


def _walk_files(root: Path, exclude: Path | None) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, dirs, names in os.walk(root):
        d = Path(dirpath)
        dirs[:] = sorted(
            x for x in dirs
            if not x.startswith(".") and (exclude is None or (d / x).resolve() != exclude)
        )
        for n in sorted(names):
            if not n.startswith("."):
                yield d / n


def _category_of(sel_categories: dict[str, str]) -> str:
    cats = set(sel_categories.values())
    return cats.pop() if len(cats) == 1 else "no_series"


def _dicom_jobs(
    root: Path, rules: AssemblySettings, cache_dir: Path, keep_study: Callable[[str], bool]
) -> tuple[list[Job], list[Reject], list[str], int]:
    """Headers of every file below ``root`` -> one job per wanted study; file rejects; dropped count."""
    files, rejects, skipped = [], [], []
    for p in _walk_files(root, cache_dir.resolve() if cache_dir.exists() else None):
        if p.suffix.lower() in NOT_DICOM_SUFFIXES:
            skipped.append(f"{p}: not DICOM ({p.suffix} file)")  # expected company: not a reject
        else:
            files.append(p)
    headers, errors = read_headers(files)
    for path, reason in sorted(errors.items()):
        skipped.append(f"{path}: {reason}")
        rejects.append(Reject("file", str(path), "not_dicom", reason))
    no_study = [h for h in headers if not h.study_uid]
    for h in no_study:
        reason = "no StudyInstanceUID"
        skipped.append(f"{h.path}: {reason}")
        rejects.append(Reject("file", str(h.path), "invalid", reason))
    studies = group_studies(h for h in headers if h.study_uid)
    digest = rules_digest(rules)
    jobs: list[Job] = []
    dropped = 0
    for study_uid in sorted(studies):
        if not keep_study(study_uid):
            dropped += 1
            continue
        series: dict[str, list[InstanceHeader]] = studies[study_uid]
        sel = select_series(series, rules)
        cands = tuple(
            Candidate(uid, tuple(sorted(h.path for h in series[uid])),
                       cache_key(uid, [h.sop_instance_uid for h in series[uid]], digest))
            for uid in sel.candidates
        )
        first = cands[0].paths[0] if cands else None
        jobs.append(Job(study_uid, cands, sel.reason, _category_of(sel.categories), first))
    return jobs, rejects, skipped, dropped


def _archive_patient(root: Path, sop_uids: Sequence[str]) -> str | None:
    """Patient key of an archived study from one of its spooled instances, when the spool still has it
    (retention may have removed the DICOM files and kept the volume)."""
    db = root / "state.db"
    if not sop_uids or not db.is_file():
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
        try:
            row = con.execute("SELECT path FROM instances WHERE sop_uid = ?", (sop_uids[0],)).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    if not row:
        return None
    p = Path(row[0])
    p = p if p.is_absolute() else root / p
    return patient_key_of_file(p) if p.is_file() else None


def _from_npz(
    root: Path, files: list[Path], keep_study: Callable[[str], bool], store_root: Path | None
) -> tuple[list[tuple[VolumeItem, np.ndarray]], list[Reject], list[str], int]:
    """Volumes written by ``save_volume`` (the archive, or a folder of them): newest per study."""
    rejects: list[Reject] = []
    skipped: list[str] = []
    newest: dict[str, tuple[float, Path, Any]] = {}
    stale: dict[str, tuple[float, str]] = {}
    for f in files:
        try:
            vol = load_volume(f)
        except VolumeError as exc:
            skipped.append(f"{f}: {exc.reason}")
            rejects.append(Reject("file", str(f), "invalid", exc.reason))
            continue
        uid = vol.study_uid or f.relative_to(root).with_suffix("").as_posix()
        mtime = f.stat().st_mtime
        if vol.preprocessing_version != PREPROCESSING_VERSION:
            why = (f"{f}: built by preprocessing {vol.preprocessing_version or '(unknown)'}, this code is "
                   f"{PREPROCESSING_VERSION}; reassemble it from DICOM")
            if mtime >= stale.get(uid, (-1.0, ""))[0]:
                stale[uid] = (mtime, why)
            continue
        if uid not in newest or mtime >= newest[uid][0]:
            newest[uid] = (mtime, f, vol)
    for uid, (_, why) in sorted(stale.items()):
        if uid not in newest and keep_study(uid):
            rejects.append(Reject("study", uid, "stale_preprocessing", why))
    out: list[tuple[VolumeItem, np.ndarray]] = []
    dropped = 0
    for uid in sorted(newest):
        if not keep_study(uid):
            dropped += 1
            continue
        _, f, vol = newest[uid]
        key = _archive_patient(store_root, vol.sop_instance_uids) if store_root else None
        item = VolumeItem(uid, vol.series_uid, f, key or patient_key("", study_uid=uid),
                          zero_fraction=vol.zero_fraction,
                          warnings=tuple(vol.warnings), cached=True)
        out.append((item, vol.data))
    return out, rejects, skipped, dropped


def _write_rejects(cache_dir: Path, rejects: Sequence[Reject]) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / REJECTS_CSV
    fd, tmp = tempfile.mkstemp(prefix=f".{REJECTS_CSV}.", suffix=".tmp", dir=cache_dir)
    with os.fdopen(fd, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["kind", "id", "category", "reason"])
        for r in rejects:
            w.writerow([r.kind, r.id, r.category, r.reason])
    os.replace(tmp, path)
    return path


def volumes_from_dicom(
    path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    only: str | None = None,
    rules: AssemblySettings | None = None,
    workers: int = 1,
) -> DicomVolumes:
    """Every usable study below ``path`` as a canonical uint8 volume, through the cache.

    ``path``: a folder of DICOM studies (searched recursively), the daemon's storage root, or a folder
    of ``save_volume`` .npz files. ``labels``: labels.csv; with ``only`` (e.g. ``"normal"``, compared
    case-insensitively) only studies with that label are kept (unlabelled ones are dropped and
    counted), without it every study is kept and labelled where the file knows it. ``rules``: the
    assembly rules (default: the daemon's defaults; pass ``cfg.settings.assembly`` to match a site's
    config). ``workers`` > 1 builds volumes in that many processes.

    Raises :class:`DataError` only when the source itself is unusable; bad studies and files are
    rejected, listed in ``rejects`` and in ``<cache_dir>/rejects.csv``.
    """
    # pydicom's validation messages quote the values they reject (a birth date, a name): never here.
    with quiet_validation():
        return _volumes_from_dicom(Path(path), cache_dir, labels, only, rules, workers)


def _volumes_from_dicom(
    root: Path,
    cache_dir: str | os.PathLike[str] | None,
    labels: str | os.PathLike[str] | None,
    only: str | None,
    rules: AssemblySettings | None,
    workers: int,
) -> DicomVolumes:
    """:func:`volumes_from_dicom`'s work, run with pydicom's value validation quiet."""
    if not root.exists():
        raise DataError(f"{root}: no such file or folder")
    if only is not None and labels is None:
        raise DataError(f"only={only!r} needs a labels.csv (study_uid,label,lesion)")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    rules = rules or AssemblySettings()
    known = read_labels(labels) if labels is not None else {}
    want = only.strip().lower() if only is not None else None

    def keep_study(uid: str) -> bool:
        return want is None or known.get(uid, ("", ""))[0] == want

    def label_of(uid: str) -> tuple[str | None, str | None]:
        lab = known.get(uid)
        return (lab[0], lab[1]) if lab else (None, None)

    pairs: list[tuple[VolumeItem, np.ndarray]] = []
    rejects: list[Reject] = []
    built = 0
    store_root = root if root.is_dir() and is_storage_root(root) else None
    npz_files = sorted((store_root / "volumes").rglob("*.npz")) if store_root else []
    plain_npz = (
        not store_root and root.is_dir() and any(root.rglob("*.npz")) and not _has_dicom(root, cache)
    )
    if store_root or plain_npz:
        source = "archive" if store_root else "npz"
        files = npz_files if store_root else sorted(f for f in root.rglob("*.npz")
                                                    if not f.resolve().is_relative_to(cache.resolve()))
        found, rejects, skipped, dropped = _from_npz(store_root / "volumes" if store_root else root, files,
                                                     keep_study, store_root)
        for item, data in found:
            lab, les = label_of(item.study_uid)
            pairs.append((_with_label(item, lab, les), data))
    else:
        source = "dicom"
        jobs, rejects, skipped, dropped = _dicom_jobs(root, rules, cache, keep_study)
        outcomes = _run_jobs(jobs, rules, cache, workers)
        for job, oc in zip(jobs, outcomes, strict=True):
            built += oc.built
            if oc.path is None:
                rejects.append(Reject("study", oc.study_uid, oc.category, oc.reason))
                log.info("study_rejected", study_uid=oc.study_uid, category=oc.category, reason=oc.reason)
                continue
            key = patient_key_of_file(job.patient_file, oc.study_uid) if job.patient_file else None
            lab, les = label_of(oc.study_uid)
            assert oc.series_uid is not None
            item = VolumeItem(oc.study_uid, oc.series_uid, oc.path,
                              key or patient_key("", study_uid=oc.study_uid), lab, les,
                              oc.zero_fraction, oc.warnings, oc.cached)
            try:
                pairs.append((item, load_volume(oc.path).data))
            except VolumeError as exc:  # removed or damaged between build and read
                rejects.append(Reject("study", oc.study_uid, "cache", exc.reason))
    pairs.sort(key=lambda p: p[0].study_uid)
    items = [p[0] for p in pairs]
    rejects_csv = _write_rejects(cache, rejects)
    n_study_rejects = sum(1 for r in rejects if r.kind == "study")
    meta = {
        "source": str(root),
        "format": source,
        "cache": str(cache),
        "preprocessing_version": PREPROCESSING_VERSION,
        "count": len(items),
        "built": built,
        "from_cache": sum(1 for it in items if it.cached),
        "rejected_studies": n_study_rejects,
        "skipped_files": len(skipped),
        "rejects_csv": str(rejects_csv),
    }
    if labels is not None:
        meta["labels"] = str(labels)
    if want is not None:
        meta["only"] = only
        meta["dropped_by_label"] = dropped
    log.info("volumes_ready", **{k: v for k, v in meta.items() if k not in _PATHS_IN_META})
    return DicomVolumes([p[1] for p in pairs], [it.study_uid for it in items], items, meta, skipped, rejects)


def _with_label(item: VolumeItem, label: str | None, lesion: str | None) -> VolumeItem:
    return VolumeItem(item.study_uid, item.series_uid, item.path, item.patient_key, label, lesion,
                      item.zero_fraction, item.warnings, item.cached)


def _has_dicom(root: Path, cache: Path) -> bool:
    """Any file below ``root`` (outside the cache) that is not obviously something else."""
    excl = cache.resolve() if cache.exists() else None
    return any(p.suffix.lower() not in NOT_DICOM_SUFFIXES for p in _walk_files(root, excl))


def _run_jobs(jobs: list[Job], rules: AssemblySettings, cache: Path, workers: int) -> list[Outcome]:
    if workers <= 1 or len(jobs) < 2:
        return [assemble_cached(j, rules, cache) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(assemble_cached, jobs, [rules] * len(jobs), [cache] * len(jobs), chunksize=1))


__all__ = [
    "DataError",
    "DicomVolumes",
    "Reject",
    "VolumeItem",
    "cache_key",
    "default_cache_dir",
    "is_storage_root",
    "patient_key",
    "read_labels",
    "split_by_patient",
    "volumes_from_dicom",
]
