"""The report stage's per-study savings keep its output: the header cache (the assembler's parsed
datasets reused by the report) gives what reading the files gives, and key images are byte-identical
when rebuilt later (no clock in them), as the SR is.
"""

from __future__ import annotations

import io
import os
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import generate_uid

from training.harness.series import write_ct_series
from triage.assemble.headers import read_header_dataset
from triage.model.results import ModelSetInfo, ScoreResult
from triage.pipeline import HeaderCache
from triage.report.keyimages import build_key_images


def test_header_cache_gives_what_the_files_give(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", n=4, size=32)
    cache = HeaderCache(max_series=2)
    kept = {}
    for p in paths[:3]:  # the fourth arrived after the assembly: not kept
        h, ds = read_header_dataset(p)
        assert h.sop_instance_uid == str(ds.SOPInstanceUID) and "PixelData" not in ds
        cache.put("s1", p, ds)
        kept[p] = ds
    # the second file is re-sent: a new file in its place (new inode), so its old dataset is not used
    replaced = write_ct_series(tmp_path / "again", n=4, size=32, seed=5)[1]
    os.replace(replaced, paths[1])
    got = cache.headers("s1", paths)
    assert got[0] is kept[paths[0]] and got[2] is kept[paths[2]]
    assert got[1] is not kept[paths[1]] and got[1].SOPInstanceUID == dcmread(paths[1]).SOPInstanceUID
    for ds, p in zip(got, paths, strict=True):
        fresh = dcmread(p, stop_before_pixels=True)
        assert ds.to_json_dict() == fresh.to_json_dict()
    assert all(a is not b for a, b in zip(cache.headers("s1", paths), got, strict=True))  # used once
    for uid in ("a", "b", "c"):  # bounded: the oldest series goes
        cache.put(uid, paths[0], kept[paths[0]])
    assert cache.headers("a", paths[:1])[0] is not kept[paths[0]]
    assert cache.headers("c", paths[:1])[0] is kept[paths[0]]


def test_key_images_are_byte_identical_when_rebuilt(tmp_path: Path) -> None:
    ct = [dcmread(p) for p in write_ct_series(tmp_path / "ct", n=4, size=32)]
    res = ScoreResult(study_uid=str(ct[0].StudyInstanceUID), series_uid=str(ct[0].SeriesInstanceUID),
                      log_p_normal_model=-1.0, log_p_mixture_model=0.0, log_posterior=-1.0, threshold=0.0,
                      flagged=True, percentile=0.0, model_version="v", region_score=-9.0,
                      region_window_mm=10.0, region_center_mm=[0.0, 0.0, 5.0])
    info = ModelSetInfo(version="v", device_uid=generate_uid(), preset="p", preprocessing_version="p",
                        threshold=0.0, threshold_method="m")
    grid = {"origin": [-109.14, -109.14, 50.0], "spacing": [1.71875, 1.71875, 4.5],
            "direction": [1, 0, 0, 0, 1, 0, 0, 0, -1]}
    series = "1.2.3.4.5"

    def build() -> list[bytes]:
        kis = build_key_images(res, ct, {"zmap": -8 * np.ones((32, 64, 64))}, grid, info,
                               series_instance_uid=series, sop_instance_uid=lambda i: f"{series}.{i}",
                               content_datetime=datetime(2026, 1, 1, 12, 0, 0))
        out = []
        for ki in kis:
            buf = io.BytesIO()
            ki.save_as(buf, enforce_file_format=True)
            out.append(buf.getvalue())
        return out

    first = build()
    time.sleep(0.05)  # the clock moves: nothing of it may reach the images
    assert first and build() == first
    ds = dcmread(io.BytesIO(first[0]))
    assert (str(ds.DateOfSecondaryCapture), str(ds.TimeOfSecondaryCapture)) == ("20260101", "120000")
