"""training.train.augment: what the transforms do, which presets may mirror, and that an augmented run
stays a pure function of its inputs (same seed, same weights; a resume equals the straight run; a
checkpoint of an unaugmented run is not mixed into an augmented one)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.unit.test_train import params_equal, quick, toy_set
from training.errors import TrainingError
from training.presets import config_from_preset
from training.train.augment import NONE, Augment, augment_of
from training.train.checkpoint import checkpoint_path
from triage.model.glow import Glow


def test_mirror_flips_x_only_and_shift_rolls_y_and_x() -> None:
    x = torch.arange(2 * 1 * 2 * 3 * 4, dtype=torch.uint8).reshape(2, 1, 2, 3, 4)
    aug = Augment(mirror=True, shift=1)
    flips = torch.tensor([True, False])
    shifts = torch.tensor([[0, 0], [1, -1]])
    out = aug.apply(x, flips, shifts)
    assert torch.equal(out[0], torch.flip(x[0], dims=(-1,)))  # mirrored, not shifted
    assert torch.equal(out[1], torch.roll(x[1], shifts=(1, -1), dims=(-2, -1)))  # shifted, not mirrored
    assert torch.equal(out[1, :, :, 1, 3], x[1, :, :, 0, 0])  # y + 1, x - 1 (wrapping)
    # z (the vertex-anchored axis) is never touched: each slice keeps its own values
    for z in range(2):
        assert sorted(out[1, 0, z].flatten().tolist()) == sorted(x[1, 0, z].flatten().tolist())
    assert torch.equal(NONE.apply(x, flips, shifts), x)


def test_draws_are_the_same_whatever_is_active() -> None:
    """Switching mirroring off does not change which shifts a run gets (one draw layout)."""
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    f1, s1 = Augment(mirror=True, shift=2).draw(8, g1)
    f2, s2 = Augment(mirror=False, shift=2).draw(8, g2)
    assert torch.equal(f1, f2) and torch.equal(s1, s2)
    assert int(s1.abs().max()) <= 2


def test_presets_and_overrides() -> None:
    ct, cxr = config_from_preset("test-tiny"), config_from_preset("test-tiny-2d")
    assert augment_of(ct) == NONE  # presets without augment_* keys do none
    assert augment_of(ct, "on") == Augment(mirror=True, shift=2)
    assert augment_of(cxr, "on") == Augment(mirror=False, shift=2)  # a mirrored chest is a finding
    assert augment_of(ct, "off") == NONE
    cxr.extra["augment_mirror"] = True
    with pytest.raises(TrainingError, match="situs inversus"):
        augment_of(cxr)
    with pytest.raises(TrainingError, match="'on' or 'off'"):
        augment_of(ct, "yes")


def test_augmented_run_is_deterministic_and_differs_from_plain(tmp_path: Path) -> None:
    vs = toy_set(10)
    a = quick(vs, tmp_path / "a.pt", steps=12, seed=1, augment="on")
    b = quick(vs, tmp_path / "b.pt", steps=12, seed=1, augment="on")
    plain = quick(vs, tmp_path / "c.pt", steps=12, seed=1)
    assert params_equal(Glow.load(tmp_path / "a.pt"), Glow.load(tmp_path / "b.pt")) == 0.0
    assert a.losses == b.losses
    assert a.losses != plain.losses  # the volumes it trained on were transformed
    assert Glow.load(tmp_path / "a.pt").extra_info["augment"] == {"mirror_x": True, "shift_voxels": 2}


def test_augmented_resume_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    vs = toy_set(10)
    quick(vs, tmp_path / "a.pt", steps=20, checkpoint_every=5, seed=1, augment="on")

    def crash(step: int, model: Glow, noise: torch.Tensor) -> None:
        if step == 13:
            raise KeyboardInterrupt("simulated crash")

    out = tmp_path / "b.pt"
    with pytest.raises(KeyboardInterrupt):
        quick(vs, out, steps=20, checkpoint_every=5, seed=1, hook=crash, augment="on")
    assert torch.load(checkpoint_path(out), weights_only=True)["step"] == 10
    resumed = quick(vs, out, steps=20, checkpoint_every=5, seed=1, resume=True, augment="on")
    assert resumed.resumed_from == 10
    assert params_equal(Glow.load(tmp_path / "a.pt"), Glow.load(out)) <= 1e-6
    # the same checkpoint is not resumed by a run that does not augment
    with pytest.raises(TrainingError, match="augment"):
        quick(vs, out, steps=20, checkpoint_every=5, seed=1, resume=True)


def test_experiment_keeps_the_trunk_only_when_the_trunk_itself_is_not_augmented() -> None:
    """`training experiment --augment on --augment-branches-only` on a folder trained without
    augmentation keeps its trunk (and restarts the branches); augmenting the trunk too starts over."""
    from training.experiment import Plan, _trunk_identity

    def stamp(**kw: object) -> dict[str, object]:
        d = dict(Plan(**kw).__dict__)
        if d["augment"] is None:  # as train_models stamps a plan without augmentation
            d.pop("augment"), d.pop("augment_trunk")
        return d

    before = stamp(seed=3)
    assert _trunk_identity(before) == _trunk_identity(stamp(seed=3, augment="on", augment_trunk=False))
    assert _trunk_identity(before) != _trunk_identity(stamp(seed=3, augment="on"))
    assert _trunk_identity(before) != _trunk_identity(stamp(seed=4, augment="on", augment_trunk=False))
