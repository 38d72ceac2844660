"""The power-cut filesystem's server: a FUSE passthrough over a backing folder, every operation also
told to the durable model (:mod:`training.harness.powercut_model`), a control socket for the cut.

Run by :class:`training.harness.powercut.PowerCut` as ``python -m training.harness.powercut_fs serve
BACKING MOUNT STATE CONTROL_SOCKET``. mfusepy (and so libfuse 3) is imported only here. Every
operation runs under one lock, so the model and the backing folder change together and a cut (the
``freeze`` request, or an armed trigger) sees one consistent moment; after it every operation fails
with EIO. Not passed on: ``lock``/``flock`` (the kernel keeps POSIX, OFD and flock locks itself, which
is right on one machine), ``sync``/``syncfs`` (FUSE does not forward them).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from training.harness.powercut_model import DurableModel, Node


# ----------------------------------------------------------------------------------- the filesystem
def _operations_class() -> type:
    """The FUSE operations (mfusepy is imported only in the server process)."""
    import mfusepy as fuse

    class PassThrough(fuse.Operations):
        """Passthrough to the backing folder, every operation under one lock, the model updated."""

        use_ns = True

        def __init__(self, model: DurableModel) -> None:
            self.model = model
            self.root = model.backing
            self._mutex = threading.RLock()
            self.frozen = False
            self.trace = os.environ.get("POWERCUT_TRACE") == "1"  # fsyncs to the server's log
            self.trigger: dict[str, Any] | None = None  # see arm()
            self.plan: dict[str, Any] | None = None  # the durable state, once cut
            self.cut_done = threading.Event()
            self.stalls: list[dict[str, Any]] = []  # see stall()
            self.fds: dict[int, tuple[int, Node, bool]] = {}  # fh -> (backing fd, node, sync writes)

        def _path(self, path: str) -> Path:
            return self.root / path.lstrip("/")

        def _alive(self) -> None:
            if self.frozen:
                raise fuse.FuseOSError(errno.EIO)

        @contextlib.contextmanager
        def _live(self, *changing: Path) -> Iterator[None]:
            """The server's mutex, for an operation on a filesystem that is not frozen (EIO after the
            cut); ``changing``: the folders whose entries the operation changes (their durable entries
            are recorded first)."""
            with self._mutex:
                self._alive()
                for folder in changing:
                    self.model.before_dir_change(folder)
                yield

        # -------------------------------------------------------------------- metadata
        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            with self._live():
                st = os.fstat(self.fds[fh][0]) if fh is not None and fh in self.fds else os.lstat(
                    self._path(path))
            keys = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks",
                    "st_blksize", "st_rdev")
            out = {k: getattr(st, k) for k in keys}
            out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
            return out

        def access(self, path: str, amode: int) -> int:
            if not os.access(self._path(path), amode):
                raise fuse.FuseOSError(errno.EACCES)
            return 0

        def readdir(self, path: str, fh: int) -> list[tuple[str, dict[str, int], int]]:
            # with the inode numbers (use_ino): an entry whose d_ino is 0 is skipped by readers
            with self._live():
                folder = self._path(path)
                out = []
                for name in [".", "..", *os.listdir(folder)]:
                    st = os.lstat(folder / name) if name != ".." else os.lstat(folder.parent)
                    out.append((name, {"st_mode": st.st_mode, "st_ino": st.st_ino}, 0))
                return out

        def readlink(self, path: str) -> str:
            return os.readlink(self._path(path))

        def statfs(self, path: str) -> dict[str, int]:
            sv = os.statvfs(self._path(path))
            keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
                    "f_flag", "f_frsize", "f_namemax")
            return {k: getattr(sv, k) for k in keys}

        def chmod(self, path: str, mode: int) -> int:
            with self._live():
                os.chmod(self._path(path), mode)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            with self._live():
                os.chown(self._path(path), uid, gid)
            return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            with self._live():
                os.utime(self._path(path), ns=times)
            return 0

        # -------------------------------------------------------------------- names
        def mkdir(self, path: str, mode: int) -> int:
            p = self._path(path)
            with self._live(p.parent):
                os.mkdir(p, mode)
                self.model.node(p)
            return 0

        def rmdir(self, path: str) -> int:
            p = self._path(path)
            with self._live(p.parent):
                self.model.retire(p)
                os.rmdir(p)
            return 0

        def unlink(self, path: str) -> int:
            p = self._path(path)
            with self._live(p.parent):
                self.model.retire(p)
                os.unlink(p)
            return 0

        def rename(self, old: str, new: str) -> int:
            src, dst = self._path(old), self._path(new)
            with self._live(src.parent, dst.parent):
                with contextlib.suppress(FileNotFoundError):
                    if os.lstat(dst).st_ino != os.lstat(src).st_ino:
                        self.model.retire(dst)
                os.rename(src, dst)
                self._after("rename", new)
            return 0

        def link(self, target: str, source: str) -> int:
            dst = self._path(target)
            with self._live(dst.parent):
                os.link(self._path(source), dst)
            return 0

        def symlink(self, target: str, source: str) -> int:
            dst = self._path(target)
            with self._live(dst.parent):
                os.symlink(source, dst)
                self.model.node(dst)
            return 0

        # -------------------------------------------------------------------- content
        def _open(self, p: Path, flags: int, mode: int = 0o666) -> int:
            sync = bool(flags & (os.O_SYNC | os.O_DSYNC))
            base = flags & ~(os.O_ACCMODE | os.O_APPEND | os.O_SYNC | os.O_DSYNC | os.O_TRUNC)
            try:
                fd = os.open(p, base | os.O_RDWR, mode)
            except OSError:
                fd = os.open(p, (base | (flags & os.O_ACCMODE)), mode)
            node = self.model.node(p)
            fh = fd  # backing descriptors are unique while open
            self.fds[fh] = (fd, node, sync)
            return fh

        def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
            p = self._path(path)
            with self._live(p.parent):
                existed = p.exists()
                fh = self._open(p, flags | os.O_CREAT, mode)
                if existed and flags & os.O_TRUNC:
                    self._truncate(self.fds[fh], 0)
                return fh

        def open(self, path: str, flags: int) -> int:
            p = self._path(path)
            with self._live():
                fh = self._open(p, flags)
                if flags & os.O_TRUNC:
                    self._truncate(self.fds[fh], 0)
                return fh

        def _truncate(self, entry: tuple[int, Node, bool], length: int) -> None:
            fd, node, _ = entry
            self.model.before_file_change(node, fd)
            os.ftruncate(fd, length)
            self.model.truncated(node, length)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            with self._live():
                if fh is not None and fh in self.fds:
                    self._truncate(self.fds[fh], length)
                else:
                    fh2 = self._open(self._path(path), os.O_WRONLY)
                    try:
                        self._truncate(self.fds[fh2], length)
                    finally:
                        os.close(self.fds.pop(fh2)[0])
            return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            with self._live():
                fd = self.fds[fh][0]
            return os.pread(fd, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            with self._live():
                fd, node, sync = self.fds[fh]
                self.model.before_file_change(node, fd)
                n = os.pwrite(fd, data, offset)
                self.model.wrote(node, offset, n)
                if sync:
                    self.model.fsync_file(node, fd)
                return n

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            self._maybe_stall("fsync", path)
            with self._live():
                fd, node, _ = self.fds[fh]
                if self.trace:
                    print(f"powercut: fsync {path}", file=sys.stderr, flush=True)
                self.model.fsync_file(node, fd)
                self._after("fsync", path)
            return 0

        def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
            self._maybe_stall("fsyncdir", path)
            with self._live():
                if self.trace:
                    print(f"powercut: fsyncdir {path}", file=sys.stderr, flush=True)
                self.model.fsync_dir(self._path(path))
                self._after("fsyncdir", path)
            return 0

        def flush(self, path: str, fh: int) -> int:
            return 0

        def release(self, path: str, fh: int) -> int:
            with self._mutex:
                entry = self.fds.pop(fh, None)
            if entry is not None:
                os.close(entry[0])
            return 0

        # -------------------------------------------------------------------- control
        def freeze(self, *, torn: bool, seed: int) -> dict[str, Any]:
            with self._mutex:
                if self.plan is None:
                    self.frozen = True
                    self.plan = self.model.plan(torn=torn, rng=random.Random(seed))
                    self.plan["trigger"] = None
                self.cut_done.set()
                return self.plan

        def stall(self, request: dict[str, Any]) -> None:
            """The next ``what`` (fsync or fsyncdir) of exactly ``path`` sleeps ``seconds`` before it
            runs (a slow disk for that one operation; the others go on meanwhile)."""
            with self._mutex:
                self.stalls.append(dict(request))

        def _maybe_stall(self, op: str, path: str) -> None:
            with self._mutex:
                hit = next((s for s in self.stalls if s["what"] == op and s["path"] == path), None)
                if hit is not None:
                    self.stalls.remove(hit)
            if hit is not None:
                time.sleep(float(hit["seconds"]))

        def arm(self, request: dict[str, Any]) -> None:
            """Cut right after the ``count``-th ``op`` (rename: its new name; fsync, fsyncdir: the
            path) under ``prefix`` completes: the operation succeeds, everything after it fails."""
            with self._mutex:
                self.trigger = dict(request)

        def _after(self, op: str, path: str) -> None:
            t = self.trigger
            if t is None or t["what"] != op or not path.startswith(t["prefix"]):
                return
            t["count"] -= 1
            if t["count"] > 0:
                return
            self.trigger = None
            self.frozen = True
            self.plan = self.model.plan(torn=bool(t.get("torn")), rng=random.Random(int(t.get("seed", 0))))
            self.plan["trigger"] = f"after {op} {path}"
            self.cut_done.set()

    return PassThrough


def _fuse_class() -> type:
    """mfusepy's FUSE with libfuse 3's ``truncate`` given the open file (mfusepy drops it, and a file
    unlinked while open, as SQLite's ``-shm`` may be, has no path)."""
    import mfusepy as fuse

    class FUSE3(fuse.FUSE):
        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            fh = fip.contents.fh if fip else None
            decoded = None if path is None else path.decode(self.encoding, self.errors)
            return int(self.operations.truncate(decoded, length, fh) or 0)

    return FUSE3


def serve(backing: Path, mount: Path, state: Path, control: Path) -> int:
    """The server process: mount, and answer ``freeze`` (the plan of the durable state) and ``counts``
    on the control socket until unmounted. The client rebuilds the backing folder from the plan."""
    ops = _operations_class()(DurableModel(backing, state))
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        control.unlink()
    srv.bind(str(control))
    srv.listen(4)

    def answer() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                request = json.loads(conn.makefile("r").readline())
                if request["op"] == "freeze":  # now, or when an armed cut fires within "wait" s
                    ops.cut_done.wait(float(request.get("wait", 0.0)))
                    plan = ops.freeze(torn=bool(request.get("torn")), seed=int(request.get("seed", 0)))
                    conn.sendall((json.dumps(plan) + "\n").encode())
                elif request["op"] == "arm":
                    ops.arm(request)
                    conn.sendall(b"{}\n")
                elif request["op"] == "stall":
                    ops.stall(request)
                    conn.sendall(b"{}\n")
                else:
                    with ops._mutex:
                        counts = dict(ops.model.counts)
                    conn.sendall((json.dumps({"counts": counts}) + "\n").encode())

    threading.Thread(target=answer, daemon=True, name="powercut-control").start()
    try:
        _fuse_class()(ops, str(mount), foreground=True, nothreads=False, use_ino=True, hard_remove=True,
                      fsname="powercut", subtype="powercut", default_permissions=True, max_threads=16)
    except RuntimeError as exc:  # libfuse's loop ends with an error when unmounted from outside
        print(f"powercut: fuse loop ended: {exc}", file=sys.stderr, flush=True)
    srv.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 5 or args[0] != "serve":
        print("usage: python -m training.harness.powercut_fs serve BACKING MOUNT STATE CONTROL_SOCKET",
              file=sys.stderr)
        return 2
    return serve(Path(args[1]), Path(args[2]), Path(args[3]), Path(args[4]))


if __name__ == "__main__":
    raise SystemExit(main())
