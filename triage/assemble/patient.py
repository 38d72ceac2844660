"""One patient key: a salted SHA-256 of (IssuerOfPatientID, PatientID), the only form in which a patient
is kept, compared or logged by anything that splits studies by patient.

Why one key: the training split (``training.data.volumes.split_by_patient``) and the nightly retrain's
hold-out (``training.train.retrain``) both keep one patient's studies on one side. They used to hash
different things (PatientID alone, and issuer + PatientID) with different salts, so two studies could
be one patient to one of them and two to the other. Both now call :func:`patient_key` (directly, or
through :func:`patient_key_of_file`), and the hold-out and the split agree on who is one patient.

The salt is not a secret (it is in the source); it keeps these keys from matching a plain SHA-256 of an
ID computed elsewhere. The raw PatientID is read, hashed and dropped inside this module; it is never
returned, stored or logged. A study without a PatientID is its own patient (``study:`` + a hash of its
study UID): one unknown patient must not merge with every other unknown one.

Lives under :mod:`triage.assemble` (it reads one DICOM header, like the rest of assembly) so that
triage and training can both use it; triage never imports training.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pydicom
import pydicom.config

SALT = b"glowtriage-patient-key-v2\0"
STUDY_PREFIX = "study:"


def patient_key(patient_id: str | None, issuer: str | None = "", *, study_uid: str | None = None) -> str:
    """Salted SHA-256 hex of issuer + PatientID (both stripped); ``study:<hash>`` of ``study_uid`` when the
    PatientID is empty. ValueError when neither is given: there is nothing to key on."""
    pid = (patient_id or "").strip()
    if pid:
        iss = (issuer or "").strip()
        return hashlib.sha256(SALT + f"{iss}\0{pid}".encode()).hexdigest()
    if not study_uid:
        raise ValueError("patient_key: no PatientID and no study UID to key on")
    return STUDY_PREFIX + hashlib.sha256(SALT + b"study\0" + study_uid.strip().encode()).hexdigest()


def is_study_key(key: str) -> bool:
    """True when ``key`` stands for a study whose patient is unknown (no PatientID)."""
    return key.startswith(STUDY_PREFIX)


@contextmanager
def quiet_validation() -> Iterator[None]:
    """Read DICOM without pydicom's value validation for the duration, then restore the setting.

    Why: in its default mode pydicom warns *and logs* every invalid value it converts, quoting it
    (``Invalid value for VR DA: '19501301'``), so a malformed birth date or name would land on an offline
    command's stderr or in a log. The daemon switches validation off for its whole process
    (``triage.daemon``); offline readers (training's data, this module) use this around their reads. It
    validates nothing we rely on: assembly checks what it uses itself."""
    settings = pydicom.config.settings
    before = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode = before


def patient_key_of_file(path: str | os.PathLike[str], study_uid: str | None = None) -> str | None:
    """The patient key of one DICOM file's header (PatientID and IssuerOfPatientID only, no pixels).

    ``None`` when the file cannot be read (gone to retention, damaged): the caller decides whether to try
    another instance or fall back to the study. A readable file without a PatientID gives the study's key
    when ``study_uid`` is given, else ``None``."""
    try:
        with quiet_validation():
            ds = pydicom.dcmread(os.fspath(path), stop_before_pixels=True, force=True,
                                 specific_tags=["PatientID", "IssuerOfPatientID"])
            pid = str(ds.get("PatientID", "") or "")
            issuer = str(ds.get("IssuerOfPatientID", "") or "")
    except Exception:  # any unreadable header means "this file cannot tell"; never echo its content
        return None
    if not pid.strip():
        return patient_key("", study_uid=study_uid) if study_uid else None
    return patient_key(pid, issuer)
