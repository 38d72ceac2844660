"""Chest radiographs for training the 2-D presets: folders of PNG/JPEG files or of CR/DX DICOM studies.

Why through ``triage.assemble.folders.folder_studies``: it is what ``triage score`` reads, so an image
trains exactly as it is scored (the same frontal-view choice, LUTs, resize and 7-bit normalisation in
:mod:`triage.assemble.radiograph`). Public chest datasets are published as image files (ChestX-ray14 as
PNG, CheXpert as JPEG); such a file is one study known by its file name, which is also its key in
labels.csv (``study_uid`` column = the file name). DICOM studies are known by their Study Instance UID
as for head CT. No cache: a radiograph assembles in well under 0.1 s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import TrainingError
from triage.assemble.folders import folder_studies
from triage.assemble.radiograph import IMAGE_SUFFIXES, study_kind
from triage.assemble.volume import group_studies, read_headers
from triage.config import AssemblySettings
from triage.model.labels import LabelsError, read_labels
from triage.ops.logs import get_logger

log = get_logger("data")

__all__ = ["Radiographs", "is_radiograph_source", "radiographs_from_folder"]

@dataclass
class Radiographs:
    """What :func:`training.data.sources.as_volume_set` turns into a VolumeSet (that module calls
    this one, so this one does not import it back)."""

    volumes: list[np.ndarray]
    ids: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


_PROBE_FILES = 200  # files looked at to tell a radiograph folder from a head-CT one


def is_radiograph_source(path: str | os.PathLike[str]) -> bool:
    """True for a folder (or file) of PNG/JPEG images, or whose first DICOM study is CR/DX."""
    p = Path(path)
    files = [p] if p.is_file() else []
    if p.is_dir():
        for i, f in enumerate(sorted(p.rglob("*"))):
            if i >= _PROBE_FILES:
                break
            if f.is_file():
                files.append(f)
    if any(f.suffix.lower() in IMAGE_SUFFIXES for f in files):
        return True
    candidates = [f for f in files if f.suffix.lower() not in (".npz", ".csv", ".jsonl", ".json", ".txt")]
    headers, _ = read_headers(candidates[:20])
    studies = group_studies(headers)
    return bool(studies) and all(study_kind(s) == "cxr" for s in studies.values())


def radiographs_from_folder(
    path: str | os.PathLike[str], labels_csv: str | os.PathLike[str] | None = None, only: str | None = None,
) -> Radiographs:
    """Every radiograph under ``path`` as a 512x512 uint8 image, id = study UID or file name.

    ``only`` (with ``labels_csv``) keeps the studies of that label; unusable studies are listed in
    ``skipped`` with their reason.
    """
    p = Path(path)
    if only and not labels_csv:
        raise TrainingError(f"--only {only} needs --labels CSV (study_uid,label,lesion)")
    labels = {}
    if labels_csv:
        try:
            labels = read_labels(labels_csv)
        except LabelsError as exc:
            raise TrainingError(str(exc)) from None
    volumes: list[np.ndarray] = []
    ids: list[str] = []
    skipped: list[str] = []
    for st in folder_studies([p], AssemblySettings()):
        if only and (st.study_uid not in labels or labels[st.study_uid].label != only):
            continue
        if st.volume is None or st.volume.data.ndim != 2:
            skipped.append(f"{st.study_uid}: {st.reason or 'not a radiograph'}")
            log.info("study_skipped", study_uid=st.study_uid, reason=st.reason or "not a radiograph")
            continue
        volumes.append(st.volume.data)
        ids.append(st.study_uid)
    meta = {"source": str(p), "format": "radiograph"}
    if only:
        meta.update(labels=str(labels_csv), only=only)
    vs = Radiographs(volumes, ids, meta, skipped)
    if not len(vs):
        raise TrainingError(f"{p}: no usable radiograph ({len(skipped)} skipped)")
    return vs
