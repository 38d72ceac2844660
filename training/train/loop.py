"""Train M0 (``--role normal``, normal studies) or M1 (``--role mixture``, the unlabeled mixture).

One process or several under ``torchrun`` (DistributedDataParallel; gloo on the CPU, nccl on CUDA).
The run is a pure function of (data, preset, seed, number of steps), whatever the number of
processes and however often it was interrupted:

- Data order and dequantization noise come from two seeded ``torch.Generator``\\ s that every process
  advances identically. Each step draws the *global* batch (``batch_size`` of the preset) and its
  noise, and each rank trains on its own equal slice; DDP averages the per-rank mean gradients, which
  is the gradient of the global mean. So two processes follow the single-process loss curve up to
  float round-off, and a checkpoint written by one layout resumes in another.
- ActNorm is initialized from one seeded batch on every rank before DDP wraps the model, so the
  replicas start identical without a broadcast.
- A checkpoint (``<out>.ckpt``) holds model, optimizer, step, generator states and the position in
  the data order; ``--resume`` from it gives bit-for-bit the weights of an uninterrupted run on the
  CPU (deterministic algorithms are switched on there; on CUDA, equal up to kernel round-off). The
  learning-rate schedule depends on the step alone, so a finished run can also be extended with
  ``--resume --steps N``.
- A non-finite loss or gradient does not end a nightly run: the last state that proved finite is
  restored (model and Adam moments, kept in memory), the learning rate is halved for a while, and the
  event is counted in the model's provenance. Only ``max_nan_failures`` failures in a row give up.

Input is a *volume source* (:class:`VolumeSet`): uint8 volumes in any shape that
``triage.model.glow.fit_to_shape`` reduces to the preset's ``image_shape`` (the same code as scoring), with
ids. :func:`resolve_data` makes one from a folder: DICOM studies go through ``training.data.volumes`` (and
so through ``triage.assemble.volume``, the scoring code path); otherwise ``*.npz`` volumes (key ``data``,
optional ``study_uid``) are read, which is how the daemon's archive and training.data.volumes's cache store
them.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import importlib
import inspect
import json
import math
import os
import pickle
import platform
import sys
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from training.presets import config_from_preset
from triage.model.glow import Glow, GlowConfig, fit_to_shape
from triage.ops.logs import get_logger

ROLES = ("normal", "mixture")
CKPT_FORMAT = "glowtriage.train-ckpt/1"
LN2 = math.log(2.0)

log = get_logger("train")

# A hook for fault injection in tests: called before each step with (step, model, noise of this rank's
# slice); it may corrupt the noise or the weights in place, or raise to simulate a crash.
StepHook = Callable[[int, Glow, Tensor], None]


class TrainingError(Exception):
    """Training cannot start or go on: bad data or arguments, a checkpoint of another run, or a loss
    that stays non-finite. The message names what and where."""


# --------------------------------------------------------------------------------------------------
# Volume sources


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


def read_labels(path: str | os.PathLike[str]) -> dict[str, str]:
    """labels.csv (``study_uid,label[,lesion]``) -> {study_uid: label}."""
    p = Path(path)
    try:
        with p.open(newline="") as fh:
            reader = csv.DictReader(fh)
            cols = set(reader.fieldnames or [])
            if not {"study_uid", "label"} <= cols:
                raise TrainingError(f"{p}: needs columns study_uid,label; has {','.join(sorted(cols))}")
            out: dict[str, str] = {}
            for n, row in enumerate(reader, start=2):
                uid, label = (row.get("study_uid") or "").strip(), (row.get("label") or "").strip()
                if not uid or not label:
                    raise TrainingError(f"{p}, line {n}: empty study_uid or label")
                out[uid] = label
    except OSError as exc:
        raise TrainingError(f"{p}: cannot read labels: {exc}") from exc
    return out


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


_NOT_DICOM = {
    ".npz",
    ".npy",
    ".json",
    ".jsonl",
    ".csv",
    ".png",
    ".pt",
    ".ckpt",
    ".db",
    ".toml",
    ".txt",
    ".log",
    ".wal",
    ".shm",
    ".db-wal",
    ".db-shm",
}


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
            if suffix in _NOT_DICOM:
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


def _dicom_loader() -> Callable[..., Any] | None:
    try:
        mod = importlib.import_module("training.data.volumes")
    except ModuleNotFoundError as exc:
        if exc.name in ("training.data.volumes", "training"):
            return None
        raise
    fn = getattr(mod, "volumes_from_dicom", None)
    return fn if callable(fn) else None


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


def default_cache_dir() -> Path:
    env = os.environ.get("GLOWTRIAGE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "glowtriage" / "volumes"


def resolve_data(
    path: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str] | None = None,
    only: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> VolumeSet:
    """DATA argument -> VolumeSet.

    DICOM studies go through ``training.data.volumes.volumes_from_dicom(path, cache_dir, labels=, only=)``
    (labels is the CSV path), which also does the label selection; without DICOM (or without
    training.data.volumes) the ``*.npz`` volumes are read and selected here by their ``study_uid``.
    """
    p = Path(path)
    if not p.exists():
        raise TrainingError(f"{p}: no such file or folder")
    if only and not labels_csv:
        raise TrainingError(f"--only {only} needs --labels CSV (study_uid,label,lesion)")
    if contains_dicom(p):
        loader = _dicom_loader()
        if loader is not None:
            cache = Path(cache_dir) if cache_dir else default_cache_dir()
            got = loader(p, cache, labels=Path(labels_csv) if labels_csv else None, only=only)
            vs = as_volume_set(got, source=str(p))
            vs.meta.setdefault("format", "dicom")
            if only:
                vs.meta.update(labels=str(labels_csv), only=only)
            if not len(vs):
                raise TrainingError(f"{p}: no usable volume from the DICOM studies (see the log for reasons)")
            return vs
        if not any(p.rglob("*.npz")):
            raise TrainingError(
                f"{p} holds DICOM files, but training.data.volumes.volumes_from_dicom is not available "
                "to assemble them"
            )
    vs = load_volume_dir(p)
    if only:
        vs = select_by_label(vs, read_labels(labels_csv), only, str(labels_csv))  # type: ignore[arg-type]
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
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Training machinery


class _NLL(nn.Module):
    """Per-volume bits/dim of dequantized data; a module so DDP can hook its forward.

    Same quantity as ``Glow.bits_per_dim(x, noise=True)``, but the uniform noise is passed in: it is
    drawn for the whole global batch from the shared generator, so every layout sees the same noise.
    """

    def __init__(self, glow: Glow):
        super().__init__()
        self.glow = glow

    def forward(self, x_uint: Tensor, u: Tensor) -> Tensor:
        bins = float(2**self.glow.cfg.n_bits)
        x = self.glow.preprocess(x_uint) + (u - 0.5) / bins  # bin midpoint + offset = (x + u)/bins - 0.5
        lp = self.glow.log_prob(x)
        return -lp / (self.glow.cfg.n_dims * LN2) + self.glow.cfg.n_bits


class _Order:
    """Endless seeded stream of shuffled indices, epoch after epoch; its position is checkpointed."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.g = n, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0
        self.epoch = 0

    def take(self, k: int) -> Tensor:
        parts = []
        while k > 0:
            if self.pos == self.n:
                self.perm = torch.randperm(self.n, generator=self.g)
                self.pos, self.epoch = 0, self.epoch + 1
            m = min(k, self.n - self.pos)
            parts.append(self.perm[self.pos : self.pos + m])
            self.pos, k = self.pos + m, k - m
        return torch.cat(parts)

    def state(self) -> dict[str, Any]:
        return {"perm": self.perm.clone(), "pos": self.pos, "epoch": self.epoch, "rng": self.g.get_state()}

    def load(self, s: Mapping[str, Any]) -> None:
        if int(s["perm"].numel()) != self.n:
            raise TrainingError(
                f"checkpoint data order covers {s['perm'].numel()} volumes, the data has {self.n}"
            )
        self.perm, self.pos, self.epoch = s["perm"].clone(), int(s["pos"]), int(s["epoch"])
        self.g.set_state(s["rng"])


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


