"""The two-way archive (replicator/history.py): records in memory, written
in batches, read back after a reopen, moved and forgotten with subtrees."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator import maps
from replicator.frames import EntryKind as K
from replicator.history import Agreed, Archive, Version, agrees
from replicator.manifest import EntryState

F1 = EntryState(K.FILE, 0o644, 5, 10**18, 1, 1)
F2 = EntryState(K.FILE, 0o600, 7, 10**18 + 1, 1, 1)
D1 = EntryState(K.DIR, 0o755, 4096, 10**18, 1, 1)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[maps._Db]:
    d = maps._Db(str(tmp_path / "maps.sqlite3"))
    yield d
    d.close()


def reopened(tmp_path: Path, peer: str, mirror: str) -> dict[bytes, Version]:
    d = maps._Db(str(tmp_path / "maps.sqlite3"))
    try:
        return Archive(d, peer).load(mirror).records
    finally:
        d.close()


def test_a_version_is_kind_size_mtime_and_a_directory_its_kind() -> None:
    assert Version.of(F1) == Version(int(K.FILE), 5, 10**18)
    assert agrees(Version.of(F1), EntryState(K.FILE, 0o777, 5, 10**18, 9, 9))  # mode, owners
    assert not agrees(Version.of(F1), F2)
    assert not agrees(Version.of(F1), None) and not agrees(None, F1)
    assert agrees(Version.of(D1), EntryState(K.DIR, 0o700, 0, 5, 0, 0))
    assert Version.of(F1).state().size == 5


def test_records_survive_a_reopen_per_peer_and_mirror(db: maps._Db, tmp_path: Path) -> None:
    arch = Archive(db, "b")
    m, other = Agreed("m"), Agreed("other")
    m.put(b"f", F1)
    m.put(b"d", D1)
    other.put(b"f", F2)
    assert arch.write([m, other]) == 3
    assert m.journal == [] and arch.write([m, other]) == 0  # nothing left to write
    Archive(db, "c").write([Agreed("m", None)])
    assert reopened(tmp_path, "b", "m") == {b"f": Version.of(F1), b"d": Version.of(D1)}
    assert reopened(tmp_path, "b", "other") == {b"f": Version.of(F2)}
    assert reopened(tmp_path, "c", "m") == {}


def test_a_batch_is_one_transaction(db: maps._Db, tmp_path: Path) -> None:
    """A failing write leaves nothing of its batch (and keeps the journal)."""
    arch = Archive(db, "b")
    a = Agreed("m")
    a.put(b"ok", F1)
    a.journal.append(("put", b"bad", None))  # fails on its assertion, mid-batch
    with pytest.raises(AssertionError):
        arch.write([a])
    assert reopened(tmp_path, "b", "m") == {}
    assert len(a.journal) == 2


def test_put_of_the_same_version_is_not_journaled() -> None:
    a = Agreed("m")
    a.put(b"f", F1)
    a.put(b"f", EntryState(K.FILE, 0o600, 5, 10**18, 2, 2))  # same version
    assert len(a.journal) == 1


def test_forget_and_move_take_subtrees_in_memory_and_on_disk(db: maps._Db, tmp_path: Path) -> None:
    arch = Archive(db, "b")
    a = Agreed("m")
    for p, s in ((b"d", D1), (b"d/x", F1), (b"d/s", D1), (b"d/s/y", F2), (b"d.txt", F1)):
        a.put(p, s)
    a.put(b"e", D1)
    a.put(b"e/old", F1)
    arch.write([a])
    a.move(b"d", b"e")  # replaces what was at e
    arch.write([a])
    want = {
        b"e": Version.of(D1),
        b"e/x": Version.of(F1),
        b"e/s": Version.of(D1),
        b"e/s/y": Version.of(F2),
        b"d.txt": Version.of(F1),  # not below d
    }
    assert a.records == want
    assert reopened(tmp_path, "b", "m") == want
    a.forget(b"e/s")
    a.forget(b"nothing")
    arch.write([a])
    want = {b"e": Version.of(D1), b"e/x": Version.of(F1), b"d.txt": Version.of(F1)}
    assert a.records == want
    assert reopened(tmp_path, "b", "m") == want


def test_a_directory_replaced_by_a_file_drops_what_was_below_it(db: maps._Db) -> None:
    a = Agreed("m")
    a.put(b"d", D1)
    a.put(b"d/x", F1)
    a.put(b"d", F2)
    assert a.records == {b"d": Version.of(F2)}
    Archive(db, "b").write([a])
    assert Archive(db, "b").load("m").records == {b"d": Version.of(F2)}


def test_a_mirror_no_longer_two_way_drops_its_records(db: maps._Db) -> None:
    a, other = Agreed("m"), Agreed("other")
    a.put(b"f", F1)
    other.put(b"f", F1)
    Archive(db, "b").write([a, other])
    Archive(db, "b").drop("m")
    assert Archive(db, "b").load("m").records == {}
    assert Archive(db, "b").load("other").records == {b"f": Version.of(F1)}
