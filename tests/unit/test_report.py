"""triage.report: the SR's content and identity (sr), the ORU^R01's fields and escaping, ACK parsing
(hl7), routes (routes)."""

from __future__ import annotations

import io
import logging
import math
import random
import warnings
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime

import hl7
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from triage.config import DicomWebRule, HL7Settings, PacsSettings, RouteRule, RoutingSettings
from triage.model.results import ModelSetInfo, ScoreResult
from triage.report.codes import ReportError, summary_text
from triage.report.hl7 import build_oru, hl7_escape, parse_ack
from triage.report.routes import Route, plan_routes
from triage.report.sr import COMPREHENSIVE_3D_SR, build_sr

WHEN = datetime(2024, 1, 2, 11, 0, 0)


def ct_headers(n: int = 3, study: str | None = None, series: str | None = None) -> list[Dataset]:
    """Headers of a small axial CT series (what the pipeline reads with stop_before_pixels)."""
    study, series, frame = study or generate_uid(), series or generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyDate, ds.StudyTime = "20240102", "101500"
        ds.AccessionNumber = "ACC123"
        ds.Modality = "CT"
        ds.Manufacturer, ds.ManufacturerModelName = "ACME", "Scanner 1"
        ds.ReferringPhysicianName = "REF^DOC"
        ds.StudyDescription, ds.SeriesDescription = "CT HEAD", "AXIAL BRAIN"
        ds.PatientName, ds.PatientID = "DOE^JANE^Q^DR^PHD", "PID001"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "S1", 2, i + 1
        ds.ImagePositionPatient = [-100.0, -100.0, 5.0 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 5.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        out.append(ds)
    return out


def model_info() -> ModelSetInfo:
    return ModelSetInfo(version="20240101-0000-ab12cd", device_uid=generate_uid(), preset="cpu-small",
                        preprocessing_version="pp1", threshold=-3.5, threshold_method="youden")


def score(source: list[Dataset], flagged: bool = True, percentile: float = 1.5) -> ScoreResult:
    lp0, lp1 = (-1000.5, -990.25) if flagged else (-980.125, -981.0)
    return ScoreResult(study_uid=str(source[0].StudyInstanceUID), series_uid=str(source[0].SeriesInstanceUID),
                       log_p_normal_model=lp0, log_p_mixture_model=lp1, log_posterior=lp0 - lp1,
                       threshold=-3.5, flagged=flagged, percentile=percentile,
                       model_version="20240101-0000-ab12cd")


def make_sr(source: list[Dataset], result: ScoreResult, model: ModelSetInfo, **kw) -> Dataset:
    args = {"series_instance_uid": "1.2.3.4.100", "sop_instance_uid": "1.2.3.4.100.1",
            "content_datetime": WHEN}
    return build_sr(result, source, model, **(args | kw))


def walk(items) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def by_concept(sr: Dataset, code: str) -> list[Dataset]:
    return [i for i in walk(sr.ContentSequence) if i.ConceptNameCodeSequence[0].CodeValue == code]


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ SR
def test_sr_identity_patient_and_study_come_from_the_source() -> None:
    src, model = ct_headers(), model_info()
    sr = make_sr(src, score(src), model)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.file_meta.MediaStorageSOPClassUID == COMPREHENSIVE_3D_SR
    assert (sr.SOPInstanceUID, sr.SeriesInstanceUID) == ("1.2.3.4.100.1", "1.2.3.4.100")
    assert sr.SeriesInstanceUID != src[0].SeriesInstanceUID and sr.Modality == "SR"
    assert sr.SeriesNumber == 9901 and sr.InstanceNumber == 1
    for kw in ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
               "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDate", "StudyTime",
               "StudyDescription"):
        assert sr[kw].value == src[0][kw].value, kw
    assert "not a diagnosis" in sr.SeriesDescription
    assert (sr.Manufacturer, sr.ManufacturerModelName) == (model.manufacturer, model.model_name)
    assert list(sr.SoftwareVersions) == [model.software_version, model.version]
    assert sr.DeviceUID == model.device_uid
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED",
                                                                            "PRELIMINARY")
    assert (str(sr.ContentDate), str(sr.ContentTime)) == ("20240102", "110000")
    assert (str(sr.InstanceCreationDate), str(sr.InstanceCreationTime)) == ("20240102", "110000")
    root = sr.ContentTemplateSequence[0]
    assert (root.MappingResource, root.TemplateIdentifier) == ("DCMR", "1500")


