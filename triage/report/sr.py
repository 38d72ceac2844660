"""The DICOM result: a TID 1500 Comprehensive 3D SR built with highdicom.

Why a TID 1500 Comprehensive 3D SR: it is what the IHE AI Results (AIR) profile asks an evidence
creator to write, so any AIR-ready viewer shows our score next to the images without custom code, and
a PACS files it in the same study as the CT it describes.

Determinism matters more than usual here: the caller (pipeline) supplies every UID and the content
date/time, and nothing below reads the clock or a random source, so a redone report is byte-identical
and a PACS sees a duplicate of the first SR, never a second, conflicting one.

Everything the patient can be identified by (name, ID, birth date, accession number) goes into the SR
because it is a clinical message; none of it is ever logged or put into an exception message (errors
name UIDs and attributes only). The HL7 ORU^R01 is in :mod:`triage.report.hl7`, the routing decision
in :mod:`triage.report.routes`, the concepts both messages share in :mod:`triage.report.codes`.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import warnings
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

import numpy as np
from highdicom import ContributingEquipment
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurement,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    SourceImageForSegmentation,
    TrackingIdentifier,
    VolumeSurface,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM

from triage.assemble.radiograph import _spacing as radiograph_spacing  # the spacing the assembly honoured
from triage.model.registry import UID_PREFIX
from triage.model.results import ModelSetInfo, ScoreResult
from triage.report.codes import (
    ABNORMAL,
    LOG_P_MIXTURE_MODEL,
    LOG_P_NORMAL_MODEL,
    LOG_POSTERIOR,
    NAT,
    NORMAL,
    NORMALITY,
    PERCENT,
    PERCENTILE,
    PROCEDURE_BY_KIND,
    SCHEME,
    THRESHOLD,
    ReportError,
    check_uid,
    dicom_text,
    finite,
)

__all__ = ["COMPREHENSIVE_3D_SR", "SERIES_DESCRIPTION", "ReportError", "build_sr"]

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SERIES_DESCRIPTION = "AI triage aid (not a diagnosis): head CT normality"
TRACKING_IDENTIFIER = "head CT triage"
REGION_TRACKING_IDENTIFIER = "head CT triage: most abnormal region"
CXR_REGION_TRACKING_IDENTIFIER = "chest radiograph triage: most abnormal region"
# The region score (triage.model.voxelmap): the most abnormal lesion-sized window of the voxel map of
# log p(normal|x), in normal-study standard deviations; private code like the other flow concepts.
REGION_SCORE = CodedConcept("REGION", SCHEME, "Region score, most abnormal window of log p(normal|x)")
STANDARD_DEVIATIONS = CodedConcept("{SD}", "UCUM", "standard deviations")


def _local_naive(when: datetime, source: Dataset) -> datetime:
    """The content date/time as the PACS will read it: naive DICOM DA/TM in the study's local time.

    DICOM dates carry no zone; Timezone Offset From UTC would apply to the copied Study Date/Time as
    well, so we do not add one. An aware datetime is moved to the source's declared offset when it has
    one, else to this machine's zone (the daemon runs in the hospital), then the zone is dropped.
    """
    if when.tzinfo is None:
        return when
    offset = str(source.get("TimezoneOffsetFromUTC", "") or "")
    m = re.fullmatch(r"([+-])(\d\d)(\d\d)", offset)
    if m:
        sign = 1 if m.group(1) == "+" else -1
        tz = timezone(sign * timedelta(hours=int(m.group(2)), minutes=int(m.group(3))))
        return when.astimezone(tz).replace(tzinfo=None)
    return when.astimezone().replace(tzinfo=None)


# Type 2 attributes highdicom reads from the first evidence item with attribute access: an image
# header that lacks one (type 2 means "may be empty", not "may be absent", but we see absent too)
# must not crash the report.
_TYPE2_FROM_EVIDENCE = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "ReferringPhysicianName",
)
_VALID_TYPE2 = {
    "PatientSex": re.compile(r"^[MFO]?$"),
    "PatientBirthDate": re.compile(r"^(\d{8})?$"),
    "StudyDate": re.compile(r"^(\d{8})?$"),
    "StudyTime": re.compile(r"^(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?$"),
}


class _NoPatientNameInLogs(logging.Filter):
    """highdicom warns about a PN without a caret ("SMITH", common in real data) by logging the name
    itself; our logs must never carry one, so that record is dropped at the source."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "patient_name" not in str(record.msg)


