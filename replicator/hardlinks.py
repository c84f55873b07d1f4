"""Hard-link groups of a source mirror (``preserve = ["hardlinks"]``): which
names of a multiply-linked regular file go as ``HardLink`` frames, and to
which name.

A group is the names, inside one mirror, of one regular file with more than
one link: (st_dev, st_ino). The link notes every such file it looks at
(``Groups.note``). A name whose group-mates it has not seen yet (an
``os.link`` of an old file, a change after a restart) makes it walk the
mirror once for that inode and link count (``Groups.search``), noting every
multiply-linked file on the way. Names outside the mirror are never seen:
across mirrors a link is just a separate file.

``plan`` is pure: a name goes as a link to a mate the peer holds in the same
version (size and mtime: the inode's, so the mate's data there is this
data), waits while a mate's operation is in flight (it is looked at again
when that is answered), or goes as data. ``Links`` adds the I/O: it checks on
our disk that a mate still is the same inode before it links to it.

Never: follow a symlink on the way to a mate (``paths.Source`` walks by
directory fds, no-follow); link to a name the peer refused as a target.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping

from .codes import EntryKind
from .manifest import EntryState, Excludes
from .paths import Source

#: (st_dev, st_ino) of a file.
Ino = tuple[int, int]


class Plan(enum.Enum):
    #: Send the name's data (no mate the peer holds in this version).
    DATA = "data"
    #: Send a HardLink to the mate returned with it.
    LINK = "link"
    #: A mate's operation is in flight: look again once it is answered.
    WAIT = "wait"


def plan(
    rel: bytes,
    state: EntryState,
    mates: Iterable[bytes],
    held: Mapping[bytes, EntryState],
    busy: Callable[[bytes], bool],
) -> tuple[Plan, bytes]:
    """How name ``rel`` (in ``state``) of a group goes, given its ``mates``,
    what the peer ``held`` and which paths are ``busy`` in flight; with the
    mate to link to or wait for (else b"")."""
    waiting = b""
    for mate in sorted(mates):
        if mate == rel:
            continue
        if busy(mate):
            waiting = waiting or mate
            continue
        there = held.get(mate)
        if (
            there is not None
            and there.kind is EntryKind.FILE
            and (there.size, there.mtime_ns) == (state.size, state.mtime_ns)
        ):
            return Plan.LINK, mate
    if waiting:
        return Plan.WAIT, waiting
    return Plan.DATA, b""


def first_names(
    entries: Iterable[tuple[bytes, EntryState, os.stat_result]],
) -> Iterator[tuple[bytes, EntryState, bytes]]:
    """Each entry of a manifest with its hint (``Entry.target`` of a file):
    for a name of a multiply-linked file, the first name listed of its
    inode, unless it is that first name; else b"" (the receiver's side)."""
    heads: dict[Ino, bytes] = {}
    for rel, state, st in entries:
        hint = b""
        if multi(st):
            hint = heads.setdefault((st.st_dev, st.st_ino), rel)
        yield rel, state, b"" if hint == rel else hint


def regroup(
    source: Mapping[bytes, Ino],
    heads: Mapping[bytes, bytes],
    held: Collection[bytes],
    present: Callable[[bytes], bool],
) -> set[bytes]:
    """The names the peer holds whose hard-link grouping there differs from
    ours; forgotten, they are sent again: a name that should be linked as a
    link (``plan``), one that should not as data (a publish replaces the
    name: the link there breaks).

    ``source``: our multiply-linked names and their inodes; ``heads``: the
    peer's hints (a name → the first name of its inode there);
    ``present``: whether a name is a file here (only those are resent)."""

    def there(name: bytes) -> bytes:
        return heads.get(name, name)

    out: set[bytes] = set()
    by_inode: dict[Ino, list[bytes]] = {}
    for name, ino in source.items():
        if name in held:
            by_inode.setdefault(ino, []).append(name)
    for names in by_inode.values():
        names.sort()
        out.update(n for n in names[1:] if there(n) != there(names[0]))
    by_head: dict[bytes, set[bytes]] = {}
    for name, head in heads.items():
        by_head.setdefault(head, {head}).add(name)
    for group in by_head.values():
        names = sorted(n for n in group if n in held)
        if not names:
            continue
        ours = source.get(names[0])
        out.update(n for n in names[1:] if (ours is None or source.get(n) != ours) and present(n))
    return out


def multi(st: os.stat_result) -> bool:
    """A regular file with more than one name."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink > 1


class Groups:
    """The hard-link groups seen in one mirror, by inode."""

    def __init__(self) -> None:
        self._names: dict[Ino, set[bytes]] = {}
        self._of: dict[bytes, Ino] = {}
        #: Link counts an inode was searched at: a walk finds a group's names
        #: again only after its link count changed or one of them went.
        self._searched: dict[Ino, set[int]] = {}

    def note(self, rel: bytes, st: os.stat_result) -> None:
        """``rel`` is ``st`` now (in or out of a group)."""
        ino = (st.st_dev, st.st_ino)
        if self._of.get(rel) == ino and multi(st):
            return
        self.drop(rel)
        if multi(st):
            self._names.setdefault(ino, set()).add(rel)
            self._of[rel] = ino

    def drop(self, rel: bytes) -> None:
        """``rel`` is gone (or no longer in its group)."""
        ino = self._of.pop(rel, None)
        if ino is None:
            return
        self._searched.pop(ino, None)
        names = self._names[ino]
        names.discard(rel)
        if not names:
            del self._names[ino]

    def mates(self, rel: bytes) -> set[bytes]:
        """The other names of ``rel``'s group seen so far."""
        ino = self._of.get(rel)
        return set() if ino is None else self._names[ino] - {rel}

    def search(self, root: bytes, excludes: Excludes, st: os.stat_result) -> bool:
        """Walk the mirror for ``st``'s other names unless this inode was
        searched at this link count; True if it walked."""
        ino = (st.st_dev, st.st_ino)
        if st.st_nlink in self._searched.get(ino, ()):
            return False
        for rel, found, _, _ in Source(root).walk(excludes):
            if multi(found):
                self.note(rel, found)
                self._searched.setdefault((found.st_dev, found.st_ino), set()).add(found.st_nlink)
        self._searched.setdefault(ino, set()).add(st.st_nlink)
        return True


class Links:
    """Hard-link planning of one link's mirrors (the pump asks it)."""

    def __init__(self) -> None:
        self._groups: dict[int, Groups] = {}
        #: Names the peer refused a HardLink for: they go as data from now on.
        self._refused: set[tuple[int, bytes]] = set()

    def groups(self, mid: int) -> Groups:
        return self._groups.setdefault(mid, Groups())

    def gone(self, mid: int, rel: bytes) -> None:
        self.groups(mid).drop(rel)

    def refused(self, mid: int, rel: bytes) -> None:
        self._refused.add((mid, rel))

    def mates(
        self, mid: int, root: bytes, excludes: Excludes, rel: bytes, st: os.stat_result
    ) -> set[bytes]:
        """The other names of ``rel`` (found as ``st``) in the mirror, each
        checked to be the same inode on our disk right now."""
        g = self.groups(mid)
        g.note(rel, st)
        if not multi(st):
            return set()
        out = self._check(g, root, rel, st)
        if len(out) < st.st_nlink - 1 and g.search(root, excludes, st):
            out = self._check(g, root, rel, st)
        return out

    @staticmethod
    def _check(g: Groups, root: bytes, rel: bytes, st: os.stat_result) -> set[bytes]:
        """The mates of ``rel`` that are its inode on disk (the others are
        noted as they are now)."""
        src = Source(root)
        out = set()
        for mate in g.mates(rel):
            found = src.locate(mate)
            if found is None:
                g.drop(mate)
                continue
            found.close()
            g.note(mate, found.st)
            if (found.st.st_dev, found.st.st_ino) == (st.st_dev, st.st_ino):
                out.add(mate)
        return out

    def plan(
        self,
        mid: int,
        rel: bytes,
        state: EntryState,
        mates: set[bytes],
        held: Mapping[bytes, EntryState],
        busy: Callable[[bytes], bool],
    ) -> tuple[Plan, bytes]:
        if (mid, rel) in self._refused:
            return Plan.DATA, b""
        return plan(rel, state, mates, held, busy)
