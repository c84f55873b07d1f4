"""What the peer's answers mean: an ``Ack`` or an ``Error`` for an operation
the link has in flight.

Pure: no socket, no file, no clock. ``Answers`` releases the operation from
``InFlight``, brings what the link knows the peer holds (``RemoteMirror``)
up to date, and keeps the retry policy. It returns an ``Answer``: what the
link must do about it — the backlog changes in order, counters, a log line
— and the link applies it (``Pump.apply``). It never sends a frame:
cancelling a file still being sent is the pump's business.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import frames as F
from .backlog import InfoLike as Info
from .backlog import Key
from .blockmap import BlockMap
from .changes import Flag
from .errors import LinkError
from .inflight import InFlight, Record, parent
from .manifest import EntryState
from .maps import DELTA_MIN
from .paths import show
from .remote import RemoteMirror

#: After a directory's child changed, wait this long before re-sending its
#: mtime (it is pushed back while children are in flight; the queue empties
#: only after it, so it shows in lag: keep it short).
DIR_SETTLE = 0.1
#: Retry delays for operations the peer refused with a transient error.
RETRY_MIN, RETRY_MAX = 1.0, 30.0


# -- what the link does about an answer ----------------------------------------------


@dataclass(frozen=True)
class Mark:
    """Mark ``key`` dirty (``Backlog.mark``)."""

    key: Key
    info: Info
    delay: float = 0.0
    persist: bool = True


@dataclass(frozen=True)
class MarkTree:
    """Mark everything below the directory ``top`` dirty; with
    ``only_changed``, only what differs from what the peer holds."""

    mirror: int
    top: bytes
    since: float
    only_changed: bool = False


@dataclass(frozen=True)
class Done:
    """Forget ``key`` in the backlog: the peer holds it (``Backlog.done``)."""

    key: Key


@dataclass(frozen=True)
class Unpark:
    """``key`` waited for the answered operation: it may go (``Backlog.unpark``)."""

    key: Key


@dataclass(frozen=True)
class Remember:
    """The peer acknowledged ``key`` as ``state`` with block map ``bmap``:
    remember it for deltas (maps.SentMaps)."""

    key: Key
    state: EntryState
    bmap: BlockMap


@dataclass(frozen=True)
class Forget:
    """The peer no longer holds the version whose map we remember."""

    key: Key


@dataclass(frozen=True)
class NoLink:
    """The peer refused to make ``key`` a hard link: send its data from now
    on (hardlinks.Links.refused)."""

    key: Key


Effect = Mark | MarkTree | Done | Unpark | Remember | Forget | NoLink


@dataclass(frozen=True)
class Line:
    """A log line: ``log.log(level, msg, *args)`` with the journal ``fields``
    (the link adds PEER)."""

    level: int
    msg: str
    args: tuple[object, ...]
    fields: Mapping[str, str]


@dataclass
class Answer:
    """What an answer means for the link."""

    #: The operation answered; None if none in flight had its op (nothing to do).
    record: Record | None = None
    #: Backlog changes, in the order they are made.
    effects: list[Effect] = field(default_factory=list)
    #: Count it in ``ops_acked`` / ``renames``.
    acked: bool = False
    renamed: bool = False
    #: For ``last_error``.
    error: str | None = None
    #: The peer refused the operation for good (not retried until the next
    #: scan): why, for whoever waits for the path (barrier.py).
    refused: str | None = None
    log: Line | None = None


def release(inflight: InFlight, op: int) -> Answer:
    """``op`` was answered (or aborted by the link): what waited on it may go."""
    out = inflight.release(op)
    if out is None:
        return Answer()
    effects: list[Effect] = [Unpark(k) for k in out.freed]
    effects += [Mark(key, info, persist=False) for key, info in out.woken]
    return Answer(out.record, effects)


class Answers:
    """The meaning of the peer's answers to one link's operations."""

    def __init__(
        self,
        inflight: InFlight,
        remote: Mapping[int, RemoteMirror],
        names: Mapping[int, str],
        peer: str,
    ) -> None:
        self._inflight = inflight
        self._remote = remote
        self._names = names
        self._peer = peer
        #: Transient refusals in a row, per path: the next retry's delay.
        self._retries: Counter[Key] = Counter()

    def ack(self, op: int) -> Answer:
        """``op`` is durable on the peer."""
        a = release(self._inflight, op)
        rec = a.record
        if rec is None:
            return a
        a.acked = True
        self._retries.pop(rec.key, None)
        mid, rel = rec.key
        r = self._remote[mid]
        agreed = r.agreed
        if rec.kind is F.Delete:
            r.forget(rel)
            if agreed is not None:
                agreed.forget(rel)  # a tombstone expires
        elif rec.kind is F.Rename:
            assert rec.dst is not None
            r.move(rel, rec.dst)
            if agreed is not None:
                agreed.move(rel, rec.dst)
            a.renamed = True
            a.effects.append(Done((mid, rec.dst)))
            # What moved may have changed on the way: compare it again.
            a.effects.append(Mark((mid, rec.dst), (rec.since, 0, Flag.DATA), persist=False))
            if rec.is_dir:
                a.effects.append(MarkTree(mid, rec.dst, rec.since, only_changed=True))
        elif rec.state is not None:
            r.acked(rel, rec.state)
            if agreed is not None:
                agreed.put(rel, rec.state)
            if rec.bmap is not None and rec.size >= DELTA_MIN:
                a.effects.append(Remember(rec.key, rec.state, rec.bmap))
        if rec.kind is not F.Meta:
            # The entry's folder on the peer got a new mtime: put ours back.
            for p in {parent(rel), parent(rec.dst) if rec.dst else b""}:
                if p:
                    r.stale_dir(p)
                    info: Info = (rec.since, 0, Flag.DATA)
                    a.effects.append(Mark((mid, p), info, DIR_SETTLE, persist=False))
        a.effects.append(Done(rec.key))
        return a

    def _retry(
        self,
        a: Answer,
        key: Key,
        info: Info,
        message: str,
        where: Mapping[str, str],
        level: int,
        what: str,
    ) -> None:
        """Look at ``key`` again after a delay that grows with each refusal."""
        n = self._retries[key] = self._retries[key] + 1
        delay = min(RETRY_MAX, RETRY_MIN * 2 ** (n - 1))
        a.log = Line(level, f"peer %s: %s; {what} in %.0f s", (self._peer, message, delay), where)
        a.effects.append(Mark(key, info, delay))

    def error(self, ev: F.Error) -> Answer:
        """The peer refused ``ev.op``; a fatal Error raises LinkError (the
        peer closes the link)."""
        try:
            code = F.ErrorCode(ev.code)
        except ValueError:
            code = F.ErrorCode.INTERNAL
        if ev.fatal:
            raise LinkError(f"peer closed the link ({code.name}): {ev.message}")
        a = release(self._inflight, ev.op)
        rec = a.record
        if rec is None:
            return a
        mid, rel = rec.key
        where = {"MIRROR": self._names[mid], "PATH": show(rel), "CODE": code.name}
        a.error = ev.message
        info: Info = (rec.since, rec.size, Flag.DATA)
        if rec.kind is F.Rename:
            # The peer could not rename: send the destination as new data.
            assert rec.dst is not None
            a.log = Line(
                logging.WARNING,
                "peer %s could not rename %s: %s; sending it again",
                (self._peer, show(rel), ev.message),
                where,
            )
            a.effects.append(Mark((mid, rec.dst), info))
            if rec.is_dir:
                a.effects.append(MarkTree(mid, rec.dst, rec.since))
            a.effects.append(Mark(rec.key, info))
        elif rec.kind is F.HardLink:
            # The peer does not hold the target as we thought: it is looked
            # at again, and this name goes as data from now on (no loss, and
            # no loop of links the peer keeps refusing).
            assert rec.dst is not None
            self._remote[mid].forget(rec.dst)
            a.log = Line(
                logging.INFO,
                "peer %s could not link %s to %s: %s; sending its data",
                (self._peer, show(rel), show(rec.dst), ev.message),
                where,
            )
            a.effects.append(NoLink(rec.key))
            a.effects.append(Mark(rec.key, info))
            a.effects.append(Mark((mid, rec.dst), info))
        elif code is F.ErrorCode.RESUME_MISMATCH:
            self._remote[mid].partials.pop(rel, None)
            a.effects.append(Mark(rec.key, info))
        elif code in (F.ErrorCode.VERIFY_FAILED, F.ErrorCode.BASE_CHANGED):
            # The peer's copy is not the version we made a delta against (or
            # the file kept arriving damaged): forget what we thought it held,
            # so the next try sends the whole file.
            a.effects.append(Forget(rec.key))
            self._remote[mid].forget(rel)
            if code is F.ErrorCode.BASE_CHANGED:  # at once: nothing went wrong
                a.log = Line(
                    logging.INFO, "peer %s: %s; sending it whole", (self._peer, ev.message), where
                )
                a.effects.append(Mark(rec.key, info))
            else:
                self._retry(a, rec.key, info, ev.message, where, logging.ERROR, "sending it whole")
        elif code in F.RETRYABLE:
            self._retry(a, rec.key, info, ev.message, where, logging.WARNING, "retrying")
        else:
            a.log = Line(
                logging.ERROR,
                "peer %s refused %s: %s (not retried until the next scan)",
                (self._peer, show(rel), ev.message),
                where,
            )
            a.refused = ev.message
            a.effects.append(Done(rec.key))
        return a
