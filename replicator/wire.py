"""A link's connection to its peer: TCP connect, the handshake, the reader
thread, the write buffer, the heartbeat, the bandwidth limit (``Pace``), and
taking it down; ``Backoff`` between attempts.

The link thread drives the protocol (``protocol.Connection``): it queues
frames here, flushes them, and has what the reader read parsed here
(``receive``). The reader thread only reads bytes and posts them to the
link (``Received``), or posts ``Down`` once; it never touches the
connection's state machine. Each connection has a generation (``gen``):
what an older reader posts is ignored.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import frames as F
from . import net
from .config import NodeConfig
from .errors import AuthFailed, LinkError, RemoteProtocolError
from .logs import Fields
from .outgoing import SendRate, chunk_size
from .owners import NameBook
from .protocol import NEED_DATA, Connection, Established, Role
from .rates import show_rate
from .stats import LinkStats

#: Without a bandwidth limit, the socket's not-yet-sent queue is about this
#: long at the rate chunks go out at (at least net.LOWAT, at most LOWAT_CAP).
LOWAT_TIME = 0.002
LOWAT_CAP = 4 << 20


@dataclass(frozen=True)
class Received:
    """Bytes the reader thread read; the link thread parses them (one thread
    drives the connection's state machine)."""

    gen: int
    data: bytes


@dataclass(frozen=True)
class Down:
    gen: int
    reason: str


@dataclass(frozen=True)
class Pace:
    """A new bandwidth limit (bytes per second, 0: none), for the live
    connection and the next ones (a reload that changed only that)."""

    rate: int


@dataclass(frozen=True)
class Retime:
    """New [node] timings (a reload), for the live connection and the next ones."""

    node: NodeConfig


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

    def retime(self, initial: float, maximum: float) -> None:
        """New bounds; the wait under way stays, the next one is within them."""
        self.initial, self.maximum = initial, maximum
        self.current = min(maximum, max(initial, self.current))


class Wire:
    """The connection of one link (at most one at a time)."""

    def __init__(
        self,
        node: NodeConfig,
        peer: str,
        address: str,
        key: bytes,
        stats: LinkStats,
        post: Callable[[object], None],
        log: Fields,
        rate: int = 0,
    ) -> None:
        self._node = node
        self._peer = peer
        self._address = address
        self._key = key
        self._stats = stats
        self._post = post
        self._log = log
        #: The bandwidth limit, bytes per second (0: none).
        self.rate = stats.bwlimit = rate
        self.sock: socket.socket | None = None
        self.conn: Connection | None = None
        #: Frames queued and not yet sent.
        self.buf = bytearray()
        #: Connection generation: messages from an older reader are ignored.
        self.gen = 0
        #: When the last Ping went out (monotonic; ``heartbeat``).
        self.last_ping = 0.0
        #: The user and group ids named on this connection (owners.py).
        self._names = NameBook()
        #: How fast chunks have been going out (chunk sizes and the
        #: socket's unsent queue follow it).
        self.send_rate = SendRate()
        self._lowat = 0

    def connect(self, stopping: Callable[[], bool]) -> None:
        """Connect and authenticate; AuthFailed if the peer refused our key."""
        host, port = net.parse_address(self._address)
        sock = socket.create_connection((host, port), timeout=self._node.dead_after)
        sock.settimeout(None)  # blocking: see net.tune
        self.sock = sock  # before looking at stopping: stop() shuts it down
        if stopping():
            raise LinkError("stopping")
        net.tune(sock, self._node.dead_after)
        self._lowat = net.LOWAT
        # Without a limit the defaults are right: only read them back.
        self._stats.bwlimit_applied = net.pace(sock, self.rate) if self.rate else net.pacing(sock)
        self._stats.set_state("handshake")
        conn = Connection(
            Role.INITIATOR,
            self._node.name,
            os.urandom(F.NONCE_SIZE),
            lambda n: self._key if n == self._peer else None,
            expect_peer=self._peer,
        )
        self.conn = conn
        self._names = NameBook()
        self.gen += 1
        try:
            self._handshake(sock, conn)
        except RemoteProtocolError as e:
            with contextlib.suppress(Exception):
                sock.sendall(conn.send(F.Error(e.code, 0, 1, str(e))))
            if e.code is F.ErrorCode.AUTH:
                raise AuthFailed(str(e)) from None
            raise

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

    def start_reader(self) -> None:
        threading.Thread(
            target=self._read,
            args=(self.sock, self.gen),
            name=f"link-{self._peer}-rx",
            daemon=True,
        ).start()

    def _read(self, sock: socket.socket, gen: int) -> None:
        """Reader thread: post what arrives; report the link down."""
        last = time.monotonic()
        try:
            while True:
                if not net.wait_readable(sock, 0.5):
                    dead_after = self._node.dead_after  # a reload may change it
                    if time.monotonic() - last > dead_after:
                        self._post(Down(gen, f"no answer from the peer for {dead_after:.0f} s"))
                        break
                    continue
                data = sock.recv(65536)
                if not data:
                    self._post(Down(gen, "connection closed by the peer"))
                    break
                last = time.monotonic()
                self._post(Received(gen, data))
        except (OSError, ValueError) as e:
            self._post(Down(gen, f"connection failed: {e}"))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    # -- the link thread's side ---------------------------------------------------------

    @property
    def chunk(self) -> int:
        """Payload bytes per Chunk frame at this link's limit and the rate it
        has been sending at (outgoing.chunk_size)."""
        return chunk_size(self.rate, self.send_rate.rate)

    def sent(self, n: int, now: float, began: float | None = None) -> None:
        """A chunk of ``n`` bytes went to the socket: the send rate, and
        without a limit the unsent queue, follow (``LOWAT_TIME``: the
        smallest queue costs the sender a wakeup per 128 KiB, 12,000 a
        second at 1.5 GB/s)."""
        rate = self.send_rate
        rate.sent(n, now, began)
        sock = self.sock
        if self.rate or rate.rate is None or sock is None:
            return
        want = max(net.LOWAT, min(LOWAT_CAP, int(rate.rate * LOWAT_TIME)))
        if abs(want - self._lowat) * 4 > self._lowat:
            with contextlib.suppress(OSError):  # going down: the next one starts over
                net.set_lowat(sock, want)
                self._lowat = want

    def heartbeat(self, now: float) -> None:
        """A Ping every heartbeat_interval, whether file data flows or not:
        the peer's Pong is what tells the reader that the peer is alive
        while a big file streams (the peer says nothing else until the file
        ends), so the link is not declared dead in the middle of it."""
        if now - self.last_ping >= self._node.heartbeat_interval:
            self.queue(F.Ping(time.monotonic_ns()))
            self.last_ping = now

    def nudge(self) -> None:
        """A Ping now: after the namespace operations of the live lane, it
        asks the peer to commit them within its live deadline (they carry
        no live flag of their own; groupcommit.py). It counts as the
        heartbeat too."""
        self.queue(F.Ping(time.monotonic_ns()))
        self.last_ping = time.monotonic()

    def pace(self, msg: Pace) -> None:
        """Apply a new bandwidth limit: to the live connection at once (no
        reconnect), and to every later one."""
        before, self.rate = self.rate, msg.rate
        self._stats.bwlimit = msg.rate
        sock = self.sock
        applied = ""
        if sock is not None:
            try:
                self._stats.bwlimit_applied = net.pace(sock, msg.rate)
                self._lowat = net.LOWAT  # what pace() leaves without a limit
                applied = f"; the connection reports {show_rate(self._stats.bwlimit_applied)}"
            except OSError as e:  # the connection is going down: the next one gets it
                applied = f"; not applied to the connection ({e.strerror}): the next one gets it"
        self._log.info(
            "link to %s: bwlimit %s (was %s)%s",
            self._peer,
            show_rate(msg.rate),
            show_rate(before),
            applied,
        )

    def retime(self, node: NodeConfig) -> None:
        """New timings: the reader and the heartbeat read them from now on,
        the live socket's keepalive and send timeouts follow dead_after."""
        self._node = node
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):  # going down: the next one gets it
                net.tune(sock, node.dead_after)

    def queue(self, ev: F.Event) -> None:
        conn = self.conn
        assert conn is not None
        for frame in self._names.frames_for(ev):  # owners by name (owners.py)
            self.buf += conn.send(frame)
        self.buf += conn.send(ev)

    def flush(self) -> None:
        if self.buf and self.sock is not None:
            self._stats.bytes_sent += len(self.buf)
            self.sock.sendall(self.buf)
            self.buf.clear()

    def receive(self, data: bytes, on_frame: Callable[[object], None]) -> None:
        """Parse what the peer sent and hand every whole frame in it to
        ``on_frame``; a protocol error raises LinkError."""
        conn = self.conn
        assert conn is not None
        try:
            conn.receive_data(data)
            while (ev := conn.next_event()) is not NEED_DATA:
                on_frame(ev)
        except RemoteProtocolError as e:
            # Tell the peer why, unless a payload is half sent (the Error
            # would land inside it).
            sock = self.sock
            if sock is not None and not conn.payload_owed:
                with contextlib.suppress(Exception):
                    sock.sendall(self.buf + conn.send(F.Error(e.code, 0, 1, str(e))))
            raise LinkError(f"protocol error from the peer ({e.code.name}): {e}") from None

    def shutdown(self) -> None:
        """Cut the connection (from any thread): blocked sends and reads end."""
        sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.conn = None
        self.buf.clear()
        self._stats.bwlimit_applied = None
