"""Scans that complement inotify: new subtrees, and directories it cannot watch.

- A directory created or moved into a mirror is scanned whole: files written
  before its watch existed produce no event of their own.
- inotify's watch limit fails silently in watchdog for subdirectories. This
  thread compares the directories of each mirror with the watches the
  process really holds (``watcher.watched_inodes``); directories without a
  watch are polled every ``POLL_INTERVAL`` seconds by listing them and
  comparing with the previous listing, and the log and status say so.

Everything found becomes a ``changes.Dirty`` message for the links; the link
decides what really needs sending.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .changes import Dirty, Flag
from .frames import EntryKind
from .manifest import Excludes, scan
from .paths import STATE_DIR, Source
from .watcher import watched_inodes

log = logging.getLogger(__name__)

POLL_INTERVAL = 10.0
#: inotify_add_watch takes a path string: directories whose path is this
#: long (PATH_MAX with its NUL) cannot be watched, only polled.
INOTIFY_PATH_MAX = 4096
WATCH_CHECK_INTERVAL = 60.0

Listing = dict[bytes, tuple[int, int, int, int]]  # name → (mode, size, mtime_ns, ino)


@dataclass
class _MirrorScan:
    root: bytes
    excludes: Excludes
    dirs: int = 0
    unwatched: dict[bytes, Listing] = field(default_factory=dict)
    last_check: float | None = None


def _list(root: bytes, rel: bytes) -> Listing | None:
    """The directory ``rel`` of the mirror at ``root``, confined (no-follow)."""
    entries = Source(root).listing(rel)
    if entries is None:
        return None
    return {n: (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino) for n, st in entries.items()}


class Scanner(threading.Thread):
    def __init__(
        self, mirrors: dict[str, tuple[bytes, Excludes]], route: Callable[[object], None]
    ) -> None:
        super().__init__(name="scanner", daemon=True)
        self.mirrors = {n: _MirrorScan(r, e) for n, (r, e) in mirrors.items()}
        self.route = route
        self._q: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self._stopping = False
        self._check_now = True
        #: Set once every mirror was walked and compared with the watches.
        self.checked = threading.Event()

    def request(self, mirror: str, rel: bytes) -> None:
        """Scan ``rel`` (a directory) of ``mirror`` (from any thread)."""
        self._q.put((mirror, rel))

    def check_watches(self) -> None:
        self._check_now = True
        self._q.put(None)

    def stop(self) -> None:
        self._stopping = True
        self._q.put(None)

    def run(self) -> None:
        next_poll = time.monotonic() + POLL_INTERVAL
        next_check = time.monotonic()
        while not self._stopping:
            timeout = max(0.0, min(next_poll, next_check) - time.monotonic())
            try:
                item = self._q.get(timeout=timeout)
            except queue.Empty:
                item = None
            try:
                if item is not None:
                    self._scan_subtree(*item)
                now = time.monotonic()
                if self._check_now or now >= next_check:
                    self._check_now = False
                    self._check()
                    self.checked.set()
                    next_check = now + WATCH_CHECK_INTERVAL
                if now >= next_poll:
                    self._poll()
                    next_poll = now + POLL_INTERVAL
            except Exception:
                log.exception("scanner failed; carrying on")

    def _scan_subtree(self, mirror: str, rel: bytes) -> None:
        ms = self.mirrors.get(mirror)
        if ms is None:
            return
        self._poll_if_too_long(ms, rel)
        for path, st in scan(ms.root, ms.excludes, rel):
            self.route(Dirty(mirror, path, Flag.DATA, st.size))
            if st.kind is EntryKind.DIR:
                self._poll_if_too_long(ms, path)

    @staticmethod
    def _poll_if_too_long(ms: _MirrorScan, rel: bytes) -> None:
        """inotify takes whole paths: a directory whose path is too long can
        never be watched. Poll it from now on, instead of waiting for the
        next watch check to notice."""
        if rel and len(ms.root) + 1 + len(rel) >= INOTIFY_PATH_MAX and rel not in ms.unwatched:
            listing = _list(ms.root, rel)
            if listing is not None:
                ms.unwatched[rel] = listing

    def _check(self) -> None:
        """Compare each mirror's directories with the inotify watches held."""
        watched = watched_inodes()
        for name, ms in self.mirrors.items():
            missing: list[bytes] = []
            n = 0
            try:
                top = os.lstat(ms.root)
            except OSError:
                continue
            if (top.st_dev, top.st_ino) not in watched:
                missing.append(b"")
            for rel, st, _, _ in Source(ms.root).walk(ms.excludes):
                if not stat.S_ISDIR(st.st_mode):
                    continue
                n += 1
                if (st.st_dev, st.st_ino) not in watched:
                    missing.append(rel)
            ms.dirs, ms.last_check = n + 1, time.time()
            before = set(ms.unwatched)
            ms.unwatched = {
                rel: ms.unwatched.get(rel) or _list(ms.root, rel) or {} for rel in missing
            }
            if missing and set(missing) != before:
                log.warning(
                    "mirror %s: %d of %d directories have no inotify watch (watch limit "
                    "fs.inotify.max_user_watches reached, or a path longer than inotify "
                    "takes?); polling them every %.0f s. Raise the limit: "
                    "sysctl fs.inotify.max_user_watches=1048576",
                    name,
                    len(missing),
                    ms.dirs,
                    POLL_INTERVAL,
                    extra={"MIRROR": name},
                )
                for rel in set(missing) - before:  # changes made before polling began
                    if rel:
                        self._scan_subtree(name, rel)
            elif not missing and before:
                log.info(
                    "mirror %s: every directory is watched again", name, extra={"MIRROR": name}
                )

    def _poll(self) -> None:
        for name, ms in self.mirrors.items():
            for rel, before in list(ms.unwatched.items()):
                now_listing = _list(ms.root, rel)
                if now_listing is None:
                    del ms.unwatched[rel]
                    continue
                for entry in set(before) | set(now_listing):
                    if before.get(entry) != now_listing.get(entry):
                        path = rel + b"/" + entry if rel else entry
                        if path == STATE_DIR or ms.excludes(path):
                            continue
                        self.route(Dirty(name, path, Flag.DATA))
                        info = now_listing.get(entry)
                        if info and stat.S_ISDIR(info[0]) and entry not in before:
                            self._scan_subtree(name, path)
                ms.unwatched[rel] = now_listing

    def status(self) -> dict[str, dict[str, Any]]:
        return {
            n: {
                "dirs": ms.dirs,
                "unwatched_dirs": len(ms.unwatched),
                "last_watch_check": ms.last_check,
            }
            for n, ms in self.mirrors.items()
        }
