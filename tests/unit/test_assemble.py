"""triage.assemble.volume against series whose ground truth is known: a head phantom written as real DICOM.

The phantom is analytic (an ellipsoidal skull around brain, a marker sphere, a table plate), so every
geometric claim can be checked against where the phantom really is in patient coordinates, for any
slice order, tilt, transfer syntax or rescale the files use.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from triage.assemble.volume import (
    PREPROCESSING_VERSION,
    TARGET_SHAPE,
    AssembledVolume,
    VolumeError,
    assemble_study,
    build_volume,
    describe_series,
    group_studies,
    load_volume,
    read_header,
    read_headers,
    read_slice_hu,
    save_volume,
    select_series,
    window_7bit,
)
from triage.config import AssemblySettings

CT = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
STUDY = "1.2.826.0.1.3680043.8.498.1"

HEAD_C = np.array([12.0, -18.0, 40.0])  # off the table centre on purpose
HEAD_AXES = np.array([72.0, 92.0, 70.0])
MARKER = np.array([30.0, -45.0, 70.0])
MARKER_R = 8.0
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
TISSUE = -500.0  # HU above which a voxel counts as head tissue


def _sigmoid(x: np.ndarray, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x / width, -50, 50)))


def phantom_hu(x: np.ndarray, *, marker: bool = True, table: bool = True) -> np.ndarray:
    """HU at patient points x (..., 3): skull 1000, brain 35, marker 95, table 300, air -1000."""
    rho = np.sqrt((((x - HEAD_C) / HEAD_AXES) ** 2).sum(axis=-1))
    hu = -1000.0 + 2000.0 * _sigmoid(1.0 - rho, 0.015) - 965.0 * _sigmoid(0.92 - rho, 0.015)
    if marker:
        d = np.linalg.norm(x - MARKER, axis=-1)
        hu += 60.0 * _sigmoid(MARKER_R - d, 1.0)
    if table:  # a 5 mm plate 15 mm behind the head, the whole length of the scan
        y0 = HEAD_C[1] + HEAD_AXES[1] + 15.0
        plate = (x[..., 1] > y0) & (x[..., 1] < y0 + 5.0) & (np.abs(x[..., 0]) < 120.0)
        hu = np.where(plate, 300.0, hu)
    return hu


def _dataset(
    *,
    series_uid: str,
    number: int,
    iop: tuple[float, ...] | None,
    ipp: np.ndarray | None,
    rows: int,
    cols: int,
    ps: float | None,
    sop_class: str = CT,
    modality: str = "CT",
    image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
    kernel: str = "STANDARD",
    thickness: float | None = 4.5,
    body_part: str | None = "HEAD",
    series_description: str = "Head 4.5mm",
    study_description: str = "CT HEAD",
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = STUDY + ".9"
    ds.Modality = modality
    ds.ImageType = image_type.split("\\")
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    if kernel:
        ds.ConvolutionKernel = kernel
    if thickness is not None:
        ds.SliceThickness = f"{thickness:g}"
    ds.InstanceNumber = number
    if iop is not None:
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    if ipp is not None:
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
    if ps is not None:
        ds.PixelSpacing = [f"{ps:g}", f"{ps:g}"]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    return ds


def _pixels(ds: Dataset, hu: np.ndarray, *, signed: bool, slope: float, padding: np.ndarray | None) -> None:
    # padding values that would read as bone if they were not recognised as padding
    if signed:
        intercept, dtype, pad = 0.0, np.int16, 3000
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 1, 16, 15
    else:
        intercept, dtype, pad = -1024.0, np.uint16, 4095
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 12, 11
    stored = np.rint((hu - intercept) / slope)
    stored = np.clip(stored, 0 if not signed else -32768, 4095 if not signed else 32767).astype(dtype)
    if padding is not None:
        stored[padding] = pad
        ds.PixelPaddingValue = pad
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = f"{slope:g}"
    ds.PixelData = stored.tobytes()


def _save(ds: Dataset, path: Path, syntax: str = ExplicitVRLittleEndian) -> Path:
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    folder: Path,
    *,
    n: int = 36,
    step: float = 4.5,
    rows: int = 96,
    ps: float = 2.5,
    tilt_deg: float = 0.0,
    z_start: float = -42.0,
    descending: bool = False,
    marker: bool = True,
    drop: tuple[int, ...] = (),
    syntax: str = ExplicitVRLittleEndian,
    signed: bool | None = True,  # None: alternate signed and unsigned storage slice by slice
    slope: float = 1.0,
    pad_corners: bool = False,
    series_uid: str | None = None,
    extra: Sequence[tuple[tuple[float, ...], np.ndarray]] = (),
    positions: list[float] | None = None,
    claim_axial: bool = False,  # write a tilted acquisition's pixels with an untilted orientation
    **tags: object,
) -> list[Path]:
    """The phantom as one series: slice i centred on (0, 0, z_start + i*step) (step along the table, z),
    rows x rows pixels of ps mm, gantry tilted about the patient x axis by tilt_deg."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    t = np.radians(tilt_deg)
    row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(t), -np.sin(t)])
    iop = (*row_dir, *col_dir)
    jj, kk = np.mgrid[0:rows, 0:rows].astype(float)
    half = (rows - 1) / 2 * ps
    zs = positions if positions is not None else [z_start + i * step for i in range(n)]
    order = list(range(len(zs)))[::-1] if descending else list(range(len(zs)))
    planes = [(iop, np.array([0.0, 0.0, zs[i]]), i) for i in order if i not in drop]
    planes += [(o, c, -1) for o, c in extra]
    paths = []
    for number, (orient, centre, _) in enumerate(planes, start=1):
        r, c = np.asarray(orient[:3]), np.asarray(orient[3:])
        ipp = centre - half * r - half * c
        pts = ipp + kk[..., None] * ps * r + jj[..., None] * ps * c
        hu = phantom_hu(pts, marker=marker)
        written = AXIAL if claim_axial else orient
        ds = _dataset(
            series_uid=series_uid, number=number, iop=written, ipp=ipp, rows=rows, cols=rows, ps=ps, **tags
        )
        padding = None
        if pad_corners:
            padding = (jj - (rows - 1) / 2) ** 2 + (kk - (rows - 1) / 2) ** 2 > (rows / 2) ** 2
        sgn = (number % 2 == 0) if signed is None else signed
        _pixels(ds, hu, signed=sgn, slope=slope, padding=padding)
        paths.append(_save(ds, folder / f"{generate_uid()[-12:]}.dcm", syntax))
    return paths


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], AssembledVolume]:
    paths = write_series(tmp_path_factory.mktemp("ref"))
    return paths, build_volume(paths, AssemblySettings())


