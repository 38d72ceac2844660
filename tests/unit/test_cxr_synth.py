"""Synthetic chest radiographs: anatomy, abnormal kinds, vendor headers, labels.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from training.synth.cxr_dicom import (
    CXR_VENDORS,
    DX_PROCESSING_STORAGE,
    write_cxr_dataset,
    write_cxr_study,
)
from training.synth.cxr_phantom import CXR_LESIONS, render_frontal, render_lateral
from triage.model.labels import read_labels


def test_frontal_anatomy_is_where_a_chest_is() -> None:
    r = render_frontal(np.random.default_rng(0), (220, 200), 2.0)
    img = r.image
    rows, cols = img.shape
    lungs = img[int(rows * 0.3), [int(cols * 0.3), int(cols * 0.7)]]
    mediastinum = img[int(rows * 0.3), cols // 2]
    assert (lungs < mediastinum).all(), "lung fields are less attenuating than the mediastinum"
    # left-right mirror symmetry: a frontal chest is nearly symmetric, a lateral is not
    def sym(a: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), a[:, ::-1].ravel())[0, 1])
    assert sym(img) > 0.8 > sym(render_lateral(np.random.default_rng(0), (220, 200), 2.0).image)


@pytest.mark.parametrize("lesion", CXR_LESIONS)
def test_each_abnormal_kind_changes_the_image(lesion: str) -> None:
    normal = render_frontal(np.random.default_rng(5), (220, 200), 2.0)
    ab = render_frontal(np.random.default_rng(5), (220, 200), 2.0, lesion)
    assert ab.lesion == lesion and ab.lesion_center_px is not None
    diff = np.abs(ab.image - normal.image)
    assert float(diff.max()) > 0.2, lesion


def test_vendors_cover_the_header_habits(tmp_path: Path) -> None:
    seen = set()
    for i, v in enumerate(CXR_VENDORS):
        t = write_cxr_study(tmp_path / f"s{i}", np.random.default_rng(i), lesion=None, patient_index=i,
                            vendor=v, lateral_fraction=1.0, synth_scale=6)
        ds = pydicom.dcmread(tmp_path / f"s{i}" / "frontal.dcm")
        a = ds.pixel_array
        assert a.dtype == np.uint16 and int(a.max()) < 2 ** int(ds.BitsStored)
        assert ds.Modality == v.modality and ds.PhotometricInterpretation == v.photometric
        assert ("ViewPosition" in ds) == v.view_position and ("BodyPartExamined" in ds) == v.body_part
        assert t.lateral == (not v.portable)
        if t.lateral:
            lat = pydicom.dcmread(tmp_path / f"s{i}" / "lateral.dcm")
            assert lat.StudyInstanceUID == ds.StudyInstanceUID
            assert lat.SeriesInstanceUID != ds.SeriesInstanceUID
        seen |= {ds.PhotometricInterpretation, ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID)}
        seen |= {"voi-lut"} if "VOILUTSequence" in ds else {"window"} if "WindowCenter" in ds else set()
        seen |= {f"bits{ds.BitsStored}"}
    want = {"MONOCHROME1", "MONOCHROME2", DX_PROCESSING_STORAGE, "voi-lut", "window", "bits12", "bits16"}
    assert want <= seen
    assert {"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.70"} <= seen  # RLE and JPEG Lossless


def test_dataset_labels_are_read_by_the_one_reader(tmp_path: Path) -> None:
    from training.synth.cxr_dicom import CXR_LABEL_COLUMNS
    from training.synth.dataset import LABEL_COLUMNS

    assert CXR_LABEL_COLUMNS == LABEL_COLUMNS
    rows = write_cxr_dataset(tmp_path / "a", 2, 5, seed=3, synth_scale=8)
    labels = read_labels(tmp_path / "a" / "labels.csv")
    assert len(labels) == 7 and sum(lb.abnormal for lb in labels.values()) == 5
    assert {lb.lesion for lb in labels.values() if lb.abnormal} == set(CXR_LESIONS)
    again = write_cxr_dataset(tmp_path / "b", 2, 5, seed=3, synth_scale=8)
    assert [t.study_uid for t in rows] == [t.study_uid for t in again]
