"""Bandwidth limits: the syntax (rates.py), its config errors, the pacing
options a real loopback socket reports (net.pace), the chunk size under a
limit, and the status line."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

from replicator import config, net
from replicator.ctl import _bwlimit
from replicator.errors import ConfigError
from replicator.outgoing import CHUNK, MIN_CHUNK, chunk_size
from replicator.rates import MIN_RATE, parse_rate, show_rate

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
    assert chunk_size(0) == CHUNK
    assert chunk_size(1 << 30) == CHUNK
    assert chunk_size(2 * MiB) == MiB
    assert chunk_size(MIN_RATE) == MIN_CHUNK


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
    assert net.pace(connected, 0) == 0
    raw = connected.getsockopt(socket.SOL_SOCKET, net.SO_MAX_PACING_RATE, 8)
    assert struct.unpack("Q", raw)[0] == net.NO_PACING
    assert connected.getsockopt(socket.IPPROTO_TCP, net.TCP_NOTSENT_LOWAT) == 0


def test_the_status_line() -> None:
    assert _bwlimit({"bwlimit": 0, "bwlimit_applied": 0}) == ""
    assert _bwlimit({"bwlimit": 0, "bwlimit_applied": None}) == ""
    assert _bwlimit({"bwlimit": 8 * MiB, "bwlimit_applied": 8 * MiB}) == ", bwlimit 8.0 MiB/s"
    assert _bwlimit({"bwlimit": 8 * MiB, "bwlimit_applied": None}) == ", bwlimit 8.0 MiB/s"
    assert _bwlimit({"bwlimit": 2 * MiB, "bwlimit_applied": 8 * MiB}) == (
        ", bwlimit 2.0 MiB/s (the connection reports 8.0 MiB/s)"
    )
