"""Synthetic chest-radiograph studies written as CR and DX DICOM, and the ``--kind cxr`` dataset.

Why vendors: what makes radiographs hard to read consistently is not the anatomy but the headers and
pixel conventions of the devices: MONOCHROME1 (bone dark in the stored values) from some CR readers,
12, 14 or 16 stored bits, a Modality LUT as rescale, a VOI window or a VOI LUT Sequence, DX "for
processing" images with linear raw values, ViewPosition and BodyPartExamined present or not, lossless
compression. Each :data:`CXR_VENDORS` entry is one such habit set; a study draws one.

A study is a folder of one frontal image (PA, or AP from the portable vendor) and, in some studies, a
lateral (LL) as the distractor the assembly must skip. labels.csv has the head-CT columns
(``study_uid,label,lesion,lesion_x,lesion_y,lesion_z,kind,patterns``): lesion_x/y are the lesion's
centre in the frontal image's pixels (column, row), lesion_z empty, kind ``cxr``.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, RLELossless, generate_uid

from training.synth.basics import _UID_PREFIX
from training.synth.cxr_phantom import CXR_LESIONS, Radiograph, render_frontal, render_lateral
from training.synth.ljpeg import compress_sv1

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1.1"


@dataclass(frozen=True)
class CxrVendor:
    """One device's habits (see the module docstring)."""

    manufacturer: str
    model: str
    modality: str  # CR or DX
    sop_class: str
    photometric: str  # MONOCHROME1 or MONOCHROME2
    bits_stored: int
    spacing_mm: float
    matrix: tuple[int, int]  # rows, columns of the written image (synthesis is at a coarser grid)
    voi: str  # "window", "lut" (VOI LUT Sequence) or "none"
    rescale: bool  # a Modality LUT as RescaleSlope/Intercept
    body_part: bool  # BodyPartExamined written
    view_position: bool  # ViewPosition written
    portable: bool = False  # AP views
    compression: str = ""  # "", "jpeg-lossless" or "rle"


CXR_VENDORS = (
    CxrVendor("SYNTH Fuji", "FCR Sim", "CR", CR_IMAGE_STORAGE, "MONOCHROME1", 10, 0.2, (1760, 1760),
              "window", False, True, True),
    CxrVendor("SYNTH Agfa", "CR Sim 35", "CR", CR_IMAGE_STORAGE, "MONOCHROME1", 12, 0.15, (2320, 2000),
              "lut", True, False, True, compression="jpeg-lossless"),
    CxrVendor("SYNTH Carestream", "DRX Sim", "DX", DX_PRESENTATION_STORAGE, "MONOCHROME2", 12, 0.139,
              (2560, 2500), "window", False, True, True),
    CxrVendor("SYNTH Siemens", "Ysio Sim", "DX", DX_PRESENTATION_STORAGE, "MONOCHROME2", 12, 0.148,
              (2330, 2330), "window", True, True, False, compression="rle"),
    CxrVendor("SYNTH GE", "Optima Sim", "DX", DX_PRESENTATION_STORAGE, "MONOCHROME1", 14, 0.2, (2022, 2022),
              "lut", False, False, True, portable=True),
    CxrVendor("SYNTH Philips", "DigitalDiagnost Sim", "DX", DX_PROCESSING_STORAGE, "MONOCHROME2", 16, 0.143,
              (2500, 2500), "none", True, True, True),
)

# the head-CT columns (training.synth.dataset.LABEL_COLUMNS; a test holds them equal: that module imports
# this one for --kind cxr, so importing it back would be a cycle)
CXR_LABEL_COLUMNS = ("study_uid", "label", "lesion", "lesion_x", "lesion_y", "lesion_z", "kind", "patterns")
SYNTH_SPACING_MM = 1.0  # anatomy is drawn at 1 mm and upsampled to the device matrix
DETECTOR_MM = 430.0


