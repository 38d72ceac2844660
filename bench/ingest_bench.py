"""Ingest speed over loopback: glowtriage's receiver vs dcmtk storescp vs Orthanc, in one run.

Synthetic CT slices (256x256 int16, Explicit VR Little Endian, about 130 KB each) are generated
once into a temp folder, split into ``--associations`` groups, and each group is sent by its own
``storescu`` process at the same time (TCP_NODELAY=1 in dcmtk's environment). The clock runs from
the first storescu start to the last storescu exit; every peer must then hold every instance.

Peers, each with its storage on a temp folder of the same disk:

* glowtriage: ``python -m triage.receive.scp`` (fsync of file and directory plus a SQLite commit with
  its log fsync'd per instance before the success status; the three run at once after the rename, the
  directory's and the log's shared by concurrent instances) with ``dicom.workers`` at its default
  (half the cores, at least 1), ``glowtriage-1proc`` with ``workers = 1`` (the listener in one
  process) and ``glowtriage-2proc`` with two receiver processes;
* storescp: ``storescp --fork`` (one process per association; it does not fsync);
* Orthanc: temporary configuration, ``SyncStorageArea`` true (its default: fsync per instance).

    python bench/ingest_bench.py [--n 2000] [--associations 4,1] [--out bench/results/ingest.json]

Prints a table (peer, instances, seconds, inst/s, ratio vs storescp) and writes the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.harness.config import write_config  # noqa: E402
from training.harness.daemon import RECEIVER, TriageProcess  # noqa: E402
from training.harness.orthanc import Orthanc  # noqa: E402
from training.harness.ports import free_port, wait_port  # noqa: E402
from training.harness.process import stop_process  # noqa: E402
from training.harness.series import write_ct_series  # noqa: E402
from training.harness.storescu import dcmtk_env, storescu_parallel  # noqa: E402


def generate(out: Path, n: int, size: int = 256, seed: int = 0) -> list[Path]:
    """``n`` CT slices of one series (int16 pixels), written with pydicom."""
    return write_ct_series(out, n, size, seed=seed, signed=True, prefix="")


def fsync_probe(folder: Path, n: int = 50, size: int = 131072) -> float:
    """Milliseconds for write + fsync + rename + directory fsync of one instance-sized file here.

    Printed with the results because on a shared disk this, not the code, can set the pace of
    every peer that syncs (glowtriage and Orthanc; storescp does not).
    """
    folder.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(size)
    t = time.perf_counter()
    for i in range(n):
        tmp, final = folder / f"{i}.tmp", folder / f"{i}.dcm"
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    ms = (time.perf_counter() - t) / n * 1000
    shutil.rmtree(folder, ignore_errors=True)
    return ms


@contextlib.contextmanager
def glowtriage(work: Path, workers: int = 0) -> Iterator[tuple[int, str, Callable[[], int]]]:
    """The receiver alone; ``workers`` is ``dicom.workers`` (0: the shipped default, half the cores)."""
    port = free_port()
    cfg = write_config(work / "config.toml", {
        "dicom": {"ae_title": "GLOWTRIAGE", "host": "127.0.0.1", "port": port, "max_associations": 16,
                  "workers": workers},
        "storage": {"root": str(work / "var"), "min_free_mb": 64},
        "logging": {"level": "info", "format": "json"},
    })
    rx = TriageProcess(cfg, work / "receiver.log", argv=RECEIVER, ready_event="listening", start_timeout=120,
                       stop_grace=20)
    try:
        rx.start()
        # with several workers the port listens before every worker accepts: time only a ready pool
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            events = list(rx.events())
            n = next((int(e.get("workers", 1)) for e in events if e.get("event") == "listening"), 1)
            if n == 1 or sum(e.get("event") == "worker_listening" for e in events) >= n:
                break
            time.sleep(0.2)

        def count() -> int:
            from triage.store.db import Store

            with Store(work / "var") as st:
                return st.instance_total()

        yield port, "GLOWTRIAGE", count
    finally:
        rx.stop()


@contextlib.contextmanager
def storescp(work: Path) -> Iterator[tuple[int, str, Callable[[], int]]]:
    port = free_port()
    out = work / "out"
    out.mkdir()
    with open(work / "storescp.log", "wb") as log:
        proc = subprocess.Popen(["storescp", "--fork", "-aet", "STORESCP", "-od", str(out), str(port)],
                                env=dcmtk_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
        yield port, "STORESCP", lambda: sum(1 for _ in out.iterdir())
    finally:
        stop_process(proc)


@contextlib.contextmanager
def orthanc(work: Path) -> Iterator[tuple[int, str, Callable[[], int]]]:
    # SyncStorageArea: fsync per instance (Orthanc's default, said here because the table compares it);
    # StableAge at Orthanc's default, so no stable-study work runs during the measurement.
    extra = {"SyncStorageArea": True, "DicomThreadsCount": 4, "StableAge": 60}
    pacs = Orthanc(work, name="bench", extra=extra)
    try:
        pacs.start(timeout=30)
        yield pacs.dicom_port, "ORTHANC", pacs.instance_count
    finally:
        pacs.stop()


PEERS: dict[str, Callable[[Path], contextlib.AbstractContextManager[tuple[int, str, Callable[[], int]]]]] = {
    "storescp": storescp,
    "glowtriage": glowtriage,  # dicom.workers = 0: the shipped default (half the cores, at least 1)
    "glowtriage-1proc": functools.partial(glowtriage, workers=1),  # the listener in one process
    "glowtriage-2proc": functools.partial(glowtriage, workers=2),  # two receiver processes
    "orthanc": orthanc,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="instances (default 2000; e.g. 200 for a smoke run)")
    ap.add_argument("--associations", default="4,1",
                    help="parallel storescu processes; a comma list runs each count in turn (default 4,1)")
    ap.add_argument("--size", type=int, default=256, help="rows = columns (default 256)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ",".join(PEERS))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest.json")
    args = ap.parse_args(argv)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (Debian package dcmtk)", file=sys.stderr)
            return 2

    rows: list[dict[str, Any]] = []
    instance_bytes = 0
    probe_before = probe_after = float("nan")
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        base = Path(tmp)
        t = time.perf_counter()
        files = generate(base / "data", args.n, args.size)
        instance_bytes = files[0].stat().st_size
        print(f"generated {len(files)} instances of {files[0].stat().st_size} bytes in "
              f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
        probe_before = fsync_probe(base / "probe")
        counts = [max(1, int(a)) for a in str(args.associations).split(",") if a.strip()]
        for k in counts:
            groups = [files[i::k] for i in range(k)]
            for name in [p.strip() for p in args.peers.split(",") if p.strip()]:
                work = base / f"{name}-{k}"
                work.mkdir()
                with PEERS[name](work) as (port, aet, count):
                    seconds = storescu_parallel(port, groups, called=aet, calling="BENCHSCU")
                    deadline = time.monotonic() + 30
                    got = count()
                    while got < len(files) and time.monotonic() < deadline:
                        time.sleep(0.2)
                        got = count()
                rows.append({"peer": name, "associations": k, "instances": got, "sent": len(files),
                             "seconds": round(seconds, 3), "inst_per_s": round(len(files) / seconds, 1)})
                print(f"{name} x{k}: {got}/{len(files)} in {seconds:.2f} s", file=sys.stderr)
        probe_after = fsync_probe(base / "probe")

    for r in rows:  # each peer against storescp at the same association count
        ref = next((x["inst_per_s"] for x in rows
                    if x["peer"] == "storescp" and x["associations"] == r["associations"]), None)
        r["ratio_vs_storescp"] = round(r["inst_per_s"] / ref, 3) if ref else None
    print(f"\n{'peer':<18}{'assocs':>7}{'instances':>10}{'seconds':>10}{'inst/s':>10}{'vs storescp':>13}")
    for r in rows:
        ratio = f"{r['ratio_vs_storescp']:.2f}" if r["ratio_vs_storescp"] is not None else "-"
        print(f"{r['peer']:<18}{r['associations']:>7}{r['instances']:>10}{r['seconds']:>10.2f}"
              f"{r['inst_per_s']:>10.1f}{ratio:>13}")
    print(f"disk: write+fsync+rename+dir fsync of one {instance_bytes}-byte file took "
          f"{probe_before:.2f} ms before and {probe_after:.2f} ms after the run")
    result = {
        "benchmark": "ingest",
        "n": args.n, "associations": str(args.associations), "size": args.size,
        "instance_bytes": instance_bytes,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "durability": {"glowtriage (and -1proc)": (
                           "rename into the spool, then fsync of the file, directory fsync and a SQLite "
                           "WAL commit fsync'd, all three at the same time (the last two shared by "
                           "concurrent instances and worker processes), all before each success status; "
                           "start-up recovery drops or quarantines a file a crash caught before its fsync"),
                       "storescp": "no fsync", "orthanc": "SyncStorageArea=true (fsync per instance)"},
        "fsync_probe_ms": {"before": round(probe_before, 3), "after": round(probe_after, 3)},
        "results": rows,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    ok = all(r["instances"] == r["sent"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
