"""WatchSupervisor's checks on a real watcher and scanner (inotify on a
temporary directory; no sockets): when it restarts the watcher, when it
rescans after overflows, what it reports."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator import config
from replicator.changes import Reconcile
from replicator.config import Config
from replicator.watcher import OVERFLOW_LOGGER, watched_inodes
from replicator.watching import OVERFLOW_QUIET, WatchSupervisor


def cfg(root: Path, exclude: str = "", push: bool = True) -> Config:
    return config.parse(f"""
[node]
name = "a"
listen = "127.0.0.1:7301"

[peers.b]
address = "127.0.0.2:7301"
key_file = "/k/a-b.key"

[mirrors.m]
path = "{root}"
push_to = [{'"b"' if push else ""}]
exclude = [{exclude}]
""")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def routed() -> list[object]:
    return []


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sup(routed: list[object], clock: Clock) -> Iterator[WatchSupervisor]:
    s = WatchSupervisor(routed.append, threading.Event(), clock=clock)
    yield s
    s.stop()


def test_nothing_pushed_nothing_watched(sup: WatchSupervisor, tmp_path: Path) -> None:
    assert not sup.apply(cfg(tmp_path, push=False))
    assert sup.watcher is None and sup.scanner is None
    assert sup.first_scan_done() and sup.check() == [] and sup.dead() == []
    assert sup.status() == {"alive": None, "restarts": 0, "overflows": 0}


def test_apply_restarts_only_when_paths_or_excludes_change(
    sup: WatchSupervisor, tmp_path: Path
) -> None:
    assert sup.apply(cfg(tmp_path))
    watcher, scanner = sup.watcher, sup.scanner
    assert watcher is not None and watcher.alive() and scanner is not None
    assert not sup.apply(cfg(tmp_path))
    assert sup.watcher is watcher
    assert sup.apply(cfg(tmp_path, exclude='"*.tmp"'))
    assert sup.watcher is not watcher and not watcher.alive()
    assert sup.scanner is not scanner
    assert sup.apply(cfg(tmp_path, push=False))
    assert sup.watcher is None and sup.scanner is None


def test_healthy_then_a_dead_watcher_is_restarted(
    sup: WatchSupervisor, tmp_path: Path, routed: list[object]
) -> None:
    sup.apply(cfg(tmp_path))
    assert sup.check() == []
    assert routed == []
    old = sup.watcher
    assert old is not None
    old.stop()  # the observer is gone: the watcher is dead
    assert sup.check() == ["the file watcher died"]
    assert sup.watcher is not old and sup.watcher is not None and sup.watcher.alive()
    assert routed == [Reconcile(None)]
    assert sup.status()["restarts"] == 1
    assert sup.check() == []


def test_a_root_without_its_watch_restarts_the_watcher(
    routed: list[object], clock: Clock, tmp_path: Path
) -> None:
    watched: set[tuple[int, int]] = set()
    sup = WatchSupervisor(
        routed.append, threading.Event(), watched=lambda among: watched & among, clock=clock
    )
    try:
        sup.apply(cfg(tmp_path))
        assert not sup.roots_watched()
        assert sup.check() == ["a mirror root lost its inotify watch (unmounted or replaced?)"]
        st = tmp_path.stat()
        watched.add((st.st_dev, st.st_ino))
        clock.now += 10
        assert sup.roots_watched() and sup.check() == []
    finally:
        sup.stop()


def test_roots_are_checked_every_interval_only(
    routed: list[object], clock: Clock, tmp_path: Path
) -> None:
    calls = []

    def watched(among: set[tuple[int, int]]) -> set[tuple[int, int]]:
        calls.append(clock.now)
        st = tmp_path.stat()
        return {(st.st_dev, st.st_ino)}

    sup = WatchSupervisor(routed.append, threading.Event(), watched=watched, clock=clock)
    try:
        sup.apply(cfg(tmp_path))
        for _ in range(3):
            assert sup.check() == []
            clock.now += 1.0
        assert len(calls) == 2  # at 0 s and at 2 s
    finally:
        sup.stop()


def test_overflows_rescan_once_they_stop(
    sup: WatchSupervisor, tmp_path: Path, routed: list[object], clock: Clock
) -> None:
    sup.apply(cfg(tmp_path))
    for _ in range(3):  # what watchdog logs when the inotify queue overflows
        logging.getLogger(OVERFLOW_LOGGER).warning("inotify event queue overflowed")
    assert sup.status()["overflows"] == 3
    sup.check()
    assert routed == []  # still overflowing: wait for quiet
    clock.now += OVERFLOW_QUIET
    sup.check()
    assert routed == [Reconcile(None)]
    clock.now += 10
    sup.check()
    assert routed == [Reconcile(None)]  # once per burst


def test_while_stopping_nothing_is_restarted(
    routed: list[object], clock: Clock, tmp_path: Path
) -> None:
    stopping = threading.Event()
    sup = WatchSupervisor(routed.append, stopping, clock=clock)
    try:
        sup.apply(cfg(tmp_path))
        assert sup.watcher is not None
        sup.watcher.stop()
        stopping.set()
        assert sup.check() == [] and sup.status()["restarts"] == 0
    finally:
        sup.stop()


def test_a_dead_scanner_is_reported(sup: WatchSupervisor, tmp_path: Path) -> None:
    sup.apply(cfg(tmp_path))
    scanner = sup.scanner
    assert scanner is not None and sup.dead() == []
    # The real thread ends (as an uncaught exception would end it); joining
    # and asking it must work (an attribute named _stop once hid
    # Thread._stop and made both raise TypeError).
    scanner.stop()
    scanner.join(10)
    assert not scanner.is_alive()
    assert sup.dead() == ["scanner"]


def test_watched_inodes_among_finds_the_roots_without_parsing_every_watch(
    tmp_path: Path,
) -> None:
    """The text search for given inodes agrees with the full parse, on real
    inotify watches of this process."""

    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    assert fd >= 0
    try:
        dirs = [tmp_path / f"d{i}" for i in range(20)]
        for d in dirs:
            d.mkdir()
            assert libc.inotify_add_watch(fd, os.fsencode(d), 0x100) >= 0  # IN_CREATE
        keys = {(d.stat().st_dev, d.stat().st_ino) for d in dirs}
        assert keys <= watched_inodes()
        some = set(list(keys)[:3])
        absent = (tmp_path.stat().st_dev, tmp_path.stat().st_ino)
        assert watched_inodes(some | {absent}) == some
    finally:
        os.close(fd)
