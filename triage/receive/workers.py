"""Several receiver processes on one DICOM port, supervised: ``dicom.workers``.

Why processes: pynetdicom spends a few milliseconds of CPU per instance (PDU decoding, DIMSE
messages, its threads handing each other work) under one interpreter lock, so one process tops out
near one core however many associations arrive. Each worker here is a whole receiver (its own
pynetdicom AE, handshake gate and store connection) in its own interpreter.

How they share the port: the supervisor opens the one listening socket (so "port already taken" is
still an error at start, and a second glowtriage cannot silently share the port) and every worker
inherits it and accepts from it (non-blocking accept: whichever worker is free takes the next
connection, and a worker that dies leaves the kernel's queue of waiting connections to the others,
which ``SO_REUSEPORT``'s per-socket queues would drop).

What they share: the spool and ``state.db`` (WAL mode, a 30 s busy timeout: SQLite takes one writer at
a time; each worker's group commit holds the write lock only for its inserts, the fsync of the log is
shared, see :meth:`triage.store.db.Store._commit_index`). Durability is each worker's own: no success
status before the instance and its row are on disk.

What is per worker, and what is not:

* ``dicom.max_associations`` is per worker (pynetdicom counts its own associations);
* ``dicom.artim_timeout_s`` is per connection, so it means the same with any number of workers;
* ``dicom.max_connections_per_peer`` is for the whole port: each worker publishes its open
  connections per peer in a small shared table (:class:`~triage.receive.peers.PeerTable`, rewritten on
  each connection its gate admits, hands over or drops, and every 0.1 s for associations that ended),
  and a worker's check adds the others' counts to its own exact ones. Only connections from one peer
  arriving at two workers in the same instant can both pass the last slot.

Supervision: a worker that dies is restarted (at most once a second); ``stop()`` sends SIGTERM to all
(each lets running associations finish for a few seconds), then SIGKILL. Workers ask the kernel to
kill them if the supervisor dies (``PR_SET_PDEATHSIG``), so a ``kill -9`` of the daemon leaves no
worker behind still answering C-STOREs.

Workers report to the supervisor over one pipe, one short JSON line per event (atomic under
``PIPE_BUF``): the receiver's metric calls (so ``/metrics`` counts what every worker received) and,
through ``instance_received``, the wake-up of the assembler (see :class:`triage.daemon.Daemon`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pickle
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from triage.config import Config
from triage.ops.logs import get_logger
from triage.receive.peers import PeerTable

log = get_logger("receive")

MAX_WORKERS = 8  # the default never goes past this many, whatever the core count
_RESTART_MIN_S = 1.0
_PR_SET_PDEATHSIG = 1


def worker_count(cfg: Config) -> int:
    """``dicom.workers``, or when 0 half the CPU cores available to us (the other half is the scorer's),
    at least 1 and at most :data:`MAX_WORKERS`. On two cores that is 1: the listener stays in the daemon
    (measured there, a second worker added 2-7 % while its start-up slowed the daemon's on a loaded
    machine)."""
    n = int(getattr(cfg.settings.dicom, "workers", 1))
    if n > 0:
        return n
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores // 2))


# ------------------------------------------------------------------------------- relay
class Relay:
    """Stands in for ``METRICS`` in a worker: each call becomes one JSON line on the supervisor's
    pipe. A full pipe (supervisor not reading) drops the line rather than stall a C-STORE."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        os.set_blocking(fd, False)
        self.dropped = 0

    def send(self, name: str, *args: Any) -> None:
        line = (json.dumps([name, list(args)], separators=(",", ":")) + "\n").encode()
        if len(line) > select.PIPE_BUF:  # longer writes could interleave with another worker's
            return
        try:
            os.write(self._fd, line)
        except BlockingIOError:
            self.dropped += 1
        except OSError:  # supervisor gone: PR_SET_PDEATHSIG ends us soon
            self.dropped += 1

    def __getattr__(self, name: str) -> Callable[..., None]:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args: self.send(name, *args)


# the receiver's METRICS calls a worker may relay (anything else on the pipe is ignored)
RELAYED = frozenset({"instance_received", "instance_rejected", "association", "association_opened",
                     "association_closed"})


def apply_metric(name: str, args: list[Any]) -> bool:
    """Replay a worker's metric call on this process's ``METRICS``; False if not a relayed one."""
    if name not in RELAYED:
        return False
    from triage.ops.metrics import METRICS

    getattr(METRICS, name)(*args)
    return True


# ------------------------------------------------------------------------------- supervisor
class WorkerPool:
    """The listening socket and ``n`` worker processes accepting from it; restarts dead ones.

    ``on_event(name, args)`` runs on the pool's reader thread for every line a worker sends (metric
    calls, ``stored``).
    """

    def __init__(self, cfg: Config, n: int, on_event: Callable[[str, list[Any]], object]) -> None:
        self.cfg = cfg
        self.n = n
        self._on_event = on_event
        self._listen: socket.socket | None = None
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * n
        self._started_at = [0.0] * n
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._relay_r, self._relay_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self._peers_path = cfg.storage_root / "run" / f"peers-{os.getpid()}.shm"
        self._peers: PeerTable | None = None
        self.restarts = 0

    @property
    def address(self) -> tuple[str, int]:
        if self._listen is None:
            raise RuntimeError("worker pool is not started")
        host, port = self._listen.getsockname()[:2]
        return str(host), int(port)

    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._procs if p is not None and p.poll() is None]

    def start(self, wait_s: float = 120.0) -> None:
        """Listen, start every worker, and wait up to ``wait_s`` for each to accept: "listening" (and
        systemd's READY) then means served, not queued (about a second on an idle machine; a loaded
        one, where each worker's imports of pynetdicom and pydicom crawl, can take a minute).

        A worker that reports an error in that time stops the start (``ReceiverError``). One still
        starting after it is awaited in the background: the socket already listens, so a connection
        waits in the kernel's queue for the first worker to accept it rather than being refused. The
        TLS files are checked here first, so an unreadable certificate fails at once, as with one
        process.
        """
        from triage.receive.scp import ReceiverError, tls_context

        tls_context(self.cfg)  # raises ReceiverError naming the key
        d = self.cfg.settings.dicom
        family = socket.AF_INET6 if ":" in d.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((d.host, d.port))
            sock.listen(256)
        except OSError as exc:
            sock.close()
            raise ReceiverError(
                f"dicom.host/dicom.port: cannot listen on {d.host}:{d.port}: {exc.strerror or exc}"
            ) from exc
        sock.setblocking(False)  # shared by the workers: the ones that lose a race get EAGAIN
        self._listen = sock
        self._peers = PeerTable(self._peers_path, self.n, create=True)
        self._reader = threading.Thread(target=self._read_relay, name="workers-relay", daemon=True)
        self._reader.start()
        ready: list[tuple[int, int]] = []
        for i in range(self.n):
            ready.append(self._spawn(i))
        deadline = time.monotonic() + wait_s
        problems = []
        for i, fd in ready:
            msg = _read_ready(fd, deadline, close=False)
            if msg == _NOT_YET:
                threading.Thread(target=self._await_ready, args=(i, fd, "worker_ready"), daemon=True).start()
                continue
            if msg != "ok":
                problems.append(f"worker {i}: {msg}")
        if problems:
            self.stop(grace_s=1.0)
            raise ReceiverError("; ".join(problems))
        self._thread = threading.Thread(target=self._supervise, name="workers-supervisor", daemon=True)
        self._thread.start()
        host, port = self.address
        from triage.receive.reactor import copy_applies  # as each worker's Receiver decides it

        stock = os.environ.get("GLOWTRIAGE_STOCK_PYNETDICOM", "") == "1" or not copy_applies()
        log.info("listening", host=host, port=port, ae_title=d.ae_title, workers=self.n,
                 pids=self.pids(), reactor="stock" if stock else "event-driven",
                 tls=d.tls.enabled, artim_timeout_s=d.artim_timeout_s,
                 max_connections_per_peer=d.max_connections_per_peer,
                 max_associations_per_worker=d.max_associations)

    def _spawn(self, i: int) -> tuple[int, int]:
        """Start worker ``i``; returns (i, read end of its ready pipe)."""
        assert self._listen is not None
        ready_r, ready_w = os.pipe()
        payload = pickle.dumps({
            "cfg": self.cfg, "index": i, "workers": self.n, "listen_fd": self._listen.fileno(),
            "relay_fd": self._relay_w, "ready_fd": ready_w, "parent": os.getpid(),
            "peers": str(self._peers_path),
        })
        proc = subprocess.Popen(
            [sys.executable, "-m", "triage.receive.workers"], stdin=subprocess.PIPE,
            pass_fds=(self._listen.fileno(), self._relay_w, ready_w), close_fds=True,
        )
        os.close(ready_w)
        assert proc.stdin is not None
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except OSError:
            pass  # it died at once: the supervisor sees it
        with self._lock:
            self._procs[i] = proc
            self._started_at[i] = time.monotonic()
        return i, ready_r

    def _supervise(self) -> None:
        while not self._stop.wait(0.2):
            for i in range(self.n):
                with self._lock:
                    proc = self._procs[i]
                if proc is None or proc.poll() is None:
                    continue
                if time.monotonic() - self._started_at[i] < _RESTART_MIN_S:
                    continue  # crashing at start: not more than once a second
                log.error("worker_died", worker=i, pid=proc.pid, returncode=proc.returncode,
                          note="restarting it; the other workers kept accepting")
                self.restarts += 1
                _, fd = self._spawn(i)
                threading.Thread(target=self._await_ready, args=(i, fd, "worker_restarted"),
                                 daemon=True).start()

    def _await_ready(self, i: int, fd: int, event: str) -> None:
        msg = _read_ready(fd, time.monotonic() + 120.0)
        if msg == "ok":
            log.info(event, worker=i)
        else:  # it exits; the supervisor restarts it (once a second at most)
            log.error("worker_start_failed", worker=i, reason=msg)

    def _read_relay(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._relay_r, 65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    name, args = json.loads(line)
                    self._on_event(str(name), list(args))
                except Exception:  # a bad line must not end the reader
                    log.warning("worker_event_unreadable", exc_info=True)

    def stop(self, grace_s: float = 8.0) -> None:
        """SIGTERM every worker, ``grace_s`` for them to finish, then SIGKILL; close the socket."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        with self._lock:
            procs = [p for p in self._procs if p is not None]
        for p in procs:
            with contextlib.suppress(OSError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5.0)
        if self._listen is not None:
            self._listen.close()
        with contextlib.suppress(OSError):
            os.close(self._relay_w)  # the reader sees EOF once every worker's copy is closed too
        if self._reader is not None:
            self._reader.join(timeout=2.0)
        with contextlib.suppress(OSError):
            os.close(self._relay_r)
        if self._peers is not None:
            self._peers.close()
        self._peers_path.unlink(missing_ok=True)


_NOT_YET = "did not start in time"


def _read_ready(fd: int, deadline: float, *, close: bool = True) -> str:
    """The first line a worker writes on its ready pipe ("ok" or why it failed), or ``_NOT_YET``.
    The pipe is closed unless ``close`` is false and the answer is ``_NOT_YET``."""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    data = b""
    answer = _NOT_YET
    try:
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return answer
            chunk = os.read(fd, 4096)
            if not chunk:
                answer = data.decode(errors="replace").strip() or "exited before listening"
                return answer
            data += chunk
        answer = data.split(b"\n", 1)[0].decode(errors="replace")
        return answer
    finally:
        sel.close()
        if close or answer != _NOT_YET:
            os.close(fd)


# ------------------------------------------------------------------------------- worker side
def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL us when the supervisor dies; exit now if it already has."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def worker_main() -> int:
    """One worker: a Receiver on the inherited socket until SIGTERM (``python -m`` this module)."""
    spec = pickle.loads(sys.stdin.buffer.read())
    _die_with_parent(spec["parent"])
    import structlog

    from triage.ops.logs import configure
    from triage.receive import scp
    from triage.store.db import Store

    cfg: Config = spec["cfg"]
    index: int = spec["index"]
    ready_fd: int = spec["ready_fd"]
    configure(cfg.settings.logging.level, cfg.settings.logging.format)
    structlog.contextvars.bind_contextvars(worker=index)
    relay = Relay(spec["relay_fd"])
    scp.METRICS = relay  # type: ignore[assignment]  # the supervisor keeps /metrics
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    store = Store(cfg.storage_root)
    try:
        peers = PeerTable(Path(spec["peers"]), spec["workers"])
        receiver = scp.Receiver(cfg, store, listen_fd=spec["listen_fd"], peers=(peers, index))
        try:
            receiver.start(block=False)
        except scp.ReceiverError as exc:
            os.write(ready_fd, f"{exc}\n".encode())
            return 1
        os.write(ready_fd, b"ok\n")
        os.close(ready_fd)
        while not stop.wait(1.0):
            pass
        receiver.stop()
        peers.close()
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
