"""config.toml: the shipped file documents every key with its default; bad files give one clear line.

The bad-config cases are what a hospital IT person gets wrong by hand; each must name the file, the
key (and the line where it can be found) and what was expected, in a single line.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from triage.config import ENV_VAR, ConfigError, RouteRule, Settings, check, load, parse

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config.toml"


# ------------------------------------------------------------------------------ shipped file
def test_shipped_config_is_exactly_the_defaults() -> None:
    cfg = load(SHIPPED)
    assert cfg.settings == Settings()
    assert check(SHIPPED) == []


def test_shipped_storage_root_resolves_against_the_files_folder(tmp_path: Path) -> None:
    site = tmp_path / "etc" / "glowtriage"
    site.mkdir(parents=True)
    shutil.copy(SHIPPED, site / "config.toml")
    cfg = load(site / "config.toml")
    assert cfg.storage_root == site.resolve() / "var"
    assert cfg.models_dir == site.resolve() / "var" / "models"
    assert cfg.path("/abs/elsewhere") == Path("/abs/elsewhere")


def _model_fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every leaf key of a settings model, recursively; list-of-model fields go one item deep."""
    out: list[tuple[str, ...]] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _model_fields(ann, (*prefix, name))
        elif (
            typing.get_origin(ann) is list
            and (args := typing.get_args(ann))
            and (isinstance(args[0], type) and issubclass(args[0], BaseModel))
        ):
            out.append((*prefix, name))
            out += _model_fields(args[0], (*prefix, name, "[]"))
        else:
            out.append((*prefix, name))
    return out


def _commented_example() -> dict[str, Any]:
    """The commented ``# [[routing.rules]]`` example block of config.toml, uncommented and parsed."""
    lines = SHIPPED.read_text().splitlines()
    start = lines.index("# [[routing.rules]]")
    block = []
    for line in lines[start:]:
        if not re.match(r"^# (\[\[|\w+ = )", line):
            break
        block.append(line[2:])
    return tomllib.loads("\n".join(block))


def _lookup(doc: Any, path: tuple[str, ...]) -> bool:
    for part in path:
        if part == "[]":
            if not isinstance(doc, list) or not doc:
                return False
            doc = doc[0]
        elif isinstance(doc, dict) and part in doc:
            doc = doc[part]
        else:
            return False
    return True


def test_every_setting_is_documented_in_config_toml() -> None:
    doc = tomllib.loads(SHIPPED.read_text())
    example = _commented_example()
    missing = [
        ".".join(path)
        for path in _model_fields(Settings)
        if not (_lookup(doc, path) or _lookup(example, path))
    ]
    assert missing == [], f"add these keys (default + comment) to config.toml: {missing}"


def test_every_key_line_has_a_comment() -> None:
    lines = SHIPPED.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\w+ = ", line):
            documented = "#" in line or lines[i - 1].startswith("#")
            assert documented, f"config.toml:{i + 1}: {line!r} has no comment"


def test_commented_routing_example_is_a_valid_rule() -> None:
    rules = _commented_example()["routing"]["rules"]
    assert len(rules) == 1
    RouteRule.model_validate(rules[0])
    assert set(rules[0]) == set(RouteRule.model_fields)


