"""BulkWindow: how many bulk operations a link keeps in flight."""

from __future__ import annotations

from replicator.window import PERIOD, BulkWindow


def test_starts_at_the_floor_and_waits_a_period_before_resizing() -> None:
    w = BulkWindow(queue_s=0.02, floor=64, ceiling=4096)
    assert w.update(0.0, 0, 0.001) == 64
    assert w.update(PERIOD / 2, 10_000, 0.001) == 64  # too early to tell
    assert w.allows(63) and not w.allows(64)


def test_covers_a_round_trip_plus_the_queue_at_the_ack_rate() -> None:
    w = BulkWindow(queue_s=0.02, floor=64, ceiling=4096)
    w.update(0.0, 0, None)
    # 5,000 acks/s over a 30 ms round trip: 5,000 * (0.03 + 0.02) = 250
    assert w.update(1.0, 5_000, 0.03) == 250
    assert w.rate == 5_000


def test_grows_while_the_window_limits_the_rate_then_settles() -> None:
    """A peer that serves 20,000 ops/s with 5 ms of commit latency, 1 ms
    away: the window grows from the floor to where about queue_s of work is
    queued, and stays there."""
    w = BulkWindow(queue_s=0.02, floor=64, ceiling=4096)
    rtt, commit, capacity = 0.001, 0.005, 20_000.0
    now, acked = 0.0, 0
    w.update(now, acked, rtt)
    sizes = []
    for _ in range(40):
        # throughput with `size` in flight: limited by the window or the peer
        rate = min(capacity, w.size / (rtt + commit + w.size / capacity))
        now += PERIOD
        acked += int(rate * PERIOD)
        sizes.append(w.update(now, acked, rtt))
    assert sizes[0] > 64  # grew
    assert sizes[-1] == sizes[-2]  # settled
    # ...with about queue_s + rtt of the peer's work in flight, not 4,096 ops
    assert 0.5 * capacity * 0.021 <= sizes[-1] <= 1.5 * capacity * 0.021


def test_never_below_the_floor_nor_above_the_ceiling() -> None:
    w = BulkWindow(queue_s=0.02, floor=64, ceiling=1000)
    w.update(0.0, 0, 0.0)
    assert w.update(1.0, 0, 0.0) == 64  # nothing acked: an idle link
    assert w.update(2.0, 10_000_000, 0.5) == 1000
