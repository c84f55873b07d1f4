"""The files a link sends, from the start of each to its answer.

``FileSends`` starts a file (``FileSend.begin``: whole, resumed at the
peer's partial, or as a delta of the version the peer holds — its block
map remembered in ``maps.SentMaps``), hands it to ``Streams`` to go out a
chunk at a time, and deals with what can happen after its End: the peer
finds ranges damaged (``want``: send them again, or abort if the source
changed since), a scrub finds the peer's copy damaged later (``repair``),
the source changed while it was sent (``changed``: send it again). What
the peer acknowledged is remembered for the next delta (``remember``).

Runs on the link's thread, like the pump it serves.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping

from . import frames as F
from . import paths, xattrs
from .answers import Effect, Forget, Remember, release
from .backlog import Backlog, Key
from .blockmap import BlockMap
from .changes import Flag
from .frames import EntryKind
from .hashing import Hasher
from .inbox import IS_ROOT
from .inflight import InFlight, Record
from .logs import Fields
from .manifest import EntryState
from .maps import DELTA_MIN, SentMaps
from .mirror import SourceMirror
from .outgoing import FileSend
from .paths import Located, Source
from .remote import RemoteMirror
from .stats import LinkStats
from .streams import Streams
from .wire import Wire

#: Wait before re-sending a file that changed while it was sent.
RESEND_DELAY = 0.1
#: As an int: ``Preserve & Preserve`` is a Python-level call, once per file.
_XATTRS = int(xattrs.ANY)


class FileSends:
    def __init__(
        self,
        mirrors: Mapping[int, SourceMirror],
        remote: Mapping[int, RemoteMirror],
        backlog: Backlog,
        inflight: InFlight,
        wire: Wire,
        stats: LinkStats,
        log: Fields,
        hasher: Hasher | None,
        maps: SentMaps | None,
        new_op: Callable[[], int],
        apply: Callable[[list[Effect]], None],
    ) -> None:
        self._mirrors = mirrors
        self._remote = remote
        self._backlog = backlog
        self._inflight = inflight
        self._wire = wire
        self._stats = stats
        self._log = log
        self._hasher = hasher
        #: The block maps of what the peer acknowledged (deltas).
        self._maps = maps
        self._new_op = new_op
        self.apply = apply
        #: Files being sent a chunk per round.
        self.streams = Streams(wire, stats, self.changed, self.ended)

    def start(self, m: SourceMirror, key: Key, since: float, found: Located, live: bool) -> bool:
        rel = key[1]
        r = self._remote[m.id]
        op = self._new_op()
        base = self._base(m, r, rel) if found.st.st_size >= DELTA_MIN else None
        try:
            begun = FileSend.begin(
                op,
                m.id,
                m.name,
                key,
                found,
                since,
                r.partials.pop(rel, None),
                m.algo,
                base,
                self._hasher,
            )
        except OSError as e:
            msg = f"mirror {m.name}: cannot read {paths.show(rel)}: {e.strerror}"
            self._log.at(MIRROR=m.name, PATH=paths.show(rel)).error(
                "%s (will retry at the next scan)", msg
            )
            self._stats.error(msg)
            return False
        if begun is None:  # gone or changed type since lstat: look again
            again = Flag.DATA | (Flag.LIVE if live else 0)
            self._backlog.mark(key, (since, 0, again), RESEND_DELAY, persist=False)
            return False
        s, frame = begun
        if s.resumed:
            self._stats.resumed_files += 1
            self._stats.resumed_bytes_skipped += s.resumed
            self._log.at(MIRROR=m.name, PATH=paths.show(rel)).info(
                "link to %s: resuming %s at offset %d of %d",
                self._stats.peer,
                paths.show(rel),
                s.resumed,
                s.size,
            )
        self._go(r, s, frame, live)
        return True

    def _base(self, m: SourceMirror, r: RemoteMirror, rel: bytes) -> BlockMap | None:
        """The map of the version of ``rel`` the peer holds, if we remember it
        (a delta can be made against it)."""
        held = r.known.get(rel)
        if (
            self._maps is None
            or held is None
            or held.kind != EntryKind.FILE
            or held.size < DELTA_MIN
        ):
            return None
        return self._maps.get(m.name, rel, held.size, held.mtime_ns)

    def _go(self, r: RemoteMirror, s: FileSend, frame: F.File, live: bool = False) -> None:
        """Send ``s``: its extended attributes (if the peer applies them), its
        File frame (flagged ``FILE_LIVE`` for the live lane), then its data
        (Streams); in flight until answered."""
        self._send_xattrs(r, s.fd)
        self._wire.queue(
            dataclasses.replace(frame, mode=frame.mode | F.FILE_LIVE) if live else frame
        )
        rec = Record(
            F.File,
            s.key,
            s.since,
            EntryState.from_stat(s.st),
            size=s.size,
            live=live,
            sent=time.monotonic(),
        )
        self._inflight.track(s.op, rec)
        self._stats.ops_sent += 1
        self.streams.add(s)

    def ended(self, s: FileSend) -> None:
        """``s`` was sent whole (End queued): remember what, for its answer."""
        rec = self._inflight.get(s.op)
        if rec is not None and s.mend_digest is None:
            rec.version = s.version
            rec.bmap = s.map
        if s.base is not None:
            self._stats.delta_files += 1

    def want(self, op: int, ranges: list[tuple[int, int]]) -> None:
        """The peer found ``ranges`` of file ``op`` bad: send them again
        (or abort the file, if its source changed since)."""
        rec = self._inflight.get(op)
        if rec is None or rec.bmap is None:
            return  # cannot happen: the protocol checked the op awaits an answer
        mid, rel = rec.key
        m = self._mirrors[mid]
        shown = paths.show(rel)
        self._stats.mend_requests += 1
        self._stats.mend_bytes += sum(n for _, n in ranges)
        self._log.at(MIRROR=m.name, PATH=shown).warning(
            "link to %s: %s arrived damaged (%d bytes in %d ranges from offset %d did not match "
            "its block map); sending them again",
            self._stats.peer,
            shown,
            sum(n for _, n in ranges),
            len(ranges),
            ranges[0][0],
        )
        found = Source(m.root).locate(rel)
        s = None
        try:
            if found is not None:
                s = FileSend.mend(
                    op, rec.key, m.name, found, rec.since, rec.version, rec.bmap.file_digest, ranges
                )
        except OSError:
            s = None
        finally:
            if found is not None:
                found.close()  # a no-op if the FileSend took it
        if s is None:
            self._wire.queue(F.Abort(op, F.AbortReason.SOURCE_CHANGED))
            released = release(self._inflight, op)
            self.apply(released.effects)
            again = Flag.DATA | (Flag.LIVE if rec.live else 0)
            self._backlog.mark(rec.key, (rec.since, rec.size, again), RESEND_DELAY, persist=False)
            return
        self.streams.add(s)

    def changed(self, s: FileSend) -> None:
        """``s`` changed while it was sent (Streams aborted it): send it again."""
        released = release(self._inflight, s.op)
        self.apply(released.effects)
        rec = released.record
        self._log.at(MIRROR=s.mirror, PATH=paths.show(s.key[1])).info(
            "link to %s: %s changed while being sent; sending it again",
            self._stats.peer,
            paths.show(s.key[1]),
        )
        since = rec.since if rec else s.since
        again = Flag.DATA | (Flag.LIVE if rec is not None and rec.live else 0)
        self._backlog.mark(s.key, (since, s.size, again), RESEND_DELAY, persist=False)

    def repair(self, mid: int, rel: bytes, bad: list[tuple[int, int]]) -> str:
        """Send ``rel`` again because a scrub found the peer's copy damaged
        in byte ranges ``bad``: only those blocks when the peer holds the
        version whose map we remember, else whole. Returns "sent", "later"
        (no room now, or a change of it is pending or in flight: look
        again), or "gone" (nothing here to send)."""
        key = (mid, rel)
        conn = self._wire.conn
        if (
            conn is None
            or self._inflight.busy(key)
            or self._backlog.holds(key)
            or conn.open_files() >= F.MAX_OPEN_FILES - 1
            or conn.unacked() >= F.MAX_UNACKED // 2
        ):
            return "later"
        m = self._mirrors[mid]
        r = self._remote[mid]
        base = self._base(m, r, rel)
        found = Source(m.root).locate(rel)
        if found is None:
            return "gone"
        op = self._new_op()
        try:
            begun = FileSend.begin(
                op,
                mid,
                m.name,
                key,
                found,
                time.time(),
                None,
                m.algo,
                base,
                self._hasher,
                tuple(bad),
            )
        except OSError:
            return "gone"
        finally:
            found.close()
        if begun is None:
            return "gone"
        s, frame = begun
        self._go(r, s, frame)
        return "sent"

    def _send_xattrs(self, r: RemoteMirror, fd: int) -> None:
        """The attributes of the entry about to go, if the peer applies them."""
        if int(r.preserve) & _XATTRS:
            try:
                pairs = xattrs.read(fd, r.preserve, IS_ROOT)
            except OSError as e:
                self._log.warning("cannot read extended attributes: %s", e)
                pairs = []
            for frame in xattrs.frames(pairs):
                self._wire.queue(frame)

    def send_xattrs_of(self, r: RemoteMirror, found: Located) -> None:
        """Those of a directory (Mkdir, Meta) or file (Meta) ``found``."""
        if not r.preserve & xattrs.ANY or found.st is None:
            return
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(found.name, flags, dir_fd=found.dir_fd)
        except OSError:
            return  # gone or a symlink meanwhile: the next look sends it
        try:
            self._send_xattrs(r, fd)
        finally:
            os.close(fd)

    def remember(self, e: Remember | Forget) -> None:
        """What the peer holds now, for the next delta (answers.py)."""
        if self._maps is None:
            return
        name = self._mirrors[e.key[0]].name
        if isinstance(e, Remember):
            self._maps.put(name, e.key[1], e.state.size, e.state.mtime_ns, e.bmap)
        else:
            self._maps.forget(name, e.key[1])
