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
import itertools
import os
import re
import ssl
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_VAR = "GLOWTRIAGE_CONFIG"


class FieldProblem(ValueError):
    """A cross-field check's error, pinned to the key to change (pydantic would name only the section)."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(message)


def _ae_title(v: str) -> str:
    # DICOM PS3.5 table 6.2-1 (AE): 1-16 characters of the default repertoire, no backslash, no
    # control characters; leading/trailing spaces are insignificant to peers, so they only confuse.
    if not 1 <= len(v) <= 16:
        raise ValueError(f"expected an AE title of 1 to 16 characters, got {len(v)} characters ({v!r})")
    if any(c == "\\" or not " " <= c <= "~" for c in v):
        raise ValueError(f"expected an AE title of printable ASCII without backslash, got {v!r}")
    if v != v.strip():
        raise ValueError(f"expected an AE title without leading or trailing spaces, got {v!r}")
    return v


def _ip_address(v: str) -> str:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        raise ValueError(f"expected an IP address to listen on (0.0.0.0, 127.0.0.1, ::), got {v!r}") from None
    return v


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")


def _peer_host(v: str) -> str:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        if not _HOSTNAME.match(v) or v.replace(".", "").isdigit():
            raise ValueError(f"expected an IP address or a DNS host name, got {v!r}") from None
    return v


AETitle = Annotated[str, AfterValidator(_ae_title)]
ListenHost = Annotated[str, AfterValidator(_ip_address)]  # an address of this machine to bind
PeerHost = Annotated[str, AfterValidator(_peer_host)]  # a peer to connect to: IP or DNS name
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class TLSSettings(_Section):
    """Optional TLS for the DICOM listener (DICOM PS3.15 B.1 secure transport)."""

    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""  # when set, a client certificate (if presented) must be signed by it
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSSettings:
        if self.enabled and not self.cert_file:
            raise FieldProblem("cert_file", "required when enabled = true (PEM certificate of this AE)")
        if self.enabled and not self.key_file:
            raise FieldProblem("key_file", "required when enabled = true (PEM private key of cert_file)")
        if self.require_client_cert and not self.ca_file:
            raise FieldProblem("ca_file", "required when require_client_cert = true (PEM CA of the peers)")
        return self


class DicomSettings(_Section):
    """The DICOM listener (SCP) that PACS forwards studies to."""

    ae_title: AETitle = "GLOWTRIAGE"
    host: ListenHost = "0.0.0.0"
    port: Port = 11112
    allowed_calling_aets: list[AETitle] = Field(default_factory=list)  # empty: any calling AE title
    allowed_peers: list[str] = Field(default_factory=list)  # IPs or CIDRs; empty: any address
    require_called_aet: bool = True  # reject associations addressed to another AE title
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 16
    acse_timeout: Seconds = 30.0
    dimse_timeout: Seconds = 60.0
    network_timeout: Seconds = 60.0
    # PS3.8 ARTIM: seconds from accept to a complete A-ASSOCIATE-RQ (TLS handshake included), then the
    # connection is closed; handshaking connections hold no association slot (triage.receive.gate)
    artim_timeout_s: Annotated[float, Field(gt=0, le=120)] = 5.0
    # open connections (handshaking + established) from one IP address; more are refused
    max_connections_per_peer: Annotated[int, Field(ge=1, le=1000)] = 16
    # receiver processes sharing the port (triage.receive.workers); 0: half the CPU cores, 1 to 8
    workers: Annotated[int, Field(ge=0, le=64)] = 0
    maximum_pdu_size: Annotated[int, Field(ge=0)] = 0  # 0: unlimited (pynetdicom's convention)
    tls: TLSSettings = Field(default_factory=TLSSettings)

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
    min_slice_thickness_mm: Annotated[float, Field(gt=0)] = 0.5
    max_slice_thickness_mm: Annotated[float, Field(gt=0)] = 10.0
    # the largest step between consecutive slices that is resampled (slab 4.5 mm + 3.5 mm margin:
    # GE's two-stack head protocol steps 7.38 mm above the posterior fossa); a larger one is a hole
    max_slice_gap_mm: Annotated[float, Field(gt=0)] = 8.0
    # a series whose content is not a head (no skull ring around brain-density tissue): "reject" it
    # with the reason, or "warn": score it with the reason as a warning
    non_head_content: Literal["reject", "warn"] = "reject"
    # brain-tissue noise (HU, robust std of the high-pass image, scaled to a 4.5 mm slab) above which
    # a reconstruction counts as a sharp (bone/lung) kernel whatever its name says
    sharp_noise_hu: Annotated[float, Field(gt=0)] = 12.0
    soft_kernel_patterns: list[str] = Field(
        default_factory=lambda: [
            "STANDARD", "SOFT", "BRAIN", "H3", "J3", "J4", "H4", "FC2", "FC6", "UB", "UC"
        ]
    )
    sharp_kernel_patterns: list[str] = Field(
        default_factory=lambda: [
            "BONE", "H6", "H7", "H8", "J7", "FC3", "FC8", "YC", "EDGE", "LUNG", "KNOCHEN", "HUESO"
        ]
    )
    # SeriesDescription substrings of reformats and renderings, ranked below plain reconstructions
    reformat_patterns: list[str] = Field(default_factory=lambda: ["MPR", "MIP", "3D", "VRT", "MINIP"])
    min_coverage_mm: Annotated[float, Field(gt=0)] = 90.0
    max_tilt_deg: Annotated[float, Field(ge=0, le=45)] = 30.0
    interpolate_gaps: bool = False  # true: a missing slice is interpolated instead of rejecting
    max_gap_slices: Annotated[int, Field(ge=1)] = 1  # the most consecutive missing slices interpolated

    @model_validator(mode="after")
    def _thickness_range(self) -> AssemblySettings:
        if self.min_slice_thickness_mm > self.max_slice_thickness_mm:
            raise FieldProblem(
                "min_slice_thickness_mm",
                f"must not exceed max_slice_thickness_mm ({self.min_slice_thickness_mm} > "
                f"{self.max_slice_thickness_mm})",
            )
        return self


class ScoringSettings(_Section):
    """Scoring with the current model set."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    # the most studies in one model call on a GPU (the CPU scores one at a time; triage.model.score)
    batch_size: Annotated[int, Field(ge=1, le=64)] = 4
    threads: Annotated[int, Field(ge=0)] = 0  # CPU threads for torch; 0: torch's default
    # which score flags a study: the paper's whole-volume log p(normal|x) ("global"), the most abnormal
    # lesion-sized window of its voxel map ("region"), or "either", each at its own calibrated threshold
    flag_policy: Literal["global", "region", "either"] = "either"
    # at start, before the stages run: the whole data path once on a synthetic study (triage.warmup), so
    # the first real study pays no first-call costs; seconds at start (model sets x first inference)
    warmup: bool = True


