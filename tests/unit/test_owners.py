"""Owners by name: the sender names its ids once per connection, the
receiver maps them to its own ids (and back for its manifest)."""

from __future__ import annotations

import logging

import pytest

from replicator import frames as F
from replicator.owners import GROUP, USER, NameBook, OwnerMap

SENDER_USERS = {1000: "alice", 1001: "bob"}
SENDER_GROUPS = {100: "users"}
HERE_USERS = {"alice": 2000, "carol": 2001}
HERE_GROUPS = {"users": 300}


def book() -> NameBook:
    return NameBook(SENDER_USERS.get, SENDER_GROUPS.get)


def owner_map() -> OwnerMap:
    return OwnerMap(
        "a",
        HERE_USERS.get,
        HERE_GROUPS.get,
        {v: k for k, v in HERE_USERS.items()}.get,
        {v: k for k, v in HERE_GROUPS.items()}.get,
    )


def mkdir(uid: int, gid: int) -> F.Mkdir:
    return F.Mkdir(1, 1, 0o755, 0, uid, gid, b"d")


def test_each_id_is_named_once_per_connection() -> None:
    b = book()
    assert b.frames_for(mkdir(1000, 100)) == [
        F.Owner(USER, 1000, "alice"),
        F.Owner(GROUP, 100, "users"),
    ]
    assert b.frames_for(mkdir(1000, 100)) == []
    assert b.frames_for(mkdir(4242, 100)) == []  # no name here: nothing to say
    assert b.frames_for(F.Delete(2, 1, b"d")) == []  # carries no owner
    assert book().frames_for(mkdir(1000, 100))  # a new connection names them again


def test_names_map_to_our_ids_and_back() -> None:
    m = owner_map()
    for frame in book().frames_for(mkdir(1000, 100)):
        assert isinstance(frame, F.Owner)
        m.told(frame)
    assert m.map_in(mkdir(1000, 100)) == mkdir(2000, 300)
    entry = F.Entry(1, F.EntryKind.DIR, 0o755, 0, 0, 2000, 300, b"d", b"")
    assert m.map_out(entry) == F.Entry(1, F.EntryKind.DIR, 0o755, 0, 0, 1000, 100, b"d", b"")
    unknown = F.Entry(1, F.EntryKind.DIR, 0o755, 0, 0, 2001, 5, b"e", b"")
    assert m.map_out(unknown) == unknown  # carol is no name the peer told us


def test_an_unknown_name_keeps_its_number_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = owner_map()
    m.told(F.Owner(USER, 1001, "bob"))
    with caplog.at_level(logging.WARNING):
        assert m.map_in(mkdir(1001, 7)) == mkdir(1001, 7)
        assert m.map_in(mkdir(1001, 7)) == mkdir(1001, 7)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "user 'bob' (id 1001 on a) does not exist here" in lines[0]
    assert 'owners = "numeric"' in lines[0]


def test_ids_never_named_pass_through() -> None:
    m = owner_map()
    assert m.map_in(mkdir(1000, 100)) == mkdir(1000, 100)
    m.told(F.Owner(9, 1, "future kind"))  # a kind we do not know: ignored
    assert m.map_in(mkdir(1, 1)) == mkdir(1, 1)
