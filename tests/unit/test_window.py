"""BulkWindow: how many bulk operations a link keeps in flight."""

from __future__ import annotations

from replicator.window import LATENCY_WINDOW_S, PERIOD, BulkWindow


def test_starts_at_the_floor_until_an_ack_gives_a_latency() -> None:
    w = BulkWindow(queue_s=0.02, floor=64, ceiling=4096)
    assert w.update(0.0, 0) == 64
    assert w.update(PERIOD / 2, 10_000) == 64  # too early to tell
    assert w.update(PERIOD, 10_000) == 64  # a rate, but no latency yet
    assert w.allows(63) and not w.allows(64)


def test_covers_the_latency_plus_the_queue_at_the_delivery_rate() -> None:
    w = BulkWindow(queue_s=0.02, floor=64, ceiling=4096)
    w.update(0.0, 0)
    w.acked(0.5, 0.040)
    w.acked(0.6, 0.030)  # the shortest counts
    w.acked(0.7, 0.090)
    # 5,000 acks/s, 30 ms minimum latency: 5,000 * (0.03 + 0.02) = 250
    assert w.update(1.0, 5_000) == 250
    assert w.rate == 5_000 and w.min_latency == 0.030


def test_the_rate_is_the_highest_of_the_last_periods() -> None:
    w = BulkWindow(queue_s=0.0, floor=1, ceiling=10**6)
    w.update(0.0, 0)
    w.acked(0.0, 1.0)
    assert w.update(1.0, 1000) == 1000
    assert w.update(2.0, 1100) == 1000  # a slow period does not shrink it at once


def test_an_old_minimum_latency_expires() -> None:
    w = BulkWindow()
    w.acked(0.0, 0.001)
    w.acked(1.0, 0.050)
    assert w.min_latency == 0.001
    w.acked(LATENCY_WINDOW_S + 0.1, 0.050)
    assert w.min_latency == 0.050


def test_grows_while_it_limits_the_rate_then_settles_near_the_peer_capacity() -> None:
    """A peer that serves 20,000 ops/s with 10 ms of commit latency: from
    the floor the window grows geometrically, then settles where about
    QUEUE_S of work waits beyond the latency (not at the ceiling)."""
    w = BulkWindow(queue_s=0.02, floor=64, ceiling=4096)
    base, capacity = 0.010, 20_000.0
    now, acked = 0.0, 0
    w.update(now, acked)
    sizes = []
    for _ in range(40):
        size = w.size
        latency = base + size / capacity  # queueing behind `size` ops
        rate = min(capacity, size / latency)
        w.acked(now, base + 1 / capacity)  # an op with nothing ahead
        now += PERIOD
        acked += int(rate * PERIOD)
        sizes.append(w.update(now, acked))
    assert sizes[2] > 2 * 64  # grew fast
    assert sizes[-1] == sizes[-2]  # settled
    # ...with about QUEUE_S of the peer's work waiting: capacity * QUEUE_S
    assert 0.8 * capacity * 0.02 <= sizes[-1] <= 1.2 * capacity * 0.02


def test_never_below_the_floor_nor_above_the_ceiling() -> None:
    w = BulkWindow(queue_s=0.02, floor=64, ceiling=1000)
    w.update(0.0, 0)
    w.acked(0.0, 0.001)
    assert w.update(1.0, 0) == 64  # nothing acked: an idle link
    assert w.update(2.0, 10_000_000) == 1000