class _NanGuard:
    """Keeps the last state that proved finite and restores it when a step goes non-finite.

    A snapshot taken after step s is only a *candidate* until step s+1 also comes out finite: weights
    that an update already broke are not kept as "good". Each failure halves the learning rate until
    ``cooldown`` good steps have passed; ``max_failures`` failures in a row give up.
    """

    def __init__(self, every: int, max_failures: int, cooldown: int):
        self.every, self.max_failures, self.cooldown = max(1, every), max(1, max_failures), cooldown
        self.good: dict[str, Any] | None = None
        self.candidate: dict[str, Any] | None = None
        self.lr_scale = 1.0
        self.cooldown_left = 0
        self.consecutive = 0
        self.restores = 0

    @staticmethod
    def snapshot(glow: Glow, opt: torch.optim.Optimizer) -> dict[str, Any]:
        return {"model": _to_cpu(glow.state_dict()), "opt": _to_cpu(opt.state_dict())}

    def start(self, glow: Glow, opt: torch.optim.Optimizer) -> None:
        self.good = self.snapshot(glow, opt)
        self.candidate = None

    def success(self, steps_done: int, glow: Glow, opt: torch.optim.Optimizer) -> None:
        self.consecutive = 0
        if self.candidate is not None:
            self.good, self.candidate = self.candidate, None
        if self.cooldown_left:
            self.cooldown_left -= 1
            if not self.cooldown_left:
                self.lr_scale = 1.0
        if steps_done % self.every == 0:
            self.candidate = self.snapshot(glow, opt)

    def failure(self, step: int, glow: Glow, opt: torch.optim.Optimizer, why: str) -> None:
        self.consecutive += 1
        if self.consecutive >= self.max_failures:
            raise TrainingError(
                f"step {step}: {why}; {self.consecutive} consecutive non-finite steps even after restoring "
                f"the last good state and halving the learning rate (to x{self.lr_scale:g}); giving up"
            )
        assert self.good is not None
        self.candidate = None  # taken after the last update, which may be the one that broke things
        glow.load_state_dict(self.good["model"])
        opt.load_state_dict(self.good["opt"])
        self.restores += 1
        self.lr_scale *= 0.5
        self.cooldown_left = self.cooldown

    def state(self) -> dict[str, Any]:
        return {
            "lr_scale": self.lr_scale,
            "cooldown_left": self.cooldown_left,
            "consecutive": self.consecutive,
            "restores": self.restores,
        }

    def load(self, s: Mapping[str, Any]) -> None:
        self.lr_scale = float(s["lr_scale"])
        self.cooldown_left = int(s["cooldown_left"])
        self.consecutive = int(s["consecutive"])
        self.restores = int(s["restores"])


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1


