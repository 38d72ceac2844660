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


def study(
    tmp_path: Path, name: str, seed: int, lesion: str | None = None, *, pattern: str | None = None,
    kind: str = "head", **opts: object,
) -> StudyTruth:  # fmt: skip
    options = SynthOptions(**{**PLAIN, **opts})  # type: ignore[arg-type]
    return write_study(tmp_path / name, np.random.default_rng(seed), lesion=lesion, options=options,
                       patient_index=seed, pattern=pattern, kind=kind)  # fmt: skip


# --- dataset level ---------------------------------------------------------------------------------


def test_labels_csv_and_truth_jsonl(dataset: tuple[Path, list[StudyTruth]]) -> None:
    out, rows = dataset
    with (out / "labels.csv").open() as fh:
        lines = list(csv.reader(fh))
    # The first three columns are what every reader uses; the rest are extra ground truth.
    assert lines[0] == ["study_uid", "label", "lesion", *(f"lesion_{a}" for a in "xyz"), "kind", "patterns"]
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


# --- real scanners' patterns (issue 11) and the lesion centroid (issue 12) ---------------------------

HEAD_WORDS = ("HEAD", "BRAIN", "SKULL", "CRANI", "NEURO", "KOPF", "SCHAEDEL", "CEREBRUM", "CRANIUM")


def primary_files(root: Path, t: StudyTruth) -> list[pydicom.Dataset]:
    return read_series(root / t.series_dirs[t.primary_series_uid])


def normal_distances(dss: list[pydicom.Dataset], t: StudyTruth) -> np.ndarray:
    n = np.cross(t.iop[:3], t.iop[3:])
    return np.array(sorted(float(n @ np.array(d.ImagePositionPatient, float)) for d in dss))


def brain_hf_energy(img: np.ndarray, brain: np.ndarray) -> float:
    """Mean squared 4-neighbour Laplacian inside the brain: what a sharp kernel raises (edges and noise)."""
    lap = 4 * img[1:-1, 1:-1] - img[:-2, 1:-1] - img[2:, 1:-1] - img[1:-1, :-2] - img[1:-1, 2:]
    return float(np.mean(lap[brain[1:-1, 1:-1]] ** 2))


