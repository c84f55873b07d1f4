"""What to send, decided without I/O: for one dirty path, and for a whole
mirror after the peer listed what it holds (a reconcile).

The link gathers the facts (the source's entry, what the peer holds, the
watcher's flags, the clock) and acts on the answer (frames, the backlog).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .changes import Flag
from .frames import EntryKind
from .manifest import Change, EntryState

#: A file modified this recently and not yet closed is still being written...
SETTLE_NS = 200_000_000
#: ...but send it anyway once it has been dirty this long (seconds): a log
#: file that is never closed.
SETTLE_MAX = 5.0

#: How two states differ, as the receiving side applies them (SourceMirror.compare, mirror.py).
Compare = Callable[[EntryState, EntryState | None], Change]


class Action(enum.Enum):
    #: The peer already holds it (or it is gone on both sides): done.
    NOTHING = "nothing"
    #: Gone here, held there, and the mirror propagates deletes.
    DELETE = "delete"
    #: Still being written (modified just now, not closed): look again soon.
    SETTLE = "settle"
    #: Same content; mode, mtime or owners differ.
    META = "meta"
    #: Only an attribute change was seen (chmod, utime) on a file whose size
    #: did not change: sent as metadata, *guessed*. A writer that closes the
    #: file later may have changed its data through mmap (no IN_MODIFY): the
    #: caller remembers the guess and passes ``guessed`` until data is sent.
    META_GUESS = "meta_guess"
    MKDIR = "mkdir"
    SYMLINK = "symlink"
    #: Send the file's data.
    FILE = "file"


def plan_path(
    src: EntryState | None,
    known: EntryState | None,
    flags: int,
    since: float,
    compare: Compare,
    delete: bool,
    now: float,
    now_ns: int,
    guessed: bool = False,
    xattrs: bool = False,
) -> Action:
    """What to do with one dirty path.

    ``src``: the entry here (None: gone); ``known``: what the peer holds;
    ``flags``: the watcher's ``changes.Flag`` bits since it was first seen
    dirty at ``since`` (wall clock); ``now``/``now_ns``: the wall clock;
    ``guessed``: a META_GUESS was sent for it since its data last was;
    ``xattrs``: the peer applies extended attributes (an ATTRIB alone may
    mean only those changed: send a Meta, which carries them).
    """
    if src is None:
        return Action.DELETE if known is not None and delete else Action.NOTHING
    if guessed and flags & Flag.CLOSED and src.kind is EntryKind.FILE:
        return Action.FILE  # closed after a guess: its data may have changed
    change = compare(src, known)
    if change is Change.NONE:
        if xattrs and flags & Flag.ATTRIB and src.kind is not EntryKind.SYMLINK:
            return Action.META  # only its extended attributes changed
        return Action.NOTHING
    if src.kind is EntryKind.FILE and change is Change.DATA:
        settling = (
            not flags & Flag.CLOSED
            and 0 <= now_ns - src.mtime_ns < SETTLE_NS
            and now - since < SETTLE_MAX
        )
        if (
            flags & Flag.ATTRIB
            and not flags & (Flag.DATA | Flag.CLOSED)
            and known is not None
            and known.kind is EntryKind.FILE
            and known.size == src.size
        ):
            # chmod/utime: no data to send. But touch(1) sets the mtime to
            # now and closes a write-open right after: give its close the
            # time to arrive (then the data is sent, never a stale guess).
            return Action.SETTLE if settling else Action.META_GUESS
        if settling:
            return Action.SETTLE
    if change is Change.META:
        return Action.META
    if src.kind is EntryKind.DIR:
        return Action.MKDIR
    if src.kind is EntryKind.SYMLINK:
        return Action.SYMLINK
    return Action.FILE


@dataclass
class Reconciled:
    """The difference between a walk of the source and the peer's manifest."""

    #: Paths to send, with their size (walk order: parents first).
    send: list[tuple[bytes, int]] = field(default_factory=list)
    #: Paths held there and gone here, topmost only (a delete takes the
    #: subtree), sorted; empty unless deletes are wanted.
    gone: list[bytes] = field(default_factory=list)
    #: Entries and directories seen here.
    entries: int = 0
    dirs: int = 0


def reconcile(
    walk: Iterable[tuple[bytes, EntryState]],
    there: dict[bytes, EntryState],
    compare: Compare,
    two_way: bool,
    excluded: Callable[[bytes], bool],
    delete: bool,
) -> Reconciled:
    """Compare a walk of the source with the peer's manifest ``there``.

    Two-way: what is as new or newer there is the peer's to send, and
    nothing is deleted (without history a rescan cannot tell "deleted here"
    from "new there")."""
    out = Reconciled()
    seen: set[bytes] = set()
    for rel, st in walk:
        seen.add(rel)
        out.dirs += st.kind is EntryKind.DIR
        other = there.get(rel)
        if compare(st, other) is Change.NONE:
            continue
        if two_way and other is not None and other.mtime_ns >= st.mtime_ns:
            continue
        out.send.append((rel, st.size))
    out.entries = len(seen)
    if two_way or not delete:
        return out
    tops: set[bytes] = set()
    for rel in sorted(r for r in there if r not in seen and not excluded(r)):
        if any(rel[:i] in tops for i in range(len(rel)) if rel[i] == 0x2F):
            continue  # removed with an ancestor
        tops.add(rel)
        out.gone.append(rel)
    return out
