"""A scrub: is every file of a mirror on the peer what it is here? (``replicatorctl verify``)

Verification before publish (blockmap.py) proves a replica was right when
it was written. A scrub proves it still is: bit rot, a bad sector, a
restore from an old backup, someone editing the replica. For each regular
file that is in sync as far as the link knows (nothing pending for it, the
peer acknowledged this very size and mtime), both sides read it *from the
disk* — clean cached pages are dropped first (checking.drop_cached) — and
hash it in the same geometry; the sender compares the two block maps. A
file that differs is listed with its first differing offset and, with
``repair``, sent again: only the bad blocks when the peer still holds the
version whose map we remember (a delta that copies the good blocks and
overwrites the bad ones, verified and published atomically as always),
else whole.

One file at a time, at most ``rate`` bytes per second read on each side,
so a scrub of a big mirror never starves live replication; the peer reads
its file a slice at a time between the frames it serves (checking.py).
Runs on the link's thread; hashing on the link's hasher thread. A scrub
that loses its connection stops and says so; start it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import frames as F
from . import paths
from .backlog import Backlog
from .blockmap import BlockMap, block_size_for
from .frames import EntryKind
from .hashing import Hasher, Job
from .inflight import InFlight, Record
from .manifest import Change, EntryState, scan
from .mirror import SourceMirror
from .paths import Source
from .remote import RemoteMirror
from .stats import LinkStats


@dataclass(frozen=True)
class Verify:
    """A message to a link: start a scrub of ``mirror``; ``repair``: send
    what differs."""

    mirror: str
    repair: bool = False


#: Differences listed in status (all are counted and logged).
MAX_LISTED = 100
#: Seconds a repair may go unanswered before the scrub stops waiting for it.
REPAIR_WAIT = 120.0
#: Entries looked at per step at most (skipped ones too): the link thread
#: goes back to its other work in between.
WALK_SLICE = 1000


@dataclass
class Difference:
    path: str
    #: First byte that differs (the shorter size when only the sizes differ).
    offset: int
    size_here: int
    size_there: int | None
    #: "differs", "missing" (the peer has no such file), "unreadable" (the
    #: peer could not read its copy: see its log), "repairing", "repaired",
    #: "not repaired" (the file went away here, or no answer came)
    state: str = "differs"


@dataclass
class Report:
    """What status shows of one scrub (``LinkStats.mirror(name)["verify"]``)."""

    repair: bool
    state: str = "running"  # running | done | stopped
    started: float = field(default_factory=time.time)
    finished: float | None = None
    files_checked: int = 0
    bytes_checked: int = 0
    #: Files not checked: a change is pending for them (not in sync yet).
    skipped: int = 0
    differing: int = 0
    repaired: int = 0
    current: str | None = None
    differences: list[Difference] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "repair": self.repair,
            "state": self.state,
            "started": self.started,
            "finished": self.finished,
            "files_checked": self.files_checked,
            "bytes_checked": self.bytes_checked,
            "skipped": self.skipped,
            "differing": self.differing,
            "repaired": self.repaired,
            "current": self.current,
            "differences": [d.__dict__.copy() for d in self.differences],
            "error": self.error,
        }


@dataclass
class _Check:
    rel: bytes
    #: The local state when it was hashed.
    st: EntryState
    here: BlockMap
    there: bytearray = field(default_factory=bytearray)
    size: int = -1


class Scrub:
    """One scrub of one mirror against the link's peer."""

    def __init__(
        self,
        mirror: SourceMirror,
        remote: RemoteMirror,
        backlog: Backlog,
        inflight: InFlight,
        hasher: Hasher,
        send: Callable[[F.Event], None],
        next_op: Callable[[], int],
        repair: Callable[[int, bytes, list[tuple[int, int]]], str],
        rate: float,
        report: Report,
        log: Any,
    ) -> None:
        self.m = mirror
        self._remote = remote
        self._backlog = backlog
        self._inflight = inflight
        #: Scrubs hash on a thread of their own: a big file being scrubbed
        #: must not hold up the maps of files being sent.
        self._hasher = hasher
        self._send = send
        self._next_op = next_op
        self._repair = repair
        self._rate = rate
        self.report = report
        self._log = log
        self._walk: Iterator[tuple[bytes, EntryState]] = scan(mirror.root, mirror.excludes)
        self._hashing: tuple[bytes, EntryState, Job] | None = None
        #: The Check in flight: op -> what we compare with.
        self.checks: dict[int, _Check] = {}
        self._t0 = time.monotonic()
        self._walked = False
        #: Repairs sent, by path, with when (monotonic), until their answer.
        self._repairing: dict[bytes, tuple[Difference, float]] = {}
        #: Repairs that could not go yet (no room, a change in flight).
        self._to_repair: list[tuple[bytes, Difference, list[tuple[int, int]]]] = []

    # -- driving --------------------------------------------------------------

    def due(self) -> float | None:
        """Monotonic time the next file may start (rate), None if it waits
        for something else (a hash, the peer) or is done."""
        if self.report.state != "running":
            return None
        if self._to_repair or (self._repairing and self._walked):
            return time.monotonic() + 0.2  # room for a repair; a repair's answer
        if self._hashing is not None or self.checks or self._walked:
            return None
        return self._t0 + self.report.bytes_checked / self._rate

    def step(self) -> bool:
        """Move on if it can; True if it did something."""
        r = self.report
        if r.state != "running":
            return False
        worked = self._send_repairs()
        if self._repairing and self._walked:
            self._give_up_repairs()
        if self._hashing is not None:
            return self._hashed()
        if self.checks or self._walked:
            return worked
        if time.monotonic() < self._t0 + r.bytes_checked / self._rate:
            return worked
        for n, (rel, st) in enumerate(self._walk):
            if self._start(rel, st) or n >= WALK_SLICE:
                return True
        self._walked = True
        self._finish_if_done()
        return True

    def _start(self, rel: bytes, st: EntryState) -> bool:
        """Hash ``rel`` if it is a file in sync; False if it was skipped."""
        if st.kind != EntryKind.FILE:
            return False
        key = (self.m.id, rel)
        known = self._remote.known.get(rel)
        if (
            self._backlog.holds(key)
            or self._inflight.busy(key)
            or known is None
            or self.m.compare(st, known, self._remote.preserve) is not Change.NONE
        ):
            self.report.skipped += 1
            return False
        found = Source(self.m.root).locate(rel)
        if found is None:
            self.report.skipped += 1
            return False
        try:
            opened = found.open_file()
            if opened is None:
                self.report.skipped += 1
                return False
            f, fst = opened
            try:
                bs = block_size_for(fst.st_size)
                job = self._hasher.submit(f.fd, fst.st_size, self.m.algo, bs, from_disk=True)
            finally:
                f.close()
        except OSError as e:
            self._log.warning("verify: cannot read %s here: %s", paths.show(rel), e)
            self.report.skipped += 1
            return False
        finally:
            found.close()
        self._hashing = (rel, st, job)
        self.report.current = paths.show(rel)
        return True

    def _hashed(self) -> bool:
        assert self._hashing is not None
        rel, st, job = self._hashing
        if not job.done.is_set():
            return False
        self._hashing = None
        if job.map is None:  # changed while read: it will be sent anyway
            self.report.skipped += 1
            return True
        op = self._next_op()
        self.checks[op] = _Check(rel, st, job.map)
        self._send(F.Check(op, self.m.id, job.map.algo, job.map.block_size, rel))
        self.report.bytes_checked += job.map.size
        return True

    # -- the peer's answers ------------------------------------------------------

    def checked(self, ev: F.Checked) -> None:
        c = self.checks[ev.op]
        c.size = ev.size
        c.there += ev.digests
        here = c.here
        count = -(-ev.size // here.block_size)
        if len(c.there) // here.dsize < count:
            return
        del self.checks[ev.op]
        self.report.current = None
        if self._moved_on(c.rel, c.st):
            return
        self.report.files_checked += 1
        there = BlockMap(here.algo, ev.size, here.block_size, bytes(c.there))
        bad = here.differing(there)
        if ev.size == here.size and not bad:
            self._finish_if_done()
            return
        offset = min(ev.size, here.size)
        if bad:
            offset = min(offset, here.block(bad[0])[0])
        d = Difference(paths.show(c.rel), offset, here.size, ev.size)
        self._differs(c.rel, d, here.ranges(bad) if bad else [(offset, here.size - offset)])

    def _moved_on(self, rel: bytes, st: EntryState) -> bool:
        """The file changed here (or a change of it is on its way) since it
        was hashed: what the peer holds is not comparable; skip it."""
        key = (self.m.id, rel)
        found = Source(self.m.root).locate(rel)
        now = None if found is None else EntryState.from_stat(found.st, found.target)
        if found is not None:
            found.close()
        if (
            now is None
            or self._backlog.holds(key)
            or self._inflight.busy(key)
            or self.m.compare(now, st, self._remote.preserve) is not Change.NONE
        ):
            self.report.skipped += 1
            self._finish_if_done()
            return True
        return False

    def refused(self, op: int, code: int, message: str) -> None:
        """The peer could not check a file: it has none there (CONFLICT:
        "missing", repairable), or could not read it (see its log)."""
        c = self.checks.pop(op)
        self.report.current = None
        if self._moved_on(c.rel, c.st):
            return
        self.report.files_checked += 1
        missing = code == F.ErrorCode.CONFLICT
        d = Difference(
            paths.show(c.rel), 0, c.here.size, None, "missing" if missing else "unreadable"
        )
        self._log.warning("verify: %s on the peer: %s", d.path, message)
        self._differs(c.rel, d, [(0, c.here.size)] if missing else None)

    def _differs(self, rel: bytes, d: Difference, bad: list[tuple[int, int]] | None) -> None:
        r = self.report
        r.differing += 1
        self._log.warning(
            "verify: mirror %s: %s differs on the peer from offset %d (%d bytes here, %s there)%s",
            self.m.name,
            d.path,
            d.offset,
            d.size_here,
            "none" if d.size_there is None else d.size_there,
            "; repairing" if r.repair else "",
        )
        if r.repair and bad is not None:
            self._to_repair.append((rel, d, bad))
            self._send_repairs()
        if len(r.differences) < MAX_LISTED:
            r.differences.append(d)
        self._finish_if_done()

    def _send_repairs(self) -> bool:
        sent = False
        while self._to_repair:
            rel, d, bad = self._to_repair[0]
            verdict = self._repair(self.m.id, rel, bad)
            if verdict == "later":
                break
            self._to_repair.pop(0)
            if verdict == "sent":
                d.state = "repairing"
                self._repairing[rel] = (d, time.monotonic())
                sent = True
            else:
                d.state = "not repaired"
        return sent

    def _give_up_repairs(self) -> None:
        """A repair whose file was aborted and then found equal, or deleted,
        gets no answer of its own: after REPAIR_WAIT, stop waiting for it."""
        now = time.monotonic()
        for rel, (d, since) in list(self._repairing.items()):
            if now - since > REPAIR_WAIT:
                del self._repairing[rel]
                d.state = "not repaired"
        self._finish_if_done()

    def answered(self, rel: bytes, ok: bool) -> None:
        """The peer answered an operation on ``rel``: the repair, or what
        replaced it (the file changed meanwhile)."""
        entry = self._repairing.pop(rel, None)
        if entry is None:
            return
        d = entry[0]
        if ok:
            d.state = "repaired"
            self.report.repaired += 1
        else:
            d.state = "not repaired"
        self._finish_if_done()

    def _finish_if_done(self) -> None:
        r = self.report
        if (
            r.state == "running"
            and self._walked
            and self._hashing is None
            and not self.checks
            and not self._repairing
            and not self._to_repair
        ):
            r.state = "done"
            r.finished = time.time()
            r.current = None
            self._log.info(
                "verify: mirror %s: %d files checked (%d bytes), %d differ, %d repaired, "
                "%d skipped (changes pending)",
                self.m.name,
                r.files_checked,
                r.bytes_checked,
                r.differing,
                r.repaired,
                r.skipped,
            )

    def stop(self, why: str) -> None:
        r = self.report
        if r.state == "running":
            r.state, r.error, r.finished = "stopped", why, time.time()
            if self._hashing is not None:
                self._hashing[2].cancel()
                self._hashing = None
            self.checks.clear()
            self._repairing.clear()
            self._to_repair.clear()


class Pump(Protocol):
    """What scrubs need of the link's pump (pump.Pump)."""

    def next_op(self) -> int: ...

    def repair(self, mid: int, rel: bytes, bad: list[tuple[int, int]]) -> str: ...


class Wire(Protocol):
    """What scrubs need of the link's wire (wire.Wire)."""

    @property
    def conn(self) -> object | None: ...

    def queue(self, ev: F.Event) -> None: ...


class Scrubs:
    """The scrubs of one link, one per mirror at a time: started on request
    (``Verify``) or every ``verify_interval``; fed the peer's answers. Lives
    on the link thread like everything else of the link."""

    def __init__(
        self,
        mirrors: dict[int, SourceMirror],
        remote: dict[int, RemoteMirror],
        backlog: Backlog,
        inflight: InFlight,
        hasher: Hasher,
        wire: Wire,
        pump: Pump,
        stats: LinkStats,
        rate: float,
        log: Any,
    ) -> None:
        self._mirrors = mirrors
        self._by_name = {m.name: m for m in mirrors.values()}
        self._remote = remote
        self._backlog = backlog
        self._inflight = inflight
        #: Scrubs hash on a thread of their own: a big file being scrubbed
        #: must not hold up the maps of files being sent.
        self._hasher = hasher
        self._wire = wire
        self._pump = pump
        self._stats = stats
        self._rate = rate
        self._log = log
        #: Running or last run, by mirror id.
        self._runs: dict[int, Scrub] = {}
        #: Asked for while the peer's listing was still coming in.
        self._waiting: dict[int, Verify] = {}
        #: When each mirror's next periodic scrub is due (monotonic).
        self._next = {
            m.id: time.monotonic() + m.verify_interval
            for m in mirrors.values()
            if m.verify_interval
        }

    def start(self, msg: Verify) -> None:
        m = self._by_name.get(msg.mirror)
        if m is None:
            return
        old = self._runs.get(m.id)
        if old is not None and old.report.state == "running":
            return  # one at a time; its report already shows in status
        if self._wire.conn is not None and not self._remote[m.id].listed:
            self._waiting[m.id] = msg  # the peer's listing is still coming in
            return
        report = Report(msg.repair)
        if self._wire.conn is None:
            report.state, report.error = "stopped", "the link to the peer is not up"
            report.finished = time.time()
        self._runs[m.id] = Scrub(
            m,
            self._remote[m.id],
            self._backlog,
            self._inflight,
            self._hasher,
            self._wire.queue,
            self._pump.next_op,
            self._pump.repair,
            self._rate,
            report,
            self._log.at(MIRROR=m.name),
        )
        self._show(m.id)

    def step(self) -> bool:
        """Start what is due, move every scrub on; True if any did something."""
        now = time.monotonic()
        for mid, msg in list(self._waiting.items()):
            if self._remote[mid].listed or self._wire.conn is None:
                del self._waiting[mid]
                self.start(msg)
        for mid, due in self._next.items():
            if now >= due and self._remote[mid].listed:
                self._next[mid] = now + self._mirrors[mid].verify_interval
                self.start(Verify(self._mirrors[mid].name))
        worked = False
        for mid, s in self._runs.items():
            if s.step():
                worked = True
                self._show(mid)
        return worked

    def set_rate(self, rate: float) -> None:
        """Bytes per second for scrubs started from now on (a reload); one
        under way keeps the rate it started with."""
        self._rate = rate

    def due(self) -> float | None:
        """When the link should look again (a scrub waiting for its rate)."""
        dues = [d for d in (s.due() for s in self._runs.values()) if d is not None]
        return min(dues, default=None)

    def _show(self, mid: int) -> None:
        report = self._runs[mid].report.as_dict()
        self._stats.mirror(self._mirrors[mid].name)["verify"] = report

    def _of(self, op: int) -> Scrub | None:
        for s in self._runs.values():
            if op in s.checks:
                return s
        return None

    def checked(self, ev: F.Checked) -> None:
        s = self._of(ev.op)
        if s is not None:
            s.checked(ev)
            self._show(s.m.id)

    def refused(self, op: int, code: int, message: str) -> bool:
        """The peer refused ``op``: True if it was a Check (handled here)."""
        s = self._of(op)
        if s is None:
            return False
        s.refused(op, code, message)
        self._show(s.m.id)
        return True

    def answered(self, rec: Record | None, ok: bool) -> None:
        """An operation was answered: it may be a scrub's repair (or what
        replaced it: a new version of the file, its delete)."""
        if rec is None:
            return
        s = self._runs.get(rec.key[0])
        if s is not None:
            s.answered(rec.key[1], ok and rec.kind is F.File)
            self._show(s.m.id)

    def stop_all(self, why: str) -> None:
        self._waiting.clear()
        for mid, s in self._runs.items():
            s.stop(why)
            self._show(mid)

    def close(self) -> None:
        """The link ends."""
        self._hasher.stop()
