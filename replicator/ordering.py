"""What may flow on an established connection, per role (docs/protocol.md
§7, §8): which frames each side sends, which mirrors are open, which files
are in flight and where their next Chunk starts, which operations await an
answer, and the limits on all of these.

One object per connection keeps that bookkeeping for its role:
``InitiatorRules`` (the sender of mirrors) and ``AcceptorRules`` (the
receiver). ``received(ev)`` checks a frame from the peer and
``sending(ev)`` one of ours, update the bookkeeping and return the payload
bytes that follow the frame (a Chunk's length, else 0). A peer that breaks a
rule raises ``RemoteProtocolError``, a frame we may not send
``LocalProtocolError``; ``sending`` changes nothing when it raises.

Only frames of the established phase pass here, plus Error, which may come
at any time; ``protocol.Connection`` owns the handshake, the bytes, the tags
and the payload counters. No sockets, no os.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import frames as F
from .errors import LocalProtocolError, RemoteProtocolError

#: Frames the acceptor receives (and the initiator sends) once established.
ACCEPTOR_RECEIVES: frozenset[type[F.Event]] = frozenset(
    {
        F.Open,
        F.List,
        F.File,
        F.Chunk,
        F.End,
        F.Abort,
        F.Mkdir,
        F.Symlink,
        F.Delete,
        F.Rename,
        F.Meta,
        F.Ping,
        F.Pong,
        F.Error,
    }
)
#: Frames the initiator receives (and the acceptor sends) once established.
INITIATOR_RECEIVES: frozenset[type[F.Event]] = frozenset(
    {F.Opened, F.Entry, F.Partial, F.ListEnd, F.Ack, F.Ping, F.Pong, F.Error}
)


@dataclass
class OpenFile:
    """A file begun (File) and not yet ended (End/Abort)."""

    size: int
    next_offset: int


class InitiatorRules:
    """The sender's bookkeeping: mirrors it opened, files it is sending,
    operations it sent and that were not answered yet."""

    def __init__(self) -> None:
        #: Mirror ids we sent Open for.
        self.mirrors: set[int] = set()
        #: Files we began, by operation id.
        self.files: dict[int, OpenFile] = {}
        #: Operations sent, not yet acknowledged or refused.
        self.unacked: set[int] = set()

    def sending(self, ev: F.Event) -> int:
        """Check and record a frame we send; the payload bytes we then owe."""
        if type(ev) not in ACCEPTOR_RECEIVES:
            raise LocalProtocolError(f"the initiator does not send {type(ev).__name__}")
        match ev:
            case F.Chunk():
                f = self.files.get(ev.op)
                if f is None or ev.offset != f.next_offset or ev.offset + ev.length > f.size:
                    raise LocalProtocolError(f"Chunk {ev} does not continue its file")
                if not 0 < ev.length <= F.MAX_CHUNK:
                    raise LocalProtocolError(f"Chunk length {ev.length}")
                f.next_offset += ev.length
                return ev.length
            case F.File():
                if len(self.files) >= F.MAX_OPEN_FILES:
                    raise LocalProtocolError("too many open files")
                self._new_op(ev.op)
                self.files[ev.op] = OpenFile(ev.size, ev.offset)
            case F.End():
                f = self.files.get(ev.op)
                if f is None or f.next_offset != f.size:
                    raise LocalProtocolError(f"End of incomplete file {ev.op}")
                del self.files[ev.op]
            case F.Abort():
                if self.files.pop(ev.op, None) is None:
                    raise LocalProtocolError(f"Abort of file {ev.op} that is not open")
                self.unacked.discard(ev.op)
            case F.Mkdir() | F.Symlink() | F.Delete() | F.Rename() | F.Meta():
                self._new_op(ev.op)
            case F.Open():
                self.mirrors.add(ev.mirror)
        return 0

    def _new_op(self, op: int) -> None:
        if op in self.unacked:
            raise LocalProtocolError(f"operation id {op} in use")
        self.unacked.add(op)

    def received(self, ev: F.Event) -> int:
        """Check and record a frame from the acceptor (never followed by payload)."""
        if type(ev) not in INITIATOR_RECEIVES:
            raise RemoteProtocolError(
                F.ErrorCode.UNEXPECTED,
                f"{type(ev).__name__} is not allowed here (we are initiator)",
            )
        match ev:
            case F.Ack():
                if ev.op not in self.unacked:
                    raise RemoteProtocolError(
                        F.ErrorCode.UNEXPECTED, f"Ack for unknown operation {ev.op}"
                    )
                self.unacked.discard(ev.op)
            case F.Opened():
                if ev.mirror not in self.mirrors:
                    raise RemoteProtocolError(
                        F.ErrorCode.UNEXPECTED, f"Opened for unknown mirror {ev.mirror}"
                    )
            case F.Error():
                # A refusal answers its operation; a fatal Error ends it all.
                if not ev.fatal and ev.op:
                    self.unacked.discard(ev.op)
        return 0


class AcceptorRules:
    """The receiver's bookkeeping: mirrors it accepted, files it is
    receiving, operations it received and has not answered yet."""

    def __init__(self) -> None:
        #: Mirror ids we answered with a successful Opened.
        self.mirrors: set[int] = set()
        #: Files begun by the sender, by operation id.
        self.files: dict[int, OpenFile] = {}
        #: Operations received, not yet acknowledged or refused.
        self.unacked: set[int] = set()

    def received(self, ev: F.Event) -> int:
        """Check and record a frame from the initiator; the payload bytes
        that follow it."""
        t = type(ev)
        if t not in ACCEPTOR_RECEIVES:
            raise RemoteProtocolError(
                F.ErrorCode.UNEXPECTED, f"{t.__name__} is not allowed here (we are acceptor)"
            )
        match ev:
            case F.Chunk():
                return self._chunk(ev)
            case F.File():
                self._in_open_mirror(t, ev.mirror)
                self._new_op(ev.op)
                if len(self.files) >= F.MAX_OPEN_FILES:
                    raise RemoteProtocolError(
                        F.ErrorCode.LIMIT, f"more than {F.MAX_OPEN_FILES} files in flight"
                    )
                if ev.offset > ev.size:
                    raise RemoteProtocolError(F.ErrorCode.MALFORMED, "File offset beyond its size")
                self.files[ev.op] = OpenFile(ev.size, ev.offset)
            case F.End():
                f = self.files.pop(ev.op, None)
                if f is None or f.next_offset != f.size:
                    raise RemoteProtocolError(
                        F.ErrorCode.UNEXPECTED, f"End of file {ev.op} that is not complete"
                    )
            case F.Abort():
                if self.files.pop(ev.op, None) is None:
                    raise RemoteProtocolError(
                        F.ErrorCode.UNEXPECTED, f"Abort of file {ev.op}, not open"
                    )
                self.unacked.discard(ev.op)  # an aborted file needs no answer
            case F.Mkdir() | F.Symlink() | F.Delete() | F.Rename() | F.Meta():
                self._in_open_mirror(t, ev.mirror)
                self._new_op(ev.op)
            case F.List():
                self._in_open_mirror(t, ev.mirror)
            case F.Open():
                if ev.mirror in self.mirrors:
                    raise RemoteProtocolError(F.ErrorCode.UNEXPECTED, "mirror id opened twice")
        return 0

    def _chunk(self, ev: F.Chunk) -> int:
        f = self.files.get(ev.op)
        if f is None:
            raise RemoteProtocolError(F.ErrorCode.UNEXPECTED, f"Chunk for file {ev.op}, not open")
        if ev.length == 0 or ev.length > F.MAX_CHUNK:
            raise RemoteProtocolError(
                F.ErrorCode.TOO_LARGE, f"Chunk of {ev.length} bytes (1..{F.MAX_CHUNK})"
            )
        if ev.offset != f.next_offset or ev.offset + ev.length > f.size:
            raise RemoteProtocolError(
                F.ErrorCode.UNEXPECTED,
                f"Chunk {ev.offset}+{ev.length} of file {ev.op}: expected offset "
                f"{f.next_offset}, size {f.size}",
            )
        f.next_offset += ev.length
        return ev.length

    def _in_open_mirror(self, t: type[F.Event], mirror: int) -> None:
        if mirror not in self.mirrors:
            raise RemoteProtocolError(
                F.ErrorCode.UNEXPECTED, f"{t.__name__} for mirror id {mirror}, which is not open"
            )

    def _new_op(self, op: int) -> None:
        if op == 0:
            raise RemoteProtocolError(F.ErrorCode.MALFORMED, "operation id 0 is reserved")
        if op in self.unacked:
            raise RemoteProtocolError(F.ErrorCode.UNEXPECTED, f"operation id {op} reused")
        if len(self.unacked) >= F.MAX_UNACKED:
            raise RemoteProtocolError(
                F.ErrorCode.LIMIT, f"more than {F.MAX_UNACKED} unacknowledged operations"
            )
        self.unacked.add(op)

    def sending(self, ev: F.Event) -> int:
        """Check and record a frame we send (never followed by payload)."""
        if type(ev) not in INITIATOR_RECEIVES:
            raise LocalProtocolError(f"the acceptor does not send {type(ev).__name__}")
        match ev:
            case F.Ack():
                self.unacked.discard(ev.op)
            case F.Opened():
                if ev.code == 0:
                    self.mirrors.add(ev.mirror)
            case F.Error():
                # Refusing an operation answers it.
                if not ev.fatal and ev.op:
                    self.unacked.discard(ev.op)
        return 0