def _head_mad(a: AssembledVolume, b: AssembledVolume) -> float:
    """Mean absolute difference (7-bit units) inside the head of a (the table plate left out)."""
    inside = a.data > 20
    table_row = int(a.patient_to_index((0.0, HEAD_C[1] + HEAD_AXES[1] + 10.0, 0.0))[1])
    inside[:, table_row:] = False
    return float(np.abs(a.data[inside].astype(float) - b.data[inside].astype(float)).mean())


# ---------------------------------------------------------------------------------------------------
# window


def test_window_7bit_maps_the_paper_window_and_clips() -> None:
    hu = np.array([-1024.0, -15.0, -14.0, -13.6, 0.0, 50.4, 112.0, 113.0, 114.0, 3000.0])
    out = window_7bit(hu)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 0, 0, 14, 64, 126, 127, 127, 127]


# ---------------------------------------------------------------------------------------------------
# geometry against ground truth


def test_volume_shape_type_and_metadata(reference: tuple[list[Path], AssembledVolume]) -> None:
    paths, vol = reference
    assert vol.data.shape == TARGET_SHAPE == (32, 128, 128)
    assert vol.data.dtype == np.uint8
    assert vol.source_geometry["n_slices"] == 36
    assert vol.source_geometry["slice_spacing_mm"] == pytest.approx(4.5)
    assert vol.grid["spacing"] == pytest.approx([220 / 128, 220 / 128, 4.5])
    assert vol.coverage_mm == pytest.approx(144.0)  # the scan (157.5 mm) covers the whole grid
    assert 0.3 < vol.zero_fraction < 0.9
    assert vol.warnings == []
    assert len(vol.sop_instance_uids) == len(paths)
    brain = vol.data[10:20, 54:74, 54:74]  # inside the brain, away from skull and marker
    assert np.median(brain) == 35 + 14


def test_head_centroid_is_centred_and_vertex_anchors_the_grid(
    reference: tuple[list[Path], AssembledVolume],
) -> None:
    _, vol = reference
    # the table plate (300 HU, whole scan length) must not pull the centroid or the vertex
    assert vol.grid["head_centroid_mm"] == pytest.approx(HEAD_C[:2], abs=1.0)
    # a bare skull (no scalp): the dome fit puts the vertex 2-3 mm above the bone (on the synthetic head
    # with a scalp, test_synth_geometry_matches_the_phantom, within half a millimetre of the skin)
    assert vol.grid["vertex_z_mm"] == pytest.approx(HEAD_C[2] + HEAD_AXES[2], abs=3.0)
    z, y, x = vol.patient_to_index(HEAD_C)
    assert (y, x) == pytest.approx((63.5, 63.5), abs=0.6)
    # slice 0 is the most superior: its centre is the vertex + margin - half a slice
    top = vol.index_to_patient((0, 63.5, 63.5))
    assert top[2] == pytest.approx(vol.grid["vertex_z_mm"] + 2.0 - 2.25)
    assert vol.index_to_patient((1, 0, 0))[2] == pytest.approx(top[2] - 4.5)
    # tissue is centred in the image and the skull cap is in the first slices, not cut
    table_row = vol.patient_to_index((0.0, HEAD_C[1] + HEAD_AXES[1] + 15.0, 0.0))[1]
    _, yy, xx = np.nonzero(vol.data[:, : int(table_row)] > 20)
    assert yy.mean() == pytest.approx(63.5, abs=1.0)
    assert xx.mean() == pytest.approx(63.5, abs=1.0)
    assert vol.data[0].max() > 20 or vol.data[1].max() > 60
    assert (vol.data[: int(z)] > 20).any()


