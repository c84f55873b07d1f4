"""Two-way mirrors: the version of each path last agreed with a peer.

A rescan sees "missing here, present there" and, on its own, cannot tell
"deleted here" from "new there" (nor "changed here" from "changed there").
The archive can: per peer, mirror and path it holds the version both sides
last held (kind, size, mtime; a directory by its kind alone), as Unison's
archive does. It is written

- by the link, when the peer acknowledges what we sent (``Answers.ack``);
- by the receiver, when what the peer sent is published here (an
  ``Agreed`` message to the link to that peer, after the commit: a crash
  before it must not record a version this node does not hold);
- by a reconcile, for every entry equal on both sides (this bootstraps
  mirrors made before the archive existed);

forgotten with a delete both sides applied, moved with a rename. A record for
a path absent here is a *tombstone*: the path was deleted here since both
sides agreed on it. It goes when the peer acknowledges the Delete.

Only two-way mirrors have records. The link owns them (``Agreed``, in
memory, read without I/O) and writes what changed to ``maps.sqlite3``
(WAL, synchronous=NORMAL: a write survives a SIGKILL, a power cut may lose
the last ones) in one transaction per loop round.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple, Protocol

from .frames import EntryKind
from .manifest import EntryState
from .maps import _Db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agreed (
    peer TEXT NOT NULL, mirror TEXT NOT NULL, path BLOB NOT NULL,
    kind INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    PRIMARY KEY (peer, mirror, path)
) WITHOUT ROWID;
"""


class Version(NamedTuple):
    """What two sides agree on: a file or symlink by kind, size and mtime,
    a directory by its kind alone (its mtime changes with every entry)."""

    kind: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: EntryState) -> Version:
        if st.kind is EntryKind.DIR:
            return cls(int(EntryKind.DIR), 0, 0)
        return cls(int(st.kind), st.size, st.mtime_ns)

    def state(self) -> EntryState:
        """As an ``EntryState`` (mode and owners unknown: 0)."""
        return EntryState(EntryKind(self.kind), 0, self.size, self.mtime_ns, 0, 0)


