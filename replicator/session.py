"""The receiving end of one connection: a peer pushing mirrors into this node.

Frames are read by peeking at the socket and consuming exactly the bytes the
protocol parsed, so a chunk's payload is still in the kernel when its header
has been decoded and goes socket → pipe → file by splice. Small payloads that
arrived in the same read are written from the buffer (``node.inline_max``).

Completed files are published in groups (``Publisher.commit``) when the
socket runs dry or a group is large, and acknowledged only then.

A session never trusts the peer: every path goes through ``paths.check`` and
``paths.Root``; a peer may only open mirrors that list it in ``accept_from``;
any protocol violation gets a fatal Error frame and the connection closes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import frames as F
from . import net, paths, transfer
from .changes import Dirty, Flag, PeerHas
from .config import Config
from .conflicts import Verdict, decide, keep_local_on_delete
from .errors import ApplyError, BadPath, LinkError, RemoteProtocolError
from .manifest import EntryState, Excludes, Preserve, scan
from .marker import Marker
from .protocol import NEED_DATA, PAYLOAD, Connection, Established, Role
from .publisher import (
    CHECKPOINT_BYTES,
    WRITEBACK_BYTES,
    Inbox,
    PartialFile,
    Publisher,
    apply_error,
    start_writeback,
)
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
#: Kept free for one operation: directory walks, a sidecar, a partial file.
OP_FDS = 8
#: What an open mirror needs: its root and its partial folder.
MIRROR_FDS = 2
#: Opens a session may have refused (unknown or forbidden mirrors) before
#: the connection is closed: each one is logged.
MAX_REFUSED_OPENS = 32
#: Commit a group once it holds this many operations or bytes.
GROUP_OPS = 1024
GROUP_BYTES = 256 * 1024 * 1024
#: Flush the outgoing buffer at this size.
WBUF_MAX = 256 * 1024

#: Called after a file or entry was published: (mirror, path, state, from peer).
Published = Callable[[str, bytes, EntryState | None, str], None]


@dataclass
class _Mirror:
    name: str
    root: paths.Root
    inbox: Inbox
    publisher: Publisher
    #: This node also pushes the mirror to the sending peer (conflicts.py).
    two_way: bool = False

    def close(self) -> None:
        self.publisher.close()
        self.inbox.close()
        self.root.close()

    def fds_held(self) -> int:
        """Descriptors held now, plus one per pending operation: its commit
        may open a directory for it."""
        root = self.root
        cached = len(root._cache) + len(root._stale)  # directory fds of the walk cache
        return 2 + cached + 2 * self.publisher.pending


class Session:
    def __init__(
        self,
        sock: socket.socket,
        addr: str,
        config: Config,
        keys: dict[str, bytes],
        stop: threading.Event,
        stats: SessionStats,
        on_established: Callable[[Session], None] | None = None,
        on_published: Published | None = None,
        markers: dict[str, Marker] | None = None,
        peer_state: Callable[[str, str, bytes], EntryState | None] | None = None,
        notify: Callable[[object], None] | None = None,
    ) -> None:
        self.sock = sock
        self.addr = addr
        self.cfg = config
        self.keys = keys
        self.stop = stop
        self.stats = stats
        self.on_established = on_established
        self.on_published = on_published
        self.markers = markers or {}
        self.peer_state = peer_state or (lambda peer, mirror, path: None)
        self.notify = notify
        self.peer = ""
        #: Set by the listener: told why a connection ended before it
        #: authenticated (it counts and rate-limits those instead of logging).
        self.on_preauth_end: Callable[[Session, str, int, str], None] | None = None
        self.fd_budget = SESSION_FDS
        self.conn = Connection(Role.ACCEPTOR, config.node.name, os.urandom(F.NONCE_SIZE), keys.get)
        self._wbuf = bytearray()
        self._mirrors: dict[int, _Mirror] = {}
        self._files: dict[int, PartialFile] = {}
        #: Operations refused mid-flight: their chunks are drained, End ignored.
        self._refused: set[int] = set()
        self._target: PartialFile | None = None
        self._chunk_offset = 0
        #: Mirror names this connection asked to open (each may be asked once).
        self._open_names: set[str] = set()
        self._open_refused = 0
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

    @property
    def introduced(self) -> bool:
        """The peer sent a valid Hello (it may still fail to authenticate)."""
        return self.conn.peer is not None

    def fds_held(self) -> int:
        """File descriptors this session holds (see SESSION_FDS)."""
        n = 1 + len(self._files)
        if self._splicer is not None:
            n += self._splicer.fds_held()
        for m in self._mirrors.values():
            n += m.fds_held()
        return n

    def _ended(self, reason: str, level: int, message: str, code: str = "") -> None:
        """Log why the connection ended; before authentication, the listener
        decides (a flood must not become a flood of log lines)."""
        if not self.peer and self.on_preauth_end is not None:
            self.on_preauth_end(self, reason, level, message)
            return
        log.log(level, "%s", message, extra={"PEER": self.peer, "CODE": code})

    def run(self) -> None:
        who = self.addr
        try:
            net.tune(self.sock, self.cfg.node.dead_after)
            self._handshake()
            who = f"peer {self.peer!r} ({self.addr})"
            log.info("%s connected", who, extra={"PEER": self.peer})
            self.stats.state = "connected"
            self._loop()
        except RemoteProtocolError as e:
            msg = f"{who}: protocol error ({e.code.name}): {e}; closing the connection"
            self._ended(e.code.name.lower(), logging.WARNING, msg, e.code.name)
            self.stats.last_error = msg
            self._send_fatal(e.code, str(e))
        except (LinkError, transfer.PeerClosed, transfer.PeerTimeout, ConnectionError) as e:
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
        # Complete files are still worth publishing: the sender will see them
        # in the next manifest and not send them again.
        for m in self._mirrors.values():
            try:
                self._commit(m, send=False)
            except Exception:
                log.exception("publishing complete files of %s after the connection ended", m.name)
        for p in self._files.values():
            if p.resumable:
                try:
                    p.checkpoint()
                except OSError:
                    pass
                p.close()
            else:
                p.discard()
        self._files.clear()
        for m in self._mirrors.values():
            m.close()
        if self._splicer is not None:
            self._splicer.close()
        try:
            self.sock.close()
        except OSError:
            pass

    def _send_fatal(self, code: F.ErrorCode, message: str) -> None:
        """Send a fatal Error, then close gently: closing with unread input
        makes the kernel send a RST, which can destroy the Error frame
        before the peer reads it. So: shut down our side, drain briefly."""
        try:
            self.sock.sendall(self._wbuf + self.conn.send(F.Error(code, 0, 1, message)))
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 2.0
            drained = 0
            while drained < 4 * 1024 * 1024 and net.wait_readable(
                self.sock, deadline - time.monotonic()
            ):
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except Exception:
            pass

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
                if self.on_established is not None:
                    self.on_established(self)  # may refuse: LinkError/RemoteProtocolError
                self._splicer = transfer.Splicer(self.sock, self.cfg.node.dead_after)
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
        node = self.cfg.node
        last_rx = time.monotonic()
        sock, conn = self.sock, self.conn
        while not self.stop.is_set():
            if not net.wait_readable(sock, node.heartbeat_interval):
                self._commit_all()
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
                    self._payload_splice(due)
                    conn.payload_consumed(due)
                    peek_size = net.SMALL_PEEK
                    self.stats.bytes_received += due
                    break
                self._dispatch(ev)
            if consume:
                net.consume(sock, consume, scratch)
                self.stats.bytes_received += consume
            pending = sum(m.publisher.pending for m in self._mirrors.values())
            if pending and (
                pending >= GROUP_OPS
                or not net.wait_readable(sock, 0)
                or sum(m.publisher.pending_bytes for m in self._mirrors.values()) >= GROUP_BYTES
            ):
                self._commit_all()
            self._flush()

    # -- payload -------------------------------------------------------------

    def _payload_inline(self, data: bytes) -> None:
        p = self._target
        if p is not None:
            try:
                transfer.write_inline(p.fd, data, self._chunk_offset)
            except OSError as e:
                self._fail_file(p, e)
                return
            self._wrote(p, len(data))
        self._chunk_offset += len(data)

    def _payload_splice(self, n: int) -> None:
        p = self._target
        splicer = self._splicer
        assert splicer is not None  # made by the handshake
        if p is None:
            splicer.discard(n)
            return
        try:
            splicer.to_file(p.fd, self._chunk_offset, n)
        except transfer.SinkError as e:
            self._fail_file(p, e)
            return
        finally:
            self.stats.mode = splicer.mode
        self._wrote(p, n)

    def _wrote(self, p: PartialFile, n: int) -> None:
        p.written += n
        self.stats.payload_bytes_received += n
        try:
            if p.written - p.flushed >= WRITEBACK_BYTES:
                start_writeback(p.fd, p.flushed, p.written - p.flushed)
                p.flushed = p.written
            if p.resumable and p.written - p.checkpointed >= CHECKPOINT_BYTES:
                p.checkpoint()
        except OSError as e:
            self._fail_file(p, e)

    def _fail_file(self, p: PartialFile, e: OSError) -> None:
        err = apply_error(e, paths.show(p.path))
        if self._files.pop(p.op, None) is not None:
            self._refused.add(p.op)  # still open: its remaining chunks are drained
        self._target = None
        p.discard()
        self._refuse(p.op, err.code, f"{err}; the partial file was discarded", p.path)

    # -- frames --------------------------------------------------------------

    def _mirror(self, mid: int) -> _Mirror:
        return self._mirrors[mid]  # the protocol checked the id is open

    def _refuse(self, op: int, code: F.ErrorCode, message: str, path: bytes | None) -> None:
        # Transient on the sender's side, but a full or failing disk needs an operator.
        urgent = code not in F.RETRYABLE or code in (F.ErrorCode.NO_SPACE, F.ErrorCode.IO_ERROR)
        level = logging.WARNING if urgent else logging.INFO
        log.log(
            level,
            "refused operation from %s: %s",
            self.peer,
            message,
            extra={"PEER": self.peer, "PATH": paths.show(path or b""), "CODE": code.name},
        )
        self.stats.errors_sent += 1
        self.stats.last_error = message
        self._queue(F.Error(code, op, 0, message))

    def _queue(self, ev: F.Event) -> None:
        self._wbuf += self.conn.send(ev)
        if len(self._wbuf) >= WBUF_MAX:
            self._flush()

    def _flush(self) -> None:
        if self._wbuf:
            self.sock.sendall(self._wbuf)
            self._wbuf.clear()

    def _dispatch(self, ev: object) -> None:
        t = type(ev)
        if t is F.Chunk:
            assert isinstance(ev, F.Chunk)
            self._target = self._files.get(ev.op)
            self._chunk_offset = ev.offset
        elif t is F.File:
            assert isinstance(ev, F.File)
            self._on_file(ev)
        elif t is F.End:
            assert isinstance(ev, F.End)
            p = self._files.pop(ev.op, None)
            if p is not None:
                self._on_end(p)
            else:
                self._refused.discard(ev.op)
        elif t is F.Abort:
            assert isinstance(ev, F.Abort)
            p = self._files.pop(ev.op, None)
            if p is not None:
                p.discard()
            self._refused.discard(ev.op)
        elif t is F.Ping:
            assert isinstance(ev, F.Ping)
            self._queue(F.Pong(ev.nonce))
        elif t is F.Pong:
            pass
        elif t is F.Open:
            assert isinstance(ev, F.Open)
            self._on_open(ev)
        elif t is F.List:
            assert isinstance(ev, F.List)
            self._on_list(ev)
        elif t is F.Error:
            assert isinstance(ev, F.Error)
            log.warning(
                "peer %s reports: %s (%s)",
                self.peer,
                ev.message,
                F.ErrorCode(ev.code).name if ev.code in F.ErrorCode._value2member_map_ else ev.code,
                extra={"PEER": self.peer},
            )
            if ev.fatal:
                raise LinkError(f"peer closed the connection: {ev.message}")
        else:
            self._on_namespace(ev)

    def _mirrors_by_inbox(self, p: PartialFile) -> _Mirror:
        for m in self._mirrors.values():
            if m.inbox is p.inbox:
                return m
        raise AssertionError("partial file of an unknown mirror")

    def _on_open(self, ev: F.Open) -> None:
        """Open a mirror the peer may push into: each name once per
        connection, within the session's descriptor budget."""
        mcfg = self.cfg.mirrors.get(ev.name)
        me = self.cfg.node.name
        if ev.name in self._open_names:
            raise RemoteProtocolError(
                F.ErrorCode.UNEXPECTED,
                f"mirror {ev.name!r} was already opened on this connection (a peer opens "
                "each mirror once)",
            )
        self._open_names.add(ev.name)
        if mcfg is None:
            self._refuse_open(
                ev,
                F.ErrorCode.UNKNOWN_MIRROR,
                f"node {me!r} has no mirror {ev.name!r}",
                f"peer {self.peer} pushes mirror {ev.name!r}, which this node does not have",
            )
            return
        if self.peer not in mcfg.accept_from:
            msg = (
                f"node {me!r} does not accept mirror {ev.name!r} from {self.peer!r} "
                f"(add it to mirrors.{ev.name}.accept_from)"
            )
            self._refuse_open(ev, F.ErrorCode.FORBIDDEN, msg, f"refused: {msg}")
            return
        marker = self.markers.get(ev.name)
        if marker is not None and not marker.ok():
            msg = (
                f"mirror {ev.name!r} on {me!r}: its marker is missing in {mcfg.path} "
                "(disk not mounted?); refusing to write into it"
            )
            self._refuse_open(ev, F.ErrorCode.IO_ERROR, msg, msg, logging.ERROR)
            return
        # Room for this mirror and, after that, for every partial file the
        # protocol allows in flight plus one operation's walk.
        need = MIRROR_FDS + F.MAX_OPEN_FILES + OP_FDS
        if self.fds_held() + need > self.fd_budget:
            self._release_fds()
        if self.fds_held() + need > self.fd_budget:
            msg = (
                f"mirror {ev.name!r} on {me!r}: this connection already holds "
                f"{self.fds_held()} of its {self.fd_budget} file descriptors "
                f"({len(self._mirrors)} mirrors open)"
            )
            self._refuse_open(ev, F.ErrorCode.LIMIT, msg, msg)
            return
        try:
            root = paths.Root(mcfg.path)
        except OSError as e:
            msg = f"mirror {ev.name!r} on {me!r}: cannot open {mcfg.path}: {e.strerror}"
            self._refuse_open(ev, F.ErrorCode.IO_ERROR, msg, msg, logging.ERROR)
            return
        try:
            inbox = Inbox(root, self.peer, Preserve.from_names(mcfg.preserve))
        except OSError as e:
            root.close()
            msg = f"mirror {ev.name!r} on {me!r}: cannot create partial folder: {e.strerror}"
            self._refuse_open(ev, F.ErrorCode.IO_ERROR, msg, msg, logging.ERROR)
            return
        two_way = self.peer in mcfg.push_to
        self._mirrors[ev.mirror] = _Mirror(ev.name, root, inbox, Publisher(root, inbox), two_way)
        self.stats.mirrors.append(ev.name)
        self._queue(F.Opened(ev.mirror, 0, inbox.preserve, ""))

    def _refuse_open(
        self,
        ev: F.Open,
        code: F.ErrorCode,
        message: str,
        logged: str,
        level: int = logging.WARNING,
    ) -> None:
        self._open_refused += 1
        if self._open_refused > MAX_REFUSED_OPENS:
            raise RemoteProtocolError(
                F.ErrorCode.LIMIT,
                f"more than {MAX_REFUSED_OPENS} mirrors refused on this connection",
            )
        self._queue(F.Opened(ev.mirror, code, 0, message))
        log.log(level, "%s", logged, extra={"PEER": self.peer, "MIRROR": ev.name})

    def _release_fds(self) -> None:
        """Commit what is pending and drop cached directories: afterwards the
        session holds only its socket, pipe, mirrors and files in flight."""
        self._commit_all()
        for m in self._mirrors.values():
            m.root.forget()
            m.root.reap()

    def _fit_fd_budget(self) -> None:
        """Called before an operation that may open files."""
        if self.fds_held() + OP_FDS > self.fd_budget:
            self._release_fds()

    def _on_list(self, ev: F.List) -> None:
        m = self._mirror(ev.mirror)
        self._commit(m)
        count = 0
        for rel, st in scan(os.fsencode(m.root.path), Excludes(())):
            self._queue(
                F.Entry(
                    ev.mirror,
                    st.kind,
                    st.mode,
                    st.size,
                    st.mtime_ns,
                    st.uid,
                    st.gid,
                    rel,
                    st.target,
                )
            )
            count += 1
        for held in m.inbox.partials():
            self._queue(F.Partial(ev.mirror, held.held, held.version, held.path))
        self._queue(F.ListEnd(ev.mirror, ev.list_id, count))
        self._flush()

    def _on_file(self, ev: F.File) -> None:
        m = self._mirror(ev.mirror)
        self._fit_fd_budget()
        try:
            parts = paths.check(ev.path)
            p = m.inbox.begin(ev, parts)
        except BadPath as e:
            self._refused.add(ev.op)
            self._refuse(ev.op, F.ErrorCode.BAD_PATH, f"mirror {m.name!r}: {e}", ev.path)
            return
        except ApplyError as e:
            self._refused.add(ev.op)
            self._refuse(ev.op, e.code, f"mirror {m.name!r}: {e}", ev.path)
            return
        if m.two_way:
            p.base = self.peer_state(self.peer, m.name, ev.path)
        self._files[ev.op] = p
        self._tell(m, ev.path, p.state)

    def _tell(
        self, m: _Mirror, path: bytes, state: EntryState | None, src: bytes | None = None
    ) -> None:
        """The peer holds ``path`` as ``state`` now: tell our link to it
        (echo suppression)."""
        if m.two_way and self.notify is not None:
            self.notify(PeerHas(self.peer, m.name, path, state, src))

    def _local(self, m: _Mirror, parts: tuple[bytes, ...]) -> EntryState | None:
        try:
            st = m.root.lstat(parts)
        except (OSError, BadPath):
            return None
        return None if st is None else EntryState.from_stat(st)

    def _on_end(self, p: PartialFile) -> None:
        m = self._mirrors_by_inbox(p)
        decision = None
        if m.two_way:
            decision = decide(
                p.parts[-1], self._local(m, p.parts), p.state, p.base, self.cfg.node.name, self.peer
            )
            if decision.verdict is Verdict.SAME:
                p.discard()
                m.publisher.add_noop(p.op)
                return
            if decision.verdict is not Verdict.APPLY:
                log.warning(
                    "conflict on %s: changed here and on %s; %s wins, the other version is "
                    "kept as %s",
                    paths.show(p.path),
                    self.peer,
                    self.peer
                    if decision.verdict is Verdict.KEEP_LOCAL_COPY
                    else self.cfg.node.name,
                    paths.show(decision.copy_name),
                    extra={"PEER": self.peer, "MIRROR": m.name, "PATH": paths.show(p.path)},
                )
                self.stats.conflicts += 1
                if self.notify is not None:  # our version must reach the peer
                    self.notify(Dirty(m.name, p.path, Flag.DATA | Flag.CLOSED))
        try:
            m.publisher.add_file(p, decision)
        except OSError as e:
            self._fail_file(p, e)
            return
        self.stats.files_received += 1

    def _on_namespace(self, ev: object) -> None:
        m = self._mirror(ev.mirror)  # type: ignore[attr-defined]
        op: int = ev.op  # type: ignore[attr-defined]
        self._fit_fd_budget()
        pub = m.publisher
        shown: bytes = getattr(ev, "path", None) or getattr(ev, "src", b"") or b""
        try:
            if isinstance(ev, F.Rename):
                src, dst = paths.check(ev.src), paths.check(ev.dst)
                self._commit(m)
                pub.rename(ev, src, dst)
            else:
                parts = paths.check(ev.path)  # type: ignore[attr-defined]
                if isinstance(ev, (F.Mkdir, F.Symlink)) and pub.blocks(parts):
                    self._commit(m)  # e.g. "rm p; mkdir -p p/q" while file p is pending
                if isinstance(ev, F.Mkdir):
                    pub.mkdir(ev, parts)
                elif isinstance(ev, F.Symlink):
                    if not ev.target or b"\0" in ev.target:
                        raise BadPath(f"symlink target {ev.target!r} is empty or has a NUL byte")
                    pub.symlink(ev, parts)
                elif isinstance(ev, F.Meta):
                    self._commit(m)
                    pub.meta(ev, parts)
                elif isinstance(ev, F.Delete):
                    self._commit(m)
                    if m.two_way and keep_local_on_delete(
                        self._local(m, parts), self.peer_state(self.peer, m.name, ev.path)
                    ):
                        log.warning(
                            "conflict on %s: deleted on %s but changed here; keeping "
                            "it (it goes back to %s)",
                            paths.show(ev.path),
                            self.peer,
                            self.peer,
                            extra={
                                "PEER": self.peer,
                                "MIRROR": m.name,
                                "PATH": paths.show(ev.path),
                            },
                        )
                        self.stats.conflicts += 1
                        pub.add_noop(op)
                        self._tell(m, ev.path, None)
                        if self.notify is not None:
                            self.notify(Dirty(m.name, ev.path, Flag.DATA | Flag.CLOSED))
                        return
                    pub.delete(ev, parts)
                else:
                    raise RemoteProtocolError(F.ErrorCode.UNEXPECTED, f"unexpected {ev}")
        except BadPath as e:
            self._refuse(op, F.ErrorCode.BAD_PATH, f"mirror {m.name!r}: {e}", shown)
            return
        except ApplyError as e:
            self._refuse(op, e.code, f"mirror {m.name!r}: {paths.show(shown)}: {e}", shown)
            return
        except (ValueError, RecursionError) as e:  # never fatal for the whole session
            self._refuse(
                op,
                F.ErrorCode.IO_ERROR,
                f"mirror {m.name!r}: {paths.show(shown)}: cannot apply: {e}",
                shown,
            )
            return
        self.stats.ops_applied += 1
        if isinstance(ev, F.Rename):
            self._tell(m, ev.dst, None, src=ev.src)
        elif isinstance(ev, F.Delete):
            self._tell(m, ev.path, None)
        elif isinstance(ev, F.Mkdir):
            self._tell(
                m,
                ev.path,
                EntryState(F.EntryKind.DIR, ev.mode & 0o7777, 0, ev.mtime_ns, ev.uid, ev.gid),
            )
        elif isinstance(ev, F.Symlink):
            self._tell(
                m,
                ev.path,
                EntryState(F.EntryKind.SYMLINK, 0o777, 0, ev.mtime_ns, ev.uid, ev.gid, ev.target),
            )
        elif isinstance(ev, F.Meta):
            st = self._local(m, paths.check(ev.path))
            if st is not None:
                self._tell(m, ev.path, st)

    # -- publishing ----------------------------------------------------------

    def _commit_all(self) -> None:
        for m in self._mirrors.values():
            if m.publisher.pending:
                self._commit(m)

    def _commit(self, m: _Mirror, send: bool = True) -> None:
        if not m.publisher.pending:
            return
        out = m.publisher.commit()
        self.stats.commits += 1
        if send:
            for op in out.acked:
                self._queue(F.Ack(op))
            for op, err in out.failed:
                self._refuse(op, err.code, f"mirror {m.name!r}: {err}", None)
        if self.on_published is not None:
            for path, state in out.published:
                self.on_published(m.name, path, state, self.peer)