def test_vertex_does_not_depend_on_the_slice_phase(
    tmp_path: Path, reference: tuple[list[Path], AssembledVolume]
) -> None:
    """The same head with slices shifted by a third of a slice: the grid stays put (a thresholded
    top-most voxel would move by up to a slice)."""
    _, vol = reference
    shifted = build_volume(write_series(tmp_path, z_start=-42.0 + 1.5))
    assert shifted.grid["vertex_z_mm"] == pytest.approx(vol.grid["vertex_z_mm"], abs=0.4)
    assert _head_mad(vol, shifted) < 2.5


def test_a_head_cut_by_the_top_of_the_scan_is_reported(tmp_path: Path) -> None:
    # top slice 1 mm above the vertex (z = 110): complete, no warning
    grazing = build_volume(write_series(tmp_path / "graze", n=34, z_start=111.0 - 33 * 4.5))
    assert not any("cut" in w for w in grazing.warnings)
    cut = build_volume(write_series(tmp_path / "cut", n=34, z_start=80.0 - 33 * 4.5))
    assert any(w.startswith("the head is cut by the top of the scan (z=80.0 mm)") for w in cut.warnings)


def test_marker_lands_at_its_patient_coordinate(
    tmp_path: Path, reference: tuple[list[Path], AssembledVolume]
) -> None:
    _, with_marker = reference
    without = build_volume(write_series(tmp_path, marker=False))
    assert without.grid == with_marker.grid  # the marker does not move the grid
    diff = with_marker.data.astype(float) - without.data.astype(float)
    diff[diff < 0] = 0
    idx = np.indices(diff.shape).reshape(3, -1)
    found = (idx * diff.ravel()).sum(axis=1) / diff.sum()
    expected = with_marker.patient_to_index(MARKER)
    assert found[1:] == pytest.approx(expected[1:], abs=0.5)  # in plane: half a 1.72 mm pixel
    assert found[0] == pytest.approx(expected[0], abs=0.35)  # z: a third of a 4.5 mm slice
    assert np.allclose(with_marker.index_to_patient(expected), MARKER)


def test_shuffled_file_order_gives_the_identical_volume(
    reference: tuple[list[Path], AssembledVolume],
) -> None:
    paths, vol = reference
    shuffled = list(paths)
    random.Random(7).shuffle(shuffled)
    again = build_volume(shuffled)
    assert np.array_equal(again.data, vol.data)
    assert again.grid == vol.grid
    assert again.sop_instance_uids == vol.sop_instance_uids


def test_reversed_slice_order_gives_the_identical_volume(
    tmp_path: Path, reference: tuple[list[Path], AssembledVolume]
) -> None:
    _, vol = reference
    paths = write_series(tmp_path, descending=True)  # instance 1 is the most superior slice
    assert read_header(paths[0]).instance_number == 1
    first, last = read_header(paths[0]).position, read_header(paths[-1]).position
    assert first is not None and last is not None and first[2] > last[2]
    rev = build_volume(paths)
    assert np.array_equal(rev.data, vol.data)
    assert rev.grid == vol.grid


def test_gantry_tilt_matches_the_untilted_acquisition(
    tmp_path: Path, reference: tuple[list[Path], AssembledVolume]
) -> None:
    _, vol = reference
    # a 20 deg tilted slab must reach 27 mm higher behind the head and 40 mm lower in front
    paths = write_series(tmp_path, tilt_deg=20.0, n=50, z_start=-76.0)
    tilted = build_volume(paths)
    assert tilted.source_geometry["normal_tilt_deg"] == pytest.approx(20.0, abs=0.01)
    assert tilted.source_geometry["shear_deg"] == pytest.approx(20.0, abs=0.01)
    assert any("gantry tilt 20.0" in w for w in tilted.warnings)
    assert tilted.grid["head_centroid_mm"] == pytest.approx(vol.grid["head_centroid_mm"], abs=1.0)
    mad = _head_mad(vol, tilted)
    assert mad < 2.5, mad
    assert tilted.coverage_mm == pytest.approx(144.0)
    # the same pixels read as if untilted (what ignoring the shear does) are far off: the test can fail
    naive = build_volume(
        write_series(tmp_path / "naive", tilt_deg=20.0, n=50, z_start=-76.0, claim_axial=True)
    )
    assert _head_mad(vol, naive) > 3 * mad


def test_missing_slice_is_rejected_with_its_position(tmp_path: Path) -> None:
    paths = write_series(tmp_path, drop=(17,))
    with pytest.raises(VolumeError) as err:
        build_volume(paths, AssemblySettings(interpolate_gaps=False))
    msg = str(err.value)
    assert err.value.category == "missing_slices"
    assert "missing slice between z=30.00 and z=39.00 mm" in msg
    assert read_header(paths[0]).series_uid in msg


def test_missing_slice_is_interpolated_when_configured(
    tmp_path: Path, reference: tuple[list[Path], AssembledVolume]
) -> None:
    _, vol = reference
    paths = write_series(tmp_path, drop=(17,))
    filled = build_volume(paths, AssemblySettings(interpolate_gaps=True, max_gap_slices=1))
    assert filled.warnings == [
        "interpolated across a 9.00 mm gap between z=30.00 and z=39.00 mm (slice spacing 4.50 mm)"
    ]
    assert filled.source_geometry["n_slices"] == 35  # the slices there are; the z profile bridges the gap
    assert filled.grid["origin"] == pytest.approx(vol.grid["origin"], abs=0.1)
    assert _head_mad(vol, filled) < 1.0
    # two adjacent missing slices exceed max_gap_slices = 1
    two = write_series(tmp_path / "two", drop=(17, 18))
    with pytest.raises(
        VolumeError, match=r"2 missing slices between z=30.00 and z=43.50 mm.*max_slice_gap_mm 9.9"
    ):
        build_volume(two, AssemblySettings(interpolate_gaps=True, max_gap_slices=1))
    filled2 = build_volume(two, AssemblySettings(interpolate_gaps=True, max_gap_slices=2))
    assert "interpolated across a 13.50 mm gap between z=30.00 and z=43.50 mm" in filled2.warnings[0]