class _Versioned(Protocol):
    @property
    def kind(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def mtime_ns(self) -> int: ...


def same_version(a: _Versioned, b: _Versioned) -> bool:
    """``a`` and ``b`` (a ``Version`` or an ``EntryState``) are one version:
    a directory by its kind alone, anything else by kind, size and mtime."""
    if a.kind != b.kind:
        return False
    return a.kind == EntryKind.DIR or (a.size == b.size and a.mtime_ns == b.mtime_ns)


def agrees(rec: Version | None, st: EntryState | None) -> bool:
    """``st`` is the version recorded in ``rec`` (without building a
    ``Version``: reconcile asks this of every entry)."""
    return rec is not None and st is not None and same_version(rec, st)


def _below(path: bytes) -> tuple[bytes, bytes]:
    """The range of paths strictly below ``path`` ("/" + 1 is "0")."""
    return path + b"/", path + b"0"


_KEY = "peer=? AND mirror=?"
_AT = f"{_KEY} AND path=?"
_BELOW = f"{_KEY} AND path>=? AND path<?"


class Agreed:
    """The records of one mirror with one peer: read in memory, changes
    journaled for ``Archive.write``."""

    def __init__(self, mirror: str, records: dict[bytes, Version] | None = None) -> None:
        self.mirror = mirror
        self.records: dict[bytes, Version] = records if records is not None else {}
        #: Changes not written yet: ("put", path, version), ("forget", path),
        #: ("move", src, dst).
        self.journal: list[tuple[str, bytes, Version | bytes | None]] = []

    def __len__(self) -> int:
        return len(self.records)

    def get(self, path: bytes) -> Version | None:
        return self.records.get(path)

    def put(self, path: bytes, st: EntryState) -> None:
        v = Version.of(st)
        old = self.records.get(path)
        if old == v:
            return
        if old is not None and old.kind == EntryKind.DIR and v.kind != EntryKind.DIR:
            self.forget(path)  # a directory replaced by a file or symlink
        self.records[path] = v
        self.journal.append(("put", path, v))

    def forget(self, path: bytes) -> None:
        """``path`` and everything below it are no longer agreed."""
        rec = self.records.pop(path, None)
        if rec is not None and rec.kind == EntryKind.DIR:
            for k in list(self._under(path)):
                del self.records[k]
        self.journal.append(("forget", path, None))

    def move(self, src: bytes, dst: bytes) -> None:
        """A rename both sides applied: the records of ``src`` (and below)
        become those of ``dst``."""
        self.forget(dst)
        rec = self.records.pop(src, None)
        if rec is not None:
            self.records[dst] = rec
            for k in list(self._under(src)):
                self.records[dst + k[len(src) :]] = self.records.pop(k)
        self.journal.append(("move", src, dst))

    def _under(self, path: bytes) -> Iterator[bytes]:
        prefix = path + b"/"
        return (k for k in self.records if k.startswith(prefix))


class Archive:
    """The archive of one node's link to one peer, in ``maps.sqlite3``."""

    def __init__(self, db: _Db, peer: str) -> None:
        self._db = db
        self.peer = peer
        with db.lock:
            db.db.executescript(_SCHEMA)

    def load(self, mirror: str) -> Agreed:
        with self._db.lock:
            rows = self._db.db.execute(
                "SELECT path, kind, size, mtime_ns FROM agreed WHERE peer=? AND mirror=?",
                (self.peer, mirror),
            ).fetchall()
        return Agreed(mirror, {bytes(p): Version(k, s, t) for p, k, s, t in rows})

    def drop(self, mirror: str) -> None:
        """Forget every record of ``mirror`` (it is no longer two-way with
        the peer: its records would go stale)."""
        with self._db.lock:
            self._db.db.execute("DELETE FROM agreed WHERE peer=? AND mirror=?", (self.peer, mirror))

    def write(self, agreed: list[Agreed]) -> int:
        """Write the journals of ``agreed`` in one transaction; the number of
        changes written."""
        todo = [a for a in agreed if a.journal]
        if not todo:
            return 0
        n = 0
        db = self._db.db
        with self._db.lock:
            db.execute("BEGIN")
            try:
                for a in todo:
                    pm = (self.peer, a.mirror)
                    puts: list[tuple[object, ...]] = []
                    for what, path, arg in a.journal:
                        if what == "put":
                            assert isinstance(arg, Version)
                            puts.append((*pm, path, *arg))
                            n += 1
                            continue
                        self._put(puts)  # in order: before a forget or a move
                        if what == "forget":
                            self._delete(pm, path)
                        else:
                            assert isinstance(arg, bytes)
                            self._move(pm, path, arg)
                        n += 1
                    self._put(puts)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        for a in todo:
            a.journal.clear()
        return n

    def _put(self, rows: list[tuple[object, ...]]) -> None:
        """Insert ``rows`` (emptied)."""
        if rows:
            self._db.db.executemany("INSERT OR REPLACE INTO agreed VALUES (?, ?, ?, ?, ?, ?)", rows)
            rows.clear()

    def _delete(self, pm: tuple[str, str], path: bytes) -> None:
        """Delete the rows of ``path`` and below."""
        db = self._db.db
        db.execute(f"DELETE FROM agreed WHERE {_AT}", (*pm, path))
        db.execute(f"DELETE FROM agreed WHERE {_BELOW}", (*pm, *_below(path)))

    def _move(self, pm: tuple[str, str], src: bytes, dst: bytes) -> None:
        """Rows of ``src`` and below become rows of ``dst`` (in Python: a
        concatenation in SQL would turn the BLOB paths into TEXT)."""
        db = self._db.db
        self._delete(pm, dst)
        cols = "SELECT path, kind, size, mtime_ns FROM agreed WHERE"
        rows = db.execute(f"{cols} {_AT}", (*pm, src)).fetchall()
        rows += db.execute(f"{cols} {_BELOW}", (*pm, *_below(src))).fetchall()
        self._delete(pm, src)
        db.executemany(
            "INSERT OR REPLACE INTO agreed VALUES (?, ?, ?, ?, ?, ?)",
            [(*pm, dst + bytes(p)[len(src) :], k, s, t) for p, k, s, t in rows],
        )
