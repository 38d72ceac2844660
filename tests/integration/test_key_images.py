"""Key images from the report stage to a real Orthanc, beside the SR, and dciodvfy on what was sent.

Driven the way the daemon drives it: a scored, flagged study with a located region in the store (its
region map kept beside the results, as :func:`triage.pipeline.score_assembled` keeps it), the report
stage (:func:`triage.pipeline.report_scored`) writing the key images and the SR that references them,
and :class:`triage.pipeline.Sender` sending them to the PACS by C-STORE.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from training.harness.fixtures import assembled_series
from training.harness.orthanc import Orthanc
from triage.assemble.common import PIXEL_MM, SLICE_MM
from triage.config import parse
from triage.model.results import ModelSetInfo, ScoreResult
from triage.pipeline import Sender, _save_region_map, report_scored
from triage.store.db import Store

pytestmark = pytest.mark.integration

MODEL = ModelSetInfo(version="20261130-0000-ki0001", device_uid=generate_uid(), preset="cpu-small",
                     preprocessing_version="pp1", threshold=-3.5, threshold_method="specificity=0.9")
SC = "1.2.840.10008.5.1.4.1.1.7"


def _grid_and_map() -> tuple[dict, np.ndarray]:
    """A canonical grid over write_ct_series' slices (x, y from -109 mm, z 50 mm down) and a model-grid
    z-map that is -8 within 25 mm of (0, 0, 20) mm."""
    grid = {"origin": [-109.14, -109.14, 50.0], "spacing": [PIXEL_MM, PIXEL_MM, SLICE_MM],
            "direction": [1, 0, 0, 0, 1, 0, 0, 0, -1]}
    zz, yy, xx = np.meshgrid(np.arange(32), np.arange(64), np.arange(64), indexing="ij")
    px, py = -109.14 + (2 * xx + 0.5) * PIXEL_MM, -109.14 + (2 * yy + 0.5) * PIXEL_MM
    pz = 50.0 - zz * SLICE_MM
    return grid, np.where(np.sqrt(px**2 + py**2 + (pz - 20.0) ** 2) < 25.0, -8.0, 0.0)


def test_flagged_study_sends_key_images_with_the_sr_to_the_pacs(
    orthanc_factory: Callable[..., Orthanc], ct_series: Callable[..., list[Path]], tools, tmp_path: Path
) -> None:
    orthanc = orthanc_factory()
    now = [1_000_000.0]
    store = Store(tmp_path / "var", clock=lambda: now[0])
    cfg = parse({"hl7": {"enabled": False},
                 "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}}, None)
    ct = ct_series(tmp_path / "ct", n=10, size=64)
    study, series = assembled_series(store, ct, lambda: now[0])
    heads = [dcmread(p, stop_before_pixels=True) for p in ct]
    grid, zmap = _grid_and_map()
    result = ScoreResult(
        study_uid=study, series_uid=series, log_p_normal_model=-1000.5, log_p_mixture_model=-990.25,
        log_posterior=-10.25, threshold=-3.5, flagged=True, percentile=1.5, model_version=MODEL.version,
        region_score=-8.0, region_percentile=0.0, region_threshold=-4.0, region_flagged=True,
        region_window_mm=20.0, region_center_mm=[0.0, 0.0, 20.0],
        region_sop_instance_uid=str(heads[4].SOPInstanceUID), global_flagged=True, flag_policy="either",
        region_map={"zmap": zmap, "image_shape": [32, 64, 64], "canonical_index_zyx": [6.7, 63.5, 63.5],
                    "window_mm": 20.0})
    _save_region_map(store, result, 0, {"grid": grid})
    assert store.record_score(study, 0, result.to_json())

    assert report_scored(store, SimpleNamespace(info=MODEL, info_for=lambda _v: MODEL), cfg) == 1  # type: ignore[arg-type]
    (row,) = store.outbox(study)
    sr_path, *key_paths = row.files
    assert 1 <= len(key_paths) <= 5  # slices within 10 mm of the centre: 15, 20, 25 mm
    sr = dcmread(sr_path)
    refs = {str(r.ReferencedSOPInstanceUID) for e in sr.CurrentRequestedProcedureEvidenceSequence
            for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    keys = [dcmread(p) for p in key_paths]
    assert {str(k.SOPInstanceUID) for k in keys} <= refs  # the SR references its key images
    for k in keys:
        assert k.SOPClassUID == SC and k.StudyInstanceUID == study and k.Rows == 64
        assert k.pixel_array[32, 32, 0] > k.pixel_array[32, 32, 2]  # the map is coloured in the middle
    for p in [sr_path, *key_paths]:
        out = subprocess.run([tools.require_tool("dciodvfy"), str(p)], capture_output=True, text=True,
                             timeout=60)
        errors = [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("Error")]
        assert errors == [], f"{p.name}: " + "\n".join(errors)

    assert Sender(store, cfg).drain(now=now[0]) == 1
    assert store.outbox(study)[0].state == "sent"
    assert orthanc.instance_count() == 1 + len(key_paths)  # the SR and its key images, one study
    assert len(orthanc.sr_instances(study)) == 1
    store.close()