def test_duplicate_positions_are_rejected_and_irregular_ones_resampled(tmp_path: Path) -> None:
    zs = [-50.0 + 4.5 * i for i in range(30)]
    dup = write_series(tmp_path / "dup", positions=[*zs, zs[10]])
    with pytest.raises(VolumeError, match=r"two slices at one position z=-5.00 mm") as err:
        build_volume(dup)
    assert err.value.category == "duplicate"
    irregular = list(zs)
    irregular[12] += 1.7  # 6.2 mm then 2.8 mm
    vol = build_volume(write_series(tmp_path / "irr", positions=irregular))
    assert any("variable slice spacing (2.80-6.20 mm" in w for w in vol.warnings), vol.warnings
    far = list(zs)
    far[12:] = [z + 4.0 for z in far[12:]]  # one 8.5 mm step: a hole beyond max_slice_gap_mm 8
    with pytest.raises(VolumeError, match=r"gap between z=-0.50 and z=8.00 mm .*max_slice_gap_mm 8") as err:
        build_volume(write_series(tmp_path / "far", positions=far))
    assert err.value.category == "missing_slices"


def test_two_orientations_use_the_majority_group_with_a_warning(
    tmp_path: Path, reference: tuple[list[Path], AssembledVolume]
) -> None:
    _, vol = reference
    extra = [(CORONAL, np.array([0.0, y, 20.0])) for y in (-20.0, 0.0, 20.0)]
    paths = write_series(tmp_path, extra=extra)
    info = describe_series([read_header(p) for p in paths])
    assert len(info.orientations) == 2 and info.orientation == "axial"
    sel = select_series({info.series_uid: [read_header(p) for p in paths]})
    assert sel.chosen == info.series_uid
    assert len(sel.instances) == 36
    expected = (
        f"series {info.series_uid} has 2 orientations: used the 36 axial instances, ignored 3 (3 coronal)"
    )
    assert sel.warnings == [expected]
    built = build_volume(paths)
    assert built.warnings == [expected]
    assert np.array_equal(built.data, vol.data)


def test_two_orientations_of_equal_size_are_rejected(tmp_path: Path) -> None:
    axial = write_series(tmp_path, n=2, positions=[0.0, 4.5])
    uid = read_header(axial[0]).series_uid
    coronal = write_series(tmp_path, series_uid=uid, positions=[], extra=[(CORONAL, np.zeros(3))] * 2)
    headers = [read_header(p) for p in axial + coronal]
    sel = select_series({uid: headers})
    assert sel.chosen is None
    assert "2 orientations of equal size (2 axial, 2 coronal)" in sel.skipped[uid]
    with pytest.raises(VolumeError, match="orientations of equal size"):
        build_volume(axial + coronal)


def test_coronal_series_and_short_coverage_are_rejected(tmp_path: Path) -> None:
    coronal = [(CORONAL, np.array([0.0, y, 40.0])) for y in np.arange(-60.0, 60.0, 4.5)]
    paths = write_series(tmp_path / "cor", positions=[], extra=coronal)
    with pytest.raises(VolumeError, match=r"not axial: orientation coronal, slice normal 90.0 deg") as err:
        build_volume(paths)
    assert err.value.category == "tilt"
    short = write_series(tmp_path / "short", n=15, z_start=60.0)  # 63 mm, the top 54 mm of the head
    with pytest.raises(VolumeError, match=r"covers 5\d\.\d mm of the 144 mm below the vertex") as err:
        build_volume(short)
    assert err.value.category == "coverage"
    sel = select_series({"s": [read_header(p) for p in short]})
    assert "coverage 63.0 mm along the slice normal is below min_coverage_mm 90" in sel.skipped["s"]


# ---------------------------------------------------------------------------------------------------
# pixels: rescale, padding, compression, agreement with SimpleITK/GDCM


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_series_decode_to_the_same_volume(
    tmp_path: Path, syntax: str, reference: tuple[list[Path], AssembledVolume]
) -> None:
    _, vol = reference
    paths = write_series(tmp_path, syntax=syntax)
    assert read_header(paths[0]).transfer_syntax_uid == syntax
    built = build_volume(paths)
    assert np.array_equal(built.data, vol.data)
    # the same HU as SimpleITK/GDCM reads from the same compressed file
    _, hu = read_slice_hu(paths[5])
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(paths[5]))).astype(np.float32)[0]
    assert np.array_equal(hu, np.maximum(itk, -1024))


