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
    kind: str = "ct"  # ct: synthetic head CTs; cxr: synthetic chest radiographs (``--kind cxr``)
    normal: int = 24  # M0's training normals
    mixture_normal: int = 12  # M1's unlabeled mixture
    mixture_abnormal: int = 12
    calibration: int = 12  # held-out normals: operating points (global and region) and percentiles
    test_normal: int = 10  # the studies sent through the daemon
    test_abnormal: int = 10
    steps: int = 100  # the trunk; M0 and M1 then branch for steps // 2 each (batch of the preset)
    seed: int = 7
    specificity: float = 0.9
    test_distractors: bool = True  # head CT: scouts, bone kernel, ...; chest: lateral views
    slab_samples: int = 3  # head CT only
    synth_scale: float = 4.0  # chest only: anatomy drawn this much coarser than the detector (faster)
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
# The chest path (``--kind cxr``): synthetic CR/DX studies, the cpu-cxr preset (128x128, bf16 +
# channels-last) and a chest model set. Sized for the demo's 10 minutes on a 2-core machine: cpu-cxr
# takes ~0.6 s a step of 16 images there (README: 0.037 s forward+backward per image), so a 200-step
# trunk and two 100-step branches train in ~4 min; writing and assembling the 180 studies takes < 1 min.
# A chest set keeps a region calibration too (triage.model.radiomap), flagged by the same policy.
CXR_FULL = Plan(
    preset="cpu-cxr",
    kind="cxr",
    normal=64,
    mixture_normal=32,
    mixture_abnormal=32,
    calibration=16,
    test_normal=10,
    test_abnormal=10,
    steps=200,
)
CXR_QUICK = Plan(
    preset="test-tiny-2d",
    kind="cxr",
    normal=4,
    mixture_normal=2,
    mixture_abnormal=2,
    calibration=MIN_REGION_NORMALS,
    test_normal=2,
    test_abnormal=2,
    steps=20,
    test_distractors=False,
    synth_scale=8.0,
    quiet_seconds=2.0,
)
PLANS = {("ct", False): FULL, ("ct", True): QUICK, ("cxr", False): CXR_FULL, ("cxr", True): CXR_QUICK}
KIND_TEXT = {"ct": "head-CT studies (training.synth.head)",
             "cxr": "chest radiographs, CR and DX (training synth --kind cxr)"}


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
