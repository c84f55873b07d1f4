"""Counters and gauges the daemon shows in status and metrics.

Each object is written by exactly one thread (its link or session) and read
by the control thread; reads of single attributes are atomic in CPython, and
a status snapshot being a few microseconds inconsistent is harmless.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class Transfer:
    path: str
    mirror: str
    offset: int
    size: int


@dataclass
class LinkStats:
    """The outbound link to one peer (this node sends)."""

    peer: str
    address: str
    #: connecting | handshake | connected | backoff | auth_failed | stopped
    state: str = "connecting"
    since: float = field(default_factory=time.time)
    next_retry: float | None = None
    connects: int = 0
    rtt_ms: float | None = None
    bytes_sent: int = 0
    payload_bytes_sent: int = 0
    files_sent: int = 0
    ops_sent: int = 0
    ops_acked: int = 0
    files_aborted: int = 0
    renames: int = 0
    #: Names of hard-link groups sent as HardLink frames (no data).
    hardlinks_sent: int = 0
    resumed_files: int = 0
    resumed_bytes_skipped: int = 0
    #: Files sent as deltas, and the bytes the peer copied from its own
    #: earlier version instead of receiving them.
    delta_files: int = 0
    delta_bytes_copied: int = 0
    #: Bytes of sparse files' holes left as holes on the peer (not sent).
    hole_bytes: int = 0
    #: Byte ranges the peer found bad (did not match the block map) and
    #: asked for again; files whose ranges were sent again.
    mend_requests: int = 0
    mend_bytes: int = 0
    queue_files: int = 0
    queue_bytes: int = 0
    #: Per lane ("live": the watcher saw it; "bulk": cold sync, reconcile,
    #: rescans, retries): files, bytes and the wall-clock time of the oldest.
    lanes: dict[str, dict[str, Any]] = field(default_factory=dict)
    in_flight: int = 0
    #: Of in_flight, bulk operations (bounded by link.BULK_WINDOW).
    in_flight_bulk: int = 0
    oldest_change: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    current: Transfer | None = None
    rate_bps: float = 0.0
    #: The peer's bwlimit, bytes per second (0: none)...
    bwlimit: int = 0
    #: ...and the cap the connected socket reports (SO_MAX_PACING_RATE read
    #: back with getsockopt; 0: none; None: not connected).
    bwlimit_applied: int | None = None
    paused: bool = False
    mirrors: dict[str, dict[str, Any]] = field(default_factory=dict)

    def error(self, msg: str) -> None:
        self.last_error, self.last_error_at = msg, time.time()

    def mirror(self, name: str) -> dict[str, Any]:
        """The gauges of one mirror (created empty)."""
        return self.mirrors.setdefault(name, {})

    def set_state(self, state: str) -> None:
        if self.state == "auth_failed" and state in ("connecting", "handshake"):
            # A retry does not clear it: the link still fails authentication
            # until a handshake succeeds (status keeps saying so, exit 3).
            return
        if state != self.state:
            self.state, self.since = state, time.time()

    def lag(self) -> float | None:
        """Age of the oldest unacknowledged change, in seconds."""
        oldest = self.oldest_change
        return None if oldest is None else max(0.0, time.time() - oldest)

    def snapshot(self) -> dict[str, Any]:
        # Called from the control thread while the link thread writes: copy
        # the containers first (dict/list copies run under the GIL) instead
        # of letting asdict() iterate them while they change.
        mirrors = {k: dict(v) for k, v in list(self.mirrors.items())}
        current = self.current
        now = time.time()
        lanes = {}
        for name, lane in list(self.lanes.items()):
            oldest = lane.get("oldest")
            age = None if oldest is None else max(0.0, now - oldest)
            lanes[name] = {**lane, "oldest_age_seconds": age}
        d = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("mirrors", "current", "lanes")
        }
        d["mirrors"] = mirrors
        d["lanes"] = lanes
        d["current"] = None if current is None else asdict(current)
        d["lag_seconds"] = self.lag()
        return d


@dataclass
class SessionStats:
    """An inbound session from one peer (this node receives)."""

    peer: str
    address: str
    state: str = "handshake"
    since: float = field(default_factory=time.time)
    bytes_received: int = 0
    payload_bytes_received: int = 0
    files_received: int = 0
    ops_applied: int = 0
    commits: int = 0
    conflicts: int = 0
    errors_sent: int = 0
    #: Files received as deltas; bytes copied from our published version.
    delta_files: int = 0
    delta_bytes_copied: int = 0
    #: Bytes of sparse files' holes left as holes here.
    hole_bytes: int = 0
    #: Files that did not match the sender's block map when complete (each
    #: is logged with its first bad offset), bytes asked for again, and
    #: files given up after MAX_MENDS attempts.
    verify_mismatches: int = 0
    verify_bytes_requested: int = 0
    verify_failed: int = 0
    #: Deltas refused because our copy changed since we published it.
    base_changed: int = 0
    #: "splice" or "copy" (the fallback, for filesystems without splice).
    mode: str = "splice"
    #: The receive buffer this session set (rcvqueue.py; 0: the kernel's own).
    rcvbuf: int = 0
    mirrors: list[str] = field(default_factory=list)
    last_error: str | None = None

    def snapshot(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "mirrors"}
        d["mirrors"] = list(self.mirrors)
        return d


class RateMeter:
    """Bytes per second over a sliding window of a few seconds."""

    def __init__(self, window: float = 3.0) -> None:
        self.window = window
        self._marks: list[tuple[float, int]] = []

    def add(self, total: int) -> float:
        now = time.monotonic()
        self._marks.append((now, total))
        while len(self._marks) > 2 and now - self._marks[0][0] > self.window:
            self._marks.pop(0)
        t0, b0 = self._marks[0]
        return (total - b0) / (now - t0) if now > t0 else 0.0
