"""The persistent backlog: coalescing, delays, parking, spilling to SQLite."""

from __future__ import annotations

from pathlib import Path

from replicator.backlog import Backlog, Store


def test_coalesces_keeping_first_time_and_all_flags(tmp_path: Path) -> None:
    bl = Backlog({1: "m"}, Store(str(tmp_path / "b.sqlite3"), "p"))
    bl.mark((1, b"a"), (10.0, 5, 1))
    bl.mark((1, b"a"), (20.0, 6, 4))
    bl.mark((1, b"b"), (15.0, 0, 2))
    assert bl.pop(1) == ((1, b"a"), (10.0, 6, 5))
    assert bl.pop(1) == ((1, b"b"), (15.0, 0, 2))
    assert not bl.has_ready(1)


def test_survives_a_restart_oldest_first(tmp_path: Path) -> None:
    db = str(tmp_path / "b.sqlite3")
    bl = Backlog({1: "m", 2: "n"}, Store(db, "p"))
    bl.mark((2, b"late"), (30.0, 0, 1))
    bl.mark((1, b"early"), (10.0, 0, 1))
    bl.mark((1, b"acked"), (5.0, 0, 1))
    key, _ = bl.pop(1)
    assert key == (1, b"early")  # insertion order in memory
    bl.done((1, b"early"))
    bl.close()
    # another process, other mirror ids for the same names
    again = Backlog({7: "n", 8: "m"}, Store(db, "p"))
    assert again.load() == 2
    assert again.pop(8) == ((8, b"acked"), (5.0, 0, 1))
    assert again.pop(7) == ((7, b"late"), (30.0, 0, 1))
    again.close()


def test_spilled_entries_are_persisted_and_read_back(tmp_path: Path) -> None:
    """Entries past memory_max live only in SQLite, including those marked
    with persist=False (a reconcile's): none may be lost (regression)."""
    bl = Backlog({1: "m"}, Store(str(tmp_path / "b.sqlite3"), "p"), memory_max=10)
    for i in range(50):
        bl.mark((1, b"f%02d" % i), (float(i), 0, 1), persist=False)
    assert bl.files() == 50 and bl.spilled == 40
    seen = []
    while bl.has_ready(1) or bl.spilled:
        bl.refill(lambda k: False)
        while bl.has_ready(1):
            key, _ = bl.pop(1)
            seen.append(key[1])
            bl.done(key)
    assert sorted(seen) == [b"f%02d" % i for i in range(50)]


def test_delays_and_parking(tmp_path: Path) -> None:
    bl = Backlog({1: "m"}, None)
    bl.mark((1, b"x"), (1.0, 0, 1), delay=3600)
    assert not bl.has_ready(1) and bl.next_due() is not None
    bl.mark((1, b"x"), (0.5, 0, 2))  # an immediate mark wins over the delay
    assert bl.pop(1) == ((1, b"x"), (0.5, 0, 3))
    bl.park((1, b"y"), (2.0, 0, 1))
    assert not bl.has_ready(1) and bl.files() == 1
    bl.unpark((1, b"y"))
    assert bl.pop(1)[0] == (1, b"y")
