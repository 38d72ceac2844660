"""Tests for training.synth.head: the synthetic DICOM studies are the ground truth for everything else,
so these check that files are valid DICOM, that headers say exactly what the pixels are, and that
the hard cases and distractors are what StudyTruth claims they are."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from training.synth import head as synth
from training.synth.head import (
    CT_IMAGE_STORAGE,
    SC_IMAGE_STORAGE,
    TISSUE,
    StudyTruth,
    SynthOptions,
    main,
    make_phantom,
    pixel_points,
    write_dataset,
    write_study,
)

INTRACRANIAL = [TISSUE[k] for k in ("csf", "gm", "wm", "lesion", "edema", "falx", "calcification")]
REQUIRED_CT_TAGS = (  # noqa: SIM905 - one string of 36 keywords reads better than a list literal
    "SOPClassUID SOPInstanceUID StudyInstanceUID SeriesInstanceUID PatientName PatientID PatientBirthDate "
    "PatientSex StudyDate StudyTime AccessionNumber Modality Manufacturer ImageType SliceThickness "
    "ImagePositionPatient ImageOrientationPatient PixelSpacing Rows Columns BitsAllocated BitsStored HighBit "
    "PixelRepresentation RescaleIntercept RescaleSlope WindowCenter WindowWidth InstanceNumber SliceLocation "
    "FrameOfReferenceUID KVP ConvolutionKernel GantryDetectorTilt PatientPosition SeriesDescription"
).split()

# Fast settings for studies that only look at the primary series (point sampling: 3x fewer samples).
PLAIN = {"matrix": 256, "distractors": False, "slab_samples": 1}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[StudyTruth]]:
    out = tmp_path_factory.mktemp("synth")
    rows = write_dataset(out, normal=1, abnormal=2, seed=1234, options=SynthOptions(matrix=256))
    return out, rows


def series_dir(root: Path, t: StudyTruth, role: str) -> Path:
    (uid,) = [u for u, r in t.series_roles.items() if r == role]
    return root / t.study_dir / t.series_dirs[uid]


def read_series(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]


def hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def centres(d: pydicom.Dataset) -> np.ndarray:
    """Patient coordinates of every pixel centre, from the header alone."""
    return pixel_points(d.ImagePositionPatient, d.ImageOrientationPatient, d.PixelSpacing, d.Rows, d.Columns)


def spatial(dss: list[pydicom.Dataset], t: StudyTruth) -> list[pydicom.Dataset]:
    """Axial primary images sorted along the plane normal (what a consumer must do)."""
    n = np.cross(t.iop[:3], t.iop[3:])
    axial = [d for d in dss if np.allclose([float(x) for x in d.ImageOrientationPatient], t.iop)]
    return sorted(axial, key=lambda d: float(n @ np.array(d.ImagePositionPatient, float)))


def study(tmp_path: Path, name: str, seed: int, lesion: str | None = None, **opts: object) -> StudyTruth:
    options = SynthOptions(**{**PLAIN, **opts})  # type: ignore[arg-type]
    return write_study(tmp_path / name, np.random.default_rng(seed), lesion=lesion, options=options,
                       patient_index=seed)  # fmt: skip


# --- dataset level ---------------------------------------------------------------------------------


def test_labels_csv_and_truth_jsonl(dataset: tuple[Path, list[StudyTruth]]) -> None:
    out, rows = dataset
    with (out / "labels.csv").open() as fh:
        lines = list(csv.reader(fh))
    # The first three columns are what every reader uses; the rest are extra ground truth.
    assert lines[0] == ["study_uid", "label", "lesion", "lesion_x", "lesion_y", "lesion_z", "kind", "patterns"]
    body = lines[1:]
    assert len(body) == 3
    assert sorted(r[1] for r in body) == ["abnormal", "abnormal", "normal"]
    assert sorted(r[2] for r in body) == ["", "hemorrhage", "infarct"]
    assert all((r[1] == "normal") == (r[2] == "") == (r[3:6] == ["", "", ""]) for r in body)
    assert all(r[6:] == ["head", ""] for r in body)
    truths = [StudyTruth.from_dict(json.loads(x)) for x in (out / "truth.jsonl").read_text().splitlines()]
    assert [t.study_uid for t in truths] == [r[0] for r in body] == [t.study_uid for t in rows]
    assert truths == rows  # JSON round trip is lossless
    for t in rows:
        assert (t.lesion_voxels > 0) == (t.label == "abnormal")
        assert bool(t.lesion_slices) == (t.label == "abnormal")


def test_every_file_is_valid_dicom_with_required_tags(dataset: tuple[Path, list[StudyTruth]]) -> None:
    out, rows = dataset
    for t in rows:
        files = sorted((out / t.study_dir).rglob("*.dcm"))
        frames: set[str] = set()
        assert len(files) == sum(t.series_files.values())
        for f in files:
            raw = f.read_bytes()
            assert raw[128:132] == b"DICM"
            ds = pydicom.dcmread(f)
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.StudyInstanceUID == t.study_uid
            assert t.series_roles[ds.SeriesInstanceUID]
            assert ds.PatientID == t.patient_id and str(ds.PatientName).startswith("SYNTH^P")
            assert ds.Modality == "CT"
            if t.series_roles[ds.SeriesInstanceUID] == "dose":
                assert ds.SOPClassUID == SC_IMAGE_STORAGE
                continue
            assert ds.SOPClassUID == CT_IMAGE_STORAGE
            missing = [k for k in REQUIRED_CT_TAGS if k not in ds]
            assert not missing, (f, missing)
            assert ds.BitsAllocated == 16 and ds.HighBit == ds.BitsStored - 1
            assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
            assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
            frames.add(ds.FrameOfReferenceUID)
        assert len(frames) == 1  # one acquisition frame for every CT series of the study


def test_primary_geometry_matches_truth(dataset: tuple[Path, list[StudyTruth]]) -> None:
    out, rows = dataset
    for t in rows:
        dss = spatial(read_series(series_dir(out, t, "primary")), t)
        assert len(dss) == t.n_slices == t.n_slices_planned
        assert 28 <= t.n_slices <= 40 and 4.0 <= t.slice_spacing <= 5.0
        first = dss[0]
        assert np.allclose([float(x) for x in first.ImagePositionPatient], t.ipp_first)
        assert [float(x) for x in first.PixelSpacing] == t.pixel_spacing
        assert (first.Rows, first.Columns) == (t.rows, t.cols) == (256, 256)
        assert 0.8 <= t.pixel_spacing[0] <= 1.0
        pos = np.array([[float(x) for x in d.ImagePositionPatient] for d in dss])
        assert np.allclose(np.diff(pos, axis=0), t.slice_step, atol=2e-3)
        assert np.allclose(np.linalg.norm(np.diff(pos, axis=0), axis=1), t.slice_spacing, atol=2e-3)
        assert [int(d.InstanceNumber) for d in dss] == t.instance_numbers
        assert float(first.SliceThickness) == t.slice_thickness
        assert first.PixelRepresentation == t.pixel_representation and first.BitsStored == t.bits_stored


def test_distractor_series_have_their_roles(dataset: tuple[Path, list[StudyTruth]]) -> None:
    out, rows = dataset
    for t in rows:
        assert sorted(t.series_roles.values()) == sorted(synth.ROLES)
        vendor = synth._VENDORS[t.vendor]
        prim = read_series(series_dir(out, t, "primary"))[0]
        assert list(prim.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert prim.ConvolutionKernel in vendor.soft_kernels
        assert prim.SeriesInstanceUID == t.primary_series_uid

        loc = read_series(series_dir(out, t, "localizer"))
        assert 1 <= len(loc) <= 2 and all(list(d.ImageType)[2] == "LOCALIZER" for d in loc)
        assert (loc[0].Rows, loc[0].Columns) == (512, 512)

        bone = read_series(series_dir(out, t, "bone"))
        assert len(bone) == t.n_slices_planned
        assert "BONE" in bone[0].SeriesDescription.upper()
        assert bone[0].ConvolutionKernel in vendor.bone_kernels
        # Same planes as the primary, so only kernel/description can tell them apart.
        assert {tuple(map(float, d.ImagePositionPatient)) for d in bone} == {
            tuple(map(float, d.ImagePositionPatient)) for d in read_series(series_dir(out, t, "primary"))
        }
        assert np.std(hu(bone[len(bone) // 2])[100:150, 100:150]) > np.std(
            hu(spatial(read_series(series_dir(out, t, "primary")), t)[len(bone) // 2])[100:150, 100:150]
        )

        thin = read_series(series_dir(out, t, "thin"))
        assert all(float(d.SliceThickness) <= 1.25 for d in thin) and len(thin) >= 16

        ref = read_series(series_dir(out, t, "reformat"))
        assert all(d.ImageType[0] == "DERIVED" for d in ref)
        coronal = [1, 0, 0, 0, 0, -1]
        assert all(np.allclose([float(x) for x in d.ImageOrientationPatient], coronal) for d in ref)

        (dose,) = read_series(series_dir(out, t, "dose"))
        assert dose.SOPClassUID == SC_IMAGE_STORAGE and dose.SeriesDescription == "Dose Report"


# --- determinism ----------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_differs(
    tmp_path: Path, dataset: tuple[Path, list[StudyTruth]]
) -> None:
    out, rows = dataset
    # Study i of a dataset is a pure function of (seed, i): regenerate one alone and compare bytes.
    t = rows[1]
    rng = np.random.default_rng(np.random.SeedSequence([1234, 1]))
    again = write_study(tmp_path / "again", rng, lesion=t.lesion or None, options=SynthOptions(matrix=256),
                        patient_index=1)  # fmt: skip
    assert again.to_dict() == {**t.to_dict(), "study_dir": "again"}
    a, b = _tree(out / t.study_dir), _tree(tmp_path / "again")
    assert a.keys() == b.keys() and a == b
    other = write_study(tmp_path / "other", np.random.default_rng(np.random.SeedSequence([1235, 1])),
                        lesion=t.lesion or None, options=SynthOptions(**PLAIN), patient_index=1)  # type: ignore[arg-type]
    assert other.study_uid != t.study_uid and other.primary_series_uid != t.primary_series_uid
    assert other.phantom_seed != t.phantom_seed
    c = _tree(tmp_path / "other")
    assert not set(a.values()) & set(c.values())


# --- anatomy and lesions --------------------------------------------------------------------------


def test_primary_hu_statistics(dataset: tuple[Path, list[StudyTruth]]) -> None:
    out, rows = dataset
    for t in rows:
        dss = spatial(read_series(series_dir(out, t, "primary")), t)
        vol = np.stack([hu(d) for d in dss])
        assert (vol > 300).sum() > 1000  # skull
        assert (vol > 1000).any()  # compact bone
        corners = np.concatenate([vol[:, :12, :12].ravel(), vol[:, -12:, -12:].ravel()])
        assert abs(np.median(corners) + 1000) < 10
        ph = make_phantom(np.random.default_rng(t.phantom_seed), t.lesion_spec or None)
        mid = dss[len(dss) // 2 : len(dss) // 2 + 3]
        labels = np.stack([ph.sample(centres(d))[1].reshape(d.Rows, d.Columns) for d in mid])
        img = np.stack([hu(d) for d in mid])
        gm = img[labels == TISSUE["gm"]]
        wm = img[labels == TISSUE["wm"]]
        brain = np.concatenate([gm, wm])
        assert 15 <= np.median(brain) <= 50
        assert np.median(gm) > np.median(wm) + 4  # gray/white differentiation survives noise
        assert np.median(img[labels == TISSUE["csf"]]) < 20
        assert 2.0 < np.std(wm) < 20.0  # noisy, not constant


@pytest.mark.parametrize("lesion", ["hemorrhage", "infarct"])
def test_paired_lesion_difference_is_inside_the_brain(tmp_path: Path, lesion: str) -> None:
    t0 = study(tmp_path, "n", 21, None, slab_samples=1)
    t1 = study(tmp_path, "a", 21, lesion, slab_samples=1)
    assert t0.primary_series_uid == t1.primary_series_uid and t0.label == "normal" and t1.label == "abnormal"
    d0 = spatial(read_series(tmp_path / "n" / t0.series_dirs[t0.primary_series_uid]), t0)
    d1 = spatial(read_series(tmp_path / "a" / t1.series_dirs[t1.primary_series_uid]), t1)
    ph = make_phantom(np.random.default_rng(t0.phantom_seed), None)
    diff_slices = []
    signed_sum = 0.0
    n_diff = 0
    for k, (a, b) in enumerate(zip(d0, d1, strict=True)):
        diff = hu(b) - hu(a)
        mask = diff != 0
        if not mask.any():
            continue
        diff_slices.append(k)
        pts = centres(a)
        lab = ph.sample(pts)[1].reshape(a.Rows, a.Columns)
        assert np.isin(lab[mask], INTRACRANIAL).all()  # nothing outside the brain/CSF changed
        signed_sum += diff[mask].sum()
        n_diff += int(mask.sum())
    assert n_diff > 20
    assert set(diff_slices) <= set(t1.lesion_slices)
    mean = signed_sum / n_diff
    if lesion == "hemorrhage":
        assert mean > 15  # hyperdense
    else:
        assert mean < -4  # hypodense


@pytest.mark.parametrize("spec", [f"hemorrhage:{s}" for s in synth.HEMORRHAGE_SUBTYPES]
                         + [f"infarct:{s}" for s in synth.INFARCT_SUBTYPES])  # fmt: skip
def test_each_lesion_subtype_is_intracranial_with_right_contrast(spec: str) -> None:
    normal = make_phantom(np.random.default_rng(5), None)
    sick = make_phantom(np.random.default_rng(5), spec)
    assert sick.lesion is not None and f"{sick.lesion.kind}:{sick.lesion.subtype}" == spec
    g = np.arange(-100.0, 100.0, 2.5)
    zz, yy, xx = np.meshgrid(g * 0.8, g, g * 0.85, indexing="ij")
    pts = np.stack([xx, yy, zz], -1).reshape(-1, 3) + normal.center
    h0, l0 = normal.sample(pts)
    h1, l1 = sick.sample(pts)
    changed = h0 != h1
    assert changed.sum() > 3
    assert np.isin(l0[changed], INTRACRANIAL).all()
    core = l1 == TISSUE["lesion"]
    assert core.any()
    delta = float(np.mean(h1[core] - h0[core]))
    if spec.startswith("hemorrhage"):
        assert 55 <= np.median(h1[core]) <= 95 and delta > 15
    else:
        assert 8 <= np.median(h1[core]) <= 22 and delta < -4


# --- hard cases -----------------------------------------------------------------------------------


def test_missing_slice_leaves_a_double_gap(tmp_path: Path) -> None:
    t = study(tmp_path, "s", 3, missing_fraction=1.0)
    dss = spatial(read_series(tmp_path / "s" / t.series_dirs[t.primary_series_uid]), t)
    assert t.dropped_index is not None and 0 < t.dropped_index < t.n_slices_planned - 1
    assert len(dss) == t.n_slices == t.n_slices_planned - 1
    n = np.cross(t.iop[:3], t.iop[3:])
    d = np.diff([float(n @ np.array(x.ImagePositionPatient, float)) for x in dss])
    gaps = np.flatnonzero(~np.isclose(d, t.slice_spacing, atol=1e-3))
    assert gaps.tolist() == [t.dropped_index - 1]
    assert d[gaps[0]] == pytest.approx(2 * t.slice_spacing, abs=1e-3)
    assert t.instance_numbers[t.dropped_index] is None


def test_reversed_numbering(tmp_path: Path) -> None:
    clean = study(tmp_path, "c", 4, vendors=("siemens",))
    rev = study(tmp_path, "r", 4, vendors=("siemens",), reverse_fraction=1.0)
    assert not clean.reversed and rev.reversed and rev.reversed_by_option
    for t, name in ((clean, "c"), (rev, "r")):
        dss = spatial(read_series(tmp_path / name / t.series_dirs[t.primary_series_uid]), t)
        inst = [int(d.InstanceNumber) for d in dss]
        assert inst == (sorted(inst, reverse=True) if t.reversed else sorted(inst))
    assert clean.ipp_first == rev.ipp_first


@pytest.mark.parametrize("mode", ["normal", "table"])
def test_tilted_geometry_is_exact(tmp_path: Path, mode: str) -> None:
    t = study(tmp_path, "t", 8, tilt_fraction=1.0, tilt_shear_fraction=1.0 if mode == "table" else 0.0,
              slab_samples=1, noise_scale=0.0)  # fmt: skip
    assert t.tilt_mode == mode and 10 <= t.tilt_deg <= 20
    rad = np.radians(t.tilt_deg)
    assert np.allclose(t.iop, [1, 0, 0, 0, np.cos(rad), -np.sin(rad)], atol=1e-6)
    dss = spatial(read_series(tmp_path / "t" / t.series_dirs[t.primary_series_uid]), t)
    assert all(float(d.GantryDetectorTilt) == pytest.approx(t.tilt_deg) for d in dss)
    step = np.diff([[float(x) for x in d.ImagePositionPatient] for d in dss], axis=0)
    normal = np.cross(t.iop[:3], t.iop[3:])
    assert np.allclose(step @ normal, t.slice_spacing, atol=1e-3)  # planes are slice_spacing apart
    if mode == "normal":
        assert np.allclose(step, np.outer(np.ones(len(step)), normal) * t.slice_spacing, atol=1e-3)
    else:  # the table moves along z only: a sheared stack
        assert np.allclose(step[:, :2], 0, atol=1e-3) and np.all(step[:, 2] > t.slice_spacing)
    ph = make_phantom(np.random.default_rng(t.phantom_seed), None)
    for d in dss[::7]:
        pts = centres(d)
        expected = np.clip(np.rint(ph.sample(pts)[0].reshape(d.Rows, d.Columns)), -1024, 3071)
        assert np.abs(hu(d) - expected).max() <= 1.0


def test_untilted_pixels_are_the_phantom_at_pixel_centres(tmp_path: Path) -> None:
    t = study(tmp_path, "u", 9, slab_samples=1, noise_scale=0.0, vendors=("canon",))
    assert t.tilt_deg == 0 and t.iop == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ph = make_phantom(np.random.default_rng(t.phantom_seed), None)
    dss = spatial(read_series(tmp_path / "u" / t.series_dirs[t.primary_series_uid]), t)
    d = dss[len(dss) // 2]
    pts = centres(d)
    assert np.abs(hu(d) - np.rint(ph.sample(pts)[0].reshape(d.Rows, d.Columns))).max() <= 1.0


@pytest.fixture(scope="module")
def uncompressed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StudyTruth]:
    root = tmp_path_factory.mktemp("plain")
    return root, study(root, "p", 12, vendors=("ge",))  # signed int16: the harder case for codecs


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_compressed_decodes_to_same_hu(
    tmp_path: Path, uncompressed: tuple[Path, StudyTruth], syntax: str
) -> None:
    if synth._available_syntaxes((syntax,)) != [syntax]:
        pytest.fail(f"no encoder for {syntax.name}: pyproject installs pylibjpeg-openjpeg and pyjpegls")
    root, plain = uncompressed
    comp = study(tmp_path, "c", 12, vendors=("ge",), compressed_fraction=1.0, compressed_syntaxes=(syntax,))
    assert plain.transfer_syntax == ExplicitVRLittleEndian and comp.transfer_syntax == syntax
    a = spatial(read_series(root / "p" / plain.series_dirs[plain.primary_series_uid]), plain)
    b = spatial(read_series(tmp_path / "c" / comp.series_dirs[comp.primary_series_uid]), comp)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert y.file_meta.TransferSyntaxUID == syntax
        assert x.SOPInstanceUID == y.SOPInstanceUID
        assert np.array_equal(hu(x), hu(y))


def test_mixed_orientation_images_are_appended(tmp_path: Path) -> None:
    t = study(tmp_path, "m", 13, mixed_orientation_fraction=1.0)
    dss = read_series(tmp_path / "m" / t.series_dirs[t.primary_series_uid])
    assert len(dss) == t.n_slices + 2 == t.series_files[t.primary_series_uid]
    odd = sorted(int(d.InstanceNumber) for d in dss
                 if not np.allclose([float(x) for x in d.ImageOrientationPatient], t.iop))  # fmt: skip
    assert odd == t.mixed_orientation_instances and len(odd) == 2


@pytest.mark.parametrize(
    ("vendor", "signed", "descending"),
    [("siemens", False, False), ("ge", True, False), ("canon", True, True), ("philips", False, False)],
)
def test_vendor_habits(tmp_path: Path, vendor: str, signed: bool, descending: bool) -> None:
    t = study(tmp_path, "v", 30, vendors=(vendor,))
    dss = spatial(read_series(tmp_path / "v" / t.series_dirs[t.primary_series_uid]), t)
    assert dss[0].PixelRepresentation == int(signed) and t.reversed == descending
    assert dss[0].BitsStored == (16 if signed else 12)
    assert ("SpacingBetweenSlices" in dss[0]) == synth._VENDORS[vendor].spacing_between_slices
    inst = [int(d.InstanceNumber) for d in dss]
    assert (inst[0] > inst[-1]) == descending
    assert dss[0].Manufacturer in synth._VENDORS[vendor].manufacturers


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_writes_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--out", str(tmp_path / "o"), "--normal", "1", "--abnormal", "1", "--seed", "3"]
    args += ["--no-distractors", "--missing-fraction", "1", "--matrix", "256", "--slab-samples", "1"]
    rc = main(args)
    assert rc == 0
    assert "2 studies" in capsys.readouterr().out
    truths = [json.loads(x) for x in (tmp_path / "o" / "truth.jsonl").read_text().splitlines()]
    assert len(truths) == 2 and all(t["dropped_index"] is not None for t in truths)
    assert all(set(t["series_roles"].values()) == {"primary"} for t in truths)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--normal", "1", "--abnormal", "0", "--tilt-fraction", "2"])
