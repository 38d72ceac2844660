"""Radiograph assembly: routing by kind, the frontal view chosen with reasons, the canonical image."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from training.synth.cxr_dicom import CXR_VENDORS, write_cxr_dataset, write_cxr_study
from triage.assemble.folders import folder_studies
from triage.assemble.radiograph import (
    RADIOGRAPH_SHAPE,
    assemble_by_kind,
    load_assembled,
    read_radiograph,
    study_kind,
)
from triage.assemble.volume import group_studies, read_headers, save_volume
from triage.config import AssemblySettings


def _study(tmp_path: Path, vendor_index: int, lesion: str | None = None, seed: int = 0) -> Path:
    d = tmp_path / f"v{vendor_index}_{seed}"
    write_cxr_study(d, np.random.default_rng(seed), lesion=lesion, patient_index=seed,
                    vendor=CXR_VENDORS[vendor_index], lateral_fraction=1.0, synth_scale=5)
    return d


def _assemble(folder: Path) -> tuple:  # (series, SelectionResult, AssembledVolume | None)
    hs, errors = read_headers(sorted(folder.rglob("*.dcm")))
    assert not errors
    (series,) = group_studies(hs).values()
    return series, *assemble_by_kind(series, AssemblySettings())


@pytest.mark.parametrize("vi", range(len(CXR_VENDORS)))
def test_every_vendor_gives_the_frontal_canonical_image(tmp_path: Path, vi: int) -> None:
    folder = _study(tmp_path, vi)
    series, sel, vol = _assemble(folder)
    assert study_kind(series) == "cxr"
    assert vol is not None and sel.chosen == vol.series_uid
    assert vol.data.shape == RADIOGRAPH_SHAPE and vol.data.dtype == np.uint8 and int(vol.data.max()) == 127
    assert vol.source_geometry["frontal_score"] > 0.5
    for uid, why in sel.skipped.items():  # the lateral, by its header or by its content
        assert uid != sel.chosen and ("lateral" in why or "not a frontal chest" in why), why
    if not CXR_VENDORS[vi].portable:
        assert len(sel.skipped) == 1
    if not CXR_VENDORS[vi].view_position:
        assert any("by image content" in w for w in vol.warnings)
    (st,) = folder_studies([folder], AssemblySettings())  # what `triage score` reports: each warning once
    assert len(st.warnings) == len(set(st.warnings))
    assert sum("by image content" in w for w in st.warnings) == (0 if CXR_VENDORS[vi].view_position else 1)


def test_monochrome1_is_inverted_to_the_same_image(tmp_path: Path) -> None:
    d = _study(tmp_path, 2)  # Carestream: MONOCHROME2, window
    ds = pydicom.dcmread(d / "frontal.dcm")
    inv = copy.deepcopy(ds)
    top = 2 ** int(ds.BitsStored) - 1
    inv.PixelData = (top - ds.pixel_array).astype("<u2").tobytes()
    inv.PhotometricInterpretation = "MONOCHROME1"
    inv.PresentationLUTShape = "INVERSE"
    inv.WindowCenter = f"{top - float(ds.WindowCenter):.1f}"
    inv.save_as(tmp_path / "inv.dcm")
    a, b = read_radiograph(d / "frontal.dcm"), read_radiograph(tmp_path / "inv.dcm")
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # the window matters: a narrow one clips the lungs to black
    narrow = copy.deepcopy(ds)
    narrow.WindowWidth = "50"
    narrow.save_as(tmp_path / "narrow.dcm")
    assert np.abs(read_radiograph(tmp_path / "narrow.dcm").astype(int) - a.astype(int)).mean() > 5


@pytest.mark.parametrize("vi", [1, 3])  # Agfa: JPEG Lossless SV1, Siemens: RLE Lossless
def test_compressed_equals_uncompressed(tmp_path: Path, vi: int) -> None:
    d = _study(tmp_path, vi)
    ds = pydicom.dcmread(d / "frontal.dcm")
    assert ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian
    ds.decompress()
    ds.save_as(tmp_path / "plain.dcm")
    assert np.array_equal(read_radiograph(d / "frontal.dcm"), read_radiograph(tmp_path / "plain.dcm"))


def test_lateral_only_study_is_rejected_with_the_reason(tmp_path: Path) -> None:
    d = _study(tmp_path, 0)
    (d / "frontal.dcm").unlink()
    _, sel, vol = _assemble(d)
    assert vol is None and sel.chosen is None and "no frontal chest radiograph" in (sel.reason or "")
    assert "lateral view (ViewPosition LL" in (sel.reason or "")


def test_saved_radiograph_loads_back_and_folders_route_by_kind(tmp_path: Path) -> None:
    _, _, vol = _assemble(_study(tmp_path, 0))
    back = load_assembled(save_volume(vol, tmp_path / "x.npz"))
    assert np.array_equal(back.data, vol.data) and back.preprocessing_version == "radiograph-1"
    write_cxr_dataset(tmp_path / "ds", 2, 2, seed=1, synth_scale=6)
    got = list(folder_studies([tmp_path / "ds"], AssemblySettings()))
    assert len(got) == 4
    assert all(s.volume is not None and s.volume.data.shape == RADIOGRAPH_SHAPE for s in got)
