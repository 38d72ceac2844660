"""The region score of chest radiographs: windows as fractions of the image side, the image without its
padding as the search mask, a point on the source image, the SR's SCOORD point and the key image
(dciodvfy clean); the head-CT format is left as it was."""

from __future__ import annotations

import io
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid

from training.harness.fixtures import tiny_model
from training.synth.cxr_dicom import CXR_VENDORS, write_cxr_study
from triage.assemble.folders import folder_studies
from triage.config import AssemblySettings
from triage.model.modelset import region_calibration
from triage.model.radiomap import (
    FORMAT_2D,
    WINDOWS_SIDE,
    content_mask,
    model_spacing_side,
    radiograph_fields,
    source_to_model_index,
)
from triage.model.registry import Registry
from triage.model.results import ModelSetInfo
from triage.model.score import ModelPair, Scorer, VolumeInput
from triage.model.voxelmap import (
    FORMAT,
    RegionCalibration,
    RegionScorer,
    fit_region_calibration,
    load_region_calibration,
    model_spacing_mm,
    search_mask,
    window_voxels,
)
from triage.report.keyimages import build_key_images, choose_slices
from triage.report.sr import build_sr

WHEN = datetime(2024, 1, 2, 10, 30, tzinfo=UTC)
SHAPE = (32, 32)


def test_mask_leaves_out_the_padding_and_the_blocks_it_touches() -> None:
    img = np.full((512, 512), 60, np.uint8)
    img[:, :40] = 0  # padding left and right, as canonical_image pads a portrait image
    img[:, 472:] = 0
    img[200:210, 200:210] = 0  # a dark spot inside the content is still content
    m = content_mask(img, SHAPE)  # 16-pixel blocks: 40 / 16 = 2.5 -> blocks 0-2 touch the padding
    assert not m[:, :3].any() and m[:, 3].all()
    assert not m[:, 29:].any() and m[:, 28].all()  # 472 / 16 = 29.5
    assert m[12, 12]
    assert content_mask(img, (512, 512))[:, 40:472].all() and not content_mask(img, (512, 512))[:, :40].any()
    assert search_mask(img, SHAPE).sum() == m.sum()  # what the scorer uses for a 2-D set
    assert search_mask(np.zeros((64, 64), np.uint8), (64, 64)).all()  # a blank: everywhere


def test_windows_are_fractions_of_the_side() -> None:
    sp = model_spacing_side((128, 128))
    assert sp == (1 / 128, 1 / 128)
    assert [window_voxels(w, sp) for w in WINDOWS_SIDE] == [(5, 5), (9, 9), (17, 17), (33, 33)]
    with pytest.raises(ValueError):
        model_spacing_side((8, 8, 8))


