"""Delivery of results: a durable outbox drained by destination kinds behind one small interface.

Every SR, HL7 message and routed series is first a row in the store's outbox (with its payload file
already on disk), then sent, acknowledged, and marked sent. A failure is retried with exponential
back-off (the next attempt time is stored, so the schedule survives restarts); after the configured
attempts the row is dead-lettered: logged, counted, kept, never silently dropped. A re-send uses the
same payload file, so a PACS sees the same SOP Instance UID (a duplicate, not a second report).

Destination kinds are plug-ins: each is one module of this package (:mod:`triage.send.dicom` C-STORE,
:mod:`triage.send.mllp` HL7 MLLP, :mod:`triage.send.dicomweb` STOW-RS) whose :class:`Destination`
subclass is entered in :data:`KINDS` by :func:`register`; the package imports every module in it, so
adding a kind is one new module plus its config section, and nothing that delivers (the outbox
drain, the report stage) names a kind. An outbox row stores the kind and a target string in the kind's
own notation; :func:`make_destination` turns the two back into a destination with the live config.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

from triage.config import Config

__all__ = [
    "KINDS",
    "Delivery",
    "Destination",
    "SendError",
    "UnknownDestinationKind",
    "backoff_delay",
    "destination_class",
    "make_destination",
    "register",
]


class SendError(Exception):
    """A delivery attempt failed; the message says where and why (never patient data)."""


class UnknownDestinationKind(SendError):
    """No destination module handles this kind. A SendError, so an outbox row naming a kind this
    version does not know (written by a newer one, or a removed plug-in) is retried and finally
    dead-lettered with this message instead of stopping the drain loop."""


@dataclass(frozen=True)
class Delivery:
    """What the outbox hands to a destination: the payload files of one outbox row."""

    outbox_id: int
    kind: str  # a key of KINDS: "dicom", "hl7", "dicomweb"
    destination: str  # a name for logs and metrics: "PACS", "HL7", a routing rule's name
    files: Sequence[Path]


class Destination(ABC):
    """One peer results are delivered to; a subclass per kind, entered in :data:`KINDS`.

    What the outbox needs and nothing more: build one from an outbox row (``from_target``) and
    ``send`` a delivery, returning an acknowledgement text or raising :class:`SendError`. The outbox
    owns retries, back-off and dead letters, so a destination makes exactly one attempt per call.
    """

    #: the outbox's name for this kind (the ``kind`` column, ``kind = ...`` in a routing rule)
    kind: ClassVar[str]
    #: which payloads (:data:`triage.report.routes.Payload`) this kind can carry
    payloads: ClassVar[frozenset[str]]

    name: str

    @classmethod
    @abstractmethod
    def from_target(cls, name: str, target: str, cfg: Config) -> Destination:
        """The destination for an outbox row: its ``destination`` name and ``target`` (in this
        kind's notation, as the config section's ``target`` wrote it), plus the live config for what
        the row does not store (timeouts, our AE title, credentials)."""

    @abstractmethod
    def send(self, delivery: Delivery) -> str:
        """Deliver once and return a short acknowledgement text; raise SendError on any failure."""


#: kind -> Destination subclass; filled by :func:`register` when the package imports the kind modules
KINDS: dict[str, type[Destination]] = {}

D = TypeVar("D", bound=type[Destination])


def register(cls: D) -> D:
    """Class decorator: enter a Destination subclass in :data:`KINDS` under its ``kind``."""
    kind = getattr(cls, "kind", "")
    if not kind or not isinstance(kind, str):
        raise TypeError(f"{cls.__name__} has no kind to register under")
    old = KINDS.get(kind)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        # a reloaded module may register its class again; two modules claiming one kind is a mistake
        raise TypeError(f"destination kind {kind!r} is claimed by {old.__module__} and {cls.__module__}")
    KINDS[kind] = cls
    return cls


def destination_class(kind: str) -> type[Destination]:
    """The class registered for ``kind``; :class:`UnknownDestinationKind` naming the known ones."""
    try:
        return KINDS[kind]
    except KeyError:
        known = ", ".join(sorted(KINDS)) or "none"
        raise UnknownDestinationKind(
            f"unknown destination kind {kind!r} (known kinds: {known}; each is a module of triage/send/)"
        ) from None


def make_destination(kind: str, name: str, target: str, cfg: Config) -> Destination:
    """The destination an outbox row of ``kind`` is delivered through (see Destination.from_target)."""
    return destination_class(kind).from_target(name, target, cfg)


def split_host_port(target: str, what: str) -> tuple[str, int]:
    """``host:port`` (an IPv6 host keeps its colons: the port is after the last one) -> (host, port)."""
    host, _, port = target.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = 0
    if not host or not 1 <= number <= 65535:
        raise SendError(f"{what}: target {target!r} is not host:port")
    return host, number


def backoff_delay(
    attempts: int, initial_s: float, max_s: float, rng: Callable[[], float] = random.random
) -> float:
    """Seconds before attempt ``attempts + 1``: initial * 2**(attempts-1), capped, with 10% jitter.

    Jitter keeps many waiting results from hammering a PACS in lock-step when it comes back.
    """
    base = min(max_s, initial_s * (2 ** max(0, attempts - 1)))
    return base * (0.9 + 0.2 * rng())
