"""How many bulk operations a link keeps in flight.

A live change (backlog.py's live lane) is started ahead of every bulk
entry, but it still queues on the wire and in the receiver behind the bulk
operations already sent: with 4,096 of them in flight, a 4 KiB file written
during a cold sync waited a second or more. So bulk gets its own window,
sized like a delay-based congestion window: enough operations to cover one
round trip plus ``QUEUE_S`` at the rate the peer acknowledges them, so the
link stays busy while a live change waits about ``QUEUE_S`` behind bulk
work at most. When the window is full the measured rate is what the window
allows, and the window grows by (rtt + QUEUE_S) / (rtt + service time) per
update until the peer, not the window, limits the rate.

Pure: the caller passes the clock, the ack counter and the round trip time.
"""

from __future__ import annotations

#: How long a live change may wait behind bulk operations already sent.
QUEUE_S = 0.02
#: The bulk window never shrinks below this (a cold start, an idle link)...
FLOOR = 64
#: ...nor grows beyond the link's whole window.
CEILING = 4096
#: Seconds between two updates of the rate.
PERIOD = 0.25


class BulkWindow:
    def __init__(
        self, queue_s: float = QUEUE_S, floor: int = FLOOR, ceiling: int = CEILING
    ) -> None:
        self.queue_s = queue_s
        self.floor = floor
        self.ceiling = ceiling
        #: Bulk operations that may be in flight now.
        self.size = floor
        #: Acknowledgements per second over the last period.
        self.rate = 0.0
        self._at: float | None = None
        self._acked = 0

    def update(self, now: float, acked_total: int, rtt_s: float | None) -> int:
        """Account for acknowledgements up to ``acked_total`` (a counter);
        once per PERIOD, resize. Returns the window."""
        if self._at is None:
            self._at, self._acked = now, acked_total
            return self.size
        elapsed = now - self._at
        if elapsed < PERIOD:
            return self.size
        self.rate = max(0, acked_total - self._acked) / elapsed
        self._at, self._acked = now, acked_total
        want = self.rate * ((rtt_s or 0.0) + self.queue_s)
        self.size = max(self.floor, min(self.ceiling, int(want)))
        return self.size

    def allows(self, bulk_in_flight: int) -> bool:
        return bulk_in_flight < self.size
