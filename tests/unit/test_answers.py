"""What the peer's answers mean, without sockets (replicator/answers.py)."""

from __future__ import annotations

import logging

import pytest

from replicator import frames as F
from replicator.answers import (
    DIR_SETTLE,
    RETRY_MAX,
    RETRY_MIN,
    Answers,
    Done,
    Mark,
    MarkTree,
    Unpark,
    release,
)
from replicator.changes import Flag
from replicator.errors import LinkError
from replicator.frames import EntryKind as K
from replicator.history import Agreed, Version
from replicator.inflight import InFlight, Record
from replicator.manifest import EntryState
from replicator.remote import RemoteMirror

M = 1
SINCE = 100.0
DATA = (SINCE, 0, Flag.DATA)


def st(kind: K = K.FILE, size: int = 10, mtime_ns: int = 5) -> EntryState:
    return EntryState(kind, 0o755 if kind is K.DIR else 0o644, size, mtime_ns, 0, 0, b"")


class Peer:
    """An InFlight, a RemoteMirror and the Answers over them."""

    def __init__(self) -> None:
        self.inflight = InFlight()
        self.remote = RemoteMirror()
        self.answers = Answers(self.inflight, {M: self.remote}, {M: "media"}, "b")

    def send(self, op: int, kind: type[F.Event], path: bytes, **kw: object) -> Record:
        rec = Record(kind, (M, path), SINCE, **kw)  # type: ignore[arg-type]
        self.inflight.track(op, rec)
        return rec

    def error(self, op: int, code: int, fatal: int = 0, message: str = "no") -> F.Error:
        return F.Error(code, op, fatal, message)


# -- Ack ---------------------------------------------------------------------------------


def test_an_ack_for_nothing_in_flight_changes_nothing() -> None:
    p = Peer()
    a = p.answers.ack(9)
    assert a.record is None and a.effects == [] and not a.acked and a.log is None


def test_an_acked_file_is_held_there_and_its_folder_gets_its_mtime_back() -> None:
    p = Peer()
    p.remote.known[b"d"] = st(K.DIR, 0)
    rec = p.send(1, F.File, b"d/x", state=st(), size=10)
    a = p.answers.ack(1)
    assert a.record is rec and a.acked and not a.renamed and a.error is None
    assert p.remote.known[b"d/x"] == st()
    assert p.remote.known[b"d"].mtime_ns == -1  # stale: compared again
    assert a.effects == [
        Unpark((M, b"d/x")),
        Mark((M, b"d"), DATA, DIR_SETTLE, persist=False),
        Done((M, b"d/x")),
    ]
    assert len(p.inflight) == 0


def test_an_ack_at_the_root_marks_no_folder() -> None:
    p = Peer()
    p.send(1, F.Mkdir, b"top", state=st(K.DIR, 0))
    a = p.answers.ack(1)
    assert a.effects == [Unpark((M, b"top")), Done((M, b"top"))]
    assert p.remote.known[b"top"] == st(K.DIR, 0)


def test_an_acked_meta_leaves_the_folder_alone() -> None:
    p = Peer()
    p.send(1, F.Meta, b"d/x", state=st())
    a = p.answers.ack(1)
    assert a.effects == [Unpark((M, b"d/x")), Done((M, b"d/x"))]


def test_an_acked_delete_forgets_the_subtree() -> None:
    p = Peer()
    p.remote.known.update({b"d": st(K.DIR, 0), b"d/x": st(), b"dx": st()})
    p.send(1, F.Delete, b"d")
    a = p.answers.ack(1)
    assert set(p.remote.known) == {b"dx"}
    assert a.effects == [Unpark((M, b"d")), Done((M, b"d"))]


