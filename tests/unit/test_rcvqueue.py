"""ReceiveQueue: the receive buffer a session sets, from what it read and
the round trip (an injected clock; no sockets)."""

from __future__ import annotations

from replicator.rcvqueue import FAST, FLOOR, PERIOD, QUEUE_TIME, ReceiveQueue

MiB = 1 << 20
RTT = 30e-6  # loopback


def test_nothing_before_a_first_period_or_without_a_round_trip() -> None:
    q = ReceiveQueue(cap=4 * MiB)
    assert q.due(0.0)
    assert q.update(0.0, 0, RTT) is None  # the start of the first period
    assert not q.due(PERIOD / 2)
    assert q.due(PERIOD)
    assert q.update(PERIOD, 40 * MiB, 0.0) is None  # round trip unknown
    assert q.size == 0


def test_a_few_milliseconds_of_what_was_read() -> None:
    q = ReceiveQueue(cap=4 * MiB)
    q.update(0.0, 0, RTT)
    rate = 160e6
    got = q.update(0.25, int(rate * 0.25), RTT)
    assert got == int(rate * (QUEUE_TIME + 2 * RTT))  # ~0.8 MB
    assert q.size == got


def test_never_below_the_floor_and_never_above_the_cap() -> None:
    q = ReceiveQueue(cap=4 * MiB)
    q.update(0.0, 0, RTT)
    assert q.update(1.0, 2 * MiB, RTT) == FLOOR  # 2 MB/s
    assert q.update(2.0, 2 * MiB + 10**10, RTT) == 4 * MiB  # 10 GB/s


def test_an_idle_period_changes_nothing() -> None:
    q = ReceiveQueue(cap=64 * MiB)
    q.update(0.0, 0, RTT)
    assert q.update(1.0, 1000, RTT) is None  # nothing carried yet: autotuning
    assert q.size == 0
    size = q.update(2.0, 1000 + 400 * MiB, RTT)
    assert size is not None and size > FLOOR
    assert q.update(3.0, 1000 + 400 * MiB + 1000, RTT) is None  # idle again
    assert q.size == size  # ready for the next big file


def test_a_small_change_is_not_applied() -> None:
    q = ReceiveQueue(cap=64 * MiB)
    q.update(0.0, 0, RTT)
    first = q.update(1.0, 400 * MiB, RTT)
    assert first is not None
    assert q.update(2.0, 400 * MiB + 420 * MiB, RTT) is None  # 5 % more
    assert q.update(3.0, 820 * MiB + 800 * MiB, RTT) is not None  # twice


def test_a_long_round_trip_keeps_the_kernels_own_sizing() -> None:
    # rmem_max / rtt would cap the link below FAST: leave autotuning on
    cap = 212992  # a stock system's net.core.rmem_max
    rtt = 2 * cap / FAST
    q = ReceiveQueue(cap=cap)
    q.update(0.0, 0, rtt)
    assert q.update(1.0, 100 * MiB, rtt) is None
    assert q.size == 0
    # ... and a short one does not
    assert q.update(2.0, 200 * MiB, RTT) == cap


def test_a_link_the_buffer_bounds_can_still_double_its_rate() -> None:
    rtt = 1e-3  # a LAN at 1 ms: window-bound at size / rtt
    q = ReceiveQueue(cap=64 * MiB)
    q.update(0.0, 0, rtt)
    size = q.update(1.0, int(10e6), rtt)  # 10 MB/s read: the floor
    assert size == FLOOR
    read = int(10e6)
    for t in (2.0, 3.0):
        read += int(size / rtt)  # as much as the window lets through
        got = q.update(t, read, rtt)
        assert got is not None and got >= 2 * size
        size = got
    read += int(size / rtt)
    assert q.update(4.0, read, rtt) == 64 * MiB  # up to the cap
