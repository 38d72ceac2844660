"""bench/e2e_bench.py's account of a burst: queue ahead, the scorer's turn and cycle, and the
prediction ``queue x cycle + turn`` checked on timelines worked out by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from e2e_bench import scorer_account  # noqa: E402


def study(assembled: float, scored: float, queued: float, inference: float) -> dict:
    return {"at": {"assembled": assembled, "scored": scored, "queued": queued, "inference": inference}}


def test_a_back_to_back_burst_is_its_queue_times_the_cycle() -> None:
    """Three studies assembled at once; the thread scores each in 0.4 s (0.3 s model), reports in
    0.1 s: they wait 0, 1 and 2 cycles of 0.5 s, and the account says so exactly."""
    lat = [study(0.0, 0.4, 0.5, 0.3), study(0.0, 0.9, 1.0, 0.3), study(0.0, 1.4, 1.5, 0.3)]
    acc = scorer_account(lat)
    assert acc["cycle_s"] == pytest.approx(0.5) and acc["busy_s"] == pytest.approx(0.4)
    assert acc["overhead_s"]["max"] == pytest.approx(0.1) and acc["inference_s"] == pytest.approx(0.3)
    assert acc["queue"] == {"max": 2, "mean": pytest.approx(1.0)}  # ahead of each: 0, 1, 2
    assert acc["studies_that_waited"] == 2
    assert acc["prediction_error_median_s"] == pytest.approx(0.0, abs=1e-9)


def test_an_idle_gap_shows_as_overhead_and_a_late_study_does_not_wait() -> None:
    """The second study waits 0.6 s past the first one's report with nothing else to do: that is not
    the model's time, so it shows in the overhead; a study assembled after the thread is free waits for
    nobody."""
    lat = [study(0.0, 0.4, 0.5, 0.3), study(0.1, 1.4, 1.5, 0.3), study(5.0, 5.4, 5.5, 0.3)]
    acc = scorer_account(lat)
    assert acc["overhead_s"]["max"] == pytest.approx(0.6)  # 0.5 -> 1.4 is 0.9 s, 0.3 of it the model
    assert acc["studies_that_waited"] == 1
    assert acc["queue"]["max"] == 1
