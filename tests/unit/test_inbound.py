"""Inbound (routing, opens, descriptor budget) and GroupCommit, without a socket."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from replicator import frames as F
from replicator.errors import RemoteProtocolError
from replicator.inbound import MAX_REFUSED_OPENS, GroupCommit, Inbound
from replicator.receiving import Ack, Refuse
from replicator.stats import SessionStats

from .test_receiving import PEER, file_ev, make_config

# -- GroupCommit ------------------------------------------------------------------------


def test_nothing_pending_is_never_due() -> None:
    g = GroupCommit(delay=0.005)
    assert not g.due(0, 0, 100.0, more_at_hand=False)
    assert g.since is None


def test_due_at_once_when_nothing_more_is_at_hand() -> None:
    g = GroupCommit(delay=0.005)
    assert g.due(1, 10, 100.0, more_at_hand=False)


def test_waits_for_company_while_input_is_at_hand_then_the_deadline_wins() -> None:
    g = GroupCommit(delay=0.005, ops=1024, nbytes=1 << 30)
    assert not g.due(1, 10, 100.000, more_at_hand=True)
    assert not g.due(5, 50, 100.004, more_at_hand=True)
    # the clock runs from the first pending operation, not the last
    assert g.due(6, 60, 100.0051, more_at_hand=True)
    g.committed()
    assert g.since is None
    assert not g.due(1, 10, 100.006, more_at_hand=True)  # a new group, a new clock


def test_a_large_group_is_due_at_once() -> None:
    g = GroupCommit(delay=10.0, ops=4, nbytes=100)
    assert g.due(4, 1, 0.0, more_at_hand=True)
    g.committed()
    assert g.due(1, 100, 0.0, more_at_hand=True)


def test_the_clock_restarts_when_something_else_published_the_group() -> None:
    g = GroupCommit(delay=0.005)
    assert not g.due(1, 1, 100.0, more_at_hand=True)
    # e.g. a List committed the mirror: nothing pending any more
    assert not g.due(0, 0, 100.1, more_at_hand=True)
    assert not g.due(1, 1, 100.2, more_at_hand=True)


# -- Inbound ----------------------------------------------------------------------------


def make_inbound(tmp_path: Path, budget: int = 4096, fixed: int = 3) -> Inbound:
    (tmp_path / "m").mkdir(exist_ok=True)
    return Inbound(
        make_config(tmp_path),
        PEER,
        SessionStats(PEER, "here"),
        lambda name: True,
        lambda name, path: None,
        lambda: fixed,
        budget,
    )


def test_open_then_a_file_is_routed_acked_on_commit_and_published(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    freed, opened, refused = inb.open(F.Open(1, "m"))
    assert freed == [] and refused is None
    assert (opened.mirror, opened.code) == (1, 0)
    ev = file_ev(7, b"f", b"hello")
    assert inb.begin(ev) == []
    inb.chunk(7)
    assert inb.write_inline(b"hello") == []
    assert inb.end(7) == []
    assert inb.pending() == (1, 5)
    assert inb.commit() == [Ack(7)]
    assert (tmp_path / "m" / "f").read_bytes() == b"hello"
    assert inb.pending() == (0, 0)
    inb.close()


def test_payload_of_an_unknown_op_is_drained(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    inb.chunk(99)
    assert inb.write_inline(b"lost") == []
    assert inb.end(99) == []
    inb.abort(99)
    assert inb.commit() == []
    inb.close()


def test_an_aborted_file_is_forgotten(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    inb.begin(file_ev(3, b"f", b"abc"))
    inb.abort(3)
    assert inb.ops == {}
    assert inb.commit() == []
    assert not (tmp_path / "m" / "f").exists()
    inb.close()


def test_a_failed_write_refuses_the_file_and_drains_the_rest(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    inb.begin(file_ev(3, b"f", b"abc"))
    inb.chunk(3)
    p = inb.mirror(1).files[3]
    # the next write fails with EBADF: the partial's descriptor is read-only
    ro = os.open(os.devnull, os.O_RDONLY)
    os.dup2(ro, p.fd)
    os.close(ro)
    answers = inb.write_inline(b"abc")
    assert [type(a) for a in answers] == [Refuse]
    assert inb.write_inline(b"more") == []  # drained: the target is gone
    assert inb.end(3) == []  # refused already
    inb.close()


def test_a_mirror_is_opened_once_per_connection(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    inb.open(F.Open(1, "m"))
    with pytest.raises(RemoteProtocolError, match="already opened"):
        inb.open(F.Open(2, "m"))
    inb.close()


def test_refused_opens_are_answered_then_too_many_close_the_connection(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path)
    for i in range(MAX_REFUSED_OPENS):
        _, opened, refused = inb.open(F.Open(i + 1, f"nope{i}"))
        assert refused is not None and opened.code == refused.code != 0
        assert "nope" in opened.message
    with pytest.raises(RemoteProtocolError) as e:
        inb.open(F.Open(999, "nope-last"))
    assert e.value.code is F.ErrorCode.LIMIT


def test_a_tight_budget_commits_before_an_operation_and_returns_its_acks(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path, budget=100)
    inb.open(F.Open(1, "m"))
    inb.begin(file_ev(1, b"a", b"x"))
    inb.chunk(1)
    inb.write_inline(b"x")
    inb.end(1)
    assert inb.pending()[0] == 1
    inb.fd_budget = inb.fds_held()  # no room left for the next operation
    answers = inb.begin(file_ev(2, b"b", b"y"))
    assert Ack(1) in answers
    assert (tmp_path / "m" / "a").read_bytes() == b"x"
    inb.close()


def test_an_open_that_needs_room_commits_first_and_returns_the_acks(tmp_path: Path) -> None:
    for d in ("m", "n"):
        (tmp_path / d).mkdir()
    extra = f'[mirrors.n]\npath = "{tmp_path}/n"\naccept_from = ["a"]'
    cfg = make_config(tmp_path, extra=extra)
    inb = Inbound(
        cfg, PEER, SessionStats(PEER, "here"), lambda n: True, lambda n, p: None, lambda: 3, 100
    )
    inb.open(F.Open(1, "m"))
    inb.begin(file_ev(1, b"a", b"x"))
    inb.chunk(1)
    inb.write_inline(b"x")
    inb.end(1)
    held = inb.fds_held()
    inb.fd_budget = held + 1  # an open needs more than one descriptor
    freed, _, refused = inb.open(F.Open(2, "n"))
    assert freed == [Ack(1)]  # committed to make room; the ack is not lost
    assert (tmp_path / "m" / "a").read_bytes() == b"x"
    # the partial folder's cached descriptors were dropped: "n" fits or is
    # refused for want of room, never silently
    assert refused is None or "file descriptors" in refused.message
    inb.close()


def test_descriptors_held_count_the_session_and_each_mirror(tmp_path: Path) -> None:
    inb = make_inbound(tmp_path, fixed=3)
    assert inb.fds_held() == 3
    inb.open(F.Open(1, "m"))
    after_open = inb.fds_held()
    assert after_open > 3
    inb.begin(file_ev(1, b"a", b"x"))
    assert inb.fds_held() > after_open  # the partial file
    inb.close()
