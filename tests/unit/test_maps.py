"""Block maps remembered across restarts (replicator/maps.py): what a peer
acknowledged (SentMaps) and what this node published (PublishedMaps), in a
database of the test's own (never the process-wide ``maps.database``)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator import maps
from replicator.blockmap import BLAKE3, MIN_BLOCK, XXH3_128, BlockMap, map_bytes
from replicator.maps import Identity, PublishedMaps, SentMaps

ONE = map_bytes(b"one" * 100_000, XXH3_128, MIN_BLOCK)
TWO = map_bytes(b"two" * 200_000, XXH3_128, 2 * MIN_BLOCK)
EMPTY = BlockMap(BLAKE3, 0, MIN_BLOCK, b"")
ID1 = Identity(ino=11, size=300_000, mtime_ns=10**18, ctime_ns=10**18 + 1)
ID2 = Identity(ino=12, size=600_000, mtime_ns=-5, ctime_ns=7)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[maps._Db]:
    d = maps._Db(str(tmp_path / "state" / "maps.sqlite3"))  # makes its folder
    yield d
    d.close()


def test_the_database_is_a_file_in_wal_mode(db: maps._Db, tmp_path: Path) -> None:
    assert (tmp_path / "state" / "maps.sqlite3").is_file()
    with db.lock:
        assert db.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- SentMaps --------------------------------------------------------------------------


def test_sent_map_only_for_the_version_acknowledged(db: maps._Db) -> None:
    sent = SentMaps(db, "peer-b")
    assert sent.get("m", b"f", 300_000, 10**18) is None
    sent.put("m", b"f", 300_000, 10**18, ONE)
    assert sent.get("m", b"f", 300_000, 10**18) == ONE
    assert sent.get("m", b"f", 300_001, 10**18) is None  # another size
    assert sent.get("m", b"f", 300_000, 10**18 + 1) is None  # another mtime
    assert sent.get("m", b"g", 300_000, 10**18) is None  # another path
    assert sent.get("n", b"f", 300_000, 10**18) is None  # another mirror
    assert SentMaps(db, "peer-c").get("m", b"f", 300_000, 10**18) is None  # another peer


def test_sent_map_replaced_by_a_newer_version(db: maps._Db) -> None:
    sent = SentMaps(db, "peer-b")
    sent.put("m", b"f", 1, 1, ONE)
    sent.put("m", b"f", 2, 2, TWO)
    assert sent.get("m", b"f", 1, 1) is None
    assert sent.get("m", b"f", 2, 2) == TWO


def test_sent_map_forget(db: maps._Db) -> None:
    b, c = SentMaps(db, "peer-b"), SentMaps(db, "peer-c")
    for s in (b, c):
        s.put("m", b"f", 1, 1, ONE)
        s.put("m", b"g", 1, 1, TWO)
    b.forget("m", b"f")
    assert b.get("m", b"f", 1, 1) is None and b.get("m", b"g", 1, 1) == TWO
    assert c.get("m", b"f", 1, 1) == ONE  # per peer
    b.forget("m", b"nothing")  # forgetting what is not there is fine


def test_paths_are_bytes_as_linux_has_them(db: maps._Db) -> None:
    sent = SentMaps(db, "peer-b")
    name = b"caf\xe9/\xff\x00x"
    sent.put("m", name, 1, 1, EMPTY)
    assert sent.get("m", name, 1, 1) == EMPTY
    assert sent.get("m", b"caf\xc3\xa9/\xff\x00x", 1, 1) is None


def test_maps_survive_a_new_connection(tmp_path: Path) -> None:
    path = str(tmp_path / "maps.sqlite3")
    first = maps._Db(path)
    SentMaps(first, "peer-b").put("m", b"f", 1, 2, ONE)
    PublishedMaps(first, "m").put_many([(b"f", ID1, TWO)])
    first.close()
    again = maps._Db(path)
    try:
        assert SentMaps(again, "peer-b").get("m", b"f", 1, 2) == ONE
        assert PublishedMaps(again, "m").get(b"f") == (ID1, TWO)
    finally:
        again.close()


# -- PublishedMaps ---------------------------------------------------------------------


def test_published_maps_put_many_get_forget(db: maps._Db) -> None:
    pub = PublishedMaps(db, "m")
    assert pub.get(b"f") is None
    pub.put_many([])  # nothing to write: no transaction either
    pub.put_many([(b"f", ID1, ONE), (b"d/g", ID2, TWO), (b"e", ID1, EMPTY)])
    assert pub.get(b"f") == (ID1, ONE)
    assert pub.get(b"d/g") == (ID2, TWO)
    assert pub.get(b"e") == (ID1, EMPTY)
    got = pub.get(b"d/g")
    assert got is not None and isinstance(got[0], Identity) and got[0].ctime_ns == 7
    assert PublishedMaps(db, "other").get(b"f") is None  # per mirror
    pub.put_many([(b"f", ID2, TWO)])  # published again: replaced
    assert pub.get(b"f") == (ID2, TWO)
    pub.forget(b"f")
    assert pub.get(b"f") is None and pub.get(b"d/g") == (ID2, TWO)
    pub.forget(b"f")


def test_identity_of_a_stat(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"12345")
    st = os.stat(tmp_path / "f")
    assert Identity.of(st) == (st.st_ino, 5, st.st_mtime_ns, st.st_ctime_ns)


def test_threads_share_one_connection(db: maps._Db) -> None:
    """The link threads (sender) and sessions (receiver) of a process use
    one connection, serialised by its lock."""
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            sent, pub = SentMaps(db, f"p{n}"), PublishedMaps(db, f"m{n}")
            for i in range(30):
                sent.put("m", b"%d" % i, i, i, ONE)
                pub.put_many([(b"%d" % i, ID1, TWO)])
                assert sent.get("m", b"%d" % i, i, i) == ONE
                assert pub.get(b"%d" % i) == (ID1, TWO)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_damaged_map_is_no_map(db: maps._Db) -> None:
    """A row whose map no longer decodes (wrong digest count) is as good as
    none: the file is sent whole."""
    with db.lock:
        db.db.execute(
            "INSERT INTO sent VALUES (?, ?, ?, ?, ?, ?)",
            ("peer-b", "m", b"f", 1, 1, ONE.encode()[:-1]),
        )
        db.db.execute(
            "INSERT INTO published VALUES (?, ?, ?, ?, ?, ?, ?)",
            ("m", b"f", *ID1, ONE.encode() + b"x"),
        )
    assert SentMaps(db, "peer-b").get("m", b"f", 1, 1) is None
    assert PublishedMaps(db, "m").get(b"f") is None


def test_a_map_shorter_than_its_header_is_no_map(db: maps._Db) -> None:
    with db.lock:
        db.db.execute(
            "INSERT INTO published VALUES (?, ?, ?, ?, ?, ?, ?)", ("m", b"f", *ID1, b"\x01")
        )
    assert PublishedMaps(db, "m").get(b"f") is None