@pytest.mark.parametrize(("flagged", "code", "meaning"), [(True, "263654008", "Abnormal"),
                                                          (False, "17621005", "Normal")])
def test_finding_follows_the_flag(flagged: bool, code: str, meaning: str) -> None:
    src = ct_headers()
    sr = make_sr(src, score(src, flagged=flagged), model_info())
    (item,) = by_concept(sr, "121402")  # DCM Normality
    assert item.ValueType == "CODE"
    concept = item.ConceptCodeSequence[0]
    assert (concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning) == (code, "SCT", meaning)


def test_numeric_values_are_the_results_exactly() -> None:
    src = ct_headers()
    res = replace(score(src), log_posterior=-10.123456789012345, log_p_normal_model=-1000.987654321)
    sr = make_sr(src, res, model_info())
    expected = {"LOGPOST": (res.log_posterior, "{nat}"), "122411": (res.threshold, "{nat}"),
                "121415": (res.percentile, "%"), "LOGPXN": (res.log_p_normal_model, "{nat}"),
                "LOGPX": (res.log_p_mixture_model, "{nat}")}
    for code, (value, unit) in expected.items():
        (item,) = by_concept(sr, code)
        mv = item.MeasuredValueSequence[0]
        assert mv.FloatingPointValue == value, code  # full precision, not only the 16-char DS
        assert math.isclose(float(mv.NumericValue), value, rel_tol=1e-9), code
        assert mv.MeasurementUnitsCodeSequence[0].CodeValue == unit
    # the private codes are declared, as PS3.16 asks of a private coding scheme
    assert [i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence] == ["99GLOWTRIAGE"]


def test_percentile_left_out_when_there_are_no_calibration_normals() -> None:
    src = ct_headers()
    sr = make_sr(src, score(src, percentile=float("nan")), model_info())
    assert by_concept(sr, "121415") == [] and len(by_concept(sr, "LOGPOST")) == 1


def test_evidence_and_source_images_list_every_source_instance() -> None:
    src = ct_headers(5)
    sr = make_sr(src, score(src), model_info())
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == src[0].StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == src[0].SeriesInstanceUID
    refs = {(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in series.ReferencedSOPSequence}
    assert refs == {(CTImageStorage, ds.SOPInstanceUID) for ds in src}
    images = [i for i in walk(sr.ContentSequence) if i.ValueType == "IMAGE"]
    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images} == {d.SOPInstanceUID
                                                                                      for d in src}


def test_algorithm_is_device_observer_and_contributing_equipment() -> None:
    src, model = ct_headers(), model_info()
    sr = make_sr(src, score(src), model)
    (observer,) = by_concept(sr, "121012")  # Device Observer UID
    assert model.device_uid == observer.UID
    (serial,) = by_concept(sr, "121016")  # Device Observer Serial Number
    assert serial.TextValue == model.version
    ours = [i for i in sr.ContributingEquipmentSequence if i.get("DeviceUID") == model.device_uid]
    assert len(ours) == 1
    purpose = ours[0].PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")  # Processing Equipment
    assert (ours[0].Manufacturer, ours[0].ManufacturerModelName) == (model.manufacturer, model.model_name)
    assert model.version in list(ours[0].SoftwareVersions)


def test_roundtrip_and_byte_identical_rebuild() -> None:
    src, model = ct_headers(4), model_info()
    res = score(src)
    first = to_bytes(make_sr(src, res, model))
    shuffled = src[:]
    random.Random(3).shuffle(shuffled)
    assert shuffled != src
    assert to_bytes(make_sr(shuffled, res, model)) == first  # re-send == same bytes, whatever the order
    back = dcmread(io.BytesIO(first))
    assert back.SOPClassUID == COMPREHENSIVE_3D_SR and back.StudyInstanceUID == src[0].StudyInstanceUID
    (item,) = by_concept(back, "LOGPOST")
    assert item.MeasuredValueSequence[0].FloatingPointValue == res.log_posterior
    other = to_bytes(make_sr(src, res, model, sop_instance_uid="1.2.3.4.100.2"))
    assert other != first