def test_per_slice_rescale_signed_unsigned_and_padding(
    tmp_path: Path, reference: tuple[list[Path], AssembledVolume]
) -> None:
    _, vol = reference
    # alternate int16/intercept 0 and uint16 (12 bits)/intercept -1024 slice by slice
    mixed = write_series(tmp_path / "mixed", signed=None)
    assert np.array_equal(build_volume(mixed).data, vol.data)
    # slope 0.5: HU in half units, so the volume differs only by rounding
    mixed = write_series(tmp_path / "half", signed=None, slope=0.5)
    assert _head_mad(vol, build_volume(mixed)) < 0.3
    assert {pydicom.dcmread(p).PixelRepresentation for p in mixed[:2]} == {0, 1}
    for p in mixed[:2]:  # SimpleITK/GDCM reads the same HU from both kinds
        _, hu = read_slice_hu(p)
        itk = sitk.GetArrayFromImage(sitk.ReadImage(str(p))).astype(np.float32)[0]
        assert np.array_equal(hu, np.maximum(itk, -1024))
    # PixelPaddingValue outside the scan circle (3000 signed, 4095 unsigned: bone if taken as pixels)
    padded = write_series(tmp_path / "padded", signed=None, pad_corners=True)
    for p in padded[:2]:
        _, hu = read_slice_hu(p)
        assert hu[0, 0] == -1024 and hu[-1, -1] == -1024 and hu[48, 48] > -1024
    assert _head_mad(vol, build_volume(padded)) < 0.5


# ---------------------------------------------------------------------------------------------------
# selection


def _study(folder: Path) -> dict[str, tuple[str, list[Path]]]:
    """A head-CT study with the usual distractors; name -> (series UID, files)."""
    small = {"rows": 16, "ps": 15.0}
    out: dict[str, tuple[str, list[Path]]] = {}

    def add(name: str, paths: list[Path]) -> None:
        out[name] = (read_header(paths[0]).series_uid, paths)

    add("primary", write_series(folder / "primary", kernel="H31s"))
    add("bone", write_series(folder / "bone", kernel="H70h", series_description="Head bone 4.5mm", **small))
    add("thin", write_series(folder / "thin", n=200, step=0.625, thickness=0.625, z_start=-20.0, **small))
    add(
        "localizer",
        write_series(
            folder / "loc",
            positions=[],
            extra=[(CORONAL, np.zeros(3))],
            image_type="ORIGINAL\\PRIMARY\\LOCALIZER",
            thickness=None,
            **small,
        ),
    )
    add(
        "reformat",
        write_series(
            folder / "mpr",
            positions=[],
            image_type="DERIVED\\SECONDARY\\REFORMATTED",
            extra=[(CORONAL, np.array([0.0, y, 40.0])) for y in range(-60, 60, 5)],
            **small,
        ),
    )
    add(
        "chest",
        write_series(
            folder / "chest",
            body_part="CHEST",
            series_description="Thorax 5mm",
            study_description="CT HEAD AND CHEST",
            **small,
        ),
    )
    # dose report: secondary capture, no patient geometry; structured report: no pixels at all
    ds = _dataset(
        series_uid=generate_uid(),
        number=1,
        iop=None,
        ipp=None,
        rows=16,
        cols=16,
        ps=None,
        sop_class=SECONDARY_CAPTURE,
        image_type="DERIVED\\SECONDARY\\OTHER",
        kernel="",
        thickness=None,
        series_description="Dose Report",
    )
    _pixels(ds, np.zeros((16, 16)), signed=True, slope=1.0, padding=None)
    (folder / "dose").mkdir()
    add("dose", [_save(ds, folder / "dose" / "1.dcm")])
    enhanced = _dataset(
        series_uid=generate_uid(),
        number=1,
        iop=None,
        ipp=None,
        rows=16,
        cols=16,
        ps=None,
        sop_class=ENHANCED_CT,
    )
    enhanced.NumberOfFrames = 2
    _pixels(enhanced, np.zeros((2, 16, 16)), signed=True, slope=1.0, padding=None)
    (folder / "enhanced").mkdir()
    add("enhanced", [_save(enhanced, folder / "enhanced" / "1.dcm")])
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = ENHANCED_SR
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.Modality = STUDY, generate_uid(), "SR"
    (folder / "sr").mkdir()
    add("sr", [_save(sr, folder / "sr" / "1.dcm")])
    return out


def test_the_primary_series_is_chosen_and_each_distractor_has_a_reason(tmp_path: Path) -> None:
    study = _study(tmp_path)
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 200)
    found, errors = read_headers(sorted(tmp_path.rglob("*.dcm")))
    assert list(errors) == [tmp_path / "junk.dcm"] and "no SOPClassUID" in errors[tmp_path / "junk.dcm"]
    studies = group_studies(found)
    assert list(studies) == [STUDY]
    headers = studies[STUDY]
    assert set(headers) == {uid for uid, _ in study.values()}
    sel = select_series(headers, AssemblySettings())
    uid = {name: u for name, (u, _) in study.items()}
    assert sel.chosen == uid["primary"]
    assert sel.reason is None
    assert set(sel.skipped) == set(headers) - {uid["primary"]}
    # thin series are candidates now (averaged into slabs), ranked below the 4-5 mm one; the chest
    # series too (the content decides, at build time), ranked last: its headers name another part
    assert sel.candidates == [uid["primary"], uid["thin"], uid["bone"], uid["chest"]]
    expected = {
        "bone": f"candidate ranked below {uid['primary']} (soft kernel 'H31s'",
        "thin": f"candidate ranked below {uid['primary']}",
        "localizer": "ImageType ORIGINAL\\PRIMARY\\LOCALIZER contains LOCALIZER",
        "reformat": "ImageType DERIVED\\SECONDARY\\REFORMATTED contains DERIVED/SECONDARY",
        "chest": f"candidate ranked below {uid['primary']}",
        "dose": f"SOP class Secondary Capture Image Storage ({SECONDARY_CAPTURE}) is not CT Image Storage",
        "sr": "SOP class Enhanced SR Storage",
        "enhanced": "2 of 2 images lack ImagePositionPatient",
    }
    for name, text in expected.items():
        assert text in sel.skipped[uid[name]], (name, sel.skipped[uid[name]])
    assert "sharp kernel 'H70h'" in sel.skipped[uid["bone"]]
    categories = {name: sel.categories[uid[name]] for name in expected}
    assert categories == {
        "bone": "not_preferred",
        "thin": "not_preferred",
        "localizer": "image_type",
        "reformat": "image_type",
        "chest": "not_preferred",
        "dose": "not_ct",
        "sr": "not_ct",
        "enhanced": "geometry",
    }
    vol = build_volume([h.path for h in sel.instances])
    assert vol.series_uid == uid["primary"]


