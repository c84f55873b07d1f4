"""The files a link is sending, a chunk at a time, and how each one ends.

The pump starts a file (``FileSend.begin``, its File frame, in flight) and
hands it here: a file of at most one chunk goes out at once; a larger one
sends one chunk per pump round, so a 100 GiB file never holds a 4 KiB one
back by more than one chunk. A file whose block map is still being hashed
waits here without holding anything up (the hasher wakes the link). When a
file ends, ``Streams`` queues its Blocks and End, or Abort, and tells the
pump (``ended``); a file that changed while it was sent goes back to the
pump (``changed``) to be sent again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from . import paths
from .outgoing import FileSend, Step
from .stats import LinkStats, Transfer
from .wire import Wire

#: Frames and small files' payloads queued beyond this are sent at once.
FLUSH_AT = 256 << 10


class Streams:
    def __init__(
        self,
        wire: Wire,
        stats: LinkStats,
        changed: Callable[[FileSend], None],
        ended: Callable[[FileSend], None] = lambda s: None,
    ) -> None:
        self._wire = wire
        self._stats = stats
        self._changed = changed
        self._ended = ended
        #: Files being sent a chunk per round.
        self._active: list[FileSend] = []

    def add(self, s: FileSend) -> None:
        """A file just started (its File frame is queued). One that goes on
        after this round holds its own copy of its directory's fd (the
        pump's lookups borrow them from the round's ``paths.DirFds``)."""
        if s.left <= self._wire.chunk:
            while s.fd >= 0:
                if not self.step(s):  # waits for its block map (now in _active)
                    break
        else:
            self._active.append(s)
        if s.fd >= 0:
            s.found = s.found.own()

    def step_all(self) -> bool:
        """One chunk of every large file in progress; True if any moved."""
        moved = False
        for s in list(self._active):
            moved = self.step(s) or moved
        return moved

    def step(self, s: FileSend) -> bool:
        """Send the next chunk of ``s``; End or Abort it when it is done.
        False if it waits for its block map."""
        wire = self._wire
        conn, sock = wire.conn, wire.sock
        assert conn is not None and sock is not None
        # sent from memory with the frames (FileSend.step): Wire.flush counts it
        inline = s.data is not None and s.left <= wire.chunk
        if s.left and not inline:
            self._stats.current = Transfer(paths.show(s.key[1]), s.mirror, s.offset, s.size)
            self._stats.bytes_sent += len(wire.buf)
        headers = s.frame_bytes
        copied, hole_bytes = s.copied, s.hole_bytes
        began = time.monotonic()
        step, n = s.step(sock, conn, wire.buf, wire.chunk)
        if inline:
            if len(wire.buf) >= FLUSH_AT:
                wire.flush()
        else:
            self._stats.bytes_sent += n + s.frame_bytes - headers  # the Chunk header too
            if n:
                wire.sent(n, time.monotonic(), began)
        self._stats.payload_bytes_sent += n
        self._stats.delta_bytes_copied += s.copied - copied
        self._stats.hole_bytes += s.hole_bytes - hole_bytes
        if step is Step.WAIT:
            if s not in self._active:
                self._active.append(s)
            return s.frame_bytes != headers
        if step is Step.MORE:
            return True
        for frame in s.finish(step):
            wire.queue(frame)
        self._drop(s)
        if step is Step.DONE:
            self._stats.files_sent += 1
            self._ended(s)
            return True
        self._stats.files_aborted += 1
        self._changed(s)
        return True

    def _drop(self, s: FileSend) -> None:
        s.close()
        if s in self._active:
            self._active.remove(s)
        self._stats.current = None

    def cancel(self, op: int) -> None:
        """The peer refused ``op``: stop sending its file if it still is."""
        for s in list(self._active):
            if s.op == op:
                self._wire.queue(s.cancel())
                self._drop(s)

    def sending(self) -> int:
        """Bytes still to send of the large files in progress."""
        return sum(s.left for s in self._active)

    def close(self) -> None:
        """The connection is gone: stop sending."""
        for s in self._active:
            s.close()
        self._active.clear()
        self._stats.current = None