logging.getLogger("highdicom.base").addFilter(_NoPatientNameInLogs())
# ... and it also issues a UserWarning quoting the name, which would reach stderr (journald); ignored
# around the SR build only (a filter set at import would not survive code that resets the filters).
_PN_WARNING = r"The string .* is unlikely to represent the intended person name"


def _checked_sources(result: ScoreResult, source: Sequence[Dataset]) -> list[Dataset]:
    """Validate the scored series' headers and order them (so the SR does not depend on input order)."""
    if not source:
        raise ReportError(f"study {result.study_uid}: no source instances to reference in the SR")
    seen: set[str] = set()
    for i, ds in enumerate(source):
        for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not str(ds.get(kw, "") or ""):
                raise ReportError(f"study {result.study_uid}: source instance #{i} has no {kw}")
        sop = str(ds.SOPInstanceUID)
        if str(ds.StudyInstanceUID) != result.study_uid:
            raise ReportError(
                f"source instance {sop} belongs to study {ds.StudyInstanceUID}, not the scored study "
                f"{result.study_uid}"
            )
        if str(ds.SeriesInstanceUID) != result.series_uid:
            raise ReportError(
                f"source instance {sop} belongs to series {ds.SeriesInstanceUID}, not the scored series "
                f"{result.series_uid}"
            )
        if sop in seen:
            raise ReportError(f"study {result.study_uid}: source instance {sop} is listed twice")
        seen.add(sop)

    def key(ds: Dataset) -> tuple[int, str]:
        try:
            number = int(ds.get("InstanceNumber", 0) or 0)
        except (TypeError, ValueError):
            number = 0
        return number, str(ds.SOPInstanceUID)

    return sorted(source, key=key)


def _evidence(ordered: list[Dataset]) -> list[Dataset]:
    """The headers highdicom reads. The first is a copy (the caller's header is never modified) in
    which a missing or unusable type 2 patient/study value becomes empty: highdicom would raise on
    PatientSex "FEMALE" or a 4-digit birth date, and one such header must not block the result."""
    first = copy.deepcopy(ordered[0])
    for kw in _TYPE2_FROM_EVIDENCE:
        value = first.get(kw)
        pattern = _VALID_TYPE2.get(kw)
        if kw not in first or (pattern is not None and not pattern.match(dicom_text(value).strip())):
            if kw in first:
                del first[kw]
            setattr(first, kw, None)
    return [first, *ordered[1:]]


def _measurements(result: ScoreResult) -> list[Measurement]:
    uid = result.study_uid
    items = [
        Measurement(LOG_POSTERIOR, finite(result.log_posterior, "log_posterior", uid), NAT),
        Measurement(THRESHOLD, finite(result.threshold, "threshold", uid), NAT),
    ]
    if isinstance(result.percentile, int | float) and math.isfinite(result.percentile):
        # NaN when the model set has no calibration normals: then there is no percentile to report.
        items.append(Measurement(PERCENTILE, float(result.percentile), PERCENT))
    lp0 = finite(result.log_p_normal_model, "log_p_normal_model", uid)
    lp1 = finite(result.log_p_mixture_model, "log_p_mixture_model", uid)
    items.append(Measurement(LOG_P_NORMAL_MODEL, lp0, NAT))
    items.append(Measurement(LOG_P_MIXTURE_MODEL, lp1, NAT))
    return items


