"""A file being sent: its whole exchange, File → Chunk/Copy… → Blocks… → End or Abort.

The link decides *what* to send; ``FileSend`` owns *how* one file goes out:
it opens the source through the directory its confined lookup found, picks
the resume offset from the peer's partial, builds the ``File`` frame, sends
Chunk headers framed by the protocol and payload by ``transfer.send_range``
(sendfile), filler if the file shrank mid-chunk, re-checks the source before
``End`` — zero-copy shares pages rather than snapshotting them, so a write
that lands after sendfile returned may still have reached the wire — and
says how it ended (``End``, or ``Abort`` with its reason). It counts its own
bytes; the link keeps the totals.

Every file goes with its block map (blockmap.py): the receiver publishes it
only if what it holds matches. A small file is hashed at once; a large one
on the link's hasher thread (hashing.py) while its chunks go out. A
*delta* — the peer holds an earlier version whose map we remember — waits
for the new map, then sends only the blocks that differ and ``Copy`` frames
for the rest. A *mend* sends again the ranges the receiver found bad
(``Want``).
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import stat
import struct
from collections import deque
from dataclasses import dataclass, field

from . import frames as F
from . import transfer
from .backlog import Key
from .blockmap import BlockMap, block_size_for, digest_of, map_fd, read_block, thread_buffer
from .errors import SourceShrank
from .fd import OwnedFd
from .hashing import Hasher, Job
from .paths import Located
from .protocol import Connection

#: Payload bytes per Chunk frame. Bigger chunks cost fewer headers and peeks
#: (measured: 0.95 vs 1.03 CPU-s/GiB for 8 vs 1 MiB); smaller ones let small
#: files through sooner (4 MiB ≈ 4 ms on the wire at 1 GB/s).
CHUNK = 4 << 20
#: Under a bandwidth limit a chunk is half a second's worth at that rate, at
#: least this: while one is sent the link can send nothing else (no Ping).
MIN_CHUNK = 16 << 10


#: Without a limit a chunk is about this long on the wire at the rate the
#: link has been sending at: a small file that comes up while a big one
#: streams waits for at most one chunk (measured on loopback to a
#: disk-bound receiver at ~150 MB/s: 4 MiB chunks held it ~28 ms each).
CHUNK_TIME = 0.008
#: ... but at least this big (per-chunk costs: a header, a pump round, a
#: peek on the receiver), and this big until the rate is known.
LIVE_MIN_CHUNK = 256 << 10
FIRST_CHUNK = 1 << 20


def chunk_size(rate: int, measured: float | None = None) -> int:
    """Payload bytes per Chunk at a limit of ``rate`` bytes per second (0:
    none), the link having sent at ``measured`` bytes per second lately
    (None: not known yet)."""
    cap = CHUNK if not rate else max(MIN_CHUNK, min(CHUNK, rate // 2))
    if measured is None:
        return min(cap, FIRST_CHUNK)
    return min(cap, max(LIVE_MIN_CHUNK, int(measured * CHUNK_TIME)))


class SendRate:
    """The rate a link's large files go out at, in bytes per second: from
    the time between one chunk's end and the next, while they follow each
    other (after a pause longer than ``GAP``, from the chunk's own start).
    Bytes and seconds are averaged apart (rate = bytes / seconds): a chunk
    that blocked for long (a receiver busy on its disk) weighs by its time.
    An average of each chunk's own rate followed the fast chunks that only
    filled socket buffers: it stayed at 100-400 MB/s while the receiver took
    7-25 MB/s, so chunks sized for 8 ms blocked the link for 50-190 ms."""

    GAP = 0.25
    WEIGHT = 0.25

    def __init__(self) -> None:
        self.rate: float | None = None
        self._last: float | None = None
        self._bytes = 0.0
        self._secs = 0.0

    def sent(self, n: int, now: float, began: float | None = None) -> None:
        """A chunk of ``n`` bytes was handed to the socket at ``now``; its
        send began at ``began`` (default: ``now``). The time it took counts
        from the previous chunk's end, or from its own start after a pause
        (a chunk that blocked longer than GAP still counts, by its time)."""
        last, self._last = self._last, now
        start = now if began is None else began
        if last is not None and start - last <= self.GAP:
            start = last
        dt = now - start
        if dt <= 0:
            return
        if self.rate is None:
            self._bytes, self._secs = float(n), dt
        else:
            self._bytes += self.WEIGHT * (n - self._bytes)
            self._secs += self.WEIGHT * (dt - self._secs)
        self.rate = self._bytes / self._secs


#: Files up to this size are hashed at once, on the link's thread (under a
#: millisecond for 1 MiB); larger ones on the hasher thread.
HASH_INLINE_MAX = 1 << 20
#: A file up to this size is read once, for its block map and its payload,
#: and its payload goes out with the frames around it (no sendfile: two
#: syscalls and a TCP push per small file saved; issue 13).
SEND_INLINE_MAX = 16 << 10
#: Block digests per Blocks frame.
DIGESTS_PER_FRAME = F.MAX_DATA // 32


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
    #: Nothing to do until the hasher finishes the block map.
    WAIT = "wait"


#: A run of the file to produce on the peer: (copy from its base?, offset, length).
Run = tuple[int, int, int]
#: Kinds of runs: bytes sent, bytes the peer copies from its base, a hole.
SEND, COPY, HOLE = 0, 1, 2
#: Holes smaller than this are sent as the zeros they read as (a frame
#: each would cost more than it saves).
HOLE_MIN = 64 * 1024


def holes(fd: int, st: os.stat_result) -> list[tuple[int, int]]:
    """The holes of a sparse file of HOLE_MIN bytes or more, as (offset,
    length), found with SEEK_DATA/SEEK_HOLE; none for a file that stores
    all its bytes (the common case: one comparison, no syscall)."""
    size = st.st_size
    if st.st_blocks * 512 >= size:
        return []
    out = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                return []  # no SEEK_DATA here: treat it as dense
            data = size  # nothing but a hole to the end
        if data - pos >= HOLE_MIN:
            out.append((pos, data - pos))
        if data >= size:
            break
        pos = os.lseek(fd, data, os.SEEK_HOLE)
    return out


def split_holes(runs: list[Run], hs: list[tuple[int, int]]) -> list[Run]:
    """``runs`` with the parts that lie in holes ``hs`` turned into HOLE runs."""
    if not hs:
        return runs
    out: list[Run] = []
    for kind, off, n in runs:
        end = off + n
        for h_off, h_n in hs:
            h_end = h_off + h_n
            if h_end <= off or h_off >= end:
                continue
            if h_off > off:
                out.append((kind, off, h_off - off))
            cut = min(end, h_end)
            out.append((HOLE, max(off, h_off), cut - max(off, h_off)))
            off = cut
        if off < end:
            out.append((kind, off, end - off))
    return out


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
    #: The block map, once computed (``job`` computes it for large files).
    map: BlockMap | None = None
    job: Job | None = None
    #: A delta's base: the map of the version the peer holds.
    base: BlockMap | None = None
    #: What is still to produce on the peer, in order (None: a delta
    #: waiting for its map to know).
    todo: deque[Run] | None = field(default_factory=deque)
    #: Bytes the peer took from its base instead of the wire (deltas).
    copied: int = 0
    #: Bytes of holes the peer left as holes instead of receiving zeros.
    hole_bytes: int = 0
    #: A mend (Want): the file digest End repeats; no Blocks are sent.
    mend_digest: bytes | None = None
    #: A repair (scrub): byte ranges sent even where the base matches.
    force: tuple[tuple[int, int], ...] = ()
    #: A small file's whole content, read with its block map: sent from
    #: memory (SEND_INLINE_MAX).
    data: bytes | None = None

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
        algo: int = 1,
        base: BlockMap | None = None,
        hasher: Hasher | None = None,
        force: tuple[tuple[int, int], ...] = (),
    ) -> tuple[FileSend, F.File] | None:
        """Open the source ``found`` (confined: ``paths.Source.locate`` found
        it without following symlinks) and make the ``File`` frame that
        starts the exchange, at the peer's partial ``held`` when it is of
        this very version; a delta of ``base`` when given (the peer holds
        that version). None if the file is gone or not a regular file
        any more, or shrank while hashed (look at it again); OSError if it
        cannot be read. Takes ``found``'s directory fd on success."""
        opened = found.open_file()
        if opened is None:
            return None
        file, st = opened
        size = st.st_size
        if base is not None and base.algo != algo:
            base = None
        bs = block_size_for(size, None if base is None else base.block_size)
        if base is not None and base.block_size != bs:
            base = None  # too far grown for its base's blocks: nothing could be copied
        bmap = job = None
        data = None
        try:
            if 0 < size <= SEND_INLINE_MAX and base is None and held is None and bs >= size:
                data = bytes(read_block(file.fd, size, thread_buffer()))
                bmap = BlockMap(algo, size, bs, digest_of(algo, data))
            elif size <= HASH_INLINE_MAX or hasher is None:
                bmap = map_fd(file.fd, size, algo, bs)
            else:
                job = hasher.submit(file.fd, size, algo, bs)
        except SourceShrank:
            file.close()
            return None
        except OSError:
            file.close()
            raise
        version = version_of(st)
        offset = 0
        if held is not None and held.version == version and 0 < held.held <= size:
            offset = held.held
        s = cls(op, key, mirror, found.take(), file, st, offset, since, start=offset)
        s.map, s.job, s.base, s.force = bmap, job, base, force
        if base is None:
            runs = [(SEND, offset, size - offset)] if size > offset else []
            s.todo = deque(split_holes(runs, holes(file.fd, st)))
            if data is not None and list(s.todo) == [(SEND, 0, size)]:
                s.data = data  # no holes to keep: sent from memory
        else:
            s.todo = None
        frame = F.File(
            op,
            mirror_id,
            offset,
            size,
            stat.S_IMODE(st.st_mode),
            st.st_mtime_ns,
            st.st_uid,
            st.st_gid,
            algo,
            bs,
            version,
            b"" if base is None else base.file_digest,
            key[1],
        )
        return s, frame

    @classmethod
    def mend(
        cls,
        op: int,
        key: Key,
        mirror: str,
        found: Located,
        since: float,
        version: bytes,
        digest: bytes,
        ranges: list[tuple[int, int]],
    ) -> FileSend | None:
        """Send ``ranges`` of the file again (the peer's Want), if the source
        is still the very version sent; None if it is not (Abort it)."""
        opened = found.open_file()
        if opened is None:
            return None
        file, st = opened
        if version_of(st) != version:
            file.close()
            return None
        s = cls(op, key, mirror, found.take(), file, st, 0, since)
        s.todo = deque((SEND, o, n) for o, n in ranges)
        s.mend_digest = digest
        return s

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
        """Payload bytes still to send (a delta waiting for its map: all)."""
        if self.todo is None:
            return self.size - self.offset
        return sum(n for kind, _, n in self.todo if kind == SEND)

    @property
    def version(self) -> bytes:
        return version_of(self.st)

    def close(self) -> None:
        if self.job is not None and self.map is None:
            self.job.cancel()
        self.file.close()
        self.found.close()

    def _hashed(self) -> Step | None:
        """None once the map is here; WAIT while the hasher works on it;
        CHANGED if the source shrank (or could not be read) meanwhile."""
        if self.map is not None or self.mend_digest is not None:
            return None
        job = self.job
        assert job is not None
        if not job.done.is_set():
            return Step.WAIT
        if job.map is None:
            return Step.CHANGED
        self.map = job.map
        return None

    def step(
        self, sock: socket.socket, conn: Connection, wbuf: bytearray, chunk: int = CHUNK
    ) -> tuple[Step, int]:
        """Send the next chunk, at most ``chunk`` bytes (``wbuf`` holds frames
        queued before it and is flushed first). Returns what happened and the
        payload bytes sent."""
        if self.todo is None:  # a delta: what to send follows from the map
            waiting = self._hashed()
            if waiting is not None:
                return waiting, 0
            assert self.map is not None and self.base is not None
            plan = self.map.plan(self.base, self.offset, self.force)
            runs = [(COPY if copy else SEND, off, n) for copy, off, n in plan]
            self.todo = deque(split_holes(runs, holes(self.fd, self.st)))
        todo = self.todo
        while todo and todo[0][0] != SEND:
            kind, off, n = todo.popleft()
            if kind == COPY:
                header = conn.send(F.Copy(self.op, off, n))
                self.copied += n
            else:
                header = conn.send(F.Hole(self.op, off, n))
                self.hole_bytes += n
            self.frame_bytes += len(header)
            wbuf += header
            self.offset = off + n
        if not todo:
            return self._verdict(), 0
        _, off, run = todo[0]
        if self.data is not None and off == 0 and run == len(self.data) <= chunk:
            return self._send_data(conn, wbuf)
        n = min(chunk, run)
        if off and self.size > CHUNK and changed(self.st, os.fstat(self.fd)):
            return Step.CHANGED, 0  # a big file: notice a change early, not at the end
        header = conn.send(F.Chunk(self.op, off, n))
        self.frame_bytes += len(header)
        wbuf += header
        sock.sendall(wbuf, socket.MSG_MORE)  # the header joins the payload's first segment
        wbuf.clear()
        sent = transfer.send_range(sock.fileno(), self.fd, off, n)
        conn.payload_sent(sent)
        self.payload_sent += sent
        if sent < n:
            # The file shrank under us: keep the stream framed, then abort.
            transfer.send_filler(sock, n - sent)
            conn.payload_sent(n - sent)
            return Step.CHANGED, sent
        if n == run:
            todo.popleft()
        else:
            todo[0] = (SEND, off + n, run - n)
        self.offset = off + n
        if todo:
            return Step.MORE, n
        return self._verdict(), n

    def _send_data(self, conn: Connection, wbuf: bytearray) -> tuple[Step, int]:
        """The whole small file from memory: its Chunk and payload join the
        frames queued in ``wbuf`` (sent when the round flushes)."""
        data, self.data = self.data, None
        assert data is not None and self.todo is not None
        n = len(data)
        header = conn.send(F.Chunk(self.op, 0, n))
        self.frame_bytes += len(header)
        wbuf += header
        wbuf += data
        conn.payload_sent(n)
        self.payload_sent += n
        self.todo.popleft()
        self.offset = n
        return self._verdict(), n

    def finish(self, step: Step) -> list[F.Event]:
        """The frames that end the exchange after ``step`` (not MORE/WAIT)."""
        if step is Step.DONE:
            if self.mend_digest is not None:
                return [F.End(self.op, self.mend_digest)]
            bmap = self.map
            assert bmap is not None
            out: list[F.Event] = []
            if bmap.count > 1:
                d = bmap.dsize
                per = DIGESTS_PER_FRAME
                for first in range(0, bmap.count, per):
                    raw = bmap.digests[first * d : (first + per) * d]
                    out.append(F.Blocks(self.op, first, raw))
            out.append(F.End(self.op, bmap.file_digest))
            return out
        if step is Step.CHANGED:
            return [F.Abort(self.op, F.AbortReason.SOURCE_CHANGED)]
        if step is Step.GONE:
            return [F.Abort(self.op, F.AbortReason.SOURCE_GONE)]
        raise ValueError(f"{step} does not end the exchange")

    def cancel(self) -> F.Abort:
        """The peer refused the file while it was being sent."""
        return F.Abort(self.op, F.AbortReason.CANCELLED)

    def _verdict(self) -> Step:
        waiting = self._hashed()
        if waiting is not None:
            return waiting
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
