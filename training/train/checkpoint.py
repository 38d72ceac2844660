"""Checkpoints, warm starts and the provenance helpers of a training run.

A checkpoint (``<out>.ckpt``) holds model, optimizer, step, generator states and the position in the
data order, so ``--resume`` gives bit-for-bit the weights of an uninterrupted run on the CPU. What is
written is plain (``torch.load(weights_only=True)`` reads it back), and a checkpoint of another run
(role, preset, seed, data, start model) is refused rather than silently continued.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import platform
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from training.errors import TrainingError
from triage.model.glow import Glow, GlowConfig
from triage.ops.logs import get_logger

CKPT_FORMAT = "glowtriage.train-ckpt/1"

log = get_logger("train")



def to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def plain(v: Any) -> Any:
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
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [plain(x) for x in v]
    return str(v)


def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("glowtriage")
    except PackageNotFoundError:  # running from a source tree that was never installed
        own = "unknown"
    return {"glowtriage": str(own), "torch": str(torch.__version__), "python": platform.python_version()}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def now_iso() -> str:
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


def atomic_save(payload: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _meta_value(meta: Mapping[str, Any], key: str) -> Any:
    """A run's identity by ``key``; checkpoints written before augmentation existed did none."""
    if key == "augment":
        return meta.get(key) or {"mirror_x": False, "shift_voxels": 0}
    return meta.get(key)


def load_checkpoint(path: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise TrainingError(f"{path}: cannot read checkpoint: {exc}") from exc
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise TrainingError(f"{path}: not a glowtriage training checkpoint")
    for key in ("role", "preset", "seed", "ids_sha256", "init_from", "augment"):
        if _meta_value(ck["meta"], key) != _meta_value(meta, key):
            raise TrainingError(
                f"{path}: checkpoint is of another run ({key} {ck['meta'].get(key)!r}, "
                f"this run {meta.get(key)!r}); remove it or drop --resume"
            )
    return ck


def warm_start_model(path: Path, cfg: GlowConfig) -> Glow:
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
