"""GroupCommit: when to publish everything, when only the live files (an
injected clock, no sleeping)."""

from __future__ import annotations

from replicator.groupcommit import Commit, GroupCommit

ALL, LIVE = Commit.ALL, Commit.LIVE


def test_nothing_pending_is_never_due() -> None:
    g = GroupCommit(delay=0.005)
    assert g.due(0, 0, 0, 100.0, more_at_hand=False) is None
    assert g.since is None


def test_everything_at_once_when_nothing_more_is_at_hand() -> None:
    g = GroupCommit(delay=0.005)
    assert g.due(1, 10, 0, 100.0, more_at_hand=False) is ALL
    assert g.due(1, 10, 1, 100.0, more_at_hand=False) is ALL


def test_live_files_wait_for_company_then_the_deadline_publishes_them_alone() -> None:
    g = GroupCommit(delay=0.005, ops=1024, nbytes=1 << 30)
    assert g.due(1, 10, 1, 100.000, more_at_hand=True) is None
    assert g.due(5, 50, 3, 100.004, more_at_hand=True) is None
    # the clock runs from the first pending live file, not the last
    assert g.due(6, 60, 4, 100.0051, more_at_hand=True) is LIVE
    g.committed()
    assert g.since is None
    assert g.due(3, 30, 1, 100.006, more_at_hand=True) is None  # a new group, a new clock


def test_bulk_work_has_no_deadline_while_input_keeps_coming() -> None:
    g = GroupCommit(delay=0.005, ops=1024, nbytes=1 << 30)
    assert g.due(10, 100, 0, 100.0, more_at_hand=True) is None
    assert g.due(1023, 100, 0, 200.0, more_at_hand=True) is None
    assert g.since is None
    assert g.due(1024, 100, 0, 200.0, more_at_hand=True) is ALL


def test_the_live_clock_starts_with_the_first_live_file_not_the_bulk() -> None:
    g = GroupCommit(delay=0.005, ops=1024, nbytes=1 << 30)
    assert g.due(10, 100, 0, 100.0, more_at_hand=True) is None
    assert g.due(11, 110, 1, 100.5, more_at_hand=True) is None
    assert g.since == 100.5
    assert g.due(11, 110, 1, 100.506, more_at_hand=True) is LIVE


def test_a_large_group_is_due_whole_at_once() -> None:
    g = GroupCommit(delay=10.0, ops=4, nbytes=100)
    assert g.due(4, 1, 1, 0.0, more_at_hand=True) is ALL
    g.committed()
    assert g.due(1, 100, 0, 0.0, more_at_hand=True) is ALL


def test_the_clock_restarts_when_something_else_published_the_live_files() -> None:
    g = GroupCommit(delay=0.005)
    assert g.due(1, 1, 1, 100.0, more_at_hand=True) is None
    # e.g. a List committed the mirror: nothing live pending any more
    assert g.due(2, 2, 0, 100.1, more_at_hand=True) is None
    assert g.due(3, 3, 1, 100.2, more_at_hand=True) is None
    assert g.due(3, 3, 1, 100.2049, more_at_hand=True) is None


def test_live_files_go_at_once_before_a_big_payload_is_read() -> None:
    g = GroupCommit(delay=0.005, ops=1024, nbytes=1 << 30, ahead=256 << 10)
    # a small payload next: the live file waits for company as before
    assert g.due(1, 10, 1, 100.0, more_at_hand=True, payload_ahead=4096) is None
    # a big file's chunk next: nothing can join the group before it is read
    assert g.due(1, 10, 1, 100.001, more_at_hand=True, payload_ahead=4 << 20) is LIVE
    g.committed()
    # bulk work alone still waits for its group, chunk or not
    assert g.due(10, 100, 0, 100.002, more_at_hand=True, payload_ahead=4 << 20) is None
