"""Hard-link groups (replicator/hardlinks.py): the pure planning, the
manifest hints and regrouping, and the groups against a real directory; the
answer to a refused HardLink (answers.py); the receiver's link (publisher.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from replicator import frames as F
from replicator.answers import Answers, Mark, NoLink, Unpark
from replicator.changes import Flag
from replicator.errors import ApplyError, BadPath
from replicator.frames import EntryKind as K
from replicator.hardlinks import Groups, Links, Plan, first_names, plan, regroup
from replicator.inbox import Inbox
from replicator.inflight import InFlight, Record
from replicator.manifest import EntryState, Excludes, scan_stat
from replicator.paths import Root
from replicator.publisher import Publisher
from replicator.remote import RemoteMirror


def st(size: int = 10, mtime_ns: int = 5, kind: K = K.FILE) -> EntryState:
    return EntryState(kind, 0o644, size, mtime_ns, 0, 0, b"")


def never(_: bytes) -> bool:
    return False


# -- plan ------------------------------------------------------------------------------


def test_a_name_links_to_the_first_mate_the_peer_holds_in_this_version() -> None:
    held = {b"b": st(), b"c": st()}
    assert plan(b"a", st(), {b"c", b"b"}, held, never) == (Plan.LINK, b"b")


@pytest.mark.parametrize(
    "there",
    [
        None,  # not there at all
        st(size=11),  # an older version
        st(mtime_ns=6),
        st(kind=K.SYMLINK),
    ],
)
def test_without_a_mate_in_this_version_the_data_goes(there: EntryState | None) -> None:
    held = {} if there is None else {b"b": there}
    assert plan(b"a", st(), {b"b"}, held, never) == (Plan.DATA, b"")


def test_a_name_waits_for_a_mate_in_flight_rather_than_sending_data() -> None:
    busy = {b"b"}.__contains__
    assert plan(b"a", st(), {b"b"}, {}, busy) == (Plan.WAIT, b"b")
    # a mate the peer holds beats one in flight
    assert plan(b"a", st(), {b"b", b"c"}, {b"c": st()}, busy) == (Plan.LINK, b"c")


def test_a_name_is_never_its_own_mate() -> None:
    assert plan(b"a", st(), {b"a"}, {b"a": st()}, never) == (Plan.DATA, b"")


def test_a_refused_name_goes_as_data_from_then_on() -> None:
    links = Links()
    held = {b"b": st()}
    assert links.plan(1, b"a", st(), {b"b"}, held, never) == (Plan.LINK, b"b")
    links.refused(1, b"a")
    assert links.plan(1, b"a", st(), {b"b"}, held, never) == (Plan.DATA, b"")
    assert links.plan(2, b"a", st(), {b"b"}, held, never) == (Plan.LINK, b"b")


# -- hints and regrouping --------------------------------------------------------------


def test_the_manifest_names_the_first_name_of_each_inode(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "a").write_bytes(b"x")
    os.link(tmp_path / "a", tmp_path / "d" / "b")
    os.link(tmp_path / "a", tmp_path / "d" / "c")
    (tmp_path / "single").write_bytes(b"y")
    (tmp_path / "sym").symlink_to("a")
    hints = {rel: hint for rel, _, hint in first_names(scan_stat(bytes(tmp_path), Excludes(())))}
    first = b"a"  # the walk lists a folder's files before what is below it
    assert hints == {
        b"a": b"",
        b"d": b"",
        b"d/b": first,
        b"d/c": first,
        b"single": b"",
        b"sym": b"",
    }


def test_regroup_links_what_is_split_there_and_splits_what_is_joined_there() -> None:
    held = {b"a", b"b", b"c", b"x", b"y", b"z"}
    source = {b"a": (1, 7), b"b": (1, 7), b"c": (1, 7)}  # one file here
    heads = {b"c": b"a", b"y": b"x", b"z": b"x"}  # a+c and x+y+z one file there
    assert regroup(source, heads, held, lambda _: True) == {b"b", b"y", b"z"}
    # what is gone here is left to the delete
    assert regroup(source, heads, held, lambda n: n != b"z") == {b"b", b"y"}
    # the same grouping on both sides: nothing
    same = {b"b": b"a", b"c": b"a"}
    assert regroup(source, same, held, lambda _: True) == set()


def test_regroup_sends_only_what_the_peer_holds() -> None:
    source = {b"a": (1, 7), b"b": (1, 7)}
    assert regroup(source, {}, {b"a"}, lambda _: True) == set()


# -- groups on a real directory --------------------------------------------------------


def test_groups_follow_the_link_count(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    os.link(tmp_path / "a", tmp_path / "b")
    g = Groups()
    g.note(b"a", os.lstat(tmp_path / "a"))
    g.note(b"b", os.lstat(tmp_path / "b"))
    assert g.mates(b"a") == {b"b"} and g.mates(b"b") == {b"a"}
    os.unlink(tmp_path / "b")
    g.note(b"a", os.lstat(tmp_path / "a"))  # one link: just a file
    assert g.mates(b"a") == set() and g.mates(b"b") == set()


def test_a_search_walks_once_per_link_count(tmp_path: Path) -> None:
    root = bytes(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "old").write_bytes(b"x")
    os.link(tmp_path / "old", tmp_path / "d" / "new")
    g = Groups()
    assert g.search(root, Excludes(()), os.lstat(tmp_path / "d" / "new"))
    assert g.mates(b"d/new") == {b"old"}
    assert not g.search(root, Excludes(()), os.lstat(tmp_path / "d" / "new"))
    os.link(tmp_path / "old", tmp_path / "third")
    assert g.search(root, Excludes(()), os.lstat(tmp_path / "old"))
    assert g.mates(b"old") == {b"d/new", b"third"}


def test_mates_are_checked_on_disk(tmp_path: Path) -> None:
    root = bytes(tmp_path)
    (tmp_path / "a").write_bytes(b"x")
    os.link(tmp_path / "a", tmp_path / "b")
    links = Links()
    assert links.mates(1, root, Excludes(()), b"a", os.lstat(tmp_path / "a")) == {b"b"}
    # b replaced by another file since: no longer a mate
    os.unlink(tmp_path / "b")
    (tmp_path / "b").write_bytes(b"x")
    os.link(tmp_path / "a", tmp_path / "c")
    assert links.mates(1, root, Excludes(()), b"a", os.lstat(tmp_path / "a")) == {b"c"}


# -- a refused HardLink ----------------------------------------------------------------


def test_a_refused_link_forgets_the_target_and_sends_both_as_data() -> None:
    inflight, remote = InFlight(), RemoteMirror()
    remote.known[b"t"] = st()
    answers = Answers(inflight, {1: remote}, {1: "media"}, "b")
    inflight.track(4, Record(F.HardLink, (1, b"n"), 100.0, st(), dst=b"t"))
    a = answers.error(F.Error(F.ErrorCode.LINK_TARGET, 4, 0, "gone"))
    info = (100.0, 0, Flag.DATA)
    assert a.effects == [
        Unpark((1, b"n")),
        Unpark((1, b"t")),
        NoLink((1, b"n")),
        Mark((1, b"n"), info),
        Mark((1, b"t"), info),
    ]
    assert b"t" not in remote.known
    assert a.log is not None and "could not link n to t" in a.log.msg % a.log.args


# -- the receiver's link ---------------------------------------------------------------


@pytest.fixture
def pub(tmp_path: Path):  # type: ignore[no-untyped-def]
    root = Root(str(tmp_path))
    inbox = Inbox(root, "peer")
    p = Publisher(root, inbox)
    yield p
    p.close()
    inbox.close()
    root.close()


def link(tmp_path: Path, target: bytes, path: bytes = b"n", size: int = 1) -> F.HardLink:
    mtime = os.lstat(tmp_path / "t").st_mtime_ns
    return F.HardLink(3, 1, size, mtime, path, target)


def test_a_link_is_published_with_the_round(tmp_path: Path, pub: Publisher) -> None:
    (tmp_path / "t").write_bytes(b"x")
    (tmp_path / "n").write_bytes(b"an older copy")
    pub.hardlink(link(tmp_path, b"t"), (b"n",), (b"t",))
    assert pub.commit().acked == [3]
    assert os.lstat(tmp_path / "n").st_ino == os.lstat(tmp_path / "t").st_ino
    assert sorted(os.listdir(tmp_path)) == [".replicator", "n", "t"]


@pytest.mark.parametrize(
    ("make", "target", "size"),
    [
        (lambda p: (p / "t").write_bytes(b"x"), b"t", 2),  # another version
        (lambda p: (p / "t").write_bytes(b"x"), b"missing", 1),
        (lambda p: (p / "t").mkdir(), b"t", 1),
        (lambda p: (p / "t").symlink_to("/etc/passwd"), b"t", 1),
        (lambda p: (p / "t").write_bytes(b"x"), b".replicator-partial", 1),
    ],
)
def test_a_link_to_anything_but_the_version_named_is_refused(
    tmp_path: Path,
    pub: Publisher,
    make,
    target: bytes,
    size: int,  # type: ignore[no-untyped-def]
) -> None:
    make(tmp_path)
    ev = link(tmp_path, target, size=size)
    with pytest.raises((ApplyError, BadPath)) as e:
        pub.hardlink(ev, (b"n",), (target,))
    assert isinstance(e.value, ApplyError) and e.value.code is F.ErrorCode.LINK_TARGET
    assert not (tmp_path / "n").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".replicator-")] == []