# ------------------------------------------------------------------------------ bad configs
BAD: list[tuple[str, str, str, str]] = [
    # (id, file content, key in the message, what the message must say)
    ("unknown-top", "[dicomm]\nport = 1\n", "dicomm", "unknown key"),
    ("unknown-nested", "[dicom]\nprot = 11112\n", "dicom.prot", "unknown key"),
    ("port-type", '[dicom]\nport = "abc"\n', "dicom.port", "valid integer (got 'abc')"),
    ("bool-type", '[hl7]\nenabled = "yes"\n', "hl7.enabled", "valid boolean (got 'yes')"),
    ("int-for-float", "[dicom]\nmax_associations = 1.5\n", "dicom.max_associations", "valid integer"),
    ("port-range", "[dicom]\nport = 70000\n", "dicom.port", "less than or equal to 65535"),
    ("ae-long", '[dicom]\nae_title = "ABCDEFGHIJKLMNOPQ"\n', "dicom.ae_title", "1 to 16 characters"),
    ("ae-backslash", '[pacs]\nae_title = "PA\\\\CS"\n', "pacs.ae_title", "without backslash"),
    ("ae-spaces", '[pacs]\nae_title = " PACS"\n', "pacs.ae_title", "leading or trailing spaces"),
    ("bad-ip", '[dicom]\nhost = "10.0.0.256"\n', "dicom.host", "expected an IP address"),
    ("hostname-bind", '[metrics]\nhost = "localhost"\n', "metrics.host", "expected an IP address"),
    ("bad-peer-host", '[pacs]\nhost = "pacs server"\n', "pacs.host", "IP address or a DNS host name"),
    ("bad-cidr", '[dicom]\nallowed_peers = ["10.0.0.0/33"]\n', "dicom.allowed_peers", "CIDR"),
    ("aet-list", '[dicom]\nallowed_calling_aets = ["OK", ""]\n', "dicom.allowed_calling_aets[1]", "1 to 16"),
    ("tls-no-cert", "[dicom.tls]\nenabled = true\n", "dicom.tls.cert_file", "required when enabled = true"),
    (
        "tls-no-ca",
        '[dicom.tls]\nenabled = true\ncert_file = "a"\nkey_file = "b"\nrequire_client_cert = true\n',
        "dicom.tls.ca_file",
        "required when require_client_cert = true",
    ),
    (
        "thickness",
        "[assembly]\nmin_slice_thickness_mm = 12.0\n",
        "assembly.min_slice_thickness_mm",
        "must not exceed max_slice_thickness_mm (12.0 > 10.0)",
    ),
    ("cron-fields", '[retrain]\ncron = "30 2 * *"\n', "retrain.cron", "expected 5 cron fields"),
    ("cron-value", '[retrain]\ncron = "61 2 * * *"\n', "retrain.cron", "invalid cron expression"),
    ("enum", '[scoring]\ndevice = "tpu"\n', "scoring.device", "'auto', 'cpu' or 'cuda' (got 'tpu')"),
    ("negative-timeout", "[dicom]\nacse_timeout = -1.0\n", "dicom.acse_timeout", "greater than 0"),
    ("zero-timeout", "[outbox]\npoll_s = 0\n", "outbox.poll_s", "greater than 0"),
    ("fraction", "[retrain]\nholdout_fraction = 1.0\n", "retrain.holdout_fraction", "less than 1"),
    ("buckets", "[metrics]\nscore_buckets = [0.0, -1.0]\n", "metrics.score_buckets", "strictly increasing"),
    (
        "rule-missing-field",
        '[[routing.rules]]\nname = "stat"\nae_title = "STAT"\nport = 104\n',
        "routing.rules[0].host",
        "required key is missing",
    ),
    (
        "rule-bad-when",
        '[[routing.rules]]\nname = "s"\nwhen = "sometimes"\nae_title = "S"\nhost = "10.0.0.1"\nport = 104\n',
        "routing.rules[0].when",
        "'flagged', 'always' or 'normal'",
    ),
]


