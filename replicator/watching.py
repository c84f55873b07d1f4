"""WatchSupervisor: the watcher and the scanner of the pushed mirrors, and
keeping them working.

It owns the Watcher (inotify), the Scanner (subtree scans, polling of
unwatched directories), the overflow hook on watchdog's logger, and their
status fields (watcher restarts, overflows). ``apply`` (re)starts both when
the pushed mirrors' paths or excludes change. ``check``, once a second on the
main thread, rescans every mirror once inotify overflows have stopped, and
restarts the watcher if it died or a mirror root lost its inotify watch
(unmounted, or the directory replaced).

Only the main thread calls ``apply``, ``check`` and ``stop``; ``status``,
``scans`` and ``first_scan_done`` may be called from any thread (each reads
the watcher or scanner once).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .changes import Reconcile
from .config import Config
from .manifest import Excludes
from .scanner import Scanner
from .watcher import OverflowHook, Watcher, watched_inodes

log = logging.getLogger("replicator")

#: How often every mirror root's inotify watch is verified.
ROOT_CHECK_INTERVAL = 2.0
#: Reconcile once inotify has not overflowed for this long.
OVERFLOW_QUIET = 0.5

#: Pushed mirror -> (path, exclude patterns), as configured.
Pushed = dict[str, tuple[str, list[str]]]


def pushed_mirrors(cfg: Config) -> Pushed:
    """The mirrors ``cfg`` pushes somewhere: those that are watched."""
    return {n: (m.path, list(m.exclude)) for n, m in cfg.mirrors.items() if m.push_to}


class WatchSupervisor:
    """The watcher, the scanner, and their supervision."""

    def __init__(
        self,
        route: Callable[[object], None],
        stopping: threading.Event,
        watched: Callable[[set[tuple[int, int]]], set[tuple[int, int]]] = watched_inodes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.route = route
        self.stopping = stopping
        self._watched = watched
        self._clock = clock
        self._mirrors: Pushed = {}
        self.watcher: Watcher | None = None
        self.scanner: Scanner | None = None
        self._overflow = OverflowHook(self._on_overflow)
        self._last_overflow = 0.0
        self._overflow_handled = 0.0
        self._next_root_check = 0.0
        self.overflows = 0
        self.restarts = 0

    # -- lifecycle ---------------------------------------------------------------

    def _pushed(self) -> dict[str, tuple[bytes, Excludes]]:
        return {
            name: (os.fsencode(path), Excludes(exclude))
            for name, (path, exclude) in self._mirrors.items()
        }

    def apply(self, cfg: Config) -> bool:
        """Watch the mirrors ``cfg`` pushes: restart the watcher and the
        scanner if their paths or excludes changed. True if it did."""
        mirrors = pushed_mirrors(cfg)
        if mirrors == self._mirrors:
            return False
        self.stop()
        self._mirrors = mirrors
        pushed = self._pushed()
        if pushed:
            self.scanner = Scanner(pushed, self.route)
            self.watcher = Watcher(pushed, self.route, self.scanner.request)
            self._overflow.install()
            self.watcher.start()
            self.scanner.start()
        return True

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        self._overflow.remove()
        if self.scanner is not None:
            self.scanner.stop()
            self.scanner = None

    def first_scan_done(self) -> bool:
        """Watches are in place and every pushed mirror was walked once."""
        scanner = self.scanner
        return scanner is None or scanner.checked.is_set()

    # -- supervision ---------------------------------------------------------------

    def _on_overflow(self) -> None:
        # Called from watchdog's thread, often many times in a row during a
        # burst: check rescans once the overflows have stopped.
        self.overflows += 1
        self._last_overflow = self._clock()

    def _rescan_after_overflow(self) -> None:
        if self._last_overflow <= self._overflow_handled:
            return
        if self._clock() - self._last_overflow < OVERFLOW_QUIET:
            return
        self._overflow_handled = self._last_overflow
        log.warning(
            "inotify queue overflowed (%d times so far): events were lost; rescanning every "
            "mirror. Consider raising fs.inotify.max_queued_events",
            self.overflows,
        )
        self.route(Reconcile(None))
        if self.scanner is not None:
            self.scanner.check_watches()

    def roots_watched(self) -> bool:
        """Whether every pushed mirror's root holds an inotify watch. A root
        loses it when its filesystem is unmounted (and a remount does not
        bring it back) or when the directory is replaced."""
        roots = set()
        for root, _ in self._pushed().values():
            try:
                st = os.stat(root)
            except OSError:
                continue  # missing root: nothing to watch (the marker check says so)
            roots.add((st.st_dev, st.st_ino))
        # Only the roots are looked for: parsing every watch (10k of them,
        # 1.2 MB) held the GIL for ~12 ms each time.
        return not roots or self._watched(roots) >= roots

    def check(self) -> list[str]:
        """Called every second: rescan after overflows, restart a dead
        watcher (or one whose roots lost their watches). Returns why the
        watcher was restarted (empty: nothing was wrong)."""
        self._rescan_after_overflow()
        w = self.watcher
        now = self._clock()
        if w is None or self.stopping.is_set():
            return []
        reason = None
        if not w.alive():
            reason = "the file watcher died"
        elif now >= self._next_root_check:
            self._next_root_check = now + ROOT_CHECK_INTERVAL
            if not self.roots_watched():
                reason = "a mirror root lost its inotify watch (unmounted or replaced?)"
        if reason is None:
            return []
        self._restart_watcher(reason)
        return [reason]

    def _restart_watcher(self, reason: str) -> None:
        self.restarts += 1
        log.error("%s; restarting the watcher and rescanning every mirror", reason)
        if self.watcher is not None:
            self.watcher.stop()
        scanner = self.scanner
        assert scanner is not None
        pushed = {n: v for n, v in self._pushed().items() if os.path.isdir(v[0])}
        self.watcher = Watcher(pushed, self.route, scanner.request)
        try:
            self.watcher.start()
        except OSError as e:
            log.error("cannot restart the file watcher: %s", e)
        self.route(Reconcile(None))
        scanner.check_watches()

    def dead(self) -> list[str]:
        """Workers that died and are not restarted: the scanner."""
        scanner = self.scanner
        return ["scanner"] if scanner is not None and not scanner.is_alive() else []

    # -- status ---------------------------------------------------------------------

    def scans(self) -> dict[str, dict[str, Any]]:
        """The scanner's status per mirror (only watched mirrors appear)."""
        scanner = self.scanner
        return scanner.status() if scanner is not None else {}

    def status(self) -> dict[str, Any]:
        watcher = self.watcher
        return {
            "alive": watcher.alive() if watcher else None,
            "restarts": self.restarts,
            "overflows": self.overflows,
        }
