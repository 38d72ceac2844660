"""What ``state.db`` holds: the schema migrations, the state names, and the rows read back from it.

Why its own module: the schema is the one contract every stage shares (and the one thing an upgrade
must never break), so its history reads in one place, apart from the code that moves rows around.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# Writes one payload into an open binary file (an instance, an SR, an HL7 message).
BinaryWriter = Callable[[IO[bytes]], None]

# Study states (DESIGN.md): receiving -> stable -> assembled -> scored -> reported -> sent,
# or rejected(reason) / failed(reason, attempts).
STUDY_STATES = ("receiving", "stable", "assembled", "scored", "reported", "sent", "rejected", "failed")
# Series states: the assembler claims a quiet series (receiving -> stable) and settles it.
SERIES_STATES = ("receiving", "stable", "assembled", "skipped", "rejected", "failed")

# Schema migrations: index i upgrades user_version i to i + 1. Append, never edit a shipped entry.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE instances (
        sop_uid          TEXT PRIMARY KEY,
        study_uid        TEXT NOT NULL,
        series_uid       TEXT NOT NULL,
        sop_class_uid    TEXT NOT NULL,
        transfer_syntax  TEXT NOT NULL,
        path             TEXT NOT NULL,
        size             INTEGER NOT NULL,
        sha256           TEXT NOT NULL,
        calling_aet      TEXT NOT NULL,
        received_at      REAL NOT NULL
    );
    CREATE INDEX instances_series ON instances(series_uid);
    CREATE INDEX instances_study ON instances(study_uid);
    CREATE TABLE series (
        series_uid           TEXT PRIMARY KEY,
        study_uid            TEXT NOT NULL,
        modality             TEXT NOT NULL DEFAULT '',
        first_received_at    REAL NOT NULL,
        last_received_at     REAL NOT NULL,
        opened_at            REAL NOT NULL,
        instance_count       INTEGER NOT NULL DEFAULT 0,
        state                TEXT NOT NULL,
        reason               TEXT,
        assembly_generation  INTEGER NOT NULL DEFAULT 0,
        updated_at           REAL NOT NULL
    );
    CREATE INDEX series_study ON series(study_uid);
    CREATE INDEX series_state ON series(state, last_received_at);
    CREATE TABLE studies (
        study_uid   TEXT PRIMARY KEY,
        state       TEXT NOT NULL,
        reason      TEXT,
        attempts    INTEGER NOT NULL DEFAULT 0,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    );
    CREATE INDEX studies_state ON studies(state);
    CREATE INDEX studies_updated ON studies(updated_at);
    CREATE TABLE events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        at          REAL NOT NULL,
        study_uid   TEXT,
        series_uid  TEXT,
        sop_uid     TEXT,
        kind        TEXT NOT NULL,
        from_state  TEXT,
        to_state    TEXT,
        reason      TEXT,
        generation  INTEGER
    );
    CREATE INDEX events_study ON events(study_uid, id);
    CREATE TABLE quarantine (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        path         TEXT NOT NULL,
        reason       TEXT NOT NULL,
        calling_aet  TEXT NOT NULL,
        hint         TEXT NOT NULL,
        at           REAL NOT NULL
    );
    """,
    """
    CREATE TABLE assemblies (
        study_uid    TEXT PRIMARY KEY,
        series_uid   TEXT NOT NULL,
        generation   INTEGER NOT NULL,
        volume_path  TEXT NOT NULL,
        complete_at  REAL NOT NULL,
        warnings     TEXT NOT NULL DEFAULT '[]',
        created_at   REAL NOT NULL
    );
    CREATE TABLE scores (
        study_uid    TEXT PRIMARY KEY,
        generation   INTEGER NOT NULL,
        result       TEXT NOT NULL,
        scored_at    REAL NOT NULL
    );
    CREATE TABLE outbox (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        study_uid        TEXT NOT NULL,
        generation       INTEGER NOT NULL,
        kind             TEXT NOT NULL,
        destination      TEXT NOT NULL,
        target           TEXT NOT NULL,
        files            TEXT NOT NULL,
        dedupe           TEXT NOT NULL UNIQUE,
        state            TEXT NOT NULL DEFAULT 'pending',
        attempts         INTEGER NOT NULL DEFAULT 0,
        next_attempt_at  REAL NOT NULL,
        last_error       TEXT,
        ack              TEXT,
        created_at       REAL NOT NULL,
        sent_at          REAL
    );
    CREATE INDEX outbox_due ON outbox(state, next_attempt_at);
    CREATE INDEX outbox_study ON outbox(study_uid);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(Exception):
    """A request the store refuses (unsafe UID, unknown state); the message names what and why."""


@dataclass(frozen=True)
class PutResult:
    duplicate: bool  # the same SOP Instance UID with the same dataset bytes was already stored
    path: Path
    replaced: bool = False  # same SOP Instance UID, different bytes: the newer copy replaced the old
    size: int = 0  # bytes of the stored file
    reopened: bool = False  # the instance re-opened a series that had already left `receiving`


@dataclass(frozen=True)
class InstanceRow:
    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    size: int
    sha256: str
    calling_aet: str
    received_at: float


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    modality: str
    first_received_at: float
    last_received_at: float
    opened_at: float  # when the current generation began receiving (force_s counts from here)
    instance_count: int
    state: str
    reason: str | None
    assembly_generation: int


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    state: str
    reason: str | None
    attempts: int
    created_at: float
    updated_at: float
    instances: int


@dataclass(frozen=True)
class EventRow:
    at: float
    study_uid: str | None
    series_uid: str | None
    sop_uid: str | None
    kind: str
    from_state: str | None
    to_state: str | None
    reason: str | None
    generation: int | None


@dataclass
class IndexJob:
    """One instance's rows waiting for a group commit (``Store._commit_index``)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    done: bool = False
    reopened: bool = False
    error: BaseException | None = None