@dataclass
class CxrTruth:
    study_uid: str
    study_dir: str
    label: str
    lesion: str
    lesion_px: tuple[float, float] | None  # (column, row) in the frontal image as written
    vendor: str
    view: str
    lateral: bool
    kind: str = "cxr"

    def to_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _upsample(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (scipy.ndimage.zoom, order 1): the detector sees a smooth projection."""
    from scipy.ndimage import zoom

    return zoom(img, (shape[0] / img.shape[0], shape[1] / img.shape[1]), order=1, grid_mode=True,
                mode="nearest").astype(np.float32)  # fmt: skip


def stored_values(r: Radiograph, v: CxrVendor, rng: np.random.Generator
                  ) -> tuple[np.ndarray, dict[str, object]]:
    """Attenuation -> the device's stored pixel values and the LUT attributes that display them.

    For presentation: a device-specific tone curve to the display range, then (MONOCHROME1) inverted
    in storage. For processing: linear in attenuation (log exposure), MONOCHROME2, no VOI.
    """
    top = 2**v.bits_stored - 1
    mu = _upsample(r.image, v.matrix)
    exposure = float(rng.uniform(0.85, 1.15))
    lo, hi = np.percentile(mu, [0.5, 99.5])
    x = np.clip((mu - lo) / (hi - lo + 1e-6), 0.0, 1.2) * exposure
    if v.sop_class != DX_PROCESSING_STORAGE:
        x = np.clip(x, 0.0, 1.0) ** float(rng.uniform(0.8, 1.2))
    x = x * 0.8 * top + 0.08 * top
    x += rng.normal(0.0, 0.004 * top, size=x.shape).astype(np.float32)  # quantum noise
    stored = np.clip(np.round(x), 0, top).astype(np.uint16)
    attrs: dict[str, object] = {}
    if v.photometric == "MONOCHROME1":
        stored = (top - stored).astype(np.uint16)
    slope, intercept = 1.0, 0.0
    if v.rescale:
        slope, intercept = float(rng.choice([1.0, 2.0])), float(rng.choice([0.0, -512.0]))
    if v.rescale:
        attrs.update(RescaleSlope=f"{slope:g}", RescaleIntercept=f"{intercept:g}", RescaleType="US")
    modality_vals = stored.astype(np.float64) * slope + intercept
    plo, phi = np.percentile(modality_vals, [1.0, 99.5])
    if v.voi == "window":
        attrs.update(WindowCenter=f"{(plo + phi) / 2:.1f}", WindowWidth=f"{max(phi - plo, 2.0):.1f}",
                     VOILUTFunction="LINEAR")  # fmt: skip
    elif v.voi == "lut":  # a sigmoid tone curve over the stored lung-to-bone range, 12-bit output
        first = int(max(plo, 0))
        n = int(min(max(phi - first, 2.0), 65535.0)) + 1
        xs = np.arange(n) / (n - 1)
        lut = np.round(4095 / (1 + np.exp(-6 * (xs - 0.5)))).astype(np.uint16)
        item = Dataset()
        item.LUTDescriptor = [n if n < 65536 else 0, first, 12]
        item.LUTExplanation = "SYNTH TONE"
        item.LUTData = lut.tolist()
        item["LUTData"].VR = "US"
        attrs["VOILUTSequence"] = [item]
    return stored, attrs


def radiograph_dataset(r: Radiograph, v: CxrVendor, rng: np.random.Generator, *, study_uid: str,
                       patient_index: int, series_number: int, when: dt.datetime) -> Dataset:  # fmt: skip
    stored, attrs = stored_values(r, v, rng)
    ds = Dataset()
    sop_uid = generate_uid(prefix=_UID_PREFIX, entropy_srcs=[study_uid, r.view, str(series_number)])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = v.sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if v.modality == "CR" else ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = v.sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AccessionNumber = f"SX{patient_index:06d}"
    ds.Modality = v.modality
    ds.Manufacturer = v.manufacturer
    ds.ManufacturerModelName = v.model
    ds.InstitutionName = "SYNTHETIC"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST" + (" PORTABLE" if v.portable else " 2 VIEWS")
    ds.SeriesDescription = {"PA": "CHEST PA", "AP": "CHEST AP", "LL": "CHEST LAT"}[r.view]
    ds.PatientName = f"SYNTH^CXR{patient_index:05d}"
    ds.PatientID = f"SYNCXR{patient_index:06d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = str(rng.choice(["F", "M"]))
    if v.body_part:
        ds.BodyPartExamined = "CHEST"
    if v.view_position:
        ds.ViewPosition = r.view
    ds.PatientOrientation = ["A", "F"] if r.view == "LL" else (["L", "F"] if r.view == "PA" else ["R", "F"])
    ds.KVP = f"{rng.uniform(100, 125) if r.view != 'AP' else rng.uniform(80, 95):.0f}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid(prefix=_UID_PREFIX, entropy_srcs=[study_uid, "series", r.view])
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    if v.modality == "DX":
        ds.PresentationIntentType = (
            "FOR PROCESSING" if v.sop_class == DX_PROCESSING_STORAGE else "FOR PRESENTATION")
        ds.ImagerPixelSpacing = [v.spacing_mm, v.spacing_mm]
        ds.DetectorType = "DIRECT"
        ds.PresentationLUTShape = "INVERSE" if v.photometric == "MONOCHROME1" else "IDENTITY"
        ds.BurnedInAnnotation = "NO"
    else:
        ds.ImagerPixelSpacing = [v.spacing_mm, v.spacing_mm]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = v.photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = v.bits_stored
    ds.HighBit = v.bits_stored - 1
    ds.PixelRepresentation = 0
    for k, val in attrs.items():
        setattr(ds, k, val)
    ds.PixelData = stored.astype("<u2").tobytes()
    if v.compression == "jpeg-lossless":
        compress_sv1(ds)
    elif v.compression == "rle":
        ds.compress(RLELossless, encoding_plugin="pydicom")
    return ds


def write_cxr_study(out: Path, rng: np.random.Generator, *, lesion: str | None, patient_index: int,
                    lateral_fraction: float = 0.4, vendor: CxrVendor | None = None,
                    synth_scale: float = 1.0) -> CxrTruth:  # fmt: skip
    """One study under ``out``: the frontal image and perhaps a lateral, as the vendor writes them.

    ``synth_scale`` > 1 draws the anatomy at a coarser grid (faster; tests use it).
    """
    out.mkdir(parents=True, exist_ok=True)
    v = vendor or CXR_VENDORS[int(rng.integers(len(CXR_VENDORS)))]
    view = "AP" if v.portable else "PA"
    if synth_scale != 1.0:
        v = CxrVendor(**{**v.__dict__, "matrix": (max(64, int(v.matrix[0] / synth_scale)),
                                                  max(64, int(v.matrix[1] / synth_scale))),
                         "spacing_mm": v.spacing_mm * synth_scale})  # fmt: skip
    rows = round(v.matrix[0] * v.spacing_mm / SYNTH_SPACING_MM / 2)  # drawn at 2 mm, upsampled
    cols = round(v.matrix[1] * v.spacing_mm / SYNTH_SPACING_MM / 2)
    frontal = render_frontal(rng, (rows, cols), 2 * SYNTH_SPACING_MM, lesion, view=view)
    salt = str(rng.integers(1 << 62))
    study_uid = generate_uid(prefix=_UID_PREFIX, entropy_srcs=["cxr", str(patient_index), salt])
    when = dt.datetime(2026, 1, 1, 8) + dt.timedelta(minutes=int(rng.integers(0, 60 * 24 * 300)))
    ds = radiograph_dataset(frontal, v, rng, study_uid=study_uid, patient_index=patient_index,
                            series_number=1, when=when)  # fmt: skip
    ds.save_as(out / "frontal.dcm", enforce_file_format=True)
    has_lateral = bool(rng.random() < lateral_fraction) and not v.portable
    if has_lateral:
        lat = render_lateral(rng, (rows, cols), 2 * SYNTH_SPACING_MM)
        ds2 = radiograph_dataset(lat, v, rng, study_uid=study_uid, patient_index=patient_index,
                                 series_number=2, when=when)  # fmt: skip
        ds2.save_as(out / "lateral.dcm", enforce_file_format=True)
    px = None
    if frontal.lesion_center_px is not None:
        f = v.matrix[0] / rows
        px = (frontal.lesion_center_px[1] * f, frontal.lesion_center_px[0] * f)
    return CxrTruth(study_uid, out.name, "abnormal" if lesion else "normal", lesion or "", px,
                    v.manufacturer, view, has_lateral)


def write_cxr_dataset(out: Path, normal: int, abnormal: int, seed: int, *, lateral_fraction: float = 0.4,
                      synth_scale: float = 1.0) -> list[CxrTruth]:  # fmt: skip
    """``normal + abnormal`` studies (abnormal kinds in turn over :data:`CXR_LESIONS`, order shuffled),
    ``labels.csv`` (head-CT columns) and ``truth.jsonl``. Study ``i`` has its own generator (seed, i)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lesions: list[str | None] = [None] * normal + [CXR_LESIONS[j % len(CXR_LESIONS)] for j in range(abnormal)]
    order = np.random.default_rng(np.random.SeedSequence([seed, 0xC512])).permutation(len(lesions))
    rows: list[CxrTruth] = []
    for i, li in enumerate(order):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC512, i]))
        rows.append(write_cxr_study(out / f"study_{i:04d}", rng, lesion=lesions[int(li)], patient_index=i,
                                    lateral_fraction=lateral_fraction, synth_scale=synth_scale))  # fmt: skip
    with (out / "labels.csv").open("w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(CXR_LABEL_COLUMNS)
        for t in rows:
            xy = [f"{t.lesion_px[0]:.1f}", f"{t.lesion_px[1]:.1f}"] if t.lesion_px else ["", ""]
            wr.writerow([t.study_uid, t.label, t.lesion, *xy, "", t.kind, ""])
    with (out / "truth.jsonl").open("w") as fh:
        for t in rows:
            fh.write(json.dumps(t.to_dict(), sort_keys=True) + "\n")
    return rows