def _setup_distributed(device_setting: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    owns = False
    if not dist.is_initialized():
        use_cuda = device_setting == "cuda" or (device_setting == "auto" and torch.cuda.is_available())
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def _pick_device(setting: str, local_rank: int) -> torch.device:
    if setting not in ("auto", "cpu", "cuda"):
        raise TrainingError(f"device must be auto, cpu or cuda, got {setting!r}")
    if setting == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda, but no CUDA device is available")
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _software() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("glowtriage")
    except PackageNotFoundError:  # running from a source tree that was never installed
        own = "unknown"
    return {"glowtriage": str(own), "torch": str(torch.__version__), "python": platform.python_version()}


def _plain(v: Any) -> Any:
    """JSON-like plain Python values only: what ``torch.load(weights_only=True)`` accepts back.

    (numpy scalars and str subclasses such as torch's TorchVersion would make the model unloadable.)
    """
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int | np.integer):
        return int(v)
    if isinstance(v, float | np.floating):
        return float(v)
    if isinstance(v, str | os.PathLike):
        return str(v)
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return str(v)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def checkpoint_path(out: str | os.PathLike[str]) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def weights_digest(path: Path) -> str:
    """sha256 over a model file's tensors (names, dtypes, shapes, bytes), in name order."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        raise TrainingError(f"{path}: cannot read model weights: {exc}") from exc
    h = hashlib.sha256()
    for name in sorted(state):
        v = state[name].detach().reshape(-1).contiguous()
        h.update(f"{name}|{v.dtype}|{tuple(state[name].shape)}|".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def forget_stale_warm_start(out: str | os.PathLike[str], init_from: str | os.PathLike[str]) -> bool:
    """Drop ``out``'s checkpoint when ``init_from`` is no longer the file that run was started from.

    A resumable run started from a model (M1 from M0) must start again once that model has changed (M0
    trained further); its checkpoint only records the path. The digest of the weights (not of the file,
    which a resumed run rewrites with new provenance) is kept in ``OUT.init.json``. Returns whether a
    checkpoint was dropped."""
    out = Path(out)
    stamp = out.with_name(out.name + ".init.json")
    digest = weights_digest(Path(init_from))
    stale = stamp.is_file() and json.loads(stamp.read_text()).get("sha256") != digest
    if stale:
        checkpoint_path(out).unlink(missing_ok=True)
        log.info("train_restarted", out=str(out), reason=f"{init_from} changed since the run started from it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"init_from": str(init_from), "sha256": digest}) + "\n")
    return stale


def _atomic_save(payload: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _window_mean(values: Sequence[float], end: int, width: int) -> float:
    win = [v for v in values[max(0, end - width) : end] if math.isfinite(v)]
    return sum(win) / len(win) if win else float("nan")


@dataclass
class TrainResult:
    """What a run did; ``summary()`` is the JSON the CLI prints."""

    out: Path
    role: str
    preset: str
    steps: int
    updates: int
    final_bpd: float
    best_bpd: float
    seconds: float
    volumes: int
    nan_restores: int
    world_size: int
    resumed_from: int | None
    losses: list[float]
    lrs: list[float]

    def summary(self, with_curve: bool = False) -> dict[str, Any]:
        def num(v: float) -> float | None:
            return v if math.isfinite(v) else None

        s: dict[str, Any] = {
            "out": str(self.out),
            "role": self.role,
            "preset": self.preset,
            "steps": self.steps,
            "updates": self.updates,
            "final_bpd": num(self.final_bpd),
            "best_bpd": num(self.best_bpd),
            "seconds": round(self.seconds, 3),
            "volumes": self.volumes,
            "nan_restores": self.nan_restores,
            "world_size": self.world_size,
            "resumed_from": self.resumed_from,
        }
        if with_curve:
            s["losses"] = [num(v) for v in self.losses]
        return s


def _total_steps(cfg: GlowConfig, steps: int | None, n: int, batch: int) -> int:
    if steps is not None:
        total = int(steps)
    elif "steps" in cfg.extra:
        total = int(cfg.extra["steps"])
    elif "epochs" in cfg.extra:
        total = math.ceil(float(cfg.extra["epochs"]) * n / batch)
    else:
        raise TrainingError(f"preset {cfg.extra.get('preset')} sets neither steps nor epochs; pass --steps")
    if total < 1:
        raise TrainingError(f"steps must be >= 1, got {total}")
    return total


def _hparam(cfg: GlowConfig, key: str) -> Any:
    if key not in cfg.extra:
        raise TrainingError(f"preset {cfg.extra.get('preset')} in training/presets.toml lacks {key!r}")
    return cfg.extra[key]


def _base_lr(cfg: GlowConfig, override: float | None, warm_start: bool) -> float:
    if override is not None:
        value = float(override)
    elif warm_start and "finetune_lr" in cfg.extra:
        value = float(cfg.extra["finetune_lr"])
    else:
        value = float(_hparam(cfg, "lr"))
    if not (math.isfinite(value) and value > 0):
        raise TrainingError(f"learning rate must be a positive number, got {value!r}")
    return value


def _schedule(cfg: GlowConfig) -> str:
    value = str(cfg.extra.get("lr_schedule", "constant"))
    if value not in ("constant", "cosine"):
        raise TrainingError(
            f"preset {cfg.extra.get('preset')}: lr_schedule must be 'constant' or 'cosine', got {value!r}")
    return value


def _derived_generator(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + stream)


@dataclass
class _Settings:
    """Everything a run's course depends on, from the preset and the arguments."""

    role: str
    preset: str
    seed: int
    total: int
    batch: int
    local: int
    base_lr: float
    warmup: int
    schedule: str  # "constant" after warm-up, or "cosine" down to ~0 by the last step
    grad_clip: float
    log_every: int
    checkpoint_every: int
    snapshot_every: int

    def lr_at(self, step: int) -> float:
        """Linear warm-up to the base lr, then constant or a cosine decay to ~0 by the last step.

        Why decay: at a constant lr the last iterate keeps wandering, and its log-likelihoods move by
        hundreds of nats from one checkpoint to the next: noise of the same size as the lesions that
        log p(x|normal) - log p(x) must resolve. A constant lr depends on the step alone, so such a run can
        be extended (``--steps`` more, ``--resume``); a cosine run that is extended rises again."""
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup > 0 else 1.0
        if self.schedule == "cosine" and step >= self.warmup:
            frac = (step - self.warmup) / max(1, self.total - self.warmup)
            return self.base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
        return self.base_lr * warm


