"""Warm-up at daemon start: the first real study must not pay the data path's first-call costs.

Measured (issue 15, ``bench/e2e_bench.py``): the first study after a start took 1.88 s from "series
complete" to "SR acknowledged" against 0.97 s typical: its report stage 0.78 s (0.19 s typical) and its
assembly 0.66 s (0.45 s). What a first call pays: highdicom loading its JSON tables of the standard
(about 0.5 s, on the first SR or key image), torch/oneDNN choosing and compiling kernels for each model
set's shapes (the first inference of a set is several times its later ones), SimpleITK and scipy
setting up their filters, pydicom's first writes. None of it depends on the study.

So the daemon runs the whole path once on a synthetic study before its stages start: a phantom head CT
series (a skull shell around brain-density tissue, 5 mm axial slices, uncompressed) is written to a
temporary folder outside the storage root and assembled with the site's assembly rules; every current
model set scores a volume of its own shape (the phantom's volume for a head-CT set, a synthetic image
for a chest set); from the head-CT result a Structured Report with one key image and an HL7 ORU are
built and serialised in memory. Scores are discarded; nothing is put in the store, the outbox, the
metrics or a log line about a study; the temporary folder is removed (named for the daemon's pid: one
left by a daemon killed during its warm-up is removed by the next). A part that fails is logged and
skipped: warming up is an optimisation, never a reason not to serve.

Nothing here is clinical: the phantom carries no patient data (PatientID ``WARMUP``, empty name).
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from triage.assemble.common import TARGET_SHAPE
from triage.assemble.radiograph import RADIOGRAPH_SHAPE, assemble_by_kind, load_assembled
from triage.assemble.volume import AssembledVolume, read_header, save_volume
from triage.config import Config
from triage.model.registry import UID_PREFIX
from triage.model.results import ModelSetInfo, ScoreResult
from triage.model.score import Scorer, Scorers, VolumeInput
from triage.ops.logs import get_logger
from triage.report.hl7 import build_oru
from triage.report.keyimages import build_key_images, choose_slices
from triage.report.sr import build_sr

__all__ = ["phantom_series", "warm_up"]

log = get_logger("warmup")

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
WARMUP_PATIENT_ID = "WARMUP"
_MATRIX, _PIXEL_MM, _SLICE_MM, _SLICES = 256, 0.9, 5.0, 36  # 230 mm field of view, 180 mm of z


def _uid(*parts: str) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=["glowtriage-warmup", *parts])


def _phantom_slice(z_mm: float, rng: np.random.Generator) -> np.ndarray:
    """HU of one axial slice of an ellipsoid head (semi-axes 72 x 92 x 88 mm, 7 mm of 1000 HU skull
    around 35 HU brain) centred in the field, with 3 HU of noise."""
    half = _MATRIX * _PIXEL_MM / 2
    c = (np.arange(_MATRIX) + 0.5) * _PIXEL_MM - half
    y, x = np.meshgrid(c, c, indexing="ij")
    r_outer = (x / 72.0) ** 2 + (y / 92.0) ** 2 + (z_mm / 88.0) ** 2
    r_inner = (x / 65.0) ** 2 + (y / 85.0) ** 2 + (z_mm / 81.0) ** 2
    hu = np.full((_MATRIX, _MATRIX), -1000.0)
    hu[r_outer <= 1.0] = 1000.0
    hu[r_inner <= 1.0] = 35.0
    return hu + rng.normal(0.0, 3.0, hu.shape)


def phantom_series(folder: Path) -> list[Path]:
    """Write the synthetic head CT series (one file a slice, Explicit VR Little Endian) into ``folder``;
    the same files every time (UIDs and noise from fixed seeds)."""
    rng = np.random.default_rng(0)
    study, series, frame = _uid("study"), _uid("series"), _uid("frame")
    paths = []
    for i in range(_SLICES):
        z = -85.0 + i * _SLICE_MM
        stored = np.clip(np.round(_phantom_slice(z, rng) + 1024.0), 0, 4095).astype(np.uint16)
        sop = _uid("image", str(i))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "", WARMUP_PATIENT_ID, "", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20000101", "000000", "", "WARMUP"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "CT", "glowtriage warm-up", "HEAD"
        ds.SeriesDescription, ds.ConvolutionKernel = "HEAD", "STANDARD"
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness, ds.PixelSpacing = _SLICE_MM, [_PIXEL_MM, _PIXEL_MM]
        half = _MATRIX * _PIXEL_MM / 2 - _PIXEL_MM / 2
        ds.ImagePositionPatient = [-half, -half, z]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.Rows = ds.Columns = _MATRIX
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = stored.tobytes()
        path = folder / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _sweep_stale(prefix: str = "glowtriage-warmup-") -> int:
    """Remove the temporary folders of warm-ups whose daemon died in them (a kill -9 or a power cut
    during the warm-up skips the folder's clean-up): each is named for its daemon's pid, and is left
    alone while that process lives. Returns how many were removed."""
    removed = 0
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            pid = int(folder.name[len(prefix):].split("-", 1)[0])
            os.kill(pid, 0)
            continue  # its daemon is alive (or another user's: not ours to judge)
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed


def _synthetic_input(scorer: Scorer, ct: AssembledVolume | None) -> VolumeInput:
    """A volume of the set's own shape: the phantom's for a head-CT set, a smooth disc for a chest set."""
    if scorer.kind == "ct" and ct is not None:
        return VolumeInput(ct.study_uid, ct.series_uid, ct.data, ct.metadata())
    if scorer.kind == "ct":
        shape: tuple[int, ...] = TARGET_SHAPE
    else:
        shape = RADIOGRAPH_SHAPE
    grids = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in shape), indexing="ij")
    data = np.clip(90.0 * (1.0 - sum(g**2 for g in grids)), 0, 127).astype(np.uint8)
    return VolumeInput("warmup", "warmup", data, None)


def _report(result: ScoreResult, info: ModelSetInfo, paths: list[Path], source: list[Dataset],
            ct: AssembledVolume, cfg: Config) -> None:
    """SR with one key image, and the ORU, built and serialised in memory only. The result is given a
    region at the volume's centre when the set has none, so the key-image path runs whatever the set."""
    region_map = result.region_map
    if region_map is None or result.region_center_mm is None:
        centre = ct.index_to_patient([(n - 1) / 2.0 for n in TARGET_SHAPE])
        result = dataclasses.replace(result, region_center_mm=[float(v) for v in centre],
                                     region_window_mm=30.0)
        region_map = {"zmap": np.zeros((8, 32, 32), dtype=np.float32)}
    when = datetime(2000, 1, 1, tzinfo=UTC)
    grid = ct.metadata().get("grid") or {}
    assert result.region_center_mm is not None
    nearest = choose_slices(source, result.region_center_mm, 0.0)[0]  # one key image is enough
    full = [dcmread(p) for p, ds in zip(paths, source, strict=True) if ds is nearest]
    kis = build_key_images(dataclasses.replace(result, flagged=True), full, region_map, grid, info,
                           series_instance_uid=_uid("key-series"),
                           sop_instance_uid=lambda i: _uid("key", str(i)), content_datetime=when)
    sr = build_sr(result, source, info, series_instance_uid=_uid("sr-series"), sop_instance_uid=_uid("sr"),
                  content_datetime=when, key_images=kis)
    for ds in (sr, *kis):
        ds.save_as(io.BytesIO(), enforce_file_format=True)
    build_oru(result, source[0], info, cfg.settings.hl7, control_id=_uid("hl7")[-20:], when=when)


def warm_up(cfg: Config, scorers: Scorers | None) -> dict[str, Any]:
    """Run the data path once on the phantom (see the module docstring). Returns seconds per part
    (``assemble``, ``score_<kind>`` per current set, ``report``) and, under ``failed``, the reason of
    each part that raised; a part whose input failed is skipped (``skipped``)."""
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    skipped: list[str] = []

    def part(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as exc:  # a warm-up must never stop the daemon: say what failed, go on
            failed[name] = f"{type(exc).__name__}: {exc}"
            log.warning("warmup_part_failed", part=name, reason=failed[name], exc_info=True)
            return None
        finally:
            seconds[name] = round(time.perf_counter() - t0, 3)

    _sweep_stale()
    with tempfile.TemporaryDirectory(prefix=f"glowtriage-warmup-{os.getpid()}-") as tmp:
        folder = Path(tmp)

        def assemble() -> tuple[AssembledVolume, list[Path], list[Dataset]]:
            paths = phantom_series(folder)
            headers = [read_header(p) for p in paths]
            rules = cfg.settings.assembly.model_copy(update={"non_head_content": "warn"})
            sel, vol = assemble_by_kind({headers[0].series_uid: headers}, rules)
            if vol is None:
                raise RuntimeError(f"the phantom was not assembled: {sel.reason}")
            save_volume(vol, folder / "volume.npz")
            vol = load_assembled(folder / "volume.npz")
            return vol, paths, [dcmread(p, stop_before_pixels=True) for p in paths]

        built = part("assemble", assemble)
        ct_result: tuple[ScoreResult, ModelSetInfo] | None = None
        for kind, scorer in (scorers.by_kind.items() if scorers is not None else ()):
            item = _synthetic_input(scorer, built[0] if built else None)
            res = part(f"score_{kind}", lambda s=scorer, it=item: s.score([it])[0])
            if kind == "ct" and res is not None and built is not None:
                ct_result = (res, scorer.info)
        if ct_result is not None and built is not None:
            part("report", lambda: _report(ct_result[0], ct_result[1], built[1], built[2], built[0], cfg))
        else:
            skipped.append("report")
    out: dict[str, Any] = {"seconds": seconds}
    if failed:
        out["failed"] = failed
    if skipped:
        out["skipped"] = skipped
    return out
