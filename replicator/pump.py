"""The pump: what a link sends next, and sending it.

Each round (``Pump.pump``) takes the dirty paths that are ready from the
backlog, mirror by mirror; asks ``InFlight`` whether each may start; plans
it (``plan.plan_path``) against what the peer holds; and turns a real
difference into an operation: a frame, tracked in flight until it is
answered. Then every large file in progress (``FileSend``) sends one chunk,
so a 100 GiB file never holds back a 4 KiB one. A rename travels as a
rename when it can (``moved``).

This is the one place that decides what goes out and in what order. It
never reads from the connection and never interprets the peer's answers
(answers.py does; the pump makes the backlog changes they ask for: ``apply``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping

from . import frames as F
from . import net, xattrs
from .answers import (
    DIR_SETTLE,
    Done,
    Effect,
    Forget,
    Mark,
    MarkTree,
    NoLink,
    Remember,
    Unpark,
)
from .backlog import LIVE, LIVE_RUN, Backlog, Info, Key
from .changes import Flag, Moved
from .filesends import RESEND_DELAY, FileSends
from .frames import EntryKind
from .hardlinks import Links, Plan, multi
from .hashing import Hasher
from .history import agrees, same_version
from .inflight import Admit, InFlight, Record
from .linkstatus import LinkStatus
from .logs import Fields
from .manifest import Change, EntryState, Preserve, scan
from .maps import SentMaps
from .mirror import SourceMirror
from .outgoing import HASH_INLINE_MAX
from .paths import DirFds, Located, Source
from .plan import Action, plan_path
from .remote import RemoteMirror
from .stats import LinkStats
from .window import BulkWindow
from .wire import Wire

__all__ = ["RESEND_DELAY", "Pump"]

#: Large files sent interleaved, one chunk each per round.
MAX_ACTIVE = 4
#: Unacknowledged operations before the link waits for acks.
WINDOW = 4096
#: Dirty paths started per round (between chunks of the large files).
STARTS_PER_ROUND = 256
#: A round starts paths for at most this long: then the link looks at what
#: was posted to it (a live change) before the next round.
ROUND_S = 0.005
#: Of those, live ones first, leaving room for bulk (backlog.LIVE_RUN).
LIVE_STARTS = STARTS_PER_ROUND - STARTS_PER_ROUND // (LIVE_RUN + 1)
#: Bulk entries read ahead of the rounds that will start them (``_read_ahead``).
READ_AHEAD = 512
#: A file still being written (plan.SETTLE_NS) is looked at again after this long.
SETTLE_RETRY = 0.1
#: Flags as plain ints for the per-entry tests (an IntFlag operand makes
#: ``&`` a Python-level call: ~0.5-0.75 µs each; issue 13).
_NAME = int(Flag.NAME)
_XATTRS = int(xattrs.ANY)
_HARDLINKS = int(Preserve.HARDLINKS)


class Pump:
    def __init__(
        self,
        mirrors: Mapping[int, SourceMirror],
        remote: Mapping[int, RemoteMirror],
        backlog: Backlog,
        inflight: InFlight,
        wire: Wire,
        stats: LinkStats,
        status: LinkStatus,
        log: Fields,
        hasher: Hasher | None = None,
        maps: SentMaps | None = None,
    ) -> None:
        self._mirrors = mirrors
        self._remote = remote
        self._backlog = backlog
        self._inflight = inflight
        self._wire = wire
        self._stats = stats
        self._status = status
        self._log = log
        self._next_op = 0
        #: Files being sent: started, sent again in part, repaired.
        self.files = FileSends(
            mirrors, remote, backlog, inflight, wire, stats, log, hasher, maps, self._op, self.apply
        )
        self.streams = self.files.streams
        #: How many bulk operations may be in flight (window.py).
        self.bulk_window = BulkWindow(ceiling=WINDOW)
        #: Hard-link groups of the mirrors that preserve them (hardlinks.py).
        self.links = Links()
        #: Directories found during the current round, per mirror (closed at its end).
        self._dirs: dict[int, DirFds] = {}
        #: Bulk entries read ahead lately (``_read_ahead``), oldest first.
        self._ahead: OrderedDict[Key, None] = OrderedDict()
        #: Paths started since the last read-ahead (it looks again every
        #: READ_AHEAD / 4 starts: listing 512 entries every round cost more).
        self._started_since_ahead = READ_AHEAD
        #: A namespace operation of the live lane was sent this round: a Ping
        #: follows (Wire.nudge).
        self._live_ops = False

    def pump(self) -> bool:
        """Send what can be sent now; True if anything was sent.

        Starting paths (mostly small files, a few frames and a sendfile each)
        happens corked, so many of them share TCP segments; the uncork at the
        end pushes them out. Chunks of large files go uncorked: their header
        is sent with MSG_MORE so it joins the payload that follows (corking
        them measurably cost the sender CPU on loopback)."""
        conn, sock = self._wire.conn, self._wire.sock
        assert conn is not None and sock is not None
        worked = False
        started = 0
        bl = self._backlog
        corked = False
        st = self._stats
        window = self.bulk_window
        start = time.monotonic()
        window.update(start, st.ops_acked)
        deadline = start + ROUND_S
        # Live entries of every mirror first, then bulk within its window
        # (and one bulk start in every LIVE_RUN + 1 while both wait: pop()).
        try:
            for only_live, limit in ((True, LIVE_STARTS), (False, STARTS_PER_ROUND)):
                for mid, m in self._mirrors.items():
                    if not self._remote[mid].listed or m.paused:
                        continue  # nothing is sent before we know what the peer holds
                    bulk = not only_live and window.allows(self._inflight.bulk)
                    while (
                        bl.has_ready(mid, bulk)
                        and started < limit
                        and time.monotonic() < deadline
                        and conn.unacked() < WINDOW
                        and conn.open_files() < F.MAX_OPEN_FILES - 1
                    ):
                        if not corked:
                            net.cork(sock, True)
                            corked = True
                        key, info = bl.pop(mid, bulk)
                        if self._try_start(key, info):
                            started += 1
                            worked = True
                        bulk = not only_live and window.allows(self._inflight.bulk)
            self._started_since_ahead += started
            if self._started_since_ahead >= READ_AHEAD // 4:
                self._started_since_ahead = 0
                self._read_ahead()
        finally:
            for dirs in self._dirs.values():
                dirs.close()
        self._nudge()
        if corked:
            self._wire.flush()
            net.cork(sock, False)
        return self.streams.step_all() or worked

    def _read_ahead(self) -> None:
        """Start reading the files the next rounds will start (bulk: a tree
        moved in, a cold sync), so that hashing them on this thread finds
        them in the page cache instead of waiting for the disk one file at
        a time (issue 13: 270 µs per entry of a real tree, cache cold)."""
        ahead = self._ahead
        for mid, m in self._mirrors.items():
            if not self._remote[mid].listed or m.paused:
                continue
            dirs = None
            for key in self._backlog.upcoming(mid, READ_AHEAD):
                if key in ahead:
                    continue
                ahead[key] = None
                if not m.excludes(key[1]):
                    if dirs is None:
                        dirs = self._dirs_of(mid)
                    dirs.readahead(key[1], HASH_INLINE_MAX)
        while len(ahead) > 2 * READ_AHEAD:
            ahead.popitem(last=False)

    def _dirs_of(self, mid: int) -> DirFds:
        dirs = self._dirs.get(mid)
        if dirs is None:
            dirs = self._dirs[mid] = DirFds(self._mirrors[mid].root)
        return dirs

    def _try_start(self, key: Key, info: Info) -> bool:
        verdict, op = self._inflight.admit(key)
        if verdict is Admit.BUSY:
            self._backlog.park(key, info)
            return False
        if verdict is Admit.DIR_BUSY:
            # A directory whose children are in flight: its mtime will change
            # again on the peer; look at it once they are acknowledged.
            self._backlog.mark(key, info, DIR_SETTLE, persist=False)
            return False
        if verdict is Admit.RENAMING:
            self._inflight.wait(op, key, info)
            return False
        return self._start(key, info)

    def _start(self, key: Key, info: Info) -> bool:
        """Turn one dirty path into an operation, if it really changed."""
        m = self._mirrors[key[0]]
        # One confined walk per path: the file is opened, and later checked,
        # through the directory fd this lookup found.
        found = None if m.excludes(key[1]) else Source(m.root, self._dirs_of(key[0])).locate(key[1])
        try:
            return self._start_found(key, info, found)
        finally:
            if found is not None:
                found.close()  # a no-op if a FileSend took it

    def _start_found(self, key: Key, info: Info, found: Located | None) -> bool:
        mid, rel = key
        m = self._mirrors[mid]
        since, _, flags = info
        live = bool(flags & LIVE)
        src = None if found is None else EntryState.from_stat(found.st, found.target)
        r = self._remote[mid]
        known = r.known.get(rel)
        rec = None if r.agreed is None else r.agreed.get(rel)
        if rec is not None and (
            (src is not None and agrees(rec, src) and not agrees(rec, known))
            or (src is None and known is not None and not agrees(rec, known))
        ):
            # Two-way (plan.reconcile): unchanged here since both sides
            # agreed on it, but changed or deleted there: theirs comes here.
            # Or deleted here, but changed there since: the edit wins, and
            # comes here (a Delete does not say which version it deletes).
            self._backlog.done(key)
            return False
        action = plan_path(
            src,
            known,
            flags,
            since,
            lambda a, b: m.compare(a, b, r.preserve),
            m.delete,
            time.time(),
            time.time_ns(),
            rel in r.guessed,
            bool(int(r.preserve) & _XATTRS),
        )
        if flags & _NAME and r.agreed is None:
            self._names_changed(key, since, src, known, action)
        if action is Action.META_GUESS:
            r.guessed.add(rel)
        elif action is not Action.NOTHING and action is not Action.SETTLE:
            r.guessed.discard(rel)
        if action is Action.NOTHING:
            if r.agreed is not None and src and known and same_version(src, known):
                r.agreed.put(rel, src)  # both hold it (known: listed or acknowledged)
            self._backlog.done(key)
            return False
        if action is Action.SETTLE:
            self._backlog.mark(key, info, SETTLE_RETRY, persist=False)
            return False
        if action is Action.DELETE:
            self.links.gone(mid, rel)
            if not m.deletes_allowed():
                self._status.marker_missing(m, 1)
                self._backlog.done(key)
                return False
            return self._send_op(F.Delete(self._op(), mid, rel), key, since, None, live=live)
        assert src is not None
        ev: F.Event
        if src.kind is not EntryKind.SYMLINK and action in (
            Action.META,
            Action.META_GUESS,
            Action.MKDIR,
        ):
            assert found is not None
            self.files.send_xattrs_of(r, found)
        if action is Action.META or action is Action.META_GUESS:
            ev = F.Meta(self._op(), mid, src.mode, src.mtime_ns, src.uid, src.gid, rel)
        elif action is Action.MKDIR:
            ev = F.Mkdir(self._op(), mid, src.mode, src.mtime_ns, src.uid, src.gid, rel)
        elif action is Action.SYMLINK:
            ev = F.Symlink(self._op(), mid, src.mtime_ns, src.uid, src.gid, rel, src.target)
        else:
            assert found is not None
            if int(m.preserve) & _HARDLINKS and multi(found.st):
                return self._group_member(m, key, info, found, src)
            return self.files.start(m, key, since, found, live)
        return self._send_op(ev, key, since, src, live=live)

    def _names_changed(
        self,
        key: Key,
        since: float,
        src: EntryState | None,
        known: EntryState | None,
        action: Action,
    ) -> None:
        """The watcher saw an entry made, removed or renamed at ``key``
        (Flag.NAME), in a mirror this node only pushes.

        - Its directory's mtime changed here. An operation on the path
          tells the link once acked (answers: ``stale_dir``); without one
          (a temp file made and removed, a directory made and renamed, an
          entry swapped for an equal one, a directory replaced by another:
          a Meta), the directory is looked at again all the same.
        - A directory here where the peer holds one may be another: one
          replaced it (``mv d old; mv new d``, ``rm -rf d; mkdir d``). What
          the peer holds below it is looked at, so what is not here any
          more is deleted there (``RemoteMirror.below``: a walk of all it
          holds, taken only on this event).

        Two-way mirrors leave both to their own rules: there the watcher
        also reports what the peer sent (echo suppression), and the peer's
        directory mtimes would come back to it."""
        mid, rel = key
        if src is not None and known is not None and src.kind is known.kind is EntryKind.DIR:
            for p in self._remote[mid].below(rel):
                self._backlog.mark((mid, p), (since, 0, Flag.DATA), persist=False)
        if action in (Action.NOTHING, Action.META, Action.META_GUESS):
            parent = rel.rpartition(b"/")[0]
            if parent:
                info = (since, 0, Flag.LIVE)
                self._backlog.mark((mid, parent), info, DIR_SETTLE, persist=False)

    def _group_member(
        self, m: SourceMirror, key: Key, info: Info, found: Located, src: EntryState
    ) -> bool:
        """A name of a hard-link group changed: a link to a mate the peer
        holds in this version, or (later) to one in flight, or its data;
        after its data, every mate is looked at again (to link it anew: the
        peer's new version replaced only this name)."""
        mid, rel = key
        since, _, flags = info
        mates = self.links.mates(mid, m.root, m.excludes, rel, found.st)
        busy = self._inflight.busy
        how, mate = self.links.plan(
            mid, rel, src, mates, self._remote[mid].known, lambda p: busy((mid, p))
        )
        if how is Plan.WAIT:
            op = self._inflight.op_on((mid, mate))
            assert op is not None
            self._inflight.wait(op, key, info)
            return False
        if how is Plan.LINK:
            ev = F.HardLink(self._op(), mid, src.size, src.mtime_ns, rel, mate)
            self._stats.hardlinks_sent += 1
            return self._send_op(ev, key, since, src, dst=mate, live=bool(flags & LIVE))
        started = self.files.start(m, key, since, found, bool(flags & LIVE))
        op = self._inflight.op_on(key)
        if started and op is not None:
            for mate in mates:
                self._inflight.wait(op, (mid, mate), (since, 0, Flag.DATA))
        return started

    def repair(self, mid: int, rel: bytes, bad: list[tuple[int, int]]) -> str:
        """A scrub found the peer's copy of ``rel`` damaged (filesends.py)."""
        return self.files.repair(mid, rel, bad)

    def want(self, op: int, ranges: list[tuple[int, int]]) -> None:
        """The peer found ranges of file ``op`` bad (filesends.py)."""
        self.files.want(op, ranges)

    def cancel(self, op: int) -> None:
        """The peer refused ``op``: stop sending its file if it still is."""
        self.files.streams.cancel(op)

    def sending(self) -> int:
        """Bytes still to send of the large files in progress."""
        return self.files.streams.sending()

    def next_op(self) -> int:
        """A fresh operation id (also for a scrub's Checks)."""
        return self._op()

    def _op(self) -> int:
        self._next_op = self._next_op % 0xFFFFFFFF + 1
        return self._next_op

    def _send_op(
        self,
        ev: F.Event,
        key: Key,
        since: float,
        state: EntryState | None,
        dst: bytes | None = None,
        is_dir: bool = False,
        live: bool = False,
    ) -> bool:
        op: int = ev.op  # type: ignore[attr-defined]
        self._wire.queue(ev)
        rec = Record(
            type(ev), key, since, state, dst, is_dir=is_dir, live=live, sent=time.monotonic()
        )
        self._inflight.track(op, rec)
        self._stats.ops_sent += 1
        self._live_ops |= live
        return True

    def _nudge(self) -> None:
        """After namespace operations of the live lane, a Ping asks the
        peer to commit them soon (Wire.nudge)."""
        if self._live_ops:
            self._live_ops = False
            self._wire.nudge()

    # -- renames -------------------------------------------------------------------------

    def moved(self, m: SourceMirror, msg: Moved, sending: bool) -> None:
        """A rename travels as a rename when the peer holds the source and
        nothing about either path is in flight (and the link is ``sending``:
        neither paused nor draining); otherwise it becomes a delete of
        ``src`` and new data at ``dst``."""
        mid = m.id
        src, dst = msg.src, msg.dst
        now = time.time()
        r = self._remote[mid]
        if (
            self._wire.conn is not None
            and r.listed
            and sending
            and not m.paused
            and src in r.known
            and not m.excludes(src)
            and not m.excludes(dst)
            and not self._inflight.rename_blocked(mid, src, dst)
        ):
            self._send_op(
                F.Rename(self._op(), mid, src, dst), (mid, src), now, None, dst, msg.is_dir, True
            )
            # A crash before the Ack must not forget it: both paths are then
            # looked at again after the restart.
            self._backlog.persist((mid, src), (now, 0, Flag.DATA))
            self._backlog.persist((mid, dst), (now, 0, Flag.DATA))
            self._nudge()
            self._wire.flush()
            return
        # The watcher saw it: both paths are live; what is below a directory
        # moved is bulk (a whole tree may have moved in).
        self._backlog.mark((mid, src), (now, 0, Flag.DATA | Flag.LIVE | Flag.NAME))
        self._backlog.mark((mid, dst), (now, 0, Flag.DATA | Flag.CLOSED | Flag.LIVE | Flag.NAME))
        if msg.is_dir:
            self.mark_tree(mid, dst, now)

    def mark_tree(self, mid: int, top: bytes, since: float, only_changed: bool = False) -> None:
        m = self._mirrors[mid]
        r = self._remote[mid]
        for rel, st in scan(m.root, m.excludes, top):
            if not only_changed or m.compare(st, r.known.get(rel), r.preserve) is not Change.NONE:
                self._backlog.mark((mid, rel), (since, st.size, Flag.DATA))

    # -- files ---------------------------------------------------------------------------

    # -- the backlog ----------------------------------------------------------------------

    def apply(self, effects: list[Effect]) -> None:
        """Make the backlog changes an answer asks for (answers.py), in order."""
        bl = self._backlog
        for e in effects:
            if isinstance(e, Mark):
                bl.mark(e.key, e.info, e.delay, e.persist)
            elif isinstance(e, MarkTree):
                self.mark_tree(e.mirror, e.top, e.since, e.only_changed)
            elif isinstance(e, Done):
                bl.done(e.key)
            elif isinstance(e, Unpark):
                bl.unpark(e.key)
            elif isinstance(e, Remember | Forget):
                self.files.remember(e)
            elif isinstance(e, NoLink):
                self.links.refused(*e.key)

    def reset(self) -> None:
        """The connection is gone: stop sending files, and what was in flight
        (nothing of it was acknowledged) is dirty again."""
        self.streams.close()
        records, waiting = self._inflight.clear()
        for rec in records:
            self._backlog.mark(rec.key, (rec.since, rec.size, Flag.DATA))
            if rec.dst is not None:
                self._backlog.mark((rec.key[0], rec.dst), (rec.since, 0, Flag.DATA))
                if rec.is_dir:
                    self.mark_tree(rec.key[0], rec.dst, rec.since)
        for key, info in waiting:
            self._backlog.mark(key, info)
        self._backlog.unpark_all()