class _Loop:
    """The state of one run (model, optimizer, data order, noise, guard, curve) and its step."""

    def __init__(
        self, glow: Glow, data: Tensor, s: _Settings, guard: _NanGuard, ddp: _Dist, dev: torch.device
    ):
        self.glow, self.data, self.s, self.guard, self.ddp, self.dev = glow, data, s, guard, ddp, dev
        self.opt = torch.optim.Adam(glow.parameters(), lr=s.base_lr)
        self.order = _Order(data.shape[0], _derived_generator(s.seed, 1))
        self.noise_g = _derived_generator(s.seed, 2)
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.last_grad_norm: float | None = None
        self.params = [p for p in glow.parameters() if p.requires_grad]
        self.net: nn.Module = _NLL(glow)

    def wrap(self) -> None:
        if self.ddp.active:
            ddp_cls = nn.parallel.DistributedDataParallel
            ids = [self.dev.index] if self.dev.type == "cuda" else None
            # The buffers (ActNorm flags, LU masks) never change in training: no need to sync them each
            # forward. torch >= 2.13 renamed the switch; older ones (GPU hosts) only know the old name.
            known = inspect.signature(ddp_cls.__init__).parameters
            switch = "forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers"
            quiet = {switch: False}
            self.net = ddp_cls(self.net, device_ids=ids, **quiet)

    def step(self, step: int, hook: StepHook | None) -> bool:
        """One global batch; False when it came out non-finite (and the last good state was restored)."""
        s = self.s
        idx = self.order.take(s.batch)
        u_all = torch.rand((s.batch, *self.data.shape[1:]), generator=self.noise_g)
        sl = slice(self.ddp.rank * s.local, (self.ddp.rank + 1) * s.local)
        xb = self.data[idx[sl]].to(self.dev, non_blocking=True)
        ub = u_all[sl].to(self.dev, non_blocking=True)
        if hook is not None:
            hook(step, self.glow, ub)
        lr = s.lr_at(step) * self.guard.lr_scale
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss = self.net(xb, ub).mean()
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        if s.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        # one collective decision: every rank restores or steps together
        stats = torch.stack([loss.detach().double(), (~torch.isfinite(gnorm.detach())).double()])
        if self.ddp.active:
            dist.all_reduce(stats)
            stats[0] /= self.ddp.world
        loss_val, bad_grad = (float(v) for v in stats.cpu())
        self.lrs.append(lr)
        if math.isfinite(loss_val) and bad_grad == 0.0:
            self.opt.step()
            self.losses.append(loss_val)
            self.last_grad_norm = float(gnorm)
            self.guard.success(step + 1, self.glow, self.opt)
            return True
        self.losses.append(float("nan"))
        self.last_grad_norm = None
        why = "non-finite loss" if not math.isfinite(loss_val) else "non-finite gradient"
        self.guard.failure(step, self.glow, self.opt, why)
        if self.ddp.rank == 0:
            log.warning(
                "nan_restored",
                step=step,
                reason=why,
                restores=self.guard.restores,
                lr_scale=self.guard.lr_scale,
            )
        return False

    def checkpoint(self, step: int, meta: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "format": CKPT_FORMAT,
            "step": step,
            "model": _to_cpu(self.glow.state_dict()),
            "optimizer": _to_cpu(self.opt.state_dict()),
            "order": self.order.state(),
            "noise_rng": self.noise_g.get_state(),
            "torch_rng": torch.get_rng_state(),
            "guard": self.guard.state(),
            "losses": list(self.losses),
            "lrs": list(self.lrs),
            "meta": _plain(meta),
            "written": _now(),
        }

    def restore(self, ck: Mapping[str, Any]) -> int:
        self.glow.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.order.load(ck["order"])
        self.noise_g.set_state(ck["noise_rng"])
        torch.set_rng_state(ck["torch_rng"])
        self.guard.load(ck["guard"])
        self.losses = [float(v) for v in ck["losses"]]
        self.lrs = [float(v) for v in ck["lrs"]]
        return int(ck["step"])