class PacsSettings(_Section):
    """Where Structured Reports go by default."""

    ae_title: AETitle = "PACS"
    host: PeerHost = "127.0.0.1"
    port: Port = 4242
    calling_ae_title: AETitle = "GLOWTRIAGE"

    kind: ClassVar[str] = "dicom"  # the destination kind (triage.send) that delivers here

    @property
    def target(self) -> str:
        """Where the outbox delivers, in the kind's notation (``AE@host:port``)."""
        return f"{self.ae_title}@{self.host}:{self.port}"


class HL7Settings(_Section):
    """The RIS/worklist that takes ORU^R01 priority flags."""

    enabled: bool = True
    host: PeerHost = "127.0.0.1"
    port: Port = 2575
    sending_application: str = "GLOWTRIAGE"
    sending_facility: str = "RADIOLOGY"
    receiving_application: str = "RIS"
    receiving_facility: str = "HOSPITAL"
    timeout: Seconds = 10.0

    kind: ClassVar[str] = "hl7"  # the destination kind (triage.send) that delivers here

    @property
    def target(self) -> str:
        """Where the outbox delivers: ``@host:port`` (no AE title; the notation outbox rows have)."""
        return f"@{self.host}:{self.port}"


class RouteRule(_Section):
    """One routing rule to a DICOM peer (C-STORE): what to send where, and when."""

    name: Annotated[str, Field(min_length=1)]
    kind: Literal["dicom"] = "dicom"  # the destination kind (triage.send) that delivers it
    when: Literal["flagged", "always", "normal"] = "flagged"
    send: Literal["source", "sr"] = "source"
    ae_title: AETitle
    host: PeerHost
    port: Port

    @property
    def target(self) -> str:
        """Where the outbox delivers, in the kind's notation (``AE@host:port``)."""
        return f"{self.ae_title}@{self.host}:{self.port}"