def test_an_acked_rename_moves_what_the_peer_holds_and_looks_again() -> None:
    p = Peer()
    p.remote.known.update({b"a/old": st(), b"a": st(K.DIR, 0), b"b": st(K.DIR, 0)})
    p.send(1, F.Rename, b"a/old", dst=b"b/new")
    a = p.answers.ack(1)
    assert a.acked and a.renamed
    assert p.remote.known[b"b/new"] == st() and b"a/old" not in p.remote.known
    assert p.remote.known[b"a"].mtime_ns == -1 and p.remote.known[b"b"].mtime_ns == -1
    head, parents, tail = a.effects[:4], a.effects[4:6], a.effects[6:]
    assert head == [
        Unpark((M, b"a/old")),
        Unpark((M, b"b/new")),
        Done((M, b"b/new")),
        Mark((M, b"b/new"), DATA, persist=False),
    ]
    assert sorted(parents, key=repr) == [  # a set: either order
        Mark((M, b"a"), DATA, DIR_SETTLE, persist=False),
        Mark((M, b"b"), DATA, DIR_SETTLE, persist=False),
    ]
    assert tail == [Done((M, b"a/old"))]


def test_two_way_acks_record_agreements_and_expire_tombstones() -> None:
    """history.py: what the peer acknowledged is agreed; a Delete it
    acknowledged ends the tombstone; a rename moves the records."""
    p = Peer()
    p.remote.agreed = agreed = Agreed("media")
    agreed.put(b"gone", st())  # a tombstone: deleted here, not yet there
    agreed.put(b"d", st(K.DIR, 0))
    agreed.put(b"d/y", st(size=3))
    p.send(1, F.File, b"x", state=st(size=7), size=7)
    p.send(2, F.Delete, b"gone")
    p.send(3, F.Rename, b"d", dst=b"e", is_dir=True)
    for op in (1, 2, 3):
        p.answers.ack(op)
    assert agreed.records == {
        b"x": Version.of(st(size=7)),
        b"e": Version.of(st(K.DIR, 0)),
        b"e/y": Version.of(st(size=3)),
    }
    # a refusal records nothing
    p.send(4, F.File, b"z", state=st(), size=10)
    p.answers.error(F.Error(F.ErrorCode.NO_SPACE, 4, 0, "full"))
    assert b"z" not in agreed.records


def test_an_acked_directory_rename_compares_what_is_below_it() -> None:
    p = Peer()
    p.remote.known.update({b"d": st(K.DIR, 0), b"d/x": st()})
    p.send(1, F.Rename, b"d", dst=b"e", is_dir=True)
    a = p.answers.ack(1)
    assert set(p.remote.known) == {b"e", b"e/x"}
    assert MarkTree(M, b"e", SINCE, only_changed=True) in a.effects
    assert a.effects[-1] == Done((M, b"d"))


def test_an_ack_wakes_what_waited_for_it() -> None:
    p = Peer()
    p.send(1, F.Rename, b"d", dst=b"e", is_dir=True)
    info = (50.0, 3, Flag.DATA)
    p.inflight.wait(1, (M, b"d/x"), info)
    a = p.answers.ack(1)
    assert a.effects[2] == Mark((M, b"d/x"), info, persist=False)


def test_release_alone_frees_and_wakes() -> None:
    f = InFlight()
    rec = Record(F.File, (M, b"x"), SINCE)
    f.track(4, rec)
    f.wait(4, (M, b"y"), DATA)
    a = release(f, 4)
    assert a.record is rec and not a.acked
    assert a.effects == [Unpark((M, b"x")), Mark((M, b"y"), DATA, persist=False)]
    assert release(f, 4).record is None


# -- Error -------------------------------------------------------------------------------


def test_a_fatal_error_closes_the_link() -> None:
    p = Peer()
    p.send(1, F.File, b"x")
    with pytest.raises(LinkError, match=r"peer closed the link \(SHUTTING_DOWN\): bye"):
        p.answers.error(p.error(0, F.ErrorCode.SHUTTING_DOWN, fatal=1, message="bye"))
    assert 1 in p.inflight  # nothing released: the link's teardown requeues it


def test_an_error_for_nothing_in_flight_changes_nothing() -> None:
    p = Peer()
    a = p.answers.error(p.error(9, F.ErrorCode.IO_ERROR))
    assert a.record is None and a.effects == [] and a.error is None and a.log is None