_VolumeGroup = VolumetricROIMeasurementsAndQualitativeEvaluations  # TID 1411 (head CT)
_PlanarGroup = PlanarROIMeasurementsAndQualitativeEvaluations  # TID 1410 (a radiograph)


def _region_measurements(result: ScoreResult, key_images: Sequence[Dataset]) -> list[Measurement]:
    """The region's score (referencing the key images), threshold and percentile."""
    uid = result.study_uid
    refs = [SourceImageForMeasurement.from_source_image(ds) for ds in key_images]
    items = [Measurement(REGION_SCORE, finite(result.region_score, "region_score", uid), STANDARD_DEVIATIONS,
                         referenced_images=refs or None)]
    if result.region_threshold is not None and math.isfinite(result.region_threshold):
        items.append(Measurement(THRESHOLD, float(result.region_threshold), STANDARD_DEVIATIONS))
    if result.region_percentile is not None and math.isfinite(result.region_percentile):
        items.append(Measurement(PERCENTILE, float(result.region_percentile), PERCENT))
    return items


def _image_region_group(result: ScoreResult, ordered: list[Dataset], model: ModelSetInfo,
                        sop_instance_uid: str, key_images: Sequence[Dataset]) -> _PlanarGroup | None:
    """TID 1410 group for a radiograph's region: the same measurements as the CT group, the region's
    centre as an SCOORD POINT on the scored image (a projection has no patient point: the radiograph
    form of ``region_center_mm`` is [x, y] mm from the image's top-left corner, so the pixel
    (column, row) is that over the image's pixel spacing). None when the scored image is not among the
    sources."""
    uid = result.study_uid
    image = next((ds for ds in ordered if str(ds.SOPInstanceUID) == result.region_sop_instance_uid), None)
    if image is None or result.region_center_mm is None:
        return None
    dr, dc = radiograph_spacing(image)
    x, y = (finite(v, "region_center_mm", uid) for v in result.region_center_mm)
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_region_tracking(sop_instance_uid, CXR_REGION_TRACKING_IDENTIFIER),
        referenced_region=ImageRegion(
            graphic_type=GraphicTypeValues.POINT, graphic_data=np.asarray([[x / dc, y / dr]], dtype=float),
            source_image=SourceImageForRegion.from_source_image(image),
        ),
        algorithm_id=_algorithm(model),
        finding_sites=[FindingSite(_site(model))],
        measurements=_region_measurements(result, key_images),
        qualitative_evaluations=[_region_call(result)],
    )


def _region_tracking(sop_instance_uid: str, identifier: str) -> TrackingIdentifier:
    """The region group's tracking identifier: a UID derived from the SR's own SOP Instance UID, so the
    same report always names its region the same way (CT volume and radiograph alike)."""
    return TrackingIdentifier(
        uid=generate_uid(prefix=UID_PREFIX, entropy_srcs=["glowtriage-region-tracking", sop_instance_uid]),
        identifier=identifier,
    )


def _region_call(result: ScoreResult) -> QualitativeEvaluation:
    """The region's own normality call."""
    return QualitativeEvaluation(NORMALITY, ABNORMAL if result.region_flagged else NORMAL)


