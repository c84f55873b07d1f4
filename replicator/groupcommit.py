"""When the receiver publishes what is waiting, and what (pure logic).

Files and directories that arrived complete wait in the mirrors
(publisher.py) to be published and acknowledged in groups: one sync round
for many of them is where small-file speed comes from. ``GroupCommit``
decides, from what is pending, whether more input is at hand and a clock
the caller passes in:

- **everything** (``Commit.ALL``) at once when nothing more is coming right
  now — the socket has no input (idle latency stays at one round trip plus
  one sync) — or when the group is large (``GROUP_OPS`` operations,
  ``GROUP_BYTES`` bytes). While input keeps coming, bulk work (a cold
  sync, a big file) waits for that: its groups stay big.
- **the live files only** (``Commit.LIVE``) at the latest ``COMMIT_DELAY``
  after the first of them completed, whatever the socket is doing — and at
  once when the next thing to read is a payload of ``PAYLOAD_AHEAD`` bytes
  or more (a big file's chunk): no company can arrive before it is read,
  and reading it takes longer than the delay. Live
  files are those the sender's live lane started (``frames.FILE_LIVE``):
  a change its watcher saw. A small file written between the chunks of a
  big one, or in the middle of a cold sync, is published within
  milliseconds — each fsynced on its own with its directory
  (``Publisher.commit(live_only=True)``), so the bulk's dirty data is not
  flushed with it (a syncfs would). The namespace operations applied so far
  go with them; they count as live themselves once the peer sent a Ping
  after them (``Inbound.nudge``: its live lane does, after an rm or mkdir).
"""

from __future__ import annotations

import enum

#: Commit a group once it holds this many operations or bytes.
GROUP_OPS = 1024
GROUP_BYTES = 256 * 1024 * 1024
#: Seconds a completed live file waits at most for company before it is
#: published, even while the socket stays busy.
COMMIT_DELAY = 0.005
#: A payload this large about to be read publishes the pending live files
#: first (at 100 MB/s it takes longer than COMMIT_DELAY to arrive).
PAYLOAD_AHEAD = 256 * 1024


class Commit(enum.Enum):
    #: Everything pending, in one round.
    ALL = 1
    #: Only the live files (the round goes whole if namespace operations or
    #: no bulk work wait with them: Inbound.commit).
    LIVE = 2


class GroupCommit:
    """When to publish what is pending (see the module docstring). Pure:
    the caller says what is pending and whether more input is at hand."""

    def __init__(
        self,
        delay: float = COMMIT_DELAY,
        ops: int = GROUP_OPS,
        nbytes: int = GROUP_BYTES,
        ahead: int = PAYLOAD_AHEAD,
    ) -> None:
        self.delay = delay
        self.ahead = ahead
        self.ops = ops
        self.nbytes = nbytes
        #: Monotonic time the oldest pending live file was first seen.
        self.since: float | None = None

    def due(
        self,
        pending: int,
        pending_bytes: int,
        live: int,
        now: float,
        more_at_hand: bool,
        payload_ahead: int = 0,
    ) -> Commit | None:
        """What to commit now, if anything: ``pending`` operations of
        ``pending_bytes`` bytes wait, ``live`` of them live files;
        ``payload_ahead``: payload bytes the caller is about to read."""
        if not pending:
            self.since = None
            return None
        if not more_at_hand or pending >= self.ops or pending_bytes >= self.nbytes:
            return Commit.ALL
        if not live:
            self.since = None
            return None
        if payload_ahead >= self.ahead:
            return Commit.LIVE
        if self.since is None:
            self.since = now
        return Commit.LIVE if now - self.since >= self.delay else None

    def committed(self) -> None:
        self.since = None
