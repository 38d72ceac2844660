"""Where a study's results go: the SR to the PACS, the routing rules' deliveries, the ORU to the RIS.

A pure function of the score and the settings (no I/O), so the plan can be tested without peers and
redone after a crash with the same outcome; the pipeline turns each route into an outbox row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from triage.config import HL7Settings, PacsSettings, RoutingSettings
from triage.model.results import ScoreResult

__all__ = ["Route", "plan_routes"]

RouteKind = Literal["dicom-sr", "dicom-source", "hl7"]


@dataclass(frozen=True)
class Route:
    """One delivery to plan: what (``kind``), a stable name for metrics/outbox (``destination``),
    and where. ``ae_title`` is empty for HL7 (MLLP has no AE titles)."""

    kind: RouteKind
    destination: str
    ae_title: str
    host: str
    port: int


def _matches(when: str, flagged: bool) -> bool:
    return when == "always" or (when == "flagged") == flagged


def _dedupe(routes: Iterable[Route]) -> list[Route]:
    """The same payload to the same peer twice is waste (and a second C-STORE of the same SR); keep
    the first, in plan order: the PACS SR, then rules in config order, then HL7."""
    seen: set[tuple[str, str, str, int]] = set()
    out = []
    for r in routes:
        key = (r.kind, r.ae_title, r.host, r.port)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def plan_routes(
    result: ScoreResult, settings: RoutingSettings, pacs: PacsSettings, hl7: HL7Settings
) -> list[Route]:
    """Where this study's results go: the SR to the PACS (``routing.sr_to_pacs``), each rule whose
    ``when`` matches (flagged / normal / always) with its ``send`` (source series or SR), and the ORU to
    the RIS when ``hl7.enabled``."""
    routes: list[Route] = []
    if settings.sr_to_pacs:
        routes.append(Route("dicom-sr", "PACS", pacs.ae_title, pacs.host, pacs.port))
    for rule in settings.rules:
        if _matches(rule.when, result.flagged):
            kind: RouteKind = "dicom-source" if rule.send == "source" else "dicom-sr"
            routes.append(Route(kind, rule.name, rule.ae_title, rule.host, rule.port))
    if hl7.enabled:
        routes.append(Route("hl7", "HL7", "", hl7.host, hl7.port))
    return _dedupe(routes)
