"""The watcher on a real directory: what a tree moved in produces."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from watchdog.observers import inotify

from replicator.changes import Dirty, Flag
from replicator.manifest import Excludes
from replicator.watcher import Watcher


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
    got: list[object] = []
    scans: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def sink(msg: object) -> None:
        with lock:
            got.append(msg)

    w = Watcher(
        {"m": (os.fsencode(root), Excludes([]))},
        sink,
        lambda m, rel: scans.append((m, rel)),
    )
    w.start()
    try:
        os.rename(staged, root / "tree")
        (root / "live.txt").write_bytes(b"now")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with lock:
                paths = {m.path for m in got if isinstance(m, Dirty)}
            if b"live.txt" in paths and scans:
                break
            time.sleep(0.01)
        time.sleep(0.2)  # anything late would arrive now
    finally:
        w.stop()
    dirty = [m for m in got if isinstance(m, Dirty)]
    assert scans == [("m", b"tree")]
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