def test_a_refused_rename_sends_both_paths_as_data() -> None:
    p = Peer()
    p.send(1, F.Rename, b"old", dst=b"new", size=7)
    a = p.answers.error(p.error(1, F.ErrorCode.IO_ERROR, message="disk"))
    info = (SINCE, 7, Flag.DATA)
    assert a.effects == [
        Unpark((M, b"old")),
        Unpark((M, b"new")),
        Mark((M, b"new"), info),
        Mark((M, b"old"), info),
    ]
    assert a.error == "disk" and a.log is not None and a.log.level == logging.WARNING
    assert a.log.msg % a.log.args == "peer b could not rename old: disk; sending it again"
    assert a.log.fields == {"MIRROR": "media", "PATH": "old", "CODE": "IO_ERROR"}


def test_a_refused_directory_rename_sends_the_tree_again() -> None:
    p = Peer()
    p.send(1, F.Rename, b"d", dst=b"e", is_dir=True)
    a = p.answers.error(p.error(1, F.ErrorCode.CONFLICT))
    assert a.effects[2:] == [Mark((M, b"e"), DATA), MarkTree(M, b"e", SINCE), Mark((M, b"d"), DATA)]


def test_a_resume_mismatch_drops_the_partial_and_sends_again_at_once() -> None:
    p = Peer()
    p.remote.partials[b"x"] = F.Partial(M, 5, b"v", b"x")
    p.send(1, F.File, b"x", size=10)
    a = p.answers.error(p.error(1, F.ErrorCode.RESUME_MISMATCH))
    assert b"x" not in p.remote.partials
    assert a.effects == [Unpark((M, b"x")), Mark((M, b"x"), (SINCE, 10, Flag.DATA))]
    assert a.log is None and a.error == "no"


def test_transient_errors_are_retried_later_and_later() -> None:
    p = Peer()
    delays = []
    for op in range(1, 9):
        p.send(op, F.File, b"x")
        a = p.answers.error(p.error(op, F.ErrorCode.NO_SPACE, message="full"))
        mark = a.effects[-1]
        assert isinstance(mark, Mark) and mark.key == (M, b"x") and mark.persist
        delays.append(mark.delay)
        assert a.log is not None and a.log.level == logging.WARNING
        assert a.log.msg % a.log.args == f"peer b: full; retrying in {mark.delay:.0f} s"
    assert delays == [RETRY_MIN * 2**i for i in range(5)] + [RETRY_MAX] * 3
    # Other paths count on their own; an ack starts the count again.
    p.send(20, F.File, b"y")
    first = Mark((M, b"y"), DATA, RETRY_MIN)
    assert p.answers.error(p.error(20, F.ErrorCode.IO_ERROR)).effects[-1] == first
    p.send(21, F.File, b"x")
    p.answers.ack(21)
    p.send(22, F.File, b"x")
    first = Mark((M, b"x"), DATA, RETRY_MIN)
    assert p.answers.error(p.error(22, F.ErrorCode.IO_ERROR)).effects[-1] == first


def test_an_unknown_code_counts_as_internal_and_is_retried() -> None:
    p = Peer()
    p.send(1, F.File, b"x")
    a = p.answers.error(p.error(1, 250))
    assert a.log is not None and a.log.fields["CODE"] == "INTERNAL"
    assert a.effects[-1] == Mark((M, b"x"), (SINCE, 0, Flag.DATA), RETRY_MIN)


def test_a_permanent_refusal_is_not_retried_until_the_next_scan() -> None:
    p = Peer()
    p.send(1, F.File, b"d/x")
    a = p.answers.error(p.error(1, F.ErrorCode.BAD_PATH, message="bad"))
    assert a.effects == [Unpark((M, b"d/x")), Done((M, b"d/x"))]
    assert a.error == "bad" and a.log is not None and a.log.level == logging.ERROR
    assert a.log.msg % a.log.args == "peer b refused d/x: bad (not retried until the next scan)"
    assert a.log.fields == {"MIRROR": "media", "PATH": "d/x", "CODE": "BAD_PATH"}
