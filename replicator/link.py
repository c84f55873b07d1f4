"""The sending end: one persistent link to one peer, pushing this node's mirrors.

A Link is a thread that owns everything about its peer: the connection, the
queue of dirty paths, what the peer is known to hold, the operations in
flight. Other threads talk to it only through ``post()`` (one queue, one
direction): the reader thread posts decoded frames, the watcher and scanner
post dirty paths, the control socket posts commands. No locks.

The pipeline: a path is *dirty* → when it reaches the front, it is
``lstat``-ed and compared with what the peer last acknowledged (or reported
in its manifest) → only a real difference becomes an operation → the
operation stays in flight until its Ack (durable on the peer). A link that
drops puts everything in flight back into the dirty queue; nothing is
forgotten before the peer acknowledged it.

File data goes out with sendfile in chunks; at most ``MAX_ACTIVE`` large files
are interleaved one chunk at a time while small files pass between them, so
a 100 GiB file never holds back a 4 KiB one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import random
import socket
import stat
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from . import frames as F
from . import net, paths, transfer
from .backlog import Backlog, Key
from .config import MirrorConfig, NodeConfig, PeerConfig
from .errors import LinkError, ProtocolError, RemoteProtocolError
from .manifest import Change, EntryState, Excludes, compare, lstat_entry, scan
from .protocol import NEED_DATA, Connection, Established, Role
from .publisher import IS_ROOT
from .stats import LinkStats, RateMeter, Transfer

log = logging.getLogger(__name__)

#: Payload bytes per Chunk frame.
CHUNK = 1 << 20
#: Files of at most this size are sent whole in one go.
SMALL = CHUNK
#: Large files sent interleaved, one chunk each per round.
MAX_ACTIVE = 4
#: Unacknowledged operations before the link waits for acks.
WINDOW = 4096
#: Dirty paths started per round (between chunks of the large files).
STARTS_PER_ROUND = 128
#: Wait after a directory's child changed before its mtime is re-sent.
DIR_SETTLE = 0.3
#: Retry delays for operations the peer refused with a transient error.
RETRY_MIN, RETRY_MAX = 1.0, 60.0
#: Wait before re-sending a file that changed while it was sent.
RESEND_DELAY = 0.1


# -- messages posted to a link ------------------------------------------------


@dataclass(frozen=True)
class Dirty:
    """``path`` (relative to the mirror root) may differ on the peer."""

    mirror: str
    path: bytes
    size_hint: int = 0


@dataclass(frozen=True)
class Rescan:
    """Reconcile now (``mirror`` None: all mirrors of the link)."""

    mirror: str | None = None


@dataclass(frozen=True)
class _Frame:
    gen: int
    event: object


@dataclass(frozen=True)
class _Down:
    gen: int
    reason: str


@dataclass(frozen=True)
class Stop:
    pass


# -- state ---------------------------------------------------------------------


@dataclass
class SourceMirror:
    """A mirror as this node pushes it."""

    id: int
    name: str
    root: bytes
    excludes: Excludes
    delete: bool
    rescan_interval: float

    @classmethod
    def from_config(cls, mid: int, name: str, cfg: MirrorConfig) -> SourceMirror:
        return cls(
            mid, name, os.fsencode(cfg.path), Excludes(cfg.exclude), cfg.delete, cfg.rescan_interval
        )


@dataclass
class _Remote:
    """What we know the peer holds in one mirror."""

    opened: bool = False
    refused: str | None = None
    listed: bool = False
    listing: dict[bytes, EntryState] | None = None
    list_id: int = 0
    known: dict[bytes, EntryState] = field(default_factory=dict)
    partials: dict[bytes, F.Partial] = field(default_factory=dict)
    last_scan: float | None = None
    last_scan_duration: float | None = None
    next_scan: float = 0.0


@dataclass
class _InFlight:
    kind: type[F.Event]
    key: Key
    since: float
    state: EntryState | None = None
    dst: bytes | None = None
    size: int = 0


@dataclass
class _Send:
    """A file being sent."""

    op: int
    key: Key
    mirror: SourceMirror
    fd: int
    st: os.stat_result
    offset: int
    size: int

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def version_of(st: os.stat_result) -> bytes:
    """Identifies one version of a source file: resume only if it is unchanged."""
    return struct.pack("!QQQqq", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _changed(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns) != (
        b.st_ino,
        b.st_size,
        b.st_mtime_ns,
        b.st_ctime_ns,
    )


def _parent(rel: bytes) -> bytes:
    return rel.rpartition(b"/")[0]


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
        self._sock: socket.socket | None = None
        self._conn: Connection | None = None
        self._wbuf = bytearray()
        #: Connection generation: messages from an older reader are ignored.
        self._gen = 0
        self._next_op = 0
        self._list_ids = 0
        self._remote: dict[int, _Remote] = {m.id: _Remote() for m in mirrors}
        self._backlog = Backlog(self.mirrors)
        self._retries: Counter[Key] = Counter()
        self._inflight: dict[int, _InFlight] = {}
        self._busy: dict[Key, int] = {}
        self._busy_under: Counter[Key] = Counter()
        self._active: list[_Send] = []
        self._last_tx = 0.0
        self._rate = RateMeter()
        self._stats_at = 0.0

    # -- interface for other threads -----------------------------------------

    def post(self, msg: object) -> None:
        self._q.put(msg)

    def stop(self) -> None:
        self._stopping = True
        self._q.put(Stop())
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # -- thread --------------------------------------------------------------

    def run(self) -> None:
        backoff = Backoff(self.node.backoff_initial, self.node.backoff_max)
        while not self._stopping:
            self.stats.set_state("connecting")
            self.stats.next_retry = None
            try:
                self._serve(backoff)
            except AuthFailed as e:
                self._fail("auth_failed", str(e), logging.ERROR)
            except (LinkError, ProtocolError, transfer.PeerClosed, OSError) as e:
                if not self._stopping:
                    self._fail("backoff", str(e) or type(e).__name__, logging.WARNING)
            except Exception as e:
                log.exception("link to %s: internal error", self.peer, extra={"PEER": self.peer})
                self._fail("backoff", f"internal error: {e}", logging.ERROR)
            finally:
                self._teardown()
            if self._stopping:
                break
            delay = backoff.next()
            self.stats.next_retry = time.time() + delay
            self._idle_until(time.monotonic() + delay)
        self.stats.set_state("stopped")

    def _fail(self, state: str, msg: str, level: int) -> None:
        full = f"link to {self.peer} ({self.peer_cfg.address}): {msg}"
        log.log(level, "%s", full, extra={"PEER": self.peer})
        self.stats.error(msg)
        self.stats.set_state(state)

    def _idle_until(self, until: float) -> None:
        """Wait while disconnected, still collecting dirty paths."""
        while not self._stopping:
            left = until - time.monotonic()
            if left <= 0:
                return
            try:
                msg = self._q.get(timeout=left)
            except queue.Empty:
                return
            self._handle(msg)

    # -- connection ----------------------------------------------------------

    def _serve(self, backoff: Backoff) -> None:
        host, port = net.parse_address(self.peer_cfg.address)
        sock = socket.create_connection((host, port), timeout=self.node.dead_after)
        sock.settimeout(None)  # blocking, see net.tune
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
        backoff.reset()
        self.stats.connects += 1
        self.stats.set_state("connected")
        self.stats.last_error = None
        log.info(
            "link to %s (%s) is up", self.peer, self.peer_cfg.address, extra={"PEER": self.peer}
        )
        reader = threading.Thread(
            target=self._reader,
            args=(sock, conn, self._gen),
            name=f"link-{self.peer}-rx",
            daemon=True,
        )
        reader.start()
        for m in self.mirrors.values():
            self._remote[m.id] = replace(_Remote(), known=self._remote[m.id].known)
            self._queue(F.Open(m.id, m.name))
        self._flush()
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

    def _reader(self, sock: socket.socket, conn: Connection, gen: int) -> None:
        """Reader thread: decode frames, post them; report the link down."""
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
                conn.receive_data(data)
                while (ev := conn.next_event()) is not NEED_DATA:
                    self.post(_Frame(gen, ev))
        except RemoteProtocolError as e:
            with contextlib.suppress(Exception):
                sock.sendall(conn.send(F.Error(e.code, 0, 1, str(e))))
            self.post(_Down(gen, f"protocol error from the peer ({e.code.name}): {e}"))
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
        for rec in self._inflight.values():
            self._mark(rec.key, rec.since, rec.size)
            if rec.dst is not None:
                self._mark((rec.key[0], rec.dst), rec.since, 0)
        self._inflight.clear()
        self._busy.clear()
        self._busy_under.clear()
        self._backlog.unpark_all()
        for r in self._remote.values():
            r.opened = r.listed = False
            r.listing = None
        self.stats.current = None
        self.stats.in_flight = 0
        self._update_stats(force=True)

    # -- main loop -----------------------------------------------------------

    def _main_loop(self) -> None:
        hb = self.node.heartbeat_interval
        sock = self._sock
        assert sock is not None
        while not self._stopping:
            # Drain everything posted, without blocking.
            while True:
                try:
                    msg = self._q.get_nowait()
                except queue.Empty:
                    break
                self._handle(msg)
            self._backlog.promote()
            self._schedule_scans()
            net.cork(sock, True)
            worked = self._pump()
            now = time.monotonic()
            if now - self._last_tx >= hb:
                self._queue(F.Ping(time.monotonic_ns()))
            self._flush()
            net.cork(sock, False)
            self._update_stats()
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
            self._sock.sendall(self._wbuf)
            self.stats.bytes_sent += len(self._wbuf)
            self._wbuf.clear()
            self._last_tx = time.monotonic()

    def _op(self) -> int:
        self._next_op = self._next_op % 0xFFFFFFFF + 1
        return self._next_op

    # -- messages ------------------------------------------------------------

    def _handle(self, msg: object) -> None:
        if isinstance(msg, Dirty):
            m = self.by_name.get(msg.mirror)
            if m is not None and not m.excludes(msg.path):
                self._mark((m.id, msg.path), time.time(), msg.size_hint)
        elif isinstance(msg, _Frame):
            if msg.gen == self._gen and self._conn is not None:
                self._on_frame(msg.event)
        elif isinstance(msg, _Down):
            if msg.gen == self._gen and self._conn is not None:
                raise LinkError(msg.reason)
        elif isinstance(msg, Rescan):
            for r_id, r in self._remote.items():
                if msg.mirror is None or self.mirrors[r_id].name == msg.mirror:
                    r.next_scan = 0.0
        elif isinstance(msg, Stop):
            self._stopping = True

    def _on_frame(self, ev: object) -> None:
        if isinstance(ev, F.Ack):
            self._on_ack(ev.op)
        elif isinstance(ev, F.Entry):
            r = self._remote.get(ev.mirror)
            if r is not None and r.listing is not None:
                with contextlib.suppress(ValueError):
                    r.listing[ev.path] = EntryState(
                        F.EntryKind(ev.kind),
                        ev.mode,
                        ev.size,
                        ev.mtime_ns,
                        ev.uid,
                        ev.gid,
                        ev.target,
                    )
        elif isinstance(ev, F.Partial):
            r = self._remote.get(ev.mirror)
            if r is not None:
                r.partials[ev.path] = ev
        elif isinstance(ev, F.ListEnd):
            self._on_list_end(ev)
        elif isinstance(ev, F.Error):
            self._on_error(ev)
        elif isinstance(ev, F.Opened):
            self._on_opened(ev)
        elif isinstance(ev, F.Ping):
            self._queue(F.Pong(ev.nonce))
        elif isinstance(ev, F.Pong):
            self.stats.rtt_ms = (time.monotonic_ns() - ev.nonce) / 1e6

    def _on_opened(self, ev: F.Opened) -> None:
        m = self.mirrors[ev.mirror]
        r = self._remote[ev.mirror]
        if ev.code:
            r.refused = ev.message
            self.stats.error(ev.message)
            self.stats.mirrors.setdefault(m.name, {})["refused"] = ev.message
            log.error(
                "link to %s: mirror %s refused: %s",
                self.peer,
                m.name,
                ev.message,
                extra={"PEER": self.peer, "MIRROR": m.name},
            )
            return
        r.opened, r.refused = True, None
        self.stats.mirrors.setdefault(m.name, {}).pop("refused", None)
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

    def _schedule_scans(self) -> None:
        now = time.monotonic()
        for mid, r in self._remote.items():
            if r.opened and r.listing is None and now >= r.next_scan:
                self._list(mid)

    def _on_list_end(self, ev: F.ListEnd) -> None:
        r = self._remote[ev.mirror]
        m = self.mirrors[ev.mirror]
        if r.listing is None or ev.list_id != r.list_id:
            return
        t0 = time.monotonic()
        r.known, r.listing = r.listing, None
        r.listed = True
        now = time.time()
        seen: set[bytes] = set()
        marked = 0
        for rel, st in scan(m.root, m.excludes):
            seen.add(rel)
            if compare(st, r.known.get(rel), IS_ROOT) is not Change.NONE:
                self._mark((m.id, rel), now, st.size)
                marked += 1
        if m.delete:
            gone = sorted(rel for rel in r.known if rel not in seen and not m.excludes(rel))
            top: bytes | None = None
            for rel in gone:
                if top is not None and rel.startswith(top + b"/"):
                    continue  # removed with its parent
                top = rel
                self._mark((m.id, rel), now, 0)
                marked += 1
        dur = time.monotonic() - t0
        r.last_scan, r.last_scan_duration = time.time(), dur
        r.next_scan = time.monotonic() + m.rescan_interval
        self.stats.mirrors.setdefault(m.name, {}).update(
            last_scan=r.last_scan,
            last_scan_duration=dur,
            remote_entries=len(r.known),
            source_entries=len(seen),
        )
        log.info(
            "link to %s: mirror %s reconciled: %d entries here, %d there, %d to send (%.2f s)",
            self.peer,
            m.name,
            len(seen),
            len(r.known),
            marked,
            dur,
            extra={"PEER": self.peer, "MIRROR": m.name},
        )

    # -- the dirty-path pipeline ----------------------------------------------

    def _mark(self, key: Key, since: float, size: int, delay: float = 0.0) -> None:
        self._backlog.mark(key, since, size, delay)

    def _pump(self) -> bool:
        """Send what can be sent now; True if anything was sent."""
        conn = self._conn
        assert conn is not None
        worked = False
        started = 0
        bl = self._backlog
        for mid in self.mirrors:
            if not self._remote[mid].listed:
                continue  # nothing is sent before we know what the peer holds
            while (
                bl.has_ready(mid)
                and started < STARTS_PER_ROUND
                and conn.unacked() < WINDOW
                and conn.open_files() < F.MAX_OPEN_FILES - 1
            ):
                key, info = bl.pop(mid)
                if key in self._busy:
                    bl.park(key, info)
                elif self._busy_under[key]:
                    # A directory whose children are in flight: its mtime will
                    # change again; look at it once they are acknowledged.
                    self._mark(key, info[0], info[1], DIR_SETTLE)
                elif self._start(key, info):
                    started += 1
                    worked = True
        for s in list(self._active):
            self._send_chunk(s)
            worked = True
        return worked

    def _start(self, key: Key, info: tuple[float, int]) -> bool:
        """Turn one dirty path into an operation, if it really changed."""
        mid, rel = key
        m = self.mirrors[mid]
        r = self._remote[mid]
        since = info[0]
        known = r.known.get(rel)
        src = None if m.excludes(rel) else lstat_entry(m.root, rel)
        if src is None:
            if known is None or not m.delete:
                return False
            return self._send_op(F.Delete(self._op(), mid, rel), key, since, None)
        change = compare(src, known, IS_ROOT)
        if change is Change.NONE:
            return False
        if change is Change.META:
            ev: F.Event = F.Meta(self._op(), mid, src.mode, src.mtime_ns, src.uid, src.gid, rel)
            return self._send_op(ev, key, since, src)
        if src.kind is F.EntryKind.DIR:
            ev = F.Mkdir(self._op(), mid, src.mode, src.mtime_ns, src.uid, src.gid, rel)
            return self._send_op(ev, key, since, src)
        if src.kind is F.EntryKind.SYMLINK:
            ev = F.Symlink(self._op(), mid, src.mtime_ns, src.uid, src.gid, rel, src.target)
            return self._send_op(ev, key, since, src)
        return self._start_file(m, key, since)

    def _send_op(
        self,
        ev: F.Event,
        key: Key,
        since: float,
        state: EntryState | None,
        dst: bytes | None = None,
    ) -> bool:
        op: int = ev.op  # type: ignore[attr-defined]
        self._queue(ev)
        self._track(op, _InFlight(type(ev), key, since, state, dst))
        self.stats.ops_sent += 1
        return True

    def _track(self, op: int, rec: _InFlight) -> None:
        self._inflight[op] = rec
        self._busy[rec.key] = op
        mid, rel = rec.key
        self._busy_under[(mid, _parent(rel))] += 1

    def _release(self, op: int) -> _InFlight | None:
        rec = self._inflight.pop(op, None)
        if rec is None:
            return None
        self._busy.pop(rec.key, None)
        mid, rel = rec.key
        pk = (mid, _parent(rel))
        self._busy_under[pk] -= 1
        if self._busy_under[pk] <= 0:
            del self._busy_under[pk]
        self._backlog.unpark(rec.key)
        return rec

    def _start_file(self, m: SourceMirror, key: Key, since: float) -> bool:
        rel = key[1]
        path = os.path.join(m.root, rel)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO):
                self._mark(key, since, 0, RESEND_DELAY)  # it changed type or vanished
                return False
            self._source_error(m, rel, e)
            return False
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            self._mark(key, since, 0, RESEND_DELAY)
            return False
        r = self._remote[m.id]
        version = version_of(st)
        offset = 0
        held = r.partials.pop(rel, None)
        if held is not None and held.version == version and 0 < held.held <= st.st_size:
            offset = held.held
            self.stats.resumed_files += 1
            self.stats.resumed_bytes_skipped += offset
            log.info(
                "link to %s: resuming %s at offset %d of %d",
                self.peer,
                paths.show(rel),
                offset,
                st.st_size,
                extra={"PEER": self.peer, "MIRROR": m.name, "PATH": paths.show(rel)},
            )
        op = self._op()
        self._queue(
            F.File(
                op,
                m.id,
                offset,
                st.st_size,
                stat.S_IMODE(st.st_mode),
                st.st_mtime_ns,
                st.st_uid,
                st.st_gid,
                version,
                rel,
            )
        )
        state = EntryState.from_stat(st)
        self._track(op, _InFlight(F.File, key, since, state, size=st.st_size))
        self.stats.ops_sent += 1
        s = _Send(op, key, m, fd, st, offset, st.st_size)
        if st.st_size - offset <= SMALL:
            while s.fd >= 0:
                self._send_chunk(s)
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

    def _send_chunk(self, s: _Send) -> None:
        """Send the next chunk of ``s`` (or finish it)."""
        conn, sock = self._conn, self._sock
        assert conn is not None and sock is not None
        n = min(CHUNK, s.size - s.offset)
        if n == 0:
            self._finish(s)
            return
        if s.offset and s.size > SMALL and _changed(s.st, os.fstat(s.fd)):
            self._abort(s, F.AbortReason.SOURCE_CHANGED)
            return
        self._queue(F.Chunk(s.op, s.offset, n))
        self._flush()
        self.stats.current = Transfer(paths.show(s.key[1]), s.mirror.name, s.offset, s.size)
        sent = transfer.send_range(sock.fileno(), s.fd, s.offset, n)
        conn.payload_sent(sent)
        self.stats.bytes_sent += sent
        self.stats.payload_bytes_sent += sent
        if sent < n:
            # The file shrank under us: keep the stream framed, then abort.
            transfer.send_filler(sock, n - sent)
            conn.payload_sent(n - sent)
            self.stats.bytes_sent += n - sent
            self._abort(s, F.AbortReason.SOURCE_CHANGED)
            return
        s.offset += n
        self._last_tx = time.monotonic()
        if s.offset == s.size:
            self._finish(s)

    def _finish(self, s: _Send) -> None:
        # Zero-copy shares pages rather than snapshotting them: a write after
        # sendfile returned may still have reached the wire. Re-check the
        # source before saying End.
        try:
            now = os.fstat(s.fd)
            at_path = os.lstat(os.path.join(s.mirror.root, s.key[1]))
        except OSError:
            self._abort(s, F.AbortReason.SOURCE_GONE)
            return
        if _changed(s.st, now) or at_path.st_ino != s.st.st_ino:
            self._abort(s, F.AbortReason.SOURCE_CHANGED)
            return
        self._queue(F.End(s.op))
        self._drop(s)
        self.stats.files_sent += 1

    def _abort(self, s: _Send, reason: F.AbortReason) -> None:
        self._queue(F.Abort(s.op, reason))
        self._drop(s)
        rec = self._release(s.op)
        self.stats.files_aborted += 1
        log.info(
            "link to %s: %s changed while being sent; sending it again",
            self.peer,
            paths.show(s.key[1]),
            extra={"PEER": self.peer, "MIRROR": s.mirror.name, "PATH": paths.show(s.key[1])},
        )
        self._mark(s.key, rec.since if rec else time.time(), s.size, RESEND_DELAY)

    def _drop(self, s: _Send) -> None:
        s.close()
        if s in self._active:
            self._active.remove(s)
        if self.stats.current is not None and self.stats.current.path == paths.show(s.key[1]):
            self.stats.current = None

    # -- answers -------------------------------------------------------------

    def _on_ack(self, op: int) -> None:
        rec = self._release(op)
        if rec is None:
            return
        self.stats.ops_acked += 1
        self._retries.pop(rec.key, None)
        mid, rel = rec.key
        r = self._remote[mid]
        if rec.kind is F.Delete:
            self._forget_under(r, rel)
        elif rec.kind is F.Rename:
            assert rec.dst is not None
            self._move_under(r, rel, rec.dst)
        elif rec.state is not None:
            old = r.known.get(rel)
            if old is not None and old.kind is F.EntryKind.DIR and rec.state.kind is not old.kind:
                self._forget_under(r, rel)  # a directory replaced by a file or symlink
            r.known[rel] = rec.state
        if rec.kind is not F.Meta:
            # The entry's folder on the peer got a new mtime: put ours back.
            for p in {_parent(rel), _parent(rec.dst) if rec.dst else None}:
                if p:
                    self._stale_dir(mid, p, rec.since)

    def _stale_dir(self, mid: int, rel: bytes, since: float) -> None:
        r = self._remote[mid]
        cur = r.known.get(rel)
        if cur is not None and cur.kind is F.EntryKind.DIR:
            r.known[rel] = replace(cur, mtime_ns=-1)
        self._mark((mid, rel), since, 0, DIR_SETTLE)

    @staticmethod
    def _forget_under(r: _Remote, rel: bytes) -> None:
        st = r.known.pop(rel, None)
        if st is not None and st.kind is F.EntryKind.DIR:
            prefix = rel + b"/"
            for k in [k for k in r.known if k.startswith(prefix)]:
                del r.known[k]

    @staticmethod
    def _move_under(r: _Remote, src: bytes, dst: bytes) -> None:
        Link._forget_under(r, dst)
        st = r.known.pop(src, None)
        if st is None:
            return
        r.known[dst] = st
        if st.kind is F.EntryKind.DIR:
            prefix = src + b"/"
            for k in [k for k in r.known if k.startswith(prefix)]:
                r.known[dst + k[len(src) :]] = r.known.pop(k)

    def _on_error(self, ev: F.Error) -> None:
        try:
            code = F.ErrorCode(ev.code)
        except ValueError:
            code = F.ErrorCode.INTERNAL
        if ev.fatal:
            raise LinkError(f"peer closed the link ({code.name}): {ev.message}")
        for s in list(self._active):
            if s.op == ev.op:
                self._queue(F.Abort(s.op, F.AbortReason.CANCELLED))
                self._drop(s)
        rec = self._release(ev.op)
        if rec is None:
            return
        mid, rel = rec.key
        m = self.mirrors[mid]
        where = {"PEER": self.peer, "MIRROR": m.name, "PATH": paths.show(rel), "CODE": code.name}
        self.stats.error(ev.message)
        if code is F.ErrorCode.RESUME_MISMATCH:
            self._remote[mid].partials.pop(rel, None)
            self._mark(rec.key, rec.since, rec.size)
        elif code in F.RETRYABLE:
            n = self._retries[rec.key] = self._retries[rec.key] + 1
            delay = min(RETRY_MAX, RETRY_MIN * 2 ** (n - 1))
            log.warning(
                "peer %s: %s; retrying in %.0f s", self.peer, ev.message, delay, extra=where
            )
            self._mark(rec.key, rec.since, rec.size, delay)
        else:
            log.error(
                "peer %s refused %s: %s (not retried until the next scan)",
                self.peer,
                paths.show(rel),
                ev.message,
                extra=where,
            )

    # -- status --------------------------------------------------------------

    def _update_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._stats_at < 0.25:
            return
        self._stats_at = now
        st = self.stats
        bl = self._backlog
        st.queue_files = bl.files()
        st.queue_bytes = bl.bytes() + sum(s.size - s.offset for s in self._active)
        st.in_flight = len(self._inflight)
        oldest = [t for t in (bl.oldest(),) if t is not None]
        oldest += [rec.since for rec in self._inflight.values()][:1]
        st.oldest_change = min(oldest) if oldest else None
        st.rate_bps = self._rate.add(st.payload_bytes_sent)
        for mid, r in self._remote.items():
            m = self.mirrors[mid]
            st.mirrors.setdefault(m.name, {}).update(listed=r.listed)

    def status(self) -> dict[str, Any]:
        return self.stats.snapshot()
