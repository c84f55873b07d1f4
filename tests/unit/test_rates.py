"""Bandwidth limits: the syntax (rates.py), its config errors, the pacing
options a real loopback socket reports (net.pace), the chunk size under a
limit, and the status line."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterator

import pytest

from replicator import config, net
from replicator.ctl import _bwlimit
from replicator.errors import ConfigError
from replicator.logs import Fields
from replicator.outgoing import (
    CHUNK,
    CHUNK_TIME,
    FIRST_CHUNK,
    LIVE_MIN_CHUNK,
    MIN_CHUNK,
    SendRate,
    chunk_size,
)
from replicator.rates import MIN_RATE, parse_rate, show_rate
from replicator.stats import LinkStats
from replicator.wire import LOWAT_CAP, LOWAT_TIME, Wire

MiB = 1 << 20


@pytest.mark.parametrize(
    ("value", "rate"),
    [
        (0, 0),
        ("0", 0),
        ("0B", 0),
        (52428800, 50 * MiB),
        ("50MiB", 50 * MiB),
        ("50M", 50 * MiB),  # rsync's --bwlimit=50M
        ("50 MiB/s", 50 * MiB),
        ("512K", 512 << 10),
        ("1.5GiB", 3 << 29),
        ("100MB", 100_000_000),
        ("100Mbit", 12_500_000),
        ("1Gbit/s", 125_000_000),
        ("800kbit", 100_000),
        ("16KiB", MIN_RATE),
    ],
)
def test_rates_that_parse(value: object, rate: int) -> None:
    assert parse_rate(value) == rate


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("50", 'has no unit: write "50B" for bytes per second, or "50K" for KiB/s'),
        ("50mb", "unknown unit 'mb'"),  # is it bits or bytes? Not guessed
        ("50Mb", "unknown unit 'Mb'"),
        ("fast", "is not a rate: write bytes per second as an integer"),
        ("-5MiB", "is not a rate"),
        (-5, "is negative"),
        (1.5, "1.5 is not a rate"),
        (True, "true is not a rate"),
        (1000, "below the lowest limit, 16 KiB/s"),
        ("1K", "below the lowest limit"),
        ("2000GiB", "above 1 TiB/s"),
    ],
)
def test_rates_refused_say_what_to_write(value: object, says: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_rate(value)
    assert says in str(e.value)


def test_show_rate() -> None:
    assert show_rate(0) == show_rate(None) == "unlimited"
    assert show_rate(50 * MiB) == "50.0 MiB/s"
    assert show_rate(12_500_000) == "11.9 MiB/s"
    assert show_rate(100) == "100 B/s"
    assert show_rate(3 << 40) == "3072.0 GiB/s"


BASE = """
[node]
name = "a"
listen = "127.0.0.1:7301"

[peers.b]
address = "127.0.0.2:7301"
key_file = "/k/a-b.key"
"""


def test_bwlimit_in_the_config() -> None:
    assert config.parse(BASE).peers["b"].bwlimit == 0
    assert config.parse(BASE + 'bwlimit = "50MiB"\n').peers["b"].bwlimit == 50 * MiB
    assert config.parse(BASE + "bwlimit = 1048576\n").peers["b"].bwlimit == MiB
    with pytest.raises(ConfigError) as e:
        config.parse(BASE + 'bwlimit = "50 mbps"\n', "f.toml")
    assert str(e.value).startswith("f.toml: peers.b.bwlimit: '50 mbps': unknown unit 'mbps'")


def test_chunks_take_half_a_second_at_the_limit() -> None:
    fast = 10e9  # what the link sends at does not matter here
    assert chunk_size(0, fast) == CHUNK
    assert chunk_size(1 << 30, fast) == CHUNK
    assert chunk_size(2 * MiB, fast) == MiB
    assert chunk_size(MIN_RATE, fast) == MIN_CHUNK


def test_chunks_take_a_few_milliseconds_at_the_rate_the_link_sends_at() -> None:
    assert chunk_size(0, None) == FIRST_CHUNK  # the rate is not known yet
    assert chunk_size(0, 150e6) == int(150e6 * CHUNK_TIME)  # ~1.2 MB
    assert chunk_size(0, 10e9) == CHUNK  # a fast link: the largest chunk
    assert chunk_size(0, 1e6) == LIVE_MIN_CHUNK  # a slow one: not below this
    # a limit still caps it: half a second at the limit
    assert chunk_size(2 * MiB, 150e6) == MiB
    assert chunk_size(MIN_RATE, None) == MIN_CHUNK


def test_the_send_rate_follows_chunks_that_follow_each_other() -> None:
    r = SendRate()
    r.sent(MiB, 10.0)
    assert r.rate is None  # one chunk: no interval yet
    r.sent(MiB, 10.01)
    assert r.rate == pytest.approx(MiB / 0.01)
    r.sent(MiB, 10.03)  # slower: bytes and time move a quarter of the way each
    assert r.rate == pytest.approx(MiB / (0.01 + 0.25 * (0.02 - 0.01)))
    before = r.rate
    r.sent(MiB, 20.0)  # after a pause: not a sample (the link was idle)
    assert r.rate == before
    r.sent(MiB, 20.0)  # no time passed: not a sample either
    assert r.rate == before


def test_a_chunk_that_blocked_weighs_by_its_time() -> None:
    """Chunks that went into an empty socket buffer at once, then one that
    waited 125 ms for a receiver busy on its disk (bench/live.py, tree load):
    the rate falls to what was sent over the time it took, so the next chunk
    (CHUNK_TIME at that rate) no longer blocks the link for 100 ms and more.
    The average of each chunk's own rate stayed above 300 MB/s."""
    r = SendRate()
    t = 10.0
    for _ in range(8):
        t += 0.008
        r.sent(3 * MiB, t)  # ~390 MB/s
    t += 0.125
    r.sent(3 * MiB, t)
    assert r.rate is not None
    assert r.rate < 100e6
    assert chunk_size(0, r.rate) < MiB


