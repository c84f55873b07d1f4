"""What a link has sent and not had answered, and the rules that follow from it.

No I/O: the link asks and acts. One operation per path at a time; a path
dirty again while its operation is in flight is parked by the caller and
looked at again when the operation is released. A directory with children
in flight is not judged (its mtime is still moving). Nothing below a
directory being renamed starts before the rename is answered: such paths
wait on the rename's op. When the connection is lost, everything in flight
and everything waiting is handed back to be marked dirty again.
"""

from __future__ import annotations

import enum
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from . import frames as F
from .backlog import InfoLike as Info
from .backlog import Key
from .blockmap import BlockMap
from .manifest import EntryState


@dataclass
class Record:
    """One operation in flight."""

    kind: type[F.Event]
    key: Key
    #: When the change it carries was first seen (wall clock).
    since: float
    #: The state the peer holds once it acknowledges (None: deleted/renamed).
    state: EntryState | None = None
    #: Renames: the destination path.
    dst: bytes | None = None
    size: int = 0
    #: Renames: a directory moves (everything below it with it).
    is_dir: bool = False
    #: Started from the live lane (backlog.py); bulk ones count against
    #: the bulk window (window.py).
    live: bool = False
    #: When it was started (monotonic), after the source was looked at:
    #: what it carries is the source as it was then or later (barrier.py).
    sent: float = 0.0
    #: Files, once their End went out: the source version sent and its
    #: block map (remembered when acknowledged; a Want sends ranges again).
    version: bytes = b""
    bmap: BlockMap | None = None

    def paths(self) -> list[Key]:
        """The paths this operation holds: its own, and a rename's destination."""
        return [self.key] if self.dst is None else [self.key, (self.key[0], self.dst)]


class Admit(enum.Enum):
    """What to do with a dirty path given what is in flight."""

    #: Start it now.
    GO = "go"
    #: An operation on this very path is in flight: park it until released.
    BUSY = "busy"
    #: A directory whose children are in flight: look again a little later.
    DIR_BUSY = "dir_busy"
    #: Below a directory being renamed: it waits for the rename (``wait``).
    RENAMING = "renaming"


@dataclass
class Released:
    """What releasing an operation frees."""

    record: Record
    #: Paths the operation held: the caller unparks them.
    freed: list[Key]
    #: Paths that waited for it (below a renamed directory): dirty again.
    woken: list[tuple[Key, Info]]


def parent(rel: bytes) -> bytes:
    return rel.rpartition(b"/")[0]


class InFlight:
    def __init__(self) -> None:
        self._ops: dict[int, Record] = {}
        self._busy: dict[Key, int] = {}
        #: Directories → how many operations on their direct children are in flight.
        self._busy_under: Counter[Key] = Counter()
        #: Directories being renamed (source and destination) → the Rename's op.
        self._renaming: dict[Key, int] = {}
        #: Paths waiting for an op (a rename of an ancestor) to be answered.
        self._waiting: defaultdict[int, list[tuple[Key, Info]]] = defaultdict(list)
        #: Operations in flight that were not live.
        self.bulk = 0

    def __len__(self) -> int:
        return len(self._ops)

    def __contains__(self, op: int) -> bool:
        return op in self._ops

    def __iter__(self) -> Iterator[Record]:
        return iter(self._ops.values())

    def get(self, op: int) -> Record | None:
        return self._ops.get(op)

    def busy(self, key: Key) -> bool:
        """An operation on ``key`` itself is in flight."""
        return key in self._busy

    def op_on(self, key: Key) -> int | None:
        """The operation in flight on ``key`` (as its path or destination)."""
        return self._busy.get(key)

    # -- the rules -----------------------------------------------------------

    def admit(self, key: Key) -> tuple[Admit, int]:
        """May an operation on ``key`` start now? With ``RENAMING``, the op
        to wait for is returned too (else 0)."""
        if key in self._busy:
            return Admit.BUSY, 0
        if self._busy_under[key]:
            return Admit.DIR_BUSY, 0
        if self._renaming:
            op = self._renaming_above(key)
            if op is not None:
                return Admit.RENAMING, op
        return Admit.GO, 0

    def wait(self, op: int, key: Key, info: Info) -> None:
        """``key`` waits for ``op`` (see ``admit``)."""
        self._waiting[op].append((key, info))

    def rename_blocked(self, mid: int, src: bytes, dst: bytes) -> bool:
        """A rename of ``src`` to ``dst`` cannot travel as a rename now: one
        of the paths, an ancestor being renamed, or anything below either is
        in flight."""
        if (mid, src) in self._busy or (mid, dst) in self._busy:
            return True
        if (
            self._renaming_above((mid, src)) is not None
            or self._renaming_above((mid, dst)) is not None
        ):
            return True
        sp, dp = src + b"/", dst + b"/"
        for rec in self._ops.values():
            if rec.key[0] == mid:
                p = rec.key[1]
                if p.startswith(sp) or p.startswith(dp):
                    return True
        return False

    def _renaming_above(self, key: Key) -> int | None:
        mid, rel = key
        i = rel.rfind(b"/")
        while i > 0:
            op = self._renaming.get((mid, rel[:i]))
            if op is not None:
                return op
            i = rel.rfind(b"/", 0, i)
        return None

    # -- bookkeeping ---------------------------------------------------------

    def track(self, op: int, rec: Record) -> None:
        if op in self._ops:
            raise ValueError(f"op {op} is already in flight")
        self._ops[op] = rec
        if not rec.live:
            self.bulk += 1
        mid = rec.key[0]
        for k in rec.paths():
            self._busy[k] = op
            self._busy_under[(mid, parent(k[1]))] += 1
            if rec.is_dir and rec.dst is not None:
                self._renaming[k] = op

    def release(self, op: int) -> Released | None:
        """``op`` was answered (acknowledged, refused or aborted)."""
        rec = self._ops.pop(op, None)
        if rec is None:
            return None
        if not rec.live:
            self.bulk -= 1
        mid = rec.key[0]
        freed = rec.paths()
        for k in freed:
            self._busy.pop(k, None)
            self._renaming.pop(k, None)
            pk = (mid, parent(k[1]))
            self._busy_under[pk] -= 1
            if self._busy_under[pk] <= 0:
                del self._busy_under[pk]
        return Released(rec, freed, self._waiting.pop(op, []))

    def clear(self) -> tuple[list[Record], list[tuple[Key, Info]]]:
        """The connection is gone: nothing in flight will be answered. Returns
        what was in flight and what waited, both to be marked dirty again."""
        records = list(self._ops.values())
        waiting = [w for ws in self._waiting.values() for w in ws]
        self._ops.clear()
        self.bulk = 0
        self._busy.clear()
        self._busy_under.clear()
        self._renaming.clear()
        self._waiting.clear()
        return records, waiting

    def oldest(self) -> float | None:
        """When the oldest change in flight or waiting was first seen."""
        times = [rec.since for rec in self._ops.values()][:1]
        for waiting in self._waiting.values():
            if waiting:
                _, info = waiting[0]
                times.append(info[0])  # when it was first seen
        return min(times, default=None)
