"""Head CT series the way real scanners write them, from one analytic head, for the real-series tests.

Not a test module (no ``test_`` prefix): ``tests/unit/test_real_series.py``, the daemon test and
``bench/assembly_bench.py`` import it. The head (skull ring of 1000 HU around 35 HU brain, two
ventricles of 8 HU and a 70 HU sphere) is analytic, so the same head can be written as a 0.625 mm
series, a 5 mm series (each slice integrated over its thickness, like a real reconstruction), a
two-stack series, an Enhanced CT multi-frame instance, with new UIDs and in any file order; and
the pixel noise depends only on the slice's position and the kernel, never on a UID, so a study
written twice holds the same pixels.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
HEAD_C = np.array([8.0, -12.0, 40.0])
HEAD_AXES = np.array([70.0, 90.0, 72.0])
SKULL_TOP = HEAD_C[2] + HEAD_AXES[2]  # 112 mm
SUB_PLANE_MM = 0.5  # a slice is rendered as the mean of planes at most this far apart across its thickness

HuFn = Callable[[np.ndarray], np.ndarray]


def _sig(x: np.ndarray, width: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x / width, -50, 50)))


def head_hu(x: np.ndarray) -> np.ndarray:
    """HU at patient points x (..., 3): skull, brain, ventricles, a dense sphere, air."""
    rho = np.sqrt((((x - HEAD_C) / HEAD_AXES) ** 2).sum(axis=-1))
    hu = -1000.0 + 2000.0 * _sig(1.0 - rho, 0.012) - 965.0 * _sig(0.92 - rho, 0.012)
    for cx in (-10.0, 14.0):
        c = HEAD_C + np.array([cx, 5.0, 10.0])
        r = np.sqrt((((x - c) / np.array([6.0, 22.0, 14.0])) ** 2).sum(axis=-1))
        hu -= 27.0 * _sig(1.0 - r, 0.05)
    d = np.linalg.norm(x - (HEAD_C + np.array([-30.0, -30.0, 30.0])), axis=-1)
    hu += 35.0 * _sig(9.0 - d, 0.8)
    return hu


def phantom_hu(x: np.ndarray) -> np.ndarray:
    """A water cylinder (QA phantom) of 100 mm radius along z: no skull, brain-like density."""
    r = np.hypot(x[..., 0] - 5.0, x[..., 1] + 10.0)
    inside = (r < 100.0) & (np.abs(x[..., 2] - 40.0) < 80.0)
    return np.where(inside, 0.0, -1000.0)


def bone_window_hu(x: np.ndarray) -> np.ndarray:
    """The head as a bone-only image would hold it: the skull, with the inside above brain density."""
    hu = head_hu(x)
    return np.where((hu > -200.0) & (hu < 300.0), 250.0, hu)


def _kernel_noise(shape: tuple[int, int], kind: str, seed: int) -> np.ndarray:
    """The kernel's noise of a 5 mm slice (:func:`write_series` scales it to the slice's thickness)."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(shape)
    if kind == "soft":
        return 3.0 * ndimage.gaussian_filter(white, 1.0) * 2.0  # correlated, ~3 HU
    if kind == "bone":
        return 60.0 * white  # white, high-frequency
    return np.zeros(shape)


