"""The pynetdicom reactor copy stays in step with the pynetdicom it was copied from.

``triage/receive/reactor.py`` replaces pynetdicom 3.0's polling loops with event-driven copies and
relies on a few of its internals; a copy silently overrides any upstream fix. These tests fail as
soon as the installed pynetdicom differs from what the copy was made against, naming what to re-check.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import tomllib
from pathlib import Path

import pynetdicom
import pytest

from triage.receive import reactor

REPO = Path(__file__).resolve().parents[2]


def _resolve(dotted: str) -> object:
    """``pkg.module.Class.attr`` -> the object (the longest importable module prefix, then getattr)."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("name", sorted(reactor.UPSTREAM_SOURCE_SHA256))
def test_upstream_functions_the_copy_replaces_are_unchanged(name: str) -> None:
    try:
        source = inspect.getsource(_resolve(name))  # type: ignore[arg-type]
    except (ImportError, AttributeError, OSError, TypeError) as exc:
        pytest.fail(f"pynetdicom changed {name} (no longer found: {exc}): re-check the copy in "
                    f"triage/receive/reactor.py")
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()
    assert digest == reactor.UPSTREAM_SOURCE_SHA256[name], (
        f"pynetdicom changed {name} (pynetdicom {pynetdicom.__version__}): re-check the copy in "
        f"triage/receive/reactor.py, then record sha256 {digest} in UPSTREAM_SOURCE_SHA256"
    )


def test_every_method_the_copy_overrides_is_pinned() -> None:
    """A method added to the copied classes without a recorded upstream hash would go unwatched."""
    pinned = set(reactor.UPSTREAM_SOURCE_SHA256)
    for cls in (reactor._EventDrivenDUL, reactor._EventDrivenAssociation):
        base = cls.__mro__[1]
        for attr in vars(cls):
            if callable(getattr(base, attr, None)) and not attr.startswith("__"):
                key = f"{base.__module__}.{base.__qualname__}.{attr}"
                assert key in pinned, f"{cls.__name__}.{attr} overrides {key} but its source is not pinned"


def test_the_dependency_pin_matches_the_copied_series() -> None:
    """pyproject's range for pynetdicom is the series the copy applies to, and it is installed."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"pynetdicom\b", d))
    lower = re.search(r">=\s*([\d.]+)", spec)
    upper = re.search(r"<\s*([\d.]+)", spec)
    assert lower and upper, f"pynetdicom is not pinned to a range in pyproject.toml: {spec!r}"
    (series,) = (v.rstrip(".") for v in reactor.ACCEL_VERSIONS)
    major, minor = (int(x) for x in series.split("."))
    assert (lower.group(1), upper.group(1)) == (series, f"{major}.{minor + 1}"), (
        f"pyproject pins {spec!r}, the copy is of pynetdicom {series}.x"
    )
    assert reactor.copy_applies(), (
        f"installed pynetdicom {pynetdicom.__version__} is outside the copied series {reactor.ACCEL_VERSIONS}"
    )
