"""triage.model.labels (the one labels.csv reader) and triage.assemble.patient (the one patient key), and
that every reader of labels (training's data, evaluation, ``models create``) now gives the same answer."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from training.data.volumes import DataError
from training.data.volumes import read_labels as data_labels
from training.evaluate.inputs import EvaluationInputError, load_labels
from triage.assemble.patient import is_study_key, patient_key, patient_key_of_file, quiet_validation
from triage.model.labels import Label, LabelsError, read_labels
from triage.model.modelset import read_labels as models_labels
from triage.model.registry import RegistryError

ROWS = [("1.2.1", "normal", ""), ("1.2.2", "abnormal", "hemorrhage"), ("1.2.3", "Abnormal ", "infarct")]
WANT = {"1.2.1": Label("normal", ""), "1.2.2": Label("abnormal", "hemorrhage"),
        "1.2.3": Label("abnormal", "infarct")}


def write(path: Path, text: str, *, bom: bool = False, crlf: bool = False) -> Path:
    if crlf:
        text = text.replace("\n", "\r\n")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def csv_text(extra: bool = False) -> str:
    head = "study_uid,label,lesion" + (",scanner,note" if extra else "")
    rows = [",".join([u, lab, les] + (["GE", "x"] if extra else [])) for u, lab, les in ROWS]
    return "\n".join([head, *rows, ""])


def test_bom_crlf_spaces_and_extra_columns_read_the_same(tmp_path: Path) -> None:
    plain = read_labels(write(tmp_path / "plain.csv", csv_text()))
    assert plain == WANT and list(plain) == ["1.2.1", "1.2.2", "1.2.3"]
    assert plain["1.2.2"].abnormal and not plain["1.2.1"].abnormal
    label, lesion = plain["1.2.2"]  # still a (label, lesion) pair for the callers that unpack it
    assert (label, lesion) == ("abnormal", "hemorrhage")
    variants = {
        "bom": write(tmp_path / "bom.csv", csv_text(), bom=True),
        "crlf": write(tmp_path / "crlf.csv", csv_text(), crlf=True),
        "bom+crlf+extra": write(tmp_path / "x.csv", csv_text(extra=True), bom=True, crlf=True),
        "spaces": write(tmp_path / "sp.csv", " study_uid , label ,lesion\n\n 1.2.1 , NORMAL ,\n"
                        "1.2.2,abnormal, hemorrhage \n,,\n1.2.3,abnormal,infarct\n"),
        "no lesion column": write(tmp_path / "nl.csv", "label,study_uid\nnormal,1.2.1\n"),
    }
    for name, path in variants.items():
        got = read_labels(path)
        if name == "no lesion column":
            assert got == {"1.2.1": Label("normal", "")}, name
        else:
            assert got == WANT, name


def test_every_reader_gives_the_same_labels_with_or_without_bom(tmp_path: Path) -> None:
    """Training's data, evaluation and ``models create`` used to disagree on a BOM; now one reader."""
    for bom in (False, True):
        path = write(tmp_path / f"labels{bom}.csv", csv_text(), bom=bom, crlf=bom)
        assert read_labels(path) == data_labels(path) == load_labels(path) == models_labels(path) == WANT


@pytest.mark.parametrize(("text", "match"), [
    ("uid,diagnosis\n1.2.3,normal\n", r"bad\.csv:1: header must contain study_uid,label"),
    ("study_uid,label\n1.2.1,normal\n,abnormal\n", r"bad\.csv:3: empty study_uid"),
    ("study_uid,label\n1.2.1,normal\n1.2.2,sick\n", r"bad\.csv:3: study 1\.2\.2: label 'sick' is not"),
    ("study_uid,label\n1.2.1,normal\n1.2.2,\n", r"bad\.csv:3: study 1\.2\.2: label '' is not"),
    ("study_uid,label\n1.2.1,normal\n\n1.2.1,abnormal\n", r"bad\.csv:4: study 1\.2\.1 is labelled twice "
                                                          r"\(first on line 2\)"),
    ("study_uid,label\n1.2.1,\"normal\n", r"bad\.csv:\d+: .*"),
])
def test_bad_rows_name_the_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(LabelsError, match=match):
        read_labels(path)
    # each caller reports it as its own error, with the same message
    for reader, err in ((data_labels, DataError), (load_labels, EvaluationInputError),
                        (models_labels, RegistryError)):
        with pytest.raises(err, match=match):
            reader(path)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(LabelsError, match=r"missing\.csv: cannot read labels file"):
        read_labels(tmp_path / "missing.csv")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("study_uid,label,lesion\n1.2.1,normal,\n1.2.2,abnormal,h\xe9morragie\n".encode("latin-1"))
    with pytest.raises(LabelsError, match=r"latin1\.csv:\d+: not UTF-8"):
        read_labels(latin1)


