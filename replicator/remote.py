"""What a link knows its peer holds in one mirror.

Filled from the peer's manifest (List → Entry… → ListEnd) and kept current
by acknowledgements: an Ack moves the entry's state here, a Delete removes a
subtree, a Rename moves one. The link compares the source with this to send
only what really differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from . import frames as F
from .history import Agreed
from .manifest import EntryState, Preserve


@dataclass
class RemoteMirror:
    #: The peer accepted the mirror (Opened with code 0) on this connection.
    opened: bool = False
    #: What the peer applies as we declare it (its Opened).
    preserve: Preserve = Preserve.NONE
    #: Why the peer refused it, if it did.
    refused: str | None = None
    #: A complete manifest arrived on this connection: sending may start.
    listed: bool = False
    #: The manifest being received, until ListEnd.
    listing: dict[bytes, EntryState] | None = None
    list_id: int = 0
    known: dict[bytes, EntryState] = field(default_factory=dict)
    #: Two-way mirrors: the version of each path last agreed with the peer
    #: (history.py); None for a mirror we only push.
    agreed: Agreed | None = None
    #: Hard links there, from the last manifest (``Entry.target`` of a file):
    #: a name → the first name of its inode (hardlinks.regroup).
    heads: dict[bytes, bytes] = field(default_factory=dict)
    heads_listing: dict[bytes, bytes] = field(default_factory=dict)
    partials: dict[bytes, F.Partial] = field(default_factory=dict)
    #: Files sent as metadata on an attribute change alone (plan.META_GUESS)
    #: since their data last was: a later close sends the data.
    guessed: set[bytes] = field(default_factory=set)
    last_scan: float | None = None
    last_scan_duration: float | None = None
    next_scan: float = 0.0

    def reset(self) -> None:
        """The connection dropped: what the peer holds must be listed again."""
        self.opened = self.listed = False
        self.listing = None
        self.partials = {}
        self.next_scan = 0.0

    def entry(self, ev: F.Entry) -> None:
        if self.listing is not None:
            try:
                kind = F.EntryKind(ev.kind)
            except ValueError:
                return
            target = ev.target
            if kind is F.EntryKind.FILE:
                if target:
                    self.heads_listing[ev.path] = target
                target = b""
            self.listing[ev.path] = EntryState(
                kind, ev.mode, ev.size, ev.mtime_ns, ev.uid, ev.gid, target
            )

    def acked(self, path: bytes, state: EntryState) -> None:
        old = self.known.get(path)
        if old is not None and old.kind is F.EntryKind.DIR and state.kind is not old.kind:
            self.forget(path)  # a directory replaced by a file or symlink
        self.known[path] = state

    def below(self, path: bytes) -> list[bytes]:
        """The paths the peer holds below directory ``path`` (a walk of
        ``known``: it is not indexed by directory)."""
        prefix = path + b"/"
        return [k for k in self.known if k.startswith(prefix)]

    def forget(self, path: bytes) -> None:
        """``path`` and, for a directory, everything below it are gone."""
        st = self.known.pop(path, None)
        if st is not None and st.kind is F.EntryKind.DIR:
            for k in self.below(path):
                del self.known[k]

    def move(self, src: bytes, dst: bytes) -> None:
        self.forget(dst)
        # Guesses move with their files, also those below a directory.
        prefix = src + b"/"
        for g in [g for g in self.guessed if g == src or g.startswith(prefix)]:
            self.guessed.discard(g)
            self.guessed.add(dst + g[len(src) :])
        st = self.known.pop(src, None)
        if st is None:
            return
        self.known[dst] = st
        if st.kind is F.EntryKind.DIR:
            for k in self.below(src):
                self.known[dst + k[len(src) :]] = self.known.pop(k)

    def stale_dir(self, path: bytes) -> None:
        """The peer's copy of directory ``path`` got a new mtime (an entry in
        it changed): make sure ours is sent again."""
        cur = self.known.get(path)
        if cur is not None and cur.kind is F.EntryKind.DIR and cur.mtime_ns != -1:
            self.known[path] = replace(cur, mtime_ns=-1)  # once per run of acks
