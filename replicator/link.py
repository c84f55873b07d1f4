"""The sending end: one persistent link to one peer, pushing this node's mirrors.

A Link is a thread that owns everything about its peer: the connection, the
backlog of dirty paths, what the peer is known to hold (``RemoteMirror``),
the operations in flight. Other threads talk to it only through ``post()``
(one queue, one direction): its reader thread posts decoded frames, the
watcher and scanner post ``changes.Dirty``/``Moved``/``Rescan``, the control
socket posts commands. No locks.

The pipeline: a path is *dirty* → when it reaches the front of the backlog it
is ``lstat``-ed and compared with what the peer last acknowledged (or listed
in its manifest) → only a real difference becomes an operation → the
operation stays in flight until its Ack (durable on the peer) → only then
is the change forgotten. A link that drops puts everything in flight back
into the backlog.

File data goes out with sendfile in chunks; at most ``MAX_ACTIVE`` large files
are interleaved one chunk at a time while small files pass between them, so
a 100 GiB file never holds back a 4 KiB one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import frames as F
from . import net, paths
from .backlog import Backlog, Key, Store
from .backlog import InfoLike as Info
from .changes import Dirty, Flag, Moved, PeerHas, Rescan
from .config import MirrorConfig, NodeConfig, PeerConfig
from .errors import LinkError, ProtocolError, RemoteProtocolError
from .inflight import Admit, InFlight, Record, parent
from .manifest import Change, EntryState, Excludes, Preserve, compare, scan
from .marker import Marker
from .outgoing import CHUNK, FileSend, Step
from .paths import Located, Source
from .plan import Action, plan_path, reconcile
from .protocol import NEED_DATA, Connection, Established, Role
from .publisher import IS_ROOT
from .remote import RemoteMirror
from .stats import LinkStats, RateMeter, Transfer
from .transfer import PeerClosed

log = logging.getLogger(__name__)

#: Large files sent interleaved, one chunk each per round.
MAX_ACTIVE = 4
#: Unacknowledged operations before the link waits for acks.
WINDOW = 4096
#: Dirty paths started per round (between chunks of the large files).
STARTS_PER_ROUND = 256
#: After a directory's child changed, wait this long before re-sending its
#: mtime (it is pushed back while children are in flight; the queue empties
#: only after it, so it shows in lag: keep it short).
DIR_SETTLE = 0.1
#: A file still being written (plan.SETTLE_NS) is looked at again after this long.
SETTLE_RETRY = 0.1
#: Retry delays for operations the peer refused with a transient error.
RETRY_MIN, RETRY_MAX = 1.0, 30.0
#: Wait before re-sending a file that changed while it was sent.
RESEND_DELAY = 0.1


# -- messages only the link itself posts -----------------------------------------


@dataclass(frozen=True)
class _Received:
    """Bytes the reader thread read; the link thread parses them (one thread
    drives the connection's state machine)."""

    gen: int
    data: bytes


@dataclass(frozen=True)
class _Down:
    gen: int
    reason: str


@dataclass(frozen=True)
class Stop:
    """Stop the link; with ``drain`` > 0, first wait up to that many seconds
    for the operations in flight to be acknowledged (sending nothing new)."""

    drain: float = 0.0


@dataclass(frozen=True)
class Pause:
    """Stop sending (``on``) or resume, for one mirror or (None) all of them;
    changes keep accumulating meanwhile."""

    on: bool
    mirror: str | None = None


# -- state ---------------------------------------------------------------------------


@dataclass
class SourceMirror:
    """A mirror as this node pushes it."""

    id: int
    name: str
    root: bytes
    excludes: Excludes
    delete: bool
    rescan_interval: float
    marker: Marker | None = None
    #: The peer also pushes this mirror to us (conflicts.py): rescans never
    #: delete and only push what is newer here.
    two_way: bool = False
    paused: bool = False
    #: What this node applies from peers that push this mirror here.
    preserve: Preserve = Preserve.NONE

    @classmethod
    def from_config(
        cls, mid: int, name: str, cfg: MirrorConfig, peer: str, marker: Marker | None = None
    ) -> SourceMirror:
        return cls(
            mid,
            name,
            os.fsencode(cfg.path),
            Excludes(cfg.exclude),
            cfg.delete,
            cfg.rescan_interval,
            marker,
            two_way=peer in cfg.accept_from,
            preserve=Preserve.from_names(cfg.preserve),
        )

    def deletes_allowed(self) -> bool:
        return self.delete and (self.marker is None or self.marker.ok())


class Backoff:
    """Exponential backoff with ±20 % jitter."""

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum = initial, maximum
        self.current = initial

    def next(self) -> float:
        d = self.current * random.uniform(0.8, 1.2)
        self.current = min(self.maximum, self.current * 2)
        return d

    def reset(self) -> None:
        self.current = self.initial


class AuthFailed(LinkError):
    pass


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
    ) -> None:
        super().__init__(name=f"link-{peer}", daemon=True)
        self.node = node
        self.peer = peer
        self.peer_cfg = peer_cfg
        self.key = key
        self.mirrors = {m.id: m for m in mirrors}
        self.by_name = {m.name: m for m in mirrors}
        self.stats = stats
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._stopping = False
        self._paused = False
        self._sock: socket.socket | None = None
        self._conn: Connection | None = None
        self._wbuf = bytearray()
        #: Connection generation: messages from an older reader are ignored.
        self._gen = 0
        self._next_op = 0
        self._list_ids = 0
        self._remote = {m.id: RemoteMirror() for m in mirrors}
        self._backlog = Backlog({m.id: m.name for m in mirrors}, store)
        self._retries: Counter[Key] = Counter()
        self._inflight = InFlight()
        self._active: list[FileSend] = []
        self._last_tx = 0.0
        self._rate = RateMeter()
        self._stats_at = 0.0
        self._marker_at = 0.0
        self._backoff: Backoff | None = None
        self._marker_warned: set[str] = set()
        #: Draining before a stop: nothing new is sent until this time.
        self._drain_until: float | None = None
        loaded = self._backlog.load()
        if loaded:
            log.info(
                "link to %s: %d pending changes loaded from the backlog",
                peer,
                loaded,
                extra={"PEER": peer},
            )

    # -- interface for other threads -------------------------------------------------

    def post(self, msg: object) -> None:
        self._q.put(msg)

    def stop(self, drain: float = 0.0) -> None:
        """Ask the link to stop (from another thread); ``drain`` as in Stop."""
        if drain > 0 and self._conn is not None and not self._stopping:
            self._q.put(Stop(drain))
            return
        self._stopping = True
        self._q.put(Stop())
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # -- thread ------------------------------------------------------------------------

    def run(self) -> None:
        backoff = Backoff(self.node.backoff_initial, self.node.backoff_max)
        try:
            while not self._stopping:
                self.stats.set_state("connecting")
                self.stats.next_retry = None
                try:
                    self._serve(backoff)
                except AuthFailed as e:
                    self._fail("auth_failed", str(e), logging.ERROR)
                except (LinkError, ProtocolError, PeerClosed, OSError) as e:
                    if not self._stopping:
                        self._fail("backoff", str(e) or type(e).__name__, logging.WARNING)
                except Exception as e:
                    log.exception(
                        "link to %s: internal error", self.peer, extra={"PEER": self.peer}
                    )
                    self._fail("backoff", f"internal error: {e}", logging.ERROR)
                finally:
                    self._teardown()
                if self._stopping:
                    break
                delay = backoff.next()
                self.stats.next_retry = time.time() + delay
                self._idle_until(time.monotonic() + delay)
        finally:
            self.stats.set_state("stopped")
            self._backlog.close()

    def _fail(self, state: str, msg: str, level: int) -> None:
        log.log(
            level,
            "link to %s (%s): %s",
            self.peer,
            self.peer_cfg.address,
            msg,
            extra={"PEER": self.peer},
        )
        self.stats.error(msg)
        self.stats.set_state(state)

    def _idle_until(self, until: float) -> None:
        """Wait while disconnected, still collecting changes."""
        while not self._stopping:
            left = until - time.monotonic()
            if left <= 0:
                return
            try:
                msg = self._q.get(timeout=min(left, 0.2))
            except queue.Empty:
                self._backlog.flush()
                self._update_stats(force=True)
                continue
            self._handle(msg)
            self._backlog.flush()
            self._update_stats()

    # -- connection --------------------------------------------------------------------

    def _serve(self, backoff: Backoff) -> None:
        host, port = net.parse_address(self.peer_cfg.address)
        sock = socket.create_connection((host, port), timeout=self.node.dead_after)
        sock.settimeout(None)  # blocking: see net.tune
        self._sock = sock
        if self._stopping:
            raise LinkError("stopping")
        net.tune(sock, self.node.dead_after)
        self.stats.set_state("handshake")
        conn = Connection(
            Role.INITIATOR,
            self.node.name,
            os.urandom(F.NONCE_SIZE),
            lambda n: self.key if n == self.peer else None,
            expect_peer=self.peer,
        )
        self._conn = conn
        self._gen += 1
        try:
            self._handshake(sock, conn)
        except RemoteProtocolError as e:
            with contextlib.suppress(Exception):
                sock.sendall(conn.send(F.Error(e.code, 0, 1, str(e))))
            if e.code is F.ErrorCode.AUTH:
                raise AuthFailed(str(e)) from None
            raise
        self._backoff = backoff  # reset once the peer served a whole manifest
        self.stats.connects += 1
        self.stats.set_state("connected")
        self.stats.last_error = None
        log.info(
            "link to %s (%s) is up", self.peer, self.peer_cfg.address, extra={"PEER": self.peer}
        )
        threading.Thread(
            target=self._reader,
            args=(sock, self._gen),
            name=f"link-{self.peer}-rx",
            daemon=True,
        ).start()
        for m in self.mirrors.values():
            self._remote[m.id].reset()
            self._queue(F.Open(m.id, m.name))
        self._flush()
        self._receive(conn, b"")  # frames that came with the handshake's last bytes
        self._main_loop()

    def _handshake(self, sock: socket.socket, conn: Connection) -> None:
        deadline = time.monotonic() + 10.0
        conn.start()
        while True:
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
            ev = conn.next_event()
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
            if isinstance(ev, Established):
                return
            if isinstance(ev, F.Error):
                if ev.code == F.ErrorCode.AUTH:
                    raise AuthFailed(f"peer refused authentication: {ev.message}")
                raise LinkError(f"peer refused the handshake: {ev.message}")
            if ev is NEED_DATA:
                conn.receive_data(net.recv_some(sock, deadline, 4096))
            else:
                raise RemoteProtocolError(F.ErrorCode.UNEXPECTED, f"{ev} during handshake")

    def _reader(self, sock: socket.socket, gen: int) -> None:
        """Reader thread: post what arrives; report the link down."""
        dead_after = self.node.dead_after
        last = time.monotonic()
        try:
            while True:
                if not net.wait_readable(sock, 0.5):
                    if time.monotonic() - last > dead_after:
                        self.post(_Down(gen, f"no answer from the peer for {dead_after:.0f} s"))
                        break
                    continue
                data = sock.recv(65536)
                if not data:
                    self.post(_Down(gen, "connection closed by the peer"))
                    break
                last = time.monotonic()
                self.post(_Received(gen, data))
        except (OSError, ValueError) as e:
            self.post(_Down(gen, f"connection failed: {e}"))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _teardown(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._conn = None
        self._wbuf.clear()
        for s in self._active:
            s.close()
        self._active.clear()
        # Nothing in flight was acknowledged: all of it is dirty again.
        records, waiting = self._inflight.clear()
        for rec in records:
            self._mark(rec.key, (rec.since, rec.size, Flag.DATA))
            if rec.dst is not None:
                self._mark((rec.key[0], rec.dst), (rec.since, 0, Flag.DATA))
                if rec.is_dir:
                    self._mark_tree(rec.key[0], rec.dst, rec.since)
        for key, info in waiting:
            self._mark(key, info)
        self._backlog.unpark_all()
        for r in self._remote.values():
            r.reset()
        self.stats.current = None
        self._update_stats(force=True)

    # -- main loop ---------------------------------------------------------------------

    def _main_loop(self) -> None:
        hb = self.node.heartbeat_interval
        sock = self._sock
        assert sock is not None
        while not self._stopping:
            while True:  # everything posted, without blocking
                try:
                    msg = self._q.get_nowait()
                except queue.Empty:
                    break
                self._handle(msg)
            self._backlog.promote()
            self._backlog.refill(self._inflight.busy)
            self._schedule_scans()
            if self._drain_until is not None and (
                not self._inflight or time.monotonic() >= self._drain_until
            ):
                log.info(
                    "link to %s: drained (%d operations unacknowledged)",
                    self.peer,
                    len(self._inflight),
                    extra={"PEER": self.peer},
                )
                self._stopping = True
                break
            idle = self._paused or self._drain_until is not None
            worked = False if idle else self._pump(sock)
            now = time.monotonic()
            if now - self._last_tx >= hb:
                self._queue(F.Ping(time.monotonic_ns()))
            self._flush()
            self._backlog.flush()
            self._update_stats(force=not worked)  # going idle: show the final state
            if worked:
                continue
            timeout = hb
            due = self._backlog.next_due()
            if due is not None:
                timeout = min(timeout, max(0.0, due - now))
            try:
                msg = self._q.get(timeout=timeout)
            except queue.Empty:
                continue
            self._handle(msg)

    def _queue(self, ev: F.Event) -> None:
        assert self._conn is not None
        self._wbuf += self._conn.send(ev)

    def _flush(self) -> None:
        if self._wbuf and self._sock is not None:
            self.stats.bytes_sent += len(self._wbuf)
            self._sock.sendall(self._wbuf)
            self._wbuf.clear()
            self._last_tx = time.monotonic()

    def _op(self) -> int:
        self._next_op = self._next_op % 0xFFFFFFFF + 1
        return self._next_op

    def _mark(self, key: Key, info: Info, delay: float = 0.0, persist: bool = True) -> None:
        self._backlog.mark(key, info, delay, persist)

    # -- messages ----------------------------------------------------------------------

    def _handle(self, msg: object) -> None:
        """A message posted to the link (``post``): see ``_MESSAGES``."""
        handler = _MESSAGES.get(type(msg))
        if handler is not None:
            handler(self, msg)

    def _on_dirty(self, msg: Dirty) -> None:
        m = self.by_name.get(msg.mirror)
        if m is not None and not m.excludes(msg.path):
            self._mark((m.id, msg.path), (time.time(), msg.size_hint, int(msg.flags)))

    def _on_moved_msg(self, msg: Moved) -> None:
        m = self.by_name.get(msg.mirror)
        if m is not None:
            self._on_moved(m, msg)

    def _on_received(self, msg: _Received) -> None:
        if msg.gen == self._gen and self._conn is not None:
            self._receive(self._conn, msg.data)

    def _on_down(self, msg: _Down) -> None:
        if msg.gen == self._gen and self._conn is not None:
            raise LinkError(msg.reason)

    def _on_rescan(self, msg: Rescan) -> None:
        for mid, r in self._remote.items():
            if msg.mirror is None or self.mirrors[mid].name == msg.mirror:
                r.next_scan = 0.0

    def _on_pause(self, msg: Pause) -> None:
        if msg.mirror is None:
            self._paused = self.stats.paused = msg.on
        elif msg.mirror in self.by_name:
            self.by_name[msg.mirror].paused = msg.on
            self._mirror_stats(msg.mirror)["paused"] = msg.on

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

    def _on_stop(self, msg: Stop) -> None:
        if msg.drain > 0 and self._conn is not None:
            self._drain_until = time.monotonic() + msg.drain
        else:
            self._stopping = True

    def _receive(self, conn: Connection, data: bytes) -> None:
        """Parse what the peer sent and act on every whole frame in it."""
        try:
            conn.receive_data(data)
            while (ev := conn.next_event()) is not NEED_DATA:
                self._on_frame(ev)
        except RemoteProtocolError as e:
            # Tell the peer why, unless a payload is half sent (the Error
            # would land inside it).
            sock = self._sock
            if sock is not None and not conn.payload_owed:
                with contextlib.suppress(Exception):
                    sock.sendall(self._wbuf + conn.send(F.Error(e.code, 0, 1, str(e))))
            raise LinkError(f"protocol error from the peer ({e.code.name}): {e}") from None

    def _on_frame(self, ev: object) -> None:
        """A frame from the peer: see ``_FRAMES``."""
        handler = _FRAMES.get(type(ev))
        if handler is not None:
            handler(self, ev)

    def _on_ack_frame(self, ev: F.Ack) -> None:
        self._on_ack(ev.op)

    def _on_entry(self, ev: F.Entry) -> None:
        r = self._remote.get(ev.mirror)
        if r is not None:
            r.entry(ev)

    def _on_partial(self, ev: F.Partial) -> None:
        r = self._remote.get(ev.mirror)
        if r is not None:
            r.partials[ev.path] = ev

    def _on_ping(self, ev: F.Ping) -> None:
        self._queue(F.Pong(ev.nonce))

    def _on_pong(self, ev: F.Pong) -> None:
        self.stats.rtt_ms = (time.monotonic_ns() - ev.nonce) / 1e6

    def _mirror_stats(self, name: str) -> dict[str, Any]:
        return self.stats.mirrors.setdefault(name, {})

    def _on_opened(self, ev: F.Opened) -> None:
        m = self.mirrors[ev.mirror]
        r = self._remote[ev.mirror]
        if ev.code:
            r.refused = ev.message
            self.stats.error(ev.message)
            self._mirror_stats(m.name)["refused"] = ev.message
            log.error(
                "link to %s: mirror %s refused: %s",
                self.peer,
                m.name,
                ev.message,
                extra={"PEER": self.peer, "MIRROR": m.name},
            )
            return
        r.opened, r.refused = True, None
        r.preserve = Preserve(ev.preserve & (Preserve.OWNERS | Preserve.SPECIAL_BITS))
        self._mirror_stats(m.name).pop("refused", None)
        self._list(m.id)

    def _list(self, mid: int) -> None:
        r = self._remote[mid]
        if not r.opened or r.listing is not None:
            return
        self._list_ids += 1
        r.list_id = self._list_ids
        r.listing = {}
        r.partials = {}
        r.next_scan = float("inf")
        self._queue(F.List(mid, r.list_id))

    def _compare(self, mid: int, src: EntryState, there: EntryState | None) -> Change:
        """What to send to turn ``there`` into ``src``, counting only what the
        peer applies as sent (its ``Opened``). In a two-way mirror, only what
        both sides apply: what we keep our own (owners, special bits) must not
        flow back and overwrite the peer's."""
        applied = self._remote[mid].preserve
        m = self.mirrors[mid]
        if m.two_way:
            applied &= m.preserve
        owners = IS_ROOT and bool(applied & Preserve.OWNERS)
        return compare(src, there, owners, bool(applied & Preserve.SPECIAL_BITS))

    def _schedule_scans(self) -> None:
        now = time.monotonic()
        for mid, r in self._remote.items():
            if r.opened and r.listing is None and now >= r.next_scan:
                self._list(mid)

    def _on_list_end(self, ev: F.ListEnd) -> None:
        """Reconcile: mark every path where the source and the peer differ."""
        r = self._remote[ev.mirror]
        m = self.mirrors[ev.mirror]
        if r.listing is None or ev.list_id != r.list_id:
            return
        t0 = time.monotonic()
        r.known, r.listing = r.listing, None
        r.listed = True
        if self._backoff is not None:
            # Only now: a peer that accepts the handshake and then fails
            # (crashes on some operation) must not be retried at full speed.
            self._backoff.reset()
        now = time.time()
        diff = reconcile(
            scan(m.root, m.excludes),
            r.known,
            lambda a, b: self._compare(m.id, a, b),
            m.two_way,
            m.excludes,
            m.delete,
        )
        for rel, size in diff.send:
            self._mark((m.id, rel), (now, size, Flag.DATA), persist=False)
        marked = len(diff.send)
        if diff.gone and not m.deletes_allowed():
            self._marker_missing(m, len(diff.gone))
        else:
            for rel in diff.gone:
                self._mark((m.id, rel), (now, 0, Flag.DATA), persist=False)
            marked += len(diff.gone)
        dur = time.monotonic() - t0
        r.last_scan, r.last_scan_duration = time.time(), dur
        r.next_scan = time.monotonic() + m.rescan_interval
        self._mirror_stats(m.name).update(
            last_scan=r.last_scan,
            last_scan_duration=dur,
            remote_entries=len(r.known),
            source_entries=diff.entries,
            source_dirs=diff.dirs,
        )
        log.info(
            "link to %s: mirror %s reconciled: %d entries here, %d there, %d to send (%.2f s)",
            self.peer,
            m.name,
            diff.entries,
            len(r.known),
            marked,
            dur,
            extra={"PEER": self.peer, "MIRROR": m.name},
        )

    def _marker_missing(self, m: SourceMirror, n: int) -> None:
        self._mirror_stats(m.name)["marker_missing"] = True
        if m.name not in self._marker_warned:
            self._marker_warned.add(m.name)
            log.error(
                "link to %s: mirror %s: NOT propagating %d deletion(s): the mirror's "
                "marker is missing (see the mirror's log line above)",
                self.peer,
                m.name,
                n,
                extra={"PEER": self.peer, "MIRROR": m.name},
            )

    # -- the pipeline --------------------------------------------------------------------

    def _pump(self, sock: socket.socket) -> bool:
        """Send what can be sent now; True if anything was sent.

        Starting paths (mostly small files, a few frames and a sendfile each)
        happens corked, so many of them share TCP segments; the uncork at the
        end pushes them out. Chunks of large files go uncorked: their header
        is sent with MSG_MORE so it joins the payload that follows (corking
        them measurably cost the sender CPU on loopback)."""
        conn = self._conn
        assert conn is not None
        worked = False
        started = 0
        bl = self._backlog
        corked = False
        for mid, m in self.mirrors.items():
            if not self._remote[mid].listed or m.paused:
                continue  # nothing is sent before we know what the peer holds
            while (
                bl.has_ready(mid)
                and started < STARTS_PER_ROUND
                and conn.unacked() < WINDOW
                and conn.open_files() < F.MAX_OPEN_FILES - 1
            ):
                if not corked:
                    net.cork(sock, True)
                    corked = True
                key, info = bl.pop(mid)
                if self._try_start(key, info):
                    started += 1
                    worked = True
        if corked:
            self._flush()
            net.cork(sock, False)
        for s in list(self._active):
            self._step(s)
            worked = True
        return worked

    def _try_start(self, key: Key, info: Info) -> bool:
        verdict, op = self._inflight.admit(key)
        if verdict is Admit.BUSY:
            self._backlog.park(key, info)
            return False
        if verdict is Admit.DIR_BUSY:
            # A directory whose children are in flight: its mtime will change
            # again on the peer; look at it once they are acknowledged.
            self._mark(key, info, DIR_SETTLE, persist=False)
            return False
        if verdict is Admit.RENAMING:
            self._inflight.wait(op, key, info)
            return False
        return self._start(key, info)

    def _start(self, key: Key, info: Info) -> bool:
        """Turn one dirty path into an operation, if it really changed."""
        m = self.mirrors[key[0]]
        # One confined walk per path: the file is opened, and later checked,
        # through the directory fd this lookup found.
        found = None if m.excludes(key[1]) else Source(m.root).locate(key[1])
        try:
            return self._start_found(key, info, found)
        finally:
            if found is not None:
                found.close()  # a no-op if a FileSend took it

    def _start_found(self, key: Key, info: Info, found: Located | None) -> bool:
        mid, rel = key
        m = self.mirrors[mid]
        since, _, flags = info
        src = None if found is None else EntryState.from_stat(found.st, found.target)
        r = self._remote[mid]
        action = plan_path(
            src,
            r.known.get(rel),
            flags,
            since,
            lambda a, b: self._compare(mid, a, b),
            m.delete,
            time.time(),
            time.time_ns(),
            rel in r.guessed,
        )
        if action is Action.META_GUESS:
            r.guessed.add(rel)
        elif action is not Action.NOTHING and action is not Action.SETTLE:
            r.guessed.discard(rel)
        if action is Action.NOTHING:
            self._backlog.done(key)
            return False
        if action is Action.SETTLE:
            self._mark(key, info, SETTLE_RETRY, persist=False)
            return False
        if action is Action.DELETE:
            if not m.deletes_allowed():
                self._marker_missing(m, 1)
                self._backlog.done(key)
                return False
            return self._send_op(F.Delete(self._op(), mid, rel), key, since, None)
        assert src is not None
        ev: F.Event
        if action is Action.META or action is Action.META_GUESS:
            ev = F.Meta(self._op(), mid, src.mode, src.mtime_ns, src.uid, src.gid, rel)
        elif action is Action.MKDIR:
            ev = F.Mkdir(self._op(), mid, src.mode, src.mtime_ns, src.uid, src.gid, rel)
        elif action is Action.SYMLINK:
            ev = F.Symlink(self._op(), mid, src.mtime_ns, src.uid, src.gid, rel, src.target)
        else:
            assert found is not None
            return self._start_file(m, key, since, found)
        return self._send_op(ev, key, since, src)

    def _send_op(
        self,
        ev: F.Event,
        key: Key,
        since: float,
        state: EntryState | None,
        dst: bytes | None = None,
        is_dir: bool = False,
    ) -> bool:
        op: int = ev.op  # type: ignore[attr-defined]
        self._queue(ev)
        self._inflight.track(op, Record(type(ev), key, since, state, dst, is_dir=is_dir))
        self.stats.ops_sent += 1
        return True

    def _release(self, op: int) -> Record | None:
        """``op`` was answered: what waited on it may go."""
        out = self._inflight.release(op)
        if out is None:
            return None
        for k in out.freed:
            self._backlog.unpark(k)
        for key, info in out.woken:
            self._mark(key, info, persist=False)
        return out.record

    # -- renames ---------------------------------------------------------------------------

    def _on_moved(self, m: SourceMirror, msg: Moved) -> None:
        """A rename travels as a rename when the peer holds the source and
        nothing about either path is in flight; otherwise it becomes a delete
        of ``src`` and new data at ``dst``."""
        mid = m.id
        src, dst = msg.src, msg.dst
        now = time.time()
        r = self._remote[mid]
        if (
            self._conn is not None
            and r.listed
            and not self._paused
            and not m.paused
            and self._drain_until is None
            and src in r.known
            and not m.excludes(src)
            and not m.excludes(dst)
            and not self._inflight.rename_blocked(mid, src, dst)
        ):
            self._send_op(
                F.Rename(self._op(), mid, src, dst), (mid, src), now, None, dst, msg.is_dir
            )
            # A crash before the Ack must not forget it: both paths are then
            # looked at again after the restart.
            self._backlog.persist((mid, src), (now, 0, Flag.DATA))
            self._backlog.persist((mid, dst), (now, 0, Flag.DATA))
            self._flush()
            return
        self._mark((mid, src), (now, 0, Flag.DATA))
        self._mark((mid, dst), (now, 0, Flag.DATA | Flag.CLOSED))
        if msg.is_dir:
            self._mark_tree(mid, dst, now)

    def _mark_tree(self, mid: int, top: bytes, since: float, only_changed: bool = False) -> None:
        m = self.mirrors[mid]
        known = self._remote[mid].known
        for rel, st in scan(m.root, m.excludes, top):
            if not only_changed or self._compare(mid, st, known.get(rel)) is not Change.NONE:
                self._mark((mid, rel), (since, st.size, Flag.DATA))

    # -- files -------------------------------------------------------------------------

    def _start_file(self, m: SourceMirror, key: Key, since: float, found: Located) -> bool:
        rel = key[1]
        r = self._remote[m.id]
        op = self._op()
        try:
            begun = FileSend.begin(op, m.id, m.name, key, found, since, r.partials.pop(rel, None))
        except OSError as e:
            self._source_error(m, rel, e)
            return False
        if begun is None:  # gone or changed type since lstat: look again
            self._mark(key, (since, 0, Flag.DATA), RESEND_DELAY, persist=False)
            return False
        s, frame = begun
        if s.resumed:
            self.stats.resumed_files += 1
            self.stats.resumed_bytes_skipped += s.resumed
            log.info(
                "link to %s: resuming %s at offset %d of %d",
                self.peer,
                paths.show(rel),
                s.resumed,
                s.size,
                extra={"PEER": self.peer, "MIRROR": m.name, "PATH": paths.show(rel)},
            )
        self._queue(frame)
        self._inflight.track(
            op, Record(F.File, key, since, EntryState.from_stat(s.st), size=s.size)
        )
        self.stats.ops_sent += 1
        if s.left <= CHUNK:
            while s.fd >= 0:
                self._step(s)
        else:
            self._active.append(s)
        return True

    def _source_error(self, m: SourceMirror, rel: bytes, e: OSError) -> None:
        msg = f"mirror {m.name}: cannot read {paths.show(rel)}: {e.strerror}"
        log.error(
            "%s (will retry at the next scan)",
            msg,
            extra={"PEER": self.peer, "MIRROR": m.name, "PATH": paths.show(rel)},
        )
        self.stats.error(msg)

    def _step(self, s: FileSend) -> None:
        """Send the next chunk of ``s``; End or Abort it when it is done."""
        conn, sock = self._conn, self._sock
        assert conn is not None and sock is not None
        if s.left:
            self.stats.current = Transfer(paths.show(s.key[1]), s.mirror, s.offset, s.size)
            self.stats.bytes_sent += len(self._wbuf)
        headers = s.frame_bytes
        step, n = s.step(sock, conn, self._wbuf)
        self.stats.bytes_sent += n + s.frame_bytes - headers  # the Chunk header too
        self.stats.payload_bytes_sent += n
        if n:
            self._last_tx = time.monotonic()
        if step is Step.MORE:
            return
        self._queue(s.finish(step))
        self._drop(s)
        if step is Step.DONE:
            self.stats.files_sent += 1
            return
        rec = self._release(s.op)
        self.stats.files_aborted += 1
        log.info(
            "link to %s: %s changed while being sent; sending it again",
            self.peer,
            paths.show(s.key[1]),
            extra={"PEER": self.peer, "MIRROR": s.mirror, "PATH": paths.show(s.key[1])},
        )
        since = rec.since if rec else s.since
        self._mark(s.key, (since, s.size, Flag.DATA), RESEND_DELAY, persist=False)

    def _drop(self, s: FileSend) -> None:
        s.close()
        if s in self._active:
            self._active.remove(s)
        self.stats.current = None

    # -- answers -----------------------------------------------------------------------

    def _on_ack(self, op: int) -> None:
        rec = self._release(op)
        if rec is None:
            return
        self.stats.ops_acked += 1
        self._retries.pop(rec.key, None)
        mid, rel = rec.key
        r = self._remote[mid]
        if rec.kind is F.Delete:
            r.forget(rel)
        elif rec.kind is F.Rename:
            assert rec.dst is not None
            r.move(rel, rec.dst)
            self._backlog.done((mid, rec.dst))
            self.stats.renames += 1
            # What moved may have changed on the way: compare it again.
            self._mark((mid, rec.dst), (rec.since, 0, Flag.DATA), persist=False)
            if rec.is_dir:
                self._mark_tree(mid, rec.dst, rec.since, only_changed=True)
        elif rec.state is not None:
            r.acked(rel, rec.state)
        if rec.kind is not F.Meta:
            # The entry's folder on the peer got a new mtime: put ours back.
            for p in {parent(rel), parent(rec.dst) if rec.dst else b""}:
                if p:
                    r.stale_dir(p)
                    self._mark((mid, p), (rec.since, 0, Flag.DATA), DIR_SETTLE, persist=False)
        self._backlog.done(rec.key)

    def _on_error(self, ev: F.Error) -> None:
        try:
            code = F.ErrorCode(ev.code)
        except ValueError:
            code = F.ErrorCode.INTERNAL
        if ev.fatal:
            raise LinkError(f"peer closed the link ({code.name}): {ev.message}")
        for s in list(self._active):
            if s.op == ev.op:
                self._queue(s.cancel())
                self._drop(s)
        rec = self._release(ev.op)
        if rec is None:
            return
        mid, rel = rec.key
        m = self.mirrors[mid]
        where = {"PEER": self.peer, "MIRROR": m.name, "PATH": paths.show(rel), "CODE": code.name}
        self.stats.error(ev.message)
        info: Info = (rec.since, rec.size, Flag.DATA)
        if rec.kind is F.Rename:
            # The peer could not rename: send the destination as new data.
            assert rec.dst is not None
            log.warning(
                "peer %s could not rename %s: %s; sending it again",
                self.peer,
                paths.show(rel),
                ev.message,
                extra=where,
            )
            self._mark((mid, rec.dst), info)
            if rec.is_dir:
                self._mark_tree(mid, rec.dst, rec.since)
            self._mark(rec.key, info)
        elif code is F.ErrorCode.RESUME_MISMATCH:
            self._remote[mid].partials.pop(rel, None)
            self._mark(rec.key, info)
        elif code in F.RETRYABLE:
            n = self._retries[rec.key] = self._retries[rec.key] + 1
            delay = min(RETRY_MAX, RETRY_MIN * 2 ** (n - 1))
            log.warning(
                "peer %s: %s; retrying in %.0f s", self.peer, ev.message, delay, extra=where
            )
            self._mark(rec.key, info, delay)
        else:
            log.error(
                "peer %s refused %s: %s (not retried until the next scan)",
                self.peer,
                paths.show(rel),
                ev.message,
                extra=where,
            )
            self._backlog.done(rec.key)

    # -- status ------------------------------------------------------------------------

    def _update_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._stats_at < 0.25:
            return
        self._stats_at = now
        st = self.stats
        bl = self._backlog
        st.queue_files = bl.files()
        st.queue_bytes = bl.bytes() + sum(s.left for s in self._active)
        st.in_flight = len(self._inflight)
        oldest = [t for t in (bl.oldest(), self._inflight.oldest()) if t is not None]
        st.oldest_change = min(oldest) if oldest else None
        st.rate_bps = self._rate.add(st.payload_bytes_sent)
        recheck = now - self._marker_at >= 1.0  # a marker read is a syscall: once a second
        if recheck:
            self._marker_at = now
        for mid, r in self._remote.items():
            m = self.mirrors[mid]
            ms = self._mirror_stats(m.name)
            ms.update(listed=r.listed)
            if recheck and m.marker is not None and m.marker.ok():
                ms.pop("marker_missing", None)
                self._marker_warned.discard(m.name)

    def status(self) -> dict[str, Any]:
        return self.stats.snapshot()

    def peer_state(self, mirror: str, path: bytes) -> EntryState | None:
        """What the peer last held at ``path``, as far as this link knows
        (read from another thread: a single dict lookup)."""
        m = self.by_name.get(mirror)
        return None if m is None else self._remote[m.id].known.get(path)


#: What the link thread does with each message posted to it.
_MESSAGES: dict[type, Callable[[Link, Any], None]] = {
    Dirty: Link._on_dirty,
    Moved: Link._on_moved_msg,
    _Received: Link._on_received,
    _Down: Link._on_down,
    Rescan: Link._on_rescan,
    Pause: Link._on_pause,
    PeerHas: Link._on_peer_has,
    Stop: Link._on_stop,
}

#: What the link does with each frame the peer sends (protocol.py checked
#: that the peer may send it now).
_FRAMES: dict[type, Callable[[Link, Any], None]] = {
    F.Ack: Link._on_ack_frame,
    F.Entry: Link._on_entry,
    F.Partial: Link._on_partial,
    F.ListEnd: Link._on_list_end,
    F.Error: Link._on_error,
    F.Opened: Link._on_opened,
    F.Ping: Link._on_ping,
    F.Pong: Link._on_pong,
}
