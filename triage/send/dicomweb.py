"""DICOMweb STOW-RS: SRs and routed source series to an archive over HTTP (``dicomweb-client``).

A POST of a multipart/related application/dicom body to ``{url}/studies`` (PS3.18 10.5) per
:data:`BATCH` instances of a delivery. Delivered means HTTP 2xx for every batch and no instance in a
response's Failed SOP Sequence; a warning
(Referenced SOP Sequence item with a Warning Reason, HTTP 202 with all stored) still counts as stored,
as C-STORE's B0xx statuses do.

Target notation in the outbox: the URL alone. Credentials (basic or bearer), the timeout and the TLS
settings stay in the routing rule of config.toml and are looked up by the rule's name and URL when the
row is sent, so no secret is written to the database, and a credential is never sent to a URL it was
not configured for (a rule whose URL changed while rows waited sends them without one).

Retries belong to the outbox: dicomweb-client's own retry loop (up to 5 tries with waits on 408/429/
503/504) is switched off, so one outbox attempt is one HTTP request and the back-off schedule is the
store's. Every failure, an HTTP error status included, is a :class:`SendError` and retried like the
other kinds; the outbox has no notion of a permanent failure (a C-STORE refusal is retried too), so
after ``outbox.max_attempts`` it is a dead letter, with the status and failure reasons in its error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset

from triage.config import Config, DicomWebRule
from triage.send.base import Delivery, Destination, SendError, register

__all__ = ["BATCH", "DicomWebDestination"]

# Instances per STOW-RS request: a routed source series (hundreds of slices) is posted in batches, so
# neither it nor its multipart body is held in memory whole. A failed batch fails the attempt; the
# retry posts every batch again, which a server takes as duplicates of the same SOP Instance UIDs.
BATCH = 32

# dicomweb-client logs one INFO line per request ("store instances"), which the outbox's own
# outbox_sent / outbox_retry events already say; keep its warnings and errors only.
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)


def _failures(body: Dataset) -> list[str]:
    """``SOP-UID: 0xCODE`` for each item of a STOW-RS response's Failed SOP Sequence (UIDs and
    numeric reasons only: a server's free text could quote patient data)."""
    out = []
    for item in body.get("FailedSOPSequence", []) or []:
        reason = item.get("FailureReason")
        code = f"0x{int(reason):04X}" if isinstance(reason, int) else "no reason given"
        out.append(f"{item.get('ReferencedSOPInstanceUID', '?')}: {code}")
    return out


def _error_body(response: requests.Response | None) -> list[str]:
    """Failure reasons from an error response's DICOM JSON body, when it has one."""
    if response is None or "json" not in response.headers.get("Content-Type", ""):
        return []
    try:
        return _failures(Dataset.from_json(response.json()))
    except (ValueError, TypeError, KeyError, AttributeError):
        return []


@register
class DicomWebDestination(Destination):
    """STOW-RS client to a DICOMweb server (a VNA, a cloud archive, Orthanc's DICOMweb plug-in)."""

    kind = "dicomweb"
    payloads = frozenset({"sr", "source"})

    def __init__(
        self,
        name: str,
        url: str,
        *,
        username: str = "",
        password: str = "",
        token: str = "",
        timeout_s: float = 30.0,
        verify: bool | str = True,
    ):
        self.name = name
        self.url = url.rstrip("/")
        self.username = username
        self.password = password
        self.token = token
        self.timeout_s = timeout_s
        self.verify = verify  # requests' verify: True, False or a CA bundle path

    @classmethod
    def from_target(cls, name: str, target: str, cfg: Config) -> DicomWebDestination:
        for rule in cfg.settings.routing.rules:
            if isinstance(rule, DicomWebRule) and rule.name == name and rule.url == target:
                verify: bool | str = rule.verify_tls
                if rule.verify_tls and rule.ca_file:
                    verify = str(cfg.path(rule.ca_file))
                return cls(name, target, username=rule.username, password=rule.password,
                           token=rule.token, timeout_s=rule.timeout_s, verify=verify)
        return cls(name, target)  # the rule is gone or points elsewhere now: no credentials

    def _client(self, session: requests.Session) -> DICOMwebClient:
        session.verify = self.verify
        if self.username:
            session.auth = (self.username, self.password)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            client = DICOMwebClient(self.url, session=session, headers=headers, timeout=self.timeout_s)
        except ValueError as exc:
            raise SendError(f"{self.name}: {self.url} is not a DICOMweb URL: {exc}") from None
        client.set_http_retry_params(retry=False)  # one outbox attempt = one request (see module doc)
        return client

    def send(self, delivery: Delivery) -> str:
        files = list(delivery.files)
        where = f"{self.name}: STOW-RS to {self.url}"
        warned = 0
        with requests.Session() as session:
            client = self._client(session)
            for start in range(0, len(files), BATCH):
                datasets = [dcmread(p) for p in files[start : start + BATCH]]
                warned += _check(_store(client, datasets, where), datasets, where)
        note = f", {warned} with a warning" if warned else ""
        return f"{len(files)} instance(s) stored over STOW-RS{note}"


def _store(client: DICOMwebClient, datasets: Sequence[Dataset], where: str) -> Dataset:
    """One STOW-RS request; every way it can fail is a SendError saying how."""
    try:
        return client.store_instances(datasets)
    except requests.HTTPError as exc:
        response = exc.response
        status = str(exc) if response is None else f"HTTP {response.status_code} {response.reason}"
        failed = _error_body(response)
        detail = f"; failed: {', '.join(failed[:5])}" if failed else ""
        raise SendError(f"{where} answered {status}{detail}") from None
    except requests.RequestException as exc:
        # connection refused, DNS, TLS, timeout: the class name says which, the URL says where
        raise SendError(f"{where}: {type(exc).__name__}: {exc}") from None
    except (ValueError, KeyError) as exc:  # a 2xx whose body is not DICOM JSON/XML
        raise SendError(f"{where}: unreadable response: {exc}") from None


def _check(body: Dataset, datasets: Sequence[Dataset], where: str) -> int:
    """Every instance stored (none in the Failed SOP Sequence, all listed when the server lists any);
    returns how many were stored with a warning."""
    sent = [str(ds.SOPInstanceUID) for ds in datasets]
    failed = _failures(body)
    if failed:
        shown = ", ".join(failed[:5])
        raise SendError(f"{where}: {len(failed)} of {len(sent)} instance(s) refused: {shown}")
    stored = list(body.get("ReferencedSOPSequence", []) or [])
    referenced = {str(i.get("ReferencedSOPInstanceUID", "")) for i in stored}
    if referenced and not set(sent) <= referenced:
        missing = sorted(set(sent) - referenced)
        raise SendError(f"{where}: response does not list {len(missing)} instance(s), e.g. {missing[0]}")
    return sum(1 for i in stored if i.get("WarningReason") is not None)
