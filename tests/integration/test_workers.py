"""Several receiver processes on one port (``dicom.workers``), against real storescu / pynetdicom peers.

What must hold with workers as with one process: every instance acknowledged is stored once, the
per-peer connection limit is for the whole port (not per worker), a worker that dies is replaced while
the others keep accepting, and a stop leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from triage.config import parse
from triage.receive.peers import PeerTable
from triage.receive.workers import WorkerPool, worker_count
from triage.store.db import Store

integration = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _sop(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture
def pool_factory(tmp_path: Path, free_port: Any) -> Iterator[Any]:
    pools: list[WorkerPool] = []

    def make(workers: int = 2, **dicom: Any) -> tuple[WorkerPool, Counter[str], Path]:
        root = tmp_path / "var"
        cfg = parse({
            "dicom": {"ae_title": "GLOWTRIAGE", "host": "127.0.0.1", "port": free_port(), "workers": workers,
                      **dicom},
            "storage": {"root": str(root), "min_free_mb": 1},
            "logging": {"level": "info", "format": "json"},
        }, None)
        Store(root).close()  # the schema, as the daemon's own Store makes it before the pool starts
        events: Counter[str] = Counter()
        lock = threading.Lock()

        def on_event(name: str, args: list[Any]) -> None:
            with lock:
                events[name] += 1

        pool = WorkerPool(cfg, workers, on_event)
        pool.start()  # every worker accepting (a loaded machine starts them slowly)
        pools.append(pool)
        return pool, events, root

    yield make
    for p in pools:
        p.stop()


def test_worker_count_defaults_to_half_the_cores() -> None:
    cfg = parse({}, None)
    assert cfg.settings.dicom.workers == 0
    assert worker_count(cfg) == max(1, min(8, len(os.sched_getaffinity(0)) // 2))
    assert worker_count(parse({"dicom": {"workers": 3}}, None)) == 3


def test_peer_table_sums_the_other_workers_rows(tmp_path: Path) -> None:
    a = PeerTable(tmp_path / "peers.shm", 3, create=True)
    b = PeerTable(tmp_path / "peers.shm", 3)  # another process maps the same file
    a.publish(0, {"10.0.0.1": 2, "10.0.0.2": 1})
    b.publish(1, {"10.0.0.1": 3})
    assert a.others(2, "10.0.0.1") == 5
    assert a.others(0, "10.0.0.1") == 3  # its own row is not counted (it knows it exactly)
    assert b.others(1, "10.0.0.2") == 1 and b.others(1, "10.9.9.9") == 0
    a.publish(0, {})
    assert b.others(1, "10.0.0.1") == 0
    a.close()
    b.close()


@integration
def test_workers_store_every_instance_of_parallel_associations(
    pool_factory: Any, tools: SimpleNamespace, tmp_path: Path
) -> None:
    from training.harness.storescu import storescu_parallel

    pool, events, root = pool_factory(workers=2)
    assert len(pool.pids()) == 2
    files = tools.write_ct_series(tmp_path / "ct", 80, 64, seed=5)
    groups = [files[i::4] for i in range(4)]
    storescu_parallel(pool.address[1], groups, called="GLOWTRIAGE")
    with Store(root) as store:
        assert store.instance_total() == len(files)
        for f in files:
            row = store.instance(_sop(f))
            assert row is not None and Path(row.path).exists()
    deadline = time.monotonic() + 5
    while events["instance_received"] < len(files) and time.monotonic() < deadline:
        time.sleep(0.05)
    # every worker's metric calls reach the supervisor (its /metrics counts them all)
    assert events["instance_received"] == len(files)
    assert events["association_opened"] == events["association_closed"] == 4


@integration
def test_a_dead_worker_is_replaced_and_the_port_keeps_answering(
    pool_factory: Any, tools: SimpleNamespace
) -> None:
    pool, _events, _root = pool_factory(workers=2)
    echo = tools.echo
    first = pool.pids()
    os.kill(first[0], signal.SIGKILL)
    assert echo(pool.address[1], timeout=20) == 0  # the other worker still serves
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (len(pool.pids()) < 2 or first[0] in pool.pids()):
        time.sleep(0.1)
    now = pool.pids()
    assert len(now) == 2 and first[0] not in now and first[1] in now and pool.restarts == 1
    for _ in range(6):  # whichever worker takes them (the new one may still be importing: wait)
        assert echo(pool.address[1], timeout=30) == 0
    pool.stop()
    assert not any(_alive(pid) for pid in now)


@integration
def test_per_peer_limit_is_for_the_whole_port(pool_factory: Any) -> None:
    from pynetdicom import AE

    pool, _events, _root = pool_factory(workers=2, max_connections_per_peer=3)
    ae = AE(ae_title="PEERTEST")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = []
    try:
        for _ in range(3):
            assoc = ae.associate("127.0.0.1", pool.address[1], ae_title="GLOWTRIAGE")
            assert assoc.is_established
            held.append(assoc)
        time.sleep(0.4)  # each worker publishes its counts every 0.1 s
        for _ in range(4):  # whichever worker takes it, the peer already holds 3 connections
            extra = ae.associate("127.0.0.1", pool.address[1], ae_title="GLOWTRIAGE")
            assert extra.is_rejected, "a 4th connection from the same peer was accepted"
    finally:
        for assoc in held:
            assoc.release()
    time.sleep(0.4)
    again = ae.associate("127.0.0.1", pool.address[1], ae_title="GLOWTRIAGE")
    assert again.is_established
    again.release()


@integration
def test_a_connection_right_after_another_sees_it_on_any_worker(
    pool_factory: Any, tools: SimpleNamespace
) -> None:
    """max_connections_per_peer = 1: the next connection, made at once, is refused whichever worker
    takes it (the gate publishes each connection as it admits it, not only on its 0.1 s timer)."""
    from pynetdicom import AE

    pool, _events, _root = pool_factory(workers=2, max_connections_per_peer=1)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    for _ in range(6):
        held = ae.associate("127.0.0.1", pool.address[1], ae_title="GLOWTRIAGE")
        try:
            assert held.is_established
            assert tools.echo(pool.address[1]) is None
        finally:
            held.release()
        time.sleep(0.3)  # the released slot comes back within the 0.1 s refresh
