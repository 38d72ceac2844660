"""What a run's course depends on, read from the preset and the arguments (steps, batch, learning rate
and its schedule, clipping, how often to log, checkpoint and snapshot).

Kept apart so the loop reads settings rather than preset keys, and a bad preset fails before any
model is built, with a message naming the preset and the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from training.errors import TrainingError
from training.train.augment import NONE, Augment
from triage.model.glow import GlowConfig


def total_steps_of(cfg: GlowConfig, steps: int | None, n: int, batch: int) -> int:
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


def hparam(cfg: GlowConfig, key: str) -> Any:
    if key not in cfg.extra:
        raise TrainingError(f"preset {cfg.extra.get('preset')} in training/presets.toml lacks {key!r}")
    return cfg.extra[key]


def base_lr_of(cfg: GlowConfig, override: float | None, warm_start: bool) -> float:
    if override is not None:
        value = float(override)
    elif warm_start and "finetune_lr" in cfg.extra:
        value = float(cfg.extra["finetune_lr"])
    else:
        value = float(hparam(cfg, "lr"))
    if not (math.isfinite(value) and value > 0):
        raise TrainingError(f"learning rate must be a positive number, got {value!r}")
    return value


def lr_schedule_of(cfg: GlowConfig) -> str:
    value = str(cfg.extra.get("lr_schedule", "constant"))
    if value not in ("constant", "cosine"):
        raise TrainingError(
            f"preset {cfg.extra.get('preset')}: lr_schedule must be 'constant' or 'cosine', got {value!r}")
    return value


@dataclass
class Settings:
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
    augment: Augment = NONE

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
