"""The demo's plan (sizes, steps, seeds), its two presets, and how it talks to the user."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from training.harness import HarnessError

REPO = Path(__file__).resolve().parents[2]
MARKER = ".glowtriage-demo"  # in the output folder: --fresh only ever deletes a folder that has it
SETS = ("normal", "mixture", "calibration", "test")
TERMINAL = ("sent", "rejected", "failed")
# triage.model.modelset.region_calibration fits the region score only on at least this many calibration
# normals (fewer: the set flags by the global score alone); both plans below give at least as many
MIN_REGION_NORMALS = 3


@dataclass(frozen=True)
class Plan:
    """Sizes, steps and seeds. Every field is written to demo.json; the data and models made with a
    plan are reused by a later run with the same values."""

    preset: str = "cpu-small"
    normal: int = 24  # M0's training normals
    mixture_normal: int = 12  # M1's unlabeled mixture
    mixture_abnormal: int = 12
    calibration: int = 12  # held-out normals: operating points (global and region) and percentiles
    test_normal: int = 10  # the studies sent through the daemon
    test_abnormal: int = 10
    steps: int = 100  # the trunk; M0 and M1 then branch for steps // 2 each (batch of the preset)
    seed: int = 7
    specificity: float = 0.9
    test_distractors: bool = True
    slab_samples: int = 3
    quiet_seconds: float | None = None  # None: the config's own [assembly] quiet_seconds


FULL = Plan()
QUICK = Plan(
    preset="test-tiny",
    normal=4,
    mixture_normal=2,
    mixture_abnormal=2,
    calibration=MIN_REGION_NORMALS,  # the fewest that still calibrate the region score
    test_normal=2,
    test_abnormal=2,
    steps=20,
    test_distractors=False,
    slab_samples=1,
    quiet_seconds=2.0,
)


def say(msg: str = "") -> None:
    print(msg, flush=True)


class DemoError(HarnessError):
    """The demo cannot go on; the message says what failed and where to look."""


class Laps:
    """Wall seconds of each phase, for the closing line and demo.json."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def lap(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 1)