def train(
    volumes: VolumeSet | Sequence[Any],
    preset: str,
    out: str | os.PathLike[str],
    *,
    role: str,
    seed: int = 0,
    steps: int | None = None,
    resume: bool = False,
    init_from: str | os.PathLike[str] | None = None,
    progress: bool = True,
    device: str = "auto",
    log_every: int = 10,
    checkpoint_every: int = 100,
    snapshot_every: int = 10,
    max_nan_failures: int = 5,
    nan_cooldown: int = 50,
    init_batch: int | None = None,
    hook: StepHook | None = None,
    lr: float | None = None,
) -> TrainResult:
    """Train one Glow on ``volumes`` and save it to ``out`` with its provenance.

    ``steps`` overrides the preset's steps/epochs. ``snapshot_every`` is how often the in-memory
    last-good state is refreshed (every checkpoint is also a snapshot point, so resumed runs match).
    ``init_batch`` volumes (default max(batch_size, 16)) initialize ActNorm. ``hook`` is for fault
    injection in tests. Under torchrun every rank calls this; only rank 0 writes files.
    ``lr`` overrides the base learning rate, which is otherwise the preset's ``lr``, or its
    ``finetune_lr`` for a warm start (``init_from``): a fine-tune at the full rate first throws away much
    of what the model it starts from knew.
    """
    t_start = time.perf_counter()
    if role not in ROLES:
        raise TrainingError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    vs = volumes if isinstance(volumes, VolumeSet) else as_volume_set(volumes)
    out = Path(out)
    try:
        cfg = config_from_preset(preset)
    except KeyError as exc:
        raise TrainingError(str(exc.args[0])) from exc
    data, ids = prepare_volumes(vs, cfg)
    ddp = _setup_distributed(device)
    prev_det = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        dev = _pick_device(device, ddp.local_rank)
        batch = int(_hparam(cfg, "batch_size"))
        if batch % ddp.world:
            raise TrainingError(
                f"preset {preset}: batch_size {batch} cannot be split evenly across {ddp.world} processes"
            )
        every = max(1, checkpoint_every)
        s = _Settings(
            role=role,
            preset=preset,
            seed=int(seed),
            total=_total_steps(cfg, steps, len(ids), batch),
            batch=batch,
            local=batch // ddp.world,
            base_lr=_base_lr(cfg, lr, init_from is not None),
            warmup=int(cfg.extra.get("warmup_steps", 0)),
            schedule=_schedule(cfg),
            grad_clip=float(cfg.extra.get("grad_clip", 0.0)),
            log_every=log_every,
            checkpoint_every=every,
            # every checkpoint is also a snapshot point, so a resumed run holds the same "last good" state
            snapshot_every=math.gcd(max(1, snapshot_every), every),
        )
        if dev.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        meta = {
            "role": role,
            "preset": preset,
            "seed": int(seed),
            "ids_sha256": ids_digest(ids),
            "volumes": len(ids),
            "started": _now(),
            "init_from": str(init_from) if init_from else None,
        }
        torch.manual_seed(seed)
        glow = (_warm_start(Path(init_from), cfg) if init_from is not None else Glow(cfg)).to(dev).train()
        loop = _Loop(glow, data, s, _NanGuard(s.snapshot_every, max_nan_failures, nan_cooldown), ddp, dev)
        result = _run(
            loop,
            vs,
            cfg,
            out,
            meta,
            resume=resume,
            progress=progress,
            init_batch=init_batch,
            hook=hook,
            init_from=Path(init_from) if init_from else None,
            t_start=t_start,
        )
        return result
    finally:
        torch.use_deterministic_algorithms(prev_det[0], warn_only=prev_det[1])
        if ddp.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(
    loop: _Loop,
    vs: VolumeSet,
    cfg: GlowConfig,
    out: Path,
    meta: dict[str, Any],
    *,
    resume: bool,
    progress: bool,
    init_batch: int | None,
    hook: StepHook | None,
    init_from: Path | None,
    t_start: float,
) -> TrainResult:
    s, ddp, lead = loop.s, loop.ddp, loop.ddp.rank == 0
    ckpt = checkpoint_path(out)
    if lead:
        out.parent.mkdir(parents=True, exist_ok=True)
    start_step = 0
    resumed_from: int | None = None
    if resume and ckpt.exists():
        ck = _load_checkpoint(ckpt, meta)
        if int(ck["step"]) > s.total:
            raise TrainingError(
                f"{ckpt}: checkpoint is at step {ck['step']}, beyond the {s.total} steps asked for"
            )
        start_step = resumed_from = loop.restore(ck)
        meta["started"] = str(ck["meta"]["started"])
        if lead:
            log.info("train_resumed", checkpoint=str(ckpt), step=start_step)
    else:
        if resume and lead:
            log.info("train_resume_without_checkpoint", checkpoint=str(ckpt))
        if not _actnorm_initialized(loop.glow):
            _init_actnorm(loop.glow, loop.data, s.seed, init_batch or max(s.batch, 16), loop.dev)
    loop.guard.start(loop.glow, loop.opt)
    loop.wrap()
    bar = _progress_bar(progress and lead, s.total, start_step, s.preset, s.role)
    if lead:
        log.info(
            "train_started",
            role=s.role,
            preset=s.preset,
            volumes=meta["volumes"],
            steps=s.total,
            start_step=start_step,
            batch_size=s.batch,
            world_size=ddp.world,
            device=str(loop.dev),
            seed=s.seed,
        )
    for step in range(start_step, s.total):
        ok = loop.step(step, hook)
        done = step + 1
        if bar is not None:
            bar.update(1)
            if ok:
                bar.set_postfix(bpd=f"{loop.losses[-1]:.3f}", lr=f"{loop.lrs[-1]:.1e}", refresh=False)
        if lead and s.log_every > 0 and done % s.log_every == 0:
            log.info(
                "train_step",
                step=done,
                bpd=round(_window_mean(loop.losses, done, s.log_every), 4),
                lr=loop.lrs[-1],
                grad_norm=loop.last_grad_norm,
                seconds=round(time.perf_counter() - t_start, 1),
            )
        if lead and (done % s.checkpoint_every == 0 or done == s.total):
            _atomic_save(loop.checkpoint(done, meta), ckpt)
    if bar is not None:
        bar.close()

    losses = loop.losses
    window = max(1, min(10, s.total))
    means = [_window_mean(losses, e, window) for e in range(1, len(losses) + 1)]
    means = [m for m in means if math.isfinite(m)]
    result = TrainResult(
        out=out,
        role=s.role,
        preset=s.preset,
        steps=s.total,
        updates=sum(1 for v in losses if math.isfinite(v)),
        final_bpd=_window_mean(losses, len(losses), window),
        best_bpd=min(means) if means else float("nan"),
        seconds=time.perf_counter() - t_start,
        volumes=int(meta["volumes"]),
        nan_restores=loop.guard.restores,
        world_size=ddp.world,
        resumed_from=resumed_from,
        losses=losses,
        lrs=loop.lrs,
    )
    if lead:
        extra = _provenance(
            result,
            cfg,
            vs,
            meta,
            seed=s.seed,
            batch=s.batch,
            base_lr=s.base_lr,
            dev=loop.dev,
            init_from=init_from,
        )
        loop.glow.save(out, extra=extra)
        log.info("train_done", **{k: v for k, v in result.summary().items() if k != "out"}, out=str(out))
    return result


