"""The mirrors a peer opened on one inbound connection, and when to publish.

``Inbound`` routes the operations and payloads of one connection to the
mirror and file each belongs to (``receiving.ReceivingMirror``), opens mirrors (``admit``, each
name once per connection) and keeps the session within its descriptor
budget. It never touches the socket: like the mirrors, it returns
``Answer``s (and the Opened frame of an open) for the session to send.

When they are published is ``groupcommit.GroupCommit``'s call; ``commit``
publishes everything or only the live files (each fsynced on its own, so
bulk data being written is not flushed with them).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections.abc import Callable

from . import frames as F
from . import transfer, xattrs
from .checkqueue import CheckQueue
from .config import Config
from .conflicts import Base
from .errors import Refused, RemoteProtocolError, SinkError
from .inbox import PartialFile
from .manifest import Preserve
from .owners import OwnerMap
from .receiving import OP_FDS, Answer, ReceivingMirror, admit
from .stats import SessionStats
from .xattrs import Pending

log = logging.getLogger(__name__)

#: Opens a session may have refused (unknown or forbidden mirrors) before
#: the connection is closed: each one is logged.
MAX_REFUSED_OPENS = 32


class Inbound:
    """The mirrors ``peer`` opened on one connection (see module docstring)."""

    def __init__(
        self,
        cfg: Config,
        peer: str,
        stats: SessionStats,
        marker_ok: Callable[[str], bool],
        peer_state: Callable[[str, bytes], Base],
        fixed_fds: Callable[[], int],
        fd_budget: int,
    ) -> None:
        self.cfg = cfg
        self.peer = peer
        self.stats = stats
        self.marker_ok = marker_ok
        self.peer_state = peer_state
        #: Descriptors the session holds outside the mirrors (socket, pipe).
        self.fixed_fds = fixed_fds
        self.fd_budget = fd_budget
        self.mirrors: dict[int, ReceivingMirror] = {}
        #: The mirror of each file operation in flight: Chunk, End and
        #: Abort name only the operation.
        self.ops: dict[int, ReceivingMirror] = {}
        #: Mirror names this connection asked to open (each may be asked once).
        self._open_names: set[str] = set()
        self._open_refused = 0
        #: Where the current chunk's payload goes (None: drained).
        self._target: tuple[ReceivingMirror, PartialFile] | None = None
        #: Answers of a commit made while opening a mirror (make_room).
        self._freed: list[Answer] = []
        #: Scrub checks being answered, a slice at a time.
        self.checks = CheckQueue()
        #: The peer's users and groups by name (owners.py).
        self.owners = OwnerMap(peer)
        #: Extended attributes sent for the next operation (xattrs.py).
        self.xattrs = Pending()
        #: The peer asked for the namespace operations applied (``nudge``).
        self._nudged = False

    # -- mirrors -------------------------------------------------------------

    def open(self, ev: F.Open) -> tuple[list[Answer], F.Opened, Refused | None]:
        """Open a mirror the peer may push into (receiving.admit): each name
        once per connection, within the descriptor budget. Returns the
        answers of a commit made to free descriptors, the Opened frame to
        send and, if refused, why (for the log)."""
        if ev.name in self._open_names:
            raise RemoteProtocolError(
                F.ErrorCode.UNEXPECTED,
                f"mirror {ev.name!r} was already opened on this connection (a peer opens "
                "each mirror once)",
            )
        self._open_names.add(ev.name)
        self._freed = []
        try:
            m = admit(
                self.cfg,
                ev.name,
                self.peer,
                self.stats,
                self.marker_ok,
                self.make_room,
                self.peer_state,
            )
        except Refused as r:
            self._open_refused += 1
            if self._open_refused > MAX_REFUSED_OPENS:
                raise RemoteProtocolError(
                    F.ErrorCode.LIMIT,
                    f"more than {MAX_REFUSED_OPENS} mirrors refused on this connection",
                ) from None
            return self._freed, F.Opened(ev.mirror, r.code, 0, r.message), r
        self.mirrors[ev.mirror] = m
        self.stats.mirrors.append(ev.name)
        return self._freed, F.Opened(ev.mirror, 0, m.inbox.preserve & ~Preserve.HARDLINKS, ""), None

    def mirror(self, mid: int) -> ReceivingMirror:
        return self.mirrors[mid]  # the protocol checked the id is open

    # -- operations ----------------------------------------------------------

    def begin(self, ev: F.File) -> list[Answer]:
        m = self.mirror(ev.mirror)
        if m.owner_names:
            ev = self.owners.map_in(ev)
        live = bool(ev.mode & F.FILE_LIVE)
        if live:
            ev = dataclasses.replace(ev, mode=ev.mode & ~F.FILE_LIVE)
        attrs = self.xattrs.take()
        out = self.fit_fd_budget()
        self.ops[ev.op] = m
        out += m.begin(ev)
        p = m.files.get(ev.op)
        if p is not None:
            p.live = live
            if m.inbox.preserve & xattrs.ANY:
                p.xattrs = attrs
        return out

    def xattr(self, ev: F.Xattr) -> None:
        """An extended attribute of the next operation's entry (xattrs.py)."""
        complaint = self.xattrs.add(ev)
        if complaint is not None:
            raise RemoteProtocolError(F.ErrorCode.TOO_LARGE, complaint)

    def end(self, op: int, digest: bytes) -> list[Answer]:
        m = self.ops.get(op)
        if m is None:
            return []
        out = m.end(op, digest)
        if op not in m.files:  # published (or refused); a Want keeps it open
            del self.ops[op]
        return out

    def verifying(self) -> bool:
        """Files wait to be judged against their block maps (verifying.py)."""
        return any(m.verifier.waiting for m in self.mirrors.values())

    def verify_step(self) -> list[Answer]:
        """Hash a slice of a file waiting to be judged; the answers of those judged."""
        out: list[Answer] = []
        for m in self.mirrors.values():
            if m.verifier.waiting:
                out += m.verify_step()
        for op in [op for op, m in self.ops.items() if op not in m.files]:
            del self.ops[op]
        return out

    def hole(self, ev: F.Hole) -> list[Answer]:
        """A hole of a sparse file: the partial is extended over it, nothing
        is written (the replica stays sparse)."""
        target = self._file(ev.op)
        if target is None:
            return []
        m, p = target
        try:
            os.ftruncate(p.fd, ev.offset + ev.length)
        except OSError as e:
            return m.fail(p, e)
        self.stats.hole_bytes += ev.length
        return m.wrote(p, ev.length)

    def copy(self, ev: F.Copy) -> list[Answer]:
        """A delta's range that is unchanged: copy it from the published file."""
        target = self._file(ev.op)
        if target is None:
            return []  # refused or failed: nothing to copy into
        m, p = target
        assert p.delta_base is not None  # the protocol allows Copy only in deltas
        try:
            transfer.copy_range(p.delta_base.fd, p.fd, ev.offset, ev.length)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                return m.fail(p, e)
            return m.base_failed(p, e)
        m.copied(p, ev.length)
        return m.wrote(p, ev.length)

    def blocks(self, ev: F.Blocks) -> None:
        """Block digests of the sender's map (the protocol checked their order)."""
        target = self._file(ev.op)
        if target is not None and target[1].theirs is not None:
            target[1].theirs += ev.digests

    def _file(self, op: int) -> tuple[ReceivingMirror, PartialFile] | None:
        """The mirror and partial file of ``op`` (None: refused or failed)."""
        m = self.ops.get(op)
        p = None if m is None else m.files.get(op)
        return None if m is None or p is None else (m, p)

    def abort(self, op: int) -> None:
        m = self.ops.pop(op, None)
        if m is not None:
            m.abort(op)

    def namespace(
        self, ev: F.Mkdir | F.Symlink | F.Meta | F.Delete | F.Rename | F.HardLink
    ) -> list[Answer]:
        m = self.mirror(ev.mirror)
        if m.owner_names:
            ev = self.owners.map_in(ev)
        attrs = self.xattrs.take()
        keep = m.inbox.preserve & xattrs.ANY and isinstance(ev, F.Mkdir | F.Meta)
        return self.fit_fd_budget() + m.namespace(ev, attrs if keep else None)

    # -- payload -------------------------------------------------------------

    def chunk(self, ev: F.Chunk) -> None:
        """A Chunk starts: its payload goes to its file at its offset (or is
        drained, if the file failed or was refused)."""
        self._target = target = self._file(ev.op)
        if target is not None and target[1].mend_at is not None:
            target[1].mend_at = ev.offset  # a range asked for again (Want)

    def write_inline(self, data: bytes) -> list[Answer]:
        """Payload that arrived with its header, already in Python."""
        target = self._target
        if target is None:
            return []
        m, p = target
        at = p.written if p.mend_at is None else p.mend_at
        try:
            p.hash_inline(at, data)
            transfer.write_inline(p.fd, data, at)
        except OSError as e:
            return self._fail(m, p, e)
        return self._wrote(m, p, len(data))

    def splice(self, splicer: transfer.Splicer, n: int) -> list[Answer]:
        """``n`` payload bytes socket → pipe → file (drained if no target)."""
        target = self._target
        if target is None:
            splicer.discard(n)
            return []
        m, p = target
        try:
            splicer.to_file(p.fd, p.written if p.mend_at is None else p.mend_at, n)
        except SinkError as e:
            return self._fail(m, p, e)
        return self._wrote(m, p, n)

    def _wrote(self, m: ReceivingMirror, p: PartialFile, n: int) -> list[Answer]:
        self.stats.payload_bytes_received += n
        answers = m.wrote(p, n)
        if answers:  # the file failed
            self._target = None
        return answers

    def _fail(self, m: ReceivingMirror, p: PartialFile, e: OSError) -> list[Answer]:
        self._target = None
        return m.fail(p, e)

    # -- publishing ----------------------------------------------------------

    def pending(self) -> tuple[int, int, int]:
        """Operations, bytes and live ones (live files; the namespace
        operations applied, once the peer asked for them: ``nudge``)
        waiting for a commit round."""
        pubs = [m.publisher for m in self.mirrors.values()]
        live = sum(p.pending_live for p in pubs)
        if self._nudged:
            live += sum(p.pending_ops for p in pubs)
        return sum(p.pending for p in pubs), sum(p.pending_bytes for p in pubs), live

    def nudge(self) -> None:
        """The peer asks for what it sent so far (a Ping): the namespace
        operations applied count as live until the next commit. Its live
        lane sends one after its namespace operations (an rm, a mkdir),
        which carry no live flag of their own."""
        self._nudged = any(m.publisher.pending_ops for m in self.mirrors.values())

    def commit(self, live_only: bool = False) -> list[Answer]:
        """Publish what is pending; ``live_only``: only the live files and
        the namespace operations applied, while bulk files are being
        received or wait (else there is nothing to keep apart and one round
        for all is cheapest)."""
        self._nudged = False
        alone = live_only and any(m.bulk_under_way() for m in self.mirrors.values())
        out: list[Answer] = []
        for m in self.mirrors.values():
            out += m.commit(alone)
        return out

    def close(self) -> None:
        self.checks.close()
        # Complete files are still worth publishing: the sender will see them
        # in the next manifest and not send them again.
        for m in self.mirrors.values():
            try:
                m.commit()  # nobody left to answer
            except Exception:
                log.exception("publishing complete files of %s after the connection ended", m.name)
        for m in self.mirrors.values():
            m.close()
        self.ops.clear()

    # -- descriptors ---------------------------------------------------------

    def fds_held(self) -> int:
        """Descriptors held by the session (see session.SESSION_FDS)."""
        return self.fixed_fds() + sum(len(m.files) + m.fds_held() for m in self.mirrors.values())

    def make_room(self, need: int) -> str | None:
        """Free descriptors so that ``need`` more fit the budget, or say why
        they do not (admit calls this; open() returns what a commit said)."""
        if self.fds_held() + need > self.fd_budget:
            self._freed += self._release_fds()
        if self.fds_held() + need > self.fd_budget:
            return (
                f"this connection already holds {self.fds_held()} of its {self.fd_budget} "
                f"file descriptors ({len(self.mirrors)} mirrors open)"
            )
        return None

    def fit_fd_budget(self) -> list[Answer]:
        """Called before an operation that may open files: commits what is
        pending if the budget is tight (its answers are returned)."""
        if self.fds_held() + OP_FDS > self.fd_budget:
            return self._release_fds()
        return []

    def _release_fds(self) -> list[Answer]:
        """Commit what is pending and drop cached directories: afterwards the
        session holds only its socket, pipe, mirrors and files in flight."""
        out = self.commit()
        for m in self.mirrors.values():
            m.release_fds()
        return out
