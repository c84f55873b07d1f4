"""The hasher thread and a source truncated while it is being hashed."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from replicator.blockmap import MIN_BLOCK, XXH3_128, map_bytes, map_fd
from replicator.errors import SourceShrank
from replicator.hashing import Hasher


def test_source_truncated_while_hashed_raises(tmp_path: Path) -> None:
    """A writer truncates the file between two blocks of the hash: the map
    is never made from what is left (SourceShrank), nothing crashes (no
    mmap: no SIGBUS)."""
    f = tmp_path / "f"
    f.write_bytes(os.urandom(4 * MIN_BLOCK))
    fd = os.open(f, os.O_RDONLY)
    calls = []

    def truncate_after_first_block() -> bool:
        if not calls:
            os.truncate(f, MIN_BLOCK + 10)
        calls.append(1)
        return False

    try:
        with pytest.raises(SourceShrank, match="ended at"):
            map_fd(fd, 4 * MIN_BLOCK, XXH3_128, MIN_BLOCK, cancelled=truncate_after_first_block)
    finally:
        os.close(fd)


def test_hasher_reports_a_shrunk_source_and_wakes_the_link(tmp_path: Path) -> None:
    f = tmp_path / "f"
    data = os.urandom(3 * MIN_BLOCK)
    f.write_bytes(data)
    woken = threading.Event()
    h = Hasher("test-hash", woken.set)
    try:
        fd = os.open(f, os.O_RDONLY)
        good = h.submit(fd, len(data), XXH3_128, MIN_BLOCK)
        short = h.submit(fd, len(data) + 1, XXH3_128, MIN_BLOCK)  # the file is shorter
        os.close(fd)  # the jobs hold their own descriptors
        assert good.done.wait(10) and short.done.wait(10)
        assert woken.wait(1)
        assert good.map == map_bytes(data, XXH3_128, MIN_BLOCK)
        assert short.map is None and short.error is not None and "ended" in short.error
    finally:
        h.stop()


def test_cancelled_job_is_not_hashed(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * MIN_BLOCK)
    gate = threading.Event()
    h = Hasher("test-hash", gate.wait)  # the first wake blocks the thread
    try:
        fd = os.open(f, os.O_RDONLY)
        first = h.submit(fd, MIN_BLOCK, XXH3_128, MIN_BLOCK)
        second = h.submit(fd, MIN_BLOCK, XXH3_128, MIN_BLOCK)
        os.close(fd)
        second.cancel()
        gate.set()
        assert first.done.wait(10) and second.done.wait(10)
        assert first.map is not None
        assert second.map is None and second.error == "cancelled"
    finally:
        h.stop()
