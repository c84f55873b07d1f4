#!/usr/bin/env python3
"""When did each file appear at a destination? Timestamps from inotify.

Run as a child process (``python bench/_arrivals.py ROOT``); ``Arrivals`` is
the parent's handle. The child watches ROOT and every subdirectory (new ones
as they appear; dot-directories such as ``.replicator`` are skipped) for
IN_CLOSE_WRITE | IN_MOVED_TO, and prints ``<monotonic seconds>\\t<relpath>``
for the first event of each file name that does not start with a dot (rsync
and replicator write temporaries elsewhere or under dot names, then rename:
the IN_MOVED_TO of the final name is the moment the file is *published*).

Timestamps: the child sleeps in poll() on the inotify fd and takes
CLOCK_MONOTONIC (system-wide, so comparable with the parent's
``time.monotonic()``) as soon as read() returns, once per read. It is a
separate process, so the benchmark's writer loop and the parent's GIL never
delay it; its resolution is the wake-up latency of poll() plus the time to
parse the previous batch (microseconds when idle, up to a few ms while
10,000 events stream in).

Files that arrived in a new directory before its watch was added are found
by listing the directory right after adding the watch, and stamped with the
time of that listing (late by at most the time to add the watch). On queue
overflow every watched directory is listed the same way and ``!overflow`` is
printed; the parent counts those.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE_SELF = 0x00000400
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF
EVENT = struct.Struct("iIII")


# -- the child: watches and prints ----------------------------------------------------


class _Watcher:
    def __init__(self, root: bytes) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.fd = self.libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.root = root.rstrip(b"/")
        self.dirs: dict[int, bytes] = {}  # wd -> path relative to root (b"" for root)
        self.seen: set[bytes] = set()
        self.out: list[str] = []

    def _add(self, rel: bytes) -> bool:
        path = os.path.join(self.root, rel) if rel else self.root
        wd = self.libc.inotify_add_watch(self.fd, path, MASK | IN_ONLYDIR)
        if wd < 0:
            return False  # gone again, or not a directory
        self.dirs[wd] = rel
        return True

    def add_tree(self, rel: bytes, now: float | None) -> None:
        """Watch ``rel`` and everything below it; with ``now``, record the
        files already there as arrived at the time of the listing."""
        if not self._add(rel):
            return
        path = os.path.join(self.root, rel) if rel else self.root
        try:
            entries = list(os.scandir(path))
        except OSError:
            return
        stamp = time.monotonic()
        for e in entries:
            if e.name.startswith(b"."):
                continue
            sub = os.path.join(rel, e.name) if rel else e.name
            if e.is_dir(follow_symlinks=False):
                self.add_tree(sub, now)
            elif now is not None:
                self._arrived(sub, stamp)

    def _arrived(self, rel: bytes, t: float) -> None:
        if rel not in self.seen:
            self.seen.add(rel)
            self.out.append(f"{t:.6f}\t{os.fsdecode(rel)}\n")

    def _relist(self, now: float) -> None:
        for rel in list(self.dirs.values()):
            self.add_tree(rel, now)

    def handle(self, data: bytes, t: float) -> None:
        i = 0
        while i < len(data):
            wd, mask, _cookie, n = EVENT.unpack_from(data, i)
            name = data[i + EVENT.size : i + EVENT.size + n].rstrip(b"\0")
            i += EVENT.size + n
            if mask & IN_Q_OVERFLOW:
                self.out.append("!overflow\n")
                self._relist(t)
                continue
            if mask & (IN_IGNORED | IN_DELETE_SELF):
                self.dirs.pop(wd, None)
                continue
            parent = self.dirs.get(wd)
            if parent is None or not name or name.startswith(b"."):
                continue
            rel = os.path.join(parent, name) if parent else name
            if mask & IN_ISDIR:
                if mask & (IN_CREATE | IN_MOVED_TO):
                    self.add_tree(rel, t)
            elif mask & (IN_CLOSE_WRITE | IN_MOVED_TO):
                self._arrived(rel, t)

    def flush(self) -> None:
        if self.out:
            data = "".join(self.out).encode()
            self.out.clear()
            view = memoryview(data)
            while view:
                view = view[os.write(1, view) :]


def _child(root: str) -> None:
    w = _Watcher(os.fsencode(root))
    w.add_tree(b"", None)  # what is there already does not count as arriving
    os.write(1, b"ready\n")
    poller = select.poll()
    poller.register(w.fd, select.POLLIN)
    poller.register(0, select.POLLIN)
    while True:
        for fd, _ev in poller.poll():
            if fd == 0:
                if not os.read(0, 4096):
                    return  # the parent closed our stdin (or died)
                continue
            t = time.monotonic()
            while True:
                try:
                    data = os.read(w.fd, 1 << 20)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno == errno.EINTR:
                        continue
                    raise
                w.handle(data, t)
            w.flush()


# -- the parent's handle ---------------------------------------------------------------


class Arrivals:
    """A child process recording when files appear below ``root``.

    ``times`` maps each relative path (str) to the CLOCK_MONOTONIC time of
    its arrival; ``count(prefix)`` counts arrivals below a prefix.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.times: dict[str, float] = {}
        self.overflows = 0
        self._prefix_counts: dict[str, int] = {}
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), os.fspath(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if first != b"ready\n":
            self.close()
            raise RuntimeError(f"arrival watcher failed to start: {first!r}")
        self._thread = threading.Thread(target=self._read, name="arrivals", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "surrogateescape").rstrip("\n")
            with self._cond:
                if line == "!overflow":
                    self.overflows += 1
                    continue
                t, _, rel = line.partition("\t")
                self.times[rel] = float(t)
                top = rel.partition("/")[0] if "/" in rel else ""
                self._prefix_counts[top] = self._prefix_counts.get(top, 0) + 1
                self._cond.notify_all()

    def count(self, top: str) -> int:
        """Arrivals below the top-level directory ``top``."""
        with self._cond:
            return self._prefix_counts.get(top, 0)

    def wait_all(self, names: Iterable[str], timeout: float) -> bool:
        """Wait until every one of ``names`` arrived; False on timeout."""
        want = list(names)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if all(n in self.times for n in want):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))

    def wait_count(self, top: str, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._prefix_counts.get(top, 0) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def last(self, top: str) -> float | None:
        with self._cond:
            ts = [t for rel, t in self.times.items() if rel.startswith(top + "/")]
        return max(ts) if ts else None

    def close(self) -> None:
        p = self.proc
        if p.poll() is None:
            try:
                if p.stdin is not None:
                    p.stdin.close()
                p.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()
                p.wait()
        if p.stdout is not None:
            p.stdout.close()


if __name__ == "__main__":
    _child(sys.argv[1])