def _actnorm_initialized(glow: Glow) -> bool:
    flags = [bool(b) for name, b in glow.named_buffers() if name.endswith("initialized")]
    return bool(flags) and all(flags)


@torch.no_grad()
def _init_actnorm(glow: Glow, data: Tensor, seed: int, k: int, dev: torch.device) -> None:
    """Data-dependent ActNorm init from ``k`` seeded volumes, identical on every rank."""
    g = _derived_generator(seed, 3)
    idx = torch.randperm(data.shape[0], generator=g)[: min(k, data.shape[0])]
    u = torch.rand((len(idx), *data.shape[1:]), generator=g)
    net = _NLL(glow).train()
    net(data[idx].to(dev), u.to(dev))
    glow.mark_initialized()


def _warm_start(path: Path, cfg: GlowConfig) -> Glow:
    """Weights of an existing model (nightly M1 retrain); its architecture must be the preset's."""
    try:
        old = Glow.load(path)
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        raise TrainingError(f"--init-from {path}: cannot load: {exc}") from exc
    diff = [
        f"{k}: model {getattr(old.cfg, k)!r} vs preset {getattr(cfg, k)!r}"
        for k in (
            "ndim",
            "image_shape",
            "levels",
            "depth",
            "width",
            "in_channels",
            "n_bits",
            "scale_fn",
            "learn_split_prior",
        )
        if getattr(old.cfg, k) != getattr(cfg, k)
    ]
    if diff:
        preset = cfg.extra.get("preset")
        raise TrainingError(f"--init-from {path} does not match preset {preset}: " + "; ".join(diff))
    model = Glow(cfg)
    model.load_state_dict(old.state_dict())
    return model


