"""Mailbox: what other threads hand a link thread."""

from __future__ import annotations

import queue

import pytest

from replicator.changes import Dirty, Flag, Reconcile
from replicator.mailbox import Mailbox


def test_messages_come_in_order_and_a_scans_dirty_waits_apart() -> None:
    box = Mailbox()
    bulk = [Dirty("m", b"scanned%d" % i, Flag.DATA) for i in range(3)]
    live = Dirty("m", b"written", Flag.CLOSED | Flag.LIVE)
    box.post(bulk[0])
    box.post(Reconcile("m"))
    box.post(bulk[1])
    box.post(live)
    box.post(bulk[2])
    got = []
    while True:
        try:
            got.append(box.get_nowait())
        except queue.Empty:
            break
    # a wake-up token for the bulk queue, then the others in order
    assert [m for m in got if isinstance(m, (Dirty, Reconcile))] == [Reconcile("m"), live]
    assert len(got) == 3
    taken: list[Dirty] = []
    assert box.take_bulk(taken.append, 1.0) is False
    assert taken == bulk


def test_a_blocked_taker_is_woken_by_bulk_only_when_its_queue_was_empty() -> None:
    box = Mailbox()
    box.post(Dirty("m", b"a", Flag.DATA))
    box.get(timeout=0.1)  # the wake-up
    box.post(Dirty("m", b"b", Flag.DATA))  # not empty yet: no second wake-up
    with pytest.raises(queue.Empty):
        box.get(timeout=0.01)
    taken: list[Dirty] = []
    box.take_bulk(taken.append, 1.0)
    assert [d.path for d in taken] == [b"a", b"b"]
    box.post(Dirty("m", b"c", Flag.DATA))  # empty again: wakes
    box.get(timeout=0.1)


def test_take_bulk_stops_after_its_budget_and_says_more_is_left() -> None:
    box = Mailbox()
    for i in range(5000):
        box.post(Dirty("m", b"%d" % i, Flag.DATA))
    taken: list[Dirty] = []
    assert box.take_bulk(taken.append, 0.0) is True
    assert len(taken) == 256  # checked every 256
    assert box.take_bulk(taken.append, 10.0) is False
    assert len(taken) == 5000
