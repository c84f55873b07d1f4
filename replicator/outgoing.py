"""A file being sent: its whole exchange, File → Chunk… → End or Abort.

The link decides *what* to send; ``FileSend`` owns *how* one file goes out:
it opens the source through the directory its confined lookup found, picks
the resume offset from the peer's partial, builds the ``File`` frame, sends
Chunk headers framed by the protocol and payload by ``transfer.send_range``
(sendfile), filler if the file shrank mid-chunk, re-checks the source before
``End`` — zero-copy shares pages rather than snapshotting them, so a write
that lands after sendfile returned may still have reached the wire — and
says how it ended (``End``, or ``Abort`` with its reason). It counts its own
bytes; the link keeps the totals.
"""

from __future__ import annotations

import enum
import os
import socket
import stat
import struct
from dataclasses import dataclass

from . import frames as F
from . import transfer
from .backlog import Key
from .fd import OwnedFd
from .paths import Located
from .protocol import Connection

#: Payload bytes per Chunk frame. Bigger chunks cost fewer headers and peeks
#: (measured: 0.95 vs 1.03 CPU-s/GiB for 8 vs 1 MiB); smaller ones let small
#: files through sooner (4 MiB ≈ 4 ms on the wire at 1 GB/s).
CHUNK = 4 << 20


def version_of(st: os.stat_result) -> bytes:
    """Identifies one version of a source file: resume only if it is unchanged."""
    return struct.pack("!QQQqq", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def changed(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns) != (
        b.st_ino,
        b.st_size,
        b.st_mtime_ns,
        b.st_ctime_ns,
    )


class Step(enum.Enum):
    #: A chunk went out; more to come.
    MORE = "more"
    #: The last chunk went out and the source is unchanged: send End.
    DONE = "done"
    #: The source changed or shrank: send Abort.
    CHANGED = "changed"
    #: The source vanished or became unreadable: send Abort.
    GONE = "gone"


@dataclass
class FileSend:
    op: int
    key: Key
    mirror: str
    #: where the file was found: its directory stays open until the end
    found: Located
    #: the source file, open until ``close``
    file: OwnedFd
    st: os.stat_result
    offset: int
    since: float
    #: Where it started (a resume skips the bytes the peer already holds).
    start: int = 0
    #: Payload bytes this exchange put on the wire (filler included).
    payload_sent: int = 0
    #: Frame bytes (headers of this file's frames) queued so far.
    frame_bytes: int = 0

    @classmethod
    def begin(
        cls,
        op: int,
        mirror_id: int,
        mirror: str,
        key: Key,
        found: Located,
        since: float,
        held: F.Partial | None = None,
    ) -> tuple[FileSend, F.File] | None:
        """Open the source ``found`` (confined: ``paths.Source.locate`` found
        it without following symlinks) and make the ``File`` frame that
        starts the exchange, at the peer's partial ``held`` when it is of
        this very version. None if the file is gone or not a regular file
        any more (look at it again); OSError if it cannot be read. Takes
        ``found``'s directory fd on success."""
        opened = found.open_file()
        if opened is None:
            return None
        file, st = opened
        version = version_of(st)
        offset = 0
        if held is not None and held.version == version and 0 < held.held <= st.st_size:
            offset = held.held
        s = cls(op, key, mirror, found.take(), file, st, offset, since, start=offset)
        frame = F.File(
            op,
            mirror_id,
            offset,
            st.st_size,
            stat.S_IMODE(st.st_mode),
            st.st_mtime_ns,
            st.st_uid,
            st.st_gid,
            version,
            key[1],
        )
        return s, frame

    @property
    def fd(self) -> int:
        """The source file's fd; -1 once closed (the exchange ended)."""
        return self.file.fd

    @property
    def resumed(self) -> int:
        """Bytes not sent again because the peer held them."""
        return self.start

    @property
    def size(self) -> int:
        return self.st.st_size

    @property
    def left(self) -> int:
        return self.size - self.offset

    def close(self) -> None:
        self.file.close()
        self.found.close()

    def step(self, sock: socket.socket, conn: Connection, wbuf: bytearray) -> tuple[Step, int]:
        """Send the next chunk (``wbuf`` holds frames queued before it and is
        flushed first). Returns what happened and the payload bytes sent."""
        n = min(CHUNK, self.left)
        if n == 0:
            return self._verdict(), 0
        if self.offset and self.size > CHUNK and changed(self.st, os.fstat(self.fd)):
            return Step.CHANGED, 0  # a big file: notice a change early, not at the end
        header = conn.send(F.Chunk(self.op, self.offset, n))
        self.frame_bytes += len(header)
        wbuf += header
        sock.sendall(wbuf, socket.MSG_MORE)  # the header joins the payload's first segment
        wbuf.clear()
        sent = transfer.send_range(sock.fileno(), self.fd, self.offset, n)
        conn.payload_sent(sent)
        self.payload_sent += sent
        if sent < n:
            # The file shrank under us: keep the stream framed, then abort.
            transfer.send_filler(sock, n - sent)
            conn.payload_sent(n - sent)
            return Step.CHANGED, sent
        self.offset += n
        return (self._verdict() if self.left == 0 else Step.MORE), n

    def finish(self, step: Step) -> F.Event:
        """The frame that ends the exchange after ``step`` (not MORE)."""
        if step is Step.DONE:
            return F.End(self.op)
        if step is Step.CHANGED:
            return F.Abort(self.op, F.AbortReason.SOURCE_CHANGED)
        if step is Step.GONE:
            return F.Abort(self.op, F.AbortReason.SOURCE_GONE)
        raise ValueError(f"{step} does not end the exchange")

    def cancel(self) -> F.Abort:
        """The peer refused the file while it was being sent."""
        return F.Abort(self.op, F.AbortReason.CANCELLED)

    def _verdict(self) -> Step:
        try:
            now = os.fstat(self.fd)
            at_path = self.found.inode()
        except OSError:
            return Step.GONE
        if at_path is None:
            return Step.GONE
        if changed(self.st, now) or at_path != self.st.st_ino:
            return Step.CHANGED
        return Step.DONE
