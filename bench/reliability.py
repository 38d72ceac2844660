"""The reliability campaign of issue 14 in one command: faults and misbehaving peers against the real
daemon (``triage serve`` as a subprocess, over loopback), each case with its invariant.

    python bench/reliability.py [--small] [--cases idle,kill,fuzz,load,disk,statedb] [--out FILE]

Cases (full size / ``--small``, which is what tests/integration/test_reliability.py runs):

* idle: 200 idle TCP connections + 1 half-sent A-ASSOCIATE-RQ; a real sender's C-ECHO, C-STORE (pynetdicom)
  and storescu must be answered within 1 s; ARTIM closes the silent ones; C-ECHO at once after they close.
* kill: ``kill -9`` at random moments while 4 associations send (50 / 3 cycles): 0 acknowledged lost.
* fuzz: PDU-level (named protocol faults + hypothesis-mutated A-ASSOCIATE-RQs) and dataset-level mutations
  (5*10^4 + 5*10^4 / 200 + 200): the daemon never dies, no traceback in its log, C-ECHO and a valid
  C-STORE work afterwards, every failure status carries an error comment, RSS bounded.
* load: 20 x 500 / 4 x 25 concurrent storescu associations: all stored, peak RSS.
* disk: disk full mid-transfer (a 3 MB tmpfs; needs root): every instance answered success or
  0xA700/0xA701, nothing half-written in the spool, the refused ones stored once space is back.
* statedb: state.db corrupt and lost: the daemon refuses to start naming the file and the command,
  ``triage store rebuild`` restores the index, 0 acknowledged lost.

* outage: PACS (Orthanc) and RIS (MLLP) down for 600 / 15 s while 50 / 2 studies arrive (a tiny model set
  trained first): every study ends ``sent`` with exactly one SR and one ORU^R01 after they return.

* killresults: ``kill -9`` at random moments while 10 / 4 studies are assembled, scored, reported and sent
  (50 / 4 kills): every study ends ``sent`` with exactly one SR and one ORU^R01.

Not here (yet): TLS handshakes cut short (the gate's ARTIM covers
them; the fuzz daemon listens in plain TCP).

Prints a table and writes JSON (default bench/results/reliability[-small].json).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from reliability_cases import disk, fuzz, ingest, outage, sockets, statedb  # noqa: E402

from training.harness.config import write_config  # noqa: E402
from training.harness.daemon import SERVE, TriageProcess  # noqa: E402
from training.harness.ports import free_port  # noqa: E402
from training.harness.series import write_ct_series  # noqa: E402

FULL = {
    "idle": 200,
    "kill_cycles": 50,
    "fuzz_pdu": 50_000,
    "fuzz_dataset": 50_000,
    "load": (20, 500),
    "outage": (50, 600.0),
    "kill_results": (10, 50),
}
SMALL = {
    "idle": 200,
    "kill_cycles": 3,
    "fuzz_pdu": 200,
    "fuzz_dataset": 200,
    "load": (4, 25),
    "outage": (2, 15.0),
    "kill_results": (4, 4),
}
CASES = ("idle", "kill", "fuzz", "load", "disk", "statedb", "outage", "killresults")


class Daemon:
    """``triage serve`` on a fresh storage root under ``base`` (ready once it listens)."""

    def __init__(self, base: Path, root: Path | None = None, **dicom: Any) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.root = root or base / "var"
        cfg = write_config(
            base / "config.toml",
            {
                "dicom": {"ae_title": "GLOWTRIAGE", "host": "127.0.0.1", "port": self.port, **dicom},
                "storage": {"root": str(self.root), "min_free_mb": 0 if root else 1},
                "logging": {"level": "info", "format": "json"},
                "metrics": {"enabled": False},
            },
        )
        self.proc = TriageProcess(
            cfg,
            base / "daemon.log",
            argv=SERVE,
            ready_event="listening",
            start_timeout=120.0,
            stop_grace=30.0,
        )

    def __enter__(self) -> Daemon:
        self.proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stop()

    def tracebacks(self) -> int:
        return self.proc.log_text().count("Traceback")


# ----------------------------------------------------------------------------------------- cases
def run_idle(work: Path, size: dict[str, Any]) -> dict[str, Any]:
    files = write_ct_series(work / "ct", 2, 32, seed=7)
    with Daemon(work / "d", artim_timeout_s=3.0) as d:
        got = sockets.idle_socket_case(d.port, files, n_idle=size["idle"], source="127.0.0.2", artim_s=3.0)
    ok = (
        got["echo_status"] == 0
        and got["echo_s"] < 1
        and got["store_statuses"] == [0]
        and got["store_s"] < 1
        and got["storescu_rc"] == 0
        and got["storescu_s"] < 1
        and got["echo_after_close_s"] < 1
        and got["closed_by_server_within_artim"] == size["idle"] + 1
    )
    figures = (
        f"echo {got['echo_s'] * 1000:.0f} ms, C-STORE {got['store_s'] * 1000:.0f} ms, storescu "
        f"{got['storescu_s'] * 1000:.0f} ms while open; echo {got['echo_after_close_s'] * 1000:.0f} ms after"
    )
    return {"ok": ok, "figures": figures, **got}


def run_kill(work: Path, size: dict[str, Any]) -> dict[str, Any]:
    with Daemon(work / "d") as d:
        got = ingest.kill_cycles_case(d.proc, d.port, d.root, work / "ct", cycles=size["kill_cycles"])
        tracebacks = d.tracebacks()
    ok = got["acknowledged_lost"] == 0 and got["acknowledged_corrupt"] == 0 and got["acknowledged"] > 0
    figures = (
        f"{got['cycles']} cycles, {got['acknowledged']} acknowledged, {got['acknowledged_lost']} lost, "
        f"restart median {got['restart_s_median']} s"
    )
    return {"ok": ok, "figures": figures, "tracebacks": tracebacks, **got}


def run_fuzz(work: Path, size: dict[str, Any]) -> dict[str, Any]:
    sources = write_ct_series(work / "ct", 4, 32, seed=11)
    valid = write_ct_series(work / "valid", 1, 32, seed=12)
    with Daemon(work / "d", artim_timeout_s=0.5) as d:
        assert d.proc.proc is not None
        rss0 = ingest.rss_kb(d.proc.proc.pid)
        t0 = time.perf_counter()
        pdus = fuzz.pdu_cases(d.port, size["fuzz_pdu"])
        datasets = fuzz.dataset_cases(d.port, sources, size["fuzz_dataset"], work / "mut")
        seconds = time.perf_counter() - t0
        rss1 = ingest.rss_kb(d.proc.proc.pid)
        alive = d.proc.running
        echo, _ = sockets.timed_echo(d.port)
        statuses, _ = sockets.timed_store(d.port, valid)
        tracebacks = d.tracebacks()
    ok = (
        alive
        and echo == 0
        and statuses == [0]
        and tracebacks == 0
        and datasets["failures_without_reason"] == 0
        and datasets["without_status"] == 0
    )
    n = pdus["structured_total"] + len(pdus["named"]) + datasets["sent"]
    figures = (
        f"{n} inputs in {seconds:.0f} s; alive {alive}, tracebacks {tracebacks}, RSS "
        f"{rss0.get('VmRSS', 0) // 1024}->{rss1.get('VmRSS', 0) // 1024} MB"
    )
    return {
        "ok": ok,
        "figures": figures,
        "alive": alive,
        "echo_after": echo,
        "store_after": statuses,
        "tracebacks": tracebacks,
        "rss_kb_before": rss0,
        "rss_kb_after": rss1,
        "pdu": pdus,
        "dataset": datasets,
        "seconds": round(seconds, 1),
    }


def run_load(work: Path, size: dict[str, Any]) -> dict[str, Any]:
    c, m = size["load"]
    with Daemon(work / "d", max_associations=max(16, c), max_connections_per_peer=max(16, c)) as d:
        got = ingest.load_case(d.proc, d.port, d.root, work / "ct", associations=c, per_association=m)
    ok = got["missing"] == 0
    figures = (
        f"{c} x {m}: {got['instances'] - got['missing']}/{got['instances']} stored, "
        f"{got['instances_per_s']} inst/s, peak RSS {got['rss_peak_mb']} MB"
    )
    return {"ok": ok, "figures": figures, **got}


def run_disk(work: Path, size: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    from conftest import send_files  # the exact-status pynetdicom SCU the tests use

    files = write_ct_series(work / "ct", 30, 256, seed=5)
    mount = work / "tiny"
    try:
        ctx = disk.tmpfs(mount, 3)
        ctx.__enter__()
    except OSError as exc:
        return {"ok": None, "figures": f"not run: {exc}"}
    try:
        with Daemon(work / "d", root=mount / "var") as d:
            got = disk.disk_full_case(
                d.port, d.root, mount, files, send_files, lambda p: sockets.timed_echo(p)[0]
            )
    finally:
        ctx.__exit__(None, None, None)
    ok = (
        got["answered"] == got["sent"]
        and not got["other_statuses"]
        and got["acknowledged_missing"] == 0
        and got["acknowledged_corrupt"] == 0
        and got["spool_files_without_row"] == 0
        and got["tmp_leftovers"] == 0
        and got["resent_success"] == got["resent"]
    )
    figures = (
        f"{got['success']} stored, {got['out_of_resources']} answered 0xA70x, "
        f"{got['spool_files_without_row']} half-written, {got['resent_success']} stored on resend"
    )
    return {"ok": ok, "figures": figures, **got}


def run_statedb(work: Path, size: dict[str, Any]) -> dict[str, Any]:
    files = write_ct_series(work / "ct", 10, 32, seed=3)
    results = {}
    for how in ("corrupt", "lost"):
        with Daemon(work / how) as d:
            results[how] = statedb.state_db_case(d.proc, d.port, d.root, files, how)
    ok = all(r["refused"] and r["rebuild_rc"] == 0 and r["lost"] == 0 for r in results.values())
    figures = "; ".join(
        f"{h}: refused {r['refused']}, rebuilt in {r['rebuild_s']} s, {r['lost']} lost"
        for h, r in results.items()
    )
    return {"ok": ok, "figures": figures, **results}


def run_outage(work: Path, size: dict[str, Any]) -> dict[str, Any]:
    studies, down_s = size["outage"]
    got = outage.outage_case(work, studies=studies, down_s=down_s)
    ok = (
        got["storescu_rc"] == 0
        and got["results_lost"] == 0
        and got["results_doubled"] == 0
        and got["sr_per_study"] == [1]
        and got["oru_per_study"] == [1]
    )
    figures = (
        f"{studies} studies during {down_s:.0f} s down: {got['results_lost']} lost, "
        f"{got['results_doubled']} doubled, all delivered {got['delivered_after_return_s']} s after return"
    )
    return {"ok": ok, "figures": figures, **got}


def run_kill_results(work: Path, size: dict[str, Any]) -> dict[str, Any]:
    studies, kills = size["kill_results"]
    got = outage.kill_during_results_case(work, studies=studies, kills=kills)
    ok = got["storescu_rc"] == 0 and got["results_lost"] == 0 and got["results_doubled"] == 0
    figures = (
        f"{kills} kills during assembly/scoring/sending of {studies} studies: {got['results_lost']} lost, "
        f"{got['results_doubled']} doubled (SR per study {got['sr_per_study']}, ORU {got['oru_per_study']})"
    )
    return {"ok": ok, "figures": figures, **got}


RUNNERS: dict[str, Callable[[Path, dict[str, Any]], dict[str, Any]]] = {
    "idle": run_idle,
    "kill": run_kill,
    "fuzz": run_fuzz,
    "load": run_load,
    "disk": run_disk,
    "statedb": run_statedb,
    "outage": run_outage,
    "killresults": run_kill_results,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="test-suite size (minutes, not hours)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--out", help="JSON file (default bench/results/reliability[-small].json)")
    args = ap.parse_args(argv)
    size = SMALL if args.small else FULL
    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in RUNNERS]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    out = (
        Path(args.out)
        if args.out
        else REPO / "bench" / "results" / ("reliability-small.json" if args.small else "reliability.json")
    )
    results: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="glow-reliability-"))
    try:
        for name in chosen:
            t0 = time.perf_counter()
            try:
                results[name] = RUNNERS[name](work / name, size)
            except Exception as exc:  # one case failing must not hide the others' figures
                results[name] = {"ok": False, "figures": f"error: {type(exc).__name__}: {exc}"[:300]}
            results[name]["case_seconds"] = round(time.perf_counter() - t0, 1)
            ok = results[name]["ok"]
            verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
            print(f"{name:8s} {verdict}  {results[name]['figures']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print("| case | size | invariant | figures |\n|---|---|---|---|")
    for name, r in results.items():
        verdict = "n/a" if r["ok"] is None else ("holds" if r["ok"] else "BROKEN")
        print(f"| {name} | {'small' if args.small else 'full'} | {verdict} | {r['figures']} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "size": "small" if args.small else "full",
                "sizes": size,
                "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "results": results,
            },
            indent=1,
            default=str,
        )
    )
    print(f"\nwritten {out}")
    return 0 if all(r["ok"] is not False for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