def test_assemble_study_falls_back_when_the_best_series_cannot_be_built(tmp_path: Path) -> None:
    gappy = write_series(tmp_path / "soft", kernel="STANDARD", drop=(17,))
    bone = write_series(tmp_path / "bone", kernel="BONE")
    other = write_series(tmp_path / "other", kernel="BONE", rows=8, ps=30.0, n=30)
    series = {read_header(ps[0]).series_uid: [read_header(p) for p in ps] for ps in (gappy, bone, other)}
    soft_uid, bone_uid, other_uid = (read_header(ps[0]).series_uid for ps in (gappy, bone, other))
    sel, vol = assemble_study(series, AssemblySettings(interpolate_gaps=False))
    assert vol is not None and vol.series_uid == sel.chosen == bone_uid
    assert sel.skipped[soft_uid].startswith("cannot build the volume: series ")
    assert "missing slice between z=30.00 and z=39.00 mm" in sel.skipped[soft_uid]
    assert sel.categories[soft_uid] == "missing_slices" and bone_uid not in sel.categories
    assert sel.skipped[other_uid].startswith(f"candidate ranked below {bone_uid}")
    assert bone_uid not in sel.skipped
    # with interpolation on, the soft-kernel series is built after all
    sel, vol = assemble_study(series, AssemblySettings(interpolate_gaps=True))
    assert vol is not None and sel.chosen == soft_uid
    assert vol.warnings[0].startswith("interpolated across a 9")
    # nothing buildable: no volume, and the reason lists every failure
    sel, vol = assemble_study({soft_uid: series[soft_uid]}, AssemblySettings(interpolate_gaps=False))
    assert vol is None and sel.chosen is None
    assert (
        sel.reason and sel.reason.startswith("no candidate series could be built") and soft_uid in sel.reason
    )


def test_ranking_prefers_soft_then_unknown_then_sharp_then_thickness_then_coverage(tmp_path: Path) -> None:
    def headers(name: str, **kw: object) -> tuple[str, list]:
        paths = write_series(tmp_path / name, rows=8, ps=30.0, **kw)
        hs = [read_header(p) for p in paths]
        return hs[0].series_uid, hs

    sharp = headers("sharp", kernel="BONE")
    unknown = headers("unknown", kernel="XYZ")
    soft3 = headers("soft3", kernel="STANDARD", thickness=3.0)
    soft5 = headers("soft5", kernel="STANDARD", thickness=5.0)
    soft5_long = headers("soft5l", kernel="STANDARD", thickness=5.0, n=40)
    series = dict([sharp, unknown, soft3, soft5, soft5_long])
    sel = select_series(series)
    assert sel.candidates == [soft5_long[0], soft5[0], soft3[0], unknown[0], sharp[0]]
    without_soft = select_series(dict([sharp, unknown]))
    assert without_soft.chosen == unknown[0]
    # equal in every respect: the smaller series UID wins, whatever the dict order
    a = headers("a", kernel="STANDARD", series_uid="1.2.3.4")
    b = headers("b", kernel="STANDARD", series_uid="1.2.3.10")
    assert select_series(dict([a, b])).chosen == select_series(dict([b, a])).chosen == "1.2.3.10"


def test_head_detection_from_study_description_and_config_patterns(tmp_path: Path) -> None:
    paths = write_series(
        tmp_path,
        rows=8,
        ps=30.0,
        body_part=None,
        series_description="Axial 4.5",
        study_description="CT Schaedel nativ",
    )
    hs = [read_header(p) for p in paths]
    assert select_series({"s": hs}).chosen == "s"  # no body part: the study description decides
    # header words are only a hint: without a match the series is still a candidate (content decides)
    assert select_series({"s": hs}, AssemblySettings(head_patterns=["BRAIN"])).chosen == "s"
    assert (
        select_series({"s": hs}, AssemblySettings(modalities=["MR"])).skipped["s"].startswith("modality CT")
    )


# ---------------------------------------------------------------------------------------------------
# errors, persistence


