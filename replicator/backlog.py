"""The backlog of one link: paths that may differ on its peer.

Per mirror, insertion-ordered and coalesced: a path marked a thousand times
is one entry, keeping the time it *first* became dirty (that is what lag
measures). Entries can be delayed (settling directories, retries after a
transient error) and parked until an operation on the same path is
acknowledged. The link thread is its only user.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable

Key = tuple[int, bytes]  # (mirror id, path relative to the mirror root)
Info = tuple[float, int]  # (wall-clock time first dirty, size hint in bytes)


class Backlog:
    def __init__(self, mirror_ids: Iterable[int]) -> None:
        self._ready: dict[int, dict[Key, Info]] = {mid: {} for mid in mirror_ids}
        self._later: list[tuple[float, Key]] = []
        self._later_info: dict[Key, tuple[float, float, int]] = {}
        self._parked: dict[Key, Info] = {}

    def mark(self, key: Key, since: float, size: int, delay: float = 0.0) -> None:
        """``key`` may differ on the peer; look at it now, or after ``delay`` s."""
        ready = self._ready[key[0]]
        if delay > 0:
            if key in ready:
                return
            due = time.monotonic() + delay
            old = self._later_info.get(key)
            if old is not None:
                since = min(since, old[1])
                if old[0] >= due:
                    self._later_info[key] = (old[0], since, size)
                    return
            self._later_info[key] = (due, since, size)
            heapq.heappush(self._later, (due, key))
            return
        cur = ready.get(key)
        if cur is not None:
            if since < cur[0]:
                ready[key] = (since, size)
            return
        info = self._later_info.pop(key, None)
        if info is not None:
            since = min(since, info[1])
        ready[key] = (since, size)

    def promote(self) -> None:
        """Move delayed entries whose time has come to the ready queue."""
        now = time.monotonic()
        while self._later and self._later[0][0] <= now:
            due, key = heapq.heappop(self._later)
            info = self._later_info.get(key)
            if info is None or info[0] != due:
                continue  # superseded by a later mark
            del self._later_info[key]
            self.mark(key, info[1], info[2])

    def next_due(self) -> float | None:
        """Monotonic time of the next delayed entry, if any."""
        return self._later[0][0] if self._later else None

    def has_ready(self, mid: int) -> bool:
        return bool(self._ready[mid])

    def pop(self, mid: int) -> tuple[Key, Info]:
        """The oldest ready entry of mirror ``mid`` (KeyError if none)."""
        ready = self._ready[mid]
        key = next(iter(ready))
        return key, ready.pop(key)

    def park(self, key: Key, info: Info) -> None:
        """``key`` is dirty again while an operation on it is in flight."""
        old = self._parked.get(key)
        self._parked[key] = info if old is None or info[0] < old[0] else old

    def unpark(self, key: Key) -> None:
        info = self._parked.pop(key, None)
        if info is not None:
            self.mark(key, *info)

    def unpark_all(self) -> None:
        for key in list(self._parked):
            self.unpark(key)

    def files(self) -> int:
        return sum(len(d) for d in self._ready.values()) + len(self._later_info) + len(self._parked)

    def bytes(self) -> int:
        return sum(s for d in self._ready.values() for _, s in d.values())

    def oldest(self) -> float | None:
        """Wall-clock time of the oldest change waiting here."""
        times = [next(iter(d.values()))[0] for d in self._ready.values() if d]
        times += [i[1] for i in self._later_info.values()]
        times += [i[0] for i in self._parked.values()]
        return min(times) if times else None
