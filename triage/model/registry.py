"""Model sets on disk: versions, manifest, atomic promote, rollback.

A *model set* is everything a result depends on: M0 and M1 (Glow files), the preset and the
preprocessing version, the operating point (threshold on log p(normal|x), how it was chosen, the
calibration scores of normal studies so a score can be given as a percentile), provenance, and a
DICOM Device UID derived from the two models' hashes, so it changes whenever either model changes
and a PACS can tell which algorithm wrote a report.

Layout under ``<storage.root>/models``::

    <version>/m0.pt, m1.pt, manifest.json    immutable once written
    current -> <version>                     symlink, switched atomically (rename over it)
    promotions.jsonl                         every promote/rollback, newest last

Why a symlink: ``os.replace`` of a symlink is atomic on POSIX, so a scorer that resolves ``current``
sees either the old set or the new one, never a half-written mix; previous sets stay on disk for
rollback.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.uid import generate_uid

from triage.model.results import ModelSetInfo

MANIFEST = "manifest.json"
CURRENT = "current"  # the head-CT set's pointer (the name it always had); other kinds: current-<kind>
KINDS = ("ct", "cxr")  # head CT, chest radiograph: one current set each
CXR_MODEL_NAME = "glowtriage chest-radiograph normality (Glow M0/M1)"
DEFAULT_KIND = "ct"  # a manifest without "kind" (made before kinds existed) is a head-CT set
PROMOTIONS = "promotions.jsonl"
FORMAT = "glowtriage.modelset/1"
# Root under which glowtriage generates UIDs (pydicom's default prefix, as no OID arc is registered yet;
# the entropy-based suffix makes the Device UID a deterministic function of the two models).
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


class RegistryError(Exception):
    """A model set is missing, malformed or cannot be promoted; the message says which and why."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_once(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a content-addressed file of a model set (its name is its hash) unless it exists: to a
    temporary file beside it, fsync'd, then renamed, so a crash never leaves a partial file under the
    name that a manifest's hash check would accept or reject later."""
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def device_uid_for(m0_sha: str, m1_sha: str) -> str:
    """The Device UID of the algorithm: a pure function of the two models' bytes."""
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=["glowtriage-device", m0_sha, m1_sha])


@dataclass(frozen=True)
class ModelSet:
    """A model set on disk, with its manifest parsed."""

    path: Path
    manifest: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def kind(self) -> str:
        """``ct`` (head CT) or ``cxr`` (chest radiograph); a set made before kinds existed is ``ct``."""
        return str(self.manifest.get("kind") or DEFAULT_KIND)

    @property
    def m0_path(self) -> Path:
        return self.path / "m0.pt"

    @property
    def m1_path(self) -> Path:
        return self.path / "m1.pt"

    @property
    def trunk_path(self) -> Path | None:
        """The model M0 and M1 branched from (``training experiment``), when the set keeps one: the
        nightly retrain starts the next M1 from it, so M0 and M1 keep sharing it."""
        return self.path / "trunk.pt" if self.manifest.get("trunk_sha256") else None

    @property
    def calibration_scores(self) -> list[float]:
        return [float(s) for s in self.manifest["calibration"]["normal_scores"]]

    def info(self) -> ModelSetInfo:
        m = self.manifest
        return ModelSetInfo(
            version=self.version,
            device_uid=m["device_uid"],
            preset=m["preset"],
            preprocessing_version=m["preprocessing_version"],
            threshold=float(m["operating_point"]["threshold"]),
            threshold_method=str(m["operating_point"]["method"]),
            software_version=m.get("software_version", "0"),
            kind=self.kind,
            **({"model_name": CXR_MODEL_NAME} if self.kind == "cxr" else {}),
        )

    def verify(self) -> None:
        """Check the files are the ones the manifest names (a copied-over model would change results)."""
        for role in ("m0", "m1", *(("trunk",) if self.manifest.get("trunk_sha256") else ())):
            p = self.path / f"{role}.pt"
            if not p.is_file():
                raise RegistryError(f"model set {self.version}: {p} is missing")
            if sha256_file(p) != self.manifest[f"{role}_sha256"]:
                raise RegistryError(f"model set {self.version}: {p} does not match its manifest hash")