def _load_checkpoint(path: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise TrainingError(f"{path}: cannot read checkpoint: {exc}") from exc
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise TrainingError(f"{path}: not a glowtriage training checkpoint")
    for key in ("role", "preset", "seed", "ids_sha256", "init_from"):
        if ck["meta"].get(key) != meta.get(key):
            raise TrainingError(
                f"{path}: checkpoint is of another run ({key} {ck['meta'].get(key)!r}, "
                f"this run {meta.get(key)!r}); remove it or drop --resume"
            )
    return ck


def _progress_bar(enabled: bool, total: int, initial: int, preset: str, role: str) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"{role}/{preset}", unit="step", dynamic_ncols=True)


def _provenance(
    result: TrainResult,
    cfg: GlowConfig,
    vs: VolumeSet,
    meta: Mapping[str, Any],
    *,
    seed: int,
    batch: int,
    base_lr: float,
    dev: torch.device,
    init_from: Path | None,
) -> dict[str, Any]:
    def num(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    data_meta = _plain({k: v for k, v in vs.meta.items() if k not in ("count", "ids_sha256", "image_shape")})
    return _plain(
        {
            "role": result.role,
            "preset": result.preset,
            "steps": result.steps,
            "updates": result.updates,
            "seed": int(seed),
            "batch_size": batch,
            "lr": base_lr,
            "lr_schedule": _schedule(cfg),
            "data": {
                "count": result.volumes,
                "ids_sha256": meta["ids_sha256"],
                "image_shape": list(cfg.image_shape),
                **data_meta,
            },
            "started": meta["started"],
            "finished": _now(),
            "seconds": round(result.seconds, 3),
            "final_bpd": num(result.final_bpd),
            "best_bpd": num(result.best_bpd),
            "nan_restores": result.nan_restores,
            "world_size": result.world_size,
            "device": dev.type,
            "resumed_from": result.resumed_from,
            "init_from": {"path": str(init_from), "sha256": _sha256_file(init_from)} if init_from else None,
            "software": _software(),
        }
    )


# --------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="training train",
        description="Train M0 (--role normal) or M1 (--role mixture). Runs as is, or under "
        "`torchrun --nproc_per_node=N -m training.train.loop ...` for data-parallel training.",
    )
    p.add_argument("data", type=Path, help="folder of DICOM studies (recursive), or of .npz volumes")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--preset", required=True, help="a preset of training/presets.toml")
    p.add_argument("--out", required=True, type=Path, help="model file to write (checkpoint: OUT.ckpt)")
    p.add_argument("--labels", type=Path, help="labels.csv (study_uid,label,lesion)")
    p.add_argument("--only", help="keep only volumes with this label (e.g. normal); needs --labels")
    p.add_argument("--steps", type=int, help="number of steps (default: the preset's steps or epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT.ckpt if it exists")
    p.add_argument("--init-from", type=Path, help="warm start from this model file")
    p.add_argument("--lr", type=float,
                   help="base learning rate (default: the preset's lr, or its finetune_lr with --init-from)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--cache", type=Path, help="volume cache for DICOM input (default ~/.cache/glowtriage)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument(
        "--snapshot-every",
        type=int,
        default=10,
        help="steps between in-memory last-good states for the NaN guard (host RAM: 2 copies of "
        "model + Adam state)",
    )
    p.add_argument("--summary", type=Path, help="also write the JSON summary (with the loss curve) here")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from triage.ops.logs import configure

    configure(level=os.environ.get("GLOWTRIAGE_LOG_LEVEL", "info"))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        vs = resolve_data(args.data, args.labels, args.only, args.cache)
        result = train(
            vs,
            args.preset,
            args.out,
            role=args.role,
            seed=args.seed,
            steps=args.steps,
            resume=args.resume,
            init_from=args.init_from,
            lr=args.lr,
            progress=not args.no_progress,
            device=args.device,
            log_every=args.log_every,
            checkpoint_every=args.checkpoint_every,
            snapshot_every=args.snapshot_every,
        )
    except TrainingError as exc:
        print(f"training train: error: {exc}", file=sys.stderr)
        return 1
    if rank0:
        if args.summary:
            args.summary.parent.mkdir(parents=True, exist_ok=True)
            args.summary.write_text(json.dumps(result.summary(with_curve=True), indent=1) + "\n")
        print(json.dumps(result.summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
