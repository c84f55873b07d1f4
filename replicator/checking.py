"""Answering a peer's Check (``replicatorctl verify`` on its side): the block
map of a published file, read from the disk, not from the page cache.

A ``CheckJob`` reads its file a slice at a time between the frames the
session serves, so a scrub of a big file never stalls replication for
long; the sender asks for one file at a time, at the rate it was given.
Before each slice is read its clean pages are dropped from the page cache
(``POSIX_FADV_DONTNEED``), so the digests describe what the disk holds —
a bad sector or a flipped bit on the platter shows, where a read served
from memory would hide it. Pages still dirty (just written) cannot be
dropped; they are about to be written anyway.
"""

from __future__ import annotations

import os

from . import frames as F
from . import paths
from .blockmap import DIGEST_SIZE, Progress, available, thread_buffer
from .errors import ApplyError
from .fd import OwnedFd
from .inbox import apply_error

#: Bytes a job reads per slice (one slice between two rounds of frames).
SLICE = 4 << 20


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Drop the clean cached pages of this range: the next read goes to disk."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # not every filesystem honours it; the read is still correct


def start_check(root: paths.Root, ev: F.Check) -> CheckJob:
    """The job answering ``ev`` (paths.check confines the path); BadPath or
    ApplyError if there is nothing it could check."""
    shown = paths.show(ev.path)
    try:
        opened = root.open_file(paths.check(ev.path))
    except OSError as e:
        raise apply_error(e, shown) from e
    if opened is None:
        raise ApplyError(F.ErrorCode.CONFLICT, f"{shown} is not a regular file here")
    f, st = opened
    if not available(ev.algo):
        f.close()
        raise ApplyError(F.ErrorCode.FORBIDDEN, "BLAKE3 is not installed here (pip install blake3)")
    return CheckJob(ev.op, f, st.st_size, ev.algo, ev.block_size)


class CheckJob:
    """One Check being answered."""

    def __init__(self, op: int, file: OwnedFd, size: int, algo: int, block_size: int) -> None:
        self.op = op
        self.file = file
        self.size = size
        self.progress = Progress(algo, size, block_size)
        self._dsize = DIGEST_SIZE[algo]
        #: Digests already sent in Checked frames.
        self._sent = 0
        self.done = False

    def step(self, budget: int = SLICE) -> list[F.Checked]:
        """Read and hash up to ``budget`` more bytes; the Checked frames of
        the blocks now complete. Raises SourceShrank if the file shrank,
        OSError if it cannot be read (then ``close`` it)."""
        p = self.progress
        upto = min(self.size, p.done + budget)
        if upto > p.done:
            drop_cached(self.file.fd, p.done, upto - p.done)
            p.feed_fd(self.file.fd, upto, thread_buffer())
        digests = p.digests()
        out = []
        per = F.MAX_DATA // self._dsize
        ready = len(digests) // self._dsize
        while self._sent < ready:
            n = min(per, ready - self._sent)
            raw = digests[self._sent * self._dsize : (self._sent + n) * self._dsize]
            out.append(F.Checked(self.op, self.size, self._sent, bytes(raw)))
            self._sent += n
        if p.complete:
            if self.size == 0:
                out.append(F.Checked(self.op, 0, 0, b""))
            self.done = True
            self.close()
        return out

    def close(self) -> None:
        self.file.close()
