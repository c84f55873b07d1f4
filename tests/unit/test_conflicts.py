"""Two-way conflict decisions (conflicts.py), without files: every verdict of
``decide``, the conflict copy's name, and a delete meeting a local change."""

from __future__ import annotations

import pytest

from replicator.conflicts import (
    Base,
    Decision,
    Verdict,
    changed_below,
    conflict_name,
    decide,
    keep_local_on_delete,
)
from replicator.frames import EntryKind as K
from replicator.manifest import EntryState

#: 2024-03-05 06:07:08 UTC and 9 ns
T = 1_709_618_828_000_000_009
STAMP = b"20240305T060708.000000009Z"


def st(size: int = 10, mtime_ns: int = T, kind: K = K.FILE, mode: int = 0o644) -> EntryState:
    return EntryState(kind, mode, size, mtime_ns, 0, 0)


# -- decide -------------------------------------------------------------------------


def test_nothing_here_applies() -> None:
    assert decide(b"f", None, st(), None, "a", "b") == Decision(Verdict.APPLY)
    assert decide(b"f", None, st(), st(5), "a", "b") == Decision(Verdict.APPLY)


def test_another_kind_here_applies() -> None:
    """A directory or symlink where the peer has a file: its file is written
    (the publisher makes room), no conflict copy."""
    for kind in (K.DIR, K.SYMLINK):
        local = st(0, T + 5, kind)
        assert decide(b"f", local, st(), local, "a", "b").verdict is Verdict.APPLY


def test_already_the_incoming_version() -> None:
    # kind, size and mtime decide (rsync's quick check); mode and owners do not
    assert decide(b"f", st(mode=0o600), st(), None, "a", "b") == Decision(Verdict.SAME)
    assert decide(b"f", st(), st(), st(1, 1), "a", "b").verdict is Verdict.SAME


def test_unchanged_since_base_applies() -> None:
    """Only the peer changed it since the last agreed version: an update."""
    base = st(10, T - 100)
    newer, older = st(20, T), st(20, T - 500)
    assert decide(b"f", base, newer, base, "a", "b") == Decision(Verdict.APPLY)
    # even an incoming version older than ours: it is the peer's latest
    assert decide(b"f", base, older, base, "z", "b") == Decision(Verdict.APPLY)


@pytest.mark.parametrize("base", [None, st(1, 1)])
def test_conflict_newer_incoming_wins(base: EntryState | None) -> None:
    local, incoming = st(10, T), st(20, T + 1)
    d = decide(b"report.txt", local, incoming, base, "a", "b")
    # the local version is kept as a copy named after this node and its mtime
    assert d == Decision(Verdict.KEEP_LOCAL_COPY, b"report.conflict-a-" + STAMP + b".txt")


@pytest.mark.parametrize("base", [None, st(1, 1)])
def test_conflict_newer_local_wins(base: EntryState | None) -> None:
    local, incoming = st(10, T + 1), st(20, T)
    d = decide(b"report.txt", local, incoming, base, "a", "b")
    # the incoming version is stored as a copy named after the peer and its mtime
    assert d == Decision(Verdict.INCOMING_AS_COPY, b"report.conflict-b-" + STAMP + b".txt")


def test_conflict_tie_goes_to_the_name_that_sorts_last() -> None:
    local, incoming = st(10, T), st(20, T)
    assert decide(b"f", local, incoming, None, "a", "b").verdict is Verdict.KEEP_LOCAL_COPY
    assert decide(b"f", local, incoming, None, "b", "a").verdict is Verdict.INCOMING_AS_COPY


@pytest.mark.parametrize(("ma", "mb"), [(T, T + 1), (T + 1, T), (T, T)])
def test_both_nodes_agree(ma: int, mb: int) -> None:
    """Each node decides with its own view; they must pick the same winner
    and name the same conflict copy (which then replicates)."""
    va, vb = st(1, ma), st(2, mb)
    on_a = decide(b"x.log", va, vb, None, "a", "b")
    on_b = decide(b"x.log", vb, va, None, "b", "a")
    assert {on_a.verdict, on_b.verdict} == {Verdict.KEEP_LOCAL_COPY, Verdict.INCOMING_AS_COPY}
    assert on_a.copy_name == on_b.copy_name
    loser = "b" if on_a.verdict is Verdict.INCOMING_AS_COPY else "a"
    assert on_a.copy_name.startswith(b"x.conflict-" + loser.encode() + b"-")


