"""The 2-D presets of the radiograph path: test-tiny-2d runs in milliseconds, cpu-cxr is a real model."""

from __future__ import annotations

import time

import torch

from training.presets import config_from_preset, glow_from_preset
from triage.model.glow import fit_to_shape

CANONICAL = (512, 512)  # triage.assemble.radiograph.CANONICAL_SHAPE (asserted in test_radiograph)


def test_tiny_2d_is_fast_and_finite() -> None:
    m = glow_from_preset("test-tiny-2d")
    assert m.cfg.ndim == 2 and m.cfg.image_shape == (16, 16)
    x = torch.randint(0, 128, (4, 1, 16, 16))
    t = time.perf_counter()
    bpd = m.bits_per_dim(x)
    bpd.mean().backward()
    assert torch.isfinite(bpd).all()
    assert time.perf_counter() - t < 2.0


def test_2d_presets_reduce_from_the_canonical_image() -> None:
    img = torch.randint(0, 128, (1, *CANONICAL), dtype=torch.uint8)
    for name in ("test-tiny-2d", "cpu-cxr", "paper-cxr"):
        cfg = config_from_preset(name)
        assert cfg.ndim == 2 and cfg.n_bits == 7
        out = fit_to_shape(img, cfg.image_shape)
        assert tuple(out.shape[-2:]) == tuple(cfg.image_shape) and int(out.max()) <= 127
    cxr = config_from_preset("cpu-cxr")
    assert cxr.extra["precision"] == "bf16" and cxr.extra["channels_last"] is True
    assert (cxr.image_shape, cxr.levels) == ((128, 128), 4)
