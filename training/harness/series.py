"""Small synthetic CT series for the plumbing tests and the ingest bench: a disc of "brain" in air.

Not a head phantom (``training.synth.head`` writes those): these slices only need to be valid CT Image
Storage instances of a chosen size, so the receiver, the store and the peers have something real to move.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_ct_series(
    out_dir: Path,
    n: int = 10,
    size: int = 64,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    seed: int = 0,
    signed: bool = False,
    prefix: str = "ct",
) -> list[Path]:
    """Write ``n`` axial CT slices (Explicit VR Little Endian) and return their paths.

    Explicit VR LE because storescu sends a file in its own transfer syntax when the SCP accepts it,
    so what goes on the wire is the file's dataset, byte for byte.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    paths = []
    yy, xx = np.mgrid[:size, :size]
    head = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyDate = "20240101"
        ds.Modality = "CT"
        ds.PatientName = "SYNTH^PHANTOM"
        ds.PatientID = "SYNTH0001"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyDescription = "CT HEAD"
        ds.SeriesDescription = "AXIAL BRAIN"
        ds.SeriesNumber = 2
        ds.InstanceNumber = i + 1
        ds.SliceThickness = 5.0
        ds.ImagePositionPatient = [-100.0, -100.0, 5.0 * i]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [200.0 / size, 200.0 / size]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.BitsAllocated = 16
        if signed:
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
            ds.RescaleIntercept = 0
            pixels = np.where(head, 40, -1000) + rng.normal(0, 10, (size, size))
            arr = pixels.astype(np.int16)
        else:
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
            ds.RescaleIntercept = -1024
            pixels = np.where(head, 1064, 24) + rng.normal(0, 10, (size, size))
            arr = np.clip(pixels, 0, 4095).astype(np.uint16)
        ds.RescaleSlope = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 80
        ds.PixelData = arr.tobytes()
        path = out_dir / f"{prefix}{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
