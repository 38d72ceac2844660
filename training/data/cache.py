"""The volume cache of training's data: each study decoded once, read back on later calls.

Decoding a study costs ~0.3 s, and an epoch visits every study, so each volume is written once with
:func:`triage.assemble.volume.save_volume`. The key is the series UID, a hash of its SOP Instance UIDs,
the assembly rules that can change a voxel and
:data:`~triage.assemble.volume.PREPROCESSING_VERSION`: a re-sent series with another instance, a changed
rule or a new preprocessing version gets a new key and is rebuilt; nothing stale is ever read. Series
that could not be built are cached too (a small JSON with the reason), so a second call decodes
nothing. :mod:`training.data.volumes` decides what to build; this module only builds or reads back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triage.assemble.volume import PREPROCESSING_VERSION, VolumeError, build_volume, load_volume, save_volume
from triage.config import AssemblySettings
from triage.ops.logs import get_logger

log = get_logger("data")

CACHE_FORMAT = "glowtriage.volume-cache/1"
# Assembly rules that decide *when* a series is complete, not what its volume looks like: changing them
# must not throw the cache away.
TIMING_RULES = ("quiet_seconds", "force_seconds")
SAFE_UID = re.compile(r"[0-9][0-9.]{0,63}")


def default_cache_dir() -> Path:
    """``$GLOWTRIAGE_CACHE``, else ``~/.cache/glowtriage/volumes`` (the same place ``training train``
    uses)."""
    env = os.environ.get("GLOWTRIAGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "glowtriage" / "volumes"


def rules_digest(rules: AssemblySettings) -> str:
    """Hash of the assembly rules that can change a voxel (the timing rules cannot)."""
    d = {k: v for k, v in rules.model_dump(mode="json").items() if k not in TIMING_RULES}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def safe_name(uid: str) -> str:
    """A UID as a file name; anything that is not a plain UID (``..``, ``/``) becomes its hash."""
    return uid if SAFE_UID.fullmatch(uid) else "h" + hashlib.sha256(uid.encode()).hexdigest()[:32]


def cache_key(series_uid: str, sop_instance_uids: Sequence[str], rules_hash: str) -> str:
    """What a cached volume depends on: series, its instances (as a set), rules, preprocessing."""
    h = hashlib.sha256()
    sops = sorted(set(sop_instance_uids))
    for part in (CACHE_FORMAT, PREPROCESSING_VERSION, rules_hash, series_uid, *sops):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


@dataclass(frozen=True)
class Candidate:
    """One series that may give the study's volume, with its files and its cache key."""

    series_uid: str
    paths: tuple[Path, ...]
    key: str


@dataclass(frozen=True)
class Job:
    """One study to assemble: its candidate series in the daemon's order, or why none qualified."""

    study_uid: str
    candidates: tuple[Candidate, ...]
    selection_reason: str | None  # set when no series qualified
    selection_category: str
    patient_file: Path | None


@dataclass(frozen=True)
class Outcome:
    """What assembling one study gave: the volume's cache file, or the category and reason it failed."""

    study_uid: str
    series_uid: str | None
    path: Path | None
    cached: bool
    built: int  # series decoded in this call (0 when everything came from the cache)
    zero_fraction: float = 0.0
    warnings: tuple[str, ...] = ()
    category: str = ""
    reason: str = ""


def entry_paths(cache_dir: Path, study_uid: str, cand: Candidate) -> tuple[Path, Path]:
    """(volume .npz, failure marker .failed.json) of one candidate series in the cache."""
    folder, name = cache_dir / safe_name(study_uid), f"{safe_name(cand.series_uid)}-{cand.key}"
    return folder / f"{name}.npz", folder / f"{name}.failed.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write via a temporary file and rename, so a reader never sees half a marker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


def assemble_cached(job: Job, rules: AssemblySettings, cache_dir: Path) -> Outcome:
    """The daemon's selection order with a cache in front of ``build_volume``: the first candidate
    whose cached volume exists (or that builds now) wins; a cached failure moves on without decoding."""
    if not job.candidates:
        return Outcome(job.study_uid, None, None, True, 0, category=job.selection_category,
                        reason=job.selection_reason or "no series")
    failures: list[str] = []
    built = 0
    last_category = "build"
    for cand in job.candidates:
        npz, failed = entry_paths(cache_dir, job.study_uid, cand)
        if npz.exists():
            try:
                vol = load_volume(npz)
                if vol.preprocessing_version == PREPROCESSING_VERSION and vol.study_uid == job.study_uid:
                    return Outcome(job.study_uid, cand.series_uid, npz, built == 0, built,
                                    vol.zero_fraction, tuple(vol.warnings))
            except VolumeError as exc:  # a damaged cache file is rebuilt, not trusted
                log.warning("cache_entry_unreadable", study_uid=job.study_uid, reason=exc.reason)
        if failed.exists():
            try:
                f = json.loads(failed.read_text())
                failures.append(f"{cand.series_uid}: {f['reason']}")
                last_category = str(f.get("category", "build"))
                continue
            except (OSError, ValueError, KeyError):
                pass  # unreadable marker: try to build again
        built += 1
        try:
            vol = build_volume(list(cand.paths), rules)
        except VolumeError as exc:
            write_json_atomic(failed, {"format": CACHE_FORMAT, "reason": exc.reason,
                                        "category": exc.category,
                                        "preprocessing_version": PREPROCESSING_VERSION})
            failures.append(f"{cand.series_uid}: {exc.reason}")
            last_category = exc.category
            continue
        save_volume(vol, npz)
        return Outcome(job.study_uid, cand.series_uid, npz, False, built, vol.zero_fraction,
                        tuple(vol.warnings))
    return Outcome(job.study_uid, None, None, built == 0, built, category=last_category,
                    reason="no candidate series could be built (" + "; ".join(failures) + ")")