def write_series(
    folder: Path,
    zs: Sequence[float],
    *,
    thickness: float | Sequence[float],
    study_uid: str,
    series_uid: str | None = None,
    frame_uid: str | None = None,
    rows: int = 128,
    ps: float = 1.75,
    tilt_deg: float = 0.0,
    sub: int = 0,
    noise_seed: int = 0,
    hu_fn: HuFn = head_hu,
    noise: str = "",
    kernel: str = "STANDARD",
    body_part: str | None = None,
    series_description: str = "",
    protocol_name: str = "",
    study_description: str = "",
    image_type: str = "ORIGINAL\\PRIMARY\\AXIAL",
    jpeg_lossless: bool = False,
    enhanced: bool = False,
    names: Callable[[int], str] | None = None,
) -> list[Path]:
    """One series with slices centred at (0, 0, z) for z in ``zs`` (steps along the table, z), each
    slice the mean of ``sub`` planes across its ``thickness``; gantry tilted about x by ``tilt_deg``.

    A slice is the integral of the head over its thickness, as a reconstruction is: the planes are at
    most ``SUB_PLANE_MM`` apart whatever ``sub`` asks (fewer would point-sample a thick slice, and a
    5 mm "reference" sharper than a real 5 mm slice would make thick-vs-thin comparisons unfair).
    ``noise_seed`` gives another noise realisation (a repeated scan); the noise never depends on a UID.

    ``enhanced`` writes one Enhanced CT multi-frame instance instead of one file a slice;
    ``jpeg_lossless`` re-encodes each file with dcmtk's dcmcjpeg (JPEG Lossless SV1).
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    t = np.radians(tilt_deg)
    row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(t), -np.sin(t)])
    normal = np.cross(row_dir, col_dir)
    iop = [*row_dir, *col_dir]
    jj, kk = np.mgrid[0:rows, 0:rows].astype(float)
    half = (rows - 1) / 2 * ps
    thicknesses = list(thickness) if isinstance(thickness, Sequence) else [float(thickness)] * len(zs)
    frames: list[tuple[np.ndarray, np.ndarray]] = []
    for z, th in zip(zs, thicknesses, strict=True):
        n_sub = max(sub, math.ceil(th / SUB_PLANE_MM - 1e-9), 1)
        offsets = (np.arange(n_sub) + 0.5) / n_sub * th - th / 2
        ipp = np.array([0.0, 0.0, z]) - half * row_dir - half * col_dir
        pts = ipp + kk[..., None] * ps * row_dir + jj[..., None] * ps * col_dir
        hu = np.mean([hu_fn(pts + o * normal) for o in offsets], axis=0)
        if noise:
            # thinner slices are noisier (fewer photons per slice): sigma ~ 1/sqrt(thickness), given at 5 mm
            scale = math.sqrt(5.0 / th) if th > 0 else 1.0
            seed = (round(z * 1000) + 7919 * noise_seed) % (2**31)
            hu = hu + scale * _kernel_noise(hu.shape, noise, seed=seed)
        frames.append((ipp, hu))
    common = {
        "study_uid": study_uid,
        "series_uid": series_uid,
        "frame_uid": frame_uid,
        "kernel": kernel,
        "body_part": body_part,
        "series_description": series_description,
        "protocol_name": protocol_name,
        "study_description": study_description,
        "image_type": image_type,
        "rows": rows,
        "ps": ps,
        "iop": iop,
        "thicknesses": thicknesses,
    }
    if enhanced:
        path = folder / "enhanced.dcm"
        _enhanced(frames, path, **common)
        return [path]
    paths = []
    for i, (ipp, hu) in enumerate(frames):
        name = names(i) if names else f"{generate_uid()[-14:]}.dcm"
        ds = _base(CT, **common)
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.PixelSpacing = [f"{ps:g}", f"{ps:g}"]
        ds.SliceThickness = f"{thicknesses[i]:g}"
        ds.GantryDetectorTilt = f"{tilt_deg:g}"
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        ds.PixelData = _stored(hu).tobytes()
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    if jpeg_lossless:
        for p in paths:
            subprocess.run(["dcmcjpeg", "+e1", str(p), str(p) + ".j"], check=True, capture_output=True)
            shutil.move(str(p) + ".j", p)
    return paths


def _stored(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16)


def _base(sop_class: str, **c: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = c["study_uid"]
    ds.SeriesInstanceUID = c["series_uid"]
    ds.FrameOfReferenceUID = c["frame_uid"]
    ds.PatientID = "RS-0001"
    ds.PatientName = "Real^Series"
    ds.Modality = "CT"
    ds.ImageType = str(c["image_type"]).split("\\")
    if c["body_part"]:
        ds.BodyPartExamined = c["body_part"]
    for key, kw in (
        ("series_description", "SeriesDescription"),
        ("protocol_name", "ProtocolName"),
        ("study_description", "StudyDescription"),
        ("kernel", "ConvolutionKernel"),
    ):
        if c[key]:
            setattr(ds, kw, c[key])
    ds.Rows = ds.Columns = c["rows"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def _enhanced(frames: list[tuple[np.ndarray, np.ndarray]], path: Path, **c: object) -> None:
    """Enhanced CT Image Storage: geometry in the functional groups (orientation, pixel measures and
    rescale shared; position per frame), as Siemens and Philips scanners send it."""
    ds = _base(ENHANCED_CT, **c)
    ds.ImageType = [*str(c["image_type"]).split("\\"), "NONE"][:4]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(frames)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [f"{c['ps']:g}", f"{c['ps']:g}"]
    measures.SliceThickness = f"{float(np.median(c['thicknesses'])):g}"  # type: ignore[arg-type]
    shared.PixelMeasuresSequence = DicomSequence([measures])
    orient = Dataset()
    orient.ImageOrientationPatient = [f"{v:.6f}" for v in c["iop"]]  # type: ignore[attr-defined]
    shared.PlaneOrientationSequence = DicomSequence([orient])
    rescale = Dataset()
    rescale.RescaleIntercept, rescale.RescaleSlope, rescale.RescaleType = "-1024", "1", "HU"
    shared.PixelValueTransformationSequence = DicomSequence([rescale])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per = []
    for i, (ipp, _) in enumerate(frames):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        item.PlanePositionSequence = DicomSequence([pos])
        content = Dataset()
        content.InStackPositionNumber = i + 1
        item.FrameContentSequence = DicomSequence([content])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per)
    ds.PixelData = np.stack([_stored(hu) for _, hu in frames]).tobytes()
    ds.save_as(path, enforce_file_format=True)


def thin_zs(step: float = 0.625, top: float = SKULL_TOP + 8.0, length: float = 150.0) -> list[float]:
    """Slice centres from ``top`` down ``length`` mm at ``step`` (a thin helical reconstruction)."""
    n = int(length / step) + 1
    return [top - i * step for i in range(n)][::-1]


def two_stack(
    top: float = SKULL_TOP + 6.0, tilt_deg: float = 18.5, lower: int = 13
) -> tuple[list[float], list[float]]:
    """GE's classic two-stack head protocol along the table: 7.38 mm steps above, one 1.14 mm step,
    4.22 mm steps over the posterior fossa (the steps of the refused study in issue 11: 13 of each);
    slices as thick as their stack's spacing along the tilted normal. ``lower`` more 4.22 mm steps reach
    further down: at 18.5 degrees the tilted planes leave part of the canonical grid's lowest 20 mm
    outside 13 of them (air there), which is coverage, not resampling. Returns (z centres, thicknesses)."""
    cos = float(np.cos(np.radians(tilt_deg)))
    zs, th = [top], [7.38 * cos]
    for _ in range(13):
        zs.append(zs[-1] - 7.38)
        th.append(7.38 * cos)
    zs.append(zs[-1] - 1.14)
    th.append(4.22 * cos)
    for _ in range(lower):
        zs.append(zs[-1] - 4.22)
        th.append(4.22 * cos)
    return zs[::-1], th[::-1]


def thick_zs(step: float = 5.0, n: int = 30, top: float = SKULL_TOP + 4.0) -> list[float]:
    """Slice centres of a thick axial series from ``top`` down, ``n`` slices ``step`` apart."""
    return [top - i * step for i in range(n)][::-1]


def same_head_series(
    base: Path, study_uid: str, *, noise: str = "", noise_seed: int = 0, phase_mm: float = 0.0,
    only: tuple[str, ...] | None = None,
) -> dict[str, list[Path]]:
    """Issue 11's equivalence: one head written as a 5 mm series, a 0.625 mm series (8.5 degree tilt,
    one slice missing) and GE's two-stack series (18.5 degree tilt), each long enough to cover the
    canonical grid under its tilt (so what differs is resampling, not coverage). ``phase_mm`` moves the
    5 mm and the two-stack series' slices that much higher (the table placed otherwise: the slice phase
    at the vertex, which a coarse series records differently); ``only`` writes just those series.
    Returns {"5mm" | "0.625mm" | "two-stack": files}."""
    kw = {"study_uid": study_uid, "noise": noise, "noise_seed": noise_seed}
    want = set(only or ("5mm", "0.625mm", "two-stack"))
    out: dict[str, list[Path]] = {}
    if "5mm" in want:
        zs = thick_zs(top=SKULL_TOP + 4.0 + phase_mm)
        out["5mm"] = write_series(base / "thick", zs, thickness=5.0, **kw)
    if "0.625mm" in want:
        thin = thin_zs(length=165.0)
        del thin[100]
        out["0.625mm"] = write_series(base / "thin", thin, thickness=0.625, tilt_deg=8.5, **kw)
    if "two-stack" in want:
        zz, tt = two_stack(top=SKULL_TOP + 6.0 + phase_mm, lower=18)
        out["two-stack"] = write_series(base / "two", zz, thickness=tt, tilt_deg=18.5, **kw)
    return out
