"""Live change detection with watchdog's InotifyObserver.

Facts this module is built on (watchdog 7.1, measured):

- ``InotifyObserver`` directly: the generic ``Observer`` silently falls back
  to polling when inotify is unusable.
- The event filter leaves out opened and close-no-write events: with them in
  the mask, a tree of more than ~5,000 directories overflows the inotify
  queue while watches are added (watchdog's own directory walk opens every
  directory), and never recovers.
- It keeps *modified* events (the first design left them out):
  ``truncate(path)`` and a writer that keeps its file open produce nothing
  else, and would go unnoticed until the next rescan. inotify merges
  repeated IN_MODIFY events while the reader lags, so a big write costs a
  bounded number of events.
  A modified file is marked dirty without CLOSED: the link waits for it to
  settle (or for its close) before sending. IN_ATTRIB comes with the same
  mask bit in watchdog and gives chmod/touch/chown as attribute events.
- The handler must never raise (an exception kills watchdog's dispatch
  thread silently) and never block: it turns each event into a message and
  returns. ``alive()`` lets the daemon notice a dead observer.
- watchdog reports queue overflow only as a WARNING on logger
  ``watchdog.observers.inotify_c``; ``OverflowHook`` turns that into a
  rescan. Failures to watch a subdirectory (watch limit) are swallowed by
  watchdog; ``watched_inodes`` reads the real watch list from
  /proc/self/fdinfo so the daemon can compare it with the directories.
- When a directory is moved in or renamed, watchdog walks the whole subtree
  on its only inotify-reading thread to invent a created (or moved) event
  for every entry below it. The handler ignores those (the scan of the
  directory finds the entries, as bulk work), and the walk held every live
  event behind it: a 68k-entry tree moved in delayed a 4 KiB file written
  next to it by 3.6 s. So the two generators are replaced by empty ones
  (``_skip_sub_events``).
- watchdog also adds the watches below a directory moved in from outside on
  that thread, walking the whole subtree first (``_add_all_callbacks``): a
  68k-entry tree (5k directories) held every live event for 0.25-0.35 s. So
  only the directory's own watch is added there; the watches below it are
  added by ``_Walker``, a thread of its own, one directory at a time (each
  before it is listed, as watchdog does), and the scan of the directory
  waits until they are all in place (else a file written in a directory the
  scan had passed, before its watch existed, would be missed). A directory
  created (mkdir) is left to watchdog: what is below it was written since,
  and watchdog's invented events for it keep those files live.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import watchdog.observers.inotify as _wd_inotify
from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver
from watchdog.observers.inotify import InotifyEmitter, InotifyObserver, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyEvent, InotifyFD, Mask, WatchDescriptor

from .changes import Dirty, Flag, Moved
from .manifest import Excludes
from .paths import STATE_DIR

log = logging.getLogger(__name__)

EVENT_FILTER = [
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileAttribEvent,
    FileModifiedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    DirAttribEvent,
]


#: The flags of each kind of event, computed once (enum operators are slow).
_NEW = Flag.DATA | Flag.CLOSED | Flag.LIVE | Flag.NAME
_CHANGED = Flag.DATA | Flag.LIVE | Flag.NAME
_WRITTEN = Flag.DATA | Flag.LIVE
_CLOSED = Flag.CLOSED | Flag.LIVE
_ATTRIB = Flag.ATTRIB | Flag.LIVE


def _no_sub_events(*paths: object) -> Iterator[FileSystemEvent]:
    return iter(())


def _skip_sub_events() -> None:
    """See the module docstring (watchdog 7.1 looks these names up in its
    inotify module at each event)."""
    setattr(_wd_inotify, "generate_sub_created_events", _no_sub_events)  # noqa: B010
    setattr(_wd_inotify, "generate_sub_moved_events", _no_sub_events)  # noqa: B010


_skip_sub_events()

#: The logger and message watchdog uses for inotify queue overflow.
OVERFLOW_LOGGER = "watchdog.observers.inotify_c"
OVERFLOW_TEXT = "overflow"


#: Receives every message the watcher produces: (mirror, message).
Sink = Callable[[object], None]
#: Asked to scan a subtree (a directory created or moved in): (mirror, path).
ScanRequest = Callable[[str, bytes], None]


def _related(a: bytes, b: bytes) -> bool:
    """One of the paths is the other or below it."""
    return a == b or a.startswith(b + b"/") or b.startswith(a + b"/")


class _Walker(threading.Thread):
    """Adds the watches below directories moved in (see the module
    docstring), in the order they came, and runs what waits for them."""

    def __init__(self) -> None:
        super().__init__(name="watch-walker", daemon=True)
        self._q: queue.SimpleQueue[tuple[_WatchGroup, bytes, WatchDescriptor] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._pending: list[bytes] = []
        self._parked: list[tuple[bytes, Callable[[], None]]] = []

    def add(self, group: _WatchGroup, path: bytes, wd: WatchDescriptor) -> None:
        """Watch every directory below ``path``, whose watch is ``wd`` (from
        watchdog's thread)."""
        with self._lock:
            self._pending.append(path)
        self._q.put((group, path, wd))

    def when_watched(self, path: bytes, then: Callable[[], None]) -> None:
        """Call ``then`` now, or once no walk of, above or below ``path`` is
        pending."""
        with self._lock:
            if any(_related(path, p) for p in self._pending):
                self._parked.append((path, then))
                return
        then()

    def stop(self) -> None:
        self._q.put(None)

    def run(self) -> None:
        while (item := self._q.get()) is not None:
            group, path, wd = item
            try:
                group.watch_below(wd)
            except Exception:
                log.exception("watcher: failed to watch below %r", path)
            with self._lock:
                self._pending.remove(path)
                parked, self._parked = self._parked, []
                ready: list[tuple[bytes, Callable[[], None]]] = []
                for x in parked:
                    waits = any(_related(x[0], p) for p in self._pending)
                    (self._parked if waits else ready).append(x)
            for _, then in ready:
                try:
                    then()
                except Exception:
                    log.exception("watcher: failed after watching below %r", path)


class _WatchGroup(InotifyWatchGroup):
    """watchdog's watches of one mirror, but for a directory moved in only
    its own watch is added on watchdog's thread; the walker adds the rest."""

    def __init__(
        self,
        walker: _Walker,
        inotify_fd: InotifyFD,
        path: bytes,
        *,
        is_recursive: bool,
        event_mask: Mask,
        follow_symlink: bool,
    ) -> None:
        self._walker = walker
        self._moved_in: int | None = None  # the thread handling a directory moved in
        super().__init__(
            inotify_fd,
            path,
            is_recursive=is_recursive,
            event_mask=event_mask,
            follow_symlink=follow_symlink,
        )

    def on_event(self, event: InotifyEvent) -> None:
        if event.is_moved_to and event.is_directory:
            self._moved_in = threading.get_ident()
        try:
            super().on_event(event)
        finally:
            self._moved_in = None

    def _add_all_callbacks(self, path: bytes) -> None:
        if self._moved_in != threading.get_ident():
            super()._add_all_callbacks(path)
            return
        self._add_callback(path)
        wd = self._active_callbacks_by_path.get(path)
        if self.is_recursive and wd is not None:
            self._walker.add(self, path, wd)

    def watch_below(self, top: WatchDescriptor) -> None:
        """What watchdog's ``_add_all_callbacks`` does below the directory of
        watch ``top``, one directory at a time: listed without the group's
        lock, its subdirectories' watches added under it (events are handled
        in between). Each directory is found again by its watch, whose path
        the group keeps up to date: a directory renamed meanwhile is still
        walked (if its rename was handled by then; else once it is)."""
        follow = self.follow_symlink
        todo, seen = [top], {top}
        failed: dict[WatchDescriptor, bytes] = {}
        while todo:
            wd = todo.pop()
            with self._lock:
                where = self._active_callbacks_by_watch.get(wd) if self.is_active else None
            if where is None:
                continue  # gone, or stopped
            try:  # not under the lock: a listing may take its time
                with os.scandir(where) as it:
                    names = [e.name for e in it if e.is_dir(follow_symlinks=follow)]
            except OSError:
                failed[wd] = where
                names = []
            with self._lock:
                if not self.is_active:
                    return
                now = self._active_callbacks_by_watch.get(wd)  # renamed meanwhile?
                for name in names:
                    if now is None:
                        break  # gone
                    full = os.path.join(now, name)
                    self._add_callback(full)
                    child = self._active_callbacks_by_path.get(full)
                    if child is not None and child not in seen:
                        seen.add(child)
                        todo.append(child)
                if not todo:  # once more for those renamed (or gone) while walked
                    todo = [
                        w
                        for w, was in failed.items()
                        if self._active_callbacks_by_watch.get(w, was) != was
                    ]
                    failed.clear()


class _Emitter(InotifyEmitter):
    def __init__(self, *args: Any, walker: _Walker, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._walker = walker

    def on_thread_start(self) -> None:  # watchdog's, with _WatchGroup
        self._inotify = _WatchGroup(
            self._walker,
            self._inotify_fd,
            os.fsencode(self.watch.path),
            is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(),
            follow_symlink=self.watch.follow_symlink,
        )


class _Observer(InotifyObserver):
    def __init__(self, walker: _Walker) -> None:  # watchdog's, with _Emitter
        self._inotify_fd = InotifyFD()
        self._inotify_fd.start()
        BaseObserver.__init__(
            self,
            _Emitter,
            timeout=DEFAULT_OBSERVER_TIMEOUT,
            inotify_fd=self._inotify_fd,
            walker=walker,
        )


class _Handler(FileSystemEventHandler):
    def __init__(
        self, mirror: str, root: bytes, excludes: Excludes, sink: Sink, scan: ScanRequest
    ) -> None:
        self.mirror = mirror
        self.root = root
        self.prefix = root.rstrip(b"/") + b"/"
        self.excludes = excludes
        self.sink = sink
        self.scan = scan
        self.errors = 0

    def _rel(self, path: bytes | str) -> bytes | None:
        p = os.fsencode(path)
        if not p.startswith(self.prefix):
            return None
        rel = p[len(self.prefix) :]
        if not rel or rel == STATE_DIR or rel.startswith(STATE_DIR + b"/"):
            return None
        return rel

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._on(event)
        except Exception:  # never let an exception kill watchdog's thread
            self.errors += 1
            if self.errors <= 10:
                log.exception("watcher: failed to handle %r", event)

    def _on(self, ev: FileSystemEvent) -> None:
        """Every change seen here is live (Flag.LIVE): it goes ahead of bulk
        work; what ``scan`` finds under a directory moved in is bulk."""
        m = self.mirror
        if isinstance(ev, (FileMovedEvent, DirMovedEvent)):
            if ev.is_synthetic:
                return  # a child of a moved directory: implied by the directory's move
            src, dst = self._rel(ev.src_path), self._rel(ev.dest_path)
            if dst is not None and self.excludes(dst):
                dst = None
            if src is not None and dst is not None and not self.excludes(src):
                self.sink(Moved(m, src, dst, ev.is_directory))
            elif dst is not None:
                # From the daemon's own partial folder (a file just received)
                # or from an excluded name (an editor's temp file): new here.
                self.sink(Dirty(m, dst, _NEW))
                if ev.is_directory:
                    self.scan(m, dst)
            elif src is not None and not self.excludes(src):
                self.sink(Dirty(m, src, _CHANGED))  # moved out: gone
            return
        rel = self._rel(ev.src_path)
        if rel is None or self.excludes(rel):
            return
        if isinstance(ev, FileClosedEvent):
            # Not DATA by itself: GNU touch opens for writing, so a touch is
            # IN_ATTRIB + IN_CLOSE_WRITE; a write() also brings IN_MODIFY. An
            # mmap write brings only IN_CLOSE_WRITE (no ATTRIB): the link
            # then sends data, since nothing says it was a touch.
            self.sink(Dirty(m, rel, _CLOSED))
        elif isinstance(ev, (FileAttribEvent, DirAttribEvent)):
            self.sink(Dirty(m, rel, _ATTRIB))
        elif isinstance(ev, DirCreatedEvent):
            self.sink(Dirty(m, rel, _CHANGED))
            self.scan(m, rel)
        elif isinstance(ev, FileModifiedEvent):
            self.sink(Dirty(m, rel, _WRITTEN))
        else:  # created, deleted
            self.sink(Dirty(m, rel, _CHANGED))


class Watcher:
    """One InotifyObserver watching every mirror this node pushes."""

    def __init__(
        self, mirrors: dict[str, tuple[bytes, Excludes]], sink: Sink, scan: ScanRequest
    ) -> None:
        self.mirrors = mirrors
        self.sink = sink
        self.scan = scan
        self._observer: InotifyObserver | None = None
        self._walker: _Walker | None = None
        self.handlers: dict[str, _Handler] = {}

    def start(self) -> None:
        walker = self._walker = _Walker()
        walker.start()
        obs = _Observer(walker)
        for name, (root, excludes) in sorted(self.mirrors.items()):
            h = _Handler(name, root, excludes, self.sink, self._scan_when_watched)
            self.handlers[name] = h
            obs.schedule(h, os.fsdecode(root), recursive=True, event_filter=EVENT_FILTER)
        obs.start()
        self._observer = obs

    def _scan_when_watched(self, mirror: str, rel: bytes) -> None:
        """Ask for the scan of ``rel`` once the walker has watched what is
        below it (and below anything around it moved in)."""
        walker = self._walker
        if walker is None:
            return
        path = self.handlers[mirror].prefix + rel
        walker.when_watched(path, lambda: self.scan(mirror, rel))

    def alive(self) -> bool:
        obs = self._observer
        return obs is not None and obs.is_alive()

    def stop(self) -> None:
        obs, self._observer = self._observer, None
        if obs is not None:
            obs.stop()
            obs.join(10)
        walker, self._walker = self._walker, None
        if walker is not None:
            walker.stop()
            walker.join(10)


_WATCH_LINE = re.compile(rb"^inotify wd:\w+ ino:([0-9a-f]+) sdev:([0-9a-f]+)", re.M)


def watched_inodes(among: Iterable[tuple[int, int]] | None = None) -> set[tuple[int, int]]:
    """(device, inode) of every inotify watch this process holds, read from
    /proc/self/fdinfo (watchdog does not say which watches failed); only
    those of ``among``, if given: then each is looked for as text, and the
    list (about 120 bytes a watch) is not parsed."""
    out: set[tuple[int, int]] = set()
    # fdinfo shows the kernel's dev_t: major in bits 20+, minor below.
    needles = (
        None
        if among is None
        else {
            b" ino:%x sdev:%x " % (ino, os.major(dev) << 20 | os.minor(dev)): (dev, ino)
            for dev, ino in among
        }
    )
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
                text = f.read()
        except OSError:
            continue
        if needles is not None:
            out.update(key for needle, key in needles.items() if needle in text)
            continue
        for ino, sdev in _WATCH_LINE.findall(text):
            dev = int(sdev, 16)
            out.add((os.makedev(dev >> 20, dev & 0xFFFFF), int(ino, 16)))
    return out


class OverflowHook(logging.Handler):
    """Sees every warning of watchdog's inotify loggers: calls
    ``on_overflow`` for each queue overflow, and passes the records on to the
    daemon's own handlers, overflow warnings at most once a minute (a burst
    can overflow hundreds of times)."""

    LOGGERS = (OVERFLOW_LOGGER, "watchdog.observers.inotify")

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.on_overflow = on_overflow
        self._last_shown = 0.0
        self.suppressed = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if OVERFLOW_TEXT in record.getMessage().lower():
                self.on_overflow()
                now = time.monotonic()
                if now - self._last_shown < 60:
                    self.suppressed += 1
                    return
                self._last_shown = now
            for h in logging.getLogger().handlers:
                if record.levelno >= h.level:
                    h.handle(record)
        except Exception:
            pass

    def install(self) -> None:
        for name in self.LOGGERS:
            lg = logging.getLogger(name)
            lg.addHandler(self)
            lg.propagate = False

    def remove(self) -> None:
        for name in self.LOGGERS:
            lg = logging.getLogger(name)
            lg.removeHandler(self)
            lg.propagate = True
