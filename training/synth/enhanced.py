"""The primary series as ONE Enhanced CT Image Storage instance (pattern "enhanced").

Why: modern Siemens and Philips scanners send a series as a single multi-frame object whose
geometry lives in functional groups (per-frame Plane Position, shared Plane Orientation and Pixel
Measures, CT-specific acquisition and reconstruction groups) instead of one file per slice.  Built
with pydicom from the same stack and pixels as the per-file series, so the two are interchangeable
for a consumer that reads both; checked with dciodvfy in the tests.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from training.synth.basics import ENHANCED_CT_IMAGE_STORAGE
from training.synth.dicom import _new_dataset, _save, _Series, _set_pixels, _Study, _uid
from training.synth.geometry import Stack


def _item(**kw: object) -> Dataset:
    ds = Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


def _shared_groups(study: _Study, series: _Series, stack: Stack, head: bool) -> Dataset:
    """Groups equal for every frame: orientation, kernel, exposure, rescale, window, anatomy."""
    vendor_spiral = study.vendor.key not in ("ge", "canon")
    g = Dataset()
    g.PlaneOrientationSequence = Sequence([_item(ImageOrientationPatient=list(stack.iop))])
    g.PixelValueTransformationSequence = Sequence(
        [_item(RescaleIntercept=-1024.0, RescaleSlope=1.0, RescaleType="HU")]
    )
    g.FrameVOILUTSequence = Sequence([_item(WindowCenter=series.window[0], WindowWidth=series.window[1])])
    # Without a head word the anatomy code must not say "Head" either (pattern no_head_words).
    region = _code("69536005", "SCT", "Head") if head else _code("38266002", "SCT", "Entire body")
    g.FrameAnatomySequence = Sequence([_item(AnatomicRegionSequence=Sequence([region]), FrameLaterality="U")])
    g.CTImageFrameTypeSequence = Sequence([_item(
        FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"], PixelPresentation="MONOCHROME",
        VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
    )])  # fmt: skip
    g.CTAcquisitionTypeSequence = Sequence([_item(
        AcquisitionType="SPIRAL" if vendor_spiral else "SEQUENCED", ConstantVolumeFlag="NO",
        FluoroscopyFlag="NO",
    )])  # fmt: skip
    g.CTAcquisitionDetailsSequence = Sequence([_item(
        DataCollectionDiameter=500.0, GantryDetectorTilt=float(stack.tilt), TableHeight=150.0,
        RotationDirection="CW", RevolutionTime=1.0, SingleCollimationWidth=0.625, TotalCollimationWidth=40.0,
    )])  # fmt: skip
    dyn = _item(TableSpeed=20.0, TableFeedPerRotation=20.0, SpiralPitchFactor=0.5) if vendor_spiral else (
        _item(TableSpeed=0.0, TableFeedPerRotation=0.0)
    )
    g.CTTableDynamicsSequence = Sequence([dyn])
    g.CTGeometrySequence = Sequence([_item(DistanceSourceToDetector=1040.0,
                                           DistanceSourceToDataCollectionCenter=570.0)])  # fmt: skip
    g.CTReconstructionSequence = Sequence([_item(
        ReconstructionAlgorithm="FILTER_BACK_PROJ", ConvolutionKernel=series.kernel,
        ConvolutionKernelGroup="BRAIN", ReconstructionDiameter=round(float(stack.ps[1]) * stack.cols, 3),
        ReconstructionPixelSpacing=[float(stack.ps[0]), float(stack.ps[1])], ReconstructionAngle=360.0,
        ImageFilter="NONE",
    )])  # fmt: skip
    g.CTExposureSequence = Sequence([_item(
        ExposureTimeInms=1000.0, XRayTubeCurrentInmA=280.0, ExposureInmAs=280.0, CTDIvol=55.0,
        ExposureModulationType="NONE",
        CTDIPhantomTypeCodeSequence=Sequence([_code("113690", "DCM", "IEC Head Dosimetry Phantom")]),
    )])  # fmt: skip
    g.CTXRayDetailsSequence = Sequence([_item(KVP=study.kvp, FocalSpots=[0.7], FilterType="BODY",
                                              FilterMaterial=["ALUMINUM"])])  # fmt: skip
    event = _item(IrradiationEventUID=_uid(study, "irradiation"))
    g.IrradiationEventIdentificationSequence = Sequence([event])
    uniform_thk = len(set(stack.thicknesses)) == 1
    if uniform_thk:
        g.PixelMeasuresSequence = Sequence([_pixel_measures(stack, 0)])
    return g


def _pixel_measures(stack: Stack, k: int) -> Dataset:
    return _item(
        PixelSpacing=[float(stack.ps[0]), float(stack.ps[1])], SliceThickness=float(stack.thicknesses[k]),
        SpacingBetweenSlices=float(stack.spacings[k]),
    )  # fmt: skip


def write_enhanced(
    study: _Study, series: _Series, stack: Stack, raw: np.ndarray, inst: list[int], keep: list[int],
    syntax: str, *, head: bool = True,
) -> None:  # fmt: skip
    """Write the frames ``keep`` (spatial indices) in instance-number order as one multi-frame file."""
    order = sorted(keep, key=lambda k: inst[k])
    rank = {k: i + 1 for i, k in enumerate(sorted(keep))}  # in-stack position: spatial, 1-based
    ds = _new_dataset(study, series, ENHANCED_CT_IMAGE_STORAGE, 1)
    del ds.AcquisitionDate, ds.AcquisitionTime  # not in this IOD: AcquisitionDateTime instead
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = study.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.DeviceSerialNumber = f"SN{study.token % 100000:05d}"
    ds.SoftwareVersions = "SYNTH 1.0"
    ds.AcquisitionNumber = 1
    dt = study.study_date + study.study_time
    ds.AcquisitionDateTime = dt
    ds.AcquisitionDuration = float(len(order))
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ProtocolName = study.description
    ds.AcquisitionContextSequence = Sequence([])
    ds.NumberOfFrames = len(order)
    dim_uid = _uid(study, "dimension", series.uid)
    ds.DimensionOrganizationSequence = Sequence([_item(DimensionOrganizationUID=dim_uid)])
    fc = Tag("FrameContentSequence")
    ds.DimensionIndexSequence = Sequence([
        _item(DimensionIndexPointer=Tag("StackID"), FunctionalGroupPointer=fc,
              DimensionOrganizationUID=dim_uid, DimensionDescriptionLabel="Stack ID"),
        _item(DimensionIndexPointer=Tag("InStackPositionNumber"), FunctionalGroupPointer=fc,
              DimensionOrganizationUID=dim_uid, DimensionDescriptionLabel="In-Stack Position Number"),
    ])  # fmt: skip
    ds.SharedFunctionalGroupsSequence = Sequence([_shared_groups(study, series, stack, head)])
    per_frame = []
    uniform_thk = len(set(stack.thicknesses)) == 1
    for k in order:
        f = Dataset()
        f.FrameContentSequence = Sequence([_item(
            FrameAcquisitionNumber=1, FrameReferenceDateTime=dt, FrameAcquisitionDateTime=dt,
            FrameAcquisitionDuration=1000.0, StackID="1", InStackPositionNumber=rank[k],
            DimensionIndexValues=[1, rank[k]],
        )])  # fmt: skip
        f.PlanePositionSequence = Sequence([_item(ImagePositionPatient=[float(x) for x in stack.ipps[k]])])
        f.CTPositionSequence = Sequence([_item(
            TablePosition=round(float(stack.centres[k][2]), 4) + 0.0,
            ReconstructionTargetCenterPatient=[round(float(x), 4) + 0.0 for x in stack.centres[k]],
            DataCollectionCenterPatient=[round(float(x), 4) + 0.0 for x in stack.centres[k]],
        )])  # fmt: skip
        if not uniform_thk:
            f.PixelMeasuresSequence = Sequence([_pixel_measures(stack, k)])
        per_frame.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    _set_pixels(ds, np.ascontiguousarray(raw[order]), study.signed)
    for kw in ("RescaleIntercept", "RescaleSlope", "RescaleType"):  # in the functional groups instead
        delattr(ds, kw)
    ds.Rows, ds.Columns = int(stack.rows), int(stack.cols)
    _save(ds, series, 1, syntax)
