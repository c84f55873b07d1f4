"""Two-way mirrors: what happens when an incoming change meets a local one.

A mirror is two-way with a peer when the peer is in both ``push_to`` and
``accept_from``. The receiver compares three states of the path: *local*
(what is on disk here), *incoming* (what the peer sends) and *base* (the
last agreed version: ``Base``).

- local is the incoming version already → nothing to write;
- local still equals base → the peer made an ordinary update: apply it;
- otherwise both sides changed it → a conflict: the newer mtime wins, the
  node name that sorts last breaks a tie, and the losing version is kept as
  ``<stem>.conflict-<node>-<UTC mtime, ns><suffix>`` next to it (``node`` is the
  node that wrote the losing version). Both nodes apply the same rule, so
  they end with the same winner and the same conflict copy.

A delete from the peer of a file changed here since base is not applied:
the modification wins and travels back.

The base is the version last agreed with the peer, remembered across
restarts (history.py), and what the link last knew the peer held (its
listing, its acknowledgements): local equal to either is unchanged here.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from .frames import MAX_NAME, EntryKind
from .manifest import EntryState


class Verdict(enum.Enum):
    #: Write the incoming version over the local one.
    APPLY = "apply"
    #: The local file already is the incoming version.
    SAME = "same"
    #: Conflict, incoming wins: keep the local version as a conflict copy.
    KEEP_LOCAL_COPY = "keep-local-copy"
    #: Conflict, local wins: store the incoming version as a conflict copy.
    INCOMING_AS_COPY = "incoming-as-copy"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    copy_name: bytes = b""


def _same(a: EntryState, b: EntryState) -> bool:
    return a.kind == b.kind and a.size == b.size and a.mtime_ns == b.mtime_ns


class Base(NamedTuple):
    """What the receiver knows both sides held at a path: the agreement
    recorded with the peer (history.py) and what its link last knew the
    peer held (a listing, an acknowledgement, a change the peer sent). The
    record lags a little behind what is published (the link writes it), and
    the link's view is the peer's *current* state after a listing: local
    equal to either is unchanged here since both sides agreed."""

    agreed: EntryState | None = None
    held: EntryState | None = None


def _bases(base: Base | EntryState | None) -> list[EntryState]:
    if base is None:
        return []
    if isinstance(base, Base):
        return [b for b in base if b is not None]
    return [base]


def conflict_name(name: bytes, node: str, mtime_ns: int) -> bytes:
    stem, dot, suffix = name.rpartition(b".")
    if not stem or not dot:
        stem, suffix = name, b""
    else:
        suffix = b"." + suffix
    # nanoseconds: two losing versions from one node in the same second must
    # not share a name (the second would replace the first)
    sec, ns = divmod(mtime_ns, 1_000_000_000)
    stamp = (time.strftime("%Y%m%dT%H%M%S", time.gmtime(sec)) + f".{ns:09d}Z").encode()
    tag = b".conflict-" + os.fsencode(node) + b"-" + stamp
    # Too long for a name: cut the stem (then the suffix), never the tag. Cut
    # into the tag, the copy's name could be the file's own (b"x" * 255) or
    # that of another version's copy, and publishing the copy would replace it.
    room = MAX_NAME - len(tag)
    if len(stem) + len(suffix) > room:
        stem = stem[: max(1, room - len(suffix))]
        suffix = suffix[: room - len(stem)]
    return (stem + tag + suffix)[:MAX_NAME]


def decide(
    name: bytes,
    local: EntryState | None,
    incoming: EntryState,
    base: Base | EntryState | None,
    here: str,
    peer: str,
) -> Decision:
    """What to do with an incoming regular file ``name`` (last path component)."""
    if local is None or local.kind != incoming.kind:
        return Decision(Verdict.APPLY)
    if _same(local, incoming):
        return Decision(Verdict.SAME)
    if any(_same(local, b) for b in _bases(base)):
        return Decision(Verdict.APPLY)
    incoming_wins = (incoming.mtime_ns, peer) > (local.mtime_ns, here)
    if incoming_wins:
        return Decision(Verdict.KEEP_LOCAL_COPY, conflict_name(name, here, local.mtime_ns))
    return Decision(Verdict.INCOMING_AS_COPY, conflict_name(name, peer, incoming.mtime_ns))


def keep_local_on_delete(local: EntryState | None, base: Base | EntryState | None) -> bool:
    """A delete from the peer meets a file changed here since base: keep it.
    A directory is compared by its kind alone (its mtime changes with every
    entry): the caller checks what is below it (``changed_below``)."""
    if local is None:
        return False
    bases = _bases(base)
    if local.kind is EntryKind.DIR:
        return not any(b.kind is EntryKind.DIR for b in bases)
    return not any(_same(local, b) for b in bases)


def changed_below(
    below: Iterable[tuple[bytes, EntryState]], base: Callable[[bytes], Base | EntryState | None]
) -> bytes | None:
    """The first entry below a directory the peer deleted that is new or
    changed here since ``base`` (then the directory is kept), or None."""
    for rel, st in below:
        if keep_local_on_delete(st, base(rel)):
            return rel
    return None
