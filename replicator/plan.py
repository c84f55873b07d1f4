"""What to send, decided without I/O: for one dirty path, and for a whole
mirror after the peer listed what it holds (a reconcile).

The link gathers the facts (the source's entry, what the peer holds, the
watcher's flags, the clock) and acts on the answer (frames, the backlog).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from .changes import Flag
from .frames import EntryKind
from .history import Version, agrees, same_version
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


#: ``changes.Flag`` bits as plain ints: an IntFlag operand makes ``&`` a
#: Python-level call (~0.75 µs each, several per entry of a tree; issue 13).
_CLOSED = int(Flag.CLOSED)
_ATTRIB = int(Flag.ATTRIB)
_DATA_OR_CLOSED = int(Flag.DATA | Flag.CLOSED)


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
    if guessed and flags & _CLOSED and src.kind is EntryKind.FILE:
        return Action.FILE  # closed after a guess: its data may have changed
    change = compare(src, known)
    if change is Change.NONE:
        if xattrs and flags & _ATTRIB and src.kind is not EntryKind.SYMLINK:
            return Action.META  # only its extended attributes changed
        return Action.NOTHING
    if src.kind is EntryKind.FILE and change is Change.DATA:
        settling = (
            not flags & _CLOSED
            and 0 <= now_ns - src.mtime_ns < SETTLE_NS
            and now - since < SETTLE_MAX
        )
        if (
            flags & _ATTRIB
            and not flags & _DATA_OR_CLOSED
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
    #: Two-way: entries equal on both sides whose agreement is not
    #: recorded yet (history.py), and records of paths gone on both sides.
    agree: list[tuple[bytes, EntryState]] = field(default_factory=list)
    stale: list[bytes] = field(default_factory=list)


def ancestors(rel: bytes) -> Iterator[bytes]:
    """The directories above ``rel`` (b"a", b"a/b" for b"a/b/c")."""
    return (rel[:i] for i in range(len(rel)) if rel[i] == 0x2F)


def outermost(paths: Iterable[bytes]) -> list[bytes]:
    """Of ``paths`` (sorted: a directory before what is below it), those
    with no ancestor among them, in order."""
    tops: list[bytes] = []
    seen: set[bytes] = set()
    for rel in paths:
        if not any(a in seen for a in ancestors(rel)):
            seen.add(rel)
            tops.append(rel)
    return tops


def reconcile(
    walk: Iterable[tuple[bytes, EntryState]],
    there: dict[bytes, EntryState],
    compare: Compare,
    two_way: bool,
    excluded: Callable[[bytes], bool],
    delete: bool,
    agreed: Mapping[bytes, Version] | None = None,
) -> Reconciled:
    """Compare a walk of the source with the peer's manifest ``there``.

    Two-way, ``agreed`` (history.py) tells who changed what since both sides
    last held the same version:

    ========  =========  ===============  ==========================================
    here      there      agreed           action
    ========  =========  ===============  ==========================================
    present   absent     equals here      deleted there: nothing (its Delete comes)
    present   absent     other / none     new or edited here: send (edit beats delete)
    present   different  equals there     changed here: send
    present   different  equals here      changed there: nothing (it comes from there)
    present   different  neither          as without history (below)
    absent    present    equals there     deleted here: Delete
    absent    present    other / none     new or changed there: nothing
    ========  =========  ===============  ==========================================

    A directory deleted here is deleted there only if everything below it
    there is agreed too; otherwise only what is agreed below it.

    Without history (``agreed`` None): what is as new or newer there is the
    peer's to send, and nothing is deleted (a rescan cannot tell "deleted
    here" from "new there")."""
    out = Reconciled()
    seen: set[bytes] = set()
    history = agreed if two_way else None
    for rel, st in walk:
        seen.add(rel)
        out.dirs += st.kind is EntryKind.DIR
        other = there.get(rel)
        rec = None if history is None else history.get(rel)
        if (
            history is not None
            and other is not None
            and same_version(st, other)
            and not agrees(rec, st)
        ):
            out.agree.append((rel, st))  # the same on both sides: agreed
            rec = Version.of(st)
        if compare(st, other) is Change.NONE:
            continue
        if history is not None and rec is not None:
            if agrees(rec, st) and not agrees(rec, other):
                continue  # changed or deleted there only
            if agrees(rec, other) and not agrees(rec, st):
                out.send.append((rel, st.size))  # changed here only
                continue
        if two_way and other is not None and other.mtime_ns >= st.mtime_ns:
            continue
        out.send.append((rel, st.size))
    out.entries = len(seen)
    if history is not None:
        out.stale = sorted(r for r in history if r not in seen and r not in there)
    if not delete or (two_way and history is None):
        return out
    gone = [r for r in there if r not in seen and not excluded(r)]
    blocked: set[bytes] = set()
    if history is not None:
        # Deleted here: only what both sides agreed on; a directory only if
        # nothing below it there is new or changed.
        deleted = {r for r in gone if agrees(history.get(r), there[r])}
        for r in gone:
            if r not in deleted:
                blocked.update(ancestors(r))
        gone = list(deleted)
    tops: set[bytes] = set()
    for rel in sorted(gone):
        if any(a in tops for a in ancestors(rel)):
            continue  # removed with an ancestor
        if rel in blocked:
            continue  # kept: something below it is not agreed
        tops.add(rel)
        out.gone.append(rel)
    return out
