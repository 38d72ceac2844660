"""The demo's daemon config: the repo's config.toml with only the keys the demo must change.

A port the base config names is kept when it is free now (so the printed URLs are the documented ones)
and replaced by a free one otherwise; every change is listed, so the demo config is easy to diff
against the shipped one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.demo.plan import Plan
from training.harness.config import set_toml_key
from training.harness.ports import free_port, port_free


@dataclass
class Ports:
    """The ports the demo uses and which of them differ from the base config (with why)."""

    dicom: int
    metrics: int
    pacs: int
    hl7: int
    orthanc_http: int
    changes: list[str] = field(default_factory=list)


def choose_ports(base: Any, all_free: bool) -> Ports:
    """The base config's ports where they are free now, otherwise (or with ``all_free``) free ones."""
    s = base.settings
    wanted = [
        ("dicom", s.dicom.port, s.dicom.host),
        ("metrics", s.metrics.port, s.metrics.host),
        ("pacs", s.pacs.port, "127.0.0.1"),
        ("hl7", s.hl7.port, "127.0.0.1"),
    ]
    got: dict[str, int] = {}
    changes: list[str] = []
    taken: set[int] = set()
    for section, port, host in wanted:
        if not all_free and port not in taken and port_free(port, host):
            got[section] = port
        else:
            new = free_port()
            while new in taken:
                new = free_port()
            why = "--free-ports" if all_free else "busy"
            changes.append(f"[{section}] port {port} -> {new} ({why})")
            got[section] = new
        taken.add(got[section])
    http = 8042 if not all_free and 8042 not in taken and port_free(8042) else free_port()
    return Ports(got["dicom"], got["metrics"], got["pacs"], got["hl7"], http, changes)


def write_demo_config(out: Path, base_path: Path | None, ports: Ports, plan: Plan) -> tuple[Path, list[str]]:
    """demo-out/config.toml: the base file with only the demo's changes; returns (path, changes)."""
    text = base_path.read_text() if base_path and base_path.is_file() else ""
    changes = list(ports.changes)
    for section, value in (
        ("dicom", ports.dicom),
        ("metrics", ports.metrics),
        ("pacs", ports.pacs),
        ("hl7", ports.hl7),
    ):
        text = set_toml_key(text, section, "port", value)
    if plan.quiet_seconds is not None:
        text = set_toml_key(text, "assembly", "quiet_seconds", float(plan.quiet_seconds))
        changes.append(f"[assembly] quiet_seconds = {plan.quiet_seconds:g} (--quick)")
    path = out / "config.toml"
    path.write_text(text)
    # The demo wipes its daemon's spool on every run: that must never be a real one (a base config with
    # root = "/var/lib/glowtriage"), so a root outside the output folder becomes demo-out/var.
    from triage.config import load

    root = load(path).storage_root.resolve()
    if not root.is_relative_to(out.resolve()):
        text = set_toml_key(text, "storage", "root", "var")
        changes.append(f"[storage] root {root} -> var (= {out / 'var'}: the demo keeps to its own folder)")
        path.write_text(text)
    return path, changes