def _http_url(v: str) -> str:
    # http(s)://host[:port][/path], no credentials (they would be stored in the outbox and logged: use
    # username/password or token), no query or fragment; a trailing "/" is dropped (paths are appended).
    try:
        parts = urlsplit(v)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"expected an http:// or https:// URL, got {v!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL with a host, got {v!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("expected a URL without user:password@ (set username and password, or token)")
    if parts.query or parts.fragment:
        raise ValueError(f"expected a URL without ?query or #fragment, got {v!r}")
    _peer_host(parts.hostname)
    if port == 0:
        raise ValueError(f"expected a port of 1-65535 in the URL, got {v!r}")
    return v.rstrip("/")


class DicomWebRule(_Section):
    """One routing rule to a DICOMweb server (STOW-RS): what to send where, and when."""

    name: Annotated[str, Field(min_length=1)]
    kind: Literal["dicomweb"]  # the destination kind (triage.send) that delivers it
    when: Literal["flagged", "always", "normal"] = "flagged"
    send: Literal["source", "sr"] = "source"
    url: Annotated[str, AfterValidator(_http_url)]  # the DICOMweb root; STOW-RS posts to {url}/studies
    username: str = ""  # HTTP basic authentication, with password
    password: str = ""
    token: str = ""  # HTTP bearer token (instead of username/password)
    timeout_s: Seconds = 30.0  # connect and read timeout of one attempt
    verify_tls: bool = True  # check the https server's certificate (false only for tests)
    ca_file: str = ""  # PEM CA bundle the server's certificate must chain to; "": the system's

    @model_validator(mode="after")
    def _one_way_to_authenticate(self) -> DicomWebRule:
        if bool(self.username) != bool(self.password):
            key = "password" if self.username else "username"
            raise FieldProblem(key, "username and password go together (HTTP basic authentication)")
        if self.token and self.username:
            raise FieldProblem("token", "set either token (bearer) or username and password, not both")
        return self

    @property
    def target(self) -> str:
        """Where the outbox delivers: the URL (credentials stay in this file, never in the outbox)."""
        return self.url


def _rule_kind(rule: Any) -> Any:
    """A rule's ``kind``; "dicom" when it names none (rules written before there were kinds)."""
    if isinstance(rule, dict):
        return rule.get("kind", "dicom")
    return getattr(rule, "kind", "dicom")


# A routing rule is one of the destination kinds' rule tables, chosen by its ``kind`` key; a new kind
# adds its table here (and its module in triage/send/).
Rule = Annotated[
    Annotated[RouteRule, Tag("dicom")] | Annotated[DicomWebRule, Tag("dicomweb")],
    Discriminator(
        _rule_kind,
        custom_error_type="rule_kind",
        custom_error_message='expected kind = "dicom" (C-STORE) or "dicomweb" (STOW-RS)',
    ),
]
RESERVED_DESTINATIONS = ("PACS", "HL7")  # the outbox names of [pacs] and [hl7]