def _region_group(result: ScoreResult, ordered: list[Dataset], model: ModelSetInfo, sop_instance_uid: str,
                  key_images: Sequence[Dataset]) -> _VolumeGroup | _PlanarGroup | None:
    """TID 1411 group for the region: its score, percentile and threshold (the score referencing the
    key images), a SCOORD3D point at its centre in the source's frame of reference, referencing the
    source slice nearest to it, and its own normality call. None without a located region or a
    frame of reference to put the point in. A chest radiograph's region: :func:`_image_region_group`."""
    centre = result.region_center_mm
    if result.region_score is not None and centre is not None and model.kind == "cxr":
        return _image_region_group(result, ordered, model, sop_instance_uid, key_images)
    frame = str(ordered[0].get("FrameOfReferenceUID", "") or "")
    if result.region_score is None or centre is None or not frame:
        return None
    uid = result.study_uid
    nearest = next((ds for ds in ordered if str(ds.SOPInstanceUID) == result.region_sop_instance_uid),
                   ordered[0])
    items = _region_measurements(result, key_images)
    point = [finite(v, "region_center_mm", uid) for v in centre]
    return VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_region_tracking(sop_instance_uid, REGION_TRACKING_IDENTIFIER),
        referenced_volume_surface=VolumeSurface(
            graphic_type="POINT", graphic_data=np.asarray([point], dtype=float), frame_of_reference_uid=frame,
            source_images=[SourceImageForSegmentation.from_source_image(nearest)],
        ),
        algorithm_id=_algorithm(model),
        finding_sites=[FindingSite(_site(model))],
        measurements=items,
        qualitative_evaluations=[_region_call(result)],
    )


def _site(model: ModelSetInfo) -> CodedConcept:
    """The finding site of the set's kind: the head for head CT, the chest for chest radiographs."""
    return PROCEDURE_BY_KIND[model.kind][1]


def _algorithm(model: ModelSetInfo) -> AlgorithmIdentification:
    return AlgorithmIdentification(
        name="glowtriage Glow M0/M1 normality",
        version=model.version,
        parameters=[
            f"preset={model.preset}",
            f"preprocessing={model.preprocessing_version}",
            f"threshold_method={model.threshold_method}",
        ],
        manufacturer=model.manufacturer,
    )


def build_sr(
    result: ScoreResult,
    source: list[Dataset],
    model: ModelSetInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9901,
    instance_number: int = 1,
    content_datetime: datetime | None = None,
    key_images: Sequence[Dataset] = (),
) -> Dataset:
    """A Comprehensive 3D SR (TID 1500 Measurement Report) with the triage result for one study.

    ``source``: the headers (pixels not needed) of every instance of the scored series; they become
    the evidence (Current Requested Procedure Evidence Sequence) and the measurement group's source
    images, and the first one gives the patient and study modules. The algorithm is the device
    observer and a Contributing Equipment item (Processing Equipment) carrying the model set's Device
    UID. Completion COMPLETE, verification UNVERIFIED, preliminary flag PRELIMINARY: a triage aid is
    never the definitive report.

    With a region score (``result.region_*``), a second group (TID 1411) gives the region's score,
    threshold and percentile, a SCOORD3D point at its centre and the source slice nearest to it (a
    chest radiograph: TID 1410, an SCOORD point on the scored image);
    ``key_images`` (``triage.report.keyimages``, same study) are referenced from its score and listed
    in the evidence.

    Same inputs and UIDs -> same bytes: ``content_datetime`` (default: now, which is not
    reproducible) stands in for every date/time highdicom would otherwise take from the clock.
    """
    check_uid(series_instance_uid, "series_instance_uid")
    check_uid(sop_instance_uid, "sop_instance_uid")
    check_uid(model.device_uid, "model.device_uid")
    ordered = _checked_sources(result, source)
    if series_instance_uid == result.series_uid:
        raise ReportError(f"study {result.study_uid}: the SR needs its own series, got the source's UID")
    if content_datetime is None:
        content_datetime = datetime.now()
    when = _local_naive(content_datetime, ordered[0])

    group = _triage_group(result, ordered, model, sop_instance_uid)
    region = _region_group(result, ordered, model, sop_instance_uid, key_images)
    report = MeasurementReport(
        observation_context=_observation_context(model),
        procedure_reported=PROCEDURE_BY_KIND[model.kind][0],
        imaging_measurements=[group, *([region] if region is not None else [])],
    )
    equipment = _equipment(result, model, when)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_PN_WARNING, category=UserWarning)
            sr = Comprehensive3DSR(
                evidence=[*_evidence(ordered), *key_images],
                content=report,
                series_instance_uid=series_instance_uid,
                series_number=series_number,
                sop_instance_uid=sop_instance_uid,
                instance_number=instance_number,
                manufacturer=model.manufacturer,
                is_complete=True,
                is_final=False,
                is_verified=False,
                contributing_equipment=[equipment],
                series_description=SERIES_DESCRIPTION,
                manufacturer_model_name=model.model_name,
                software_versions=[model.software_version, model.version],
                device_serial_number=model.version,
                content_date=when.date(),
                content_time=when.time(),
                series_date=when.date(),
                series_time=when.time(),
                coding_schemes=[
                    CodingSchemeIdentificationItem(
                        designator=SCHEME,
                        name="glowtriage local codes",
                        responsible_organization=model.manufacturer,
                    )
                ],
            )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ReportError(f"study {result.study_uid}: cannot build the SR: {exc}") from None
    _pin_clock(sr, model, when)
    return sr


