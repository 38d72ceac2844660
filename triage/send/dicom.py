"""DICOM C-STORE SCU: SRs and routed source series to a PACS or a reading station (pynetdicom).

Target notation in the outbox: ``AE@host:port`` (the called AE title, then where it listens); our
calling AE title and the network timeout come from the live config ([pacs] calling_ae_title,
[dicom] network_timeout), so changing them applies to rows already waiting.
"""

from __future__ import annotations

from pydicom import dcmread
from pynetdicom import AE

from triage.config import Config
from triage.send.base import Delivery, Destination, SendError, register, split_host_port

__all__ = ["DicomStoreDestination"]

# Success (0000) and the warnings that still mean "stored" (B000 coercion, B006 elements discarded,
# B007 data set does not match SOP class: stored anyway).
_STORED = (0x0000, 0xB000, 0xB007, 0xB006)


@register
class DicomStoreDestination(Destination):
    """C-STORE SCU to a PACS or reading station (pynetdicom)."""

    kind = "dicom"
    payloads = frozenset({"sr", "source"})

    def __init__(self, name: str, ae_title: str, host: str, port: int, calling_ae_title: str,
                 timeout_s: float = 30.0):
        self.name = name
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.calling_ae_title = calling_ae_title
        self.timeout_s = timeout_s

    @classmethod
    def from_target(cls, name: str, target: str, cfg: Config) -> DicomStoreDestination:
        # rpartition: an AE title may contain "@" (printable ASCII), a host name may not
        ae, _, hostport = target.rpartition("@")
        host, port = split_host_port(hostport, name)
        s = cfg.settings
        return cls(name, ae, host, port, s.pacs.calling_ae_title, timeout_s=s.dicom.network_timeout)

    def send(self, delivery: Delivery) -> str:
        datasets = [dcmread(p) for p in delivery.files]
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        # Propose every (SOP class, transfer syntax) pair we are about to send, as stored.
        pairs = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
        for sop_class, ts in pairs[:128]:
            ae.add_requested_context(sop_class, ts)
        assoc = ae.associate(self.host, self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            raise SendError(f"{self.name}: association with {self.ae_title}@{self.host}:{self.port} failed")
        try:
            for ds, path in zip(datasets, delivery.files, strict=True):
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None:
                    raise SendError(f"{self.name}: no C-STORE response for {ds.SOPInstanceUID} ({path.name})")
                if code not in _STORED:
                    raise SendError(f"{self.name}: C-STORE of {ds.SOPInstanceUID} answered 0x{code:04X}")
        finally:
            assoc.release()
        return f"{len(datasets)} instance(s) stored"
