"""Volume sources for training: what ``training train DATA`` turns into a :class:`VolumeSet`.

A *volume source* is uint8 volumes in any shape that ``triage.model.glow.fit_to_shape`` reduces to a
preset's ``image_shape`` (the same code as scoring), with ids. :func:`resolve_data` makes one from a
folder: DICOM studies go through :func:`training.data.volumes.volumes_from_dicom` (and so through
``triage.assemble.volume``, the scoring code path); otherwise ``*.npz`` volumes (key ``data``, optional
``study_uid``) are read, which is how the daemon's archive and the volume cache store them.

Kept apart from the training loop because the loop only needs volumes and ids: where they come from
(folders, the archive, labels) is the data side's business.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from training.data.volumes import NOT_DICOM_SUFFIXES, default_cache_dir, read_labels, volumes_from_dicom
from training.errors import TrainingError
from triage.model.glow import GlowConfig, fit_to_shape
from triage.ops.logs import get_logger

log = get_logger("train")



@dataclass(eq=False)
class VolumeSet(Sequence):
    """uint8 volumes (numpy arrays or tensors, any canonical shape) with one id each.

    ``ids`` are study UIDs where the source knows them (labels.csv is keyed by study UID), else paths
    relative to the source folder. ``meta`` describes where the set came from; it goes into the model's
    provenance as it is, so it holds JSON values only.
    """

    volumes: list[Any]
    ids: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "path: reason" of files that could not be used

    def __post_init__(self) -> None:
        self.volumes = list(self.volumes)
        self.ids = [str(i) for i in self.ids]
        if len(self.volumes) != len(self.ids):
            raise ValueError(f"VolumeSet: {len(self.volumes)} volumes but {len(self.ids)} ids")

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        return self.volumes[i]

    def select(self, keep: Callable[[str], bool], **meta: Any) -> VolumeSet:
        pairs = [(v, i) for v, i in zip(self.volumes, self.ids, strict=True) if keep(i)]
        return VolumeSet([v for v, _ in pairs], [i for _, i in pairs], {**self.meta, **meta}, self.skipped)


def _npz_text(z: Any, key: str) -> str | None:
    if key not in z.files:
        return None
    v = z[key]
    v = v.item() if getattr(v, "ndim", 1) == 0 else v
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return str(v).strip() or None


def load_volume_dir(path: str | os.PathLike[str]) -> VolumeSet:
    """Every ``*.npz`` below ``path`` (recursively, sorted), key ``data`` (uint8).

    A file that cannot be read, lacks ``data`` or is not uint8 is skipped with a warning naming it
    (one damaged file in a months-old archive must not stop the nightly retrain); the skipped files are
    listed in ``VolumeSet.skipped``.
    """
    root = Path(path)
    if root.is_file() and root.suffix == ".npz":
        files, base = [root], root.parent
    elif root.is_dir():
        files, base = sorted(root.rglob("*.npz")), root
    else:
        raise TrainingError(f"{root}: no such folder (expected a folder of DICOM studies or .npz volumes)")
    volumes: list[np.ndarray] = []
    ids: list[str] = []
    skipped: list[str] = []
    for f in files:
        reason = None
        try:
            with np.load(f, allow_pickle=False) as z:
                if "data" not in z.files:
                    reason = f"no 'data' array (has {', '.join(z.files) or 'nothing'})"
                else:
                    data = z["data"]
                    uid = _npz_text(z, "study_uid")
                    if data.dtype != np.uint8:
                        reason = f"'data' is {data.dtype}, expected uint8 (7-bit windowed volume)"
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            reason = f"unreadable: {exc}"
        if reason is not None:
            skipped.append(f"{f}: {reason}")
            log.warning("volume_skipped", path=str(f), reason=reason)
            continue
        volumes.append(data)
        ids.append(uid or f.relative_to(base).with_suffix("").as_posix())
    meta = {"source": str(root), "format": "npz", "skipped": len(skipped)}
    return VolumeSet(volumes, ids, meta, skipped)


def select_by_label(
    volumes: VolumeSet, labels: Mapping[str, str], only: str, labels_path: str = ""
) -> VolumeSet:
    """Keep the volumes whose study UID has label ``only`` (case-insensitive); unlabeled ones go."""
    want = only.strip().lower()
    known = {uid: lab.strip().lower() for uid, lab in labels.items()}
    unlabeled = sum(1 for i in volumes.ids if i not in known)
    if unlabeled:
        log.warning("volumes_without_label", count=unlabeled, labels=labels_path)
    out = volumes.select(lambda i: known.get(i) == want, labels=labels_path, only=only)
    if not len(out):
        present = sorted(set(known.values()))
        raise TrainingError(
            f"no volume of {volumes.meta.get('source', 'the data')} has label {only!r} "
            f"in {labels_path or 'labels'}"
            f" ({len(volumes)} volumes, {unlabeled} without a label; labels present: {', '.join(present)})"
        )
    return out


def contains_dicom(path: Path, max_files: int = 20000) -> bool:
    """True when a file below ``path`` is DICOM (``.dcm`` or the ``DICM`` magic at byte 128)."""
    if not path.is_dir():
        return False
    seen = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            suffix = os.path.splitext(name)[1].lower()
            if suffix == ".dcm":
                return True
            if suffix in NOT_DICOM_SUFFIXES:
                continue
            seen += 1
            if seen > max_files:
                return False
            try:
                with open(os.path.join(dirpath, name), "rb") as fh:
                    head = fh.read(132)
            except OSError:
                continue
            if head[128:132] == b"DICM":
                return True
    return False


def as_volume_set(obj: Any, source: str = "") -> VolumeSet:
    """Accept what a volume source returns: a VolumeSet, anything with ``volumes`` and ``ids``, a
    mapping id -> volume, or a sequence of (id, volume) pairs."""
    if isinstance(obj, VolumeSet):
        return obj
    if hasattr(obj, "volumes") and hasattr(obj, "ids"):
        meta = dict(getattr(obj, "meta", {}) or {})
        meta.setdefault("source", source)
        return VolumeSet(list(obj.volumes), list(obj.ids), meta, list(getattr(obj, "skipped", []) or []))
    if isinstance(obj, Mapping):
        return VolumeSet(list(obj.values()), list(obj.keys()), {"source": source})
    try:
        pairs = list(obj)
        return VolumeSet([v for _, v in pairs], [i for i, _ in pairs], {"source": source})
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"volume source for {source} returned {type(obj).__name__}, not volumes") from exc


def resolve_data(
    path: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str] | None = None,
    only: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> VolumeSet:
    """DATA argument -> VolumeSet.

    DICOM studies go through ``training.data.volumes.volumes_from_dicom(path, cache_dir, labels=, only=)``
    (labels is the CSV path), which also does the label selection; without DICOM the ``*.npz`` volumes
    are read and selected here by their ``study_uid``.
    """
    p = Path(path)
    if not p.exists():
        raise TrainingError(f"{p}: no such file or folder")
    if only and not labels_csv:
        raise TrainingError(f"--only {only} needs --labels CSV (study_uid,label,lesion)")
    from training.data.images import is_radiograph_source, radiographs_from_folder

    if is_radiograph_source(p):  # PNG/JPEG files or CR/DX studies: the 2-D presets' data
        return as_volume_set(radiographs_from_folder(p, labels_csv, only), source=str(p))
    if contains_dicom(p):
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        got = volumes_from_dicom(p, cache, labels=Path(labels_csv) if labels_csv else None, only=only)
        vs = as_volume_set(got, source=str(p))
        vs.meta.setdefault("format", "dicom")
        if only:
            vs.meta.update(labels=str(labels_csv), only=only)
        if not len(vs):
            raise TrainingError(f"{p}: no usable volume from the DICOM studies (see the log for reasons)")
        return vs
    vs = load_volume_dir(p)
    if only:
        known = {uid: label for uid, (label, _lesion) in read_labels(labels_csv).items()}  # type: ignore[arg-type]
        vs = select_by_label(vs, known, only, str(labels_csv))
    if not len(vs):
        extra = f"; skipped {len(vs.skipped)} unusable files" if vs.skipped else ""
        raise TrainingError(f"{p}: no .npz volumes (key 'data', uint8) found{extra}")
    return vs


def prepare_volumes(volumes: VolumeSet, cfg: GlowConfig) -> tuple[Tensor, list[str]]:
    """Validate, sort by id and reduce to the preset's shape: (N, C, *image_shape) uint8, ids.

    Sorting by id makes the data order a function of the *set* of volumes, not of the order a folder
    listing happened to return.
    """
    n = len(volumes)
    if n == 0:
        raise TrainingError("no volumes to train on")
    order = sorted(range(n), key=lambda i: (volumes.ids[i], i))
    top = 2**cfg.n_bits - 1
    out = torch.empty((n, cfg.in_channels, *cfg.image_shape), dtype=torch.uint8)
    for j, i in enumerate(order):
        vid = volumes.ids[i]
        v = volumes.volumes[i]
        t = v.detach().cpu() if isinstance(v, Tensor) else torch.from_numpy(np.array(v, copy=True))
        if t.dtype != torch.uint8:
            raise TrainingError(f"volume {vid}: dtype {t.dtype}, expected uint8 (7-bit windowed volume)")
        if t.dim() == cfg.ndim:
            t = t.unsqueeze(0)
        if t.dim() != cfg.ndim + 1 or t.shape[0] != cfg.in_channels:
            raise TrainingError(
                f"volume {vid}: shape {tuple(t.shape)} is not a {cfg.ndim}-D volume for preset "
                f"{cfg.extra.get('preset')}"
            )
        try:
            t = fit_to_shape(t, cfg.image_shape)
        except ValueError as exc:
            raise TrainingError(f"volume {vid}: {exc}") from exc
        vmax = int(t.max())
        if vmax > top:
            raise TrainingError(
                f"volume {vid}: values up to {vmax}, but the preset models {cfg.n_bits}-bit data (0..{top})"
            )
        out[j] = t
    return out, [volumes.ids[i] for i in order]


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 of the sorted ids: names a training set in provenance and checkpoints (order-free)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
