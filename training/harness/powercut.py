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
process (``python -m training.harness.powercut serve``), which needs ``/dev/fuse``, libfuse 3
(Debian ``fuse3``) and ``mfusepy``; :func:`fuse_problem` says why not where one is missing.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.harness.process import HarnessError

_COPY = 1 << 20


@dataclass
class _Node:
    """One inode of the backing tree, as the durable model sees it."""

    id: int
    kind: str  # "f" file, "d" folder, "l" symlink
    premount: bool  # existed at mount: its content then is durable
    ino: int
    snap: bool = False  # a durable copy of the content lies in the state folder under ``id``
    dirty: list[tuple[int, int]] = field(default_factory=list)  # written since the last fsync
    trunc_min: int | None = None  # the smallest size it was truncated to since the last fsync
    listing: dict[str, int] | None = None  # a folder's durable entries (None: as at mount, unchanged)
    target: str = ""  # a symlink's target


class DurableModel:
    """The durable state of a backing tree, updated by the filesystem's operations (not thread-safe:
    the filesystem holds one lock around every operation)."""

    def __init__(self, backing: Path, state: Path) -> None:
        self.backing = Path(backing)
        self.state = Path(state)
        self.state.mkdir(parents=True, exist_ok=True)
        self.nodes: dict[int, _Node] = {}
        self.by_ino: dict[int, _Node] = {}
        self.counts = {"fsync": 0, "fsyncdir": 0, "write": 0}
        self.root = self._register(self.backing, premount=True)
        for dirpath, dirnames, filenames in os.walk(self.backing):
            for name in dirnames + filenames:
                self._register(Path(dirpath) / name, premount=True)

    # ------------------------------------------------------------------------------- inodes
    def _register(self, path: Path, *, premount: bool) -> _Node:
        st = os.lstat(path)
        kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
        node = _Node(len(self.nodes) + 1, kind, premount, st.st_ino)
        if kind == "d" and not premount:
            node.listing = {}  # a new folder holds nothing durable until it is fsync'd
        if kind == "l":
            node.target = os.readlink(path)
        self.nodes[node.id] = node
        self.by_ino[st.st_ino] = node
        return node

    def node(self, path: Path) -> _Node:
        """The node of a live path (registered as new if this model has not seen its inode)."""
        st = os.lstat(path)
        found = self.by_ino.get(st.st_ino)
        return found if found is not None else self._register(path, premount=False)

    def node_of_fd(self, fd: int) -> _Node:
        st = os.fstat(fd)
        found = self.by_ino.get(st.st_ino)
        if found is None:
            raise OSError(errno.EIO, "descriptor of an inode this model does not know")
        return found

    def live_listing(self, folder: Path) -> dict[str, int]:
        return {name: self.node(folder / name).id for name in os.listdir(folder)}

    # ------------------------------------------------------------------------------- changes
    def before_dir_change(self, folder: Path) -> None:
        """Called before an entry of ``folder`` changes: a folder as at mount keeps that listing."""
        node = self.node(folder)
        if node.listing is None:
            node.listing = self.live_listing(folder)

    def _keep_premount_content(self, node: _Node, source: Path | int) -> None:
        if node.kind == "f" and node.premount and not node.snap:
            src = os.open(source, os.O_RDONLY) if isinstance(source, Path) else os.dup(source)
            try:
                with open(self.state / str(node.id), "wb") as out:
                    offset = 0
                    while chunk := os.pread(src, _COPY, offset):
                        out.write(chunk)
                        offset += len(chunk)
            finally:
                os.close(src)
            node.snap = True

    def before_file_change(self, node: _Node, source: Path | int) -> None:
        """Called before a file's content changes (write, truncate, open with O_TRUNC)."""
        self._keep_premount_content(node, source)

    def wrote(self, node: _Node, offset: int, length: int) -> None:
        self.counts["write"] += 1
        if length:
            node.dirty.append((offset, offset + length))

    def truncated(self, node: _Node, size: int) -> None:
        node.trunc_min = size if node.trunc_min is None else min(node.trunc_min, size)

    def retire(self, path: Path) -> None:
        """Called before ``path`` loses its name (unlink, rmdir, renamed over): when that was its last
        link, the inode is forgotten (the backing filesystem may reuse its number) after keeping what
        durable entries may still need of it."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        node = self.by_ino.get(st.st_ino)
        if node is None:
            return
        if node.kind == "d":
            if node.listing is None:
                node.listing = self.live_listing(path)
        elif st.st_nlink > 1:
            return
        else:
            self._keep_premount_content(node, path)
        self.by_ino.pop(st.st_ino, None)

    def fsync_file(self, node: _Node, fd: int) -> None:
        """The file's content as it is now becomes its durable content."""
        self.counts["fsync"] += 1
        if node.kind != "f":
            return
        if not node.dirty and node.trunc_min is None and (node.snap or node.premount):
            return
        size = os.fstat(fd).st_size
        reader = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)  # the descriptor may be write-only
        try:
            out = os.open(self.state / str(node.id), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if node.trunc_min is not None:
                    os.ftruncate(out, min(node.trunc_min, os.fstat(out).st_size))
                os.ftruncate(out, size)
                for start, end in _merge(node.dirty):
                    end = min(end, size)
                    while start < end:
                        chunk = os.pread(reader, min(_COPY, end - start), start)
                        if not chunk:
                            break
                        os.pwrite(out, chunk, start)
                        start += len(chunk)
            finally:
                os.close(out)
        finally:
            os.close(reader)
        node.snap = True
        node.dirty.clear()
        node.trunc_min = None

    def fsync_dir(self, folder: Path) -> None:
        """The folder's entries as they are now become its durable entries."""
        self.counts["fsyncdir"] += 1
        self.node(folder).listing = self.live_listing(folder)

    # ------------------------------------------------------------------------------- the cut
    def plan(self, *, torn: bool, rng: random.Random) -> dict[str, Any]:
        """What the backing tree becomes after a power cut now: entries (path, kind, id) and, per
        file id, where its content comes from. Pure: changes nothing on disk."""
        live_paths: dict[int, Path] = {}  # node id -> one live path (inodes still linked)
        for dirpath, dirnames, filenames in os.walk(self.backing):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                node = self.by_ino.get(os.lstat(p).st_ino)
                if node is not None:
                    live_paths.setdefault(node.id, p)
        live_paths[self.root.id] = self.backing
        entries: list[tuple[str, str, int]] = []
        contents: dict[int, list[Any]] = {}
        listed: dict[int, dict[str, int]] = {}

        def listing(node: _Node) -> dict[str, int]:
            if node.id in listed:
                return listed[node.id]
            live = live_paths.get(node.id)
            if node.listing is None:
                out = self.live_listing(live) if live is not None else {}
            elif torn and live is not None and rng.random() < 0.5:
                out = self.live_listing(live)  # as if the folder had been flushed at the cut
            else:
                out = node.listing
            listed[node.id] = out
            return out

        def content(node: _Node) -> list[Any]:
            live = live_paths.get(node.id)
            base: list[Any] = ["snap", str(self.state / str(node.id))] if node.snap else ["empty"]
            if node.premount and not node.snap:
                return ["live", str(live)]  # unchanged since mount (any change keeps a copy first)
            pending = bool(node.dirty) or node.trunc_min is not None
            if torn and pending and live is not None and node.trunc_min is None:
                size = live.stat().st_size
                return ["torn", base, str(live), _merge(node.dirty), rng.randint(0, size)]
            return base

        def walk(node: _Node, rel: str, ancestors: tuple[int, ...]) -> None:
            for name, child_id in sorted(listing(node).items()):
                child = self.nodes[child_id]
                path = f"{rel}/{name}" if rel else name
                if child.kind == "d":
                    if child.id in ancestors:
                        continue  # a durable cycle (folders renamed into each other): cut it
                    entries.append((path, "d", child.id))
                    walk(child, path, (*ancestors, child.id))
                elif child.kind == "l":
                    entries.append((path, "l", child.id))
                    contents[child.id] = ["link", child.target]
                else:
                    entries.append((path, "f", child.id))
                    if child.id not in contents:
                        contents[child.id] = content(child)

        walk(self.root, "", (self.root.id,))
        live_entries = {
            str(Path(d, n).relative_to(self.backing))
            for d, dns, fns in os.walk(self.backing)
            for n in dns + fns
        }
        durable_entries = {e[0] for e in entries}
        pending_files = {
            e[0] for e in entries if e[1] == "f" and contents[e[2]][0] in ("snap", "empty", "torn")
            and (self.nodes[e[2]].dirty or self.nodes[e[2]].trunc_min is not None
                 or not self.nodes[e[2]].snap)
        }
        return {
            "entries": entries,
            "contents": {str(k): v for k, v in contents.items()},
            "vanished": sorted(live_entries - durable_entries),
            "resurrected": sorted(durable_entries - live_entries),
            "not_synced": sorted(pending_files & live_entries),
            "torn": torn,
            "counts": dict(self.counts),
        }


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def rebuild(backing: Path, plan: dict[str, Any]) -> None:
    """Replace ``backing`` (not mounted any more) by the durable state ``plan`` describes."""
    backing = Path(backing)
    new = backing.with_name(backing.name + ".cut")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()
    first: dict[int, Path] = {}
    for rel, kind, node_id in plan["entries"]:
        dest = new / rel
        if kind == "d":
            dest.mkdir()
            continue
        spec = plan["contents"][str(node_id)]
        if kind == "l":
            os.symlink(spec[1], dest)
        elif node_id in first:
            os.link(first[node_id], dest)
        else:
            _materialize(spec, dest)
            first[node_id] = dest
    old = backing.with_name(backing.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(backing, old)
    os.rename(new, backing)
    shutil.rmtree(old, ignore_errors=True)


def _materialize(spec: list[Any], dest: Path) -> None:
    how = spec[0]
    if how in ("snap", "live"):  # a copy: the snapshot folder and the old tree are removed after
        shutil.copyfile(spec[1], dest)
    elif how == "empty":
        dest.touch()
    elif how == "torn":  # the durable bytes, then the unsynced ones below a random offset
        base, live, ranges, cut_at = spec[1], spec[2], spec[3], spec[4]
        _materialize(base, dest)
        with open(live, "rb") as src, open(dest, "r+b") as out:
            size = os.fstat(out.fileno()).st_size
            top = size
            for start, end in ranges:
                end = min(end, cut_at)
                if start >= end:
                    continue
                src.seek(start)
                out.seek(start)
                out.write(src.read(end - start))
                top = max(top, end)
            out.truncate(max(size, min(top, cut_at)))
    else:
        raise ValueError(f"unknown content kind {how!r}")


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
            self.fds: dict[int, tuple[int, _Node, bool]] = {}  # fh -> (backing fd, node, sync writes)

        def _path(self, path: str) -> Path:
            return self.root / path.lstrip("/")

        def _alive(self) -> None:
            if self.frozen:
                raise fuse.FuseOSError(errno.EIO)

        # -------------------------------------------------------------------- metadata
        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            with self._mutex:
                self._alive()
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
            with self._mutex:
                self._alive()
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
            with self._mutex:
                self._alive()
                os.chmod(self._path(path), mode)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            with self._mutex:
                self._alive()
                os.chown(self._path(path), uid, gid)
            return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            with self._mutex:
                self._alive()
                os.utime(self._path(path), ns=times)
            return 0

        # -------------------------------------------------------------------- names
        def mkdir(self, path: str, mode: int) -> int:
            p = self._path(path)
            with self._mutex:
                self._alive()
                self.model.before_dir_change(p.parent)
                os.mkdir(p, mode)
                self.model.node(p)
            return 0

        def rmdir(self, path: str) -> int:
            p = self._path(path)
            with self._mutex:
                self._alive()
                self.model.before_dir_change(p.parent)
                self.model.retire(p)
                os.rmdir(p)
            return 0

        def unlink(self, path: str) -> int:
            p = self._path(path)
            with self._mutex:
                self._alive()
                self.model.before_dir_change(p.parent)
                self.model.retire(p)
                os.unlink(p)
            return 0

        def rename(self, old: str, new: str) -> int:
            src, dst = self._path(old), self._path(new)
            with self._mutex:
                self._alive()
                self.model.before_dir_change(src.parent)
                self.model.before_dir_change(dst.parent)
                with contextlib.suppress(FileNotFoundError):
                    if os.lstat(dst).st_ino != os.lstat(src).st_ino:
                        self.model.retire(dst)
                os.rename(src, dst)
                self._after("rename", new)
            return 0

        def link(self, target: str, source: str) -> int:
            dst = self._path(target)
            with self._mutex:
                self._alive()
                self.model.before_dir_change(dst.parent)
                os.link(self._path(source), dst)
            return 0

        def symlink(self, target: str, source: str) -> int:
            dst = self._path(target)
            with self._mutex:
                self._alive()
                self.model.before_dir_change(dst.parent)
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
            with self._mutex:
                self._alive()
                self.model.before_dir_change(p.parent)
                existed = p.exists()
                fh = self._open(p, flags | os.O_CREAT, mode)
                if existed and flags & os.O_TRUNC:
                    self._truncate(self.fds[fh], 0)
                return fh

        def open(self, path: str, flags: int) -> int:
            p = self._path(path)
            with self._mutex:
                self._alive()
                fh = self._open(p, flags)
                if flags & os.O_TRUNC:
                    self._truncate(self.fds[fh], 0)
                return fh

        def _truncate(self, entry: tuple[int, _Node, bool], length: int) -> None:
            fd, node, _ = entry
            self.model.before_file_change(node, fd)
            os.ftruncate(fd, length)
            self.model.truncated(node, length)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            with self._mutex:
                self._alive()
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
            with self._mutex:
                self._alive()
                fd = self.fds[fh][0]
            return os.pread(fd, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            with self._mutex:
                self._alive()
                fd, node, sync = self.fds[fh]
                self.model.before_file_change(node, fd)
                n = os.pwrite(fd, data, offset)
                self.model.wrote(node, offset, n)
                if sync:
                    self.model.fsync_file(node, fd)
                return n

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            with self._mutex:
                self._alive()
                fd, node, _ = self.fds[fh]
                if self.trace:
                    print(f"powercut: fsync {path}", file=sys.stderr, flush=True)
                self.model.fsync_file(node, fd)
                self._after("fsync", path)
            return 0

        def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
            with self._mutex:
                self._alive()
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
        argv = [sys.executable, "-m", "training.harness.powercut", "serve", str(self.backing),
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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 5 or args[0] != "serve":
        print("usage: python -m training.harness.powercut serve BACKING MOUNT STATE CONTROL_SOCKET",
              file=sys.stderr)
        return 2
    return serve(Path(args[1]), Path(args[2]), Path(args[3]), Path(args[4]))


if __name__ == "__main__":
    raise SystemExit(main())
