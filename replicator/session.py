"""The receiving end of one connection: a peer pushing mirrors into this node.

Frames are read by peeking at the socket and consuming exactly the bytes the
protocol parsed, so a chunk's payload is still in the kernel when its header
has been decoded and goes socket → pipe → file by splice. Small payloads that
arrived in the same read are written from the buffer (``node.inline_max``).

Completed files are published in groups, and acknowledged only then:
``groupcommit.GroupCommit`` says when (at once when nothing more is at hand;
live files at the latest a few milliseconds after the first completed, bulk
ones in big groups).

The session owns the socket, the handshake, the splice pipe and turns
answers into frames; ``inbound.Inbound`` routes operations to the mirrors
the peer opened (each a ``receiving.ReceivingMirror``) and keeps the
descriptor budget. What the session needs from the daemon is a
``SessionHost``.

A session never trusts the peer: every path goes through ``paths.check`` and
``paths.Root``; a peer may only open mirrors that list it in ``accept_from``
(``receiving.admit``, through ``Inbound.open``); any protocol violation
gets a fatal Error frame and the connection closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import Protocol

from . import frames as F
from . import net, transfer
from .config import Config, NodeConfig
from .conflicts import Base
from .errors import LinkError, RemoteProtocolError
from .groupcommit import Commit, GroupCommit
from .inbound import Inbound
from .logs import Fields
from .paths import show
from .protocol import NEED_DATA, PAYLOAD, Connection, Established, Role
from .rcvqueue import ReceiveQueue
from .receiving import Ack, Answer, Mend, Refuse
from .stats import SessionStats

log = logging.getLogger(__name__)

#: An unauthenticated connection must complete its handshake this fast: a
#: real peer needs two round trips; the slot it holds is scarce (listener.py).
HANDSHAKE_TIMEOUT = 3.0
#: File descriptors one session may hold at most (its socket and pipe, each
#: open mirror's root, partial folder and cached directories, partial files,
#: files and directories waiting for a commit round). The listener lowers it
#: when the process's limit is small, never below MIN_SESSION_FDS.
SESSION_FDS = 4096
MIN_SESSION_FDS = 128
#: Flush the outgoing buffer at this size.
WBUF_MAX = 256 * 1024


class SessionHost(Protocol):
    """What a session needs from its owner (the daemon, with its listener)."""

    def established(self, session: Session) -> None:
        """The peer authenticated; raise LinkError or RemoteProtocolError to
        refuse it."""

    def preauth_ended(self, session: Session, reason: str, level: int, message: str) -> None:
        """The connection ended before it authenticated: the owner counts
        and rate-limits those instead of logging each."""

    def marker_ok(self, mirror: str) -> bool:
        """The mirror's marker is there (or it has none): its disk is mounted."""

    def peer_state(self, peer: str, mirror: str, path: bytes) -> Base:
        """What ``peer`` last had at ``path`` (two-way mirrors)."""

    def notify(self, msg: object) -> None:
        """Hand a message (PeerHas, Dirty) to the links it concerns."""