def test_read_header_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match=r"nope\.dcm: no such file"):
        read_header(tmp_path / "nope.dcm")
    text = tmp_path / "notes.txt"
    text.write_text("not dicom at all\n" * 20)
    with pytest.raises(VolumeError, match=r"notes\.txt"):
        read_header(text)
    paths = write_series(tmp_path / "s", n=3, rows=8, ps=30.0)
    ds = pydicom.dcmread(paths[0])
    ds.ImagePositionPatient = ["1", "2"]
    ds.save_as(paths[0])
    h = read_header(paths[0])
    assert h.position is None and "ImagePositionPatient has 2 values, expected 3" in h.problems
    with pytest.raises(VolumeError, match=r"no usable geometry \(ImagePositionPatient has 2 values"):
        build_volume(paths)


def test_save_load_roundtrip(tmp_path: Path, reference: tuple[list[Path], AssembledVolume]) -> None:
    _, vol = reference
    path = save_volume(vol, tmp_path / "cache" / "vol.npz")
    assert path == tmp_path / "cache" / "vol.npz"
    assert [p.name for p in path.parent.iterdir()] == ["vol.npz"]  # no temporary file left behind
    back = load_volume(path)
    assert np.array_equal(back.data, vol.data) and back.data.dtype == np.uint8
    assert back.metadata() == vol.metadata()
    assert back.preprocessing_version == PREPROCESSING_VERSION
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(VolumeError, match=r"bad\.npz: not a volume file"):
        load_volume(tmp_path / "bad.npz")


# ---------------------------------------------------------------------------------------------------
# against training.synth.head: vendor-flavoured studies with distractors, hard cases and exact ground truth

SYNTH_SEED = 3


@pytest.fixture(scope="module")
def synth() -> ModuleType:
    import training.synth.head  # part of the project: a failure to import is a failure, not a skip

    return training.synth.head


def _synth_primary(
    synth: ModuleType, folder: Path, *, lesion: str | None = None, seed: int = SYNTH_SEED, **options: Any
) -> tuple[Any, list[Path]]:
    """One study (primary series only, noise-free, point-sampled); (truth, primary files)."""
    opts = synth.SynthOptions(slab_samples=1, noise_scale=0.0, distractors=False, **options)
    truth = synth.write_study(
        folder, np.random.default_rng(seed), lesion=lesion, options=opts, patient_index=0
    )
    return truth, sorted((folder / truth.series_dirs[truth.primary_series_uid]).glob("*.dcm"))


@pytest.fixture(scope="module")
def synth_base(synth: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, AssembledVolume]:
    truth, files = _synth_primary(synth, tmp_path_factory.mktemp("synth_base"))
    return truth, build_volume(files)


def _grid_points(vol: AssembledVolume) -> np.ndarray:
    """Patient coordinates of every voxel centre, (z*y*x, 3) in data order."""
    k, j, i = np.indices(vol.data.shape)
    direction = np.asarray(vol.grid["direction"]).reshape(3, 3)
    ijk = np.stack([i, j, k], -1).reshape(-1, 3) * np.asarray(vol.grid["spacing"])
    return np.asarray(vol.grid["origin"]) + ijk @ direction.T


def _centroid(weights: np.ndarray) -> np.ndarray:
    idx = np.indices(weights.shape).reshape(3, -1)
    return (idx * weights.ravel()).sum(axis=1) / weights.sum()


@pytest.mark.parametrize("vendor", ["siemens", "ge", "canon", "philips"])
def test_synth_study_primary_is_chosen_and_distractors_skipped(
    synth: ModuleType, tmp_path: Path, vendor: str
) -> None:
    opts = synth.SynthOptions(slab_samples=1, vendors=(vendor,))
    truth = synth.write_study(tmp_path, np.random.default_rng(11), lesion=None, options=opts, patient_index=0)
    headers, errors = read_headers(sorted(tmp_path.rglob("*.dcm")))
    assert errors == {}
    studies = group_studies(headers)
    assert list(studies) == [truth.study_uid]
    sel = select_series(studies[truth.study_uid])
    assert sel.chosen == truth.primary_series_uid, sel.skipped
    expected = {
        "localizer": "contains LOCALIZER",
        "bone": f"candidate ranked below {truth.primary_series_uid}",
        "thin": "coverage",
        "reformat": "contains DERIVED/SECONDARY",
        "dose": "Secondary Capture Image Storage",
    }
    roles = {role: uid for uid, role in truth.series_roles.items()}
    assert set(sel.skipped) == {roles[r] for r in expected}
    for role, text in expected.items():
        assert text in sel.skipped[roles[role]], (role, sel.skipped[roles[role]])
    assert "sharp kernel" in sel.skipped[roles["bone"]]
    assert len(sel.instances) == truth.n_slices


def test_synth_geometry_matches_the_phantom(
    synth: ModuleType, synth_base: tuple[Any, AssembledVolume]
) -> None:
    truth, vol = synth_base
    ph = synth.make_phantom(np.random.default_rng(truth.phantom_seed), None)
    # vertex: the top of the scalp ellipsoid along patient z
    top = ph.center[2] + np.sqrt(((ph.rot[2] * (ph.radii + ph.scalp)) ** 2).sum())
    assert vol.grid["vertex_z_mm"] == pytest.approx(top, abs=2.0)
    # the phantom rendered straight onto the grid: tissue centred in plane, same extent per slice
    hu = ph.sample(_grid_points(vol))[0].reshape(vol.data.shape)
    _, yy, xx = np.nonzero(hu > TISSUE)
    assert yy.mean() == pytest.approx(63.5, abs=1.0) and xx.mean() == pytest.approx(63.5, abs=1.0)
    covered = vol.data.reshape(32, -1).max(axis=1) > 0
    expected_area = (hu > TISSUE).sum(axis=(1, 2))[covered]
    built_area = (vol.data > 0).sum(axis=(1, 2))[covered]
    assert np.abs(built_area - expected_area).max() < 0.1 * expected_area.max()


