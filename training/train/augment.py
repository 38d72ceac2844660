"""Label-free training augmentation: the same study as another scan of another head could show it.

Why: at the CPU budget a model sees each of its few hundred volumes 20-30 times, and it memorizes
them. Measured on the 2026-11-30 protocol-mix experiment (cpu-small, 256 normals for M0, 320 mixture
studies for M1, 800 + 1,200 steps of batch 4): M0 gave its own training normals a log-likelihood
~5,700 nats above held-out normals of the same generator, and the posterior log p(normal|x) of
training normals averaged +1,035 nats against -853 for held-out ones, a memorization gap ~3 times the
held-out spread (655) and ~10 times what a lesion moves the score. What a flow memorizes of one
volume is no use on the next study; what it learns from many slightly different heads is.

Two transformations, both of which a normal head stays normal under and a finding stays a finding
(nothing here knows any kind of lesion; M0 and M1 get the same ones):

- **Mirror left-right** (3-D head presets only): the brain is left-right symmetric to within the
  variation between people, and the canonical grid is centred on the head, so a mirrored head is
  another plausible head. Not for chest radiographs: the heart is on the left and a mirrored chest
  (situs inversus) is itself a finding.
- **In-plane shift** by up to ``shift`` voxels of the model grid in y and x (a roll; the grid's
  border is air, which stays air): how far a head sits from the centroid the grid was centred on
  varies from scan to scan anyway. Not along z: the grid is anchored at the vertex.

Both are drawn from their own seeded generator, one draw per step for the whole global batch, so a
run stays a pure function of (data, preset, seed, steps) under any number of processes and across
resumes (the generator's state is in the checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from training.errors import TrainingError
from triage.model.glow import GlowConfig

DEFAULT_SHIFT = 2  # model-grid voxels: cpu-small 3.4 mm, paper-bct 1.7 mm


@dataclass(frozen=True)
class Augment:
    """What a run applies to each training volume (model grid, (N, C, *spatial))."""

    mirror: bool = False  # flip the last (x, patient left-right) axis with probability 1/2
    shift: int = 0  # roll y and x by a uniform integer in [-shift, shift]

    @property
    def active(self) -> bool:
        return self.mirror or self.shift > 0

    def describe(self) -> dict[str, Any]:
        return {"mirror_x": self.mirror, "shift_voxels": self.shift}

    def draw(self, batch: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """The global batch's flips (bool, (batch,)) and shifts (int, (batch, 2)): the same number of
        draws every step whatever is active, so switching one part off does not move the other."""
        flips = torch.rand(batch, generator=g) < 0.5
        shifts = torch.randint(-self.shift, self.shift + 1, (batch, 2), generator=g)
        return flips, shifts

    def apply(self, x: Tensor, flips: Tensor, shifts: Tensor) -> Tensor:
        """``x`` (n, C, *spatial) transformed sample by sample (``flips``/``shifts`` of the same n)."""
        if not self.active:
            return x
        out = []
        for i in range(x.shape[0]):
            v = x[i]
            if self.mirror and bool(flips[i]):
                v = torch.flip(v, dims=(-1,))
            if self.shift > 0:
                dy, dx = (int(s) for s in shifts[i])
                if dy or dx:
                    v = torch.roll(v, shifts=(dy, dx), dims=(-2, -1))
            out.append(v)
        return torch.stack(out)


NONE = Augment()


def augment_of(cfg: GlowConfig, override: str | None = None) -> Augment:
    """The preset's ``augment_mirror`` / ``augment_shift`` keys (absent: none), or ``override``:
    ``"off"``, or ``"on"`` (mirror for 3-D presets, shift of the preset's ``augment_shift`` or
    ``DEFAULT_SHIFT``)."""
    if override not in (None, "on", "off"):
        raise TrainingError(f"augment must be 'on' or 'off', got {override!r}")
    if override == "off":
        return NONE
    shift = int(cfg.extra.get("augment_shift", DEFAULT_SHIFT if override == "on" else 0))
    mirror = cfg.ndim == 3 if override == "on" else bool(cfg.extra.get("augment_mirror", False))
    if shift < 0:
        raise TrainingError(f"preset {cfg.extra.get('preset')}: augment_shift must be >= 0, got {shift}")
    if mirror and cfg.ndim != 3:
        raise TrainingError(f"preset {cfg.extra.get('preset')}: augment_mirror is for 3-D head presets "
                            "(a mirrored chest radiograph is situs inversus, a finding)")
    return Augment(mirror=mirror, shift=shift)