def _maps(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    spread = 0.1 + 0.5 * np.exp(-(xx**2 + yy**2) * 2)
    return 0.2 * xx + spread * rng.standard_normal((n, 2, *SHAPE))  # two levels


def test_2d_calibration_finds_a_blob_and_round_trips(tmp_path: Path) -> None:
    cal = fit_region_calibration(_maps(30, 1), model_spacing_side(SHAPE), specificity=0.9,
                                 windows_mm=WINDOWS_SIDE, fmt=FORMAT_2D)
    assert cal.is_2d and cal.shape == SHAPE and cal.levels == 2
    back = RegionCalibration.from_bytes(cal.to_bytes())
    assert back.format == FORMAT_2D and back.windows_mm == cal.windows_mm
    assert back.to_bytes() == cal.to_bytes()
    summary = cal.summary()
    assert summary["format"] == FORMAT_2D and summary["windows_side"] == list(WINDOWS_SIDE)
    d = _maps(1, 7)[0]
    yy, xx = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    d = d - 3.0 * np.exp(-((yy - 20) ** 2 + (xx - 9) ** 2) / 8.0)[None]
    r = RegionScorer(cal)(d)
    assert r.score < cal.threshold
    assert abs(r.index_zyx[1] - 20) <= 2 and abs(r.index_zyx[2] - 9) <= 2 and r.index_zyx[0] == 0.0
    mask = np.ones(SHAPE, bool)
    mask[:, :16] = False  # searched only on the right half: the blob on the left is not found there
    assert RegionScorer(cal)(d, mask).index_zyx[2] >= 16


def test_the_head_ct_format_is_unchanged() -> None:
    spacing = model_spacing_mm((16, 32, 32))
    maps = np.random.default_rng(0).standard_normal((5, 16, 32, 32))
    cal = fit_region_calibration(maps, spacing, specificity=0.9)
    assert cal.format == FORMAT == "glowtriage.region/2" and not cal.is_2d
    with np.load(io.BytesIO(cal.to_bytes())) as z:
        assert sorted(z.files) == sorted(["format", "windows_mm", "spacing_mm", "mean", "sd", "min_mean",
                                          "min_sd", "normal_scores", "threshold", "specificity"])
        assert str(z["format"]) == FORMAT
    assert set(cal.summary()) == {"format", "windows_mm", "spacing_mm", "levels", "threshold", "specificity",
                                  "normal_scores", "sd_floor", "minima_mean", "minima_sd", "method"}


def test_location_on_the_source_image_and_back() -> None:
    # a 600 x 400 (rows x cols) image at 0.5 x 0.5 mm: 512 rows, 341 columns, padded left by 85
    meta = {"grid": {"spacing": [300 / 512, 300 / 512]}, "sop_instance_uids": ["1.2.3"],
            "source_geometry": {"content_box": [0, 85, 512, 341], "source_shape": [600, 400],
                                "source_spacing": [0.5, 0.5]}}
    f = radiograph_fields((10.0, 16.0), 1 / 16, np.zeros(SHAPE), SHAPE, meta)
    assert f["region_window_mm"] == pytest.approx(300 / 16)
    canon = f["region_map"]["canonical_center_rc"]
    assert canon == [10 * 16 + 7.5, 16 * 16 + 7.5]
    col, row = f["extra"]["region_center_px"]
    assert row == pytest.approx((canon[0] + 0.5) * 600 / 512)
    assert col == pytest.approx((canon[1] + 0.5 - 85) * 400 / 341)
    assert f["region_center_mm"] == pytest.approx([col * 0.5, row * 0.5])
    assert f["region_sop_instance_uid"] == "1.2.3"
    # a source pixel's centre at that point maps back to the model index
    mr, mc = source_to_model_index(np.array([row - 0.5]), np.array([col - 0.5]),
                                   f["region_map"]["geometry"], SHAPE)
    assert mr[0] == pytest.approx(10.0) and mc[0] == pytest.approx(16.0)
    bare = radiograph_fields((10.0, 16.0), 1 / 16, np.zeros(SHAPE), SHAPE, None)
    assert "region_center_mm" not in bare and bare["region_window_mm"] == 32.0


def _dicom_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy (dicom3tools) is not installed: scripts/bootstrap.sh installs it")
    out = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, check=False)
    return [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("Error")]


