"""Coverage-guided fuzzing (atheris / libFuzzer) of the code that reads untrusted DICOM bytes.

    python bench/fuzz_targets.py TARGET [libFuzzer args, e.g. -runs=20000 -seed=1]
    python bench/fuzz_targets.py --list

Targets, each with the only exceptions it may raise (its documented refusals), every one of which must
carry a reason; anything else (IndexError, struct.error, RecursionError, a pydicom internal error...)
is a crash, reported by libFuzzer with the input that caused it:

* ``part10``: :func:`triage.store.part10.dataset_offset` and ``dataset_sha256`` (the store's hash of
  what the sender sent). Never raise; the offset lies within the buffer.
* ``inspect``: :func:`triage.receive.inspect.inspect_instance`, the walk over a received instance
  before the SCP answers success, under each of the four uncompressed transfer syntaxes (the first
  input byte picks one). Raises only :class:`~triage.receive.inspect.BadInstance` with a DIMSE
  status of PS3.4 B.2.3 that the SCP answers and a reason.
* ``headers``: :func:`triage.assemble.headers.read_header` and ``expand_frames`` (pydicom under the
  assembler). Raise only :class:`~triage.assemble.common.VolumeError` with a reason.

Why atheris: the instance walk and the Part-10 offset are hand-written parsers of bytes from any
device on the network; coverage guidance finds the length-field and nesting corner cases that random
bit flips (the dataset-level fuzzing of bench/reliability_cases/fuzz.py) reach only by luck. The seed
corpus is a few valid CT instances made by the harness (explicit and implicit VR, with a sequence).

Used by bench/reliability.py (fuzz case, ``run_target``) and tests/unit/test_fuzz_targets.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("part10", "inspect", "headers")
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian (retired, still sent by old devices)
)


class UndocumentedError(AssertionError):
    """A target let out something its contract does not allow (libFuzzer reports it as a crash)."""


def _scratch() -> Path:
    """A per-process file for targets that take a path (on tmpfs when there is one: it is rewritten
    for every input)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"glow-fuzz-{os.getpid()}.dcm"


