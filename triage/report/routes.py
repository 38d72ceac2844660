"""Where a study's results go: the SR to the PACS, the routing rules' deliveries, the ORU to the RIS.

A pure function of the score and the settings (no I/O), so the plan can be tested without peers and
redone after a crash with the same outcome; the pipeline turns each route into an outbox row.

A route says what to send (the payload) and how and where (a destination kind and a target string in
that kind's notation, both taken from the config section); it never looks at the kind, so a new
destination kind needs nothing here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

from triage.config import HL7Settings, PacsSettings, RoutingSettings
from triage.model.results import ScoreResult

__all__ = ["Payload", "Route", "plan_routes"]

#: what a route carries: the Structured Report, the scored source series, or the HL7 ORU^R01
Payload = Literal["sr", "source", "oru"]


@dataclass(frozen=True)
class Route:
    """One delivery to plan: what (``payload``), by which destination kind (a key of
    ``triage.send.base.KINDS``), a stable name for metrics/outbox (``destination``), and where
    (``target``, in the kind's notation: ``AE@host:port`` for C-STORE, a URL for STOW-RS)."""

    payload: Payload
    kind: str
    destination: str
    target: str


class _Peer(Protocol):
    """A config section that names a destination: its kind and its target."""

    @property
    def kind(self) -> str: ...

    @property
    def target(self) -> str: ...


def _route(payload: Payload, name: str, peer: _Peer) -> Route:
    return Route(payload, peer.kind, name, peer.target)


def _matches(when: str, flagged: bool) -> bool:
    return when == "always" or (when == "flagged") == flagged


def _dedupe(routes: Iterable[Route]) -> list[Route]:
    """The same payload to the same peer twice is waste (and a second C-STORE of the same SR); keep
    the first, in plan order: the PACS SR, then rules in config order, then HL7."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for r in routes:
        key = (r.payload, r.kind, r.target)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def plan_routes(
    result: ScoreResult, settings: RoutingSettings, pacs: PacsSettings, hl7: HL7Settings
) -> list[Route]:
    """Where this study's results go: the SR to the PACS (``routing.sr_to_pacs``), each rule whose
    ``when`` matches (flagged / normal / always) with its ``send`` (source series or SR) by the rule's
    ``kind``, and the ORU to the RIS when ``hl7.enabled``."""
    routes: list[Route] = []
    if settings.sr_to_pacs:
        routes.append(_route("sr", "PACS", pacs))
    for rule in settings.rules:
        if _matches(rule.when, result.flagged):
            routes.append(_route(rule.send, rule.name, rule))
    if hl7.enabled:
        routes.append(_route("oru", "HL7", hl7))
    return _dedupe(routes)