@dataclass(frozen=True)
class AssemblyRow:
    study_uid: str
    series_uid: str
    generation: int
    volume_path: Path
    complete_at: float  # when the series was found complete: the start of the end-to-end latency
    warnings: list[str]


@dataclass(frozen=True)
class OutboxRow:
    id: int
    study_uid: str
    generation: int
    kind: str  # "dicom" | "hl7"
    destination: str  # name for logs/metrics: "PACS", "RIS", a routing rule
    target: str  # "AE@host:port"
    files: list[Path]
    state: str  # pending | sent | dead
    attempts: int
    next_attempt_at: float
    last_error: str | None
    ack: str | None


@dataclass(frozen=True)
class RecoveryReport:
    tmp_removed: int
    reindexed: int
    quarantined: int
    missing_files: int
    released_claims: int = 0  # series a dead process had claimed for assembly, back to receiving


# ----------------------------------------------------------------------------- sqlite3.Row -> rows
def series_row(r: sqlite3.Row) -> SeriesRow:
    return SeriesRow(
        r["series_uid"], r["study_uid"], r["modality"], r["first_received_at"], r["last_received_at"],
        r["opened_at"], int(r["instance_count"]), r["state"], r["reason"], int(r["assembly_generation"]),
    )


def instance_row(r: sqlite3.Row) -> InstanceRow:
    return InstanceRow(
        r["sop_uid"], r["study_uid"], r["series_uid"], r["sop_class_uid"], r["transfer_syntax"],
        Path(r["path"]), int(r["size"]), r["sha256"], r["calling_aet"], r["received_at"],
    )


def study_row(r: sqlite3.Row) -> StudyRow:
    return StudyRow(
        r["study_uid"], r["state"], r["reason"], int(r["attempts"]), r["created_at"], r["updated_at"],
        int(r["instances"]),
    )


def event_row(r: sqlite3.Row) -> EventRow:
    return EventRow(r["at"], r["study_uid"], r["series_uid"], r["sop_uid"], r["kind"], r["from_state"],
                    r["to_state"], r["reason"], r["generation"])


def outbox_row(r: sqlite3.Row) -> OutboxRow:
    return OutboxRow(
        int(r["id"]), r["study_uid"], int(r["generation"]), r["kind"], r["destination"], r["target"],
        [Path(p) for p in json.loads(r["files"])], r["state"], int(r["attempts"]),
        float(r["next_attempt_at"]), r["last_error"], r["ack"],
    )