class Registry:
    """The model sets under one folder."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # -- reading ---------------------------------------------------------------------------------
    def list(self) -> list[ModelSet]:
        if not self.root.is_dir():
            return []
        sets = []
        for d in sorted(self.root.iterdir()):
            # dot-folders are sets being written (or left by a crash): never listed
            if d.name.startswith("."):
                continue
            if d.is_dir() and not d.is_symlink() and (d / MANIFEST).is_file():
                sets.append(self._open(d))
        return sorted(sets, key=lambda s: s.manifest.get("created", ""))

    def get(self, version: str) -> ModelSet:
        d = self.root / version
        if not (d / MANIFEST).is_file():
            raise RegistryError(f"no model set {version!r} under {self.root}")
        return self._open(d)

    def current(self, kind: str = DEFAULT_KIND) -> ModelSet | None:
        """The current set of one kind (head CT unless asked), None when none was promoted."""
        link = self.root / current_name(kind)
        if not link.exists():
            return None
        return self._open(link.resolve())

    def currents(self) -> dict[str, ModelSet]:
        """Every kind's current set: a head-CT set and a chest set can be current at once."""
        out = {}
        for kind in KINDS:
            cur = self.current(kind)
            if cur is not None:
                out[kind] = cur
        return out

    def history(self) -> list[dict[str, Any]]:
        p = self.root / PROMOTIONS
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def _open(self, d: Path) -> ModelSet:
        try:
            manifest = json.loads((d / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{d / MANIFEST}: unreadable manifest: {exc}") from None
        if manifest.get("format") != FORMAT:
            raise RegistryError(f"{d / MANIFEST}: not a glowtriage model set manifest")
        return ModelSet(path=d, manifest=manifest)

    # -- writing ---------------------------------------------------------------------------------
    def create(
        self,
        m0: Path,
        m1: Path,
        *,
        preset: str,
        preprocessing_version: str,
        threshold: float,
        method: str,
        normal_scores: list[float],
        provenance: dict[str, Any],
        software_version: str,
        calibration_extra: dict[str, Any] | None = None,
        trunk: Path | None = None,
        kind: str | None = None,
    ) -> ModelSet:
        """Copy two models (and the trunk they branched from, if given) into a new, immutable version
        folder with its manifest. The Device UID depends on M0 and M1 only. ``kind`` follows the models
        (2-D: ``cxr``, 3-D: ``ct``) unless given."""
        kind = kind or kind_of_model(m0)
        if kind not in KINDS:
            raise RegistryError(f"model set kind {kind!r} is not one of {', '.join(KINDS)}")
        self.root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        version = f"{stamp}-{secrets.token_hex(3)}"
        tmp = self.root / f".{version}.tmp"
        tmp.mkdir()
        try:
            shutil.copyfile(m0, tmp / "m0.pt")
            shutil.copyfile(m1, tmp / "m1.pt")
            m0_sha, m1_sha = sha256_file(tmp / "m0.pt"), sha256_file(tmp / "m1.pt")
            if trunk is not None:
                shutil.copyfile(trunk, tmp / "trunk.pt")
            manifest = {
                "format": FORMAT,
                "version": version,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "preset": preset,
                "kind": kind,
                "preprocessing_version": preprocessing_version,
                "m0_sha256": m0_sha,
                "m1_sha256": m1_sha,
                **({"trunk_sha256": sha256_file(tmp / "trunk.pt")} if trunk is not None else {}),
                "device_uid": device_uid_for(m0_sha, m1_sha),
                "operating_point": {"threshold": float(threshold), "method": method},
                "calibration": {"normal_scores": sorted(float(s) for s in normal_scores),
                                **(calibration_extra or {})},
                "provenance": provenance,
                "software_version": software_version,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            for f in tmp.iterdir():
                _fsync_file(f)
            os.replace(tmp, self.root / version)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.get(version)

    def promote(self, version: str, reason: str = "manual") -> ModelSet:
        """Make ``version`` the current set of its kind, atomically; the previous one stays for rollback."""
        target = self.get(version)
        target.verify()
        previous = self.current(target.kind)
        name = current_name(target.kind)
        link = self.root / name
        tmp = self.root / f".{name}.{secrets.token_hex(4)}"
        os.symlink(version, tmp)
        os.replace(tmp, link)
        _fsync_dir(self.root)
        self._log("promote", version, previous.version if previous else None, reason, target.kind)
        return target

    def rollback(self, reason: str = "manual rollback", kind: str = DEFAULT_KIND) -> ModelSet:
        """Go back to the set of ``kind`` that was current before the current one."""
        cur = self.current(kind)
        if cur is None:
            raise RegistryError(f"nothing to roll back: no current {kind} model set")
        # walk the promotion history backwards to the set that preceded the current one
        for entry in reversed(self.history()):
            if entry["version"] == cur.version and entry.get("previous"):
                prev = entry["previous"]
                break
        else:
            raise RegistryError(f"no earlier model set recorded before {cur.version}")
        return self.promote(prev, reason=reason)

    def _log(self, action: str, version: str, previous: str | None, reason: str, kind: str) -> None:
        line = json.dumps(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "action": action,
                "version": version,
                "previous": previous,
                "reason": reason,
                "kind": kind,
            }
        )
        with (self.root / PROMOTIONS).open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def current_name(kind: str) -> str:
    """The pointer of a kind's current set: ``current`` for head CT (as always), ``current-cxr``..."""
    if kind not in KINDS:
        raise RegistryError(f"model set kind {kind!r} is not one of {', '.join(KINDS)}")
    return CURRENT if kind == DEFAULT_KIND else f"{CURRENT}-{kind}"


def kind_of_model(path: Path) -> str:
    """A checkpoint's kind from its architecture: a 2-D Glow scores chest radiographs, a 3-D one head CT."""
    from triage.model.glow import Glow

    try:
        ndim = Glow.load(path, map_location="cpu").cfg.ndim
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise RegistryError(f"{path}: cannot read the model to tell its kind: {exc}") from None
    return "cxr" if ndim == 2 else DEFAULT_KIND


def volume_kind(data: Any) -> str:
    """The kind of a canonical image: 2-D radiograph (``cxr``) or 3-D head-CT volume (``ct``)."""
    return "cxr" if getattr(data, "ndim", 3) == 2 else DEFAULT_KIND


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
