"""What a training run reports: :class:`TrainResult` (the CLI's JSON summary) and the provenance saved
inside the model file (data, hyper-parameters, timings, NaN restores, software), so every model can
say how it was made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.data.sources import VolumeSet
from training.train.checkpoint import now_iso, plain, sha256_file, software_versions
from training.train.settings import lr_schedule_of
from triage.model.glow import GlowConfig


def window_mean(values: Sequence[float], end: int, width: int) -> float:
    """Mean of the finite losses in the ``width`` steps before ``end`` (one step's bpd is noisy)."""
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


def provenance(
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
    """The model file's provenance: what data, settings, device and software made it (plain JSON values)."""
    def num(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    data_meta = plain({k: v for k, v in vs.meta.items() if k not in ("count", "ids_sha256", "image_shape")})
    return plain(
        {
            "role": result.role,
            "preset": result.preset,
            "steps": result.steps,
            "updates": result.updates,
            "seed": int(seed),
            "batch_size": batch,
            "lr": base_lr,
            "lr_schedule": lr_schedule_of(cfg),
            "precision": meta.get("precision", "fp32"),
            "augment": meta.get("augment", {"mirror_x": False, "shift_voxels": 0}),
            "data": {
                "count": result.volumes,
                "ids_sha256": meta["ids_sha256"],
                "image_shape": list(cfg.image_shape),
                **data_meta,
            },
            "started": meta["started"],
            "finished": now_iso(),
            "seconds": round(result.seconds, 3),
            "final_bpd": num(result.final_bpd),
            "best_bpd": num(result.best_bpd),
            "nan_restores": result.nan_restores,
            "world_size": result.world_size,
            "device": dev.type,
            "resumed_from": result.resumed_from,
            "init_from": {"path": str(init_from), "sha256": sha256_file(init_from)} if init_from else None,
            "software": software_versions(),
        }
    )
