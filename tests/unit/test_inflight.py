"""The in-flight rules of a link, without sockets (replicator/inflight.py)."""

from __future__ import annotations

import pytest

from replicator import frames as F
from replicator.inflight import Admit, InFlight, Record

M = 1
INFO = (100.0, 0, 1)


def file_op(path: bytes, since: float = 1.0) -> Record:
    return Record(F.File, (M, path), since)


def rename_op(src: bytes, dst: bytes, is_dir: bool, since: float = 1.0) -> Record:
    return Record(F.Rename, (M, src), since, dst=dst, is_dir=is_dir)


def test_one_operation_per_path() -> None:
    f = InFlight()
    assert f.admit((M, b"a/x")) == (Admit.GO, 0)
    f.track(1, file_op(b"a/x"))
    assert f.admit((M, b"a/x")) == (Admit.BUSY, 0)
    assert f.busy((M, b"a/x")) and 1 in f and len(f) == 1
    assert f.admit((2, b"a/x")) == (Admit.GO, 0)  # another mirror
    with pytest.raises(ValueError):
        f.track(1, file_op(b"other"))


def test_a_directory_with_children_in_flight_is_not_judged() -> None:
    f = InFlight()
    f.track(1, file_op(b"a/x"))
    f.track(2, file_op(b"a/y"))
    assert f.admit((M, b"a")) == (Admit.DIR_BUSY, 0)
    assert f.admit((M, b"")) == (Admit.GO, 0)  # only the direct parent
    f.release(1)
    assert f.admit((M, b"a")) == (Admit.DIR_BUSY, 0)
    f.release(2)
    assert f.admit((M, b"a")) == (Admit.GO, 0)


def test_release_frees_the_paths_and_returns_the_record() -> None:
    f = InFlight()
    rec = rename_op(b"old", b"new", is_dir=False)
    f.track(7, rec)
    assert f.admit((M, b"new")) == (Admit.BUSY, 0)
    out = f.release(7)
    assert out is not None and out.record is rec
    assert out.freed == [(M, b"old"), (M, b"new")] and out.woken == []
    assert f.admit((M, b"old")) == (Admit.GO, 0) and f.admit((M, b"new")) == (Admit.GO, 0)
    assert f.release(7) is None  # answered twice: nothing happens


def test_paths_below_a_renamed_directory_wait_for_the_rename() -> None:
    f = InFlight()
    f.track(3, rename_op(b"d", b"e/f", is_dir=True))
    for below in (b"d/x", b"d/sub/y", b"e/f/z"):
        assert f.admit((M, below)) == (Admit.RENAMING, 3)
    assert f.admit((M, b"dx")) == (Admit.GO, 0)  # a sibling with a common prefix
    f.wait(3, (M, b"d/x"), INFO)
    out = f.release(3)
    assert out is not None and out.woken == [((M, b"d/x"), INFO)]
    assert f.admit((M, b"d/x")) == (Admit.GO, 0)


def test_a_file_rename_does_not_block_paths_below() -> None:
    f = InFlight()
    f.track(3, rename_op(b"d", b"e", is_dir=False))
    assert f.admit((M, b"d/x")) == (Admit.GO, 0)


@pytest.mark.parametrize(
    ("busy", "src", "dst", "blocked"),
    [
        (file_op(b"a"), b"a", b"b", True),  # the source itself
        (file_op(b"b"), b"a", b"b", True),  # the destination
        (file_op(b"a/deep/x"), b"a", b"b", True),  # below the source
        (file_op(b"b/x"), b"a", b"b", True),  # below the destination
        (rename_op(b"p", b"q", is_dir=True), b"p/a", b"b", True),  # ancestor renaming
        (file_op(b"ab"), b"a", b"b", False),  # a common prefix only
        (Record(F.File, (2, b"a"), 1.0), b"a", b"b", False),  # another mirror
    ],
)
def test_rename_blocked(busy: Record, src: bytes, dst: bytes, blocked: bool) -> None:
    f = InFlight()
    f.track(1, busy)
    assert f.rename_blocked(M, src, dst) is blocked


def test_clear_hands_back_everything_for_requeueing() -> None:
    f = InFlight()
    a, r = file_op(b"a", 5.0), rename_op(b"d", b"e", is_dir=True, since=3.0)
    f.track(1, a)
    f.track(2, r)
    f.wait(2, (M, b"d/x"), (2.0, 0, 1))
    assert f.oldest() == 2.0
    records, waiting = f.clear()
    assert records == [a, r] and waiting == [((M, b"d/x"), (2.0, 0, 1))]
    assert len(f) == 0 and f.oldest() is None
    assert f.admit((M, b"a")) == (Admit.GO, 0) and f.admit((M, b"d/x")) == (Admit.GO, 0)
    assert f.admit((M, b"")) == (Admit.GO, 0)


def test_oldest_is_the_first_tracked_or_waiting() -> None:
    f = InFlight()
    assert f.oldest() is None
    f.track(1, file_op(b"a", 10.0))
    f.track(2, file_op(b"b", 4.0))
    assert f.oldest() == 10.0  # the first one sent (ops go out in order)
    f.release(1)
    assert f.oldest() == 4.0


def test_bulk_operations_are_counted_until_released_or_cleared() -> None:
    f = InFlight()
    f.track(1, Record(F.File, (1, b"a"), 1.0))
    f.track(2, Record(F.File, (1, b"b"), 1.0, live=True))
    f.track(3, Record(F.Delete, (1, b"c"), 1.0))
    assert f.bulk == 2
    f.release(2)
    assert f.bulk == 2
    f.release(1)
    assert f.bulk == 1
    f.release(1)  # twice: nothing changes
    assert f.bulk == 1
    f.clear()
    assert f.bulk == 0
