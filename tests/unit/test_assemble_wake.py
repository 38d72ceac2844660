"""pipeline.assemble_due wakes the scorer after each study, not once its whole step is done: a burst
makes many studies due at once, and a scorer woken only at the end of the step sat idle while the first
of them waited (issue 15: the e2e bench's burst account found one study idle 1.9 s behind 4 others)."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from training.harness.series import write_ct_series
from triage.config import parse
from triage.pipeline import assemble_due
from triage.store.db import Store


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_the_scorer_is_woken_as_each_study_is_assembled(tmp_path: Path) -> None:
    clock = Clock()
    store = Store(tmp_path / "var", clock=clock)
    studies = [f"1.2.826.0.1.3680043.8.498.77.{k}" for k in range(3)]
    for k, study in enumerate(studies):
        for path in write_ct_series(tmp_path / f"s{k}", n=12, size=32, study_uid=study,
                                    series_uid=f"{study}.1", seed=k):
            ds = dcmread(path)
            data = path.read_bytes()
            store.put_instance(ds.SOPInstanceUID, study, f"{study}.1", CTImageStorage, ExplicitVRLittleEndian,
                               lambda f, data=data: f.write(data), "PACS", modality="CT")
    cfg = parse({}, None)
    clock.t += cfg.settings.assembly.quiet_seconds + 1.0
    seen: list[list[str]] = []  # at each wake-up: the studies already past assembly

    def woken() -> None:
        seen.append(sorted(s for s in studies if store.study(s).state not in ("receiving", "stable")))

    assert assemble_due(store, cfg, on_study=woken) == 3
    assert [len(s) for s in seen] == [1, 2, 3]  # one wake-up per study, each after that study
    assert all(store.study(s).state in ("assembled", "rejected") for s in studies)
    store.close()
