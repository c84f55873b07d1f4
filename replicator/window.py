"""How many bulk operations a link keeps in flight.

A live change (backlog.py's live lane) is started ahead of every bulk
entry, but it still queues on the wire and in the receiver behind the bulk
operations already sent: with 4,096 of them in flight, a 4 KiB file written
during a cold sync waited a second or more. So bulk gets its own window,
sized like BBR's congestion window: the peer's delivery rate (the highest
acknowledgement rate of the last few periods) times the shortest time an
operation took from send to acknowledgement (a round trip plus the
receiver's commit, ``min_latency``) plus ``QUEUE_S``. That keeps the
pipeline full — a smaller window would cost cold-sync throughput, most on a
journaled disk whose commits take tens of milliseconds — while a live
change queues about ``QUEUE_S`` behind bulk work beyond the latency every
operation has anyway. While the window limits the rate it grows by
(min_latency + QUEUE_S) / min_latency per period.

Pure: the caller passes the clock, the ack counter and each bulk op's latency.
"""

from __future__ import annotations

from collections import deque

#: How long a live change may queue behind bulk operations already sent,
#: beyond the send-to-ack latency of an operation on an idle link.
QUEUE_S = 0.02
#: The bulk window never shrinks below this (a cold start, an idle link)...
FLOOR = 64
#: ...nor grows beyond the link's whole window.
CEILING = 4096
#: Seconds between two updates of the rate.
PERIOD = 0.25
#: The delivery rate is the highest of this many periods...
RATE_PERIODS = 8
#: ...and the minimum latency the lowest seen over this many seconds.
LATENCY_WINDOW_S = 10.0


class BulkWindow:
    def __init__(
        self, queue_s: float = QUEUE_S, floor: int = FLOOR, ceiling: int = CEILING
    ) -> None:
        self.queue_s = queue_s
        self.floor = floor
        self.ceiling = ceiling
        #: Bulk operations that may be in flight now.
        self.size = floor
        #: Acknowledgements per second: the highest of the last periods.
        self.rate = 0.0
        #: Shortest send-to-ack time seen lately (None: nothing acked yet).
        self.min_latency: float | None = None
        self._rates: deque[float] = deque(maxlen=RATE_PERIODS)
        self._at: float | None = None
        self._acked = 0
        self._min_at = 0.0

    def acked(self, now: float, latency: float) -> None:
        """A bulk operation was acknowledged ``latency`` s after it was sent."""
        if (
            self.min_latency is None
            or latency <= self.min_latency
            or now - self._min_at > LATENCY_WINDOW_S
        ):
            self.min_latency, self._min_at = latency, now

    def update(self, now: float, acked_total: int) -> int:
        """Account for acknowledgements up to ``acked_total`` (a counter);
        once per PERIOD, resize. Returns the window."""
        if self._at is None:
            self._at, self._acked = now, acked_total
            return self.size
        elapsed = now - self._at
        if elapsed < PERIOD:
            return self.size
        self._rates.append(max(0, acked_total - self._acked) / elapsed)
        self._at, self._acked = now, acked_total
        self.rate = max(self._rates)
        if self.min_latency is not None:
            want = self.rate * (self.min_latency + self.queue_s)
            self.size = max(self.floor, min(self.ceiling, int(want)))
        return self.size

    def allows(self, bulk_in_flight: int) -> bool:
        return bulk_in_flight < self.size
