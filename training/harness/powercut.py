"""A power cut for tests: a FUSE passthrough filesystem that remembers what a power cut would keep.

Why: ``kill -9`` (the reliability bench) never loses a byte that reached the page cache, so it cannot
tell whether the store's fsyncs are the right ones. This filesystem serves a *backing* folder
unchanged (every process sees the live state) and keeps beside it the *durable* state under a strict
POSIX model:

* a file's bytes become durable only when that file is fsync'd (``fsync``/``fdatasync``, or each write
  of an ``O_SYNC``/``O_DSYNC`` descriptor); the model is per inode, so renames and hard links follow it;
* a folder's entries (create, rename, unlink, mkdir, link) become durable only when that folder is
  fsync'd; a new folder's entries are none until then, and a folder is reachable only through durable
  entries of its parents;
* everything that exists at mount time is durable.

:meth:`PowerCut.cut` is the power cut: the filesystem freezes at once (every later operation fails
with EIO, so nothing can be answered after the cut that was not durable before it), the given process
trees are killed with SIGKILL, the mount goes away and the backing folder is replaced by the durable
state: entries never durably linked vanish (or come back where a durable entry still names them),
files come back with their last fsync'd content, empty if never fsync'd. ``torn=True`` is harsher on
recovery and just as legal: each file with unsynced writes keeps them up to a random byte offset
(write-back in offset order, as a file being appended is cut short) and each folder with unsynced
changes is either as last fsync'd or as it was at the cut.

Not modelled: ``sync``/``syncfs`` (FUSE does not pass them on), metadata of inodes (mode, times),
partial sectors within one write. Locks (POSIX, OFD, flock) are the kernel's own, local to this
machine; ``mmap`` works (no direct I/O), as SQLite's ``-shm`` needs. The server runs in its own
process (``python -m training.harness.powercut_fs serve``), which needs ``/dev/fuse``, libfuse 3
(Debian ``fuse3``) and ``mfusepy``; :func:`fuse_problem` says why not where one is missing.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from training.harness.powercut_model import rebuild
from training.harness.process import HarnessError


# ----------------------------------------------------------------------------------- the client
def fuse_problem() -> str:
    """Why a FUSE mount cannot be tried here ("" when it can)."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (no FUSE in this kernel or container)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: the module loads libfuse when imported
        return f"mfusepy or libfuse 3 is missing ({exc}); scripts/bootstrap.sh installs them"
    if shutil.which("fusermount3") is None and os.geteuid() != 0:
        return "fusermount3 is missing (Debian fuse3) and this is not root"
    return ""


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                out += kids
                todo += kids
    return out


