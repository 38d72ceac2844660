"""The durable state of a folder under a strict POSIX model, and the tree a power cut leaves.

Why apart from the filesystem (:mod:`training.harness.powercut_fs`): the rules are plain Python over
the backing folder, with no FUSE in them, so they read (and could be reused) on their own. The rules:
a file's bytes become durable at its fsync (per inode: renames and hard links follow it); a folder's
entries at the folder's fsync (a new folder's are none until then); everything present at mount time
is durable. :meth:`DurableModel.plan` says what a power cut now would leave; :func:`rebuild` makes it.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_COPY = 1 << 20


@dataclass
class Node:
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
        self.nodes: dict[int, Node] = {}
        self.by_ino: dict[int, Node] = {}
        self.counts = {"fsync": 0, "fsyncdir": 0, "write": 0}
        self.root = self._register(self.backing, premount=True)
        for dirpath, dirnames, filenames in os.walk(self.backing):
            for name in dirnames + filenames:
                self._register(Path(dirpath) / name, premount=True)

    # ------------------------------------------------------------------------------- inodes
    def _register(self, path: Path, *, premount: bool) -> Node:
        st = os.lstat(path)
        kind = "d" if stat.S_ISDIR(st.st_mode) else "l" if stat.S_ISLNK(st.st_mode) else "f"
        node = Node(len(self.nodes) + 1, kind, premount, st.st_ino)
        if kind == "d" and not premount:
            node.listing = {}  # a new folder holds nothing durable until it is fsync'd
        if kind == "l":
            node.target = os.readlink(path)
        self.nodes[node.id] = node
        self.by_ino[st.st_ino] = node
        return node

    def node(self, path: Path) -> Node:
        """The node of a live path (registered as new if this model has not seen its inode)."""
        st = os.lstat(path)
        found = self.by_ino.get(st.st_ino)
        return found if found is not None else self._register(path, premount=False)

    def node_of_fd(self, fd: int) -> Node:
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

    def _keep_premount_content(self, node: Node, source: Path | int) -> None:
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

    def before_file_change(self, node: Node, source: Path | int) -> None:
        """Called before a file's content changes (write, truncate, open with O_TRUNC)."""
        self._keep_premount_content(node, source)

    def wrote(self, node: Node, offset: int, length: int) -> None:
        self.counts["write"] += 1
        if length:
            node.dirty.append((offset, offset + length))

    def truncated(self, node: Node, size: int) -> None:
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

    def fsync_file(self, node: Node, fd: int) -> None:
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

        def listing(node: Node) -> dict[str, int]:
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

        def content(node: Node) -> list[Any]:
            live = live_paths.get(node.id)
            base: list[Any] = ["snap", str(self.state / str(node.id))] if node.snap else ["empty"]
            if node.premount and not node.snap:
                return ["live", str(live)]  # unchanged since mount (any change keeps a copy first)
            pending = bool(node.dirty) or node.trunc_min is not None
            if torn and pending and live is not None and node.trunc_min is None:
                size = live.stat().st_size
                return ["torn", base, str(live), _merge(node.dirty), rng.randint(0, size)]
            return base

        def walk(node: Node, rel: str, ancestors: tuple[int, ...]) -> None:
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

