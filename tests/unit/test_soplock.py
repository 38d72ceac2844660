"""triage.store.soplock: one writer per SOP Instance UID across stores, threads and worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from test_store import part10, put

from triage.store.db import Store
from triage.store.part10 import dataset_sha256
from triage.store.soplock import STRIPES, SopLocks, stripe_of

REPO = Path(__file__).resolve().parents[2]
SOP, STUDY, SERIES = "1.2.826.0.1.77.1.1.1", "1.2.826.0.1.77.1", "1.2.826.0.1.77.1.1"

# A child process that holds SOP's stripe until its stdin closes (or it is killed).
HOLDER = """
import sys
from pathlib import Path
from triage.store.soplock import SopLocks
locks = SopLocks(Path(sys.argv[1]))
with locks.hold(sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_the_stripe_is_the_same_in_every_process(tmp_path: Path) -> None:
    # Python's str hash is salted per process; the stripe must not be
    code = "from triage.store.soplock import stripe_of; print(stripe_of('1.2.3.4.5'))"
    env = {**os.environ, "PYTHONHASHSEED": "random", "PYTHONPATH": str(REPO)}
    seen = {subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           check=True).stdout.strip() for _ in range(3)}
    assert seen == {str(stripe_of("1.2.3.4.5"))}
    assert 0 <= stripe_of("1.2.3.4.5") < STRIPES


def _blocked_put(store: Store, data: bytes) -> tuple[threading.Thread, threading.Event]:
    done = threading.Event()

    def go() -> None:
        put(store, data, SOP, STUDY, SERIES)
        done.set()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, done


def test_two_stores_in_one_process_exclude_each_other(tmp_path: Path) -> None:
    a, b = Store(tmp_path), Store(tmp_path)
    try:
        with a._sop_locks.hold(SOP):
            t, done = _blocked_put(b, part10(SOP, STUDY, SERIES, pixel=1))
            assert not done.wait(0.5), "the put ran while another store held its SOP UID"
        assert done.wait(10.0)
        t.join()
        other = SopLocks(tmp_path)  # a third holder of another UID's stripe is not held up
        uid = next(u for u in (f"1.2.826.0.1.78.{i}" for i in range(999)) if stripe_of(u) != stripe_of(SOP))
        with a._sop_locks.hold(SOP), other.hold(uid):
            pass
        other.close()
    finally:
        a.close()
        b.close()


def _holder(root: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), SOP], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_a_worker_process_holding_the_uid_blocks_the_put_until_it_lets_go(tmp_path: Path) -> None:
    store = Store(tmp_path)
    try:
        holder = _holder(tmp_path)
        t, done = _blocked_put(store, part10(SOP, STUDY, SERIES, pixel=2))
        assert not done.wait(0.5), "the put ran while another process held its SOP UID"
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
        assert done.wait(10.0)
        t.join()
    finally:
        store.close()


def test_a_killed_worker_never_leaves_the_uid_locked(tmp_path: Path) -> None:
    store = Store(tmp_path)
    try:
        holder = _holder(tmp_path)
        t, done = _blocked_put(store, part10(SOP, STUDY, SERIES, pixel=3))
        assert not done.wait(0.3)
        holder.send_signal(signal.SIGKILL)  # the kernel drops its locks with the process
        holder.wait(10)
        assert done.wait(10.0)
        t.join()
    finally:
        store.close()


RACER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_store import part10, put
from triage.store.db import Store
root, who = Path(sys.argv[1]), int(sys.argv[2])
sop, study, series = "1.2.826.0.1.77.1.1.1", "1.2.826.0.1.77.1", "1.2.826.0.1.77.1.1"
with Store(root) as store:
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(40):
        put(store, part10(sop, study, series, pixel=100 * who + i), sop, study, series)
"""


def test_two_workers_resending_one_uid_leave_a_row_that_describes_its_file(tmp_path: Path) -> None:
    Store(tmp_path).close()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    here = str(Path(__file__).parent)
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(w), here],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
              for w in (1, 2)]
    for r in racers:
        assert r.stdout is not None and r.stdout.readline().strip() == "ready"
    for r in racers:  # both start together
        assert r.stdin is not None
        r.stdin.write("go\n")
        r.stdin.flush()
    for r in racers:
        assert r.wait(120) == 0
    with Store(tmp_path) as store:
        row = store._db.execute("SELECT path, sha256 FROM instances WHERE sop_uid = ?", (SOP,)).fetchone()
        assert row is not None
        assert dataset_sha256(Path(row["path"]))[0] == row["sha256"]
        n = store._db.execute("SELECT COUNT(*) FROM instances WHERE sop_uid = ?", (SOP,)).fetchone()[0]
        assert n == 1
        assert not [p for p in store.tmp.rglob("*") if p.is_file()]  # no copy left half-adopted
