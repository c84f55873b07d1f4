"""What a mirror holds: entry states, tree scans, excludes, and how two states differ.

The sender compares its own scan with the receiver's manifest (and, live,
with what each target last acknowledged) to decide what to send. Both sides
scan with ``scan``, which never descends into the daemon's own folder and
never follows a symlink at any depth (``paths.Source``).
"""

from __future__ import annotations

import enum
import fnmatch
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .frames import EntryKind
from .paths import STATE_DIR, Source

#: Names the receiver uses for entries it is about to rename into place.
TEMP_PREFIX = b".replicator-"


@dataclass(frozen=True, slots=True)
class EntryState:
    """One file, directory or symlink as replication sees it."""

    kind: EntryKind
    mode: int  # permission bits only (07777)
    size: int
    mtime_ns: int
    uid: int
    gid: int
    target: bytes = b""  # symlinks only

    @classmethod
    def from_stat(cls, st: os.stat_result, target: bytes = b"") -> EntryState | None:
        """The state of ``st``; None for what is not replicated (devices, fifos, sockets)."""
        m = st.st_mode
        if stat.S_ISREG(m):
            kind = EntryKind.FILE
        elif stat.S_ISDIR(m):
            kind = EntryKind.DIR
        elif stat.S_ISLNK(m):
            kind = EntryKind.SYMLINK
        else:
            return None
        size = st.st_size if kind is EntryKind.FILE else 0
        return cls(kind, stat.S_IMODE(m), size, st.st_mtime_ns, st.st_uid, st.st_gid, target)


class Preserve(enum.IntFlag):
    """What a receiving mirror applies as the sender declared it. Everything
    else it keeps its own: files belong to the receiving daemon's user and
    group, and setuid, setgid and sticky bits are dropped. A peer that could
    choose owners and special bits could plant a setuid-root binary."""

    NONE = 0
    OWNERS = 1
    SPECIAL_BITS = 2
    #: Extended attributes and ACLs (xattrs.py).
    XATTRS = 4
    ACLS = 8
    SECURITY_XATTRS = 16
    #: Hard-link groups (hardlinks.py): a sending mirror's choice, never in
    #: an ``Opened``.
    HARDLINKS = 32

    @classmethod
    def from_names(cls, names: Iterable[str]) -> Preserve:
        out = cls.NONE
        for name in names:
            out |= cls[name.upper()]
        return out

    def mode(self, mode: int) -> int:
        """The permission bits applied for a declared ``mode``."""
        return mode & (0o7777 if self & Preserve.SPECIAL_BITS else 0o777)


#: Mode bits that only a mirror preserving SPECIAL_BITS applies.
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


class Change(enum.Enum):
    #: Nothing to send.
    NONE = "none"
    #: Content (or type, or symlink target) differs: send the entry whole.
    DATA = "data"
    #: Only mode, mtime or owner differ: send a Meta frame.
    META = "meta"


def compare(src: EntryState, dst: EntryState | None, owners: bool, special: bool = True) -> Change:
    """What must be sent to turn ``dst`` into ``src``.

    Files are judged by size and mtime like rsync's quick check; directories'
    mtimes are metadata. ``owners``: whether uid/gid count (we run as root and
    the receiver applies them); ``special``: whether setuid, setgid and sticky
    bits count (the receiver applies them). What the receiver would not apply
    never counts: sending it again and again would change nothing.
    """
    if dst is None or dst.kind != src.kind:
        return Change.DATA
    if src.kind is EntryKind.FILE and (src.size != dst.size or src.mtime_ns != dst.mtime_ns):
        return Change.DATA
    if src.kind is EntryKind.SYMLINK and src.target != dst.target:
        return Change.DATA
    if src.kind is not EntryKind.SYMLINK:
        ignored = 0 if special else SPECIAL_BITS
        if src.mode & ~ignored != dst.mode & ~ignored:
            return Change.META
    if src.mtime_ns != dst.mtime_ns:
        return Change.META
    if owners and (src.uid, src.gid) != (dst.uid, dst.gid):
        return Change.META
    return Change.NONE


class Excludes:
    """Glob patterns of a mirror. A pattern without ``/`` matches a name at
    any depth (``*.tmp``); one with ``/`` matches the path from the mirror
    root (``cache/*``). An excluded directory is skipped whole."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        names = [p for p in self.patterns if "/" not in p]
        paths = [p.strip("/") for p in self.patterns if "/" in p]
        self._name = self._compile(names)
        self._path = self._compile(paths)

    @staticmethod
    def _compile(patterns: list[str]) -> re.Pattern[bytes] | None:
        if not patterns:
            return None
        rx = "|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)
        return re.compile(os.fsencode(rx), re.DOTALL)

    def __call__(self, rel: bytes) -> bool:
        """Whether ``rel`` (or one of its parent folders) is excluded."""
        if rel == STATE_DIR or rel.startswith(STATE_DIR + b"/"):
            return True
        parts = rel.split(b"/")
        if parts[-1].startswith(TEMP_PREFIX):
            return True  # a symlink being created by the receiver
        if self._name is not None and any(self._name.match(p) for p in parts):
            return True
        if self._path is not None:
            for i in range(1, len(parts) + 1):
                if self._path.match(b"/".join(parts[:i])):
                    return True
        return False


def lstat_entry(root: bytes, rel: bytes) -> EntryState | None:
    """The state of ``rel`` in the mirror at ``root`` now, or None if it is
    gone, not replicable, or only reachable through a symlink (confined:
    ``paths.Source``)."""
    found = Source(root).lstat(rel)
    return None if found is None else EntryState.from_stat(*found)


def scan(root: bytes, excludes: Excludes, top: bytes = b"") -> Iterator[tuple[bytes, EntryState]]:
    """Every entry below ``root/top`` (parents before children), as
    (relative path, state). Walks by directory fds with no-follow
    (``paths.walk``); vanishing entries are skipped; a missing ``top``
    yields nothing."""
    for rel, state, _ in scan_stat(root, excludes, top):
        yield rel, state


def scan_stat(
    root: bytes, excludes: Excludes, top: bytes = b""
) -> Iterator[tuple[bytes, EntryState, os.stat_result]]:
    """``scan``, with each entry's lstat (its inode: hardlinks.py)."""
    for rel, st, dir_fd, name in Source(root).walk(excludes, top):
        target = b""
        if stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(name, dir_fd=dir_fd)
            except OSError:
                continue  # replaced since it was listed
        state = EntryState.from_stat(st, target)
        if state is not None:
            yield rel, state, st
