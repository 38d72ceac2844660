"""Folders -> scored-ready volumes, for the offline commands (`triage score`, `triage models create`).

The daemon gets its volumes from the store; these commands get them from folders of DICOM files
(searched recursively) or of volumes already built (.npz from ``save_volume``). Both go through
``triage.assemble.volume`` (head CT) or ``triage.assemble.radiograph`` (chest radiographs: the study's
images decide) so an offline score equals the daemon's score for the same study.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from triage.assemble.radiograph import IMAGE_SUFFIXES, assemble_by_kind, image_file_volume, load_assembled
from triage.assemble.volume import (
    AssembledVolume,
    VolumeError,
    group_studies,
    read_headers,
)
from triage.config import AssemblySettings
from triage.ops.logs import get_logger

log = get_logger("offline")


@dataclass
class FolderStudy:
    study_uid: str
    series_uid: str | None
    volume: AssembledVolume | None
    reason: str | None = None  # why there is no volume
    warnings: list[str] = field(default_factory=list)  # selection's and the volume's, for the result
    selection: str = ""  # what the chosen series is and by which rule it won


def list_files(paths: Sequence[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(f for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def folder_studies(paths: Sequence[str | Path], rules: AssemblySettings) -> Iterator[FolderStudy]:
    """Every study under ``paths``: DICOM files are assembled, .npz volumes are read as they are, PNG
    and JPEG files are chest radiographs known by their file name."""
    files = list_files(paths)
    npz = [f for f in files if f.suffix == ".npz"]
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    dicom = [f for f in files if f.suffix != ".npz" and f.suffix.lower() not in IMAGE_SUFFIXES
             and f.name not in ("labels.csv", "truth.jsonl")]
    seen: set[str] = set()
    for f in images:  # plain radiograph files (PNG, JPEG): one study each, known by the file name
        if f.name in seen:
            yield FolderStudy(study_uid=f.name, series_uid=None, volume=None,
                              reason=f"{f}: a second image file of this name (files are known by name)")
            continue
        seen.add(f.name)
        try:
            img = image_file_volume(f)
        except VolumeError as exc:
            yield FolderStudy(study_uid=f.name, series_uid=None, volume=None, reason=str(exc))
            continue
        yield FolderStudy(f.name, f.name, img, selection="plain image file")
    for f in npz:
        try:
            vol = load_assembled(f)
        except VolumeError as exc:
            yield FolderStudy(study_uid=f.stem, series_uid=None, volume=None, reason=str(exc))
            continue
        yield FolderStudy(vol.study_uid or f.stem, vol.series_uid or None, vol, warnings=list(vol.warnings))
    headers, errors = read_headers(dicom)
    for path, reason in errors.items():
        log.info("file_skipped", file=str(path), reason=reason)
    for study_uid, series in sorted(group_studies(headers).items()):
        sel, vol = assemble_by_kind(series, rules)  # head CT or chest radiograph, by the images
        if vol is None or sel.chosen is None:
            yield FolderStudy(study_uid, None, None, sel.reason or "no usable series")
        else:
            warnings = list(dict.fromkeys([*sel.warnings, *vol.warnings]))  # one line per warning
            yield FolderStudy(study_uid, sel.chosen, vol, warnings=warnings, selection=sel.why)