@pytest.mark.parametrize("signed", [False, True])
def test_jpeg_lossless_sv1_encoder_round_trips(signed: bool) -> None:
    """Our process-14 SV1 encoder, decoded by pydicom's own decoder (pylibjpeg-libjpeg), is lossless."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import JPEGLosslessSV1, generate_uid

    from training.synth.ljpeg import compress_sv1

    rng = np.random.default_rng(3)
    for shape in [(64, 48), (1, 1), (5, 3)]:
        if signed:
            a = np.clip(rng.normal(0, 600, shape), -32768, 32767).astype(np.int16)
            a.flat[0], a.flat[-1] = -32768, 32767  # the extreme differences (category 16)
        else:
            a = rng.integers(0, 4096, shape).astype(np.uint16)
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.Rows, ds.Columns = shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = 16, 16 if signed else 12, int(signed)
        ds.HighBit = ds.BitsStored - 1
        ds.PixelData = a.tobytes()
        compress_sv1(ds)
        buf = __import__("io").BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        back = pydicom.dcmread(__import__("io").BytesIO(buf.getvalue()))
        assert back.file_meta.TransferSyntaxUID == JPEGLosslessSV1
        assert np.array_equal(back.pixel_array, a)


def test_thin_series_is_0625_jpeg_lossless_tilted_with_one_missing_slice(tmp_path: Path) -> None:
    from pydicom.uid import JPEGLosslessSV1

    t = study(tmp_path, "t", 41, "hemorrhage:intraparenchymal", pattern="thin", thin_matrix=96,
              slab_samples=3, noise_scale=0.0)  # fmt: skip
    assert t.patterns == ["thin"] and t.transfer_syntax == JPEGLosslessSV1
    assert 200 <= t.n_slices_planned <= 260 and t.n_slices == t.n_slices_planned - 1
    assert t.slice_thickness == t.slice_spacing == 0.625 and t.tilt_deg == 8.5 and t.tilt_mode == "table"
    dss = primary_files(tmp_path / "t", t)
    assert len(dss) == t.n_slices
    d0 = dss[0]
    assert d0.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    assert (d0.Rows, d0.Columns) == (96, 96) and float(d0.SliceThickness) == 0.625
    assert d0.ConvolutionKernel == "STANDARD" and list(d0.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert float(d0.GantryDetectorTilt) == 8.5
    assert np.allclose([float(x) for x in d0.ImageOrientationPatient], t.iop) and t.iop[5] < 0
    # 0.625 mm steps along the plane normal, one of 1.25 mm where the slice is missing.
    steps = np.diff(normal_distances(dss, t))
    odd = np.flatnonzero(~np.isclose(steps, 0.625, atol=2e-3))
    assert odd.tolist() == [t.dropped_index - 1] and steps[odd[0]] == pytest.approx(1.25, abs=2e-3)
    # Slice profile: each pixel is the phantom averaged over three samples across its 0.625 mm slab.
    ph = make_phantom(np.random.default_rng(t.phantom_seed), t.lesion_spec)
    normal = np.cross(t.iop[:3], t.iop[3:])
    d = spatial(dss, t)[len(dss) // 2]
    pts = centres(d)
    slab = np.mean([ph.sample(pts + o * normal)[0] for o in (-0.625 / 3, 0.0, 0.625 / 3)], axis=0)
    assert np.abs(hu(d) - np.clip(np.rint(slab.reshape(d.Rows, d.Columns)), -1024, 3071)).max() <= 1.0


def test_two_stacks_in_one_series(tmp_path: Path) -> None:
    t = study(tmp_path, "s", 42, pattern="two_stack", vendors=("ge",))
    dss = spatial(primary_files(tmp_path / "s", t), t)
    assert len(dss) == 28 and len({d.SeriesInstanceUID for d in dss}) == 1
    assert t.tilt_deg == 18.5 and float(dss[0].GantryDetectorTilt) == 18.5
    pos = np.array([[float(x) for x in d.ImagePositionPatient] for d in dss])
    step = np.diff(pos, axis=0)
    assert np.allclose(step[:, :2], 0, atol=1e-3)  # the table moves along z: a sheared stack
    c = np.cos(np.radians(18.5))
    assert np.allclose(step[:13, 2], 4.0 / c, atol=2e-3) and np.allclose(step[14:, 2], 7.0 / c, atol=2e-3)
    assert step[13, 2] == pytest.approx(1.08 / c, abs=2e-3)  # the short step between the stacks
    thk = [float(d.SliceThickness) for d in dss]
    assert thk == [4.0] * 14 + [7.0] * 14 == t.slice_thicknesses
    assert np.allclose(pos, t.positions, atol=1e-4)


def test_no_head_words_anywhere(tmp_path: Path) -> None:
    from triage.config import AssemblySettings

    words = {w.upper() for w in (*AssemblySettings().head_patterns, *HEAD_WORDS)}
    for seed in range(2):  # two draws of the descriptions, every series (distractors included)
        t = study(tmp_path, f"n{seed}", 50 + seed, pattern="no_head_words", distractors=True, matrix=256)
        assert t.patterns == ["no_head_words"]
        for f in (tmp_path / f"n{seed}").rglob("*.dcm"):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            assert "BodyPartExamined" not in ds
            keys = ("StudyDescription", "SeriesDescription", "ProtocolName")
            text = " ".join(str(ds.get(k, "")) for k in keys)
            assert not [w for w in words if w in text.upper()], (f, text)
    plain = study(tmp_path, "p", 50, distractors=False, vendors=("siemens",))
    d = pydicom.dcmread(next((tmp_path / "p").rglob("*.dcm")), stop_before_pixels=True)
    assert d.BodyPartExamined == "HEAD" and plain.patterns == []


def _dciodvfy_errors(path: Path) -> list[str]:
    import shutil
    import subprocess

    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy (dicom3tools) is not installed: scripts/bootstrap.sh installs it")
    out = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, check=False)
    return [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("Error")]


def test_enhanced_ct_is_one_instance_with_per_frame_geometry(tmp_path: Path) -> None:
    from training.synth.basics import ENHANCED_CT_IMAGE_STORAGE

    plain = study(tmp_path, "p", 43, "infarct", vendors=("siemens",))
    enh = study(tmp_path, "e", 43, "infarct", vendors=("siemens",), pattern="enhanced")
    assert enh.patterns == ["enhanced"] and enh.sop_class_uid == ENHANCED_CT_IMAGE_STORAGE
    (f,) = (tmp_path / "e").rglob("*.dcm")
    ds = pydicom.dcmread(f)
    assert ds.SOPClassUID == ENHANCED_CT_IMAGE_STORAGE and int(ds.NumberOfFrames) == plain.n_slices
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = [float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    assert iop == plain.iop
    assert float(shared.PixelMeasuresSequence[0].SliceThickness) == plain.slice_thickness
    assert shared.CTReconstructionSequence[0].ConvolutionKernel == plain.kernel
    frames = ds.pixel_array.astype(np.float64) - 1024.0
    per = ds.PerFrameFunctionalGroupsSequence
    assert len(per) == frames.shape[0]
    files = primary_files(tmp_path / "p", plain)
    by_pos = {tuple(round(float(x), 3) for x in d.ImagePositionPatient): hu(d) for d in files}
    idx = []
    for fr, img in zip(per, frames, strict=True):
        pos = tuple(round(float(x), 3) for x in fr.PlanePositionSequence[0].ImagePositionPatient)
        assert np.array_equal(img, by_pos[pos])  # same pixels as the per-file series at that position
        fc = fr.FrameContentSequence[0]
        assert list(fc.DimensionIndexValues) == [1, int(fc.InStackPositionNumber)]
        idx.append(int(fc.InStackPositionNumber))
    assert sorted(idx) == list(range(1, len(per) + 1))
    assert _dciodvfy_errors(f) == []


@pytest.mark.parametrize("distractors", [False, True])
def test_bone_twin_is_sharper_same_positions_and_unlisted_kernels(tmp_path: Path, distractors: bool) -> None:
    from triage.config import AssemblySettings

    a = AssemblySettings()
    listed = [p.upper() for p in (*a.soft_kernel_patterns, *a.sharp_kernel_patterns)]
    t = study(tmp_path, "b", 44, pattern="bone_twin", distractors=distractors, matrix=256)
    assert t.patterns == ["bone_twin"] and t.series_roles[t.twin_series_uid] == "bone"
    soft = spatial(primary_files(tmp_path / "b", t), t)
    twin = spatial(read_series(tmp_path / "b" / t.series_dirs[t.twin_series_uid]), t)
    assert [d.ImagePositionPatient for d in twin] == [d.ImagePositionPatient for d in soft]
    assert twin[0].SeriesDescription in ("Bone", "Knochen", "Hueso", "BONE RECON")
    assert twin[0].FrameOfReferenceUID == soft[0].FrameOfReferenceUID
    for kernel in (soft[0].ConvolutionKernel, twin[0].ConvolutionKernel):
        assert not [p for p in listed if p in str(kernel).upper()], kernel
    ph = make_phantom(np.random.default_rng(t.phantom_seed), None)
    mid = len(soft) // 2
    lab = ph.sample(centres(soft[mid]))[1].reshape(soft[mid].Rows, soft[mid].Columns)
    brain = np.isin(lab, [TISSUE["gm"], TISSUE["wm"]])
    assert brain.sum() > 2000
    assert brain_hf_energy(hu(twin[mid]), brain) > 4 * brain_hf_energy(hu(soft[mid]), brain)


def test_phantom_is_mostly_air_without_skull(tmp_path: Path) -> None:
    t = study(tmp_path, "q", 45, "hemorrhage", kind="phantom", distractors=True)
    assert t.kind == "phantom" and t.patterns == ["phantom"] and t.label == "normal" and t.lesion == ""
    assert t.lesion_centroid is None and t.phantom_meta["kind"] == "water_cylinder"
    assert 0.9 <= t.phantom_meta["canonical_air_fraction"] <= 0.94
    vol = np.stack([hu(d) for d in spatial(primary_files(tmp_path / "q", t), t)])
    assert (vol < -500).mean() > 0.85  # mostly air
    assert vol.max() < 400  # no skull ring
    water = np.abs(vol) < 30
    assert water.sum() > 10000  # but a lot of water
    via_fraction = study(tmp_path, "r", 45, "hemorrhage", phantom_fraction=1.0)
    assert via_fraction.kind == "phantom" and via_fraction.study_uid == t.study_uid


def test_stray_instance_is_its_own_study(tmp_path: Path) -> None:
    rows = write_dataset(tmp_path, normal=2, abnormal=0, seed=5, options=SynthOptions(**PLAIN),  # type: ignore[arg-type]
                         stray_instances=1)  # fmt: skip
    studies, strays = rows[:2], rows[2:]
    assert [t.kind for t in studies] == ["head", "head"] and len(strays) == 1
    (s,) = strays
    host = s.study_dir.split("/")[0]
    assert host in {t.study_dir for t in studies}
    (f,) = (tmp_path / s.study_dir).rglob("*.dcm")
    ds = pydicom.dcmread(f)
    (h,) = [t for t in studies if t.study_dir == host]
    assert ds.StudyInstanceUID == s.study_uid != h.study_uid
    assert ds.PatientID == s.patient_id != h.patient_id and ds.SOPClassUID == CT_IMAGE_STORAGE
    assert s.n_slices == 1 and sum(s.series_files.values()) == 1
    with (tmp_path / "labels.csv").open() as fh:
        lab = {r["study_uid"]: r for r in csv.DictReader(fh)}
    assert lab[s.study_uid]["kind"] == "stray" and lab[s.study_uid]["label"] == "normal"
    # Every host file still belongs to the host study.
    others = [p for p in (tmp_path / host).rglob("*.dcm") if p != f]
    assert {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in others} == {h.study_uid}


def test_patterns_leave_everything_else_unchanged(tmp_path: Path) -> None:
    """Forcing a pattern that does not touch the pixels leaves pixels and UIDs as they were."""
    a = study(tmp_path, "a", 46, "hemorrhage")
    b = study(tmp_path, "b", 46, "hemorrhage", pattern="no_head_words", thin_fraction=0.0)
    assert a.study_uid == b.study_uid and a.primary_series_uid == b.primary_series_uid
    pa, pb = (spatial(primary_files(tmp_path / n, t), t) for n, t in (("a", a), ("b", b)))
    assert all(np.array_equal(x.pixel_array, y.pixel_array) for x, y in zip(pa, pb, strict=True))
    assert a.lesion_centroid == b.lesion_centroid
    with pytest.raises(ValueError, match="unknown patterns"):
        study(tmp_path, "c", 46, pattern="thick")


@pytest.mark.parametrize("spec", ["hemorrhage:intraparenchymal", "infarct:lacunar", "hemorrhage:subdural"])
def test_lesion_centroid_is_where_the_lesion_is(tmp_path: Path, spec: str) -> None:
    """The centroid is the mean position of the pixels the lesion changes (read back from the headers)."""
    t0 = study(tmp_path, "n", 47, None, noise_scale=0.0)
    t1 = study(tmp_path, "a", 47, spec, noise_scale=0.0)
    assert t0.lesion_centroid is None and t1.lesion_centroid is not None
    d0 = spatial(primary_files(tmp_path / "n", t0), t0)
    d1 = spatial(primary_files(tmp_path / "a", t1), t1)
    pts = np.concatenate([centres(a)[hu(a) != hu(b)] for a, b in zip(d0, d1, strict=True)])
    assert len(pts) > 20
    c = np.asarray(t1.lesion_centroid)
    # The truth counts every pixel any slab sample touches, the difference only changed ones: close.
    assert np.linalg.norm(pts.mean(axis=0) - c) < 3.0
    assert np.all(c >= pts.min(axis=0) - 1) and np.all(c <= pts.max(axis=0) + 1)
    ph = make_phantom(np.random.default_rng(t1.phantom_seed), t1.lesion_spec)
    if spec.endswith(("intraparenchymal", "lacunar")):  # convex lesions: the centroid lies inside
        assert int(ph.sample(c[None])[1][0]) in (TISSUE["lesion"], TISSUE["edema"])


def test_cli_pattern_flags(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path / "o"), "--normal", "2", "--abnormal", "0", "--seed", "4"]
    args += ["--no-distractors", "--slab-samples", "1", "--two-stack-fraction", "1"]
    args += ["--enhanced-fraction", "1", "--stray-instances", "1"]
    assert main(args) == 0
    truths = [json.loads(x) for x in (tmp_path / "o" / "truth.jsonl").read_text().splitlines()]
    assert [t["patterns"] for t in truths[:2]] == [["two_stack", "enhanced"]] * 2
    assert truths[2]["kind"] == "stray"
    with (tmp_path / "o" / "labels.csv").open() as fh:
        assert [r["patterns"] for r in csv.DictReader(fh)] == ["two_stack;enhanced"] * 2 + [""]


def test_uid_salt_changes_only_the_uids(tmp_path: Path) -> None:
    a = study(tmp_path, "a", 48, "infarct", pattern="bone_twin")
    b = study(tmp_path, "b", 48, "infarct", pattern="bone_twin", uid_salt="again")
    assert a.study_uid != b.study_uid and a.primary_series_uid != b.primary_series_uid
    assert a.patient_id == b.patient_id and a.positions == b.positions and a.kernel == b.kernel
    fa, fb = sorted((tmp_path / "a").rglob("*.dcm")), sorted((tmp_path / "b").rglob("*.dcm"))
    assert [p.relative_to(tmp_path / "a") for p in fa] == [p.relative_to(tmp_path / "b") for p in fb]
    for x, y in zip(fa, fb, strict=True):
        dx, dy = pydicom.dcmread(x), pydicom.dcmread(y)
        assert dx.PixelData == dy.PixelData and dx.SOPInstanceUID != dy.SOPInstanceUID
        assert dx.FrameOfReferenceUID != dy.FrameOfReferenceUID


def test_rescans_of_one_head_change_only_what_they_name(tmp_path: Path) -> None:
    """The equivalence bench's rescans (bench/equivalence_synth.py): the same draws with a forced
    thickness, a new noise seed, a moved table or a longer range scan the same head otherwise alike."""
    opts = SynthOptions(**PLAIN)  # type: ignore[arg-type]

    def scan(name: str, options: SynthOptions = opts, **kw: object
             ) -> tuple[StudyTruth, list[pydicom.Dataset]]:
        t = write_study(tmp_path / name, np.random.default_rng(47), lesion=None, options=options,
                        patient_index=1, **kw)  # type: ignore[arg-type]  # fmt: skip
        return t, spatial(primary_files(tmp_path / name, t), t)

    a, da = scan("a", thickness_mm=5.0)
    assert a.slice_thicknesses == [5.0] * len(da)
    pos = np.asarray(a.positions)
    # a new noise realisation: same planes and UIDs, other pixels, the same head on average
    b, db = scan("b", thickness_mm=5.0, noise_seed=7)
    assert b.study_uid == a.study_uid and np.allclose(b.positions, pos)
    diff = np.concatenate([hu(x).ravel() - hu(y).ravel() for x, y in zip(da, db, strict=True)])
    assert np.abs(diff).mean() > 0.5 and abs(diff.mean()) < 0.2
    # the table moved: every plane 2 mm higher, nothing else
    c, _ = scan("c", thickness_mm=5.0, table_shift_mm=2.0)
    assert np.allclose(np.asarray(c.positions) - pos, [0.0, 0.0, 2.0], atol=1e-3)
    # a longer range: two more planes at each end at the stack's own step, the planned ones unchanged
    # (noise-free: the noise is drawn for the whole stack)
    quiet = SynthOptions(**{**PLAIN, "noise_scale": 0.0})  # type: ignore[arg-type]
    _, dq = scan("q", quiet, thickness_mm=5.0)
    d, dd = scan("d", quiet, thickness_mm=5.0, extend_mm=10.0)
    assert len(dd) == len(da) + 4 and np.allclose(np.asarray(d.positions)[2:-2], pos)
    assert np.allclose(np.diff(np.asarray(d.positions)[:, 2]), 5.0, atol=1e-3)
    assert all(np.array_equal(hu(x), hu(y)) for x, y in zip(dq, dd[2:-2], strict=True))
    # the two-stack series extends each end at its own stack's step: 4 mm below, 7 mm above
    e, _ = scan("e", pattern="two_stack", extend_mm=8.0)
    step = np.diff(np.asarray(e.positions)[:, 2]) * np.cos(np.radians(18.5))
    assert np.allclose(step[:2], 4.0, atol=2e-3) and np.allclose(step[-2:], 7.0, atol=2e-3)
    assert e.slice_thicknesses[:2] == [4.0, 4.0] and e.slice_thicknesses[-2:] == [7.0, 7.0]
