"""The NaN guard: a non-finite loss or gradient does not end a nightly run.

The last state that proved finite is restored (model and Adam moments, kept in host memory), the
learning rate is halved for a while, and the event is counted in the model's provenance. Only
``max_failures`` failures in a row give up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from training.errors import TrainingError
from training.train.checkpoint import to_cpu
from triage.model.glow import Glow


class NanGuard:
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
        return {"model": to_cpu(glow.state_dict()), "opt": to_cpu(opt.state_dict())}

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
