"""Where an instance's time goes in glowtriage's receiver: milliseconds per stage, per instance.

Why: the ingest bench (``bench/ingest_bench.py``) gives one number per peer; this one splits it. The
receiver runs in this process (``dicom.workers = 1``) with timing wrappers around pynetdicom's PDU
read, its DIMSE decode (which also writes the dataset's file), the socket send of the response, and
each step of our C-STORE handler (inspect, hash, SOP lock, rename, rows written, then the three
waits that run at once: file fsync, folder fsync, log fsync). One ``storescu`` per association sends
the same synthetic CT slices the ingest bench sends.

    python bench/ingest_stages.py [--n 300] [--associations 1,4] [--out FILE.json]

Stages overlap (the folder fsync runs beside the commit; threads of other associations run
meanwhile), so the rows do not add up to the wall time per instance; "gap" is the time from one
handler's return to the next handler's start on the same association: response send, the sender's
next request, PDU reads and decode.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.harness.config import write_config  # noqa: E402
from training.harness.ports import free_port  # noqa: E402
from training.harness.series import write_ct_series  # noqa: E402
from training.harness.storescu import storescu_parallel  # noqa: E402

_samples: dict[str, list[float]] = defaultdict(list)
_samples_lock = threading.Lock()


def _record(name: str, seconds: float) -> None:
    with _samples_lock:
        _samples[name].append(seconds * 1000.0)


def _timed(name: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _record(name(*args, **kwargs) if callable(name) else name, time.perf_counter() - t)

    return wrapper


def _timed_cm(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A context-manager function timed from enter to the end of enter (the wait for the lock)."""

    @functools.wraps(fn)
    @contextlib.contextmanager
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[None]:
        t = time.perf_counter()
        with fn(*args, **kwargs):
            _record(name, time.perf_counter() - t)
            yield

    return wrapper


def instrument() -> None:
    """Timing wrappers on the receive path (module attributes, looked up at call time)."""
    import pynetdicom.dimse_messages as dm
    import pynetdicom.dul as dul
    import pynetdicom.transport as tr

    import triage.receive.scp as scp
    import triage.store.db as db
    import triage.store.soplock as soplock
    import triage.store.spool as spool

    dul.DULServiceProvider._read_pdu_data = _timed("pdu_read", dul.DULServiceProvider._read_pdu_data)
    dm.DIMSEMessage.decode_msg = _timed("dimse_decode+file_write", dm.DIMSEMessage.decode_msg)
    tr.AssociationSocket.send = _timed("socket_send", tr.AssociationSocket.send)
    scp.Receiver._store = _timed("handler_total", scp.Receiver._store)
    scp.Receiver._materialize = _timed("materialize", scp.Receiver._materialize)
    scp.inspect_instance = _timed("inspect", scp.inspect_instance)
    db.dataset_sha256 = _timed("sha256", db.dataset_sha256)
    file_fsync = db.fsync_file
    db.fsync_file = _timed(lambda p: "wal_fsync(os)" if str(p).endswith(("-wal", ".db")) else "file_fsync",
                           file_fsync)
    soplock.SopLocks.hold = _timed_cm("sop_lock_wait", soplock.SopLocks.hold)
    spool.Spool.rename_into = _timed("rename", spool.Spool.rename_into)
    sync = spool.GroupSync.sync
    spool.GroupSync.sync = _timed(lambda self: "wal_fsync_wait" if str(self.path).endswith("-wal")
                                  else "dir_fsync_wait", sync)
    db.Store._fsync_wal = _timed("wal_fsync_call", db.Store._fsync_wal)
    db.Store._write_rows = _timed("rows_written(group commit, no fsync)", db.Store._write_rows)
    db.Store._run_batch = _timed("commit_batch_sql(leader)", db.Store._run_batch)


def gaps(handler_spans: dict[int, list[tuple[float, float]]]) -> list[float]:
    """Per association: handler end -> next handler start, in ms."""
    out: list[float] = []
    for spans in handler_spans.values():
        spans.sort()
        out += [(b[0] - a[1]) * 1000.0 for a, b in itertools.pairwise(spans)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--associations", default="1,4")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    instrument()
    import triage.receive.scp as scp
    from triage.config import load
    from triage.ops.logs import configure
    from triage.store.db import Store

    configure("warning", "json")
    spans: dict[int, list[tuple[float, float]]] = defaultdict(list)
    inner = scp.Receiver._on_store

    def on_store(self: Any, event: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(self, event)
        finally:
            with _samples_lock:
                spans[id(event.assoc)].append((t, time.perf_counter()))

    scp.Receiver._on_store = on_store  # type: ignore[method-assign]
    report: dict[str, Any] = {"n": args.n, "runs": []}
    with tempfile.TemporaryDirectory(prefix="ingest-stages-") as tmp:
        base = Path(tmp)
        files = write_ct_series(base / "data", args.n, 256, seed=0, signed=True, prefix="")
        for k in [int(a) for a in args.associations.split(",")]:
            port = free_port()
            root = base / f"var{k}"
            cfg = load(write_config(base / f"config{k}.toml", {
                "dicom": {"ae_title": "GLOWTRIAGE", "host": "127.0.0.1", "port": port,
                          "max_associations": 16, "workers": 1},
                "storage": {"root": str(root), "min_free_mb": 64},
                "logging": {"level": "warning", "format": "json"},
            }))
            store = Store(root)
            store.recover()
            rx = scp.Receiver(cfg, store)
            rx.start()
            _samples.clear()
            spans.clear()
            cpu0 = time.process_time()
            try:
                seconds = storescu_parallel(port, [files[i::k] for i in range(k)], called="GLOWTRIAGE",
                                            calling="BENCHSCU")
            finally:
                rx.stop()
                stored = store.instance_total()
                store.close()
            cpu_ms = (time.process_time() - cpu0) * 1000.0 / len(files)
            n = len(files)
            rows = {name: {"calls": len(v), "mean_ms": round(statistics.fmean(v), 3),
                           "median_ms": round(statistics.median(v), 3),
                           "per_instance_ms": round(sum(v) / n, 3)}
                    for name, v in sorted(_samples.items())}
            g = gaps(spans)
            if g:
                rows["gap(handler end->next start)"] = {
                    "calls": len(g), "mean_ms": round(statistics.fmean(g), 3),
                    "median_ms": round(statistics.median(g), 3), "per_instance_ms": round(sum(g) / n, 3)}
            run = {"associations": k, "instances": n, "stored": stored, "seconds": round(seconds, 3),
                   "inst_per_s": round(n / seconds, 1),
                   "wall_ms_per_instance_per_association": round(seconds * 1000 * k / n, 3),
                   "receiver_cpu_ms_per_instance": round(cpu_ms, 3), "stages": rows}
            report["runs"].append(run)
            print(f"\n{k} association(s): {n} instances in {seconds:.2f} s = {n / seconds:.1f}/s, "
                  f"{run['wall_ms_per_instance_per_association']:.2f} ms per instance per association "
                  f"(stored {stored}); receiver CPU {cpu_ms:.2f} ms per instance")
            print(f"{'stage':<32}{'calls':>7}{'mean ms':>10}{'median ms':>11}{'ms/inst':>10}")
            for name, r in rows.items():
                print(f"{name:<32}{r['calls']:>7}{r['mean_ms']:>10.3f}{r['median_ms']:>11.3f}"
                      f"{r['per_instance_ms']:>10.3f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
