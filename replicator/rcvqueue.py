"""How much the receiver's kernel may queue ahead of what it has read (pure
logic; the session applies it with SO_RCVBUF).

Frames arrive in the order sent: a small live file's frames sent after a
big file's chunk wait for everything queued before them in the receiving
socket. With the kernel's autotuning that queue grows to megabytes when
the receiver (splicing to a disk) is slower than the link: measured on
loopback at ~150 MB/s, ~5 MB sat in the receive queue, ~35 ms in front of
every live frame. ``ReceiveQueue`` sizes the buffer to ``QUEUE_TIME`` of
what the receiver has been reading, plus two round trips (so a link the
buffer bounds can still double its rate each period), never below
``FLOOR``. A period that read less than ``FLOOR`` changes nothing: an idle
link keeps the size its last transfer needed, and one that has not carried
a transfer yet keeps the kernel's autotuning, which grows fast at the start
of one (a 1 GiB file on loopback takes 0.7 s, three periods).

Setting SO_RCVBUF switches the kernel's autotuning off for the socket, and
the kernel caps it at ``net.core.rmem_max`` (208 KiB on a stock system).
So it is done only on a link where that cap cannot hold the rate below
``FAST`` (rmem_max / RTT): a LAN or loopback, where the queue is what
delays live frames. A long-haul link keeps the kernel's sizing; its delay is
the link's own, and a second connection for the live lane is what would
help there (not built).
"""

from __future__ import annotations

#: Seconds between looks at the rate.
PERIOD = 0.25
#: Seconds of reading the queue may hold, on top of two round trips.
QUEUE_TIME = 0.005
#: Never less than this (bytes): a splice moves up to a pipe's worth (1 MiB)
#: at a time, and an idle link must be able to start fast.
FLOOR = 512 << 10
#: Bytes per second (10 Gbit/s) that a buffer capped at rmem_max must still
#: allow at the link's round trip before the kernel's sizing is given up.
FAST = 1_250_000_000


class ReceiveQueue:
    """The receive buffer to set now and then, from the bytes read so far
    and the round trip (see the module docstring)."""

    def __init__(self, cap: int, floor: int = FLOOR) -> None:
        #: The most SO_RCVBUF can be (net.core.rmem_max).
        self.cap = cap
        self.floor = min(floor, cap)
        #: What was set last (0: nothing, the kernel's autotuning).
        self.size = 0
        self._since: float | None = None
        self._read = 0

    def due(self, now: float) -> bool:
        """Whether a period has passed (``update`` wants a round trip then)."""
        return self._since is None or now - self._since >= PERIOD

    def update(self, now: float, read: int, rtt: float) -> int | None:
        """``read`` bytes were read from the socket so far; ``rtt`` seconds is
        its round trip (0: not known). The SO_RCVBUF to set, or None."""
        since, before = self._since, self._read
        self._since, self._read = now, read
        if since is None or now <= since or rtt <= 0:
            return None
        if not self.size and self.cap < FAST * rtt:
            return None  # a long round trip: rmem_max could cap the link
        if read - before < self.floor:
            return None  # (nearly) idle: nothing to size by; keep what is set
        rate = (read - before) / (now - since)
        want = min(self.cap, max(self.floor, int(rate * (QUEUE_TIME + 2 * rtt))))
        if self.size and abs(want - self.size) * 8 < self.size:
            return None  # within an eighth: not worth a call
        self.size = want
        return want
