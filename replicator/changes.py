"""What the watcher and the scanner tell links about a mirror.

These are plain messages; a Link receives them through ``Link.post``. A path
is always relative to the mirror root, as bytes (Linux file names are bytes).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .manifest import EntryState


class Flag(enum.IntFlag):
    """What the events of a dirty path said. The link decides with lstat;
    flags only break the ties lstat cannot:

    - a file whose size and mtime changed is sent whole, *unless* the only
      evidence is ATTRIB (utime, chmod, chown): then a Meta frame carries it
      (a guess, see plan.Action.META_GUESS: a CLOSED that follows sends the
      data, since an mmap write raises no IN_MODIFY). CLOSED rules the
      guess out: an mmap write gives IN_CLOSE_WRITE alone, and GNU touch
      opens the file for writing (IN_ATTRIB + IN_CLOSE_WRITE), so the two
      cannot be told apart and touch(1) sends the data again — slower,
      never wrong;
    - a file written but not yet CLOSED waits until it settles.
    """

    #: The content may have changed (written, created, moved in, deleted).
    DATA = 1
    #: A writer closed the file: it is complete for now, send at once.
    CLOSED = 2
    #: Attributes changed (chmod, utime, chown).
    ATTRIB = 4
    #: The watcher saw it happen: a live change, sent ahead of bulk work
    #: (cold sync, reconcile, rescans, retries) — see backlog.py's lanes.
    LIVE = 8
    #: An entry was made, removed or renamed at this path (the watcher saw
    #: it): its directory's entries changed, and with them its mtime, even
    #: when nothing is left to send for the path itself (made and removed
    #: before the link looked); a directory here may be another than the one
    #: the peer holds (replaced by one moved in). See pump.Pump._names_changed.
    NAME = 16


@dataclass(frozen=True, slots=True)
class Dirty:
    """``path`` may differ on the peers."""

    mirror: str
    path: bytes
    flags: Flag = Flag.DATA
    size_hint: int = 0


@dataclass(frozen=True, slots=True)
class Moved:
    """``src`` was renamed to ``dst`` inside the mirror."""

    mirror: str
    src: bytes
    dst: bytes
    is_dir: bool


@dataclass(frozen=True, slots=True)
class Reconcile:
    """Reconcile with the peer now (``mirror`` None: every mirror of the link)."""

    mirror: str | None = None


@dataclass(frozen=True, slots=True)
class PeerHas:
    """``peer`` itself just sent us ``path`` as ``state`` (None: it deleted
    it; ``src``: it renamed ``src`` to ``path``). The link to that peer
    records it, so the change is not echoed back when it appears here."""

    peer: str
    mirror: str
    path: bytes
    state: EntryState | None
    src: bytes | None = None


@dataclass(frozen=True, slots=True)
class AgreedWith:
    """What ``peer`` sent us in ``mirror`` is published here: both sides hold
    it. One message per commit round, its ``items`` in order: (path, state;
    None: its delete, source of its rename or None). The link to that peer
    records the agreements (history.py); two-way mirrors only."""

    peer: str
    mirror: str
    items: tuple[tuple[bytes, EntryState | None, bytes | None], ...]
