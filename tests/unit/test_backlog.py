"""The persistent backlog: coalescing, delays, parking, spilling to SQLite."""

from __future__ import annotations

import time
from pathlib import Path

from replicator.backlog import LIVE_RUN, Backlog, Info, Store
from replicator.changes import Flag


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


# -- lanes -------------------------------------------------------------------------------

LIVE = int(Flag.LIVE)


def test_live_entries_go_first(tmp_path: Path) -> None:
    bl = Backlog({1: "m"})
    for i in range(3):
        bl.mark((1, b"cold%d" % i), (1.0 + i, 0, 1))
    bl.mark((1, b"live"), (10.0, 0, 1 | LIVE))
    assert bl.pop(1)[0] == (1, b"live")
    assert [bl.pop(1)[0][1] for _ in range(3)] == [b"cold0", b"cold1", b"cold2"]


def test_bulk_gets_one_start_in_every_live_run_plus_one(tmp_path: Path) -> None:
    bl = Backlog({1: "m"})
    bl.mark((1, b"cold0"), (1.0, 0, 1))
    bl.mark((1, b"cold1"), (1.0, 0, 1))
    for i in range(2 * LIVE_RUN + 2):
        bl.mark((1, b"live%02d" % i), (2.0, 0, LIVE))
    order = [bl.pop(1)[0][1] for _ in range(2 * LIVE_RUN + 4)]
    assert order.index(b"cold0") == LIVE_RUN
    assert order.index(b"cold1") == 2 * LIVE_RUN + 1
    assert not bl.has_ready(1)


def test_a_bulk_entry_marked_live_moves_ahead_keeping_its_first_time(tmp_path: Path) -> None:
    bl = Backlog({1: "m"})
    bl.mark((1, b"a"), (1.0, 5, 1))
    bl.mark((1, b"b"), (2.0, 5, 1))
    bl.mark((1, b"b"), (9.0, 7, 2 | LIVE))
    assert bl.pop(1) == ((1, b"b"), Info(2.0, 7, 3 | LIVE))
    # and marking a live entry again without LIVE keeps it live
    bl.mark((1, b"c"), (3.0, 0, LIVE))
    bl.mark((1, b"c"), (4.0, 0, 1))
    assert bl.pop(1) == ((1, b"c"), Info(3.0, 0, 1 | LIVE))


def test_a_full_bulk_window_leaves_bulk_waiting(tmp_path: Path) -> None:
    bl = Backlog({1: "m"})
    bl.mark((1, b"cold"), (1.0, 0, 1))
    assert bl.has_ready(1) and not bl.has_ready(1, bulk=False)
    bl.mark((1, b"live"), (2.0, 0, LIVE))
    assert bl.pop(1, bulk=False)[0] == (1, b"live")
    assert not bl.has_ready(1, bulk=False)
    assert bl.pop(1)[0] == (1, b"cold")


def test_lanes_are_not_persisted(tmp_path: Path) -> None:
    db = str(tmp_path / "b.sqlite3")
    bl = Backlog({1: "m"}, Store(db, "p"))
    bl.mark((1, b"live"), (1.0, 0, 1 | LIVE))
    bl.close()
    again = Backlog({1: "m"}, Store(db, "p"))
    assert again.load() == 1
    assert again.pop(1) == ((1, b"live"), Info(1.0, 0, 1))  # bulk now, LIVE gone
    assert again.lanes()["live"]["files"] == 0
    again.close()


def test_delayed_and_parked_entries_keep_their_lane(tmp_path: Path) -> None:
    bl = Backlog({1: "m"})
    bl.mark((1, b"cold"), (1.0, 0, 1))
    bl.mark((1, b"settling"), (2.0, 0, LIVE), delay=0.01)
    bl.park((1, b"busy"), (3.0, 0, LIVE))
    lanes = bl.lanes()
    assert lanes["live"]["files"] == 2 and lanes["bulk"]["files"] == 1
    assert lanes["live"]["oldest"] == 2.0 and lanes["bulk"]["oldest"] == 1.0
    time.sleep(0.02)
    bl.promote()
    bl.unpark((1, b"busy"))
    assert [bl.pop(1)[0][1] for _ in range(3)] == [b"settling", b"busy", b"cold"]


