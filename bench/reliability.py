"""The reliability campaign of issue 14 in one command: faults and misbehaving peers against the real
daemon (``triage serve`` as a subprocess, over loopback), each case with its invariant.

    python bench/reliability.py [--small] [--cases idle,kill,fuzz,load,disk,statedb] [--out FILE]

Cases (full size / ``--small``, which is what tests/integration/test_reliability.py runs):

* idle: 200 idle TCP connections + 1 half-sent A-ASSOCIATE-RQ; a real sender's C-ECHO, C-STORE (pynetdicom)
  and storescu must be answered within 1 s; ARTIM closes the silent ones; C-ECHO at once after they close.
* kill: ``kill -9`` at random moments while 4 associations send (50 / 3 cycles): 0 acknowledged lost.
* fuzz: 10^5 inputs (full) in four kinds: PDU-level (named protocol faults + hypothesis-mutated
  A-ASSOCIATE-RQs, 10^4 / 200), dataset-level mutations (10^4 / 200), TLS handshakes cut short against a
  TLS-only daemon (self-signed certificate; partial ClientHello, close/RST/junk after the ServerHello;
  2000 / 30) and coverage-guided atheris runs of the Part-10 walker, the instance walk and the header
  reader (bench/fuzz_targets.py, 3 x 26000 / 3 x 2000): the daemons never die, no traceback in their
  logs, C-ECHO (plain and TLS) and a valid C-STORE work afterwards, every failure status carries an
  error comment, RSS bounded, no atheris target raises anything but its documented refusal.
* load: 20 x 500 / 4 x 25 concurrent storescu associations: all stored, peak RSS.
* disk: disk full mid-transfer (a 3 MB tmpfs; needs root): every instance answered success or
  0xA700/0xA701, nothing half-written in the spool, the refused ones stored once space is back.
* statedb: state.db corrupt and lost: the daemon refuses to start naming the file and the command,
  ``triage store rebuild`` restores the index, 0 acknowledged lost.

* outage: PACS (Orthanc) and RIS (MLLP) down for 600 / 15 s while 50 / 2 studies arrive (a tiny model set
  trained first): every study ends ``sent`` with exactly one SR and one ORU^R01 after they return, the
  first delivery within the back-off bound (1.1 x outbox.backoff_max_s + poll_s; 60 / 10 s); the daemon's
  /metrics scraped every 5 / 1 s before, during and after (results waiting, oldest age, retries per
  destination) and the shipped alert rules evaluated by a real Prometheus: GlowtriageDeliveryStalled fires
  during a 10-minute outage and clears after (and stays silent during a 15 s one).

* killresults: ``kill -9`` at random moments while 10 / 4 studies are assembled, scored, reported and sent
  (50 / 4 kills): every study ends ``sent`` with exactly one SR and one ORU^R01.

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
    # 10^5 fuzzed inputs in all: over the network (PDU-level, dataset-level, TLS handshakes cut short)
    # and coverage-guided in process (atheris: 3 targets x fuzz_atheris; bench/fuzz_targets.py)
    "fuzz_pdu": 10_000,
    "fuzz_dataset": 10_000,
    "fuzz_tls": 2_000,
    "fuzz_atheris": 26_000,
    # concurrent fuzzing clients over the network (most of a case is the daemon waiting for ARTIM)
    "fuzz_workers": 8,
    "load": (20, 500),
    "outage": (50, 600.0),
    "outage_backoff": (60.0, 5.0),  # outbox.backoff_max_s, scrape/evaluation interval (s)
    "kill_results": (10, 50),
}
SMALL = {
    "idle": 200,
    "kill_cycles": 3,
    "fuzz_pdu": 200,
    "fuzz_dataset": 200,
    "fuzz_tls": 30,
    "fuzz_atheris": 2_000,
    "fuzz_workers": 2,
    "load": (4, 25),
    "outage": (2, 15.0),
    "outage_backoff": (10.0, 1.0),
    "kill_results": (4, 4),
}
CASES = ("idle", "kill", "fuzz", "load", "disk", "statedb", "outage", "killresults")


class Daemon:
    """``triage serve`` on a fresh storage root under ``base`` (ready once it listens)."""

    def __init__(
        self, base: Path, root: Path | None = None, tls: dict[str, Any] | None = None, **dicom: Any
    ) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.root = root or base / "var"
        sections: dict[str, dict[str, Any]] = {
            "dicom": {"ae_title": "GLOWTRIAGE", "host": "127.0.0.1", "port": self.port, **dicom},
            "storage": {"root": str(self.root), "min_free_mb": 0 if root else 1},
            "logging": {"level": "info", "format": "json"},
            "metrics": {"enabled": False},
        }
        if tls:
            sections["dicom.tls"] = {"enabled": True, **tls}
        cfg = write_config(base / "config.toml", sections)
        self.proc = TriageProcess(
            cfg,
            base / "daemon.log",
            argv=SERVE,
            ready_event="listening",
            start_timeout=600.0,  # a loaded 2-core machine can take minutes to import torch
            stop_grace=30.0,
        )

    def __enter__(self) -> Daemon:
        self.proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stop()

    def tracebacks(self) -> int:
        return self.proc.log_text().count("Traceback")

    def traceback_samples(self, n: int = 3) -> list[str]:
        """Up to ``n`` distinct tracebacks from the log (with the line before them), for the JSON: the
        log itself goes with the temporary folder."""
        text, out, seen, at = self.proc.log_text(), [], set(), 0
        while len(out) < n and (i := text.find("Traceback", at)) >= 0:
            sample = text[max(0, i - 300) : i + 2500]
            key = sample[300:].split("Error", 1)[0][-200:]
            if key not in seen:
                seen.add(key)
                out.append(sample)
            at = i + 1
        return out


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
    import fuzz_targets
    from reliability_cases import tls

    sources = write_ct_series(work / "ct", 4, 32, seed=11)
    valid = write_ct_series(work / "valid", 1, 32, seed=12)
    with Daemon(work / "d", artim_timeout_s=0.5) as d:
        assert d.proc.proc is not None
        rss0 = ingest.rss_kb(d.proc.proc.pid)
        t0 = time.perf_counter()
        workers = int(size.get("fuzz_workers", 1))
        pdus = fuzz.pdu_cases(d.port, size["fuzz_pdu"], workers=workers)
        datasets = fuzz.dataset_cases(d.port, sources, size["fuzz_dataset"], work / "mut", workers=workers)
        seconds = time.perf_counter() - t0
        rss1 = ingest.rss_kb(d.proc.proc.pid)
        alive = d.proc.running
        echo, _ = sockets.timed_echo(d.port)
        statuses, _ = sockets.timed_store(d.port, valid)
        tracebacks = d.tracebacks()
        samples = d.traceback_samples()
    # TLS handshakes cut short, against a TLS-only listener with a throw-away self-signed certificate
    cert, key = tls.self_signed(work / "pki")
    with Daemon(work / "tls", artim_timeout_s=0.5, tls={"cert_file": str(cert), "key_file": str(key)}) as t:
        assert t.proc.proc is not None
        t_rss0 = ingest.rss_kb(t.proc.proc.pid)
        t1 = time.perf_counter()
        tls_got = tls.tls_cases(t.port, cert, size["fuzz_tls"])
        tls_got["seconds"] = round(time.perf_counter() - t1, 1)
        tls_got["rss_kb_before"], tls_got["rss_kb_after"] = t_rss0, ingest.rss_kb(t.proc.proc.pid)
        tls_got["alive"] = t.proc.running
        tls_got["echo_after"] = tls.tls_echo(t.port, cert)
        tls_got["tracebacks"] = t.tracebacks()
        tls_got["handshake_failures_logged"] = sum(
            1 for e in t.proc.log_events() if e.get("event") in ("tls_handshake_failed", "artim_expired")
        )
    # coverage-guided, in process: the Part-10 walker, the instance walk, the header reader
    atheris_got = [
        fuzz_targets.run_target(name, size["fuzz_atheris"], work / "atheris" / name)
        for name in fuzz_targets.TARGETS
    ]
    atheris_runs = sum(a["runs"] for a in atheris_got)
    atheris_crashes = sum(a["crashes"] for a in atheris_got)
    tls_ok = (
        tls_got["alive"]
        and tls_got["echo_after"] == "P-DATA"
        and tls_got["named"]["TLS: a valid C-ECHO (control)"] == "P-DATA"
        and tls_got["tracebacks"] == 0
    )
    ok = (
        alive
        and echo == 0
        and statuses == [0]
        and tracebacks == 0
        and datasets["failures_without_reason"] == 0
        and datasets["without_status"] == 0
        and tls_ok
        and atheris_crashes == 0
    )
    network = pdus["structured_total"] + len(pdus["named"]) + datasets["sent"]
    tls_n = tls_got["random_total"] + len(tls_got["named"])
    n = network + tls_n + atheris_runs
    per_target = ", ".join(f"{a['target']} {a['runs']}" for a in atheris_got)
    mb = {k: v // 1024 for k, v in rss1.items()}
    figures = (
        f"{n} inputs: {pdus['structured_total'] + len(pdus['named'])} PDU-level + {datasets['sent']} "
        f"dataset-level ({seconds:.0f} s), {tls_n} TLS handshakes cut short ({tls_got['seconds']:.0f} s), "
        f"{atheris_runs} atheris ({per_target}); "
        f"crashes: daemon {0 if alive and tls_got['alive'] else 1}, atheris {atheris_crashes}; "
        f"tracebacks {tracebacks + tls_got['tracebacks']}; RSS "
        f"{rss0.get('VmRSS', 0) // 1024}->{mb.get('VmRSS', 0)} MB (peak {mb.get('VmHWM', 0)})"
    )
    return {
        "ok": ok,
        "figures": figures,
        "inputs_total": n,
        "alive": alive,
        "echo_after": echo,
        "store_after": statuses,
        "tracebacks": tracebacks,
        "traceback_samples": samples,
        "rss_kb_before": rss0,
        "rss_kb_after": rss1,
        "pdu": pdus,
        "dataset": datasets,
        "tls": tls_got,
        "atheris": atheris_got,
        "atheris_runs": atheris_runs,
        "atheris_crashes": atheris_crashes,
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
    from reliability_cases.alerting import OUTAGE_ALERT

    studies, down_s = size["outage"]
    backoff_max_s, scrape_s = size["outage_backoff"]
    got = outage.outage_case(work, studies=studies, down_s=down_s, backoff_max_s=backoff_max_s,
                             scrape_s=scrape_s)
    m = got["metrics"]
    during = m["during"]
    # the shipped rule needs 3 min of waiting + 2 min pending: a shorter outage must not page, a longer
    # one must page during it and clear once the outbox has drained
    must_fire = down_s >= 180 + 120 + 60
    fired, cleared = m["alert_firing_during_outage"], m["alert_cleared_at_s"] is not None
    alert_ok = (not m["alert_evaluated"]) or (fired and cleared if must_fire else not fired)
    ok = (
        got["storescu_rc"] == 0
        and got["results_lost"] == 0
        and got["results_doubled"] == 0
        and got["sr_per_study"] == [1]
        and got["oru_per_study"] == [1]
        and got["first_delivery_within_bound"]
        and during.get("depth_reported", {}).get("max", 0) > 0
        and any(k.startswith("retries_") and v["last"] > v["first"] for k, v in during.items()
                if isinstance(v, dict))
        and m["after"].get("depth_reported", {}).get("last") == 0
        and alert_ok
    )
    if not m["alert_evaluated"]:
        alert = "alert not evaluated (no prometheus)"
    else:
        alert = (
            f"{OUTAGE_ALERT} fired {m['alert_fired_after_outage_start_s']} s into the outage, cleared "
            f"{m['alert_cleared_after_return_s']} s after return" if fired
            else f"{OUTAGE_ALERT} did not fire (outage shorter than its 3 min + 2 min)"
        )
    retries = {k[8:]: int(v["last"]) for k, v in during.items() if k.startswith("retries_")}
    waiting = int(during.get("depth_reported", {}).get("max", 0))
    oldest = int(during.get("oldest_reported_s", {}).get("max", 0))
    figures = (
        f"{studies} studies during {got.get('down_s_actual', down_s):.0f} s down: "
        f"{got['results_lost']} lost, {got['results_doubled']} doubled; "
        f"during: up to {waiting} waiting, oldest {oldest} s, retries {retries}; "
        f"{alert}; first delivery {got['first_delivery_after_return_s']} s after return "
        f"(bound 1.1 x backoff_max_s {backoff_max_s:.0f} + poll = {got['backoff_bound_s']} s), "
        f"all in {got['delivered_after_return_s']} s"
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
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=N",
        help="override one size (e.g. fuzz_dataset=1000) when the full size cannot run; recorded in the JSON",
    )
    ap.add_argument(
        "--tiny-models",
        metavar="DIR",
        help="DIR/m0.pt and DIR/m1.pt (test-tiny, as the outage case trains them) for the model-set cases",
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the other cases' results already in the JSON file (cases run in separate invocations)",
    )
    args = ap.parse_args(argv)
    size = dict(SMALL if args.small else FULL)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            if isinstance(size.get(key), tuple):  # e.g. kill_results=10,20
                parts = value.split(",")
                if len(parts) != len(size[key]):
                    raise ValueError(value)
                new: Any = tuple(type(old)(x) for old, x in zip(size[key], parts, strict=True))
            else:
                new = int(value)
        except (ValueError, TypeError):
            ap.error(f"--set {item}: expected KEY=N or KEY=N,M with KEY one of {', '.join(size)}")
        overrides[key] = size[key] = new
    if args.tiny_models:  # the outage/killresults cases reuse these instead of training (plumbing only)
        for f in ("m0.pt", "m1.pt"):
            src = Path(args.tiny_models) / f
            if not src.is_file():
                ap.error(f"--tiny-models: no {src}")
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
            if args.tiny_models and name in ("outage", "killresults"):
                (work / name).mkdir(parents=True, exist_ok=True)
                for f in ("m0.pt", "m1.pt"):
                    shutil.copy2(Path(args.tiny_models) / f, work / name / f)
            try:
                results[name] = RUNNERS[name](work / name, size)
            except Exception as exc:  # one case failing must not hide the others' figures
                results[name] = {"ok": False, "figures": f"error: {type(exc).__name__}: {exc}"[:300]}
            results[name]["case_seconds"] = round(time.perf_counter() - t0, 1)
            results[name]["ran_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            results[name]["size"] = "small" if args.small else "full"
            if overrides:
                results[name]["size_overrides"] = overrides
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
    if args.merge and out.exists():
        results = {**json.loads(out.read_text()).get("results", {}), **results}
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
