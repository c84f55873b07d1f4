"""The sending end: one persistent link to one peer, pushing this node's mirrors.

A Link is a thread that owns everything about its peer: the connection, the
backlog of dirty paths, what the peer is known to hold (``RemoteMirror``),
the operations in flight. Other threads talk to it only through ``post()``
(one queue, one direction): its reader thread posts the bytes it read, the
watcher and scanner post ``changes.Dirty``/``Moved``/``Reconcile``, the control
socket posts commands. No locks.

The pipeline: a path is *dirty* → when it reaches the front of the backlog it
is ``lstat``-ed and compared with what the peer last acknowledged (or listed
in its manifest) → only a real difference becomes an operation → the
operation stays in flight until its Ack (durable on the peer) → only then
is the change forgotten. A link that drops puts everything in flight back
into the backlog.

This module is the thread: its lifecycle (connect → serve → tear down →
back off), and the messages posted to it and the frames the peer sends,
each routed to the part that owns it:

* ``wire.py``: the connection: connect, handshake, reader thread, write buffer;
* ``pump.py``: what to send next, and sending it (files in chunks, renames);
* ``reconciler.py``: opening and listing the mirrors, marking what differs;
* ``answers.py``: what the peer's Ack and Error mean (pure);
* ``barrier.py``: whether what a ``replicatorctl wait`` waits for is durable there;
* ``linkstatus.py``: the gauges shown in status.

They share the link's state (mirrors, backlog, in-flight operations, what
the peer holds) and run on its thread only.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import frames as F
from .answers import DIR_SETTLE, RETRY_MAX, RETRY_MIN, Answer, Answers
from .backlog import Backlog, Store
from .barrier import Barriers, Expect, Expected
from .changes import AgreedWith, Dirty, Moved, PeerHas, Reconcile
from .config import NodeConfig, PeerConfig
from .conflicts import Base
from .errors import AuthFailed, LinkError, ProtocolError
from .hashing import Hasher
from .history import Archive
from .inflight import InFlight
from .linkstatus import LinkStatus
from .logs import Fields
from .mailbox import Mailbox
from .maps import SentMaps
from .mirror import SourceMirror
from .pump import MAX_ACTIVE, RESEND_DELAY, SETTLE_RETRY, STARTS_PER_ROUND, WINDOW, Pump
from .reconciler import Reconciler
from .remote import RemoteMirror
from .scrub import Scrubs, Verify
from .stats import LinkStats
from .wire import Backoff, Down, Pace, Received, Retime, Wire

__all__ = [
    "DIR_SETTLE",
    "MAX_ACTIVE",
    "RESEND_DELAY",
    "RETRY_MAX",
    "RETRY_MIN",
    "SETTLE_RETRY",
    "STARTS_PER_ROUND",
    "WINDOW",
    "AuthFailed",
    "Backoff",
    "Link",
    "Pause",
    "SourceMirror",
    "Stop",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stop:
    """Stop the link; with ``drain`` > 0, first wait up to that many seconds
    for the operations in flight to be acknowledged (sending nothing new)."""

    drain: float = 0.0


@dataclass(frozen=True)
class Hashed:
    """The hasher finished a block map: a file may go on."""


@dataclass(frozen=True)
class Pause:
    """Stop sending (``on``) or resume, for one mirror or (None) all of them;
    changes keep accumulating meanwhile."""

    on: bool
    mirror: str | None = None


class Link(threading.Thread):
    def __init__(
        self,
        node: NodeConfig,
        peer: str,
        peer_cfg: PeerConfig,
        key: bytes,
        mirrors: list[SourceMirror],
        stats: LinkStats,
        store: Store | None = None,
        maps: SentMaps | None = None,
        archive: Archive | None = None,
    ) -> None:
        super().__init__(name=f"link-{peer}", daemon=True)
        self.node = node
        self.peer = peer
        self.peer_cfg = peer_cfg
        self.key = key
        self.mirrors = {m.id: m for m in mirrors}
        self.by_name = {m.name: m for m in mirrors}
        self.stats = stats
        self._log = Fields(log, PEER=peer)
        self._mail = Mailbox()
        self._stopping = False
        self._paused = False
        self._remote = {m.id: RemoteMirror() for m in mirrors}
        #: Two-way mirrors: what was last agreed with the peer (history.py).
        self._archive = archive
        if archive is not None:
            for m in mirrors:
                if m.two_way:
                    self._remote[m.id].agreed = archive.load(m.name)
                else:
                    archive.drop(m.name)
        self._backlog = Backlog({m.id: m.name for m in mirrors}, store)
        self._inflight = InFlight()
        self._wire = Wire(
            node, peer, peer_cfg.address, key, stats, self.post, self._log, peer_cfg.bwlimit
        )
        self._status = LinkStatus(
            stats,
            self.mirrors,
            self._remote,
            self._backlog,
            self._inflight,
            lambda: self._pump.sending(),
            self._log,
        )
        #: Block maps of large files, hashed while they are sent.
        self._hasher = Hasher(f"hash-{peer}", lambda: self.post(Hashed()))
        self._pump = Pump(
            self.mirrors,
            self._remote,
            self._backlog,
            self._inflight,
            self._wire,
            stats,
            self._status,
            self._log,
            self._hasher,
            maps,
        )
        self._reconciler = Reconciler(
            self.mirrors,
            self._remote,
            self._backlog,
            self._wire.queue,
            stats,
            self._status,
            self._log,
            self._listed,
        )
        self._answers = Answers(self._inflight, self._remote, {m.id: m.name for m in mirrors}, peer)
        #: Waits for paths to be durable on the peer (``replicatorctl wait``).
        self._barriers = Barriers(peer, self.mirrors, self._remote, self._backlog, self._inflight)
        #: Waits between connection attempts; reset once the peer served a
        #: whole manifest (``_listed``).
        self._backoff = Backoff(node.backoff_initial, node.backoff_max)
        #: Draining before a stop: nothing new is sent until this time.
        self._drain_until: float | None = None
        #: Scrubs (``replicatorctl verify``), on request and periodic.
        self._scrubs = Scrubs(
            self.mirrors,
            self._remote,
            self._backlog,
            self._inflight,
            Hasher(f"scrub-{peer}", lambda: self.post(Hashed())),
            self._wire,
            self._pump,
            stats,
            node.verify_rate * 1024 * 1024,
            self._log,
        )
        loaded = self._backlog.load()
        if loaded:
            self._log.info("link to %s: %d pending changes loaded from the backlog", peer, loaded)

    # -- interface for other threads -------------------------------------------------

    def post(self, msg: object) -> None:
        self._mail.post(msg)

    def stop(self, drain: float = 0.0) -> None:
        """Ask the link to stop (from another thread); ``drain`` as in Stop."""
        if drain > 0 and self._wire.conn is not None and not self._stopping:
            self._mail.post(Stop(drain))
            return
        self._stopping = True
        self._mail.post(Stop())
        self._wire.shutdown()

    def set_bwlimit(self, rate: int) -> None:
        """A reload changed only the peer's bwlimit: apply it to the live
        connection, not by reconnecting (from another thread)."""
        self._mail.post(Pace(rate))

    def retime(self, node: NodeConfig) -> None:
        """A reload changed the [node] timings or verify_rate: apply them to
        the live connection, not by reconnecting (from another thread)."""
        self._mail.post(Retime(node))

    def status(self) -> dict[str, Any]:
        return self.stats.snapshot()

    def peer_state(self, mirror: str, path: bytes) -> Base:
        """The base of a two-way decision (conflicts.py): the version of
        ``path`` last agreed with the peer (history.py) and what the peer
        last held as far as this link knows (read from another thread:
        single dict lookups)."""
        m = self.by_name.get(mirror)
        if m is None:
            return Base()
        r = self._remote[m.id]
        rec = None if r.agreed is None else r.agreed.get(path)
        return Base(None if rec is None else rec.state(), r.known.get(path))

    def _write_agreed(self) -> None:
        """Write the agreements of this round (one transaction)."""
        if self._archive is None:
            return
        agreed = [r.agreed for r in self._remote.values() if r.agreed is not None]
        try:
            self._archive.write(agreed)
        except sqlite3.Error as e:  # never fatal: the next round tries again
            self._log.warning("link to %s: cannot write the two-way archive: %s", self.peer, e)

    # -- thread ------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self._stopping:
                self.stats.set_state("connecting")
                self.stats.next_retry = None
                try:
                    self._serve()
                except AuthFailed as e:
                    self._fail("auth_failed", str(e), logging.ERROR)
                except (LinkError, ProtocolError, OSError) as e:
                    if not self._stopping:
                        self._fail("backoff", str(e) or type(e).__name__, logging.WARNING)
                except Exception as e:
                    self._log.exception("link to %s: internal error", self.peer)
                    self._fail("backoff", f"internal error: {e}", logging.ERROR)
                finally:
                    self._teardown()
                if self._stopping:
                    break
                delay = self._backoff.next()
                self.stats.next_retry = time.time() + delay
                self._idle_until(time.monotonic() + delay)
        finally:
            self.stats.set_state("stopped")
            self._hasher.stop()
            self._scrubs.close()
            self._write_agreed()
            self._backlog.close()

    def _fail(self, state: str, msg: str, level: int) -> None:
        self._log.log(level, "link to %s (%s): %s", self.peer, self.peer_cfg.address, msg)
        self.stats.error(msg)
        self.stats.set_state(state)

    def _idle_until(self, until: float) -> None:
        """Wait while disconnected, still collecting changes."""
        while not self._stopping:
            left = until - time.monotonic()
            if left <= 0:
                return
            try:
                msg = self._mail.get(timeout=min(left, 0.2))
            except queue.Empty:
                self._backlog.flush()
                self._status.update(force=True)
                self._barriers.step()  # drops waits nobody waits for any more
                continue
            self._handle(msg)
            self._backlog.flush()
            self._write_agreed()
            self._status.update()

    def _serve(self) -> None:
        wire = self._wire
        wire.connect(lambda: self._stopping)
        self.stats.connects += 1
        self.stats.set_state("connected")
        self.stats.last_error = None
        self._log.info("link to %s (%s) is up", self.peer, self.peer_cfg.address)
        wire.start_reader()
        self._reconciler.open_all()
        wire.flush()
        wire.receive(b"", self._on_frame)  # frames that came with the handshake's last bytes
        self._main_loop()

    def _listed(self) -> None:
        # Only now: a peer that accepts the handshake and then fails
        # (crashes on some operation) must not be retried at full speed.
        self._backoff.reset()

    def _teardown(self) -> None:
        self._scrubs.stop_all("the connection to the peer was lost; run it again")
        self._wire.close()
        self._pump.reset()
        for r in self._remote.values():
            r.reset()
        self.stats.current = None
        self._status.update(force=True)

    def _main_loop(self) -> None:
        wire = self._wire
        wire.last_ping = 0.0
        while not self._stopping:
            while True:  # everything posted, without blocking
                try:
                    msg = self._mail.get_nowait()
                except queue.Empty:
                    break
                self._handle(msg)
            more_bulk = self._mail.take_bulk(self._on_dirty, BULK_SLICE_S)
            self._backlog.promote()
            self._backlog.refill(self._inflight.busy)
            self._reconciler.schedule()
            if self._drain_until is not None and (
                not self._inflight or time.monotonic() >= self._drain_until
            ):
                self._log.info(
                    "link to %s: drained (%d operations unacknowledged)",
                    self.peer,
                    len(self._inflight),
                )
                self._stopping = True
                break
            idle = self._paused or self._drain_until is not None
            worked = False if idle else self._pump.pump()
            if not idle:
                worked = self._scrubs.step() or worked
            worked = self._barriers.step() or worked
            now = time.monotonic()
            wire.heartbeat(now)
            wire.flush()
            self._backlog.flush()
            self._write_agreed()
            # Going idle, show the final state; while operations are in flight
            # (a full bulk window, say) refresh at most every PERIOD s: lanes()
            # reads the delayed and parked entries.
            stale = self._status.update(force=not worked and not self._inflight)
            if worked or more_bulk:
                continue
            hb = self.node.heartbeat_interval  # a reload may change it
            timeout = hb if stale is None else min(hb, stale)
            due = self._backlog.next_due()
            if due is not None:
                timeout = min(timeout, max(0.0, due - now))
            for other in (self._scrubs.due(), self._barriers.due()):
                if other is not None:
                    timeout = min(timeout, max(0.0, other - now))
            try:
                msg = self._mail.get(timeout=timeout)
            except queue.Empty:
                continue
            self._handle(msg)

    # -- messages ----------------------------------------------------------------------

    def _handle(self, msg: object) -> None:
        """A message posted to the link (``post``): see ``_MESSAGES``."""
        handler = _MESSAGES.get(type(msg))
        if handler is not None:
            handler(self, msg)

    def _on_dirty(self, msg: Dirty) -> None:
        m = self.by_name.get(msg.mirror)
        if m is not None and not m.excludes(msg.path):
            self._backlog.mark((m.id, msg.path), (time.time(), msg.size_hint, int(msg.flags)))

    def _on_moved(self, msg: Moved) -> None:
        m = self.by_name.get(msg.mirror)
        if m is not None:
            self._pump.moved(m, msg, not self._paused and self._drain_until is None)

    def _on_received(self, msg: Received) -> None:
        if msg.gen == self._wire.gen and self._wire.conn is not None:
            self._wire.receive(msg.data, self._on_frame)

    def _on_down(self, msg: Down) -> None:
        if msg.gen == self._wire.gen and self._wire.conn is not None:
            raise LinkError(msg.reason)

    def _on_pause(self, msg: Pause) -> None:
        if msg.mirror is None:
            self._paused = self.stats.paused = msg.on
        elif msg.mirror in self.by_name:
            self.by_name[msg.mirror].paused = msg.on
            self.stats.mirror(msg.mirror)["paused"] = msg.on

    def _on_peer_has(self, msg: PeerHas) -> None:
        """Our session from this peer applied something: echo suppression."""
        m = self.by_name.get(msg.mirror)
        if m is not None and msg.peer == self.peer:
            r = self._remote[m.id]
            if msg.src is not None:
                r.move(msg.src, msg.path)
            elif msg.state is None:
                r.forget(msg.path)
            else:
                r.acked(msg.path, msg.state)

    def _on_agreed(self, msg: AgreedWith) -> None:
        """What this peer sent us is published here: both sides hold it."""
        m = self.by_name.get(msg.mirror)
        if m is None or msg.peer != self.peer:
            return
        agreed = self._remote[m.id].agreed
        if agreed is None:
            return
        for path, state, src in msg.items:
            if src is not None:
                agreed.move(src, path)
            elif state is None:
                agreed.forget(path)
            else:
                agreed.put(path, state)

    def _on_stop(self, msg: Stop) -> None:
        if msg.drain > 0 and self._wire.conn is not None:
            self._drain_until = time.monotonic() + msg.drain
        else:
            self._stopping = True

    # -- frames from the peer ----------------------------------------------------------

    def _on_frame(self, ev: object) -> None:
        """A frame from the peer: see ``_FRAMES``."""
        handler = _FRAMES.get(type(ev))
        if handler is not None:
            handler(self, ev)

    def _on_ack(self, ev: F.Ack) -> None:
        a = self._answers.ack(ev.op)
        self._answer(a)
        self._scrubs.answered(a.record, True)
        self._barriers.acked(a.record)

    def _on_want(self, ev: F.Want) -> None:
        self._pump.want(ev.op, F.unpack_ranges(ev.ranges))

    def _on_error(self, ev: F.Error) -> None:
        if not ev.fatal and self._scrubs.refused(ev.op, ev.code, ev.message):
            return  # the peer could not check a file
        answer = self._answers.error(ev)  # a fatal Error raises: the peer closes the link
        self._pump.cancel(ev.op)
        self._answer(answer)
        if ev.code != F.ErrorCode.BASE_CHANGED:  # else it goes again, whole
            self._scrubs.answered(answer.record, False)
        if answer.refused is not None:
            self._barriers.refused(answer.record, answer.refused)

    def _answer(self, a: Answer) -> None:
        """Apply what an answer means (answers.py)."""
        if a.acked:
            self.stats.ops_acked += 1
        if a.renamed:
            self.stats.renames += 1
        if a.error is not None:
            self.stats.error(a.error)
        if a.log is not None:
            self._log.at(**a.log.fields).log(a.log.level, a.log.msg, *a.log.args)
        self._pump.apply(a.effects)

    def _on_retime(self, msg: Retime) -> None:
        node = self.node = msg.node
        self._wire.retime(node)
        self._backoff.retime(node.backoff_initial, node.backoff_max)
        self._scrubs.set_rate(node.verify_rate * 1024 * 1024)
        self._log.info(
            "link to %s: new timings applied (heartbeat %g s, dead after %g s, "
            "backoff %g-%g s, verify %g MiB/s)",
            self.peer,
            node.heartbeat_interval,
            node.dead_after,
            node.backoff_initial,
            node.backoff_max,
            node.verify_rate,
        )

    def _on_ping(self, ev: F.Ping) -> None:
        self._wire.queue(F.Pong(ev.nonce))

    def _on_pong(self, ev: F.Pong) -> None:
        self.stats.rtt_ms = (time.monotonic_ns() - ev.nonce) / 1e6


#: Bulk Dirty messages are marked for at most this long between pump rounds.
BULK_SLICE_S = 0.005

#: What the link thread does with each message posted to it.
_MESSAGES: dict[type, Callable[[Link, Any], None]] = {
    Dirty: Link._on_dirty,
    Moved: Link._on_moved,
    Received: Link._on_received,
    Down: Link._on_down,
    Reconcile: lambda link, msg: link._reconciler.rescan(msg.mirror),
    Pause: Link._on_pause,
    PeerHas: Link._on_peer_has,
    AgreedWith: Link._on_agreed,
    Stop: Link._on_stop,
    Hashed: lambda link, msg: None,  # the main loop pumps again
    Pace: lambda link, msg: link._wire.pace(msg),
    Retime: Link._on_retime,
    Verify: lambda link, msg: link._scrubs.start(msg),
    Expect: lambda link, msg: link._barriers.expect(msg),
    Expected: lambda link, msg: link._barriers.expected(msg),
}

#: What the link does with each frame the peer sends (protocol.py checked
#: that the peer may send it now).
_FRAMES: dict[type, Callable[[Link, Any], None]] = {
    F.Ack: Link._on_ack,
    F.Want: Link._on_want,
    F.Checked: lambda link, ev: link._scrubs.checked(ev),
    F.Entry: lambda link, ev: link._reconciler.entry(ev),
    F.Partial: lambda link, ev: link._reconciler.partial(ev),
    F.ListEnd: lambda link, ev: link._reconciler.list_end(ev),
    F.Error: Link._on_error,
    F.Opened: lambda link, ev: link._reconciler.opened(ev),
    F.Ping: Link._on_ping,
    F.Pong: Link._on_pong,
}