def test_aware_content_time_is_written_in_the_studys_zone() -> None:
    src = ct_headers()
    for ds in src:
        ds.TimezoneOffsetFromUTC = "+0100"
    sr = make_sr(src, score(src), model_info(), content_datetime=datetime(2024, 1, 2, 23, 30, tzinfo=UTC))
    assert (str(sr.ContentDate), str(sr.ContentTime)) == ("20240103", "003000")


def test_sparse_source_headers_still_give_a_report() -> None:
    src = ct_headers(2)
    for ds in src:
        for kw in ("AccessionNumber", "ReferringPhysicianName", "StudyID"):
            delattr(ds, kw)
    sr = make_sr(src, score(src), model_info())
    assert sr.AccessionNumber in ("", None) and sr.PatientID == "PID001"
    assert "AccessionNumber" not in src[0]  # the caller's headers are not modified


def test_unusable_patient_values_become_empty_and_names_stay_out_of_logs(caplog, monkeypatch) -> None:
    import pydicom.config

    # pydicom's default, which a Daemon built earlier in the same process turns off for good
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.WARN)
    src = ct_headers(2)
    src[0].PatientSex, src[0].PatientName = "FEMALE", "SMITHERSON"
    with pytest.warns(UserWarning, match="Invalid value for VR DA"):  # pydicom's, on assignment
        src[0].PatientBirthDate = "1970"
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        sr = make_sr(src, score(src), model_info())
    assert (sr.PatientSex, sr.PatientBirthDate) in {("", ""), (None, None)}
    assert sr.PatientName == "SMITHERSON"  # a caret-less name is legal DICOM: kept
    assert (src[0].PatientSex, src[0].PatientBirthDate) == ("FEMALE", "1970")  # caller's header untouched
    assert "SMITHERSON" not in caplog.text
    assert not [w for w in caught if "SMITHERSON" in str(w.message)]  # stderr would reach journald too


def test_bad_input_is_a_clear_error() -> None:
    src, model = ct_headers(), model_info()
    res = score(src)
    with pytest.raises(ReportError, match="no source instances"):
        make_sr([], res, model)
    stranger = ct_headers(1)[0]
    with pytest.raises(ReportError, match=f"{stranger.SOPInstanceUID}.*not the scored study"):
        make_sr([*src, stranger], res, model)
    with pytest.raises(ReportError, match="listed twice"):
        make_sr([*src, src[0]], res, model)
    with pytest.raises(ReportError, match="log_posterior is not finite"):
        make_sr(src, replace(res, log_posterior=float("-inf")), model)
    with pytest.raises(ReportError, match="sop_instance_uid is not a valid DICOM UID"):
        make_sr(src, res, model, sop_instance_uid="1.2.abc")
    with pytest.raises(ReportError, match="its own series"):
        make_sr(src, res, model, series_instance_uid=res.series_uid)


def test_summary_text_has_verdict_and_score_but_no_patient_data() -> None:
    src = ct_headers()
    text = summary_text(score(src))
    assert "probably abnormal" in text and "-10.250" in text and "not a diagnosis" in text
    assert "no triage flag" in summary_text(score(src, flagged=False))
    for phi in ("DOE", "PID001", "19700101", "ACC123"):
        assert phi not in text


# ------------------------------------------------------------------------------------------ HL7
def oru(flagged: bool = True, source: Dataset | None = None, **settings) -> tuple[hl7.Message, str]:
    src = ct_headers(1) if source is None else [source]
    res = score(src, flagged=flagged)
    raw = build_oru(res, src[0], model_info(), HL7Settings(**settings), control_id="CTRL42",
                    when=datetime(2024, 1, 2, 11, 0, tzinfo=UTC))
    return hl7.parse(raw), raw