def test_a_chunk_that_blocked_longer_than_a_pause_still_counts() -> None:
    r = SendRate()
    r.sent(MiB, 10.0, began=9.999)  # into an empty buffer: very fast
    r.sent(4 * MiB, 10.6, began=10.0)  # then blocked 0.6 s behind a busy receiver
    assert r.rate is not None and r.rate < 100e6
    slow = r.rate
    # after a real pause, a chunk counts from its own start
    r.sent(MiB, 30.5, began=30.0)
    assert r.rate < slow


@pytest.fixture
def connected() -> Iterator[socket.socket]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    c = socket.create_connection(ls.getsockname())
    s, _ = ls.accept()
    try:
        yield c
    finally:
        for x in (c, s, ls):
            x.close()


def test_pace_sets_and_reads_back_the_socket_options(connected: socket.socket) -> None:
    assert net.pacing(connected) == 0  # a new socket has no cap
    assert net.pace(connected, 8 * MiB) == 8 * MiB
    lowat = connected.getsockopt(socket.IPPROTO_TCP, net.TCP_NOTSENT_LOWAT)
    assert lowat == 2 * MiB  # a quarter of a second at the rate
    assert net.pace(connected, MIN_RATE) == MIN_RATE
    assert connected.getsockopt(socket.IPPROTO_TCP, net.TCP_NOTSENT_LOWAT) == net.LOWAT_MIN
    # no limit again: the kernel's "none" and the sysctl's queue
    # no limit again: the kernel's "none", and the unlimited socket's queue
    assert net.pace(connected, 0) == 0
    raw = connected.getsockopt(socket.SOL_SOCKET, net.SO_MAX_PACING_RATE, 8)
    assert struct.unpack("Q", raw)[0] == net.NO_PACING
    assert net.lowat(connected) == net.LOWAT


def test_every_socket_keeps_its_unsent_queue_small_and_tune_leaves_a_limit_alone(
    connected: socket.socket,
) -> None:
    assert net.lowat(connected) == 0  # the kernel's: up to the whole send buffer
    net.tune(connected, 10.0)
    assert net.lowat(connected) == net.LOWAT
    net.pace(connected, 8 * MiB)
    net.tune(connected, 20.0)  # a reload's retime: the limit's queue stays
    assert net.lowat(connected) == 2 * MiB


def test_the_round_trip_and_the_receive_buffer_of_a_real_connection(
    connected: socket.socket,
) -> None:
    connected.sendall(b"x")  # an exchange gives the kernel a round trip
    rtt = net.rtt(connected)
    assert 0 < rtt < 1.0  # loopback: microseconds
    assert net.rmem_max() > 0
    net.set_rcvbuf(connected, 512 << 10)
    # the kernel doubles it (its bookkeeping), within net.core.rmem_max
    got = connected.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    assert got == 2 * min(512 << 10, net.rmem_max())


def test_the_status_line() -> None:
    assert _bwlimit({"bwlimit": 0, "bwlimit_applied": 0}) == ""
    assert _bwlimit({"bwlimit": 0, "bwlimit_applied": None}) == ""
    assert _bwlimit({"bwlimit": 8 * MiB, "bwlimit_applied": 8 * MiB}) == ", bwlimit 8.0 MiB/s"
    assert _bwlimit({"bwlimit": 8 * MiB, "bwlimit_applied": None}) == ", bwlimit 8.0 MiB/s"
    assert _bwlimit({"bwlimit": 2 * MiB, "bwlimit_applied": 8 * MiB}) == (
        ", bwlimit 2.0 MiB/s (the connection reports 8.0 MiB/s)"
    )


def _wire(sock: socket.socket, rate: int = 0) -> Wire:
    node = config.parse(BASE).node
    w = Wire(
        node,
        "b",
        "127.0.0.1:1",
        b"k" * 32,
        LinkStats("b", "x"),
        lambda m: None,
        Fields(logging.getLogger("test")),
        rate,
    )
    net.tune(sock, node.dead_after)
    w.sock = sock
    w._lowat = net.LOWAT  # as connect() leaves it
    return w


def test_the_unsent_queue_follows_the_send_rate_without_a_limit(
    connected: socket.socket,
) -> None:
    w = _wire(connected)
    w.sent(4 * MiB, 10.0)
    assert net.lowat(connected) == net.LOWAT  # the rate is not known yet
    w.sent(4 * MiB, 10.002)  # 2 GB/s: ~4 ms of queue is cheap, 128 KiB wakeups are not
    assert net.lowat(connected) == min(LOWAT_CAP, int(w.send_rate.rate * LOWAT_TIME))
    assert w.chunk == CHUNK
    for t in range(1, 40):  # down to ~100 MB/s: back near the smallest queue
        w.sent(MiB, 10.002 + t * 0.01)
    # (a change under a quarter is not applied)
    assert net.LOWAT <= net.lowat(connected) <= net.LOWAT * 4 // 3
    assert w.chunk == max(LIVE_MIN_CHUNK, int(w.send_rate.rate * CHUNK_TIME))


def test_a_limit_keeps_its_own_unsent_queue(connected: socket.socket) -> None:
    w = _wire(connected, rate=8 * MiB)
    net.pace(connected, 8 * MiB)
    w.sent(MiB, 10.0)
    w.sent(MiB, 10.001)
    assert net.lowat(connected) == 2 * MiB  # pace(): a quarter of a second
