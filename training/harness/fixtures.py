"""Small fixtures the tests share across folders: an untrained tiny model, a series put into a store.

They are not peers, but several test folders (unit and integration) need exactly the same thing, and a
``conftest.py`` cannot be imported across folders; so they live here beside the peers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pydicom import dcmread

from training.presets import glow_from_preset
from triage.store.db import Store


def tiny_model(path: Path, seed: int, preset: str = "test-tiny") -> Path:
    """A tiny Glow (``test-tiny``, or ``test-tiny-2d`` for radiographs) with ActNorm initialised on random
    data, saved to ``path``: any two seeds give two models that score differently, which is all plumbing
    tests need (they check no accuracy)."""
    torch.manual_seed(seed)
    m = glow_from_preset(preset)
    m.train()
    m.bits_per_dim(torch.randint(0, 128, (4, 1, *m.cfg.image_shape)), noise=True)
    m.save(path)
    return path


def assembled_series(store: Store, files: Sequence[Path], clock: Callable[[], float]) -> tuple[str, str]:
    """Put a CT series' files into ``store`` as received, then mark the series and study stable and
    assembled (volume path only named): the state the score and report stages start from."""
    heads = [dcmread(p, stop_before_pixels=True) for p in files]
    study, series = str(heads[0].StudyInstanceUID), str(heads[0].SeriesInstanceUID)
    for path, ds in zip(files, heads, strict=True):
        store.put_instance(str(ds.SOPInstanceUID), study, series, str(ds.SOPClassUID),
                           str(ds.file_meta.TransferSyntaxUID), lambda f, p=path: f.write(p.read_bytes()),
                           "TEST", modality="CT")
    store.set_series_state(series, "stable")
    store.set_study_state(study, "stable")
    store.record_assembly(study, series, 0, store.root / "v.npz", complete_at=clock())
    return study, series