def test_oru_header_patient_and_order() -> None:
    msg, raw = oru(sending_application="GT", receiving_facility="GENERAL")
    assert "\n" not in raw and raw.endswith("\r")
    assert [str(s[0]) for s in msg] == ["MSH", "PID", "ORC", "OBR", "TQ1", "OBX", "OBX", "OBX", "OBX", "OBX",
                                        "OBX"]
    msh = msg.segment("MSH")
    assert (str(msh[3]), str(msh[6]), str(msh[9]), str(msh[10]), str(msh[11]), str(msh[12])) == (
        "GT", "GENERAL", "ORU^R01^ORU_R01", "CTRL42", "P", "2.5")
    assert str(msh[7]) == "20240102110000+0000"
    assert msg["PID.F3.R1.C1"] == "PID001"
    assert (msg["PID.F5.R1.C1"], msg["PID.F5.R1.C2"], msg["PID.F5.R1.C4"], msg["PID.F5.R1.C5"]) == (
        "DOE", "JANE", "PHD", "DR")  # DICOM prefix^suffix -> HL7 suffix^prefix
    assert (str(msg.segment("PID")[7]), str(msg.segment("PID")[8])) == ("19700101", "F")
    obr = msg.segment("OBR")
    assert (str(obr[2]), str(obr[3]), str(obr[25])) == ("ACC123", "ACC123", "F")
    assert str(obr[7]) == "20240102101500"  # observation time: when the study was imaged
    assert msg["OBR.F4.R1.C1"] == "24725-4" and msg["OBR.F4.R1.C5"] == "CT HEAD"


@pytest.mark.parametrize(("flagged", "priority", "flag"), [(True, "S", "A"), (False, "R", "N")])
def test_oru_priority_and_abnormal_flag(flagged: bool, priority: str, flag: str) -> None:
    msg, _ = oru(flagged=flagged)
    assert str(msg.segment("OBR")[5]) == priority
    assert msg["TQ1.F9.R1.C1"] == priority
    obx = msg.segments("OBX")
    assert str(obx[0][8]) == flag
    assert ("probably abnormal" in msg.unescape(str(obx[1][5]))) is flagged


def test_oru_observation_values() -> None:
    src = ct_headers(1)
    res = score(src)
    msg, _ = oru(source=src[0])
    obx = {str(s[3][0][0]): s for s in msg.segments("OBX")}
    post = obx["LOGPOST"]
    assert str(post[2]) == "NM" and abs(float(str(post[5])) - res.log_posterior) < 1e-4
    assert str(post[6][0][0]) == "{nat}" and str(post[11]) == "F"
    assert str(post[7]) == ">-3.5000"  # reference range: normal above the threshold
    assert float(str(obx["122411"][5])) == res.threshold
    assert float(str(obx["121415"][5])) == pytest.approx(res.percentile)
    assert str(obx["113014"][5]) == res.study_uid and str(obx["113015"][5]) == res.series_uid
    assert msg.unescape(str(obx["TRIAGE"][5])) == summary_text(res)  # '|' in "p(normal|x)" survives


def test_oru_escapes_delimiters_in_free_text() -> None:
    src = ct_headers(1)[0]
    src.StudyDescription = "CT HEAD | W/O ^CONTRAST & ~FAST\\X"
    src.PatientName = "O'NEIL|X^ANN&MARIE"
    msg, raw = oru(source=src)
    assert raw.count("\r") == 11  # no segment was split or added by the text
    assert msg["OBR.F4.R1.C5"] == "CT HEAD | W/O ^CONTRAST & ~FAST\\X"
    assert (msg["PID.F5.R1.C1"], msg["PID.F5.R1.C2"]) == ("O'NEIL|X", "ANN&MARIE")
    assert str(msg.segment("OBR")[5]) == "S"  # fields after the text are where they belong


def test_hl7_escape() -> None:
    assert hl7_escape("a|b^c&d~e\\f") == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f"
    assert hl7_escape("line1\r\nline2") == "line1 line2"
    assert hl7_escape("Müller") == "Müller"
    assert hl7_escape(None) == ""


def test_oru_rejects_a_bad_control_id() -> None:
    src = ct_headers(1)
    with pytest.raises(ReportError, match="control id"):
        build_oru(score(src), src[0], model_info(), HL7Settings(), control_id="A|B", when=WHEN)
    with pytest.raises(ReportError, match="control id"):
        build_oru(score(src), src[0], model_info(), HL7Settings(), control_id="X" * 21, when=WHEN)