def kill_trees(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """SIGKILL each of ``pids`` and every descendant (children first collected, then all killed);
    waits until they are gone. Returns the pids signalled."""
    victims: list[int] = []
    for pid in pids:
        victims += [pid, *_descendants(pid)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    for pid in victims:
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break  # dead, waiting for its parent to reap it
            except OSError:
                break
            time.sleep(0.01)
    return victims


class PowerCut:
    """A mount of the power-cut filesystem over ``backing`` at ``mount``; see the module docstring.

    ``mount()`` starts the server (a child process, its output in ``log``) and returns once mounted;
    ``cut(pids)`` is the power cut (returns what the cut changed); ``unmount()`` is a clean unmount
    that keeps the live state. Usable as a context manager (unmounts on exit).
    """

    def __init__(self, backing: Path, mount: Path, log: Path | None = None) -> None:
        self.backing = Path(backing)
        self.mount_point = Path(mount)
        self.state = self.backing.with_name(self.backing.name + ".durable")
        self.control = self.state.with_name(self.backing.name + ".control.sock")
        self.log = Path(log) if log else self.backing.with_name(self.backing.name + ".powercut.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.cuts: list[dict[str, Any]] = []

    def mount(self, timeout: float = 20.0) -> PowerCut:
        problem = fuse_problem()
        if problem:
            raise OSError(errno.ENODEV, problem)
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mount_point.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.state, ignore_errors=True)
        argv = [sys.executable, "-m", "training.harness.powercut_fs", "serve", str(self.backing),
                str(self.mount_point), str(self.state), str(self.control)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=Path(__file__).resolve().parents[2])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OSError(errno.ENODEV, f"the power-cut filesystem did not mount: {self._tail()}")
            if os.path.ismount(self.mount_point) and self.control.exists():
                return self
            time.sleep(0.05)
        self._umount()
        raise HarnessError(f"power-cut filesystem not mounted after {timeout:.0f} s: {self._tail()}")

    def _tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-1500:]
        return ""

    def _request(self, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.control))
            s.sendall((json.dumps(request) + "\n").encode())
            return dict(json.loads(s.makefile("r").readline()))

    def counts(self) -> dict[str, int]:
        """Operations the model saw so far (fsync, fsyncdir, write)."""
        return dict(self._request({"op": "counts"})["counts"])

    def _umount(self) -> bool:
        """Unmount; lazily where a descriptor is still open on it (a frozen mount answers nothing).
        True when it had to be lazy."""
        done = subprocess.run(["umount", str(self.mount_point)], capture_output=True, text=True)
        if done.returncode == 0:
            return False
        tool = shutil.which("fusermount3") or "fusermount"
        lazy = [tool, "-u", "-z"] if os.geteuid() != 0 else ["umount", "-l"]
        subprocess.run([*lazy, str(self.mount_point)], capture_output=True)
        return True

    def _stop_server(self, grace: float) -> None:
        """The server ends once the mount is gone; after a lazy unmount with descriptors still open it
        would wait for them, so it is ended (its connection dies with it: they get ENOTCONN)."""
        assert self.proc is not None
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def arm(self, what: str, prefix: str, count: int = 1, *, torn: bool = False, seed: int = 0) -> None:
        """Make the cut happen inside the filesystem right after the ``count``-th ``what`` ("rename",
        "fsync" or "fsyncdir") of a path under ``prefix`` (mount-relative, e.g. "/spool/") completes;
        :meth:`cut` with ``wait`` then waits for it. Lands between two steps of one instance's ingest,
        which a cut at a random time rarely does."""
        self._request({"op": "arm", "what": what, "prefix": prefix, "count": count, "torn": torn,
                       "seed": seed})

    def stall(self, what: str, path: str, seconds: float) -> None:
        """The next ``what`` ("fsync" or "fsyncdir") of exactly ``path`` (mount-relative, e.g.
        "/spool/STUDY") waits ``seconds`` before it runs, the rest of the filesystem going on: widens
        the window between two fsyncs so that a race between writers can be cut into."""
        self._request({"op": "stall", "what": what, "path": path, "seconds": seconds})

    def cut(self, pids: Iterable[int] = (), *, torn: bool = False, seed: int = 0, wait: float = 0.0,
            timeout: float = 60.0) -> dict[str, Any]:
        """Power cut: freeze (at once, or when the :meth:`arm` ed trigger fires within ``wait`` seconds,
        else at the end of them), SIGKILL the process trees of ``pids``, unmount, the backing folder
        becomes the durable state. Returns the cut's summary: ``vanished`` (live entries not durable),
        ``resurrected`` (durable entries gone live), ``not_synced`` (files whose latest bytes were not
        durable), ``trigger`` (the armed operation it followed, None if none), ``counts`` (fsyncs and
        writes seen)."""
        if self.proc is None:
            raise HarnessError("not mounted")
        marks = [time.monotonic()]
        plan = self._request({"op": "freeze", "torn": torn, "seed": seed, "wait": wait}, timeout + wait)
        marks.append(time.monotonic())
        killed = kill_trees(pids)
        marks.append(time.monotonic())
        lazy = self._umount()
        self._stop_server(0.5 if lazy else 5.0)  # lazily unmounted: it would wait for the descriptors
        marks.append(time.monotonic())
        rebuild(self.backing, plan)
        shutil.rmtree(self.state, ignore_errors=True)
        marks.append(time.monotonic())
        summary = {k: v for k, v in plan.items() if k not in ("entries", "contents")}
        summary["killed"] = killed
        summary["seconds"] = dict(zip(("freeze", "kill", "unmount", "rebuild"),
                                      (round(b - a, 3) for a, b in itertools.pairwise(marks)), strict=True))
        self.cuts.append(summary)
        return summary

    def unmount(self) -> None:
        """Clean unmount (no cut): the backing folder keeps the live state."""
        if self.proc is None:
            return
        self._umount()
        self._stop_server(30.0)
        shutil.rmtree(self.state, ignore_errors=True)

    def __enter__(self) -> PowerCut:
        return self.mount()

    def __exit__(self, *exc: object) -> None:
        self.unmount()

