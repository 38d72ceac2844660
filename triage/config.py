"""config.toml -> typed, validated settings.

Why pydantic rather than plain dataclasses: hospital IT edits this file by hand, and a typo must stop
the daemon with the key, the file and what was expected, never start it with a silently ignored key.
pydantic gives strict type checks, range constraints and ``extra="forbid"`` (unknown keys) with a
location path for every error, which we render as one line per error.

Every section has embedded defaults, so ``triage serve`` runs with no file at all; the shipped
``config.toml`` documents every key with those same defaults. Relative paths resolve against the
folder of the config file (or the working directory when there is none).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_VAR = "GLOWTRIAGE_CONFIG"

AETitle = Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[\x20-\x5b\x5d-\x7e]*[^ ]$")]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TLSSettings(_Section):
    """Optional TLS for the DICOM listener (DICOM PS3.15 B.1 secure transport)."""

    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""  # when set, peers must present a certificate signed by it
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSSettings:
        if self.enabled and (not self.cert_file or not self.key_file):
            raise ValueError("cert_file and key_file are required when enabled = true")
        if self.require_client_cert and not self.ca_file:
            raise ValueError("ca_file is required when require_client_cert = true")
        return self


class DicomSettings(_Section):
    """The DICOM listener (SCP) that PACS forwards studies to."""

    ae_title: AETitle = "GLOWTRIAGE"
    host: str = "0.0.0.0"
    port: Port = 11112
    allowed_calling_aets: list[str] = Field(default_factory=list)  # empty: any calling AE title
    allowed_peers: list[str] = Field(default_factory=list)  # IPs or CIDRs; empty: any address
    require_called_aet: bool = True  # reject associations addressed to another AE title
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 16
    acse_timeout: Seconds = 30.0
    dimse_timeout: Seconds = 60.0
    network_timeout: Seconds = 60.0
    maximum_pdu_size: Annotated[int, Field(ge=0)] = 0  # 0: unlimited (pynetdicom's convention)
    tls: TLSSettings = Field(default_factory=TLSSettings)

    @field_validator("host")
    @classmethod
    def _host_is_address(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError as exc:
            raise ValueError(f"expected an IP address to listen on, got {v!r}") from exc
        return v

    @field_validator("allowed_peers")
    @classmethod
    def _peers_are_networks(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"expected IP addresses or CIDR networks, got {item!r}") from exc
        return v


class StorageSettings(_Section):
    """Where the spool, the database, the volumes and the model sets live."""

    root: str = "var"
    min_free_mb: Annotated[int, Field(ge=0)] = 2048  # below this, C-STORE answers out-of-resources
    retention_days: Annotated[int, Field(ge=0)] = 30  # 0 keeps everything


class AssemblySettings(_Section):
    """When a series is complete, which series of a study is scored, and how the volume is built."""

    quiet_seconds: Seconds = 10.0  # a series with no new instance for this long is complete
    force_seconds: Seconds = 300.0  # assemble anyway this long after the first instance
    modalities: list[str] = Field(default_factory=lambda: ["CT"])
    required_image_type: list[str] = Field(default_factory=lambda: ["ORIGINAL", "PRIMARY", "AXIAL"])
    rejected_image_type: list[str] = Field(default_factory=lambda: ["LOCALIZER", "DERIVED", "SECONDARY"])
    head_patterns: list[str] = Field(
        default_factory=lambda: ["HEAD", "BRAIN", "SKULL", "CRANI", "NEURO", "KOPF", "SCHAEDEL"]
    )
    min_slice_thickness_mm: Annotated[float, Field(gt=0)] = 2.0
    max_slice_thickness_mm: Annotated[float, Field(gt=0)] = 6.0
    soft_kernel_patterns: list[str] = Field(
        default_factory=lambda: [
            "STANDARD", "SOFT", "BRAIN", "H3", "J3", "J4", "H4", "FC2", "FC6", "UB", "UC"
        ]
    )
    sharp_kernel_patterns: list[str] = Field(
        default_factory=lambda: ["BONE", "H6", "H7", "H8", "J7", "FC3", "FC8", "YC", "EDGE", "LUNG"]
    )
    min_coverage_mm: Annotated[float, Field(gt=0)] = 90.0
    max_tilt_deg: Annotated[float, Field(ge=0, le=45)] = 30.0
    interpolate_gaps: bool = False  # true: a missing slice is interpolated instead of rejecting
    max_gap_slices: Annotated[int, Field(ge=1)] = 1  # the most consecutive missing slices interpolated

    @model_validator(mode="after")
    def _thickness_range(self) -> AssemblySettings:
        if self.min_slice_thickness_mm > self.max_slice_thickness_mm:
            raise ValueError("min_slice_thickness_mm must not exceed max_slice_thickness_mm")
        return self


class ScoringSettings(_Section):
    """Scoring with the current model set."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: Annotated[int, Field(ge=1, le=64)] = 4
    threads: Annotated[int, Field(ge=0)] = 0  # CPU threads for torch; 0: torch's default


