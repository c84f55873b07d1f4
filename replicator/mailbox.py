"""What other threads hand a link thread.

Messages (changes.py, control requests, the reader's bytes) go through one
queue, in order — except a scan's Dirty messages (bulk: no ``Flag.LIVE``),
which wait in a queue of their own that the link takes in slices between
pump rounds (``take_bulk``): the 68k Dirty of a scanned tree must not hold
back a live change posted after them. Any thread may ``post``; only the
link thread takes.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from collections.abc import Callable

from .changes import Dirty, Flag

_LIVE = int(Flag.LIVE)
#: Posted only to wake the link thread: bulk messages are waiting.
_WAKE = object()


class Mailbox:
    def __init__(self) -> None:
        self._posted: queue.SimpleQueue[object] = queue.SimpleQueue()
        #: deque appends and pops are atomic: no lock.
        self._bulk: deque[Dirty] = deque()

    def post(self, msg: object) -> None:
        if type(msg) is Dirty and not int(msg.flags) & _LIVE:
            bulk = self._bulk
            wake = not bulk
            bulk.append(msg)
            if wake:  # the link may be blocked in get(): wake it
                self._posted.put(_WAKE)
            return
        self._posted.put(msg)

    def get(self, timeout: float | None = None) -> object:
        """The next message, waiting up to ``timeout`` s (queue.Empty)."""
        return self._posted.get(timeout=timeout)

    def get_nowait(self) -> object:
        return self._posted.get_nowait()

    def take_bulk(self, handle: Callable[[Dirty], None], budget_s: float) -> bool:
        """Hand bulk messages to ``handle`` for at most ``budget_s``; True if
        some are left (the caller must not block then)."""
        bulk = self._bulk
        deadline = time.monotonic() + budget_s
        n = 0
        while bulk:
            handle(bulk.popleft())
            n += 1
            if n % 256 == 0 and time.monotonic() >= deadline:
                break
        return bool(bulk)
