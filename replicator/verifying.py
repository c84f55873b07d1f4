"""A received file against its block map, before it may be published; and
the base a delta is made against.

``Verifier`` decides, for each file whose End arrived, whether it matches
the sender's block map (inbox.PartialFile hashes it as it grows). What is
left to hash at End is usually a few MiB and is hashed at once; a file
resumed after a restart, or re-hashed after a repair, may have GiB left:
that is hashed a slice at a time between the frames the session serves
(``step``), so the session keeps answering its peer (a receiver silent
for ``dead_after`` would be dropped and the transfer restarted, forever).

A mismatch asks for the bad ranges again (``Mend``), up to ``MAX_MENDS``
rounds; then the file is refused with VERIFY_FAILED and discarded. Every
mismatch is counted and logged with peer, mirror, path and first bad
offset.

``delta_base`` opens the published file a delta's Copy ranges come from,
only while it is still exactly the version whose map was remembered.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from . import frames as F
from . import paths
from .blockmap import thread_buffer
from .errors import ApplyError, SourceShrank
from .fd import OwnedFd
from .inbox import PartialFile, apply_error
from .maps import Identity, PublishedMaps
from .stats import SessionStats

log = logging.getLogger(__name__)

#: A file still does not match after this many rounds of asking for its
#: bad ranges again: refused (VERIFY_FAILED), the sender retries later.
MAX_MENDS = 3
#: At End, up to this many bytes still unhashed are hashed at once; more
#: are hashed a SLICE at a time between frames.
AT_ONCE = 16 << 20
SLICE = 4 << 20


@dataclass(frozen=True)
class Good:
    """The file matches its block map: publish it."""


@dataclass(frozen=True)
class Bad:
    """Ask for ``ranges`` again (a Want)."""

    ranges: list[tuple[int, int]]


@dataclass(frozen=True)
class Failed:
    """Refuse the file (VERIFY_FAILED); it was discarded."""

    message: str


Outcome = Good | Bad | Failed


class Verifier:
    """The files of one mirror and peer waiting to be checked."""

    def __init__(self, mirror: str, peer: str, stats: SessionStats) -> None:
        self.mirror = mirror
        self.peer = peer
        self.stats = stats
        #: Files whose End came, with a lot left to hash, and their digests.
        self.waiting: deque[tuple[PartialFile, bytes]] = deque()

    def end(self, p: PartialFile, digest: bytes) -> Outcome | None:
        """``p`` is complete: its outcome, or None if it is hashed later
        (``step`` returns it). OSError if it cannot be read."""
        assert p.progress is not None
        if p.progress.size - p.progress.done > AT_ONCE:
            self.waiting.append((p, digest))
            return None
        return self._judge(p, digest)

    def step(self) -> list[tuple[PartialFile, Outcome | OSError]]:
        """Hash one slice of the first waiting file; the files now judged."""
        if not self.waiting:
            return []
        p, digest = self.waiting[0]
        prog = p.progress
        assert prog is not None
        try:
            prog.feed_fd(p.fd, min(prog.size, prog.done + SLICE), thread_buffer())
            if prog.done < prog.size:
                return []
            outcome: Outcome | OSError = self._judge(p, digest)
        except OSError as e:
            outcome = e
        self.waiting.popleft()
        return [(p, outcome)]

    def forget(self, p: PartialFile) -> None:
        self.waiting = deque(w for w in self.waiting if w[0] is not p)

    def _judge(self, p: PartialFile, digest: bytes) -> Outcome:
        try:
            bad = p.verify(digest)
        except SourceShrank:  # someone truncated our partial: all of it is suspect
            bad = [(0, p.size)] if p.size else []
        if bad is None:
            return Good()
        shown = paths.show(p.path)
        if len(bad) > F.MAX_DATA // F.RANGE.size:  # too many for one Want
            bad = [(bad[0][0], p.size - bad[0][0])]
        where = {"PEER": self.peer, "MIRROR": self.mirror, "PATH": shown}
        self.stats.verify_mismatches += 1
        if not bad or p.mends >= MAX_MENDS:
            self.stats.verify_failed += 1
            msg = (
                f"mirror {self.mirror!r}: {shown} from {self.peer} still did not match its "
                f"block map after {p.mends} repairs (first bad offset "
                f"{bad[0][0] if bad else 0}); discarded, the sender will retry"
            )
            log.error("%s", msg, extra=where)
            return Failed(msg)
        nbytes = sum(n for _, n in bad)
        log.warning(
            "mirror %r: %s from %s did not match its block map at offset %d (%d bytes in %d "
            "ranges); asking for them again",
            self.mirror,
            shown,
            self.peer,
            bad[0][0],
            nbytes,
            len(bad),
            extra=where,
        )
        self.stats.verify_bytes_requested += nbytes
        p.mending()
        return Bad(bad)


def delta_base(
    maps: PublishedMaps | None, root: paths.Root, ev: F.File, parts: tuple[bytes, ...]
) -> OwnedFd:
    """The published file ``ev`` is a delta of, open for reading, if it is
    still exactly the version whose map we remembered; else
    ApplyError(BASE_CHANGED): the sender sends the whole file."""
    known = None if maps is None else maps.get(ev.path)
    if known is None or known[1].file_digest != ev.base:
        raise ApplyError(
            F.ErrorCode.BASE_CHANGED,
            f"{paths.show(ev.path)}: the version a delta was made against is not the one "
            "published here",
        )
    try:
        opened = root.open_file(parts)
    except OSError as e:
        raise apply_error(e, paths.show(ev.path)) from e
    if opened is None or Identity.of(opened[1]) != known[0]:
        if opened is not None:
            opened[0].close()
        raise ApplyError(
            F.ErrorCode.BASE_CHANGED,
            f"{paths.show(ev.path)}: the copy here changed since it was published",
        )
    return opened[0]
