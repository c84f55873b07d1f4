"""What a link shows in status: its gauges, kept current from its state.

The link thread writes ``LinkStats`` (stats.py) and the control thread reads
it. Here: the queue, what is in flight, the lag, the send rate and each
mirror's state (listed, and how many entries the peer holds), refreshed at
most every 0.25 s (and when the link goes idle), and deletions withheld
because a mirror's marker is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from .backlog import Backlog
from .inflight import InFlight
from .logs import Fields
from .mirror import SourceMirror
from .remote import RemoteMirror
from .stats import LinkStats, RateMeter

#: Seconds between two refreshes of a link's figures.
PERIOD = 0.25


class LinkStatus:
    def __init__(
        self,
        stats: LinkStats,
        mirrors: Mapping[int, SourceMirror],
        remote: Mapping[int, RemoteMirror],
        backlog: Backlog,
        inflight: InFlight,
        sending: Callable[[], int],
        log: Fields,
    ) -> None:
        self._stats = stats
        self._mirrors = mirrors
        self._remote = remote
        self._backlog = backlog
        self._inflight = inflight
        #: Bytes still to send of the files being sent.
        self._sending = sending
        self._log = log
        self._rate = RateMeter()
        self._stats_at = 0.0
        self._marker_at = 0.0
        self._marker_warned: set[str] = set()

    def update(self, force: bool = False) -> float | None:
        """Refresh the figures at most every PERIOD s (``force``: now).
        Returns in how many seconds a skipped refresh is due (else None)."""
        now = time.monotonic()
        if not force and now - self._stats_at < PERIOD:
            return PERIOD - (now - self._stats_at)
        self._stats_at = now
        st = self._stats
        bl = self._backlog
        lanes = bl.lanes()
        st.lanes = lanes
        st.queue_files = sum(int(lane["files"] or 0) for lane in lanes.values())
        st.queue_bytes = sum(int(lane["bytes"] or 0) for lane in lanes.values()) + self._sending()
        st.in_flight = len(self._inflight)
        st.in_flight_bulk = self._inflight.bulk
        times = [lane["oldest"] for lane in lanes.values()] + [self._inflight.oldest()]
        oldest = [float(t) for t in times if t is not None]
        st.oldest_change = min(oldest) if oldest else None
        st.rate_bps = self._rate.add(st.payload_bytes_sent)
        recheck = now - self._marker_at >= 1.0  # a marker read is a syscall: once a second
        if recheck:
            self._marker_at = now
        for mid, r in self._remote.items():
            m = self._mirrors[mid]
            ms = st.mirror(m.name)
            # What the peer holds as far as the link knows: every Ack and
            # listing keeps ``known`` current (the count of the last listing
            # alone showed 0 there after a first sync of everything).
            ms.update(listed=r.listed, remote_entries=len(r.known))
            if recheck and m.marker is not None and m.marker.ok():
                ms.pop("marker_missing", None)
                self._marker_warned.discard(m.name)
        return None

    def marker_missing(self, m: SourceMirror, n: int) -> None:
        """``n`` deletions in ``m`` are not propagated: its marker is missing."""
        self._stats.mirror(m.name)["marker_missing"] = True
        if m.name not in self._marker_warned:
            self._marker_warned.add(m.name)
            self._log.at(MIRROR=m.name).error(
                "link to %s: mirror %s: NOT propagating %d deletion(s): the mirror's "
                "marker is missing (see the mirror's log line above)",
                self._stats.peer,
                m.name,
                n,
            )
