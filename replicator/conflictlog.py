"""Two-way conflicts remembered until the operator settles them.

When a receiving two-way mirror decides a conflict (conflicts.py), one
version stays at the path and the other is published next to it as a
conflict copy. ``Recorder`` (one per receiving mirror, on its session
thread) describes the conflict when it is decided — both versions (size,
mtime, and a content digest when it is cheap), which is at the path and
which in the copy, the peer, when — and writes it to ``ConflictLog`` once
the copy is durable (the commit round that published it), so a listing
never shows a copy that is not there yet.

``ConflictLog`` is a table in the node's map database (maps.py): it
survives restarts. A conflict is *unresolved* while its copy exists; the
operator's side (resolving.py) drops the records whose copy is gone.

Each node records the conflicts it decided: usually both nodes of a pair
decide the same conflict (each receives the other's version), but when only
one did, the other holds the copy (it replicates) without a record.

The digest is the block map's file digest (blockmap.py): for the incoming
version the map it was verified against; for the local one the map
remembered when it was published here (files of ``DELTA_MIN`` bytes or
more, still exactly that file), or, for a smaller file, hashed now with the
incoming map's algorithm and block size. Equal digests mean equal contents.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from .blockmap import NAMES, BlockMap, map_fd
from .conflicts import Decision, Verdict
from .errors import BadPath, SourceShrank
from .inbox import PartialFile
from .manifest import EntryState
from .maps import DELTA_MIN, Identity, PublishedMaps, _Db
from .paths import Root, show

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conflicts (
    mirror TEXT NOT NULL, copy BLOB NOT NULL, path BLOB NOT NULL,
    peer TEXT NOT NULL, here TEXT NOT NULL, decided REAL NOT NULL,
    kept TEXT NOT NULL,
    local_size INTEGER NOT NULL, local_mtime_ns INTEGER NOT NULL, local_digest TEXT,
    remote_size INTEGER NOT NULL, remote_mtime_ns INTEGER NOT NULL, remote_digest TEXT,
    PRIMARY KEY (mirror, copy)
) WITHOUT ROWID;
"""

_ALGO_NAMES = {v: k for k, v in NAMES.items()}


@dataclass(frozen=True)
class Version:
    """One of the two versions of a conflict."""

    size: int
    mtime_ns: int
    #: "ALGO:HEX" of its block map's file digest, None if not known.
    digest: str | None = None


@dataclass(frozen=True)
class Conflict:
    """A conflict decided on this node (``here``) for a file of ``mirror``."""

    mirror: str
    #: The path (relative to the mirror root) and its conflict copy's.
    path: bytes
    copy: bytes
    peer: str
    here: str
    #: When it was decided (Unix time).
    decided: float
    #: Which version stays at ``path``: "local" (this node's) or "remote"
    #: (the peer's); the other one is in the copy.
    kept: str
    local: Version
    remote: Version

    @property
    def at_path(self) -> Version:
        return self.local if self.kept == "local" else self.remote

    @property
    def in_copy(self) -> Version:
        return self.remote if self.kept == "local" else self.local

    def to_json(self, root: str) -> dict[str, Any]:
        """The conflict for ``replicatorctl conflicts --json`` (mirror at ``root``)."""

        def version(v: Version, origin: str) -> dict[str, Any]:
            node = self.here if origin == "local" else self.peer
            return {
                "from": origin,
                "node": node,
                "size": v.size,
                "mtime_ns": v.mtime_ns,
                "digest": v.digest,
            }

        other = "remote" if self.kept == "local" else "local"
        return {
            "mirror": self.mirror,
            "path": show(self.path),
            "copy": show(self.copy),
            "full_path": root.rstrip("/") + "/" + show(self.path),
            "full_copy": root.rstrip("/") + "/" + show(self.copy),
            "peer": self.peer,
            "decided": self.decided,
            "kept": self.kept,
            "at_path": version(self.at_path, self.kept),
            "in_copy": version(self.in_copy, other),
            "same_content": (
                self.local.digest is not None
                and self.local.digest == self.remote.digest
                and self.local.size == self.remote.size
            ),
        }