@pytest.mark.parametrize(
    "options",
    [{}, {"tilt_fraction": 1.0}, {"tilt_fraction": 1.0, "tilt_shear_fraction": 1.0}],
    ids=["untilted", "tilted-normal-steps", "tilted-table-steps"],
)
def test_synth_lesion_lands_where_the_phantom_puts_it(
    synth: ModuleType, tmp_path: Path, options: dict[str, Any]
) -> None:
    """Same seed with and without a lesion: identical images except the lesion, so the difference of
    the two volumes is the lesion; its centroid must be where the phantom's lesion is on the grid."""
    lesion = "hemorrhage:intraparenchymal"
    truth, with_files = _synth_primary(synth, tmp_path / "lesion", lesion=lesion, **options)
    _, without_files = _synth_primary(synth, tmp_path / "normal", **options)
    assert (truth.tilt_deg > 10) == bool(options)
    with_lesion, without = build_volume(with_files), build_volume(without_files)
    assert with_lesion.grid == without.grid
    observed = np.abs(with_lesion.data.astype(float) - without.data.astype(float))
    ph = synth.make_phantom(np.random.default_rng(truth.phantom_seed), truth.lesion_spec)
    pts = _grid_points(with_lesion)
    a = window_7bit(ph.sample(pts)[0]).astype(float)
    b = window_7bit(ph.sample(pts, lesion=False)[0]).astype(float)
    expected = np.abs(a - b).reshape(with_lesion.data.shape)
    assert observed.sum() > 0.7 * expected.sum() > 0
    found, wanted = _centroid(observed), _centroid(expected)
    assert found[1:] == pytest.approx(wanted[1:], abs=0.4)  # in plane, fractions of a 1.72 mm pixel
    assert found[0] == pytest.approx(wanted[0], abs=0.3)  # z, fractions of a 4.5 mm slice


@pytest.mark.parametrize(
    "options",
    [
        {"reverse_fraction": 1.0},
        {"compressed_fraction": 1.0, "compressed_syntaxes": (RLELossless,)},
        {"compressed_fraction": 1.0, "compressed_syntaxes": (JPEGLSLossless,)},
        {"compressed_fraction": 1.0, "compressed_syntaxes": (JPEG2000Lossless,)},
        {"mixed_orientation_fraction": 1.0},
    ],
    ids=["reversed", "rle", "jpeg-ls", "jpeg2000", "mixed-orientation"],
)
def test_synth_hard_cases_give_the_identical_volume(
    synth: ModuleType, synth_base: tuple[Any, AssembledVolume], tmp_path: Path, options: dict[str, Any]
) -> None:
    base_truth, base = synth_base
    truth, files = _synth_primary(synth, tmp_path, **options)
    assert truth.study_uid == base_truth.study_uid  # the same study, one hard case flipped
    vol = build_volume(files)
    assert np.array_equal(vol.data, base.data)
    if "reverse_fraction" in options:
        assert truth.reversed != base_truth.reversed
    if "compressed_syntaxes" in options:
        assert truth.transfer_syntax == options["compressed_syntaxes"][0]
        assert vol.source_geometry["transfer_syntaxes"] == [truth.transfer_syntax]
    if "mixed_orientation_fraction" in options:
        assert len(truth.mixed_orientation_instances) == 2
        assert vol.warnings[0].endswith(f"used the {truth.n_slices} axial instances, ignored 2 (2 coronal)")
        assert vol.warnings[1:] == base.warnings
    else:
        assert vol.warnings == base.warnings


def test_synth_missing_slice_rejected_or_interpolated(
    synth: ModuleType, synth_base: tuple[Any, AssembledVolume], tmp_path: Path
) -> None:
    _, base = synth_base
    truth, files = _synth_primary(synth, tmp_path, missing_fraction=1.0)
    k = truth.dropped_index
    assert k is not None and len(files) == truth.n_slices_planned - 1
    z = [truth.ipp_first[2] + i * truth.slice_step[2] for i in (k - 1, k, k + 1)]
    step = float(np.linalg.norm(truth.slice_step))
    tight = AssemblySettings(interpolate_gaps=False, max_slice_gap_mm=1.5 * step)
    with pytest.raises(VolumeError, match=rf"missing slice between z={z[0]:.2f} and z={z[2]:.2f} mm"):
        build_volume(files, tight)
    filled = build_volume(files, AssemblySettings(max_slice_gap_mm=2.5 * step))
    assert filled.warnings[0].startswith(f"interpolated across a {2 * step:.2f} mm gap between z={z[0]:.2f}")
    assert filled.grid["origin"] == pytest.approx(base.grid["origin"], abs=0.5)
    same = np.abs(filled.data.astype(float) - base.data.astype(float))[base.data > 0]
    assert same.mean() < 1.0
