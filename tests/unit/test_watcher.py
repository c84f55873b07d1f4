"""The watcher on a real directory: what a tree moved in produces."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from watchdog.observers import inotify

from replicator.changes import Dirty, Flag
from replicator.localcluster import wait_for
from replicator.manifest import Excludes
from replicator.watcher import Watcher, watched_inodes


class Collected:
    """A watcher's sink that keeps what it gets, and its scan requests."""

    def __init__(self) -> None:
        self.got: list[object] = []
        self.scans: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, msg: object) -> None:
        with self.lock:
            self.got.append(msg)

    def scan(self, mirror: str, rel: bytes) -> None:
        with self.lock:
            self.scans.append((mirror, rel))

    def paths(self) -> set[bytes]:
        with self.lock:
            return {m.path for m in self.got if isinstance(m, Dirty)}


def test_watchdog_invents_no_events_below_a_moved_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x")
    assert list(inotify.generate_sub_created_events(str(tmp_path))) == []
    assert list(inotify.generate_sub_moved_events(str(tmp_path), str(tmp_path / "e"))) == []


def test_a_tree_moved_in_is_one_live_change_and_one_scan(tmp_path: Path) -> None:
    """Its entries are the scan's (bulk); a file written next to it stays live
    and is seen at once."""
    root = tmp_path / "m"
    root.mkdir()
    staged = tmp_path / "staged"
    for d in range(20):
        (staged / f"d{d}").mkdir(parents=True)
        for f in range(50):
            (staged / f"d{d}" / f"f{f}").write_bytes(b"x")
    c = Collected()
    w = Watcher({"m": (os.fsencode(root), Excludes([]))}, c, c.scan)
    w.start()
    try:
        os.rename(staged, root / "tree")
        (root / "live.txt").write_bytes(b"now")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if b"live.txt" in c.paths() and c.scans:
                break
            time.sleep(0.01)
        time.sleep(0.2)  # anything late would arrive now
    finally:
        w.stop()
    dirty = [m for m in c.got if isinstance(m, Dirty)]
    assert c.scans == [("m", b"tree")]
    assert {m.path for m in dirty} == {b"tree", b"live.txt"}
    assert all(m.flags & Flag.LIVE for m in dirty)


def test_entries_made_removed_or_moved_say_name_and_writes_do_not(tmp_path: Path) -> None:
    """Flag.NAME: the directory's entries changed (pump._names_changed looks
    at the directory's mtime and at what the peer holds below a replaced
    directory); a write to an existing file changes no entry."""
    root = tmp_path / "m"
    root.mkdir()
    (root / "kept").write_bytes(b"x")
    got: list[Dirty] = []
    lock = threading.Lock()

    def sink(msg: object) -> None:
        if isinstance(msg, Dirty):
            with lock:
                got.append(msg)

    w = Watcher({"m": (os.fsencode(root), Excludes([]))}, sink, lambda m, rel: None)
    w.start()
    try:
        with (root / "kept").open("r+b") as f:  # IN_MODIFY, IN_CLOSE_WRITE
            f.write(b"y")
        (root / "tmp").write_bytes(b"t")
        (root / "tmp").unlink()
        (root / "d").mkdir()
        os.rename(root / "d", tmp_path / "out")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with lock:
                if sum(m.path == b"d" for m in got) >= 2:
                    break
            time.sleep(0.01)
        time.sleep(0.2)
    finally:
        w.stop()
    flags: dict[bytes, int] = {}
    for m in got:
        flags[m.path] = flags.get(m.path, 0) | m.flags
    assert not flags[b"kept"] & Flag.NAME
    assert flags[b"tmp"] & Flag.NAME
    assert flags[b"d"] & Flag.NAME


def test_a_live_file_is_seen_while_the_watches_below_a_tree_moved_in_are_added(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adding the watches below a tree moved in walks all of it: that walk is
    held here (every listing of a directory of the tree waits), and a file
    written next to the tree must still be seen meanwhile. The tree's scan
    waits for the walk (a file written in a directory the scan had passed,
    before its watch existed, would be missed); once it is done, every
    directory of the tree is watched."""
    root = tmp_path / "m"
    root.mkdir()
    staged = tmp_path / "staged"
    for d in range(5):
        (staged / f"d{d}" / "deep" / "er").mkdir(parents=True)
        (staged / f"d{d}" / "deep" / "er" / "f").write_bytes(b"x")
    tree = os.fsencode(root / "tree")
    release, walking = threading.Event(), threading.Event()
    scandir = os.scandir

    def held(path: Any = ".") -> Any:  # os.walk lists with os.scandir too
        p = os.fsencode(path)
        if p == tree or p.startswith(tree + b"/"):
            walking.set()
            release.wait(30)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", held)
    c = Collected()
    w = Watcher({"m": (os.fsencode(root), Excludes([]))}, c, c.scan)
    w.start()
    try:
        os.rename(staged, root / "tree")
        assert walking.wait(10), "the watches below the tree were not added"
        (root / "live.txt").write_bytes(b"now")
        wait_for(lambda: b"live.txt" in c.paths(), 10, "live.txt while the walk is held")
        assert b"tree" in c.paths()
        assert c.scans == [], "the scan did not wait for the watches"
        release.set()
        wait_for(lambda: c.scans == [("m", b"tree")], 10, "the scan of the tree")
        dirs = [os.lstat(p) for p, _, _ in os.walk(root / "tree")]
        assert watched_inodes({(st.st_dev, st.st_ino) for st in dirs}) == {
            (st.st_dev, st.st_ino) for st in dirs
        }
        (root / "tree" / "d3" / "deep" / "er" / "new").write_bytes(b"y")
        wait_for(lambda: b"tree/d3/deep/er/new" in c.paths(), 10, "a file written deep in the tree")
    finally:
        release.set()
        w.stop()
