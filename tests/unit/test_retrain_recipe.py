"""The nightly M1 is trained like the set's M1 was: same branch length and precision, unless configured."""

from __future__ import annotations

from types import SimpleNamespace

from training.train.retrain import DEFAULT_STEPS, branch_recipe
from triage.config import parse


def _set(m1: dict | None) -> SimpleNamespace:
    provenance = {"m1": m1} if m1 is not None else {}
    return SimpleNamespace(manifest={"preset": "cpu-small", "provenance": provenance})


def test_steps_and_precision_follow_the_sets_m1() -> None:
    assert branch_recipe(_set({"steps": 300, "precision": "bf16"}), 0) == (300, "bf16")


def test_configured_steps_override_the_set() -> None:
    assert branch_recipe(_set({"steps": 300, "precision": "fp32"}), 1234) == (1234, "fp32")


def test_a_set_without_a_record_falls_back() -> None:
    assert branch_recipe(_set(None), None) == (DEFAULT_STEPS, None)
    assert branch_recipe(_set({"steps": 0, "precision": "fp64"}), None) == (DEFAULT_STEPS, None)


def test_config_leaves_steps_unset_by_default() -> None:
    assert parse({}, None).settings.retrain.steps == 0  # 0: follow the set
    assert parse({"retrain": {"steps": 50}}, None).settings.retrain.steps == 50