@pytest.fixture(scope="module")
def chest(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny chest set with a region calibration on five synthetic normals, and a DX study with an
    effusion (CR MONOCHROME1 vendor 0 and DX vendor 2 normals, as the daemon assembles them)."""
    base = tmp_path_factory.mktemp("cxr-region")
    rng = np.random.default_rng(3)
    for i in range(5):
        write_cxr_study(base / "normals" / f"s{i}", rng, lesion=None, patient_index=i, lateral_fraction=0.0,
                        vendor=CXR_VENDORS[i % 3], synth_scale=8)
    write_cxr_study(base / "study", rng, lesion="effusion", patient_index=9, lateral_fraction=0.0,
                    vendor=CXR_VENDORS[2], synth_scale=8)
    normals = [st.volume.data for st in folder_studies([base / "normals"], AssemblySettings()) if st.volume]
    study = next(st for st in folder_studies([base / "study"], AssemblySettings()))
    assert study.volume is not None and len(normals) == 5
    m0, m1 = tiny_model(base / "m0.pt", 1, "test-tiny-2d"), tiny_model(base / "m1.pt", 2, "test-tiny-2d")
    pair = ModelPair.load(m0, m1, torch.device("cpu"))
    scores = [float(np.subtract(*pair.log_likelihoods(v))) for v in normals]
    reg = Registry(base / "models")
    threshold = float(np.median(scores))
    entry = region_calibration(pair, normals, threshold, scores, reg.root)
    assert entry is not None and entry["format"] == FORMAT_2D
    ms = reg.create(m0, m1, preset="test-tiny-2d", preprocessing_version="radiograph-1", threshold=threshold,
                    method="test", normal_scores=sorted(scores), provenance={}, software_version="test",
                    calibration_extra={"region": entry})
    return {"base": base, "set": ms, "study": study, "entry": entry}


def test_a_chest_set_scores_the_region_on_the_image(chest: dict) -> None:
    ms, st = chest["set"], chest["study"]
    cal = load_region_calibration(ms.path, ms.manifest)
    assert cal is not None and cal.is_2d and cal.windows_mm == WINDOWS_SIDE
    meta = st.volume.metadata()
    sc = Scorer(ms, device="cpu", flag_policy="either")
    assert sc.flag_policy == "either"
    r = sc.score([VolumeInput(st.study_uid, st.series_uid, st.volume.data, meta)])[0]
    j = r.to_json()
    assert j["region_score"] is not None and 0.0 <= j["region_percentile"] <= 100.0
    assert j["flagged"] == (j["global_flagged"] or j["region_flagged"])
    rows, cols = meta["source_geometry"]["source_shape"]
    col, row = j["region_center_px"]
    assert 0 <= col <= cols and 0 <= row <= rows
    dr, dc = meta["source_geometry"]["source_spacing"]
    assert j["region_center_mm"] == pytest.approx([col * dc, row * dr])
    assert j["region_sop_instance_uid"] == meta["sop_instance_uids"][0]
    assert j["region_window_side"] in WINDOWS_SIDE
    assert j["region_window_mm"] == pytest.approx(j["region_window_side"] * 512 * meta["grid"]["spacing"][0])
    assert "region_map" not in j and r.region_map["kind"] == "cxr"
    # the region is searched off the padding only
    mask = search_mask(st.volume.data, (16, 16))
    assert mask[int(r.region_map["index_rc"][0]), int(r.region_map["index_rc"][1])]
    # the same result without metadata: a score and a window, no place
    bare = sc.score([VolumeInput(st.study_uid, st.series_uid, st.volume.data)])[0]
    assert bare.region_score == r.region_score and bare.region_center_mm is None


def test_chest_sr_carries_the_region_and_its_key_image(chest: dict, tmp_path: Path) -> None:
    ms, st = chest["set"], chest["study"]
    meta = st.volume.metadata()
    r = Scorer(ms, device="cpu", flag_policy="either").score(
        [VolumeInput(st.study_uid, st.series_uid, st.volume.data, meta)])[0]
    frontal = pydicom.dcmread(chest["base"] / "study" / "frontal.dcm")
    info = ModelSetInfo(version=ms.version, device_uid=generate_uid(), preset="test-tiny-2d",
                        preprocessing_version="radiograph-1", threshold=r.threshold, threshold_method="test",
                        kind="cxr")
    assert choose_slices([frontal], r.region_center_mm, r.region_window_mm) == [frontal]
    kis = build_key_images(r, [frontal], r.region_map, meta.get("grid") or {}, info,
                           series_instance_uid="1.2.3.4.200", sop_instance_uid=lambda i: f"1.2.3.4.200.{i}",
                           content_datetime=WHEN)
    assert len(kis) == 1
    ki = kis[0]
    assert ki.SourceImageSequence[0].ReferencedSOPInstanceUID == frontal.SOPInstanceUID
    rgb = ki.pixel_array
    assert rgb.shape == (frontal.Rows, frontal.Columns, 3)  # synthetic images are < 1024 pixels
    # the ring (cyan) is drawn around the region's centre
    col, row = r.to_json()["region_center_px"]
    cyan = np.argwhere((rgb[..., 0] == 0) & (rgb[..., 1] == 255) & (rgb[..., 2] == 255))
    assert len(cyan) > 0
    dist = np.hypot(cyan[:, 0] + 0.5 - row, cyan[:, 1] + 0.5 - col)
    radius = r.region_window_mm / 2 / float(frontal.get("PixelSpacing", frontal.get("ImagerPixelSpacing"))[1])
    assert np.median(dist) == pytest.approx(radius, abs=2.0)
    ki.save_as(tmp_path / "key.dcm", enforce_file_format=True)
    assert _dicom_errors(tmp_path / "key.dcm") == []
    head = pydicom.dcmread(chest["base"] / "study" / "frontal.dcm", stop_before_pixels=True)
    sr = build_sr(r, [head], info, series_instance_uid="1.2.3.4.100", sop_instance_uid="1.2.3.4.100.1",
                  content_datetime=WHEN, key_images=kis)
    points = []

    def walk(items: pydicom.Sequence) -> None:
        for it in items:
            if it.get("ValueType") == "SCOORD":
                points.append((str(it.GraphicType), [float(v) for v in it.GraphicData],
                               it.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
            assert it.get("ValueType") != "SCOORD3D"
            walk(it.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert len(points) == 1
    kind, xy, ref = points[0]
    assert kind == "POINT" and ref == frontal.SOPInstanceUID
    assert xy == pytest.approx([col, row], abs=1e-3)
    refs = {str(s.ReferencedSOPInstanceUID) for e in sr.CurrentRequestedProcedureEvidenceSequence
            for se in e.ReferencedSeriesSequence for s in se.ReferencedSOPSequence}
    assert str(ki.SOPInstanceUID) in refs
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert _dicom_errors(tmp_path / "sr.dcm") == []