# -- conflict_name ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "want"),
    [
        (b"report.txt", b"report.conflict-n-" + STAMP + b".txt"),
        (b"archive.tar.gz", b"archive.tar.conflict-n-" + STAMP + b".gz"),
        (b"README", b"README.conflict-n-" + STAMP),
        (b".bashrc", b".bashrc.conflict-n-" + STAMP),  # a dot file has no suffix
        (b"file.", b"file.conflict-n-" + STAMP + b"."),
        (b"\xff\xfe.bin", b"\xff\xfe.conflict-n-" + STAMP + b".bin"),  # any bytes
    ],
)
def test_conflict_name(name: bytes, want: bytes) -> None:
    assert conflict_name(name, "n", T) == want


def test_conflict_name_keeps_nanoseconds_and_utc() -> None:
    assert conflict_name(b"f", "n", T + 1) != conflict_name(b"f", "n", T)
    assert conflict_name(b"f", "n", 0) == b"f.conflict-n-19700101T000000.000000000Z"
    assert conflict_name(b"f", "n", -1) == b"f.conflict-n-19691231T235959.999999999Z"


@pytest.mark.parametrize(
    "name",
    [
        b"x" * 255,  # cut back to itself: the copy would be the file
        b"x" * 253 + b".c",  # ".conflict" begins with ".c"
        b"y" * 240 + b".txt",
        b"z" * 254 + b".",
        b"a." + b"s" * 250,  # mostly suffix
    ],
)
def test_conflict_name_of_a_long_name(name: bytes) -> None:
    """A name near NAME_MAX: the copy's name fits, keeps its tag whole, is not
    the file's own, and two versions (mtimes, nodes) get two copies."""
    copies = set()
    for node in ("a", "b"):
        for t in (T, T + 1):
            c = conflict_name(name, node, t)
            whole = conflict_name(b"f", node, t)[1:]  # b".conflict-NODE-STAMP"
            assert len(c) <= 255 and c != name and whole in c
            copies.add(c)
    assert len(copies) == 4


# -- a delete from the peer ---------------------------------------------------------


def test_keep_local_on_delete() -> None:
    base = st(10, T)
    # unchanged since base: the delete applies
    assert keep_local_on_delete(base, base) is False
    assert keep_local_on_delete(st(10, T, mode=0o600), base) is False  # mode is not content
    # changed here since base (size, mtime or kind): the modification wins
    assert keep_local_on_delete(st(11, T), base) is True
    assert keep_local_on_delete(st(10, T + 1), base) is True
    assert keep_local_on_delete(st(0, T, K.DIR), st(0, T, K.SYMLINK)) is True
    # never agreed on: what is here is newer than anything the peer knew
    assert keep_local_on_delete(st(), None) is True
    # nothing here: nothing to keep
    assert keep_local_on_delete(None, base) is False
    assert keep_local_on_delete(None, None) is False


# -- the base: the recorded agreement and what the peer was last known to hold ------


def test_local_equal_to_either_base_is_unchanged_here() -> None:
    old, mine, theirs = st(1, T), st(2, T + 1), st(3, T + 2)
    # the record lags behind what was just published here from the peer
    # (the link writes it): what the link knew the peer held counts too
    assert decide(b"f", mine, theirs, Base(old, mine), "a", "b").verdict is Verdict.APPLY
    # after a listing the link knows the peer's *current* version: the
    # record says local is unchanged, so it is no conflict
    assert decide(b"f", old, theirs, Base(old, theirs), "a", "b").verdict is Verdict.APPLY
    # local equal to neither: both changed
    assert decide(b"f", mine, theirs, Base(old, None), "b", "a").verdict is (
        Verdict.KEEP_LOCAL_COPY
    )
    assert decide(b"f", mine, theirs, Base(), "b", "a").verdict is Verdict.KEEP_LOCAL_COPY
    assert keep_local_on_delete(mine, Base(old, mine)) is False
    assert keep_local_on_delete(mine, Base(old, theirs)) is True
    assert keep_local_on_delete(mine, Base()) is True


def test_a_directory_is_kept_if_anything_below_it_changed_here() -> None:
    d = st(0, T, K.DIR)
    assert keep_local_on_delete(st(0, T + 5, K.DIR), Base(d)) is False  # its mtime aside
    assert keep_local_on_delete(d, Base(st())) is True  # was a file when agreed
    bases = {b"d/x": Base(st(1)), b"d/y": Base(None, st(2))}
    below = [(b"d/x", st(1)), (b"d/y", st(2))]
    assert changed_below(below, lambda p: bases.get(p, Base())) is None
    assert changed_below([*below, (b"d/new", st())], lambda p: bases.get(p, Base())) == b"d/new"
    assert changed_below([(b"d/x", st(9))], lambda p: bases.get(p, Base())) == b"d/x"