def test_patient_key_is_salted_sha256_of_issuer_and_id() -> None:
    k = patient_key("PID001", "HOSP-A")
    assert len(k) == 64 and int(k, 16) >= 0 and "PID001" not in k
    assert patient_key(" PID001 ", "HOSP-A ") == k  # DICOM pads values; padding is not identity
    assert patient_key("PID001", "HOSP-B") != k  # the same number at another issuer: another person
    assert patient_key("PID002", "HOSP-A") != k
    import hashlib

    assert k != hashlib.sha256(b"HOSP-A\0PID001").hexdigest()  # salted
    s = patient_key("", "HOSP-A", study_uid="1.2.3")
    assert is_study_key(s) and not is_study_key(k) and s == patient_key(None, study_uid="1.2.3")
    assert s != patient_key("", study_uid="1.2.4")
    with pytest.raises(ValueError, match="no PatientID and no study UID"):
        patient_key("  ")


def test_patient_key_of_file(tmp_path: Path) -> None:
    def dicom(name: str, **tags: str) -> Path:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"
        for k, v in tags.items():
            setattr(ds, k, v)
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        return path

    with_issuer = dicom("a.dcm", PatientID="PID001", IssuerOfPatientID="HOSP-A")
    assert patient_key_of_file(with_issuer) == patient_key("PID001", "HOSP-A")
    assert pydicom.dcmread(with_issuer).PatientID == "PID001"  # (the file really holds it)
    assert patient_key_of_file(dicom("b.dcm", PatientID="PID001")) == patient_key("PID001", "")
    no_id = dicom("c.dcm")
    assert patient_key_of_file(no_id) is None
    assert patient_key_of_file(no_id, "1.2.9") == patient_key("", study_uid="1.2.9")
    assert patient_key_of_file(tmp_path / "gone.dcm", "1.2.9") is None  # cannot tell: the caller decides


def test_quiet_validation_keeps_pydicom_from_quoting_patient_values(tmp_path: Path, caplog, recwarn) -> None:
    """pydicom's validation messages quote a bad value (``Invalid value for VR DA: '19501301'``, seen here
    when such a value is written); inside quiet_validation validation is off, nothing is said, and the
    setting is restored after, so offline readers cannot put a birth date or name on stderr or a log."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3", "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    before = pydicom.config.settings.writing_validation_mode
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        ds.PatientBirthDate, ds.PatientAge, ds.PatientID = "19501301", "SECRETAGE", "SECRET-PID"
        ds.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    finally:
        pydicom.config.settings.writing_validation_mode = before
    secrets = ("19501301", "SECRETAGE")
    mode = pydicom.config.settings.reading_validation_mode
    caplog.set_level("DEBUG")
    caplog.clear()
    recwarn.clear()

    def said() -> str:
        return " ".join([r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn])

    with quiet_validation():
        assert pydicom.config.settings.reading_validation_mode == pydicom.config.IGNORE
        back = pydicom.dcmread(tmp_path / "bad.dcm")
        assert (back.PatientBirthDate, back.PatientAge) == secrets
    assert pydicom.config.settings.reading_validation_mode == mode  # restored
    assert patient_key_of_file(tmp_path / "bad.dcm") == patient_key("SECRET-PID")
    assert pydicom.config.settings.reading_validation_mode == mode
    assert not any(s in said() for s in (*secrets, "SECRET"))
