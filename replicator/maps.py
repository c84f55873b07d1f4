"""Block maps remembered across restarts: what a peer holds, what we published.

Deltas need both ends to agree on the version a change is made against:

- the **sender** remembers, per peer, mirror and path, the block map of the
  version that peer acknowledged, with the size and mtime it acknowledged
  (``SentMaps``): when the path changes and the peer still holds that
  version, only the blocks that differ are sent;
- the **receiver** remembers, per mirror and path, the block map of the
  file it published, with that file's identity (inode, size, mtime, ctime)
  (``PublishedMaps``): a delta is applied only while the published file is
  still exactly that file; a copy changed under it (a local user, a bad
  restore) gets the whole file instead.

Only files of at least ``DELTA_MIN`` bytes are remembered: a smaller file
is cheaper to send whole than to diff, and bursts of small files must not
pay an SQLite write each. One SQLite file per node (WAL; a lost write only
costs one whole send).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import NamedTuple

from .blockmap import BlockMap

#: Files smaller than this are always sent whole.
DELTA_MIN = 1 << 20


class Identity(NamedTuple):
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sent (
    peer TEXT NOT NULL, mirror TEXT NOT NULL, path BLOB NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, map BLOB NOT NULL,
    PRIMARY KEY (peer, mirror, path)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS published (
    mirror TEXT NOT NULL, path BLOB NOT NULL,
    ino INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL, map BLOB NOT NULL,
    PRIMARY KEY (mirror, path)
) WITHOUT ROWID;
"""


class _Db:
    """One SQLite connection shared by the threads of this process."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.lock = threading.Lock()
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.db.close()


class SentMaps:
    """Sender: the block map of the version each peer acknowledged."""

    def __init__(self, db: _Db, peer: str) -> None:
        self._db = db
        self.peer = peer

    def get(self, mirror: str, path: bytes, size: int, mtime_ns: int) -> BlockMap | None:
        """The map of ``path`` if the peer holds the version of ``size`` and
        ``mtime_ns`` we remembered it for."""
        with self._db.lock:
            row = self._db.db.execute(
                "SELECT size, mtime_ns, map FROM sent WHERE peer=? AND mirror=? AND path=?",
                (self.peer, mirror, path),
            ).fetchone()
        if row is None or (row[0], row[1]) != (size, mtime_ns):
            return None
        try:
            return BlockMap.decode(row[2])
        except (ValueError, IndexError):
            return None

    def put(self, mirror: str, path: bytes, size: int, mtime_ns: int, bm: BlockMap) -> None:
        with self._db.lock:
            self._db.db.execute(
                "INSERT OR REPLACE INTO sent VALUES (?, ?, ?, ?, ?, ?)",
                (self.peer, mirror, path, size, mtime_ns, bm.encode()),
            )

    def forget(self, mirror: str, path: bytes) -> None:
        with self._db.lock:
            self._db.db.execute(
                "DELETE FROM sent WHERE peer=? AND mirror=? AND path=?", (self.peer, mirror, path)
            )


class PublishedMaps:
    """Receiver: the block map of each file it published, with its identity."""

    def __init__(self, db: _Db, mirror: str) -> None:
        self._db = db
        self.mirror = mirror

    def get(self, path: bytes) -> tuple[Identity, BlockMap] | None:
        with self._db.lock:
            row = self._db.db.execute(
                "SELECT ino, size, mtime_ns, ctime_ns, map FROM published "
                "WHERE mirror=? AND path=?",
                (self.mirror, path),
            ).fetchone()
        if row is None:
            return None
        try:
            return Identity(*row[:4]), BlockMap.decode(row[4])
        except (ValueError, IndexError):
            return None

    def put_many(self, items: list[tuple[bytes, Identity, BlockMap]]) -> None:
        if not items:
            return
        with self._db.lock:
            self._db.db.execute("BEGIN")
            try:
                self._db.db.executemany(
                    "INSERT OR REPLACE INTO published VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(self.mirror, p, *ident, bm.encode()) for p, ident, bm in items],
                )
            except BaseException:
                self._db.db.execute("ROLLBACK")
                raise
            self._db.db.execute("COMMIT")

    def forget(self, path: bytes) -> None:
        with self._db.lock:
            self._db.db.execute(
                "DELETE FROM published WHERE mirror=? AND path=?", (self.mirror, path)
            )


_open: dict[str, _Db] = {}
_open_lock = threading.Lock()


def database(state_dir: str) -> _Db:
    """The node's map database (one connection per process and state dir)."""
    path = os.path.join(state_dir, "maps.sqlite3")
    with _open_lock:
        db = _open.get(path)
        if db is None:
            db = _open[path] = _Db(path)
        return db
