"""The backlog of one link: paths that may differ on its peer.

Per mirror, insertion-ordered and coalesced: a path marked a thousand times
is one entry that keeps the time it *first* became dirty (that is what lag
measures) and the union of its flags. Entries can be delayed (settling
files and directories, retries after a transient error) and parked until an
operation in flight on the same path is acknowledged.

Persistence: every entry is also written to an SQLite table in the node's
state_dir (batched; one transaction per ``flush``) and removed only when the
peer acknowledged the change or it turned out to be no change. A restart
reloads the backlog oldest first, so a peer that was down for hours gets
everything, in order, without waiting for a full rescan (which still runs,
and catches what a crash lost in the last unflushed batch).

Memory is bounded: beyond ``MEMORY_MAX`` entries new bulk entries live
only in the table and are read back as the in-memory part drains.

Two lanes: a path the watcher saw change (``Flag.LIVE``) is *live*; what a
cold sync, reconcile, rescan, or reload from the table found is *bulk*.
``pop`` serves live entries first and gives bulk one start in every
``LIVE_RUN + 1`` while both wait, so bulk never starves; a bulk entry marked
live moves to the live lane. The lane is not persisted: after a restart
everything is bulk.

The link thread is the only user of a Backlog; each Backlog has its own
SQLite connection.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import NamedTuple, TypeVar

from .changes import Flag

log = logging.getLogger(__name__)

Key = tuple[int, bytes]  # (mirror id, path relative to the mirror root)


class Info(NamedTuple):
    """What the backlog knows about one dirty path."""

    #: Wall-clock time it first became dirty (what lag measures).
    since: float
    #: Size hint (bytes), for status.
    size: int
    #: ``changes.Flag`` bits of everything seen since.
    flags: int


#: What callers may pass where an Info goes: a plain (since, size, flags).
InfoLike = Info | tuple[float, int, int]


def merge(old: InfoLike, new: InfoLike) -> Info:
    """Two marks of one path: the first time, the latest size, all flags."""
    return Info(min(old[0], new[0]), new[1], int(old[2]) | int(new[2]))


LIVE = int(Flag.LIVE)
MEMORY_MAX = 200_000
#: Live entries are kept in memory up to this many times memory_max in all
#: (they are not persisted with their lane); beyond, they spill like bulk ones.
LIVE_MEMORY_RATIO = 2
#: Live starts in a row, while bulk work waits, before one bulk start.
LIVE_RUN = 8
FLUSH_SECONDS = 0.05

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    peer   TEXT NOT NULL,
    mirror TEXT NOT NULL,
    path   BLOB NOT NULL,
    since  REAL NOT NULL,
    size   INTEGER NOT NULL,
    flags  INTEGER NOT NULL,
    PRIMARY KEY (peer, mirror, path)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_age ON pending (peer, since);
"""


#: Rows written by one statement (the largest of these sizes; a smaller batch
#: is padded to the next size by repeating its last row, which changes
#: nothing: an upsert of the same values twice, a path twice in ``IN``).
#: One statement per batch, not ``executemany``: that takes the GIL back
#: after every row, and with other threads busy (the scanner, the watcher)
#: each take may wait a whole switch interval — 2,000 rows took seconds
#: while one other thread ran Python.
_CHUNKS = (16, 128, 1024)
_T = TypeVar("_T")


def _chunks(items: list[_T]) -> Iterator[tuple[int, list[_T]]]:
    """``items`` in statements of one of the ``_CHUNKS`` sizes, padded."""
    top = _CHUNKS[-1]
    for i in range(0, len(items), top):
        chunk = items[i : i + top]
        n = next(c for c in _CHUNKS if c >= len(chunk))
        yield n, chunk + [chunk[-1]] * (n - len(chunk))


@functools.cache
def _upsert_sql(n: int) -> str:
    """Upsert ``n`` rows: the peer is ``?1``, then (mirror, path, since,
    size, flags) per row."""
    rows = ",".join(["(?1,?,?,?,?,?)"] * n)
    return (
        f"INSERT INTO pending VALUES {rows} ON CONFLICT(peer, mirror, path) "
        "DO UPDATE SET since=min(since, excluded.since), size=excluded.size, "
        "flags=flags | excluded.flags"
    )