class RoutingSettings(_Section):
    """Auto-routing: for example, flagged studies' source series to a STAT reading AE."""

    sr_to_pacs: bool = True
    rules: list[Rule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_are_unique(self) -> RoutingSettings:
        # the outbox keeps one delivery per (study, kind, name): a second rule of the same name would
        # be dropped silently, and metrics could not tell the two apart
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in RESERVED_DESTINATIONS:
                raise FieldProblem("rules", f"rule name {rule.name!r} is taken by the "
                                   f"[{rule.name.lower()}] delivery; choose another")
            if rule.name in seen:
                raise FieldProblem("rules", f"rule name {rule.name!r} is used twice; each rule needs its own")
            seen.add(rule.name)
        return self


class OutboxSettings(_Section):
    """Durable delivery: retries with exponential back-off, then dead letters."""

    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 20
    backoff_initial_s: Seconds = 2.0
    backoff_max_s: Seconds = 600.0
    poll_s: Seconds = 1.0


class MetricsSettings(_Section):
    """Prometheus /metrics endpoint."""

    enabled: bool = True
    host: ListenHost = "127.0.0.1"  # keep on loopback unless a firewall restricts who may scrape
    port: Port = 9464
    # histogram buckets (nats) of log p(normal|x); mostly <= 0, flagged studies sit far below 0
    score_buckets: list[float] = Field(
        default_factory=lambda: [-50.0, -20.0, -10.0, -5.0, -2.0, -1.0, -0.5, -0.2, -0.1, 0.0, 0.5, 1.0, 5.0]
    )

    @field_validator("score_buckets")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        if not v or any(b <= a for a, b in itertools.pairwise(v)):
            raise ValueError(f"expected a non-empty, strictly increasing list of numbers, got {v!r}")
        return v


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
    init_from: Literal["trunk", "m0", "m1", "scratch"] = "trunk"  # where the new M1 starts (see config.toml)
    # 0: the branch length the current set's M1 was trained with (its provenance), else 2000
    steps: Annotated[int, Field(ge=0)] = 0
    nice: Annotated[int, Field(ge=0, le=19)] = 10
    gate_nll_margin_bpd: Annotated[float, Field(ge=0)] = 0.02
    gate_score_shift_sd: Annotated[float, Field(ge=0)] = 1.0
    holdout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where the retrain process trains and gates
    threads: Annotated[int, Field(ge=0)] = 0  # CPU threads of the retrain process; 0: torch's default
    timeout_s: Seconds = 21600.0  # a retrain still running after this is killed; the current set stays

    @field_validator("cron")
    @classmethod
    def _cron_fields(cls, v: str) -> str:
        if len(v.split()) != 5:
            raise ValueError(f"expected 5 cron fields (minute hour day month day-of-week), got {v!r}")
        from apscheduler.triggers.cron import CronTrigger  # the parser the scheduler itself uses

        try:
            CronTrigger.from_crontab(v)
        except ValueError as exc:
            raise ValueError(f"invalid cron expression {v!r}: {exc}") from None
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


def load_or_exit(path: str | os.PathLike[str] | None) -> Config:
    """:func:`load` for command-line entry points: a bad file prints one line per problem (file and
    key) on stderr and exits with status 2, the same for every command."""
    try:
        return load(path)
    except ConfigError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        raise SystemExit(2) from None


def _loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key (not a glowtriage setting; check the spelling against the shipped config.toml)"
    if kind == "missing":
        return "required key is missing"
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    if kind not in ("value_error", "assertion_error") and "input" in err:
        msg += f" (got {_short(err['input'])})"
    return msg


def _rule_loc(loc: tuple[Any, ...], err: Any) -> tuple[tuple[Any, ...], Any]:
    """A routing rule's error as the file has it: pydantic puts the rule's kind (its union tag) in the
    path (rules[0].dicomweb.url), the file has rules[0].url; an unknown kind points at ``kind``."""
    if err.get("type") == "rule_kind":
        found = err["input"].get("kind") if isinstance(err.get("input"), dict) else err.get("input")
        return (*loc, "kind"), {**err, "input": found}
    return (loc[:3] + loc[4:] if len(loc) > 3 else loc), err


_TABLE = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_BARE_OR_QUOTED = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY = re.compile(rf"^\s*({_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*)\s*=")


def _key_parts(dotted: str) -> tuple[str, ...]:
    parts = re.findall(_BARE_OR_QUOTED, dotted)
    return tuple(p.strip("\"'") for p in parts)


def _line_of(text: str | None, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line number of a key path in TOML text (the key itself, else its nearest table).

    tomllib keeps no positions; a line scan that follows ``[table]`` and ``[[array]]`` headers is
    enough for the hand-written files this reads, and a wrong guess only loses the number.
    """
    if not text or not loc:
        return None
    found: dict[tuple[Any, ...], int] = {}
    table: tuple[Any, ...] = ()
    arrays: dict[tuple[Any, ...], int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        header = _TABLE.match(line)
        if header:
            path = _key_parts(header.group(2))
            if header.group(1) == "[[":
                arrays[path] = arrays.get(path, -1) + 1
                table = (*path, arrays[path])
            else:
                table = path
            found.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            found.setdefault((*table, *_key_parts(key.group(1))), number)
    for end in range(len(loc), 0, -1):
        if tuple(loc[:end]) in found:
            return found[tuple(loc[:end])]
    return None


def _where(source: Path | None, line: int | None) -> str:
    name = str(source) if source else "<embedded defaults>"
    return f"{name}:{line}" if line else name


def parse(data: dict[str, Any], source: Path | None, text: str | None = None) -> Config:
    """Validate an already-parsed TOML document; ``text`` (the file's content) adds line numbers."""
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            problem = (err.get("ctx") or {}).get("error")
            if isinstance(problem, FieldProblem):
                loc = (*loc, problem.key)
            if loc[:2] == ("routing", "rules"):
                loc, err = _rule_loc(loc, err)
            lines.append(f"{_where(source, _line_of(text, loc))}: {_loc(loc)}: {_describe(err)}")
        raise ConfigError(lines) from None
    base = source.parent.resolve() if source else Path.cwd()
    return Config(settings=settings, source=source, base_dir=base)


def _resolve_source(path: str | os.PathLike[str] | None) -> Path | None:
    if path is None:
        path = os.environ.get(ENV_VAR) or None
    return None if path is None else Path(path)


def _read(source: Path) -> tuple[dict[str, Any], str]:
    try:
        raw = source.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read config file: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        byte = f"{raw[exc.start]:#04x} at offset {exc.start}"
        raise ConfigError([f"{source}:{line}: not UTF-8 text (byte {byte}); save it as UTF-8"]) from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"at line (\d+)", str(exc))
        line = int(match.group(1)) if match else None
        raise ConfigError([f"{_where(source, line)}: TOML syntax error: {exc}"]) from None


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate config.toml: explicit path, else $GLOWTRIAGE_CONFIG, else embedded defaults.

    Only the file's own content is checked here; :func:`check` also looks at the files it names.
    """
    source = _resolve_source(path)
    if source is None:
        return parse({}, None)
    data, text = _read(source)
    return parse(data, source, text)


def _check_tls(cfg: Config, text: str | None) -> list[str]:
    tls = cfg.settings.dicom.tls
    if not tls.enabled:
        return []
    errors: list[str] = []

    def err(key: str, message: str) -> None:
        loc = ("dicom", "tls", key)
        errors.append(f"{_where(cfg.source, _line_of(text, loc))}: {_loc(loc)}: {message}")

    for key in ("cert_file", "key_file", "ca_file"):
        value = getattr(tls, key)
        if value and not os.access(cfg.path(value), os.R_OK):
            err(key, f"cannot read {cfg.path(value)} (missing, or not readable by this user)")
    if errors:
        return errors
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cfg.path(tls.cert_file), cfg.path(tls.key_file))
    except (ssl.SSLError, OSError) as exc:
        err("cert_file", f"not a PEM certificate matching key_file {cfg.path(tls.key_file)}: {exc}")
    if tls.ca_file:
        try:
            context.load_verify_locations(cafile=cfg.path(tls.ca_file))
        except (ssl.SSLError, OSError) as exc:
            err("ca_file", f"not a PEM CA certificate bundle: {exc}")
    return errors


def check(path: str | os.PathLike[str] | None = None) -> list[str]:
    """Everything wrong with a config, one line per problem naming the file and the key; [] when fine.

    What ``triage check-config`` prints. Beyond :func:`load` it opens the files the config names
    (TLS certificate, key and CA), so a bad certificate is found before the daemon's first
    association instead of during it.
    """
    try:
        source = _resolve_source(path)
        if source is None:
            return []
        data, text = _read(source)
        cfg = parse(data, source, text)
    except ConfigError as exc:
        return list(exc.lines)
    return _check_tls(cfg, text)