def _observation_context(model: ModelSetInfo) -> ObservationContext:
    """The algorithm as the device observer (TID 1004), identified by the model set's Device UID."""
    device = DeviceObserverIdentifyingAttributes(
        uid=model.device_uid,
        name="glowtriage",
        manufacturer_name=model.manufacturer,
        model_name=model.model_name,
        serial_number=model.version,
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.cid270.Device, observer_identifying_attributes=device
        )
    )


def _triage_group(result: ScoreResult, ordered: list[Dataset], model: ModelSetInfo,
                  sop_instance_uid: str) -> MeasurementsAndQualitativeEvaluations:
    """The whole-study group: the scores, the normal/abnormal finding and every source image."""
    finding = ABNORMAL if result.flagged else NORMAL
    try:
        sources = [SourceImageForMeasurementGroup.from_source_image(ds) for ds in ordered]
    except (ValueError, AttributeError) as exc:
        raise ReportError(
            f"study {result.study_uid}: a source instance is not an image header: {exc}"
        ) from None
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            # derived, not random: the tracking UID is part of the bytes that must repeat
            uid=generate_uid(prefix=UID_PREFIX, entropy_srcs=["glowtriage-tracking", sop_instance_uid]),
            identifier=TRACKING_IDENTIFIER,
        ),
        algorithm_id=_algorithm(model),
        finding_sites=[FindingSite(_site(model))],
        measurements=_measurements(result),
        qualitative_evaluations=[QualitativeEvaluation(NORMALITY, finding)],
        source_images=sources,
    )


def _equipment(result: ScoreResult, model: ModelSetInfo, when: datetime) -> ContributingEquipment:
    """Contributing Equipment (Processing Equipment) carrying the model set's Device UID."""
    equipment = ContributingEquipment(
        manufacturer=model.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,  # DCM 109102, CID 7005
        manufacturer_model_name=model.model_name,
        software_versions=[model.software_version, model.version],
        device_serial_number=model.version,
        contribution_datetime=when,
        contribution_description=(  # ST, at most 1024 characters; assembly warnings (issue 11) appended
            "Normality score of the source series (AI triage aid, not a diagnosis)"
            + ("; assembly warnings: " + "; ".join(result.warnings) if result.warnings else "")
        )[:1024],
    )
    equipment.DeviceUID = model.device_uid  # type 3 in the current SOP Common module (see report)
    return equipment


def _pin_clock(sr: Dataset, model: ModelSetInfo, when: datetime) -> None:
    """highdicom stamps these with datetime.now(); pin them so a rebuilt SR is byte-identical."""
    sr.DeviceUID = model.device_uid  # General Equipment: this SR's "device" is the model set
    sr.InstanceCreationDate = DA(when.date())
    sr.InstanceCreationTime = TM(when.time())
    for item in sr.ContributingEquipmentSequence:
        if item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = DT(when)
