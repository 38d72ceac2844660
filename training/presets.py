"""Model presets: ``training/presets.toml`` is the one place model sizes and training recipes live.

Only the training side reads it. A trained model carries its whole architecture in its checkpoint
(:meth:`triage.model.glow.Glow.save`), so the daemon never needs the presets file: what was trained is
what is scored, even after the presets change.
"""

from __future__ import annotations

import tomllib
from importlib.resources import files
from pathlib import Path
from typing import Any

from triage.model.glow import Glow, GlowConfig

_ARCH_KEYS = {"ndim", "image_shape", "levels", "depth", "width", "in_channels", "n_bits", "scale_fn",
              "learn_split_prior", "actnorm_scale"}


def load_presets(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """Read all presets from training/presets.toml."""
    p = path or Path(str(files("training").joinpath("presets.toml")))
    with p.open("rb") as f:
        return tomllib.load(f)


def preset(name: str) -> dict[str, Any]:
    presets = load_presets()
    if name not in presets:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(presets))}")
    return dict(presets[name])


def config_from_preset(name: str, **overrides: Any) -> GlowConfig:
    p = preset(name)
    p.update(overrides)
    arch = {k: v for k, v in p.items() if k in _ARCH_KEYS}
    extra = {k: v for k, v in p.items() if k not in _ARCH_KEYS}
    extra["preset"] = name
    return GlowConfig(**arch, extra=extra)


def glow_from_preset(name: str, **overrides: Any) -> Glow:
    """A freshly initialised :class:`Glow` of a preset (``overrides`` replace preset keys)."""
    return Glow(config_from_preset(name, **overrides))
