"""Writing TOML configs for the daemon: a small one from sections, or one key changed in a real one.

``tomllib`` only reads; the configs the harness writes hold scalars and lists, so a few lines do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


def toml_value(v: Any) -> str:
    """``v`` (bool, int, float, str, path, or a list of those) as a TOML value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def write_config(path: Path, sections: dict[str, dict[str, Any]], header: str = "") -> Path:
    """Write a config.toml of ``sections`` (dotted names for sub-tables, e.g. ``dicom.tls``)."""
    lines = [f"# {ln}" for ln in header.splitlines()]
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def set_toml_key(text: str, section: str, key: str, value: Any) -> str:
    """``text`` with ``key`` of ``[section]`` set to ``value``; comments and everything else kept.

    Line-based on purpose: the shipped config.toml documents every key in comments, and a demo config
    that is that file with two lines changed is easy to diff against it.
    """
    lines = text.splitlines()
    header = re.compile(r"^\s*\[\s*([A-Za-z0-9_.]+)\s*\]\s*(#.*)?$")
    keyline = re.compile(rf"^\s*{re.escape(key)}\s*=")
    start = next((i for i, ln in enumerate(lines) if (m := header.match(ln)) and m.group(1) == section), None)
    new = f"{key} = {toml_value(value)}"
    if start is None:
        return "\n".join([*lines, "", f"[{section}]", new]) + "\n"
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if header.match(lines[i]) or lines[i].lstrip().startswith("[[")
        ),
        len(lines),
    )
    for i in range(start + 1, end):
        if keyline.match(lines[i]):
            lines[i] = new
            break
    else:
        lines.insert(start + 1, new)
    return "\n".join(lines) + "\n"