class ConflictLog:
    """The conflicts decided on this node, in its map database."""

    def __init__(self, db: _Db) -> None:
        self._db = db
        self._ready = False

    def _ensure(self) -> None:
        """Create the table on first use (caller holds the lock): a
        database that fails costs the records only, never the receiving."""
        if not self._ready:
            self._db.db.executescript(_SCHEMA)
            self._ready = True

    def add(self, conflicts: list[Conflict]) -> None:
        if not conflicts:
            return
        rows = [
            (
                c.mirror,
                c.copy,
                c.path,
                c.peer,
                c.here,
                c.decided,
                c.kept,
                c.local.size,
                c.local.mtime_ns,
                c.local.digest,
                c.remote.size,
                c.remote.mtime_ns,
                c.remote.digest,
            )
            for c in conflicts
        ]
        with self._db.lock:
            self._ensure()
            self._db.db.execute("BEGIN")
            try:
                self._db.db.executemany(
                    "INSERT OR REPLACE INTO conflicts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows
                )
            except BaseException:
                self._db.db.execute("ROLLBACK")
                raise
            self._db.db.execute("COMMIT")

    def of(self, mirror: str) -> list[Conflict]:
        """The conflicts recorded for ``mirror``, oldest first."""
        with self._db.lock:
            self._ensure()
            rows = self._db.db.execute(
                "SELECT mirror, copy, path, peer, here, decided, kept, local_size, "
                "local_mtime_ns, local_digest, remote_size, remote_mtime_ns, remote_digest "
                "FROM conflicts WHERE mirror=? ORDER BY decided, path, copy",
                (mirror,),
            ).fetchall()
        return [
            Conflict(
                r[0],
                bytes(r[2]),
                bytes(r[1]),
                r[3],
                r[4],
                r[5],
                r[6],
                Version(r[7], r[8], r[9]),
                Version(r[10], r[11], r[12]),
            )
            for r in rows
        ]

    def drop(self, mirror: str, copy: bytes) -> None:
        with self._db.lock:
            self._ensure()
            self._db.db.execute("DELETE FROM conflicts WHERE mirror=? AND copy=?", (mirror, copy))


def digest_text(bm: BlockMap) -> str:
    return f"{_ALGO_NAMES.get(bm.algo, str(bm.algo))}:{bm.file_digest.hex()}"


@dataclass
class Recorder:
    """The conflicts one receiving mirror decided, recorded once published."""

    mirror: str
    peer: str
    here: str
    log: ConflictLog
    #: Decided, waiting for the commit round that publishes the copy (by op).
    pending: dict[int, Conflict] = field(default_factory=dict)

    def decided(
        self,
        p: PartialFile,
        decision: Decision,
        local: EntryState,
        root: Root,
        maps: PublishedMaps | None,
    ) -> None:
        """``p`` (verified) met ``local`` and ``decision`` keeps one as a copy."""
        if not decision.copy_name:
            return
        incoming = Version(p.size, p.mtime_ns, None if p.bmap is None else digest_text(p.bmap))
        mine = Version(local.size, local.mtime_ns, _local_digest(p, root, maps))
        kept = "remote" if decision.verdict is Verdict.KEEP_LOCAL_COPY else "local"
        copy = b"/".join((*p.parts[:-1], decision.copy_name))
        self.pending[p.op] = Conflict(
            self.mirror, p.path, copy, self.peer, self.here, time.time(), kept, mine, incoming
        )

    def published(self, acked: list[int]) -> None:
        """The commit round made ``acked`` durable: record their conflicts
        (the others failed: their copies were not made)."""
        if not self.pending:
            return
        done = [self.pending[op] for op in acked if op in self.pending]
        self.pending.clear()
        try:
            self.log.add(done)
        except sqlite3.Error as e:
            # The copies are there and the conflicts logged; only the listing misses them.
            log.warning(
                "cannot record %d conflicts of mirror %s: %s",
                len(done),
                self.mirror,
                e,
                extra={"MIRROR": self.mirror, "PEER": self.peer},
            )


def _local_digest(p: PartialFile, root: Root, maps: PublishedMaps | None) -> str | None:
    """The digest of our version at ``p``'s path, if it is cheap (see above)."""
    theirs = p.bmap
    if theirs is None:
        return None
    try:
        found = root.open_file(p.parts)
    except (OSError, BadPath):
        return None
    if found is None:
        return None
    f, st = found
    with f:
        if st.st_size >= DELTA_MIN:
            try:
                known = maps.get(p.path) if maps is not None else None
            except sqlite3.Error:
                return None
            if known is not None and known[0] == Identity.of(st):
                return digest_text(known[1])
            return None
        try:
            return digest_text(map_fd(f.fd, st.st_size, theirs.algo, theirs.block_size))
        except (OSError, SourceShrank):
            return None
