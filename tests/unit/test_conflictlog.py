"""Conflicts recorded when a two-way mirror decides them (conflictlog.py):
the table, and what a receiving mirror records, only once published."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator import maps
from replicator.blockmap import XXH3_128, block_size_for, map_bytes
from replicator.conflictlog import Conflict, ConflictLog, Version, digest_text

from .test_receiving import open_mirror, receive

C1 = Conflict(
    "m",
    b"d/doc.txt",
    b"d/doc.conflict-a-20240305T060708.000000009Z.txt",
    "b",
    "a",
    1_700_000_000.5,
    "remote",
    Version(12, 5, "xxh3-128:00"),
    Version(19, 7, None),
)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[maps._Db]:
    d = maps._Db(str(tmp_path / "state" / "maps.sqlite3"))
    yield d
    d.close()


def test_recorded_conflicts_come_back_after_reopening(tmp_path: Path, db: maps._Db) -> None:
    log = ConflictLog(db)
    other = Conflict(**{**C1.__dict__, "mirror": "n"})
    log.add([C1, other])
    assert log.of("m") == [C1] and log.of("n") == [other]
    db.close()
    again = maps._Db(str(tmp_path / "state" / "maps.sqlite3"))
    try:
        assert ConflictLog(again).of("m") == [C1]
    finally:
        again.close()


def test_a_copy_of_the_same_name_replaces_its_record(db: maps._Db) -> None:
    log = ConflictLog(db)
    log.add([C1])
    newer = Conflict(**{**C1.__dict__, "decided": 1_800_000_000.0, "kept": "local"})
    log.add([newer])
    assert log.of("m") == [newer]
    log.drop("m", C1.copy)
    assert log.of("m") == []
    log.drop("m", C1.copy)  # idempotent


def test_versions_by_where_they_are() -> None:
    assert C1.at_path == C1.remote and C1.in_copy == C1.local
    kept_here = Conflict(**{**C1.__dict__, "kept": "local"})
    assert kept_here.at_path == C1.local and kept_here.in_copy == C1.remote
    j = C1.to_json("/srv/m/")
    assert j["full_path"] == "/srv/m/d/doc.txt" and j["copy"] == C1.copy.decode()
    assert j["at_path"] == {
        "from": "remote",
        "node": "b",
        "size": 19,
        "mtime_ns": 7,
        "digest": None,
    }
    assert j["in_copy"]["from"] == "local" and j["in_copy"]["node"] == "a"
    assert j["same_content"] is False


# -- recorded by a receiving two-way mirror ---------------------------------------------


def recorded(tmp_path: Path) -> list[Conflict]:
    return ConflictLog(maps.database(str(tmp_path / "state"))).of("m")


def test_a_conflict_is_recorded_once_its_copy_is_published(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "f.txt").write_bytes(b"mine")
    os.utime(tmp_path / "m" / "f.txt", ns=(1, 1))
    m = open_mirror(tmp_path, push="a")
    try:
        receive(m, 1, b"f.txt", b"theirs", mtime_ns=2)  # newer: theirs wins
        assert recorded(tmp_path) == []  # decided, not yet published
        m.commit()
    finally:
        m.close()
    (c,) = recorded(tmp_path)
    assert (c.mirror, c.path, c.peer, c.here, c.kept) == ("m", b"f.txt", "a", "b", "remote")
    assert (tmp_path / "m" / os.fsdecode(c.copy)).read_bytes() == b"mine"
    assert c.copy.startswith(b"f.conflict-b-") and c.copy.endswith(b".txt")
    theirs = map_bytes(b"theirs", XXH3_128, block_size_for(6))
    assert c.remote == Version(6, 2, digest_text(theirs))
    # ours, hashed with the incoming map's geometry: comparable
    mine = map_bytes(b"mine", XXH3_128, theirs.block_size)
    assert c.local == Version(4, 1, digest_text(mine))


def test_the_incoming_version_kept_as_the_copy_is_recorded(tmp_path: Path) -> None:
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "sub" / "f").write_bytes(b"mine, newer")
    os.utime(tmp_path / "m" / "sub" / "f", ns=(9, 9))
    m = open_mirror(tmp_path, push="a")
    try:
        receive(m, 1, b"sub/f", b"theirs", mtime_ns=2)  # older: ours wins
        m.commit()
    finally:
        m.close()
    (c,) = recorded(tmp_path)
    assert c.kept == "local" and c.copy.startswith(b"sub/f.conflict-a-")
    assert (c.at_path.size, c.in_copy.size) == (11, 6)
    assert (tmp_path / "m" / os.fsdecode(c.copy)).read_bytes() == b"theirs"


def test_no_record_without_a_conflict(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    m = open_mirror(tmp_path, push="a")
    try:
        receive(m, 1, b"new", b"x")
        m.commit()
    finally:
        m.close()
    assert recorded(tmp_path) == []