class Session:
    """One inbound connection: handshake, the socket loop and its splices,
    answers turned into frames."""

    def __init__(
        self,
        sock: socket.socket,
        addr: str,
        config: Config,
        keys: dict[str, bytes],
        stop: threading.Event,
        stats: SessionStats,
        host: SessionHost,
    ) -> None:
        self.sock = sock
        self.addr = addr
        self.cfg = config
        #: The [node] timings: ``cfg.node``, until a reload changes them (``retime``).
        self.node = config.node
        self.keys = keys
        #: Set when the daemon stops: the loop leaves (shutdown() wakes it).
        self.stopping = stop
        self.stats = stats
        self.host = host
        self.peer = ""
        #: Every line names the peer once it is known (the handshake).
        self._log = Fields(log)
        #: Lowered by the listener before run() when the process's limit is small.
        self.fd_budget = SESSION_FDS
        self.conn = Connection(Role.ACCEPTOR, config.node.name, os.urandom(F.NONCE_SIZE), keys.get)
        self._wbuf = bytearray()
        #: Made once the peer authenticated.
        self._in: Inbound | None = None
        self._commits = GroupCommit()
        #: How much the kernel may queue ahead of what this loop read.
        self._queue_size = ReceiveQueue(net.rmem_max())

        #: Made once the peer authenticated: an unauthenticated connection
        #: costs one descriptor, its socket.
        self._splicer: transfer.Splicer | None = None
        self._closed = False
        #: Set when run() has returned and every file of the session is closed.
        self.done = threading.Event()

    # -- lifecycle -----------------------------------------------------------

    def shutdown(self) -> None:
        """Make the session's thread leave (from another thread)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def retime(self, node: NodeConfig) -> None:
        """A reload changed the [node] timings (from another thread): the
        loop reads them from its next turn, the socket's keepalive and
        send timeouts and the payload timeout follow dead_after now."""
        self.node = node
        with contextlib.suppress(OSError):  # going down anyway
            net.tune(self.sock, node.dead_after)
        splicer = self._splicer
        if splicer is not None:
            splicer.timeout = node.dead_after

    @property
    def introduced(self) -> bool:
        """The peer sent a valid Hello (it may still fail to authenticate)."""
        return self.conn.peer is not None

    def fds_held(self) -> int:
        """File descriptors this session holds (see SESSION_FDS)."""
        return self._fixed_fds() if self._in is None else self._in.fds_held()

    def _fixed_fds(self) -> int:
        return 1 + (0 if self._splicer is None else self._splicer.fds_held())

    def _peer_state(self, mirror: str, path: bytes) -> Base:
        return self.host.peer_state(self.peer, mirror, path)

    def _ended(self, reason: str, level: int, message: str, code: str = "") -> None:
        """Log why the connection ended; before authentication, the listener
        decides (a flood must not become a flood of log lines)."""
        if not self.peer:
            self.host.preauth_ended(self, reason, level, message)
            return
        self._log.log(level, "%s", message, extra={"CODE": code})

    def run(self) -> None:
        who = self.addr
        try:
            net.tune(self.sock, self.node.dead_after)
            self._handshake()
            who = f"peer {self.peer!r} ({self.addr})"
            self._log.info("%s connected", who)
            self.stats.state = "connected"
            self._loop()
        except RemoteProtocolError as e:
            msg = f"{who}: protocol error ({e.code.name}): {e}; closing the connection"
            self._ended(e.code.name.lower(), logging.WARNING, msg, e.code.name)
            self.stats.last_error = msg
            self._send_fatal(e.code, str(e))
        except (LinkError, ConnectionError) as e:
            reason = "timed out" if "timed out" in str(e) else "closed"
            self._ended(reason, logging.INFO, f"{who}: connection ended: {e}")
        except OSError as e:
            self._ended("failed", logging.WARNING, f"{who}: connection failed: {e}")
        except Exception:
            log.exception("%s: internal error; closing the connection", who)
            self._send_fatal(F.ErrorCode.INTERNAL, "internal error on the receiver")
        finally:
            self.close()
            self.done.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stats.state = "closed"
        if self._in is not None:
            self._in.close()
        if self._splicer is not None:
            self._splicer.close()
        try:
            self.sock.close()
        except OSError:
            pass

    def _send_fatal(self, code: F.ErrorCode, message: str) -> None:
        net.send_last(self.sock, bytes(self._wbuf) + self.conn.send(F.Error(code, 0, 1, message)))

    # -- reading -------------------------------------------------------------

    def _handshake(self) -> None:
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        while True:
            ev = self.conn.next_event()
            out = self.conn.data_to_send()
            if out:
                self.sock.sendall(out)
            if isinstance(ev, Established):
                self.peer = ev.peer
                self.stats.peer = ev.peer
                self._log = Fields(log, PEER=ev.peer)
                self.host.established(self)  # may refuse: LinkError/RemoteProtocolError
                self._splicer = transfer.Splicer(self.sock, self.node.dead_after)
                self._in = Inbound(
                    self.cfg,
                    ev.peer,
                    self.stats,
                    self.host.marker_ok,
                    self._peer_state,
                    self._fixed_fds,
                    self.fd_budget,
                )
                return
            if isinstance(ev, F.Error):
                raise LinkError(f"peer refused the handshake: {ev.message}")
            if ev is NEED_DATA:
                self.conn.receive_data(net.recv_some(self.sock, deadline, 4096))
            else:
                raise RemoteProtocolError(F.ErrorCode.UNEXPECTED, f"{ev} during handshake")

    def _loop(self) -> None:
        scratch = bytearray(net.PEEK_SIZE)
        # After a spliced payload more payload is likely queued: peek little,
        # or 256 KiB of file data would be copied into Python to find one
        # header (measured: 12 % of the receiver's CPU on big files).
        peek_size = net.PEEK_SIZE
        last_rx = time.monotonic()
        sock, conn = self.sock, self.conn
        while not self.stopping.is_set():
            node = self.node  # a reload may change it (retime)
            busy = self._side_work()
            wait = 0.0 if busy else node.heartbeat_interval
            self._size_queue()
            if not net.wait_readable(sock, wait):
                self._commit()
                self._flush()
                if time.monotonic() - last_rx > node.dead_after:
                    raise LinkError(f"no frame from the peer for {node.dead_after:.0f} s")
                continue
            peek = sock.recv(peek_size, socket.MSG_PEEK)
            peek_size = net.PEEK_SIZE
            if not peek:
                raise LinkError("connection closed by the peer")
            last_rx = time.monotonic()
            conn.receive_data(peek)
            consume = len(peek)
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    break
                if ev is PAYLOAD:
                    due = conn.payload_remaining
                    if due <= node.inline_max and conn.buffered() >= due:
                        self._payload_inline(conn.payload_from_buffer(due))
                        continue
                    consume -= conn.rewind()
                    net.consume(sock, consume, scratch)
                    self.stats.bytes_received += consume
                    consume = 0
                    # A chunk may take long to arrive (a slow or paced
                    # link): what is complete and past its commit deadline,
                    # and what is queued (a Pong), are not held behind it.
                    self._commit(more_at_hand=True, payload_ahead=due)
                    self._flush()
                    self._payload_splice(due)
                    conn.payload_consumed(due)
                    peek_size = net.SMALL_PEEK
                    self.stats.bytes_received += due
                    break
                self._dispatch(ev)
            if consume:
                net.consume(sock, consume, scratch)
                self.stats.bytes_received += consume
            self._commit(more_at_hand=net.wait_readable(sock, 0))
            self._flush()

    # -- payload -------------------------------------------------------------

    def _payload_inline(self, data: bytes) -> None:
        assert self._in is not None
        self._answer(self._in.write_inline(data))

    def _payload_splice(self, n: int) -> None:
        splicer = self._splicer
        assert splicer is not None and self._in is not None  # made by the handshake
        try:
            self._answer(self._in.splice(splicer, n))
        finally:
            self.stats.mode = splicer.mode

    # -- frames --------------------------------------------------------------

    def _answer(self, answers: list[Answer]) -> None:
        """Turn a mirror's answers into frames and messages, in order."""
        for a in answers:
            if isinstance(a, Ack):
                self._queue(F.Ack(a.op))
            elif isinstance(a, Mend):
                self._queue(F.Want(a.op, F.pack_ranges(a.ranges)))
                self._flush()
            elif isinstance(a, Refuse):
                self._refuse(a)
            else:
                self.host.notify(a.message)

    def _refuse(self, a: Refuse) -> None:
        # Transient on the sender's side, but a full or failing disk needs an operator.
        code = a.code
        urgent = code not in F.RETRYABLE or code in (F.ErrorCode.NO_SPACE, F.ErrorCode.IO_ERROR)
        level = logging.WARNING if urgent else logging.INFO
        self._log.at(PATH=show(a.path or b""), CODE=code.name).log(
            level, "refused operation from %s: %s", self.peer, a.message
        )
        self.stats.errors_sent += 1
        self.stats.last_error = a.message
        self._queue(F.Error(code, a.op, 0, a.message))

    def _queue(self, ev: F.Event) -> None:
        self._wbuf += self.conn.send(ev)
        if len(self._wbuf) >= WBUF_MAX:
            self._flush()

    def _flush(self) -> None:
        if self._wbuf:
            self.sock.sendall(self._wbuf)
            self._wbuf.clear()

    def _side_work(self) -> bool:
        """Hash a slice for a file waiting to be verified, and one for a
        scrub's Check, between frames; True if more is waiting."""
        inbound = self._in
        assert inbound is not None
        if inbound.verifying():
            self._answer(inbound.verify_step())
        if inbound.checks:
            frames, refused = inbound.checks.step()
            for frame in frames:
                self._queue(frame)
            if refused is not None:
                self._refuse(refused)
        self._flush()
        return bool(inbound.checks) or inbound.verifying()

    def _size_queue(self) -> None:
        """Keep the socket's receive queue to a few milliseconds of reading
        (rcvqueue.py), so frames behind file data are not held long."""
        q = self._queue_size
        now = time.monotonic()
        if not q.due(now):
            return
        size = q.update(now, self.stats.bytes_received, net.rtt(self.sock))
        if size is None:
            return
        with contextlib.suppress(OSError):  # going down
            net.set_rcvbuf(self.sock, size)
            self.stats.rcvbuf = size

    def _commit(self, more_at_hand: bool = False, payload_ahead: int = 0) -> bool:
        """Publish and acknowledge what is complete, if it is time
        (GroupCommit); True if it was."""
        inbound = self._in
        assert inbound is not None
        ops, nbytes, live = inbound.pending()
        due = self._commits.due(ops, nbytes, live, time.monotonic(), more_at_hand, payload_ahead)
        if due is None:
            return False
        self._answer(inbound.commit(live_only=due is Commit.LIVE))
        self._commits.committed()
        return True

    def _dispatch(self, ev: object) -> None:
        inbound = self._in
        assert inbound is not None  # made by the handshake
        match ev:
            case F.Chunk():
                inbound.chunk(ev)
            case F.File():
                self._answer(inbound.begin(ev))
            case F.Copy():
                self._answer(inbound.copy(ev))
            case F.Hole():
                self._answer(inbound.hole(ev))
            case F.Blocks():
                inbound.blocks(ev)
            case F.End():
                self._answer(inbound.end(ev.op, ev.digest))
            case F.Abort():
                inbound.abort(ev.op)
            case F.Mkdir() | F.Symlink() | F.Meta() | F.Delete() | F.Rename() | F.HardLink():
                self._answer(inbound.namespace(ev))
            case F.Check():
                cannot = inbound.checks.add(inbound.mirror(ev.mirror).check(ev))
                if cannot is not None:
                    self._refuse(cannot)
            case F.Owner():
                inbound.owners.told(ev)
            case F.Xattr():
                inbound.xattr(ev)
            case F.Ping():
                inbound.nudge()
                self._queue(F.Pong(ev.nonce))
            case F.Pong():
                pass
            case F.Open():
                freed, opened, refused = inbound.open(ev)
                self._answer(freed)
                self._queue(opened)
                if refused is not None:
                    self._log.at(MIRROR=ev.name).log(refused.level, "%s", refused.logged)
            case F.List():
                m = inbound.mirror(ev.mirror)
                self._answer(m.commit())
                for frame in m.listing(ev.mirror, ev.list_id):
                    self._queue(inbound.owners.map_out(frame) if m.owner_names else frame)
                self._flush()
            case F.Error():
                code = (
                    F.ErrorCode(ev.code).name
                    if ev.code in F.ErrorCode._value2member_map_
                    else ev.code
                )
                self._log.warning("peer %s reports: %s (%s)", self.peer, ev.message, code)
                if ev.fatal:
                    raise LinkError(f"peer closed the connection: {ev.message}")
            case _:
                raise RemoteProtocolError(
                    F.ErrorCode.UNEXPECTED, f"{type(ev).__name__} is not sent to a receiver"
                )