def test_lane_status_counts_files_bytes_and_the_oldest(tmp_path: Path) -> None:
    bl = Backlog({1: "m", 2: "n"})
    bl.mark((1, b"a"), (5.0, 100, LIVE))
    bl.mark((2, b"b"), (4.0, 50, LIVE))
    bl.mark((1, b"c"), (3.0, 7, 1))
    assert bl.lanes() == {
        "live": {"files": 2, "bytes": 150, "oldest": 4.0},
        "bulk": {"files": 1, "bytes": 7, "oldest": 3.0},
    }
    assert bl.files() == 3


def test_upcoming_lists_the_next_bulk_entries_without_taking_them(tmp_path: Path) -> None:
    bl = Backlog({1: "m", 2: "n"})
    for i in range(5):
        bl.mark((1, b"cold%d" % i), (1.0 + i, 0, 1))
    bl.mark((1, b"live"), (10.0, 0, 1 | LIVE))
    bl.mark((2, b"other"), (1.0, 0, 1))
    bl.mark((1, b"later"), (1.0, 0, 1), delay=60)
    assert bl.upcoming(1, 3) == [(1, b"cold0"), (1, b"cold1"), (1, b"cold2")]
    assert bl.upcoming(1, 100) == [(1, b"cold%d" % i) for i in range(5)]  # not live, not delayed
    assert bl.upcoming(1, 100) == [(1, b"cold%d" % i) for i in range(5)]  # nothing taken
    bl.pop(1)  # the live entry
    assert bl.pop(1)[0] == (1, b"cold0")
    assert bl.upcoming(1, 1) == [(1, b"cold1")]


def _rows(db: str) -> dict[tuple[str, bytes], tuple[float, int, int]]:
    store = Store(db, "p")
    rows = store.db.execute("SELECT mirror, path, since, size, flags FROM pending").fetchall()
    store.close()
    return {(m, bytes(p)): (s, z, f) for m, p, s, z, f in rows}


def test_flush_of_a_scan_writes_every_row_and_merges(tmp_path: Path) -> None:
    """A flush of thousands of marks (a scanned tree) across batches of
    several sizes, two mirrors, deletes and merges with rows already there:
    the table holds exactly what one row at a time would have written."""
    db = str(tmp_path / "b.sqlite3")
    store = Store(db, "p")
    store.upsert("m", b"old", (5.0, 1, 1))
    store.upsert("m", b"gone", (5.0, 1, 1))
    store.flush(force=True)
    expect = {("m", b"old"): (3.0, 9, 1 | 4)}
    store.upsert("m", b"old", (3.0, 9, 4))  # merged with the row in the table
    store.delete("m", b"gone")
    for n, mirror in ((2500, "m"), (17, "n")):  # 1024 + 1024 + 452 (padded), 17 (padded)
        for i in range(n):
            path = b"d/\xff%05d" % i
            store.upsert(mirror, path, (float(i), i, 1 | LIVE))
            expect[(mirror, path)] = (float(i), i, 1)  # LIVE is not persisted
    for i in range(0, 2500, 7):
        store.delete("m", b"d/\xff%05d" % i)
        del expect[("m", b"d/\xff%05d" % i)]
    store.close()
    assert _rows(db) == expect


def test_flush_is_a_few_statements_not_one_per_row(tmp_path: Path) -> None:
    """executemany takes the GIL back after every row; under a busy scanner
    each take may wait a switch interval. A flush runs one statement per
    batch of up to 1024 rows instead."""
    store = Store(str(tmp_path / "b.sqlite3"), "p")
    for i in range(3000):
        store.upsert("m", b"f%d" % i, (1.0, 0, 1))
    for i in range(1500):
        store.delete("n", b"g%d" % i)
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    store.flush(force=True)
    store.db.set_trace_callback(None)
    writes = [s for s in statements if s.startswith(("INSERT", "DELETE"))]
    assert len(writes) == 3 + 2  # ceil(3000 / 1024) upserts, ceil(1500 / 1024) deletes
    store.close()