def make_target(name: str) -> Callable[[bytes], None]:
    """The one-input test function of target ``name`` (imports the code under test: call it inside
    ``atheris.instrument_imports()`` for coverage)."""
    scratch = _scratch()
    if name == "part10":
        from triage.store.part10 import dataset_offset, dataset_sha256

        def part10(data: bytes) -> None:
            off = dataset_offset(data)
            if not (isinstance(off, int) and 0 <= off <= len(data)):
                raise UndocumentedError(f"dataset_offset {off!r} outside 0..{len(data)}")
            scratch.write_bytes(data)
            digest, size = dataset_sha256(scratch)
            if size != len(data) or len(digest) != 64:
                raise UndocumentedError(f"dataset_sha256 gave {digest!r}, {size}")

        return part10
    if name == "inspect":
        from triage.receive import inspect as ins

        statuses = {ins.CANNOT_UNDERSTAND, ins.MISSING_UID, ins.DATASET_MISMATCH}

        def inspect(data: bytes) -> None:
            if not data:
                return
            ts = TRANSFER_SYNTAXES[data[0] % len(TRANSFER_SYNTAXES)]
            scratch.write_bytes(data[1:])
            try:
                info = ins.inspect_instance(scratch, ts, "1.2.840.10008.5.1.4.1.1.2", "1.2.3")
            except ins.BadInstance as exc:
                if exc.status not in statuses or not exc.reason.strip() or not exc.comment.strip():
                    raise UndocumentedError(
                        f"refusal without status/reason: {exc.status!r} {exc.reason!r}"
                    ) from None
                return
            if not (info.study_uid and info.series_uid and info.sop_uid == "1.2.3"):
                raise UndocumentedError(f"accepted without the UIDs the store needs: {info!r}")

        return inspect
    if name == "headers":
        from triage.assemble.common import VolumeError
        from triage.assemble.headers import expand_frames, read_header

        def headers(data: bytes) -> None:
            scratch.write_bytes(data)
            try:
                h = read_header(scratch)
                expand_frames([h])
            except VolumeError as exc:
                if not exc.reason.strip():
                    raise UndocumentedError("VolumeError without a reason") from None

        return headers
    raise SystemExit(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")


def write_seeds(out_dir: Path) -> Path:
    """A few valid CT instances (the harness' writer, pydicom) as the seed corpus: explicit VR with a
    sequence, implicit VR, a 2-frame one. Small on purpose (libFuzzer's -max_len follows the seeds)."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ImplicitVRLittleEndian

    sys.path.insert(0, str(REPO))
    from training.harness.series import write_ct_series

    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_ct_series(out_dir / "tmp", 2, 8, seed=1)
    ds = pydicom.dcmread(files[0])
    ds.ReferencedImageSequence = Sequence([Dataset()])
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    ds.save_as(out_dir / "explicit_sq.dcm", enforce_file_format=True)
    ds2 = pydicom.dcmread(files[1])
    ds2.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds2.save_as(out_dir / "implicit.dcm", enforce_file_format=True)
    ds3 = pydicom.dcmread(files[1])
    ds3.NumberOfFrames = 2
    ds3.PixelData = ds3.PixelData * 2
    ds3.save_as(out_dir / "frames.dcm", enforce_file_format=True)
    for f in files:
        f.unlink()
    for f in out_dir.glob("*.dcm"):  # the inspect target's C-STORE command names SOP Instance 1.2.3
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
        ds.save_as(f, enforce_file_format=True)
    (out_dir / "tmp").rmdir()
    for f in list(out_dir.glob("*.dcm")):  # the inspect target reads its first byte as the syntax
        (out_dir / f"ts_{f.name}").write_bytes(b"\x01" + f.read_bytes())
    return out_dir


_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_COV = re.compile(r"cov: (\d+) ft: (\d+)")


def run_target(name: str, runs: int, work: Path, *, seed: int = 1, timeout_s: float = 3600) -> dict[str, Any]:
    """``runs`` libFuzzer iterations of target ``name`` in a subprocess (atheris.Fuzz never returns;
    -runs=N makes it stop). Returns runs done, coverage, and the crash (input file, error) if any."""
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{name}"
    seeds = write_seeds(work / "seeds")
    corpus.mkdir(exist_ok=True)
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        name,
        f"-runs={runs}",
        f"-seed={seed}",
        "-timeout=20",
        "-rss_limit_mb=2048",
        "-max_len=4096",
        f"-artifact_prefix={work}/",
        "-print_final_stats=1",
        str(corpus),
        str(seeds),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=work)
    err = proc.stderr
    done = _DONE.findall(err)
    cov = _COV.findall(err)
    crash = next((str(p) for p in work.glob("crash-*")), None) or next(
        (str(p) for p in work.glob("timeout-*")), None
    )
    uncaught = err.split("=== Uncaught Python exception: ===", 1)
    return {
        "target": name,
        "runs": int(done[-1][0]) if done else 0,
        "seconds": int(done[-1][1]) if done else None,
        "coverage": int(cov[-1][0]) if cov else None,
        "features": int(cov[-1][1]) if cov else None,
        "corpus_files": len(list(corpus.iterdir())),
        "returncode": proc.returncode,
        "crashes": 0 if proc.returncode == 0 and crash is None else 1,
        "crash_input": crash,
        "error": (uncaught[1] if len(uncaught) > 1 else err if proc.returncode else "").strip()[-2000:],
    }


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "--list"):
        print(__doc__)
        raise SystemExit(0)
    name = sys.argv[1]
    sys.path.insert(0, str(REPO))
    import atheris

    with atheris.instrument_imports(include=["triage", "pydicom"]):
        target = make_target(name)
    try:
        atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
        atheris.Fuzz()
    finally:
        _scratch().unlink(missing_ok=True)


if __name__ == "__main__":
    main()