@functools.cache
def _delete_sql(n: int) -> str:
    """Delete ``n`` paths of one mirror (the primary key's search, not a scan)."""
    return f"DELETE FROM pending WHERE peer=? AND mirror=? AND path IN ({','.join('?' * n)})"


class Store:
    """The SQLite side of one link's backlog."""

    def __init__(self, path: str, peer: str) -> None:
        self.peer = peer
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        self._up: dict[tuple[str, bytes], Info] = {}
        self._del: set[tuple[str, bytes]] = set()
        self._last = time.monotonic()

    def upsert(self, mirror: str, path: bytes, info: InfoLike) -> None:
        k = (mirror, path)
        self._del.discard(k)
        info = Info(info[0], info[1], info[2] & ~LIVE)  # lanes are not persisted
        old = self._up.get(k)
        self._up[k] = info if old is None else merge(old, info)

    def delete(self, mirror: str, path: bytes) -> None:
        k = (mirror, path)
        self._up.pop(k, None)
        self._del.add(k)

    def flush(self, force: bool = False) -> None:
        if not (self._up or self._del):
            return
        now = time.monotonic()
        if not force and now - self._last < FLUSH_SECONDS:
            return
        self._last = now
        with self.db:
            self.db.execute("BEGIN")
            by_mirror: dict[str, list[bytes]] = {}
            for m, p in self._del:
                by_mirror.setdefault(m, []).append(p)
            for m, paths in by_mirror.items():
                for n, some in _chunks(paths):
                    self.db.execute(_delete_sql(n), (self.peer, m, *some))
            rows = [(m, p, s, z, f) for (m, p), (s, z, f) in self._up.items()]
            for n, chunk in _chunks(rows):
                self.db.execute(_upsert_sql(n), [self.peer, *itertools.chain(*chunk)])
        self._up.clear()
        self._del.clear()

    def oldest(
        self, mirrors: dict[str, int], limit: int, skip: Callable[[Key], bool]
    ) -> list[tuple[Key, Info]]:
        self.flush(force=True)
        out: list[tuple[Key, Info]] = []
        for m, p, s, z, f in self.db.execute(
            "SELECT mirror, path, since, size, flags FROM pending WHERE peer=? ORDER BY since",
            (self.peer,),
        ):
            mid = mirrors.get(m)
            if mid is None:
                continue  # a mirror no longer pushed to this peer
            key = (mid, bytes(p))
            if skip(key):
                continue
            out.append((key, Info(s, z, f & ~LIVE)))
            if len(out) >= limit:
                break
        return out

    def count(self) -> int:
        self.flush(force=True)
        row = self.db.execute("SELECT count(*) FROM pending WHERE peer=?", (self.peer,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        self.flush(force=True)
        self.db.close()


class Lane:
    """One lane's ready entries, per mirror and insertion-ordered, with
    running totals (status reads them often; a backlog may hold 200k)."""

    def __init__(self, mirrors: dict[int, str]) -> None:
        # OrderedDict, not dict: taking the first entry of a dict that had
        # many taken from its front scans past every deleted slot (a cold
        # sync of 200k entries spent more CPU there than sending files).
        self.queues: dict[int, OrderedDict[Key, Info]] = {mid: OrderedDict() for mid in mirrors}
        self.files = 0
        self.bytes = 0

    def get(self, key: Key) -> Info | None:
        return self.queues[key[0]].get(key)

    def put(self, key: Key, info: Info) -> None:
        q = self.queues[key[0]]
        old = q.get(key)
        if old is None:
            self.files += 1
            self.bytes += info.size
        else:
            self.bytes += info.size - old.size
        q[key] = info

    def take(self, key: Key) -> Info:
        info = self.queues[key[0]].pop(key)
        self.files -= 1
        self.bytes -= info.size
        return info

    def take_first(self, mid: int) -> tuple[Key, Info]:
        """The oldest entry of mirror ``mid`` (StopIteration if none)."""
        q = self.queues[mid]
        if not q:
            raise StopIteration
        key, info = q.popitem(last=False)
        self.files -= 1
        self.bytes -= info.size
        return key, info

    def ready(self, mid: int) -> bool:
        return bool(self.queues[mid])

    def oldest(self) -> float | None:
        """The first entry of each mirror (insertion order: about the oldest)."""
        heads = [next(iter(q.values())).since for q in self.queues.values() if q]
        return min(heads) if heads else None


class Backlog:
    def __init__(
        self, mirrors: dict[int, str], store: Store | None = None, memory_max: int = MEMORY_MAX
    ) -> None:
        self.names = mirrors
        self.ids = {n: i for i, n in mirrors.items()}
        self.store = store
        self.memory_max = memory_max
        #: The two lanes' ready entries, per mirror, insertion-ordered.
        self._live = Lane(mirrors)
        self._bulk = Lane(mirrors)
        self._later: list[tuple[float, Key]] = []
        self._later_info: dict[Key, tuple[float, Info]] = {}
        self._parked: dict[Key, Info] = {}
        #: Live starts in a row while bulk entries waited (see LIVE_RUN).
        self._run = 0
        #: Entries that exist only in the store (memory was full).
        self.spilled = 0

    # -- marking ----------------------------------------------------------------

    def _in_memory(self) -> int:
        return self._live.files + self._bulk.files + len(self._later_info) + len(self._parked)

    def _lane(self, info: Info) -> Lane:
        return self._live if info.flags & LIVE else self._bulk

    def holds(self, key: Key) -> bool:
        mid = key[0]
        return (
            key in self._live.queues[mid]
            or key in self._bulk.queues[mid]
            or key in self._later_info
            or key in self._parked
        )

    def mark(
        self,
        key: Key,
        info: InfoLike,
        delay: float = 0.0,
        persist: bool = True,
    ) -> None:
        """``key`` may differ on the peer; look at it now, or after ``delay`` s."""
        info = Info(info[0], info[1], int(info[2]))  # an int: Flag's operators are slow
        if persist and self.store is not None:
            self.store.upsert(self.names[key[0]], key[1], info)
        mid = key[0]
        live, bulk = self._live, self._bulk
        cur = live.get(key)
        if cur is not None:
            live.put(key, merge(cur, info))
            return
        cur = bulk.get(key)
        if cur is not None:
            merged = merge(cur, info)
            if merged.flags & LIVE:  # now live: it moves ahead
                bulk.take(key)
                live.put(key, merged)
            else:
                bulk.put(key, merged)
            return
        parked = self._parked.get(key)
        if parked is not None:
            self._parked[key] = merge(parked, info)
            return
        old = self._later_info.get(key)
        if old is None and self.store is not None and self._full(info):
            if not persist:  # it lives only in the store from now on: it must be there
                self.store.upsert(self.names[mid], key[1], info)
            self.spilled += 1  # read back by refill() as memory drains
            return
        if old is not None:
            info = merge(old[1], info)
        if delay > 0:
            due = time.monotonic() + delay
            if old is not None and old[0] >= due:
                self._later_info[key] = (old[0], info)
                return
            self._later_info[key] = (due, info)
            heapq.heappush(self._later, (due, key))
            return
        self._later_info.pop(key, None)
        self._lane(info).put(key, info)

    def _full(self, info: Info) -> bool:
        limit = LIVE_MEMORY_RATIO * self.memory_max if info.flags & LIVE else self.memory_max
        return self._in_memory() >= limit

    def promote(self) -> None:
        """Move delayed entries whose time has come to their lane."""
        now = time.monotonic()
        while self._later and self._later[0][0] <= now:
            due, key = heapq.heappop(self._later)
            cur = self._later_info.get(key)
            if cur is None or cur[0] != due:
                continue  # superseded by a later mark
            del self._later_info[key]
            self._lane(cur[1]).put(key, cur[1])

    def refill(self, busy: Callable[[Key], bool]) -> None:
        """Read spilled entries back from the store once memory has room."""
        if not self.spilled or self.store is None:
            return
        room = self.memory_max - self._in_memory()
        if room < self.memory_max // 2:
            return
        rows = self.store.oldest(self.ids, room, lambda k: self.holds(k) or busy(k))
        for key, info in rows:
            self._bulk.put(key, info)
        if len(rows) < room:
            self.spilled = 0
        else:
            self.spilled = max(0, self.spilled - len(rows))

    def load(self) -> int:
        """At start: everything the store holds, oldest first (bulk)."""
        if self.store is None:
            return 0
        total = self.store.count()
        rows = self.store.oldest(self.ids, self.memory_max, self.holds)
        for key, info in rows:
            self._bulk.put(key, info)
        self.spilled = total - len(rows)
        return total

    # -- taking -------------------------------------------------------------------

    def next_due(self) -> float | None:
        """Monotonic time of the next delayed entry, if any."""
        return self._later[0][0] if self._later else None

    def upcoming(self, mid: int, n: int) -> list[Key]:
        """The next ``n`` (at most) bulk entries of mirror ``mid`` ready now,
        in the order ``pop`` gives them (not taken)."""
        return list(itertools.islice(self._bulk.queues[mid], n))

    def has_ready(self, mid: int, bulk: bool = True) -> bool:
        """Whether ``pop(mid, bulk)`` has something to give."""
        return self._live.ready(mid) or (bulk and self._bulk.ready(mid))

    def pop(self, mid: int, bulk: bool = True) -> tuple[Key, Info]:
        """The next ready entry of mirror ``mid``: live first, with one bulk
        start in every LIVE_RUN + 1 while both wait; with ``bulk`` False
        (the bulk window is full), live only. StopIteration if none."""
        live = self._live
        waiting = bulk and self._bulk.ready(mid)
        if waiting and (not live.ready(mid) or self._run >= LIVE_RUN):
            self._run = 0
            lane = self._bulk
        else:
            if self._bulk.ready(mid):
                self._run += 1
            lane = live
        return lane.take_first(mid)

    def park(self, key: Key, info: InfoLike) -> None:
        """``key`` is dirty again while an operation on it is in flight."""
        old = self._parked.get(key)
        self._parked[key] = Info(*info) if old is None else merge(old, info)

    def unpark(self, key: Key) -> None:
        info = self._parked.pop(key, None)
        if info is not None:
            self.mark(key, info, persist=False)

    def unpark_all(self) -> None:
        for key in list(self._parked):
            self.unpark(key)

    def persist(self, key: Key, info: InfoLike) -> None:
        """Record ``key`` in the store only (an operation in flight that a
        crash must not forget, e.g. a rename)."""
        if self.store is not None:
            self.store.upsert(self.names[key[0]], key[1], info)

    def done(self, key: Key) -> None:
        """The peer holds ``key`` as it is here (or it needed nothing)."""
        if self.store is not None and not self.holds(key):
            self.store.delete(self.names[key[0]], key[1])

    def flush(self, force: bool = False) -> None:
        if self.store is not None:
            self.store.flush(force)

    # -- status -------------------------------------------------------------------

    def files(self) -> int:
        return self._in_memory() + self.spilled

    def lanes(self) -> dict[str, dict[str, float | int | None]]:
        """Per lane: entries waiting (ready, delayed, parked; spilled ones
        are bulk), their size hints, and the wall-clock time of the oldest."""
        out: dict[str, dict[str, float | int | None]] = {}
        waiting = [*(i for _, i in self._later_info.values()), *self._parked.values()]
        for name, lane in (("live", self._live), ("bulk", self._bulk)):
            is_live = name == "live"
            others = [i for i in waiting if bool(i.flags & LIVE) == is_live]
            times = [i.since for i in others]
            head = lane.oldest()
            if head is not None:
                times.append(head)
            out[name] = {
                "files": lane.files + len(others) + (0 if is_live else self.spilled),
                "bytes": lane.bytes + sum(i.size for i in others),
                "oldest": min(times) if times else None,
            }
        return out

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