class PacsSettings(_Section):
    """Where Structured Reports go by default."""

    ae_title: AETitle = "PACS"
    host: str = "127.0.0.1"
    port: Port = 4242
    calling_ae_title: AETitle = "GLOWTRIAGE"


class HL7Settings(_Section):
    """The RIS/worklist that takes ORU^R01 priority flags."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 2575
    sending_application: str = "GLOWTRIAGE"
    sending_facility: str = "RADIOLOGY"
    receiving_application: str = "RIS"
    receiving_facility: str = "HOSPITAL"
    timeout: Seconds = 10.0


class RouteRule(_Section):
    """One routing rule: what to send where, and when."""

    name: Annotated[str, Field(min_length=1)]
    when: Literal["flagged", "always", "normal"] = "flagged"
    send: Literal["source", "sr"] = "source"
    ae_title: AETitle
    host: str
    port: Port


class RoutingSettings(_Section):
    """Auto-routing: for example, flagged studies' source series to a STAT reading AE."""

    sr_to_pacs: bool = True
    rules: list[RouteRule] = Field(default_factory=list)


class OutboxSettings(_Section):
    """Durable delivery: retries with exponential back-off, then dead letters."""

    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 20
    backoff_initial_s: Seconds = 2.0
    backoff_max_s: Seconds = 600.0
    poll_s: Seconds = 1.0


class MetricsSettings(_Section):
    """Prometheus /metrics endpoint."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 9464


class LoggingSettings(_Section):
    """structlog JSON lines on stdout (journald keeps them)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"  # auto: console on a TTY, JSON otherwise


class RetrainSettings(_Section):
    """The nightly M1 retrain on the unlabeled archive."""

    enabled: bool = False
    cron: str = "30 2 * * *"  # minute hour day month day-of-week, local time
    window_days: Annotated[int, Field(ge=1)] = 90
    min_volumes: Annotated[int, Field(ge=2)] = 50
    warm_start: bool = True
    steps: Annotated[int, Field(ge=1)] = 2000
    nice: Annotated[int, Field(ge=0, le=19)] = 10
    gate_nll_margin_bpd: Annotated[float, Field(ge=0)] = 0.02
    gate_score_shift_sd: Annotated[float, Field(ge=0)] = 1.0
    holdout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1

    @field_validator("cron")
    @classmethod
    def _cron_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"expected 5 cron fields (minute hour day month day-of-week), got {v!r}")
        return v


class Settings(_Section):
    """The whole config.toml."""

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    assembly: AssemblySettings = Field(default_factory=AssemblySettings)
    scoring: ScoringSettings = Field(default_factory=ScoringSettings)
    pacs: PacsSettings = Field(default_factory=PacsSettings)
    hl7: HL7Settings = Field(default_factory=HL7Settings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)


@dataclass(frozen=True)
class Config:
    """Validated settings plus where they came from (so paths resolve against the file's folder)."""

    settings: Settings
    source: Path | None  # None: embedded defaults
    base_dir: Path

    def path(self, value: str) -> Path:
        """Resolve a configured path: absolute stays, relative is taken from the config's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def storage_root(self) -> Path:
        return self.path(self.settings.storage.root)

    @property
    def models_dir(self) -> Path:
        return self.storage_root / "models"


class ConfigError(Exception):
    """Raised with one line per problem; each line names the file and the key."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


def _loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _describe(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key (not a glowtriage setting; check the spelling against the shipped config.toml)"
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    if kind not in ("value_error", "assertion_error") and "input" in err:
        msg += f" (got {err['input']!r})"
    return msg


def parse(data: dict[str, Any], source: Path | None) -> Config:
    """Validate an already-parsed TOML document."""
    where = str(source) if source else "<embedded defaults>"
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        lines = [f"{where}: {_loc(e['loc'])}: {_describe(e)}" for e in exc.errors()]
        raise ConfigError(lines) from None
    base = source.parent.resolve() if source else Path.cwd()
    return Config(settings=settings, source=source, base_dir=base)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate config.toml: explicit path, else $GLOWTRIAGE_CONFIG, else embedded defaults."""
    if path is None:
        path = os.environ.get(ENV_VAR) or None
    if path is None:
        return parse({}, None)
    source = Path(path)
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read config file: {exc.strerror or exc}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 text at byte {exc.start}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: TOML syntax error: {exc}"]) from None
    return parse(data, source)