@pytest.mark.parametrize(("content", "key", "expected"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_config_gives_one_line_naming_file_key_and_expectation(
    tmp_path: Path, content: str, key: str, expected: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(content, encoding="utf-8")
    errors = check(path)
    assert len(errors) == 1, errors
    (line,) = errors
    assert "\n" not in line
    # file:line: key: message, the line being where the key (or its table) is written
    match = re.match(rf"^{re.escape(str(path))}:(\d+): {re.escape(key)}: (.*)$", line)
    assert match, line
    assert expected in match.group(2), line
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.lines == errors


def test_line_numbers_point_at_the_offending_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '# site config\n[dicom]\nae_title = "X"\n\n[dicom.tls]\nenabled = false\n\n[scoring]\n'
        'batch_size = 4\ndevice = "tpu"\n\n[[routing.rules]]\nname = "a"\nae_title = "A"\nhost = "h"\n'
        'port = 1\n\n[[routing.rules]]\nname = "b"\nae_title = "B"\nhost = "h"\nport = 0\n',
        encoding="utf-8",
    )
    errors = check(path)
    assert [e.split(": ")[0].rsplit(":", 1)[1] for e in errors] == ["10", "22"], errors
    assert "routing.rules[1].port" in errors[1]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[dicom]\nport = 0\nprot = 1\n[scoring]\ndevice = "tpu"\n', encoding="utf-8")
    errors = check(path)
    assert len(errors) == 3
    assert {e.split(": ")[1] for e in errors} == {"dicom.port", "dicom.prot", "scoring.device"}


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[dicom]\nport = 11112\nae_title = "GLOW\n', encoding="utf-8")
    (line,) = check(path)
    assert line.startswith(f"{path}:3: TOML syntax error: ")
    assert "line 3" in line


def test_missing_file(tmp_path: Path) -> None:
    (line,) = check(tmp_path / "nope.toml")
    assert line == f"{tmp_path / 'nope.toml'}: cannot read config file: No such file or directory"


def test_unreadable_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file even by root (who ignores chmod 000).
    (line,) = check(tmp_path)
    assert line.startswith(f"{tmp_path}: cannot read config file: ")
    assert "directory" in line.lower()


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes('[pacs]\nae_title = "PACS"\nhost = "Z\xfcrich"\n'.encode("latin-1"))
    (line,) = check(path)
    assert line.startswith(f"{path}:3: not UTF-8 text (byte 0xfc")


def test_integers_are_accepted_for_float_settings(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[assembly]\nquiet_seconds = 5\n", encoding="utf-8")
    assert load(path).settings.assembly.quiet_seconds == 5.0


def test_host_names_are_accepted_for_peers(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[pacs]\nhost = "pacs01.radiology.example.org"\n[hl7]\nhost = "ris"\n', encoding="utf-8")
    assert check(path) == []


# ------------------------------------------------------------------------ where config comes from
def test_env_var_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "site.toml"
    path.write_text("[dicom]\nport = 4006\n", encoding="utf-8")
    monkeypatch.setenv(ENV_VAR, str(path))
    cfg = load()
    assert cfg.settings.dicom.port == 4006
    assert cfg.source == path and cfg.storage_root == tmp_path.resolve() / "var"
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nport = 0\n", encoding="utf-8")
    monkeypatch.setenv(ENV_VAR, str(bad))
    assert len(check()) == 1 and str(bad) in check()[0]


def test_explicit_path_beats_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing.toml"))
    explicit = tmp_path / "c.toml"
    explicit.write_text("[dicom]\nport = 4007\n", encoding="utf-8")
    assert load(explicit).settings.dicom.port == 4007


def test_no_file_means_embedded_defaults_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load()
    assert cfg.source is None and cfg.settings == Settings()
    assert cfg.storage_root == tmp_path / "var"
    assert check() == []


def test_relative_paths_resolve_against_the_config_folder_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "config.toml"
    path.write_text('[storage]\nroot = "../data"\n', encoding="utf-8")
    monkeypatch.chdir("/")
    assert load(path).storage_root.resolve() == tmp_path / "data"
    monkeypatch.chdir(tmp_path)
    assert load(Path("conf/config.toml")).storage_root.resolve() == tmp_path / "data"


def test_parse_without_source_uses_defaults_name() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"dicom": {"port": 0}}, None)
    assert info.value.lines[0].startswith("<embedded defaults>: dicom.port: ")


# ------------------------------------------------------------------------------ TLS files
def _openssl_pair(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return key, cert


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed (scripts/bootstrap.sh installs it)")
    certs = tmp_path / "certs"
    certs.mkdir()
    _openssl_pair(certs, "server")
    _openssl_pair(certs, "other")
    return tmp_path


def _tls_config(base: Path, **tls: Any) -> Path:
    lines = ["[dicom.tls]", "enabled = true"] + [f'{k} = "{v}"' for k, v in tls.items()]
    path = base / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_check_accepts_a_matching_certificate_and_key(tls_dir: Path) -> None:
    path = _tls_config(
        tls_dir, cert_file="certs/server.pem", key_file="certs/server.key", ca_file="certs/other.pem"
    )
    assert check(path) == []


def test_check_reports_missing_tls_files_relative_to_the_config(tls_dir: Path) -> None:
    path = _tls_config(tls_dir, cert_file="certs/nope.pem", key_file="certs/server.key")
    (line,) = check(path)
    missing = tls_dir.resolve() / "certs" / "nope.pem"
    assert line.startswith(f"{path}:3: dicom.tls.cert_file: cannot read {missing}")
    # load() alone does not open files (so tools can read a config copied off its host)
    assert load(path).settings.dicom.tls.enabled


def test_check_reports_a_certificate_that_does_not_match_the_key(tls_dir: Path) -> None:
    path = _tls_config(tls_dir, cert_file="certs/other.pem", key_file="certs/server.key")
    (line,) = check(path)
    assert "dicom.tls.cert_file: not a PEM certificate matching key_file" in line


def test_check_reports_a_ca_file_that_is_not_pem(tls_dir: Path) -> None:
    (tls_dir / "certs" / "ca.pem").write_text("not a certificate\n")
    path = _tls_config(
        tls_dir, cert_file="certs/server.pem", key_file="certs/server.key", ca_file="certs/ca.pem"
    )
    (line,) = check(path)
    assert "dicom.tls.ca_file: not a PEM CA certificate bundle" in line