# ------------------------------------------------------------------------------------------ ACK
def test_parse_ack() -> None:
    head = "MSH|^~\\&|RIS|HOSPITAL|GLOWTRIAGE|RADIOLOGY|20240102110001||ACK^R01^ACK|9|P|2.5\r"
    assert parse_ack(head + "MSA|AA|CTRL42\r") == (True, "AA")
    assert parse_ack("\x0b" + head + "MSA|CA|CTRL42|queued\r\x1c\r") == (True, "queued")
    assert parse_ack(head + "MSA|AE|CTRL42|unknown patient \\F\\ id\r") == (False, "unknown patient | id")
    assert parse_ack(head + "MSA|AR|CTRL42\rERR||||E||||no such order\r") == (False, "no such order")
    assert parse_ack(head + "MSA|AA|OTHER\r", control_id="CTRL42")[0] is False
    assert parse_ack(head + "MSA|AA|CTRL42\r", control_id="CTRL42") == (True, "AA")
    assert parse_ack("")[0] is False
    assert parse_ack("garbage without segments")[0] is False
    assert parse_ack(head)[0] is False  # no MSA


# -------------------------------------------------------------------------------------- routing
RULES = [
    RouteRule(name="stat-reading", when="flagged", send="source", ae_title="STAT", host="10.0.0.5", port=104),
    RouteRule(name="archive-normals", when="normal", send="sr", ae_title="ARCH", host="10.0.0.6", port=104),
    RouteRule(name="mirror", when="always", send="sr", ae_title="MIRROR", host="10.0.0.7", port=11112),
]


def test_routes_for_flagged_and_normal() -> None:
    routing, pacs, hl7s = RoutingSettings(rules=RULES), PacsSettings(), HL7Settings()
    src = ct_headers(1)
    flagged = plan_routes(score(src, flagged=True), routing, pacs, hl7s)
    assert flagged == [
        Route("sr", "dicom", "PACS", "PACS@127.0.0.1:4242"),
        Route("source", "dicom", "stat-reading", "STAT@10.0.0.5:104"),
        Route("sr", "dicom", "mirror", "MIRROR@10.0.0.7:11112"),
        Route("oru", "hl7", "HL7", "@127.0.0.1:2575"),
    ]
    normal = plan_routes(score(src, flagged=False), routing, pacs, hl7s)
    assert [r.destination for r in normal] == ["PACS", "archive-normals", "mirror", "HL7"]
    assert (normal[1].payload, normal[1].kind) == ("sr", "dicom")


def test_a_dicomweb_rule_routes_by_its_kind_to_its_url() -> None:
    cloud = DicomWebRule(name="cloud", kind="dicomweb", when="flagged", send="sr",
                         url="https://archive.example.org/dicom-web/", token="secret")
    mirror = RouteRule(name="mirror", when="always", send="sr", ae_title="MIRROR", host="10.0.0.7", port=104)
    routing = RoutingSettings(rules=[cloud, mirror])
    src = ct_headers(1)
    flagged = plan_routes(score(src, flagged=True), routing, PacsSettings(), HL7Settings(enabled=False))
    assert flagged == [
        Route("sr", "dicom", "PACS", "PACS@127.0.0.1:4242"),
        Route("sr", "dicomweb", "cloud", "https://archive.example.org/dicom-web"),  # no token in it
        Route("sr", "dicom", "mirror", "MIRROR@10.0.0.7:104"),
    ]
    normal = plan_routes(score(src, flagged=False), routing, PacsSettings(), HL7Settings(enabled=False))
    assert [r.destination for r in normal] == ["PACS", "mirror"]


def test_routes_follow_switches_and_skip_duplicates() -> None:
    src = ct_headers(1)
    res = score(src)
    off = HL7Settings(enabled=False)
    assert plan_routes(res, RoutingSettings(sr_to_pacs=False), PacsSettings(), off) == []
    same_as_pacs = RouteRule(name="again", when="always", send="sr", ae_title="PACS", host="127.0.0.1",
                             port=4242)
    routes = plan_routes(res, RoutingSettings(rules=[same_as_pacs]), PacsSettings(), off)
    assert routes == [Route("sr", "dicom", "PACS", "PACS@127.0.0.1:4242")]
    with pytest.raises(AttributeError):
        routes[0].target = "X@h:1"  # type: ignore[misc]
