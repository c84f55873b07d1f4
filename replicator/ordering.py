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

from collections.abc import Callable
from dataclasses import dataclass

from . import frames as F
from .blockmap import DIGEST_SIZE, MAX_BLOCK, MIN_BLOCK
from .errors import LocalProtocolError, RemoteProtocolError

#: Frames the acceptor receives (and the initiator sends) once established.
ACCEPTOR_RECEIVES: frozenset[type[F.Event]] = frozenset(
    {
        F.Open,
        F.List,
        F.File,
        F.Chunk,
        F.Copy,
        F.Hole,
        F.Blocks,
        F.End,
        F.Abort,
        F.Mkdir,
        F.Symlink,
        F.Delete,
        F.Rename,
        F.Meta,
        F.HardLink,
        F.Check,
        F.Owner,
        F.Xattr,
        F.Ping,
        F.Pong,
        F.Error,
    }
)
#: Frames the initiator receives (and the acceptor sends) once established.
INITIATOR_RECEIVES: frozenset[type[F.Event]] = frozenset(
    {
        F.Opened,
        F.Entry,
        F.Partial,
        F.ListEnd,
        F.Ack,
        F.Want,
        F.Checked,
        F.Ping,
        F.Pong,
        F.Error,
    }
)


@dataclass
class OpenFile:
    """A file begun (File) and not yet ended (End/Abort), or ended and sent
    again in part (Want)."""

    size: int
    next_offset: int
    algo: int
    block_size: int
    #: A delta (File.base set): Copy frames may fill ranges.
    delta: bool = False
    #: Block digests received so far (Blocks frames, in order).
    blocks: int = 0
    #: Sent again after a Want: the ranges still due, in order (None: the
    #: first pass).
    mend: list[tuple[int, int]] | None = None

    @property
    def count(self) -> int:
        return -(-self.size // self.block_size)


class _Files:
    """Rules of file exchanges, the same for both ends; ``err`` makes the
    exception to raise (Local for our frames, Remote for the peer's)."""

    def __init__(self, err: Callable[[F.ErrorCode, str], Exception]) -> None:
        self.err = err
        #: Files begun, by operation id.
        self.open: dict[int, OpenFile] = {}
        #: Files ended and not yet answered (a Want may reopen them).
        self.ended: dict[int, OpenFile] = {}

    def begin(self, ev: F.File) -> None:
        # Files sent again after a Want do not count: the two ends would
        # count differently while a Want and a File cross.
        if sum(f.mend is None for f in self.open.values()) >= F.MAX_OPEN_FILES:
            raise self.err(F.ErrorCode.LIMIT, f"more than {F.MAX_OPEN_FILES} files in flight")
        if ev.offset > ev.size:
            raise self.err(F.ErrorCode.MALFORMED, "File offset beyond its size")
        dsize = DIGEST_SIZE.get(ev.algo)
        if dsize is None:
            raise self.err(F.ErrorCode.MALFORMED, f"File: unknown digest algorithm {ev.algo}")
        if not MIN_BLOCK <= ev.block_size <= MAX_BLOCK:
            raise self.err(
                F.ErrorCode.MALFORMED,
                f"File: block size {ev.block_size} outside {MIN_BLOCK}..{MAX_BLOCK}",
            )
        if ev.base and len(ev.base) != dsize:
            raise self.err(F.ErrorCode.MALFORMED, f"File: base digest of {len(ev.base)} bytes")
        self.open[ev.op] = OpenFile(ev.size, ev.offset, ev.algo, ev.block_size, bool(ev.base))

    def _get(self, op: int, what: str) -> OpenFile:
        f = self.open.get(op)
        if f is None:
            raise self.err(F.ErrorCode.UNEXPECTED, f"{what} for file {op}, not open")
        return f

    def chunk(self, ev: F.Chunk) -> int:
        f = self._get(ev.op, "Chunk")
        if ev.length == 0 or ev.length > F.MAX_CHUNK:
            raise self.err(F.ErrorCode.TOO_LARGE, f"Chunk of {ev.length} bytes (1..{F.MAX_CHUNK})")
        if f.mend is not None:
            if not f.mend or ev.offset != f.mend[0][0] or ev.length > f.mend[0][1]:
                due = f.mend[0] if f.mend else None
                raise self.err(
                    F.ErrorCode.UNEXPECTED,
                    f"Chunk {ev.offset}+{ev.length} of file {ev.op}: the range due is {due}",
                )
            off, n = f.mend[0]
            if ev.length == n:
                f.mend.pop(0)
            else:
                f.mend[0] = (off + ev.length, n - ev.length)
            return ev.length
        self._advance(f, ev.op, ev.offset, ev.length, "Chunk")
        return ev.length

    def _advance(self, f: OpenFile, op: int, offset: int, length: int, what: str) -> None:
        if offset != f.next_offset or offset + length > f.size:
            raise self.err(
                F.ErrorCode.UNEXPECTED,
                f"{what} {offset}+{length} of file {op}: expected offset "
                f"{f.next_offset}, size {f.size}",
            )
        f.next_offset += length

    def copy(self, ev: F.Copy) -> None:
        f = self._get(ev.op, "Copy")
        if not f.delta or f.mend is not None:
            raise self.err(F.ErrorCode.UNEXPECTED, f"Copy for file {ev.op}, which is no delta")
        if ev.length == 0:
            raise self.err(F.ErrorCode.MALFORMED, "Copy of 0 bytes")
        self._advance(f, ev.op, ev.offset, ev.length, "Copy")

    def hole(self, ev: F.Hole) -> None:
        f = self._get(ev.op, "Hole")
        if f.mend is not None or ev.length == 0:
            raise self.err(F.ErrorCode.UNEXPECTED, f"Hole {ev.offset}+{ev.length} of file {ev.op}")
        self._advance(f, ev.op, ev.offset, ev.length, "Hole")

    def blocks(self, ev: F.Blocks) -> None:
        f = self._get(ev.op, "Blocks")
        dsize = DIGEST_SIZE[f.algo]
        n, rest = divmod(len(ev.digests), dsize)
        if (
            f.mend is not None
            or f.next_offset != f.size
            or ev.first != f.blocks
            or not n
            or rest
            or f.blocks + n > f.count
        ):
            raise self.err(
                F.ErrorCode.UNEXPECTED,
                f"Blocks {ev.first}+{len(ev.digests)} bytes of file {ev.op}: expected "
                f"block {f.blocks} of {f.count} after all of its data",
            )
        f.blocks += n

    def end(self, ev: F.End) -> None:
        f = self._get(ev.op, "End")
        if f.mend is not None:  # a Want answered: every range sent again
            complete = not f.mend
        else:  # all data, and the block digests of a file of several blocks
            complete = f.next_offset == f.size and (f.count <= 1 or f.blocks == f.count)
        if not complete or len(ev.digest) != DIGEST_SIZE[f.algo]:
            raise self.err(
                F.ErrorCode.UNEXPECTED,
                f"End of file {ev.op} that is not complete (data to {f.next_offset} of "
                f"{f.size}, {f.blocks} of {f.count} block digests, "
                f"{len(ev.digest)}-byte digest)",
            )
        f.mend = None
        del self.open[ev.op]
        self.ended[ev.op] = f

    def abort(self, op: int) -> None:
        if self.open.pop(op, None) is None:
            raise self.err(F.ErrorCode.UNEXPECTED, f"Abort of file {op}, not open")

    def want(self, ev: F.Want) -> None:
        f = self.ended.get(ev.op)
        if f is None:
            raise self.err(F.ErrorCode.UNEXPECTED, f"Want for file {ev.op}, not ended")
        try:
            ranges = F.unpack_ranges(ev.ranges)
        except F.FrameError as e:
            raise self.err(e.code, str(e)) from None
        end = 0
        for off, n in ranges:
            if n == 0 or off < end or off + n > f.size:
                raise self.err(
                    F.ErrorCode.MALFORMED,
                    f"Want of file {ev.op}: range {off}+{n} (ranges ascend, within {f.size} bytes)",
                )
            end = off + n
        del self.ended[ev.op]
        f.mend = ranges
        self.open[ev.op] = f

    def answered(self, op: int) -> None:
        self.ended.pop(op, None)
        self.open.pop(op, None)


class _Checks:
    """Checks (scrub) awaiting their Checked frames, the same for both ends."""

    def __init__(self, err: Callable[[F.ErrorCode, str], Exception]) -> None:
        self.err = err
        #: op -> [digest size, block size, file size (-1: unknown yet), digests so far]
        self.pending: dict[int, list[int]] = {}

    def begin(self, ev: F.Check) -> None:
        dsize = DIGEST_SIZE.get(ev.algo)
        if dsize is None or not MIN_BLOCK <= ev.block_size <= MAX_BLOCK:
            raise self.err(
                F.ErrorCode.MALFORMED, f"Check: algorithm {ev.algo}, block size {ev.block_size}"
            )
        self.pending[ev.op] = [dsize, ev.block_size, -1, 0]

    def checked(self, ev: F.Checked) -> bool:
        """Record one Checked frame; True once its Check is answered."""
        c = self.pending.get(ev.op)
        if c is None:
            raise self.err(F.ErrorCode.UNEXPECTED, f"Checked for operation {ev.op}, no Check")
        dsize, bs, size, got = c
        n, rest = divmod(len(ev.digests), dsize)
        count = -(-ev.size // bs)
        if (
            rest
            or (size >= 0 and ev.size != size)
            or ev.first != got
            or got + n > count
            or (not n and count)
        ):
            raise self.err(
                F.ErrorCode.UNEXPECTED,
                f"Checked {ev.first}+{len(ev.digests)} bytes of operation {ev.op}: expected "
                f"block {got} of a {ev.size}-byte file",
            )
        c[2], c[3] = ev.size, got + n
        if got + n == count:
            del self.pending[ev.op]
            return True
        return False


def _local(code: F.ErrorCode, msg: str) -> Exception:
    return LocalProtocolError(msg)


class InitiatorRules:
    """The sender's bookkeeping: mirrors it opened, files it is sending,
    operations it sent and that were not answered yet."""

    def __init__(self) -> None:
        #: Mirror ids we sent Open for.
        self.mirrors: set[int] = set()
        self._files = _Files(_local)
        self._checks = _Checks(RemoteProtocolError)
        #: Operations sent, not yet acknowledged or refused.
        self.unacked: set[int] = set()

    @property
    def files(self) -> dict[int, OpenFile]:
        """Files we began (or were asked for again) and did not end."""
        return self._files.open

    def sending(self, ev: F.Event) -> int:
        """Check and record a frame we send; the payload bytes we then owe."""
        if type(ev) not in ACCEPTOR_RECEIVES:
            raise LocalProtocolError(f"the initiator does not send {type(ev).__name__}")
        files = self._files
        match ev:
            case F.Chunk():
                return files.chunk(ev)
            case F.File():
                if ev.op in self.unacked:
                    raise LocalProtocolError(f"operation id {ev.op} in use")
                files.begin(ev)
                self.unacked.add(ev.op)
            case F.Copy():
                files.copy(ev)
            case F.Hole():
                files.hole(ev)
            case F.Blocks():
                files.blocks(ev)
            case F.End():
                files.end(ev)
                if ev.op not in self.unacked:  # refused while we sent it
                    files.ended.pop(ev.op, None)
            case F.Abort():
                files.abort(ev.op)
                files.answered(ev.op)
                self.unacked.discard(ev.op)
            case F.Mkdir() | F.Symlink() | F.Delete() | F.Rename() | F.Meta() | F.HardLink():
                if ev.op in self.unacked:
                    raise LocalProtocolError(f"operation id {ev.op} in use")
                self.unacked.add(ev.op)
            case F.Check():
                if ev.op in self.unacked:
                    raise LocalProtocolError(f"operation id {ev.op} in use")
                try:
                    self._checks.begin(ev)
                except RemoteProtocolError as e:
                    raise LocalProtocolError(str(e)) from None
                self.unacked.add(ev.op)
            case F.Open():
                self.mirrors.add(ev.mirror)
        return 0

    def received(self, ev: F.Event) -> int:
        """Check and record a frame from the acceptor (never followed by payload)."""
        if type(ev) not in INITIATOR_RECEIVES:
            raise RemoteProtocolError(
                F.ErrorCode.UNEXPECTED,
                f"{type(ev).__name__} is not allowed here (we are initiator)",
            )
        match ev:
            case F.Ack():
                if (
                    ev.op not in self.unacked
                    or ev.op in self._files.open
                    or ev.op in self._checks.pending
                ):
                    raise RemoteProtocolError(
                        F.ErrorCode.UNEXPECTED, f"Ack for unknown or unfinished operation {ev.op}"
                    )
                self.unacked.discard(ev.op)
                self._files.answered(ev.op)
            case F.Checked():
                if self._checks.checked(ev):
                    self.unacked.discard(ev.op)
            case F.Want():
                if ev.op not in self.unacked:
                    raise RemoteProtocolError(
                        F.ErrorCode.UNEXPECTED, f"Want for unknown operation {ev.op}"
                    )
                try:
                    self._files.want(ev)
                except LocalProtocolError as e:
                    raise RemoteProtocolError(F.ErrorCode.UNEXPECTED, str(e)) from None
            case F.Opened():
                if ev.mirror not in self.mirrors:
                    raise RemoteProtocolError(
                        F.ErrorCode.UNEXPECTED, f"Opened for unknown mirror {ev.mirror}"
                    )
            case F.Error():
                # A refusal answers its operation; a fatal Error ends it all.
                if not ev.fatal and ev.op:
                    self.unacked.discard(ev.op)
                    self._files.ended.pop(ev.op, None)
                    self._checks.pending.pop(ev.op, None)
        return 0


class AcceptorRules:
    """The receiver's bookkeeping: mirrors it accepted, files it is
    receiving, operations it received and has not answered yet."""

    def __init__(self) -> None:
        #: Mirror ids we answered with a successful Opened.
        self.mirrors: set[int] = set()
        self._files = _Files(RemoteProtocolError)
        self._checks = _Checks(_local)
        #: Operations received, not yet acknowledged or refused.
        self.unacked: set[int] = set()

    @property
    def files(self) -> dict[int, OpenFile]:
        """Files begun by the sender (or asked for again) and not ended."""
        return self._files.open

    def received(self, ev: F.Event) -> int:
        """Check and record a frame from the initiator; the payload bytes
        that follow it."""
        t = type(ev)
        if t not in ACCEPTOR_RECEIVES:
            raise RemoteProtocolError(
                F.ErrorCode.UNEXPECTED, f"{t.__name__} is not allowed here (we are acceptor)"
            )
        files = self._files
        match ev:
            case F.Chunk():
                return files.chunk(ev)
            case F.File():
                self._in_open_mirror(t, ev.mirror)
                self._new_op(ev.op)
                files.begin(ev)
            case F.Copy():
                files.copy(ev)
            case F.Hole():
                files.hole(ev)
            case F.Blocks():
                files.blocks(ev)
            case F.End():
                files.end(ev)
                if ev.op not in self.unacked:  # refused mid-flight: nothing more to say
                    files.ended.pop(ev.op, None)
            case F.Abort():
                files.abort(ev.op)
                files.answered(ev.op)
                self.unacked.discard(ev.op)  # an aborted file needs no answer
            case F.Mkdir() | F.Symlink() | F.Delete() | F.Rename() | F.Meta() | F.HardLink():
                self._in_open_mirror(t, ev.mirror)
                self._new_op(ev.op)
            case F.Check():
                self._in_open_mirror(t, ev.mirror)
                try:
                    self._checks.begin(ev)
                except LocalProtocolError as e:
                    raise RemoteProtocolError(F.ErrorCode.MALFORMED, str(e)) from None
                self._new_op(ev.op)
            case F.List():
                self._in_open_mirror(t, ev.mirror)
            case F.Open():
                if ev.mirror in self.mirrors:
                    raise RemoteProtocolError(F.ErrorCode.UNEXPECTED, "mirror id opened twice")
        return 0

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
                if ev.op in self._files.open or ev.op in self._checks.pending:
                    raise LocalProtocolError(f"Ack of operation {ev.op}, which is not finished")
                self.unacked.discard(ev.op)
                self._files.answered(ev.op)
            case F.Checked():
                if self._checks.checked(ev):
                    self.unacked.discard(ev.op)
            case F.Want():
                if ev.op not in self.unacked:
                    raise LocalProtocolError(f"Want for operation {ev.op}, not awaiting an answer")
                try:
                    self._files.want(ev)
                except RemoteProtocolError as e:
                    raise LocalProtocolError(str(e)) from None
            case F.Opened():
                if ev.code == 0:
                    self.mirrors.add(ev.mirror)
            case F.Error():
                # Refusing an operation answers it (a file still open is
                # drained until the sender's End or Abort).
                if not ev.fatal and ev.op:
                    self.unacked.discard(ev.op)
                    self._files.ended.pop(ev.op, None)
                    self._checks.pending.pop(ev.op, None)
        return 0
