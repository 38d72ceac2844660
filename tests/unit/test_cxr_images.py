"""Plain image folders (PNG, JPEG; 8 or 16 bit) for the 2-D presets: training reads them, `triage score`
scores them, and the same pixels written as DICOM give the same images and the same scores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from training.data.sources import prepare_volumes, resolve_data
from training.harness.fixtures import tiny_model
from training.presets import config_from_preset
from training.synth.cxr_dicom import DX_PRESENTATION_STORAGE, write_cxr_dataset
from triage.assemble.radiograph import RADIOGRAPH_SHAPE, displayed_values, image_file_volume, read_radiograph
from triage.model.registry import Registry

TINY_2D = "test-tiny-2d"  # the radiograph tests' tiny preset

REPO = Path(__file__).resolve().parents[2]


def _as_dx(values: np.ndarray, path: Path) -> None:
    """16-bit grey values as a DX for-presentation image: MONOCHROME2, no LUTs, square pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DX_PRESENTATION_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", "PA", "CHEST"
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = values.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = values.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cxrimg")
    rows = write_cxr_dataset(base / "src", 4, 2, seed=7, lateral_fraction=0.0, synth_scale=6)
    png, dcm = base / "png", base / "dcm"
    png.mkdir()
    dcm.mkdir()
    for t in rows:
        ds = pydicom.dcmread(base / "src" / t.study_dir / "frontal.dcm")
        v = displayed_values(ds, Path("x"))
        v16 = np.rint((v - v.min()) / (v.max() - v.min()) * 65535).astype(np.uint16)
        name = f"{t.study_dir}.png"
        Image.fromarray(v16).save(png / name)
        _as_dx(v16, dcm / f"{t.study_dir}.dcm")
    lines = ["study_uid,label,lesion"] + [f"{t.study_dir}.png,{t.label},{t.lesion}" for t in rows]
    (png / "labels.csv").write_text("\n".join(lines) + "\n")
    return {"base": base, "png": png, "dcm": dcm}


def test_png_and_dicom_give_the_same_canonical_images(folders: dict[str, Path]) -> None:
    for f in sorted(folders["png"].glob("*.png")):
        a = image_file_volume(f).data
        b = read_radiograph(folders["dcm"] / f.with_suffix(".dcm").name)
        assert a.shape == RADIOGRAPH_SHAPE and np.array_equal(a, b), f.name


def test_training_reads_image_folders_with_labels(folders: dict[str, Path]) -> None:
    vs = resolve_data(folders["png"], folders["png"] / "labels.csv", only="normal")
    assert len(vs) == 4 and all(i.endswith(".png") for i in vs.ids) and vs.meta["format"] == "radiograph"
    x, _ = prepare_volumes(vs, config_from_preset("test-tiny-2d"))
    assert tuple(x.shape) == (4, 1, 16, 16) and x.dtype == torch.uint8
    both = resolve_data(folders["dcm"])
    assert len(both) == 6 and len(resolve_data(folders["png"])) == 6
    # 8-bit JPEG and 8-bit PNG are read too
    img = np.asarray(Image.open(sorted(folders["png"].glob("*.png"))[0]))
    jdir = folders["base"] / "jpeg"
    jdir.mkdir(exist_ok=True)
    Image.fromarray((img >> 8).astype(np.uint8)).save(jdir / "a.jpg", quality=95)
    Image.fromarray((img >> 8).astype(np.uint8)).save(jdir / "b.png")
    got = resolve_data(jdir)
    assert sorted(got.ids) == ["a.jpg", "b.png"]
    assert np.abs(got.volumes[0].astype(int) - got.volumes[1].astype(int)).mean() < 2.0



def test_triage_score_gives_the_same_scores_for_png_and_dicom(folders: dict[str, Path], tmp_path: Path
                                                              ) -> None:
    reg = Registry(tmp_path / "models")
    s = reg.create(tiny_model(tmp_path / "m0.pt", 1, TINY_2D), tiny_model(tmp_path / "m1.pt", 2, TINY_2D),
                   preset="test-tiny-2d",
                   preprocessing_version="radiograph-1", threshold=0.0, method="test", normal_scores=[0.0],
                   provenance={}, software_version="test")
    reg.promote(s.version)

    def score(folder: Path) -> dict[str, dict]:
        cmd = [sys.executable, "-m", "triage.cli", "score", "--json", "--models", str(tmp_path / "models"),
               str(folder)]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        return {Path(r["study_uid"]).stem if r["study_uid"].endswith(".png") else r["series_uid"]: r
                for r in rows}

    png = score(folders["png"])
    assert len(png) == 6 and all(not r.get("rejected") for r in png.values())
    dcm_rows = score(folders["dcm"])
    # key the DICOM rows by file: read each file's series UID
    by_file = {f.stem: dcm_rows[str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID)]
               for f in folders["dcm"].glob("*.dcm")}
    for name, r in png.items():
        assert r["log_posterior"] == by_file[name]["log_posterior"], name
        assert r["log_p_normal_model"] == by_file[name]["log_p_normal_model"]
